"""Helpers shared by the benchmark scripts (not a benchmark itself).

Memory: ``rss_kib()`` is the current resident set (``/proc/self/status`` VmRSS) and
``peak_rss_kib()`` the process's high-water mark (VmHWM). Scripts that compare several
configurations run each in a fresh subprocess (``run_child``) so the high-water mark
belongs to one configuration only. Not ``ru_maxrss``: Linux carries the parent's
high-water mark into a child started by (v)fork + exec, which is how ``subprocess``
starts one, so a child's ``ru_maxrss`` is never below its parent's peak.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries the one JSON object."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int:
    """Current resident set size in KiB."""
    return _status_kib("VmRSS") or 0


def peak_rss_kib() -> int:
    """Peak resident set size of this process image so far, KiB (VmHWM; ``ru_maxrss``
    where there is no /proc, which may include the parent's peak, see above)."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


def machine(threads: int = 0) -> dict[str, Any]:
    """Where and when the numbers were taken (the load average says how noisy they are).

    ``threads``: the ``--threads`` the measurements ran with (0: torch's default).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model or platform.processor(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def ensure_synthetic(
    data: Path, n_weak: int, n_pos: int, n_strong: int, seed: int = 0
) -> tuple[Path, Path, float | None]:
    """Manifests of the synthetic data set in ``data``, writing it there when absent.

    Returns ``(weak_csv, strong_csv, seconds to generate or None if reused)``.
    """
    weak, strong = data / "weak" / "manifest.csv", data / "strong" / "manifest.csv"
    if weak.exists() and strong.exists():
        log(f"reusing the data set in {data}")
        return weak, strong, None
    from lymphdx.data.synthetic import SynthSpec, write_synthetic

    log(f"writing the synthetic data set ({n_weak} weak, {n_strong} strong) to {data}")
    t0 = time.perf_counter()
    write_synthetic(data, SynthSpec(n_weak=n_weak, n_pos=n_pos, n_strong=n_strong, seed=seed))
    return weak, strong, round(time.perf_counter() - t0, 1)


def run_child(script: Path, args: list[str]) -> dict[str, Any]:
    """Run ``script --child ARGS`` in a fresh interpreter; its stdout's JSON object."""
    cmd = [sys.executable, str(script), "--child", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=2))


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
