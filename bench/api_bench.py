"""API latency benchmark: how fast the service answers while its worker is busy.

What it does, all on loopback:

1. builds the tiny workspace (`scripts/make_tiny_workspace.py`) into a temporary directory;
2. starts the real service in a subprocess (`python -m app.cli serve --port P`, uvicorn) with
   `LORA_MERGE_WORKSPACE`, `LORA_MERGE_ARTIFACTS_DIR`, `HF_HUB_OFFLINE=1` and
   `LORA_MERGE_MAX_QUEUED_JOBS=1000`, and waits for `/readyz`;
3. runs `--rounds` (default 3) measurement rounds; in each round:
   a. queues a fresh long grid sweep (`POST /sweeps`, `weighted_delta` over a 50 x 50
      per-layer `lambda` grid, 2500 trials by default) and waits until the worker is running it
      and has finished its first trial; then lets it run `--idle-seconds` (default 10) with no
      API load and counts its trials (and again after the loaded window, b.), for the worker's
      unloaded trials per second;
   b. for `--seconds` (default 20): `--pollers` (default 50) concurrent pollers of
      `GET /jobs/{sweep_id}` (each waits `--poll-interval` between its requests, 0.5 s by
      default, the interval of the project's own `--server` client and of the SSE stream; the
      pollers' phases are spread evenly over one interval), plus a steady stream of POSTs, one
      every `--post-interval` (default 0.1 s), sent on schedule whether or not the previous one
      has answered, rotating through the kinds in `POST_KINDS`: a plain `POST /merges` (`ties`
      on the two tasks), `POST /merges` with the `adamerging` optimizer on `task_vector` and on
      `weighted_delta` (no `lambda`: the optimizer sets them), and a small `POST /sweeps` (a
      3-point `lambda` grid). Request counts are bounded (each poller and the POST stream stop
      after the number of requests the window allows) and every request times out after 10 s;
   c. records every request's latency (from sending to the full response, measured in this
      client with `httpx.AsyncClient`), and checks that the sweep is still `running` at the
      end, i.e. the worker was busy for the whole window;
   d. cancels the jobs the round queued and its sweep, so every round starts from an empty
      queue (and the queued merges never run);
4. terminates the server (always, in a `finally`).

Every answer outside 2xx, and every request that fails or times out, counts as an error of its
kind; the report quotes the first error of each kind. It prints a markdown report: a header
(date, CPU count, load, versions), one table row per request kind (count, errors, p50, p95,
p99, max in milliseconds over all rounds, then each round's p99 and their median and worst),
each round's worker and server figures, and the goals with PASS / FAIL: p99 < 50 ms for GET,
< 100 ms for every POST kind, judged on the worst round (one good round can be luck) and with
no errors. Nothing in the report is hard-coded; everything comes from the run.

The client runs on the same machine as the server, so on a small machine it takes CPU from it;
run it on an otherwise idle machine (the header records the load average before and after).

Run from the repository root:

    .venv/bin/python bench/api_bench.py --seconds 20            # print the report
    .venv/bin/python bench/api_bench.py --seconds 20 --write    # and write it to
                                                  # bench/results/api_bench_cpu.md
    .venv/bin/python bench/api_bench.py --duration 3 --rounds 1 --pollers 10  # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# First: importing common puts the checkout on sys.path and Hugging Face offline.
from common import RESULTS_DIR, ROOT, package_versions, publish, utc_stamp

import httpx

RESULTS_FILE = RESULTS_DIR / "api_bench_cpu.md"
GET_GOAL_MS = 50.0
POST_GOAL_MS = 100.0
WORKER_GOAL = 0.8  # the loaded worker keeps at least this share of its unloaded trials/s
TASKS = ["topic", "mood"]
TERMINAL = {"succeeded", "failed", "cancelled"}
REQUEST_TIMEOUT_S = 10.0  # a request not answered by then counts as an error (ReadTimeout)
ERROR_BODY_CHARS = 400  # of the first error body quoted per kind
# Small enough to be cheap to validate; the jobs are cancelled before they run anyway.
ADAMERGING = {"name": "adamerging", "params": {"steps": 2, "batch_size": 4, "samples_per_task": 8}}


@dataclass(frozen=True)
class PostKind:
    """One kind of POST in the stream: its row in the table, its path and its body."""

    name: str
    path: str
    body: dict[str, Any]


POST_KINDS = (
    PostKind("POST /merges (ties)", "/merges", {"adapters": TASKS, "method": "ties"}),
    PostKind("POST /merges (adamerging, task_vector)", "/merges",
             {"adapters": TASKS, "method": "task_vector", "optimizer": ADAMERGING, "eval_tasks": TASKS}),
    # No lambda: the optimizer sets weighted_delta's lambdas.
    PostKind("POST /merges (adamerging, weighted_delta)", "/merges",
             {"adapters": TASKS, "method": "weighted_delta", "optimizer": ADAMERGING, "eval_tasks": TASKS}),
    PostKind("POST /sweeps (grid, 3 lambdas)", "/sweeps",
             {"adapters": TASKS, "method": "weighted_delta",
              "search": {"type": "grid", "grid": {"lambda": [0.25, 0.5, 0.75]}}}),
)
GET_NAME = "GET /jobs/{id}"


def sweep_body(points: int, number: int = 1) -> dict[str, Any]:
    """A grid sweep of about `points` trials (a side x side per-layer `lambda` grid, so the
    request, which every `GET /jobs/{id}` returns, stays small); every trial merges and
    evaluates both tasks on the resident model. Round `number` sets the default `lambda` (no
    module of the tiny model uses it: every one is in layer 0 or 1), so each round's sweep is a
    fresh one, not a resumption of the last round's."""
    side = math.ceil(math.sqrt(points))
    values = [round(i / side, 6) for i in range(side)]
    return {
        "adapters": TASKS,
        "method": "weighted_delta",
        "method_params": {"lambda": round(0.5 + number / 1000, 6)},
        "search": {"type": "grid", "grid": {"lambda@layer0": values, "lambda@layer1": values}},
    }


