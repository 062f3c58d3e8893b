"""What the bench scripts share: the checkout on `sys.path`, offline Hugging Face, the machine
and version lines of their reports, their results files, and RSS / peak-memory readers.

The scripts run as `python bench/<name>.py`, so Python puts `bench/` (not the repository root)
on `sys.path`; they `import common` before torch, transformers or the project's packages.
Importing this module is the whole preamble: it puts the repository root on `sys.path` (the
benches measure this checkout's `merging_core`, `app` and `scripts`) and defaults the Hugging
Face libraries to offline (a bench must never download; the variables are read when those
libraries are imported, hence before them). A value already in the environment wins.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
MB = 1024 * 1024

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- the machine and the versions ------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_line(load_before: float) -> str:
    """`CPU: <name>, <n> torch threads, <n> cores (load average <x> at start; shared machine)`."""
    import torch

    return (f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores "
            f"(load average {load_before:.2f} at start; shared machine)")


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions by distribution name, read from the metadata (nothing is imported)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def versions_line(*names: str) -> str:
    """`torch 2.x, peft 0.x, Python 3.x`: the packages in the order given, then Python."""
    parts = [f"{name} {version}" for name, version in package_versions(*names).items()]
    return ", ".join([*parts, f"Python {platform.python_version()}"])


def utc_stamp(fmt: str = "%Y-%m-%d %H:%M") -> str:
    return f"{datetime.now(timezone.utc):{fmt}}"


def setup_logging(quiet_libraries: bool) -> None:
    """Progress lines with a time stamp on stderr; `quiet_libraries` also silences Python
    warnings (PEFT's notes on mismatched sizes, deprecations) and transformers' logs and
    progress bars, which would drown those lines."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not quiet_libraries:
        return
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --- results files ---------------------------------------------------------------------------


def display_path(path: Path) -> str:
    """`path` relative to the repository root where it lies inside it (as the reports cite it)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def publish(text: str, path: Path | None) -> None:
    """Print the report; with a path (`--write`), also write it there, ending in one newline."""
    print(text)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")


def replace_marked_block(path: Path, start: str, end: str, lines: list[str]) -> None:
    """Rewrite what lies between the markers `start` and `end` in a text file (a README's
    generated table), keeping the markers and everything around them."""
    text = path.read_text()
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    path.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + tail)


# --- memory ----------------------------------------------------------------------------------


def status_kb(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """This process's resident set size now."""
    return status_kb("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


class PeakRssSampler:
    """This process's peak RSS while the `with` block runs, sampled by a thread every
    `interval_s` (ru_maxrss never goes down, so it would include what came before)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.peak_bytes = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())


@dataclass
class PeakMemory:
    baseline_bytes: int = 0
    peak_bytes: int = 0
    source: str = ""

    @property
    def added_bytes(self) -> int:
        return max(self.peak_bytes - self.baseline_bytes, 0)


@contextmanager
def measure_peak() -> Iterator[PeakMemory]:
    """Peak RSS above the RSS at entry: the kernel's VmHWM after a reset (exact), else a 2 ms
    sampler (which can miss a short spike)."""
    gc.collect()
    result = PeakMemory(baseline_bytes=rss_bytes())
    if reset_peak_rss():
        result.source = "VmHWM"
        yield result
        result.peak_bytes = status_kb("VmHWM") * 1024
        return
    result.source = "sampled every 2 ms"
    with PeakRssSampler(0.002) as sampler:
        yield result
    result.peak_bytes = sampler.peak_bytes
