"""Low-bit weights on the shipped brain-extraction model: Dice, time and size per bit width.

For W8A8, W4A8, W3A8 and W2A8, with round-to-nearest (MSE-fitted
per-channel scales) and with the ADMM solver (plus ablations without the
attention map / without the weight regularizer): quantize the weights of
deepbet's bbox model on ONE calibration volume (not an evaluation volume),
write the QDQ ONNX with SlicerPTQLib.qdq (the same activation ranges for
the solver and the writer, "cpu" placement) and the packed low-bit file,
then segment every evaluation volume with

- ONNX Runtime on the QDQ file (the simulated low-bit model), and
- OpenVINO's INT8 path (same file; non-INT8 parts with precision hint f32),

and report Dice vs the reference masks, vs FP32, and OpenVINO vs ONNX
Runtime (asked: >= 0.999) next to two floors: OpenVINO vs itself on 1
thread (the same file and runtime, only the order of float sums changes)
and the simulated model vs itself on the images with multiplicative noise
of 1e-5 (a thousandth of an MRI's own noise; FP32 measured the same way);
then the quantization wall and CPU time and the sizes of the FP32 ONNX,
the QDQ ONNX and the packed weights. The packed file is read back and must
reproduce the QDQ model's weights exactly.

Run (about 10 minutes on 2 cores)::

    python benchmarks/bench_lowbit.py [--bits 8 4 3 2] [--iterations 200] [--no-ablations]
        [--out benchmarks/results/lowbit.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
# Relative noise for a model's self-agreement: far below any scanner's noise
# (an MRI's is about 1e-2), yet enough to move some voxels across a rounding
# edge of the first quantizer. (Scaling the image would not do: the intensity
# normalization undoes it.)
NOISE = 1e-5
# Per-volume Dice entries of a row that the table shows as a mean.
MEANS = ("dice_vs_reference", "dice_vs_fp32", "openvino_vs_simulated", "openvino_vs_openvino_1_thread",
         "simulated_vs_noisy_input")


@dataclass
class Config:
    bits: int
    solver: str
    attention: bool = True
    regularizer: bool = True

    @property
    def label(self) -> str:
        extra = ("" if self.attention else " -attention") + ("" if self.regularizer else " -regularizer")
        return f"W{self.bits}A8 {self.solver}{extra}"

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "_").replace("-", "no")


def configs(bits: List[int], ablations: bool) -> List[Config]:
    runs = [Config(b, solver) for b in bits for solver in ("rtn", "admm")]
    if ablations:
        runs += [Config(b, "admm", attention=False) for b in bits if b in (4, 2)]
        runs += [Config(b, "admm", regularizer=False) for b in bits if b in (4, 2)]
    return runs


def segment_all(model: Path, backend: str, cases, spec, threads: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Label maps (input grid) per evaluation volume."""
    from SlicerPTQLib.inference import segment_volume
    from SlicerPTQLib.runtimes import create_runtime

    runtime = create_runtime(model, backend, threads=threads)
    try:
        return {name: segment_volume(runtime, volume, spec)[0].array for name, volume, _ in cases}
    finally:
        runtime.close()


def int8_layers(model: Path) -> Dict[str, int]:
    """Executed Convolution/Deconvolution layers by precision in OpenVINO."""
    from SlicerPTQLib.runtimes import create_runtime

    runtime = create_runtime(model, "openvino")
    try:
        runtime.predict(np.zeros((1, 1, 128, 128, 128), np.float32))
        counts: Dict[str, int] = {}
        for layer in runtime.layer_precisions():
            if layer["type"] in ("Convolution", "Deconvolution"):
                key = f"{layer['type']}:{layer['precision']}"
                counts[key] = counts.get(key, 0) + 1
        return counts
    finally:
        runtime.close()


def brain_dice(a: np.ndarray, b: np.ndarray) -> float:
    from SlicerPTQLib.metrics import dice

    return dice(a.astype(np.int64), b.astype(np.int64), [1])[1]