# --- measurements ----------------------------------------------------------------------------


@dataclass
class Samples:
    """Latencies (seconds) of the requests answered with a 2xx, and the failures."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""  # the first failure, with the body of the answer if there was one

    def error(self, what: str, detail: str = "") -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        if not self.first_error:
            self.first_error = f"{what}: {detail}" if detail else what

    def record(self, response: httpx.Response, elapsed: float) -> bool:
        """Count an answer: its latency if 2xx, else an error quoting its body. True if 2xx."""
        if response.is_success:
            self.latencies.append(elapsed)
            return True
        self.error(f"HTTP {response.status_code}", response.text[:ERROR_BODY_CHARS])
        return False

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @classmethod
    def pooled(cls, parts: Sequence[Samples]) -> Samples:
        total = cls()
        for part in parts:
            total.latencies += part.latencies
            for what, count in part.errors.items():
                total.errors[what] = total.errors.get(what, 0) + count
            total.first_error = total.first_error or part.first_error
        return total

    def p99_ms(self) -> float | None:
        return percentile(self.latencies, 99) * 1000 if self.latencies else None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


@dataclass
class Row:
    """One request kind over all rounds: `rounds[i]` holds what round i measured."""

    name: str
    goal_ms: float
    rounds: list[Samples]

    @property
    def all(self) -> Samples:
        return Samples.pooled(self.rounds)

    def percentile_ms(self, q: float) -> float | None:
        latencies = self.all.latencies
        return percentile(latencies, q) * 1000 if latencies else None

    @property
    def round_p99s(self) -> list[float | None]:
        return [part.p99_ms() for part in self.rounds]

    @property
    def median_p99(self) -> float | None:
        measured = [x for x in self.round_p99s if x is not None]
        return statistics.median(measured) if measured else None

    @property
    def worst_p99(self) -> float | None:
        """The worst round's p99; None if a round answered none of this kind with a 2xx."""
        p99s = self.round_p99s
        return None if not p99s or None in p99s else max(x for x in p99s if x is not None)

    @property
    def passed(self) -> bool:
        worst = self.worst_p99
        return worst is not None and worst < self.goal_ms and self.all.error_count == 0


