"""``--method auto`` against every fixed calibration method, per network (issue 18).

For each network: export FP32 ONNX, draw calibration crops from real
unlabeled T1 volumes, write one Q/DQ INT8 model per method (max,
percentile, mse, entropy: one streamed histogram per tensor serves them
all) and one with ``auto`` (:mod:`SlicerPTQLib.method_choice`, which sees
only the calibration crops), run each in OpenVINO INT8 on the CPU over
whole held-out volumes (sliding window) and measure agreement with FP32:
Dice of the label maps and the relative RMSE of the logits.

Networks: the registry architectures below (small configuration, 64^3
patches, 6 classes) with the weights ``train_small_models.py`` trained when
they are in the cache, else RANDOM initial weights (the row says
``weights: random``; random networks still have the activation statistics
the methods disagree on, but their labels mean nothing anatomically), plus
deepbet's shipped, trained model when it can be fetched. SegResNetDS is
built with GroupNorm + Mish, the layout issue 18 found ``max`` wrong for.

    python benchmarks/bench_methods.py --out benchmarks/results

Rows of networks not run this time stay from an earlier run into the same
``--out`` (each row says when it was measured), so networks can be added as
their training finishes: ``--networks SegResNet --trained-only``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_architectures as bench  # noqa: E402  (sibling script)
import train_small_models as training  # noqa: E402
from SlicerPTQLib import architectures  # noqa: E402
from SlicerPTQLib.atomic import replacing  # noqa: E402

FIXED = ("max", "percentile", "mse", "entropy")
#: Registry networks; extra arguments for the random-weight build (trained weights carry their own).
NETWORKS = {name: {} for name in architectures.REGISTRY}
NETWORKS["SegResNetDS"] = {"norm": ("group", {"num_groups": 4}), "act": "mish"}


def network(name: str):
    """``(module, spec, weights)`` for a registry network: trained if cached, else random."""
    import torch

    record = bench.cached_record(name, None)
    if record is not None:
        return training.load_trained(record), training.training_spec(name), f"trained {record['steps']} steps"
    torch.manual_seed(0)
    args = architectures.config_args(name, "small", out_channels=training.NUM_CLASSES, **NETWORKS[name])
    return architectures.build(name, args).eval(), training.training_spec(name), "random"


def shipped_network():
    """deepbet's TorchScript model and spec (trained)."""
    from SlicerPTQLib import shipped
    from SlicerPTQLib.models import load_model

    loaded = load_model(shipped.shipped_model())
    return loaded.module, loaded.spec, "trained (deepbet 1.0.2)"


def agreement(fp32_onnx: Path, int8_onnx: Path, spec, images, reference) -> Dict[str, float]:
    """Dice and relative logit RMSE of ``int8_onnx`` (OpenVINO INT8) against FP32 outputs ``reference``."""
    from SlicerPTQLib.inference import sliding_window
    from SlicerPTQLib.runtimes import create_runtime
    from SlicerPTQLib.sensitivity import output_error

    runtime = create_runtime(int8_onnx, "openvino")
    try:
        outputs = [sliding_window(runtime, image, spec.roi_size, overlap=spec.overlap)[None] for image in images]
    finally:
        runtime.close()
    error = output_error(reference, outputs, min_fraction=bench.MIN_FRACTION, output_kind=spec.label_rule())
    return {"dice": float(error.dice), "relative_rmse": float(np.sqrt(error.relative_mse))}