def same_weights(path_a: Path, path_b: Path) -> bool:
    """True when two QDQ files hold identical initializers."""
    import onnx
    from onnx import numpy_helper

    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path_a)).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path_b)).graph.initializer}
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "lowbit.json")
    parser.add_argument("--work", type=Path, default=None, help="keep the models here (default: temp)")
    args = parser.parse_args(argv)

    import onnx
    import torch

    from SlicerPTQLib import lowbit, shipped
    from SlicerPTQLib.calibration import collect_ranges
    from SlicerPTQLib.evaluation import write_json
    from SlicerPTQLib.export import export_onnx
    from SlicerPTQLib.metrics import file_size_mb
    from SlicerPTQLib.preprocess import prepare
    from SlicerPTQLib.qdq import PLACEMENTS, choose_activation_tensors, quantize_onnx
    from SlicerPTQLib.spec import ModelSpec, sidecar_path
    from SlicerPTQLib.volumes import read_volume

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_lowbit_"))
    work.mkdir(parents=True, exist_ok=True)
    model_path = shipped.shipped_model()
    spec = ModelSpec.load(sidecar_path(model_path))
    fp32 = work / "model.fp32.onnx"
    export_onnx(torch.jit.load(str(model_path)), fp32, spec.in_channels, (1, spec.in_channels, *spec.roi_size))
    spec.save(sidecar_path(fp32))

    calibration_path = shipped.calibration_volumes()[0]
    sample, _ = prepare(read_volume(calibration_path), spec)
    cases = [(name, read_volume(image), shipped.reference_mask(mask).array)
             for name, image, mask in shipped.evaluation_volumes()]
    tensors = choose_activation_tensors(onnx.load(str(fp32)), PLACEMENTS["cpu"])
    ranges = collect_ranges(fp32, tensors, [sample], "max")
    print(f"calibration: {calibration_path.name}; evaluation: {[c[0] for c in cases]}; "
          f"{len(tensors)} activation tensors", flush=True)

    fp32_labels = segment_all(fp32, "onnxruntime", cases, spec)
    rows = [with_means({"config": "FP32", "bits": 32, "solver": None,
                        "dice_vs_reference": {name: brain_dice(fp32_labels[name], ref) for name, _, ref in cases},
                        "simulated_vs_noisy_input": noise_floor(fp32, cases, spec, fp32_labels),
                        "size_mb": {"onnx": file_size_mb(fp32)}})]

    # The INT8 writer on its own (max-abs rounding), the usual W8A8 reference.
    int8 = work / "model.int8.onnx"
    quantize_onnx(fp32, int8, ranges, placement="cpu")
    spec.save(sidecar_path(int8))
    rows.append(evaluate("W8A8 writer (max-abs)", 8, None, int8, None, None, cases, spec, fp32_labels))

    for config in configs(args.bits, not args.no_ablations):
        print(f"--- {config.label}", flush=True)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        result = lowbit.quantize_weights(fp32, sample, config.bits, config.solver, activation_ranges=ranges,
                                         attention=config.attention, regularizer=config.regularizer,
                                         iterations=args.iterations)
        timing = {"wall_s": time.perf_counter() - wall_start, "cpu_s": time.process_time() - cpu_start}
        qdq = work / f"model.{config.slug}.onnx"
        quantize_onnx(fp32, qdq, ranges, placement="cpu", weight_quant=result.weight_quant)
        spec.save(sidecar_path(qdq))
        packed = lowbit.save_packed(work / f"model.{config.slug}.packed.npz", result)
        reloaded = work / f"model.{config.slug}.reloaded.onnx"
        quantize_onnx(fp32, reloaded, ranges, placement="cpu", weight_quant=lowbit.load_packed(packed))
        row = evaluate(config.label, config.bits, config, qdq, packed, timing, cases, spec, fp32_labels)
        row["packed_roundtrip_identical"] = same_weights(qdq, reloaded)
        row["layers"] = result.summary()["layers"]
        rows.append(row)
        print(result.table(), flush=True)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)

    from SlicerPTQLib.cpu_info import cpu_summary

    payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
               "cpu": cpu_summary(),
               "model": str(model_path), "calibration": str(calibration_path),
               "evaluation": [name for name, _, _ in cases], "iterations": args.iterations, "rows": rows}
    write_json(payload, args.out)
    print(format_table(rows))
    print(f"wrote {args.out}")
    return 0


