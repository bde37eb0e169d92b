"""Timing, memory and device facts for bench/run.py (no oscqat logic here).

CPU: wall clock (time.perf_counter) around each call, after warm-up; the median of the samples.
CUDA: one pair of CUDA events around each call, with a 256 MB L2 flush before it (so repeated calls do not
measure the cache); the median of the samples. Both return the per-call samples so callers can report spread.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

# Datasheet peak memory bandwidth (GB/s) by device-name substring, first match wins (most specific first).
PEAK_BW_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),            # H100 SXM5 80GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-SXM4-40GB", 1555.0),
    ("A100-PCIE-40GB", 1555.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("T4", 320.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)


def peak_bw_gbps(device_name: str):
    for key, bw in PEAK_BW_GBPS:
        if key in device_name:
            return bw
    return None


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs)"


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        out["triton"] = f"unavailable ({type(e).__name__})"
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        out["git_commit"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def uptime() -> str | None:
    """`uptime`'s line (load averages over 1, 5, 15 minutes: how shared the machine was)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """time(fn) -> list of per-call milliseconds. `budget_s`: stop sampling after this much time once `min_reps`
    samples exist; never more than `max_reps`."""

    def __init__(self, device: str, warmup: int = 2, min_reps: int = 5, max_reps: int = 200, budget_s: float = 1.0):
        self.device, self.warmup, self.min_reps, self.max_reps, self.budget_s = device, warmup, min_reps, max_reps, budget_s
        self._flush = None

    def time(self, fn, mem_probe=None) -> list[float]:
        """Warm up, then sample. `mem_probe(fn)` (e.g. peak_memory_mb) wraps the last warm-up call."""
        for i in range(self.warmup):
            if mem_probe is not None and i == self.warmup - 1:
                self.mem = mem_probe(fn)
            else:
                fn()
        sync(self.device)
        return self._time_cuda(fn) if self.device == "cuda" else self._time_cpu(fn)

    def time_interleaved(self, fns: dict, mem_probe=None, min_reps: int | None = None,
                         before=None) -> tuple[dict, dict]:
        """Warm up each fn (memory probe on its last warm-up), then sample them round-robin, so that load drifts on
        a shared machine hit every contender alike. `before()`, if given, runs (untimed) before every sample.
        Returns ({name: samples}, {name: memory result})."""
        mem = {}
        for name, fn in fns.items():
            for i in range(self.warmup):
                if mem_probe is not None and i == self.warmup - 1:
                    mem[name] = mem_probe(fn)
                else:
                    fn()
        sync(self.device)
        one = Timer(self.device, warmup=0, min_reps=1, max_reps=1)
        samples = {name: [] for name in fns}
        reps = max(min_reps or self.min_reps, 1)
        t_start = time.perf_counter()
        while True:
            for name, fn in fns.items():
                if before is not None:
                    before()
                samples[name] += one.time(fn)
            n = len(next(iter(samples.values())))
            if n >= self.max_reps or (n >= reps and time.perf_counter() - t_start > self.budget_s * len(fns)):
                return samples, mem

    def _time_cpu(self, fn) -> list[float]:
        samples = []
        t_start = time.perf_counter()
        while len(samples) < self.max_reps:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            if len(samples) >= self.min_reps and time.perf_counter() - t_start > self.budget_s:
                break
        return samples

    def _time_cuda(self, fn) -> list[float]:
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
        samples = []
        t_start = time.perf_counter()
        while len(samples) < self.max_reps:
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
            if len(samples) >= self.min_reps and time.perf_counter() - t_start > self.budget_s:
                break
        return samples


def trim_heap_fn():
    """glibc's malloc_trim(0) where the C library has it, else None. The CPU kernel rows call it before every
    sample: a freed 16M-element output may stay at the top of the heap or go back to the system, depending on the
    contender that ran before, and the next contender's output then costs 0 or ~16K page faults (20 ms at 64 MB).
    After a trim every contender's big output is fresh memory, as in a training step's first use of it."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median_ms": statistics.median(s), "min_ms": s[0], "p25_ms": q[0], "p75_ms": q[2], "reps": len(s)}


def copy_bandwidth_gbps(device: str, mbytes: int = 256, timer: Timer | None = None) -> float:
    """STREAM-like copy: dst.copy_(src) over `mbytes` MB, counting bytes read + bytes written."""
    n = (mbytes << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timer = timer or Timer(device, warmup=2, min_reps=5, budget_s=1.0)
    ms = summarize(timer.time(lambda: dst.copy_(src)))["median_ms"]
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------- peak memory
def _status_kb(field: str):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def cpu_peak_rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def peak_memory_probe(device: str):
    return lambda fn: peak_memory_mb(device, fn)


def peak_memory_mb(device: str, fn):
    """Run fn once and return (peak MB, how it was measured), or (None, why not).

    CUDA: torch.cuda.max_memory_allocated() during the call (absolute, includes everything resident).
    CPU: growth of the process's peak RSS during the call (Linux: reset VmHWM via /proc/self/clear_refs, then
    VmHWM - VmRSS before). The allocator reuses freed pages, so this is a lower bound of what the call allocates."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak / 2**20, (f"cuda.max_memory_allocated (absolute; {(peak - before) / 2**20:.1f} MB over what was "
                              f"allocated before the call, which includes the bench's 256 MB L2-flush buffer)")
    if not cpu_peak_rss_supported():
        return None, "N/A (no /proc/self/clear_refs)"
    before = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - before) / 1024, "peak RSS growth (VmHWM after clear_refs)"
