"""Measuring the variants, one worker process each, on the same patch and volumes.

Per-patch latency (median, p90 after warm-up; backends interleaved in a
shuffled order every round, so machine noise hits all alike), whole-volume
wall time split into preprocessing / network / blending / restoring, Dice vs
the reference labels and vs PyTorch FP32, each worker's peak memory, and the
executed precision of every OpenVINO layer. A sliding-window profile (a real
volume at its native size, several windows) shows where the whole-volume time
goes once the network is INT8.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from backends_subjects import brain_mask
from backends_variants import DEFAULT_METHOD, Variant, log
from backends_worker import Worker

#: Sliding-window settings of the profile: MONAI's usual overlap and blending.
PROFILE_OVERLAP = 0.5
PROFILE_MODE = "gaussian"


def measure(variants: List[Variant], spec_path: Path, cases, out: Path, threads: int, repeats: int,
            warmup: int, volume_repeats: int, profile: bool, seed: int = 0,
            reference: Optional[Callable[[Path], np.ndarray]] = None, slices: Path = Path("slices")) -> Dict:
    """Start one worker per variant and run the interleaved measurements.

    ``reference`` reads the cases' reference files (default: brain masks);
    slice files go to ``out/<slices>``.
    """
    from SlicerPTQLib.preprocess import prepare
    from SlicerPTQLib.spec import ModelSpec
    from SlicerPTQLib.volumes import read_volume

    spec = ModelSpec.load(spec_path)
    context = mp.get_context("spawn")
    log(f"starting {len(variants)} workers ({threads} threads each)")
    workers = [Worker(context, variant, spec_path, threads) for variant in variants]
    for worker in workers:
        worker.wait_ready()
        if worker.error:
            log(f"{worker.variant.label} failed to load: {worker.error.splitlines()[0]}")
    rng = random.Random(seed)
    try:
        # The same real patch for everyone: the first evaluation volume, preprocessed.
        first_image = read_volume(Path(cases[0][1]))
        patch = _fit_patch(prepare(first_image, spec)[0], spec.roi_size)[None]
        patch_file = out / "patch.npy"
        np.save(patch_file, patch)
        times = patch_latency(workers, patch_file, warmup, repeats, rng)
        cold, volume_rows = whole_volumes(workers, cases, spec, out, volume_repeats, rng, reference or brain_mask,
                                          slices)
        layers, memory = {}, {}
        for worker in workers:
            if worker.variant.backend == "openvino":
                layers[worker.variant.key] = worker.ask("layers") or []
            # Before the profile, whose larger image would raise some workers' peaks.
            memory[worker.variant.key] = worker.ask("memory")
        profile_result = sliding_window_profile(workers, first_image, spec, out) if profile else None
        errors = {w.variant.key: w.error for w in workers if w.error}
        infos = {w.variant.key: w.info for w in workers}
    finally:
        for worker in workers:
            worker.close()
    return {"times": times, "volumes": volume_rows, "layers": {k: v for k, v in layers.items() if v},
            "memory": memory, "errors": errors, "infos": infos, "cold": cold, "profile": profile_result,
            "patch_shape": list(patch.shape)}


def patch_latency(workers: List[Worker], patch_file: Path, warmup: int, repeats: int,
                  rng: random.Random) -> Dict[str, Dict[str, List[float]]]:
    """Wall and CPU seconds per forward of the same patch, every worker once per round in a shuffled order."""
    for worker in workers:
        worker.ask("patch", str(patch_file))
    log(f"per-patch latency: {warmup} warm-up + {repeats} interleaved rounds")
    times: Dict[str, Dict[str, List[float]]] = {w.variant.key: {"wall": [], "cpu": []} for w in workers}
    for _ in range(warmup):
        for worker in workers:
            worker.ask("forward")
    for _ in range(repeats):
        order = list(workers)
        rng.shuffle(order)
        for worker in order:
            answer = worker.ask("forward")
            if answer is not None:
                times[worker.variant.key]["wall"].append(answer[0])
                times[worker.variant.key]["cpu"].append(answer[1])
    return times


def whole_volumes(workers: List[Worker], cases, spec, out: Path, volume_repeats: int, rng: random.Random,
                  reference: Callable[[Path], np.ndarray], slices_dir: Path = Path("slices")):
    """Segment every volume with every worker (interleaved rounds); returns (cold times, per-volume rows).

    Each row holds per variant the median stage timings, Dice (mean over
    the spec's labels) vs the reference labels (None for a case without
    any) and vs PyTorch FP32; slices of image / FP32 / INT8 labels go to
    ``out/<slices_dir>/<volume>.npz``.
    """
    from SlicerPTQLib.metrics import mean_dice
    from SlicerPTQLib.volumes import read_volume

    log("whole volumes: one untimed warm-up segmentation per backend")
    cold = {}
    for worker in workers:
        answer = worker.ask("volume", str(cases[0][1]))
        if answer is not None:
            cold[worker.variant.key] = answer[1]["total_s"]
    log(f"whole volumes: {len(cases)} volume(s) x {volume_repeats} interleaved round(s)")
    labels = sorted(spec.labels)
    rows = []
    for name, image_path, mask_path in cases:
        truth = reference(Path(mask_path)) if mask_path else None
        runs: Dict[str, List[Dict]] = {}
        label_maps: Dict[str, np.ndarray] = {}
        for _ in range(volume_repeats):
            order = list(workers)
            rng.shuffle(order)
            for worker in order:
                answer = worker.ask("volume", str(image_path))
                if answer is not None:
                    label_maps[worker.variant.key] = answer[0]
                    runs.setdefault(worker.variant.key, []).append(answer[1])
        baseline = label_maps.get("torch_fp32")
        results = {}
        for key, timings in runs.items():
            median = {stage: float(np.median([run[stage] for run in timings])) for stage in timings[0]}
            results[key] = {"timings": median, "total_s": median["total_s"],
                            "fastest_total_s": float(min(run["total_s"] for run in timings)),
                            "dice_vs_reference": (mean_dice(label_maps[key], truth, labels)
                                                  if truth is not None else None),
                            "dice_vs_fp32": (mean_dice(label_maps[key], baseline, labels)
                                             if baseline is not None else None)}
        shape = truth.shape if truth is not None else next((m.shape for m in label_maps.values()), None)
        row = {"volume": name, "shape": list(shape) if shape else None, "results": results}
        int8_key = f"slicerptq_int8_{DEFAULT_METHOD}"
        if baseline is not None and int8_key in label_maps:
            slices = slices_dir / f"{name}.npz"
            save_slices(out / slices, read_volume(Path(image_path)).array, baseline, label_maps[int8_key],
                        "PyTorch FP32", f"SlicerPTQ INT8 ({DEFAULT_METHOD})")
            row["slices"] = slices.as_posix()
        rows.append(row)
    return cold, rows


def _fit_patch(image: np.ndarray, roi: Sequence[int]) -> np.ndarray:
    """A (C, *roi) patch from a (C, D, H, W) image: centre crop, zero-padded where the image is smaller."""
    patch = np.zeros((image.shape[0], *roi), dtype=np.float32)
    source, target = [slice(None)], [slice(None)]
    for size, length in zip(image.shape[1:], roi):
        start = max((size - length) // 2, 0)
        width = min(size, length)
        source.append(slice(start, start + width))
        target.append(slice(0, width))
    patch[tuple(target)] = image[tuple(source)]
    return patch


def sliding_window_profile(workers: List[Worker], volume, spec, out: Path) -> Dict:
    """Where whole-volume time goes when there are many windows.

    The first evaluation volume is reoriented and intensity-normalised like
    the model's input but kept at its native size (rounded up to the
    model's spatial multiple), then run through the sliding window (roi =
    the model's, overlap 0.5, gaussian blending) by PyTorch FP32, NNCF INT8
    and SlicerPTQ INT8; a runtime that returns zeros at once gives the
    blending/stitching cost alone.
    """
    import nibabel as nib

    from SlicerPTQLib.inference import sliding_window, window_count
    from SlicerPTQLib.preprocess import normalize_intensity, plan_grid

    log("sliding-window profile")
    grid = plan_grid(volume, spec)
    transform = nib.orientations.ornt_transform(grid.start_ornt, grid.target_ornt)
    native = nib.orientations.apply_orientation(np.asarray(volume.array, dtype=np.float32), transform)
    multiple = spec.spatial_multiple
    shape = [int(np.ceil(size / multiple) * multiple) for size in native.shape]
    image = np.zeros([1] + shape, dtype=np.float32)
    image[(0,) + tuple(slice(0, s) for s in native.shape)] = normalize_intensity(native, spec.intensity)
    image_file = out / "profile_image.npy"
    np.save(image_file, image)

    rows = {}
    for worker in workers:
        if worker.variant.key in ("torch_fp32", f"slicerptq_int8_{DEFAULT_METHOD}", "nncf_int8"):
            answer = worker.ask("sliding_window", {"image": str(image_file), "roi": list(spec.roi_size),
                                                   "overlap": PROFILE_OVERLAP, "mode": PROFILE_MODE})
            if answer:
                answer["blend_s"] = max(answer["total_s"] - answer["forward_s"], 0.0)
                answer["stitch_share"] = answer["blend_s"] / answer["total_s"] if answer["total_s"] else None
                rows[worker.variant.key] = answer
    null_runs = []
    for _ in range(3):  # the first call also pays MONAI's import in this process
        start = time.perf_counter()
        sliding_window(_NullRuntime(spec.out_channels), image, spec.roi_size, overlap=PROFILE_OVERLAP,
                       mode=PROFILE_MODE)
        null_runs.append(time.perf_counter() - start)
    stitching_only = min(null_runs[1:])
    image_file.unlink()
    return {"image_shape": shape, "roi": list(spec.roi_size), "overlap": PROFILE_OVERLAP, "mode": PROFILE_MODE,
            "windows": window_count(shape, spec.roi_size, PROFILE_OVERLAP), "stitching_only_s": stitching_only,
            "runs": rows}


class _NullRuntime:
    """Returns zeros of the right shape at once: what is left is the sliding window's own cost."""

    name = "none"
    precision = "none"

    def __init__(self, out_channels: int):
        self.out_channels = out_channels

    def predict(self, batch):
        return np.zeros((batch.shape[0], self.out_channels, *batch.shape[2:]), dtype=np.float32)


def _middle_slices(array: np.ndarray) -> List[np.ndarray]:
    return [np.take(array, array.shape[axis] // 2, axis=axis) for axis in range(3)]


def save_slices(path: Path, image: np.ndarray, fp32: np.ndarray, int8: np.ndarray, fp32_label: str,
                int8_label: str) -> None:
    """Three orthogonal middle slices of image / FP32 labels / INT8 labels, for the report."""
    from SlicerPTQLib.atomic import replacing

    arrays = {"fp32_label": np.array(fp32_label), "int8_label": np.array(int8_label)}
    for name, volume in (("image", image.astype(np.float32)), ("fp32", fp32.astype(np.uint8)),
                         ("int8", int8.astype(np.uint8))):
        for axis, plane in enumerate(_middle_slices(volume)):
            arrays[f"{name}_{axis}"] = plane
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, suffix=".npz") as tmp:  # numpy appends .npz to any other name
        np.savez_compressed(tmp, **arrays)