@dataclass
class Observed:
    """What one round saw of its sweep (the worker's job) and of the machine."""

    sweep_id: str = ""
    status_before: str = ""
    status_after: str = ""
    done_before: int = 0
    done_after: int = 0
    total: int = 0
    non_running_seen: dict[str, int] = field(default_factory=dict)
    window_s: float = 0.0
    idle_trials: int = 0  # trials done in the two unloaded windows, before and after
    idle_window_s: float = 0.0  # their total length
    server_cpu_s: float | None = None
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None

    @property
    def loaded_rate(self) -> float:
        """The worker's trials per second while the API was under load."""
        return (self.done_after - self.done_before) / self.window_s if self.window_s else 0.0

    @property
    def idle_rate(self) -> float:
        """The worker's trials per second with no API load, in windows just before and just
        after the loaded one (a sweep's trials slow down as its index grows; the mean of the
        two windows cancels that drift)."""
        return self.idle_trials / self.idle_window_s if self.idle_window_s else 0.0

    @property
    def busy_whole_window(self) -> bool:
        # A job only leaves `running` for a final state, so running before and after (and never
        # anything else in between, as the pollers saw it) means running throughout.
        return (self.status_before == "running" and self.status_after == "running"
                and not self.non_running_seen)


@dataclass
class Round:
    """One round's measurements: GETs, POSTs by kind name, the worker, and the jobs it queued."""

    gets: Samples = field(default_factory=Samples)
    posts: dict[str, Samples] = field(default_factory=lambda: {kind.name: Samples() for kind in POST_KINDS})
    observed: Observed = field(default_factory=Observed)
    queued_ids: list[str] = field(default_factory=list)


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
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
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
                 interval: float, max_requests: int, measured: Round) -> None:
    await asyncio.sleep(offset)
    for _ in range(max_requests):
        if time.perf_counter() >= until:
            return
        started = time.perf_counter()
        try:
            response = await client.get(f"/jobs/{job_id}")
            elapsed = time.perf_counter() - started
        except httpx.HTTPError as exc:
            measured.gets.error(type(exc).__name__)
        else:
            if measured.gets.record(response, elapsed):
                status = response.json()["status"]
                if status != "running":
                    seen = measured.observed.non_running_seen
                    seen[status] = seen.get(status, 0) + 1
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))


async def one_post(client: httpx.AsyncClient, kind: PostKind, measured: Round) -> None:
    samples = measured.posts[kind.name]
    started = time.perf_counter()
    try:
        response = await client.post(kind.path, json=kind.body)
        elapsed = time.perf_counter() - started
    except httpx.HTTPError as exc:
        samples.error(type(exc).__name__)
        return
    if samples.record(response, elapsed):
        measured.queued_ids.append(str(response.json()["id"]))


async def post_stream(client: httpx.AsyncClient, start: float, until: float, interval: float,
                      measured: Round) -> None:
    """Open loop: one POST every `interval` on a fixed schedule, at most (window / interval),
    the kinds in turn."""
    tasks: list[asyncio.Task[None]] = []
    for index in range(int((until - start) / interval)):
        delay = start + index * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() >= until:
            break
        kind = POST_KINDS[index % len(POST_KINDS)]
        tasks.append(asyncio.create_task(one_post(client, kind, measured)))
    await asyncio.gather(*tasks)


