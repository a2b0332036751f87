"""TensorRT on an NVIDIA GPU: FP32 vs FP16 vs INT8 engines of one model, in one run.

The model (default: the shipped deepbet brain-extraction network) is
quantized with the TensorRT Q/DQ placement on real calibration volumes,
then four strongly typed engines are built (FP32 and FP16 from the float
ONNX; INT8 from the QDQ ONNX with its float parts in FP16, the default and
what Model-Optimizer ships, and ``int8_fp32_float`` with them in FP32) and
measured on a real volume:

- per-patch GPU compute time: CUDA events around ``execute_async_v3`` only
  (no host copies), mean and median over repeats, at batch 1 and at
  ``--max-batch`` (reported per patch);
- whole-volume wall time: preprocessing, sliding window with host<->device
  copies and blending, restoring labels (median of ``--volume-repeats``);
- engine file size, build (or cache hit) time;
- Dice of each engine's labels vs the FP32 engine's, and vs the reference
  mask of the volume;
- which layers ran INT8 (engine inspector), ConvTranspose layers flagged.

Run on a machine with an NVIDIA GPU, CUDA and TensorRT::

    pip install tensorrt-cu12 --extra-index-url https://pypi.nvidia.com   # or tensorrt-cu13 for a CUDA-13 driver
    # device memory: a CUDA build of torch, or cuda-python with a CPU-only torch
    python benchmarks/bench_gpu.py [--max-batch 2] [--out benchmarks/results/gpu_tensorrt.json]

The headline is INT8 vs FP16 (what a GPU user would otherwise run), then
INT8 vs FP32 and what the FP16 float parts gain over FP32 ones. Prints a
table and writes JSON. Without a usable GPU/TensorRT it prints
why in one sentence and exits with status 2.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Engine name -> (TensorRT precision, float parts of an INT8 engine; other precisions ignore it).
ENGINES = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp16"), "int8": ("int8", "fp16"),
           "int8_fp32_float": ("int8", "fp32")}
# (results key, label, baseline engine, compared engine)
COMPARISONS = (("int8_vs_fp16", "INT8 vs FP16", "fp16", "int8"), ("int8_vs_fp32", "INT8 vs FP32", "fp32", "int8"),
               ("int8_fp16_float_vs_fp32_float", "INT8 with FP16 float parts vs with FP32 ones", "int8_fp32_float",
                "int8"))
EXIT_NO_GPU = 2


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="TorchScript/ONNX model (default: shipped deepbet)")
    parser.add_argument("--calib", type=Path, nargs="+", help="calibration volumes (default: shipped ones)")
    parser.add_argument("--volume", type=Path, help="volume to segment (default: first shipped evaluation volume)")
    parser.add_argument("--reference", type=Path, help="reference mask of --volume (>0 = foreground)")
    parser.add_argument("--method", default="max", help="calibration method (max, percentile, entropy, mse)")
    parser.add_argument("--num-crops", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=2, help="patches per engine call")
    parser.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimization level")
    parser.add_argument("--repeats", type=int, default=50, help="timed engine calls per setting")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--volume-repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=RESULTS / "gpu_work", help="quantized models go here")
    parser.add_argument("--cache-dir", type=Path, help="engine cache (default ~/.cache/slicer-ptq/tensorrt)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_tensorrt.json")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from SlicerPTQLib.errors import PTQError
    from SlicerPTQLib.evaluation import write_json
    from SlicerPTQLib.runtimes.tensorrt_runtime import tensorrt_available

    usable, reason = tensorrt_available()
    if not usable:
        print(f"bench_gpu: cannot benchmark TensorRT on this machine: {reason}.", file=sys.stderr)
        return EXIT_NO_GPU
    try:
        results = run(args, reason)
    except PTQError as exc:
        print(f"bench_gpu: {exc}", file=sys.stderr)
        return 1
    write_json(results, args.out)  # before the table: a table error must not lose the measurements
    print_table(results)
    print(f"\nwrote {args.out}")
    return 0


def run(args: argparse.Namespace, machine: str) -> Dict:
    import torch

    from SlicerPTQLib import shipped
    from SlicerPTQLib.pipeline import quantize, read_any
    from SlicerPTQLib.runtimes.cuda_memory import open_device

    model = args.model or shipped.shipped_model()
    calibration = args.calib or shipped.calibration_volumes()[:3]
    if args.volume is not None:
        volume_path, reference_path = args.volume, args.reference
    else:
        _, volume_path, reference_path = shipped.evaluation_volumes()[0]
    quantized = quantize(model, calibration, out_dir=args.work, method=args.method, num_crops=args.num_crops,
                         placement="tensorrt")
    spec = quantized.spec
    volume = read_any(volume_path)
    reference = None
    if reference_path is not None:
        reference = shipped.reference_mask(Path(reference_path)).array
    patch = center_patch(volume, spec)

    engines: Dict[str, Dict] = {}
    labels: Dict[str, np.ndarray] = {}
    for name, (precision, float_parts) in ENGINES.items():
        onnx_path = quantized.quantized_onnx if precision == "int8" else quantized.fp32_onnx
        engines[name], labels[name] = measure_engine(args, onnx_path, precision, float_parts, spec, volume, patch)
    for name in ENGINES:
        engines[name]["dice_vs_fp32"] = mean_dice(labels[name], labels["fp32"])
        if reference is not None:
            engines[name]["dice_vs_reference"] = mean_dice(labels[name], reference)
    results = {
        "machine": {"gpu": open_device(0).identity()[0], "tensorrt_runtime": machine,
                    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
        "model": str(model), "volume": str(volume_path), "roi": list(spec.roi_size),
        "max_batch": args.max_batch, "calibration": [str(path) for path in calibration],
        "engines": engines,
    }
    # The headline is INT8 vs FP16 (what a GPU user would otherwise run), then vs FP32.
    results.update({key: speedups(engines[baseline], engines[compared])
                    for key, _, baseline, compared in COMPARISONS})
    return results


def speedups(baseline: Dict, int8: Dict) -> Dict[str, float]:
    return {"patch_speedup_batch1": baseline["patch_batch1"]["median_ms"] / int8["patch_batch1"]["median_ms"],
            "patch_speedup_max_batch": (baseline["patch_max_batch"]["median_ms_per_patch"]
                                        / int8["patch_max_batch"]["median_ms_per_patch"]),
            "volume_speedup": baseline["volume_median_s"] / int8["volume_median_s"],
            "engine_size_ratio": int8["engine_mb"] / baseline["engine_mb"]}


def center_patch(volume, spec) -> np.ndarray:
    """The roi-sized patch at the centre of the preprocessed volume (C, D, H, W)."""
    from SlicerPTQLib.preprocess import prepare

    image, _ = prepare(volume, spec)
    roi = tuple(spec.roi_size)
    padded = np.pad(image, [(0, 0)] + [(0, max(0, r - s)) for s, r in zip(image.shape[1:], roi)])
    starts = [(s - r) // 2 for s, r in zip(padded.shape[1:], roi)]
    return np.ascontiguousarray(padded[:, starts[0]:starts[0] + roi[0], starts[1]:starts[1] + roi[1],
                                       starts[2]:starts[2] + roi[2]], dtype=np.float32)


def measure_engine(args, onnx_path: Path, precision: str, float_parts: str, spec, volume, patch: np.ndarray):
    from SlicerPTQLib.inference import segment_volume
    from SlicerPTQLib.metrics import file_size_mb
    from SlicerPTQLib.runtimes import int8_summary
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    started = time.perf_counter()
    runtime = TensorRTRuntime(onnx_path, precision=precision, roi=spec.roi_size, max_batch=args.max_batch,
                              cache_dir=args.cache_dir, optimization_level=args.optimization_level,
                              float_parts=float_parts)
    ready_s = time.perf_counter() - started
    try:
        result = {
            "onnx": str(onnx_path),
            "precision": precision,
            "float_parts": float_parts if precision == "int8" else precision,
            "engine": str(runtime.engine_path),
            "engine_mb": file_size_mb(runtime.engine_path),
            "ready_s": ready_s,
            "build_s": runtime.metadata.get("build_seconds"),
            # Two keys even when max_batch is 1 (then both hold batch-1 timings).
            "patch_batch1": gpu_patch_times(runtime, patch, 1, args.warmup, args.repeats),
            "patch_max_batch": gpu_patch_times(runtime, patch, runtime.max_batch, args.warmup, args.repeats),
        }
        seconds, labels = [], None
        for _ in range(max(1, args.volume_repeats) + 1):
            out, timings = segment_volume(runtime, volume, spec, batch_size=runtime.max_batch)
            seconds.append(timings["total_s"])
            labels = out.array
        # The first pass pays CUDA/cuDNN lazy initialisation: leave it out.
        result["volume_s"] = seconds[1:]
        result["volume_median_s"] = float(np.median(seconds[1:]))
        layers = runtime.layer_precisions()
        result["layers"] = int8_summary(layers)
        # Whether the float parts really ran FP16: every layer's precision, counted.
        result["layer_precisions"] = dict(Counter(layer["precision"] for layer in layers))
        result["convtranspose"] = [layer for layer in layers if layer.get("convtranspose")]
        result["qdq_warnings"] = runtime.metadata.get("qdq_warnings", [])
    finally:
        runtime.close()
    return result, labels


def gpu_patch_times(runtime, patch: np.ndarray, batch: int, warmup: int, repeats: int) -> Dict[str, float]:
    """GPU milliseconds of one engine call on ``batch`` copies of ``patch`` (events on the stream, no copies)."""
    memory = runtime.memory
    inputs = memory.upload(np.repeat(patch[None], batch, axis=0))
    for _ in range(warmup):
        runtime.run_device(inputs)
    memory.synchronize()
    times = memory.timed(lambda: runtime.run_device(inputs), repeats)
    return {"batch": batch, "mean_ms": float(np.mean(times)), "median_ms": float(np.median(times)),
            "median_ms_per_patch": float(np.median(times)) / batch, "runs": repeats}


def mean_dice(labels: np.ndarray, reference: np.ndarray) -> float:
    from SlicerPTQLib.metrics import mean_dice as dice

    return dice(np.asarray(labels), np.asarray(reference))


def print_table(results: Dict) -> None:
    batch = results["max_batch"]
    header = (f"{'engine':15} {'MB':>7} {'b1 med ms':>10} {'b1 mean ms':>11} {f'b{batch} ms/patch':>13} "
              f"{'volume s':>9} {'Dice/FP32':>10} {'Dice/ref':>9} {'conv INT8':>10}")
    print(f"TensorRT on {results['machine']['gpu']} ({results['machine']['tensorrt_runtime']}), "
          f"roi {results['roi']}")
    print(header)
    print("-" * len(header))
    for name, row in results["engines"].items():
        batched = row["patch_max_batch"]
        layers = row["layers"]
        print(f"{name:15} {row['engine_mb']:7.2f} {row['patch_batch1']['median_ms']:10.3f} "
              f"{row['patch_batch1']['mean_ms']:11.3f} {batched['median_ms_per_patch']:13.3f} "
              f"{row['volume_median_s']:9.3f} {row['dice_vs_fp32']:10.4f} "
              f"{row.get('dice_vs_reference', float('nan')):9.4f} "
              f"{layers['conv_int8']:>4}/{layers['conv_total']:<5}")
    for key, label, _, _ in COMPARISONS:
        if key not in results:
            continue
        ratios = results[key]
        print(f"{label}: patch {ratios['patch_speedup_batch1']:.2f}x faster (batch 1), "
              f"{ratios['patch_speedup_max_batch']:.2f}x (batch {batch}), volume {ratios['volume_speedup']:.2f}x "
              f"faster, engine {ratios['engine_size_ratio']:.2f}x the size")
    for layer in results["engines"]["int8"]["convtranspose"]:
        if layer.get("note"):
            print(f"  {layer['name']}: {layer['note']}")


if __name__ == "__main__":
    sys.exit(main())
