"""API latency benchmark: how fast the service answers while its worker is busy.

What it does, all on loopback:

1. builds the tiny workspace (`scripts/make_tiny_workspace.py`) into a temporary directory;
2. starts the real service in a subprocess (`python -m app.cli serve --port P`, uvicorn) with
   `LORA_MERGE_WORKSPACE`, `LORA_MERGE_ARTIFACTS_DIR`, `HF_HUB_OFFLINE=1` and
   `LORA_MERGE_MAX_QUEUED_JOBS=1000`, and waits for `/readyz`;
3. queues a long grid sweep (`POST /sweeps`, `weighted_delta` over a 30 x 30 per-layer `lambda`
   grid, 900 trials by default) and waits until the worker is running it and has finished its
   first trial;
4. for `--seconds` (default 20): `--pollers` (default 50) concurrent pollers of
   `GET /jobs/{sweep_id}` (each waits `--poll-interval` between its requests, 0.5 s by default,
   the interval of the project's own `--server` client and of the SSE stream; the pollers'
   phases are spread evenly over one interval), plus a steady stream of `POST /merges` (`ties`
   on the two tasks) every `--post-interval` (default 0.1 s), sent on schedule whether or not
   the previous one has answered. Request counts are bounded (each poller and the POST stream
   stop after the number of requests the window allows) and every request times out after
   10 s (counted as an error);
5. records every request's latency (from sending to the full response, measured in this
   client with `httpx.AsyncClient`), and checks that the sweep is still `running` at the end,
   i.e. the worker was busy for the whole window;
6. cancels the sweep and terminates the server (always, in a `finally`).

It prints a markdown report: a header (date, CPU count, load, Python / torch / platform), the
table (count, errors, p50, p95, p99, max in milliseconds for GET and POST), whether the worker
was busy the whole time, and the goals with PASS / FAIL: p99 < 50 ms for GET, < 100 ms for POST.
Nothing in the report is hard-coded; everything comes from the run.

The client runs on the same machine as the server, so on a small machine it takes CPU from it;
run it on an otherwise idle machine (the header records the load average before and after).

Run from the repository root:

    .venv/bin/python bench/api_bench.py --seconds 20            # print the report
    .venv/bin/python bench/api_bench.py --seconds 20 --write    # and write it to
                                                  # bench/results/api_bench_cpu.md
    .venv/bin/python bench/api_bench.py --seconds 5 --pollers 10  # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402

RESULTS_FILE = REPO_ROOT / "bench" / "results" / "api_bench_cpu.md"
GOALS_MS = {"GET": 50.0, "POST": 100.0}
TASKS = ["topic", "mood"]
MERGE_BODY: dict[str, Any] = {"adapters": TASKS, "method": "ties"}
TERMINAL = {"succeeded", "failed", "cancelled"}
REQUEST_TIMEOUT_S = 10.0  # a request not answered by then counts as an error (ReadTimeout)


def sweep_body(points: int) -> dict[str, Any]:
    """A grid sweep of about `points` trials (a side x side per-layer `lambda` grid, so the
    request, which every `GET /jobs/{id}` returns, stays small); every trial merges and
    evaluates both tasks on the resident model."""
    side = math.ceil(math.sqrt(points))
    values = [round(i / side, 6) for i in range(side)]
    return {
        "adapters": TASKS,
        "method": "weighted_delta",
        "method_params": {"lambda": 0.5},
        "search": {"type": "grid", "grid": {"lambda@layer0": values, "lambda@layer1": values}},
    }


# --- measurements ----------------------------------------------------------------------------


@dataclass
class Samples:
    """Latencies (seconds) of the requests that answered as expected, and the failures."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