async def measure(base_url: str, job_id: str, args: argparse.Namespace, measured: Round) -> None:
    limits = httpx.Limits(max_connections=args.pollers + 64, max_keepalive_connections=args.pollers + 64)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    # This process imported torch to build the workspace: a full collection of its heap stops
    # the client for ~0.3 s, and every request in flight then looks 0.3 s slow. Measured here
    # (the first tail seen with the worker in its own process was exactly that), so the
    # client's own objects are frozen out of the collector before it measures the server.
    gc.collect()
    gc.freeze()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        # One request per connection first, so connection set-up is not in the measurement.
        await asyncio.gather(*(client.get("/healthz") for _ in range(args.pollers)))
        start = time.perf_counter()
        until = start + args.seconds
        max_polls = int(args.seconds / args.poll_interval) + 1
        # The pollers' phases are spread evenly over one interval, as independent clients'
        # would be (not all 50 firing at the same instant every interval).
        await asyncio.gather(
            *(poller(client, job_id, index * args.poll_interval / args.pollers, until,
                     args.poll_interval, max_polls, measured) for index in range(args.pollers)),
            post_stream(client, start, until, args.post_interval, measured),
        )
        measured.observed.window_s = time.perf_counter() - start


def run_round(client: httpx.Client, process: subprocess.Popen[bytes], base_url: str,
              args: argparse.Namespace, number: int) -> Round:
    """Queue a long sweep, measure while it runs, then cancel what the round queued."""
    measured = Round()
    observed = measured.observed
    response = client.post("/sweeps", json=sweep_body(args.grid_points, number))
    if response.status_code != 202:
        raise RuntimeError(f"POST /sweeps: {response.status_code} {response.text}")
    observed.sweep_id = str(response.json()["id"])
    try:
        job = wait_first_trial(client, observed.sweep_id, timeout=args.ready_timeout)
        # The worker's rate with no API load, on the same sweep, just before the loaded window
        # (and again just after it, below).
        job = idle_window(client, observed, job, args.idle_seconds)
        observed.status_before, observed.done_before = job["status"], job["progress"]["done"]
        observed.total = job["progress"]["total"]
        print(f"round {number}/{args.rounds}: sweep {observed.sweep_id} running "
              f"({observed.done_before}/{observed.total} trials); measuring for {args.seconds:g} s ...",
              file=sys.stderr)
        observed.load_before = loadavg()
        cpu_before = process_cpu_seconds(process.pid)
        asyncio.run(measure(base_url, observed.sweep_id, args, measured))
        cpu_after = process_cpu_seconds(process.pid)
        observed.load_after = loadavg()
        if cpu_before is not None and cpu_after is not None:
            observed.server_cpu_s = cpu_after - cpu_before
        job = client.get(f"/jobs/{observed.sweep_id}").json()
        observed.status_after, observed.done_after = job["status"], job["progress"]["done"]
        idle_window(client, observed, job, args.idle_seconds)
    finally:
        # The queued jobs first, so none of them starts when the sweep stops; then the next
        # round's sweep is the next job the worker takes.
        if process.poll() is None:
            cancel_jobs(client, [*measured.queued_ids, observed.sweep_id])
    return measured


