"""Agreement, speed, size and memory: the numbers a PTQ report rests on."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from .errors import PTQError
from .runtimes.base import Runtime


def dice(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice per label between two integer label maps of one shape.

    ``labels`` defaults to every non-zero label in either map. A label
    absent from both maps scores 1.0 (they agree it is not there).
    """
    return _dice_and_sizes(a, b, labels)[0]


def mean_dice(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]] = None,
              min_fraction: float = 0.0) -> float:
    """Mean of :func:`dice` over the labels; 1.0 when neither map has any label.

    ``min_fraction`` > 0 leaves out labels that cover less than that fraction
    of the voxels in both maps: a class a network almost never predicts
    (14 voxels of 1.5 million, say) would otherwise swing the mean on its own.
    """
    scores, sizes = _dice_and_sizes(a, b, labels)
    smallest = min_fraction * np.asarray(a).size
    kept = [score for label, score in scores.items() if min_fraction <= 0 or sizes[label] >= smallest]
    return float(np.mean(kept)) if kept else 1.0


def _dice_and_sizes(a: np.ndarray, b: np.ndarray, labels: Optional[Iterable[int]]):
    """``({label: Dice}, {label: voxels in the map where it is larger})`` from one count per map."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape:
        raise PTQError(f"Cannot compare label maps of shapes {a.shape} and {b.shape}: "
                       "resample one onto the other's grid first.")
    for array in (a, b):
        if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
            raise PTQError(f"Dice takes integer label maps, got {array.dtype}. Convert probabilities "
                           "to labels first (inference.to_labels).")
        if array.size and array.min() < 0:
            raise PTQError("Dice takes non-negative labels; found a negative one.")
    a = a.ravel().astype(np.int64, copy=False)
    b = b.ravel().astype(np.int64, copy=False)
    top = int(max(a.max(initial=0), b.max(initial=0))) + 1
    # One pass each instead of one mask per label: counts per label value.
    count_a = np.bincount(a, minlength=top)
    count_b = np.bincount(b, minlength=top)
    overlap = np.bincount(a[a == b], minlength=top)
    if labels is None:
        labels = [label for label in range(1, top) if count_a[label] or count_b[label]]
    scores, sizes = {}, {}
    for label in labels:
        label = int(label)
        if label >= top:
            scores[label], sizes[label] = 1.0, 0
            continue
        both = count_a[label] + count_b[label]
        scores[label] = 1.0 if both == 0 else float(2.0 * overlap[label] / both)
        sizes[label] = int(max(count_a[label], count_b[label]))
    return scores, sizes


def time_forward(runtime: Runtime, shape: Sequence[int], warmup: int = 2,
                 repeats: int = 5) -> Dict[str, float]:
    """Seconds per ``runtime.predict`` of a random float32 batch of ``shape`` (B, C, D, H, W).

    Returns ``{"median_s", "p90_s", "mean_s", "runs"}`` over ``repeats``
    timed calls after ``warmup`` untimed ones (compilation, caches).
    """
    if repeats < 1:
        raise PTQError(f"repeats must be at least 1, got {repeats}.")
    batch = np.random.default_rng(0).random(tuple(shape), dtype=np.float32)
    for _ in range(warmup):
        runtime.predict(batch)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.predict(batch)
        seconds.append(time.perf_counter() - start)
    return {"median_s": float(np.median(seconds)), "p90_s": float(np.percentile(seconds, 90)),
            "mean_s": float(np.mean(seconds)), "runs": repeats}


def file_size_mb(*paths: Path) -> float:
    """Total size in MB (2^20 bytes, as every report prints it) of files or folders.

    A file counts with its ONNX external-data file (``<name>.data``) when
    there is one; a folder counts every file under it.
    """
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise PTQError(f"Cannot measure the size of {path}: it does not exist.")
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file()]
        else:
            files += [path] + [p for p in (path.with_name(path.name + ".data"),) if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (10^6 bytes)."""
    if sys.platform == "win32":
        return _windows_peak_working_set() / 1e6
    status = Path("/proc/self/status")
    if status.is_file():
        # VmHWM is this process's own peak; ru_maxrss of a spawned child
        # starts at its parent's peak on Linux.
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def _windows_peak_working_set() -> int:
    """PeakWorkingSetSize in bytes from psapi's GetProcessMemoryInfo."""
    import ctypes
    from ctypes import wintypes

    class ProcessMemoryCounters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

    counters = ProcessMemoryCounters()
    counters.cb = ctypes.sizeof(counters)
    process = ctypes.windll.kernel32.GetCurrentProcess()
    ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb)
    return counters.PeakWorkingSetSize
