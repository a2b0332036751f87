"""Bounds on the numeric options, checked before any work.

Each bound keeps a typo from looping for minutes or allocating terabytes:
10^7 crops, a 2048^3 patch or a negative seed are refused with one
sentence naming the option, the value and the range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .errors import PTQError

#: Calibration crops: a few dozen is the usual; 10,000 patches of 96^3 already hold 35 GB of float32.
MAX_NUM_CROPS = 10_000
#: Patch edge in voxels: 512^3 float32 is 0.5 GB per channel before the network's own activations.
MAX_ROI = 512
#: numpy's random generators take seeds in [0, 2^32).
MAX_SEED = 2 ** 32 - 1
#: Sliding-window patches per forward: past this the batch no longer fits a GPU or speeds a CPU.
MAX_BATCH_SIZE = 256
#: Timed forwards per latency figure.
MAX_REPEATS = 1_000
#: Volumes in flight in a cohort: each holds its own runtime and volume in memory.
MAX_JOBS = 64
#: Tries again of a failed server request.
MAX_RETRIES = 20


def check_range(option: str, value: int, low: int, high: int, hint: str = "") -> int:
    """``value`` when ``low <= value <= high``, else PTQError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PTQError(f"{option} takes a whole number from {low} to {high}, got {value!r}.")
    if not low <= value <= high:
        raise PTQError(f"{option} must be from {low:,} to {high:,}, got {value:,}.{' ' + hint if hint else ''}")
    return value


def check_num_crops(value: int) -> int:
    """Calibration crops: 1 .. :data:`MAX_NUM_CROPS`."""
    return check_range("--num-crops", value, 1, MAX_NUM_CROPS, "20 to 100 crops are usually enough.")


def check_seed(value: int) -> int:
    """Random seed: 0 .. 2^32 - 1."""
    return check_range("--seed", value, 0, MAX_SEED)


def check_batch_size(value: int) -> int:
    """Sliding-window batch: 1 .. :data:`MAX_BATCH_SIZE`."""
    return check_range("--batch-size", value, 1, MAX_BATCH_SIZE)


def check_jobs(value: int) -> int:
    """Cohort volumes in flight: 1 .. :data:`MAX_JOBS`."""
    return check_range("--jobs", value, 1, MAX_JOBS)


def check_server_settings(timeout: float, retries: int) -> None:
    """``--server-timeout`` positive (at most a day), ``--retries`` 0 .. :data:`MAX_RETRIES`."""
    if not 0 < timeout <= 86_400:
        raise PTQError(f"--server-timeout must be more than 0 and at most 86400 seconds, got {timeout}.")
    check_range("--retries", retries, 0, MAX_RETRIES)


def check_repeats(value: int) -> int:
    """Timed forwards per figure: 1 .. :data:`MAX_REPEATS`."""
    return check_range("--repeats", value, 1, MAX_REPEATS)


def check_roi(roi: Sequence[int], multiple: Optional[int] = None, model: Optional[Path] = None) -> tuple:
    """A patch size of 3 positive sizes up to :data:`MAX_ROI`, each a multiple of ``multiple`` when given.

    ``multiple`` is the model's ``spatial_multiple`` (its total downsampling
    stride): a patch that is not a multiple of it cannot go through the
    network's down- and up-sampling paths.
    """
    sizes = tuple(roi)
    if len(sizes) != 3:
        raise PTQError(f"--roi takes 1 or 3 sizes (one per axis), got {len(sizes)}: {list(sizes)}.")
    for size in sizes:
        check_range("--roi", size, 1, MAX_ROI, "Typical patches are 64 to 160 voxels per axis.")
    if multiple and any(size % multiple for size in sizes):
        below = max(multiple, min(sizes) // multiple * multiple)
        whose = f"{model}'s metadata" if model is not None else "The model's metadata"
        raise PTQError(f"--roi {' '.join(map(str, sizes))} does not fit the network: {whose} says patch sizes "
                       f"must be multiples of {multiple} (spatial_multiple). Use e.g. --roi {below} or "
                       f"--roi {below + multiple}.")
    return sizes
