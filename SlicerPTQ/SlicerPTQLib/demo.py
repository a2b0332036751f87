"""The README's main job: quantize the shipped real model and measure it.

Shipped default: deepbet's brain-extraction LinkNet3d (TorchScript) and
real T1 volumes, fetched from PyPI/Debian archives pinned by SHA-256.
Calibration volumes and evaluation volumes are disjoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from .evaluation import evaluate_models, format_table, write_json
from .metrics import file_size_mb
from .progress import ProgressCallback

LATENCY_BACKENDS = (
    ("PyTorch eager FP32", "fp32_source", "torch", None),
    ("OpenVINO FP32", "fp32_onnx", "openvino", "fp32"),
    ("OpenVINO INT8", "quantized_onnx", "openvino", None),
)


def measure_patch_latency(models: Dict[str, Path], patch_shape, repeats: int = 5,
                          threads: Optional[int] = None) -> List[Dict]:
    """Median/p90 forward time of one patch for each backend in LATENCY_BACKENDS."""
    from .metrics import time_forward
    from .runtimes import create_runtime

    rows = []
    for label, key, backend, precision in LATENCY_BACKENDS:
        runtime = create_runtime(models[key], backend, precision=precision, threads=threads)
        try:
            timing = time_forward(runtime, patch_shape, warmup=2, repeats=repeats)
            layers = runtime.layer_precisions()
        finally:
            runtime.close()
        row = {"backend": label, "median_s": timing["median_s"], "p90_s": timing["p90_s"]}
        if layers:
            from .runtimes.openvino_runtime import int8_summary

            row["int8_layers"] = int8_summary(layers)
        rows.append(row)
    return rows


#: The shipped model's calibration method: chosen per machine from the calibration volumes. On an AMD EPYC
#: (AVX2, no VNNI) it picks 'percentile', which agrees with FP32 at least as well as NNCF with defaults on
#: every evaluation volume, where 'max' and 'mse' fall short on some (README, "On other CPUs").
DEMO_METHOD = "auto"


def run_demo(out_dir: Path, method: str = DEMO_METHOD, num_crops: int = 20, repeats: int = 5,
             progress: Optional[ProgressCallback] = None) -> Dict:
    """Fetch, quantize, evaluate; print the table and write ``demo.json``."""
    from . import shipped
    from .cpu_info import cpu_summary
    from .pipeline import describe_self_check, quantize
    from .progress import text_lines_callback

    progress = progress or text_lines_callback()
    _say("fetching the shipped model and volumes (pinned archives from PyPI/Debian; the first run downloads "
         "them, later runs use ~/.cache/slicer-ptq) ...")
    model = shipped.shipped_model()
    calibration = shipped.calibration_volumes()
    cases = shipped.evaluation_volumes()
    _say(f"model: {model.name}; calibrating on {len(calibration)} unlabeled volume(s): "
         f"{', '.join(p.name for p in calibration)}")
    _say(f"exporting FP32 ONNX, calibrating on {num_crops} crops, writing INT8 and self-checking it "
         "(a minute or two) ...")
    result = quantize(model, calibration, Path(out_dir), method=method, num_crops=num_crops, progress=progress)
    models = {"fp32_source": model, "fp32_onnx": result.fp32_onnx, "quantized_onnx": result.quantized_onnx}
    _say(f"timing one patch on {len(LATENCY_BACKENDS)} backends, {repeats} forwards each ...")
    latency = measure_patch_latency(models, (1, result.spec.in_channels, *result.spec.roi_size), repeats)
    _say(f"segmenting {len(cases)} evaluation volume(s) with FP32 and INT8 ...")
    rows = evaluate_models(model, result.quantized_onnx, [c[1] for c in cases],
                           [shipped.reference_mask(c[2]) for c in cases], names=[c[0] for c in cases],
                           progress=progress)
    sizes = result.report["size_mb"]
    summary = {
        "cpu": cpu_summary(),
        "model": str(model),
        "models": {key: str(path) for key, path in models.items()},
        "self_check": describe_self_check(result.report["self_check"]),
        "calibration": [str(p) for p in calibration],
        "settings": result.report["settings"],
        "calibration_method": result.report["calibration_method"],
        "size_mb": {"torchscript": file_size_mb(model), **sizes},
        "size_ratio_int8_vs_fp32_onnx": sizes["quantized_onnx"] / sizes["fp32_onnx"],
        "patch_latency": latency,
        "volumes": rows,
    }
    write_json(summary, Path(out_dir) / "demo.json")
    print(render(summary))
    return summary


def _say(text: str) -> None:
    """A step of the demo, shown at once (it runs for minutes)."""
    print(text, flush=True)


def render(summary: Dict) -> str:
    """The demo's human-readable tables, INT8 against the same runtime's FP32 first."""
    sizes = summary["size_mb"]
    seconds = {row["backend"]: row["median_s"] for row in summary["patch_latency"]}
    latency_rows = [{**{k: v for k, v in r.items() if k != "int8_layers"},
                     "x OpenVINO FP32": seconds["OpenVINO FP32"] / r["median_s"],
                     "x PyTorch FP32": seconds["PyTorch eager FP32"] / r["median_s"],
                     "INT8 layers": (f"{r['int8_layers']['conv_int8']}/{r['int8_layers']['conv_total']} conv"
                                     if "int8_layers" in r else "")}
                    for r in summary["patch_latency"]]
    gain = seconds["OpenVINO FP32"] / seconds["OpenVINO INT8"]
    verdict = (f"INT8 runs {gain:.2f}x OpenVINO FP32's speed per patch on this CPU."
               if gain >= 1.0 else
               f"INT8 is NOT faster than OpenVINO FP32 on this CPU ({gain:.2f}x): here the FP32 model "
               f"({Path(summary['models']['fp32_onnx']).name}) is the faster pick at FP32's accuracy.")
    return "\n\n".join([
        f"CPU: {summary['cpu']['description']}",
        f"Calibration method: {summary['calibration_method']['chosen']} "
        f"({summary['calibration_method']['reason']})",
        f"Size: FP32 ONNX {sizes['fp32_onnx']:.2f} MB -> INT8 ONNX {sizes['quantized_onnx']:.2f} MB "
        f"({summary['size_ratio_int8_vs_fp32_onnx']:.2f}x)",
        "Per-patch latency\n" + format_table(latency_rows),
        verdict,
        "Self-check on the calibration volumes\n" + summary["self_check"],
        "Per volume (whole-volume wall time, Dice)\n" + format_table(summary["volumes"]),
    ])