def idle_window(client: httpx.Client, observed: Observed, job: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Let the sweep run `seconds` with no API load; count its trials into `observed`."""
    started = time.perf_counter()
    time.sleep(seconds)
    after = client.get(f"/jobs/{observed.sweep_id}").json()
    observed.idle_window_s += time.perf_counter() - started
    observed.idle_trials += after["progress"]["done"] - job["progress"]["done"]
    return after


def cancel_jobs(client: httpx.Client, job_ids: Sequence[str]) -> None:
    """Cancel each job; a 409 (it had already ended) is fine, a dead server ends the loop."""
    try:
        for job_id in job_ids:
            client.post(f"/jobs/{job_id}/cancel")
    except httpx.HTTPError as exc:
        print(f"cancelling the round's jobs: {type(exc).__name__}: {exc}", file=sys.stderr)


# --- the report ------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **package_versions("torch", "fastapi", "uvicorn", "sqlalchemy", "httpx")}


def load_text(value: tuple[float, float, float] | None) -> str:
    return "n/a" if value is None else " / ".join(f"{x:.2f}" for x in value)


def round_lines(number: int, measured: Round) -> list[str]:
    observed = measured.observed
    busy = observed.busy_whole_window
    trials = observed.done_after - observed.done_before
    seen = f", pollers saw {observed.non_running_seen}" if observed.non_running_seen else ""
    rate = trials / observed.window_s if observed.window_s else 0.0
    line = (f"- round {number}: worker busy for the whole window: {'yes' if busy else 'NO'} (sweep "
            f"`{observed.status_before}` at the start, `{observed.status_after}` at the end{seen}; "
            f"trials {observed.done_before} -> {observed.done_after} of {observed.total}, "
            f"{rate:.2f} trials/s during the window; the last answer came after "
            f"{observed.window_s:.1f} s)")
    if observed.server_cpu_s is not None and observed.window_s:
        line += (f"; server process CPU {observed.server_cpu_s:.1f} s "
                 f"({observed.server_cpu_s / observed.window_s:.2f} cores on average)")
    return [line]


def report(args: argparse.Namespace, rows: list[Row], rounds: list[Round]) -> str:
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    kinds = "; ".join(f"`{kind.name}` `{json.dumps(kind.body)}`" for kind in POST_KINDS)
    lines = [
        "# API latency while the worker is busy (CPU)",
        "",
        f"- date (UTC): {utc_stamp()}",
        f"- machine: {platform.platform()}, {cpus} CPUs ({usable} usable by this process)",
        (f"- load average (1/5/15 min) before the first round: "
         f"{load_text(rounds[0].observed.load_before)}, after the last: "
         f"{load_text(rounds[-1].observed.load_after)}"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- command: `.venv/bin/python bench/api_bench.py {shlex.join(sys.argv[1:])}`".rstrip(),
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines += [
        "",
        (f"{len(rounds)} rounds of {args.seconds:g} s each on loopback: {args.pollers} concurrent "
         f"pollers of `GET /jobs/{{sweep_id}}` (each waits {args.poll_interval:g} s between its "
         "requests, phases spread over the interval) and one POST every "
         f"{args.post_interval:g} s, the kinds in turn ({kinds}), while the worker runs a fresh "
         f"{rounds[0].observed.total}-trial `weighted_delta` grid sweep (per-layer `lambda`) on "
         f"the tiny workspace; the worker's trials/s with no API load is measured for "
         f"{args.idle_seconds:g} s just before and {args.idle_seconds:g} s just after each loaded "
         "window. After each round its queued jobs and its "
         "sweep are cancelled. "
         "Latency is measured in the client (httpx.AsyncClient, same machine), from sending the "
         "request to the full response; an answer outside 2xx counts as an error, not a latency. "
         "Count, errors, p50 to max: all rounds together; the result is on the worst round's p99 "
         "and no errors."),
        "",
        "| request | count | errors | p50 ms | p95 ms | p99 ms | max ms | p99 per round ms "
        "| p99 median / worst ms | goal (p99) | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        total = row.all
        lines.append(
            f"| {row.name} | {len(total.latencies)} | {total.error_count} | "
            f"{fmt(row.percentile_ms(50))} | {fmt(row.percentile_ms(95))} | "
            f"{fmt(row.percentile_ms(99))} | {fmt(row.percentile_ms(100))} | "
            f"{', '.join(fmt(x) for x in row.round_p99s)} | "
            f"{fmt(row.median_p99)} / {fmt(row.worst_p99)} | < {row.goal_ms:g} | "
            f"{'PASS' if row.passed else 'FAIL'} |"
        )
    lines += [
        "",
        "| round | worker trials/s, no API load | worker trials/s, API loaded | loaded / unloaded "
        "| goal | result |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for number, measured in enumerate(rounds, start=1):
        observed = measured.observed
        ratio = observed.loaded_rate / observed.idle_rate if observed.idle_rate else 0.0
        lines.append(f"| {number} | {observed.idle_rate:.2f} | {observed.loaded_rate:.2f} | "
                     f"{ratio:.0%} | >= {WORKER_GOAL:.0%} | "
                     f"{'PASS' if ratio >= WORKER_GOAL else 'FAIL'} |")
    lines.append("")
    for number, measured in enumerate(rounds, start=1):
        lines += round_lines(number, measured)
    for row in rows:
        total = row.all
        if total.errors:
            lines.append(f"- {row.name} errors: {json.dumps(total.errors)}; the first: "
                         f"{total.first_error}")
    busy = all(measured.observed.busy_whole_window for measured in rounds)
    lines += [
        "",
        "Goals (worst round): " + "; ".join(
            f"{row.name} p99 < {row.goal_ms:g} ms: {'PASS' if row.passed else 'FAIL'}" for row in rows
        ) + f"; worker keeps >= {WORKER_GOAL:.0%} of its unloaded trials/s in every round: " + (
            "PASS" if all(m.observed.idle_rate and m.observed.loaded_rate / m.observed.idle_rate >= WORKER_GOAL
                          for m in rounds) else "FAIL"
        ) + ("" if busy else " (NOT VALID: the worker was not busy for the whole window of every round)"),
        "",
    ]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> str:
    from scripts.make_tiny_workspace import build_tiny_workspace

    rounds: list[Round] = []
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
        try:
            with httpx.Client(base_url=base_url, timeout=60) as client:
                wait_ready(client, process, timeout=args.ready_timeout)
                for number in range(1, args.rounds + 1):
                    rounds.append(run_round(client, process, base_url, args, number))
        except BaseException:
            if log_path.is_file():
                print("--- server log (tail) ---\n" + log_path.read_text()[-4000:], file=sys.stderr)
            raise
        finally:
            stop_server(process)
    for kind in POST_KINDS:  # visible at once, not only in the report's last lines
        first = Samples.pooled([measured.posts[kind.name] for measured in rounds]).first_error
        if first:
            print(f"{kind.name}: first error: {first}", file=sys.stderr)
    rows = [Row(GET_NAME, GET_GOAL_MS, [measured.gets for measured in rounds])]
    rows += [Row(kind.name, POST_GOAL_MS, [measured.posts[kind.name] for measured in rounds])
             for kind in POST_KINDS]
    return report(args, rows, rounds)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", "--duration", dest="seconds", type=float, default=20.0,
                        help="measurement window of each round (default 20)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="each round first measures the worker's trials/s with no API load "
                        "for this long (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurement rounds; PASS / FAIL is on the worst (default 3)")
    parser.add_argument("--pollers", type=int, default=50, help="concurrent GET pollers (default 50)")
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="seconds each poller waits between its requests (default 0.5)")
    parser.add_argument("--post-interval", type=float, default=0.1,
                        help="seconds between POSTs, the kinds in turn (default 0.1)")
    parser.add_argument("--grid-points", type=int, default=2500,
                        help="trials in the sweep that keeps the worker busy in each round, unloaded "
                             "windows included (default 2500; the report says whether it lasted the "
                             "whole window)")
    parser.add_argument("--ready-timeout", type=float, default=180.0,
                        help="seconds to wait for the model to load and each round's sweep to start")
    parser.add_argument("--note", default="", help="a line added to the report's header")
    parser.add_argument("--write", action="store_true", help=f"write the report to {RESULTS_FILE}")
    args = parser.parse_args(argv)
    if (args.seconds <= 0 or args.rounds < 1 or args.pollers < 1 or args.poll_interval <= 0
            or args.post_interval <= 0):
        parser.error("--seconds, --rounds, --pollers, --poll-interval and --post-interval must be positive")
    if args.grid_points < 2:
        parser.error("--grid-points must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    text = run(args)
    publish(text, RESULTS_FILE if args.write else None)
    if args.write:
        print(f"written to {RESULTS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
