"""Scale-out bench: one grid sweep through the real service, embedded executor vs Ray actors.

The same sweep (by default 24 `weighted_delta` grid points over `lambda`, adapters / eval tasks
intent and sentiment of the demo workspace, split `test`, a stratified eval subset of 200 per
task) runs through the real service (`python -m app.cli serve`, uvicorn, talked to with httpx)
under four configurations:

    embedded-1t   embedded executor, worker_threads=1
    embedded-2t   embedded executor, worker_threads=2 (one process, 2 torch threads)
    ray-1a        Ray executor, ray_workers=1, worker_threads=1 (one actor, 1 torch thread)
    ray-2a        Ray executor, ray_workers=2, worker_threads=1 (two actors, 1 torch thread each)

For the Ray configurations one local cluster is started for the whole bench (`ray start --head
--num-cpus 2 --include-dashboard=false --disable-usage-stats` on free ports, its own short
`--temp-dir` under /tmp: Ray's unix socket paths must stay under 107 characters) and the service
joins it with `LORA_MERGE_RAY_ADDRESS=127.0.0.1:<port>`. At the end it is stopped by killing
exactly its own processes (those whose command line names its temp dir or port, and their
children), never with `ray stop`, which would stop every Ray on the machine.

Each configuration gets a fresh artifacts directory (and so a fresh SQLite database) and its own
server. Before timing, the server runs a warm-up sweep with one point per worker (1 point, or 2
on 2 actors) on the same subset: it computes the cached base and reference metrics and the
subset indices, and loads the adapters and the tokenised data on every worker, so no timed
sweep pays those first-time costs. Then `--rounds` timed sweeps run one after the other; each
round's request differs only in `method_params.lambda`, which the grid's `lambda` overrides
(same merges, same objectives), so each is a fresh sweep and never a resumption of the last.

A sweep's wall time is the server's own, `timestamps.finished_at - timestamps.started_at` of
`GET /jobs/{id}` (the client's submit-to-succeeded time, which adds queueing and its 0.5 s
polling, is kept in the JSON). Per-trial wall = sweep wall / points. The report gives the
median and min-max over rounds, trials per hour, the speedup of 2 actors over 1 actor (goal
>= 1.7x), 2 actors against the embedded executor with 2 threads, and the control plane's added
per-trial overhead, (1-actor trial wall - embedded 1-thread trial wall) / embedded 1-thread
trial wall (goal < 5%). It also checks that every configuration's trials have the same
objectives (grid index by grid index) and says which actor ran how many trials.

Run from the repository root, on an otherwise quiet machine:

    .venv/bin/python bench/scale_bench.py                        # print the table
    .venv/bin/python bench/scale_bench.py --json /tmp/scale.json # and the raw figures
    .venv/bin/python bench/scale_bench.py --write                # and put the table into
                                        # README.md between the scale-results markers
    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python bench/scale_bench.py \\
        --points 4 --subset 40 --rounds 1                        # a quick smoke run

No number in the output is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# First: importing common puts the checkout on sys.path and Hugging Face offline.
from common import ROOT, cpu_name, display_path, package_versions, replace_marked_block, utc_stamp

import httpx

os.environ["HF_HUB_OFFLINE"] = "1"  # the service, its worker and the Ray cluster inherit it
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEMO_WORKSPACE = ROOT / "app" / "demo_workspace" / "workspace.yaml"
README = ROOT / "README.md"
MARK_START = "<!-- scale-results:start -->"
MARK_END = "<!-- scale-results:end -->"
SPEEDUP_GOAL = 1.7  # 2 actors over 1 actor
OVERHEAD_GOAL = 0.05  # (1-actor trial - embedded 1-thread trial) / embedded 1-thread trial
TERMINAL = {"succeeded", "failed", "cancelled"}
POLL_S = 0.5  # the client's polling of GET /jobs/{id} (the timing is the server's own)
RAY_CPUS = 2
BUSY_LOAD = 0.5  # a 1-minute load average above this at the start: the report warns
OBJECT_STORE_BYTES = 200 * 1024 * 1024


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    executor: str  # embedded | ray
    threads: int  # worker_threads: torch threads of the worker process, or of each actor
    workers: int  # worker processes (embedded: 1) or Ray actors


CONFIGS = (
    Config("embedded-1t", "embedded, 1 thread", "embedded", 1, 1),
    Config("embedded-2t", "embedded, 2 threads", "embedded", 2, 1),
    Config("ray-1a", "Ray, 1 actor x 1 thread", "ray", 1, 1),
    Config("ray-2a", "Ray, 2 actors x 1 thread", "ray", 1, 2),
)
BY_KEY = {config.key: config for config in CONFIGS}


@dataclass
class Round:
    job_id: str
    server_wall_s: float  # finished_at - started_at, from GET /jobs/{id}
    client_wall_s: float  # POST /sweeps to seeing `succeeded` (includes queueing and polling)
    started_at: str
    finished_at: str
    num_trials: int
    objectives: dict[int, float]  # grid index -> objective
    workers: dict[str, int]  # who ran how many trials ("embedded" for the embedded worker)


@dataclass
class Result:
    config: Config
    ready_s: float  # server start to the model resident on every worker
    warmup_s: float  # the warm-up sweep, server-side
    warmup_points: int
    rounds: list[Round] = field(default_factory=list)

    @property
    def walls(self) -> list[float]:
        return [r.server_wall_s for r in self.rounds]

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


# --- the sweep ---------------------------------------------------------------------------------


def lambdas(points: int) -> list[float]:
    """`points` values of weighted_delta's lambda, evenly over [0.15, 0.85] (sweep_bench's)."""
    if points == 1:
        return [0.3]
    return [round(0.15 + 0.7 * i / (points - 1), 4) for i in range(points)]


def sweep_body(tasks: Sequence[str], values: Sequence[float], subset: int, marker: float) -> dict[str, Any]:
    """sweep_bench's request shape: a weighted_delta grid over lambda on a stratified subset.
    `marker` (method_params.lambda, which every grid point overrides) only makes the sweep id
    new, so a round never resumes an earlier round's sweep."""
    return {
        "adapters": list(tasks),
        "method": "weighted_delta",
        "method_params": {"lambda": marker},
        "split": "test",
        "eval_subset": {"max_samples": subset, "stratified": True, "seed": 0},
        "search": {"type": "grid", "grid": {"lambda": list(values)}},
    }


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _proc_parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@dataclass
class RayCluster:
    address: str  # 127.0.0.1:<port>, what LORA_MERGE_RAY_ADDRESS takes
    temp_dir: Path
    cwd: Path

    def processes(self) -> list[int]:
        """This cluster's processes: those whose command line names its temp dir or GCS port,
        and their descendants (the raylet's workers rename themselves `ray::...`). Other Ray
        clusters on the machine have other temp dirs and ports and are left alone."""
        port = self.address.rsplit(":", 1)[1]
        marks = (str(self.temp_dir), f":{port} ", f"={port} ")
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        parents = {pid: _proc_parent(pid) for pid in pids}
        found = {pid for pid in pids
                 if pid != os.getpid() and any(mark in _proc_cmdline(pid) for mark in marks)}
        frontier = set(found)
        while frontier:
            frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
            found |= frontier
        return sorted(pid for pid in found if _proc_state(pid) not in ("", "Z"))

    def stop(self, timeout: float = 10.0) -> list[str]:
        """SIGTERM this cluster's processes, SIGKILL what is left; returns any survivors."""
        pids = self.processes()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_proc_state(pid) not in ("", "Z") for pid in pids):
            time.sleep(0.2)
        for pid in self.processes():
            _signal(pid, signal.SIGKILL)
        time.sleep(1.0)
        return [f"{pid} {_proc_cmdline(pid)[:120]}" for pid in self.processes()]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def ray_cluster(num_cpus: int) -> Iterator[RayCluster]:
    """A local Ray head for this bench only, stopped (its own processes) on the way out."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray_bench_", dir="/tmp"))
    cwd = Path(tempfile.mkdtemp(prefix="ray_bench_cwd_"))
    port = free_port()
    cluster = RayCluster(f"127.0.0.1:{port}", temp_dir, cwd)
    # Every port Ray would otherwise take at its fixed default is a free one, so this head can
    # run beside another cluster on the machine.
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        f"--object-store-memory={OBJECT_STORE_BYTES}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
    ]
    # Token authentication off on both sides (the server's env says so too): a token left in
    # ~/.ray/auth_token would otherwise turn it on for this head.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    log(f"starting a Ray head on {cluster.address} (temp dir {temp_dir}) ...")
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=180, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`ray start` failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        yield cluster
    finally:
        stopping = time.perf_counter()
        survivors = cluster.stop()
        if survivors:
            log(f"WARNING: Ray processes of this bench left behind: {survivors}")
        else:
            log(f"Ray head stopped in {time.perf_counter() - stopping:.1f} s (its own processes only)")
            shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(cwd, ignore_errors=True)


class Server:
    """The real service in a subprocess, configured through LORA_MERGE_* variables."""

    def __init__(self, config: Config, workspace: Path, artifacts: Path, ray_address: str | None,
                 log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_MERGE_")}
        env.update({
            "LORA_MERGE_WORKSPACE": str(workspace),
            "LORA_MERGE_ARTIFACTS_DIR": str(artifacts),
            "LORA_MERGE_MAX_QUEUED_JOBS": "1000",
            "LORA_MERGE_EXECUTOR": config.executor,
            "LORA_MERGE_WORKER_THREADS": str(config.threads),
            "HF_HUB_OFFLINE": "1",
        })
        if config.executor == "ray":
            assert ray_address is not None
            env["LORA_MERGE_RAY_ADDRESS"] = ray_address
            env["LORA_MERGE_RAY_WORKERS"] = str(config.workers)
            env["RAY_AUTH_MODE"] = "disabled"  # as the bench's head runs
        with log_path.open("ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    def wait_ready(self, workers: int, timeout: float) -> None:
        """Until /readyz is 200 and, with Ray, every actor holds its model (/readyz is 200
        as soon as one does)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}")
            try:
                response = self.client.get("/readyz")
                health = response.json()
                if health.get("error"):
                    raise RuntimeError(f"the server could not load the model: {health['error']}")
                actors = health.get("actors")
                resident = workers if actors is None else sum(bool(a.get("resident")) for a in actors)
                if response.status_code == 200 and resident >= workers:
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the service was not ready in {timeout:g} s")

    def run_sweep(self, body: dict[str, Any], timeout: float) -> Round:
        started = time.perf_counter()
        response = self.client.post("/sweeps", json=body)
        if response.status_code >= 400:
            raise RuntimeError(f"POST /sweeps: {response.status_code} {response.text[:1000]}")
        job_id = response.json()["id"]
        deadline = time.monotonic() + timeout
        while True:
            job = self.client.get(f"/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sweep {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(POLL_S)
        client_wall = time.perf_counter() - started
        if job["status"] != "succeeded":
            raise RuntimeError(f"sweep {job_id} {job['status']}: {job.get('error')}")
        result = job["result"] or {}
        if result.get("resumed_trials"):
            raise RuntimeError(f"sweep {job_id} resumed {result['resumed_trials']} earlier trials; "
                               "a timed sweep must run every trial")
        stamps = job["timestamps"]
        begin = datetime.fromisoformat(stamps["started_at"])
        end = datetime.fromisoformat(stamps["finished_at"])
        page = self.client.get(f"/sweeps/{job_id}/trials").json()
        objectives = {t["index"]: t["objective"] for t in page["trials"]}
        workers: dict[str, int] = {}
        for trial in page["trials"]:
            name = trial.get("worker") or "embedded"
            workers[name] = workers.get(name, 0) + 1
        return Round(job_id, (end - begin).total_seconds(), client_wall, stamps["started_at"],
                     stamps["finished_at"], int(result.get("num_trials", len(objectives))), objectives,
                     dict(sorted(workers.items())))

    def stop(self) -> None:
        self.client.close()
        started = time.perf_counter()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                log("the server did not stop in 90 s after SIGTERM; killing it")
                self.process.kill()
                self.process.wait(timeout=10)
        log(f"server stopped in {time.perf_counter() - started:.1f} s")


# --- one configuration -------------------------------------------------------------------------


def run_config(config: Config, args: argparse.Namespace, root: Path, ray_address: str | None) -> Result:
    workdir = root / config.key
    workdir.mkdir()
    artifacts = workdir / "artifacts"  # fresh: its own caches and database
    values = lambdas(args.points)
    log(f"[{config.key}] starting the service ({config.label}) ...")
    started = time.perf_counter()
    server = Server(config, args.workspace, artifacts, ray_address, workdir / "server.log")
    try:
        server.wait_ready(config.workers, args.ready_timeout)
        ready_s = time.perf_counter() - started
        # Warm-up: one point per worker, so every worker loads adapters and data and the
        # base / reference metrics of this subset are cached before any timed sweep.
        warm_points = [round(0.5 + 0.01 * i, 4) for i in range(config.workers)]
        warm = server.run_sweep(sweep_body(args.tasks, warm_points, args.subset, marker=0.999),
                                args.sweep_timeout)
        log(f"[{config.key}] ready in {ready_s:.1f} s; warm-up sweep ({len(warm_points)} point(s)) "
            f"{warm.server_wall_s:.2f} s")
        result = Result(config, ready_s, warm.server_wall_s, len(warm_points))
        for number in range(1, args.rounds + 1):
            body = sweep_body(args.tasks, values, args.subset, marker=round(0.5 + number / 1000, 6))
            measured = server.run_sweep(body, args.sweep_timeout)
            if measured.num_trials != len(values):
                raise RuntimeError(f"sweep {measured.job_id} ran {measured.num_trials} trials, not {len(values)}")
            result.rounds.append(measured)
            log(f"[{config.key}] round {number}/{args.rounds}: {measured.server_wall_s:.2f} s server-side "
                f"({measured.server_wall_s / len(values):.3f} s/trial; client {measured.client_wall_s:.2f} s); "
                f"trials by worker {measured.workers}")
        return result
    except BaseException:
        tail = server.log_tail()
        if tail:
            log(f"[{config.key}] --- server log (tail) ---\n{tail}")
        raise
    finally:
        server.stop()


# --- the report --------------------------------------------------------------------------------


def per_hour(result: Result, points: int) -> float:
    return 3600.0 * points / result.median


def objective_spread(results: Sequence[Result]) -> float | None:
    """The largest difference of one grid index's objective between any two sweeps measured."""
    by_index: dict[int, list[float]] = {}
    for result in results:
        for measured in result.rounds:
            for index, value in measured.objectives.items():
                by_index.setdefault(index, []).append(value)
    spreads = [max(v) - min(v) for v in by_index.values() if len(v) > 1]
    return max(spreads) if spreads else None


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def report(results: dict[str, Result], args: argparse.Namespace, load: tuple[float, float],
           minutes: float) -> list[str]:
    points = args.points
    versions = package_versions("torch", "ray", "fastapi", "uvicorn")
    command = " ".join(["bench/scale_bench.py", *map(shlex.quote, sys.argv[1:])])
    lines = [
        (f"Generated {utc_stamp()} UTC by `{command}`; CPU: {cpu_name()}, {os.cpu_count()} cores "
         f"(load average {load[0]:.2f} before, {load[1]:.2f} after; shared machine); "
         f"{', '.join(f'{k} {v}' for k, v in versions.items())}, Python {platform.python_version()}; "
         f"total {minutes:.1f} min."),
        "",
        (f"The same sweep through the real service (uvicorn, httpx): workspace "
         f"`{display_path(args.workspace)}`, `weighted_delta` of {', '.join(args.tasks)} (also the "
         f"eval tasks), a grid of {points} `lambda` values, split `test`, stratified eval subset of "
         f"{args.subset} per task; {args.rounds} timed round(s) per configuration. Sweep wall = the "
         f"server's `finished_at - started_at` of the job; per trial = sweep wall / {points}; the "
         "median over rounds, min-max beside it."),
        "",
        ("| configuration | sweep wall, median (s) | min-max (s) | per trial (s) | trials/hour "
         "| vs embedded, 1 thread | trials by worker (last round) |"),
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    reference = results.get("embedded-1t")
    for result in results.values():
        relative = f"{reference.median / result.median:.2f}x" if reference else "-"
        workers = ", ".join(f"{k} {v}" for k, v in result.rounds[-1].workers.items())
        lines.append(
            f"| {result.config.label} | {result.median:.2f} | {min(result.walls):.2f}-{max(result.walls):.2f} "
            f"| {result.median / points:.3f} | {per_hour(result, points):,.0f} | {relative} | {workers} |")
    lines.append("")
    one, two, emb1, emb2 = (results.get(k) for k in ("ray-1a", "ray-2a", "embedded-1t", "embedded-2t"))
    if one and two:
        speedup = one.median / two.median
        lines.append(f"- Goal: 2 actors >= {SPEEDUP_GOAL:g}x 1 actor: {speedup:.2f}x (rounds' range "
                     f"{min(one.walls) / max(two.walls):.2f}x-{max(one.walls) / min(two.walls):.2f}x) -> "
                     f"{verdict(speedup >= SPEEDUP_GOAL)}")
    if two and emb2:
        lines.append(f"- 2 actors x 1 thread vs the embedded executor with 2 threads (what a user "
                     f"compares): {emb2.median / two.median:.2f}x faster "
                     f"({per_hour(two, points):,.0f} vs {per_hour(emb2, points):,.0f} trials/hour)")
    if one and emb1:
        overhead = (one.median - emb1.median) / emb1.median
        lines.append(f"- Goal: control-plane overhead per trial < {OVERHEAD_GOAL:.0%}: (1-actor trial "
                     f"{one.median / points:.3f} s - embedded 1-thread trial {emb1.median / points:.3f} s) "
                     f"/ embedded = {overhead:+.1%} -> {verdict(overhead < OVERHEAD_GOAL)}")
    if load[0] > BUSY_LOAD:
        lines.append(f"- Warning: load average {load[0]:.2f} at the start (> {BUSY_LOAD:g}): other work "
                     "shared the cores; rerun on a quiet machine before trusting these figures.")
    spread = objective_spread(list(results.values()))
    warm = ", ".join(f"{r.config.key} {r.warmup_s:.1f} s ({r.warmup_points} pt)" for r in results.values())
    ready = ", ".join(f"{r.config.key} {r.ready_s:.1f} s" for r in results.values())
    lines += [
        "",
        "Notes: each configuration ran with a fresh artifacts directory and its own server; a "
        "warm-up sweep with one point per worker ran first and is not timed, so no timed sweep "
        "includes the first-time base and reference metrics, subset indices, adapter or data "
        f"loading (warm-up, server-side: {warm}). Service start to every model resident: {ready}. "
        "Ray: one local head for the bench (2 CPUs, no dashboard); each actor takes 1 CPU and 1 "
        "torch thread. The API process (1 torch thread) and the bench's client share the 2 cores. "
        + (f"Largest objective difference at one grid index across every timed sweep of every "
           f"configuration: {spread:.2e}." if spread is not None else ""),
    ]
    return lines


def raw(results: dict[str, Result], args: argparse.Namespace, lines: list[str]) -> dict[str, Any]:
    configs = {}
    for key, result in results.items():
        configs[key] = {
            **asdict(result.config), "ready_s": result.ready_s, "warmup_s": result.warmup_s,
            "warmup_points": result.warmup_points, "median_sweep_s": result.median,
            "per_trial_s": result.median / args.points, "trials_per_hour": per_hour(result, args.points),
            "rounds": [asdict(r) for r in result.rounds],
        }
    return {
        "generated_utc": utc_stamp("%Y-%m-%dT%H:%M:%SZ"), "argv": sys.argv[1:],
        "points": args.points, "subset": args.subset, "rounds": args.rounds, "tasks": args.tasks,
        "workspace": str(args.workspace), "cpu": cpu_name(), "cores": os.cpu_count(),
        "versions": package_versions("torch", "ray", "fastapi", "uvicorn"),
        "configs": configs, "report": lines,
    }


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--points", type=int, default=24, help="grid points of the sweep (default 24)")
    parser.add_argument("--subset", type=int, default=200, help="stratified eval samples per task (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="timed sweeps per configuration (default 3)")
    parser.add_argument("--tasks", nargs="+", default=["intent", "sentiment"], help="adapters = eval tasks")
    parser.add_argument("--workspace", type=Path, default=DEMO_WORKSPACE, help="workspace.yaml (default: the demo)")
    parser.add_argument("--configs", nargs="+", choices=list(BY_KEY), default=list(BY_KEY),
                        help="configurations to run (default: all four)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds for a server to be ready")
    parser.add_argument("--sweep-timeout", type=float, default=3600.0, help="seconds for one sweep")
    parser.add_argument("--json", type=Path, default=None, help="write the raw figures to this JSON file")
    parser.add_argument("--write", action="store_true",
                        help=f"replace the text between {MARK_START} and {MARK_END} in README.md")
    args = parser.parse_args(argv)
    if args.points < 1 or args.subset < 1 or args.rounds < 1:
        parser.error("--points, --subset and --rounds must be positive")
    args.workspace = args.workspace.resolve()
    if not args.workspace.is_file():
        parser.error(f"workspace not found: {args.workspace}")
    return args


def check_markers() -> None:
    text = README.read_text() if README.is_file() else ""
    if MARK_START not in text or MARK_END not in text or text.index(MARK_START) > text.index(MARK_END):
        raise SystemExit(f"--write: {display_path(README)} has no `{MARK_START}` ... `{MARK_END}` block; "
                         "add the two markers where the table goes, then run again")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write:
        check_markers()  # before a long run, not after it
    configs = [BY_KEY[key] for key in args.configs]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="scale_bench_") as tmp:
        root = Path(tmp)
        embedded = [c for c in configs if c.executor == "embedded"]
        on_ray = [c for c in configs if c.executor == "ray"]
        for config in embedded:
            results[config.key] = run_config(config, args, root, None)
        if on_ray:
            with ray_cluster(RAY_CPUS) as cluster:
                for config in on_ray:
                    results[config.key] = run_config(config, args, root, cluster.address)
    results = {c.key: results[c.key] for c in configs}
    lines = report(results, args, (load_before, os.getloadavg()[0]), (time.perf_counter() - started) / 60)
    print("\n".join(lines))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(raw(results, args, lines), indent=2) + "\n")
        log(f"raw figures written to {args.json}")
    if args.write:
        check_markers()
        replace_marked_block(README, MARK_START, MARK_END, lines)
        log(f"table written to {display_path(README)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