@dataclass
class Row:
    name: str
    count: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    goal_ms: float

    @classmethod
    def of(cls, name: str, samples: Samples, goal_ms: float) -> Row:
        lat = [x * 1000 for x in samples.latencies]
        if not lat:
            return cls(name, 0, samples.error_count, None, None, None, None, goal_ms)
        return cls(name, len(lat), samples.error_count, percentile(lat, 50), percentile(lat, 95),
                   percentile(lat, 99), max(lat), goal_ms)

    @property
    def passed(self) -> bool:
        return self.p99_ms is not None and self.p99_ms < self.goal_ms and self.errors == 0


@dataclass
class Observed:
    """What the run saw of the sweep (the worker's job) and the machine."""

    sweep_id: str = ""
    grid_points: int = 0
    status_before: str = ""
    status_after: str = ""
    done_before: int = 0
    done_after: int = 0
    total: int = 0
    non_running_seen: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0
    server_cpu_s: float | None = None
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None

    @property
    def busy_whole_window(self) -> bool:
        # A job only leaves `running` for a final state, so running before and after (and never
        # anything else in between, as the pollers saw it) means running throughout.
        return (self.status_before == "running" and self.status_after == "running"
                and not self.non_running_seen)


# --- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(workspace: Path, artifacts: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LORA_MERGE_WORKSPACE": str(workspace),
        "LORA_MERGE_ARTIFACTS_DIR": str(artifacts),
        "LORA_MERGE_MAX_QUEUED_JOBS": "1000",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("LORA_MERGE_TOKEN", None)  # the benchmark talks to the service without auth
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def wait_ready(client: httpx.Client, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            response = client.get("/readyz")
            if response.status_code == 200:
                return
            if response.json().get("error"):
                raise RuntimeError(f"the server could not load the model: {response.json()['error']}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the service was not ready in time")


def wait_first_trial(client: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    """Wait until the sweep is running and has finished a trial (the worker is warmed up)."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            raise RuntimeError(f"the sweep ended before the measurement: {job['status']} {job.get('error')}")
        if job["status"] == "running" and job["progress"]["done"] >= 1:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"the sweep did not start in time (status {job.get('status')})")


# --- the load --------------------------------------------------------------------------------


async def poller(client: httpx.AsyncClient, job_id: str, offset: float, until: float,
                 interval: float, max_requests: int, samples: Samples, observed: Observed) -> None:
    await asyncio.sleep(offset)
    for _ in range(max_requests):
        if time.perf_counter() >= until:
            return
        started = time.perf_counter()
        try:
            response = await client.get(f"/jobs/{job_id}")
            elapsed = time.perf_counter() - started
        except httpx.HTTPError as exc:
            samples.error(type(exc).__name__)
        else:
            if response.status_code == 200:
                samples.latencies.append(elapsed)
                status = response.json()["status"]
                if status != "running":
                    observed.non_running_seen[status] = observed.non_running_seen.get(status, 0) + 1
            else:
                samples.error(f"HTTP {response.status_code}")
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))


async def one_post(client: httpx.AsyncClient, samples: Samples) -> None:
    started = time.perf_counter()
    try:
        response = await client.post("/merges", json=MERGE_BODY)
        elapsed = time.perf_counter() - started
    except httpx.HTTPError as exc:
        samples.error(type(exc).__name__)
        return
    if response.status_code == 202:
        samples.latencies.append(elapsed)
    else:
        samples.error(f"HTTP {response.status_code}")


async def post_stream(client: httpx.AsyncClient, start: float, until: float, interval: float,
                      samples: Samples) -> None:
    """Open loop: one POST every `interval` on a fixed schedule, at most (window / interval)."""
    tasks: list[asyncio.Task[None]] = []
    for index in range(int((until - start) / interval)):
        delay = start + index * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() >= until:
            break
        tasks.append(asyncio.create_task(one_post(client, samples)))
    await asyncio.gather(*tasks)


async def measure(base_url: str, job_id: str, seconds: float, pollers: int, poll_interval: float,
                  post_interval: float, observed: Observed) -> tuple[Samples, Samples]:
    gets, posts = Samples(), Samples()
    limits = httpx.Limits(max_connections=pollers + 64, max_keepalive_connections=pollers + 64)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        # One request per connection first, so connection set-up is not in the measurement.
        await asyncio.gather(*(client.get("/healthz") for _ in range(pollers)))
        start = time.perf_counter()
        until = start + seconds
        max_polls = int(seconds / poll_interval) + 1
        # The pollers' phases are spread evenly over one interval, as independent clients'
        # would be (not all 50 firing at the same instant every interval).
        await asyncio.gather(
            *(poller(client, job_id, index * poll_interval / pollers, until, poll_interval,
                     max_polls, gets, observed) for index in range(pollers)),
            post_stream(client, start, until, post_interval, posts),
        )
        observed.window_s = time.perf_counter() - start
    return gets, posts


# --- the report ------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for package in ("torch", "fastapi", "uvicorn", "sqlalchemy", "httpx"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def report(args: argparse.Namespace, rows: list[Row], observed: Observed, gets: Samples,
           posts: Samples) -> str:
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    found = versions()

    def load(value: tuple[float, float, float] | None) -> str:
        return "n/a" if value is None else " / ".join(f"{x:.2f}" for x in value)

    lines = [
        "# API latency while the worker is busy (CPU)",
        "",
        f"- date (UTC): {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {platform.platform()}, {cpus} CPUs ({usable} usable by this process)",
        (f"- load average (1/5/15 min) before: {load(observed.load_before)}, after: "
        f"{load(observed.load_after)}"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in found.items()),
        f"- command: `.venv/bin/python bench/api_bench.py {shlex.join(sys.argv[1:])}`".rstrip(),
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += [
        "",
        (f"Load for {args.seconds:g} s (the last answer came after {observed.window_s:.1f} s) on "
        f"loopback: {args.pollers} concurrent pollers of "
        f"`GET /jobs/{{sweep_id}}` (each waits {args.poll_interval:g} s between its requests, "
        "phases spread over the interval) and "
        f"one `POST /merges` (`ties`, 2 adapters) every {args.post_interval:g} s, while the "
        f"worker runs a {observed.total}-trial `weighted_delta` grid sweep (per-layer `lambda`) on "
        "the tiny workspace. Latency is measured in the client (httpx.AsyncClient, same machine), from "
        "sending the request to the full response."),
        "",
        "| request | count | errors | p50 ms | p95 ms | p99 ms | max ms | goal (p99) | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.count} | {row.errors} | {fmt(row.p50_ms)} | {fmt(row.p95_ms)} | "
            f"{fmt(row.p99_ms)} | {fmt(row.max_ms)} | < {row.goal_ms:g} | "
            f"{'PASS' if row.passed else 'FAIL'} |"
        )
    busy = observed.busy_whole_window
    trials = observed.done_after - observed.done_before
    seen = f", pollers saw {observed.non_running_seen}" if observed.non_running_seen else ""
    rate = trials / observed.window_s if observed.window_s else 0.0
    lines += [
        "",
        (f"- worker busy for the whole window: {'yes' if busy else 'NO'} (sweep "
        f"`{observed.status_before}` at the start, `{observed.status_after}` at the end{seen}; "
        f"trials {observed.done_before} -> {observed.done_after} of {observed.total}, "
        f"{rate:.2f} trials/s during the window)"),
    ]
    if observed.server_cpu_s is not None and observed.window_s:
        lines.append(f"- server process CPU during the window: {observed.server_cpu_s:.1f} s "
                     f"({observed.server_cpu_s / observed.window_s:.2f} cores on average)")
    for name, samples in (("GET", gets), ("POST", posts)):
        if samples.errors:
            lines.append(f"- {name} errors: {json.dumps(samples.errors)}")
    lines += [
        "",
        "Goals: " + "; ".join(
            f"{row.name} p99 < {row.goal_ms:g} ms: {'PASS' if row.passed else 'FAIL'}" for row in rows
        ) + ("" if busy else " (NOT VALID: the worker was not busy for the whole window)"),
        "",
    ]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    from scripts.make_tiny_workspace import build_tiny_workspace

    observed = Observed(grid_points=args.grid_points)
    with tempfile.TemporaryDirectory(prefix="api-bench-") as tmp:
        root = Path(tmp)
        (root / "ws").mkdir()
        print(f"building the tiny workspace in {root / 'ws'} ...", file=sys.stderr)
        workspace = build_tiny_workspace(root / "ws")
        port = free_port()
        log_path = root / "server.log"
        base_url = f"http://127.0.0.1:{port}"
        print(f"starting the service on {base_url} ...", file=sys.stderr)
        process = start_server(workspace, root / "artifacts", port, log_path)
        sweep_id: str | None = None
        try:
            with httpx.Client(base_url=base_url, timeout=60) as client:
                wait_ready(client, process, timeout=args.ready_timeout)
                response = client.post("/sweeps", json=sweep_body(args.grid_points))
                if response.status_code != 202:
                    raise RuntimeError(f"POST /sweeps: {response.status_code} {response.text}")
                sweep_id = str(response.json()["id"])
                observed.sweep_id = sweep_id
                job = wait_first_trial(client, sweep_id, timeout=args.ready_timeout)
                observed.status_before, observed.done_before = job["status"], job["progress"]["done"]
                observed.total = job["progress"]["total"]
                print(f"sweep {sweep_id} running ({observed.done_before}/{observed.total} trials); "
                      f"measuring for {args.seconds:g} s ...", file=sys.stderr)
                observed.load_before = loadavg()
                cpu_before = process_cpu_seconds(process.pid)
                gets, posts = asyncio.run(measure(
                    base_url, sweep_id, args.seconds, args.pollers, args.poll_interval,
                    args.post_interval, observed,
                ))
                cpu_after = process_cpu_seconds(process.pid)
                observed.load_after = loadavg()
                if cpu_before is not None and cpu_after is not None:
                    observed.server_cpu_s = cpu_after - cpu_before
                job = client.get(f"/jobs/{sweep_id}").json()
                observed.status_after, observed.done_after = job["status"], job["progress"]["done"]
        except BaseException:
            if log_path.is_file():
                print("--- server log (tail) ---\n" + log_path.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            try:
                if sweep_id is not None and process.poll() is None:
                    with httpx.Client(base_url=base_url, timeout=10) as client:
                        client.post(f"/jobs/{sweep_id}/cancel")
            except httpx.HTTPError:
                pass
            finally:
                stop_server(process)
    rows = [Row.of("GET /jobs/{id}", gets, GOALS_MS["GET"]),
            Row.of("POST /merges", posts, GOALS_MS["POST"])]
    return report(args, rows, observed, gets, posts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window (default 20)")
    parser.add_argument("--pollers", type=int, default=50, help="concurrent GET pollers (default 50)")
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="seconds each poller waits between its requests (default 0.5)")
    parser.add_argument("--post-interval", type=float, default=0.1,
                        help="seconds between POST /merges (default 0.1)")
    parser.add_argument("--grid-points", type=int, default=900,
                        help="trials in the sweep that keeps the worker busy (default 900; the "
                             "report says whether it lasted the whole window)")
    parser.add_argument("--ready-timeout", type=float, default=180.0,
                        help="seconds to wait for the model to load and the sweep to start")
    parser.add_argument("--note", default="", help="a line added to the report's header")
    parser.add_argument("--write", action="store_true", help=f"write the report to {RESULTS_FILE}")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.pollers < 1 or args.poll_interval <= 0 or args.post_interval <= 0:
        parser.error("--seconds, --pollers, --poll-interval and --post-interval must be positive")
    if args.grid_points < 2:
        parser.error("--grid-points must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    text = run(args)
    print(text)
    if args.write:
        RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_FILE.write_text(text)
        print(f"written to {RESULTS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