def evaluate(label: str, bits: int, config: Optional[Config], qdq: Path, packed: Optional[Path],
             timing: Optional[Dict[str, float]], cases, spec, fp32_labels) -> Dict:
    from SlicerPTQLib.int8_compat import as_run_here
    from SlicerPTQLib.metrics import file_size_mb

    # The simulation of what OpenVINO runs on this CPU (adapted below AMX: int8_compat).
    simulated = segment_all(as_run_here(qdq, qdq.parent), "onnxruntime", cases, spec)
    openvino = segment_all(qdq, "openvino", cases, spec)
    # OpenVINO's own reproducibility: the same file on 1 thread against the
    # default; only the order of its float sums changes.
    openvino_one_thread = segment_all(qdq, "openvino", cases, spec, threads=1)
    row = {
        "config": label, "bits": bits, "solver": config.solver if config else "writer",
        "attention": config.attention if config else None, "regularizer": config.regularizer if config else None,
        "dice_vs_reference": {name: brain_dice(openvino[name], ref) for name, _, ref in cases},
        "dice_vs_fp32": {name: brain_dice(openvino[name], fp32_labels[name]) for name, _, _ in cases},
        "simulated_dice_vs_reference": {name: brain_dice(simulated[name], ref) for name, _, ref in cases},
        "openvino_vs_simulated": {name: brain_dice(openvino[name], simulated[name]) for name, _, _ in cases},
        "openvino_vs_openvino_1_thread": {name: brain_dice(openvino[name], openvino_one_thread[name])
                                          for name, _, _ in cases},
        "simulated_vs_noisy_input": noise_floor(qdq, cases, spec, simulated),
        "openvino_conv_precisions": int8_layers(qdq),
        "size_mb": {"onnx": file_size_mb(qdq)},
        "quantize_time": timing,
    }
    if packed is not None:
        row["size_mb"]["packed"] = file_size_mb(packed)
    return with_means(row)


def with_means(row: Dict) -> Dict:
    """``row`` plus ``mean_<key>`` (over the volumes) for each per-volume Dice it holds."""
    for key in MEANS:
        if key in row:
            row[f"mean_{key}"] = float(np.mean(list(row[key].values())))
    return row


def noise_floor(model: Path, cases, spec, clean_labels: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Brain Dice of ONNX Runtime's labels on images with relative noise NOISE vs ``clean_labels``."""
    rng = np.random.default_rng(0)
    noisy = [(name, volume.with_array(volume.array * (1 + NOISE * rng.standard_normal(volume.array.shape))), ref)
             for name, volume, ref in cases]
    labels = segment_all(model, "onnxruntime", noisy, spec)
    return {name: brain_dice(labels[name], clean_labels[name]) for name, _, _ in cases}


def format_table(rows: List[Dict]) -> str:
    header = (f"{'config':<30} {'Dice/ref':>9} {'Dice/FP32':>9} {'OV/sim':>7} {'min OV/sim':>10} {'OV/OV1t':>7} "
              f"{'sim/noisy':>9} {'quant s':>8} {'cpu s':>7} {'onnx MB':>8} {'packed MB':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        timing = row.get("quantize_time") or {}
        agreement = row.get("openvino_vs_simulated") or {}
        lines.append(
            f"{row['config']:<30} {row['mean_dice_vs_reference']:9.4f} "
            f"{row.get('mean_dice_vs_fp32', 1.0):9.4f} {row.get('mean_openvino_vs_simulated', float('nan')):7.4f} "
            f"{min(agreement.values()) if agreement else float('nan'):10.4f} "
            f"{row.get('mean_openvino_vs_openvino_1_thread', float('nan')):7.4f} "
            f"{row.get('mean_simulated_vs_noisy_input', float('nan')):9.4f} "
            f"{timing.get('wall_s', float('nan')):8.1f} {timing.get('cpu_s', float('nan')):7.1f} "
            f"{row['size_mb']['onnx']:8.2f} {row['size_mb'].get('packed', float('nan')):9.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