def bench_one(name: str, module, spec, weights: str, num_crops: int, folder: Path) -> Dict:
    from SlicerPTQLib import onnx_graph
    from SlicerPTQLib.calibration import RangeCollector, sample_crops
    from SlicerPTQLib.export import export_onnx
    from SlicerPTQLib.float_policy import float_policy_nodes
    from SlicerPTQLib.inference import sliding_window
    from SlicerPTQLib.method_choice import choose_method
    from SlicerPTQLib.qdq import PLACEMENTS, choose_activation_tensors, quantize_onnx
    from SlicerPTQLib.runtimes import create_runtime

    row = {"network": name, "weights": weights, "roi": list(spec.roi_size),
           "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    fp32 = export_onnx(module, folder / f"{name}.fp32.onnx", spec.in_channels,
                       (1, spec.in_channels, *spec.roi_size), dynamic_spatial=spec.dynamic_spatial)
    calibration = [image for _, image in bench.volumes(spec, "calibration")]
    held_out = [image for _, image in bench.volumes(spec, "agreement")]
    crops = sample_crops(calibration, spec.roi_size, num_crops, seed=0)
    row["crops"] = len(crops)
    keep_float = frozenset(float_policy_nodes(fp32))
    tensors = choose_activation_tensors(onnx_graph.load_model(fp32), PLACEMENTS["cpu"], keep_float)
    runtime = create_runtime(fp32, "openvino", precision="fp32")
    try:
        reference = [sliding_window(runtime, image, spec.roi_size, overlap=spec.overlap)[None] for image in held_out]
    finally:
        runtime.close()
    start = time.perf_counter()
    collector = RangeCollector(fp32, tensors, FIXED)
    collector.feed(crops)
    row["fixed_calibration_s"] = time.perf_counter() - start
    for method in FIXED:
        path = folder / f"{name}.{method}.onnx"
        quantize_onnx(fp32, path, collector.ranges(method), method=method, keep_float=keep_float)
        row[method] = agreement(fp32, path, spec, held_out, reference)
    start = time.perf_counter()
    choice, ranges = choose_method(fp32, tensors, crops, "cpu", keep_float, spec.label_rule(),
                                   volumes=calibration, roi=spec.roi_size, overlap=spec.overlap)
    row["auto_calibration_s"] = time.perf_counter() - start
    path = folder / f"{name}.auto.onnx"
    quantize_onnx(fp32, path, ranges, method=choice.chosen, keep_float=keep_float)
    row["auto"] = {**agreement(fp32, path, spec, held_out, reference), "choice": choice.to_dict(),
                   "chosen": choice.chosen}
    best = max(FIXED, key=lambda method: (row[method]["dice"], -row[method]["relative_rmse"]))
    row["best_fixed"] = best
    row["auto_at_least_best"] = row["auto"]["dice"] >= row[best]["dice"] - 1e-4
    return row


def markdown(rows: List[Dict]) -> str:
    lines = ["| network | weights | " + " | ".join(FIXED) + " | auto (chosen) | auto >= best fixed |",
             "|---|---|" + "---|" * (len(FIXED) + 2)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['network']} | {row.get('weights', '')} | failed: {row['error']} |")
            continue
        cells = [f"{row[m]['dice']:.4f} / {row[m]['relative_rmse']:.3f}" for m in FIXED]
        auto = row["auto"]
        lines.append(f"| {row['network']} | {row['weights']} | " + " | ".join(cells)
                     + f" | {auto['dice']:.4f} / {auto['relative_rmse']:.3f} ({auto['chosen']}) | "
                     + ("yes" if row["auto_at_least_best"] else "no") + " |")
    lines.append("")
    lines.append("Cells: agreement Dice with FP32 / relative RMSE of the logits, OpenVINO INT8 on whole held-out "
                 "volumes (ITK T1, Colin27).")
    return "\n".join(lines)


def earlier_rows(out: Path, networks: List[str]) -> List[Dict]:
    """The rows of an earlier run into ``out`` for the networks not run now."""
    previous = out / "methods.json"
    if not previous.is_file():
        return []
    return [row for row in json.loads(previous.read_text())["rows"] if row["network"] not in networks]


def write(out: Path, rows: List[Dict], skipped: List[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from SlicerPTQLib.cpu_info import cpu_summary

    result = {"machine": {"cpu": cpu_summary(), "python": platform.python_version()},
              "rows": rows, "skipped_untrained": skipped}
    with replacing(out / "methods.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    with replacing(out / "methods.md") as tmp:
        tmp.write_text(markdown(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS) + ["deepbet"])
    parser.add_argument("--num-crops", type=int, default=8)
    parser.add_argument("--trained-only", action="store_true",
                        help="skip registry networks whose trained weights are not in the cache")
    args = parser.parse_args()
    rows, skipped = earlier_rows(args.out, args.networks), []
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as folder:
        for name in args.networks:
            if args.trained_only and name != "deepbet" and bench.cached_record(name, None) is None:
                print(f"{name}: no trained weights in the cache, skipped", flush=True)
                skipped.append(name)
                continue
            print(f"{name} ...", flush=True)
            try:
                module, spec, weights = shipped_network() if name == "deepbet" else network(name)
                rows.append(bench_one(name, module, spec, weights, args.num_crops, Path(folder)))
            except Exception as exc:  # a failing network is a row, the others still run
                traceback.print_exc()
                rows.append({"network": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            print(markdown(rows[-1:]).splitlines()[2], flush=True)
            write(args.out, rows, skipped)  # after every row: a long run keeps what it measured
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
