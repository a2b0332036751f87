"""The backends the benchmark compares, and the model files they run.

Per model: PyTorch eager FP32 (what MONAI users run), ONNX Runtime FP32,
OpenVINO FP32 (precision hint f32 set explicitly), OpenVINO BF16, OpenVINO's
own quantizer NNCF INT8 (same FP32 ONNX, same calibration crops), SlicerPTQ
INT8 for each calibration method, and SlicerPTQ low-bit weights when
``SlicerPTQLib.lowbit`` is there. Two more rows isolate SlicerPTQ's choices:
NNCF told to keep SlicerPTQ's float layers float, and SlicerPTQ with Q/DQ on
norm inputs.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from SlicerPTQLib.metrics import file_size_mb

METHODS = ("max", "percentile", "entropy", "mse")
DEFAULT_METHOD = "max"


@dataclass
class Variant:
    """One backend + model file to measure."""

    key: str
    label: str
    backend: str
    path: str
    precision: Optional[str] = None
    size_mb: Optional[float] = None
    quantize_s: Optional[float] = None
    note: str = ""
    extra: Dict = field(default_factory=dict)


def log(message: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _lowbit_reason() -> str:
    try:
        importlib.import_module("SlicerPTQLib.lowbit")
    except ImportError as exc:
        return f"SlicerPTQLib.lowbit is not importable ({exc})"
    return ""


def build_variants(model: Path, calibration: Sequence[Path], out: Path, methods: Sequence[str], num_crops: int,
                   lowbit: bool, nncf: bool = True, nncf_same_float: bool = True, norm_inputs: bool = True,
                   seed: int = 0, arch: Optional[str] = None, arch_args: Optional[Dict] = None):
    """Quantize with SlicerPTQ (each method, low-bit) and NNCF; returns (variants, spec path, skipped).

    With ``arch``, ``model`` is a state dict of that architecture built with ``arch_args``.
    """
    from SlicerPTQLib.calibration import sample_crops
    from SlicerPTQLib.pipeline import prepared_arrays, quantize

    skipped: List[Dict] = []
    ours: List[Variant] = []
    first = None
    for method in methods:
        log(f"SlicerPTQ INT8 quantization, method {method}, {num_crops} crops")
        start = time.perf_counter()
        result = quantize(model, calibration, out / f"slicerptq_int8_{method}", method=method,
                          num_crops=num_crops, seed=seed, arch=arch, arch_args=arch_args)
        seconds = time.perf_counter() - start
        first = first or result
        ours.append(Variant(f"slicerptq_int8_{method}", f"SlicerPTQ INT8 ({method})", "openvino",
                            str(result.quantized_onnx), size_mb=file_size_mb(result.quantized_onnx), quantize_s=seconds,
                            note="includes the FP32 ONNX export"))
    fp32_onnx = first.fp32_onnx
    variants = [
        Variant("torch_fp32", "PyTorch eager FP32", "torch", str(model), "fp32", file_size_mb(model),
                extra={"arch": arch, "arch_args": arch_args} if arch else {}),
        Variant("onnxruntime_fp32", "ONNX Runtime FP32", "onnxruntime", str(fp32_onnx), "fp32",
                file_size_mb(fp32_onnx)),
        Variant("openvino_fp32", "OpenVINO FP32", "openvino", str(fp32_onnx), "fp32", file_size_mb(fp32_onnx)),
        Variant("openvino_bf16", "OpenVINO BF16", "openvino", str(fp32_onnx), "bf16", file_size_mb(fp32_onnx)),
    ]
    crops = None
    if nncf or nncf_same_float or norm_inputs:
        # Exactly the crops quantize() calibrated on: same volumes, roi, count and seed.
        crops = sample_crops(prepared_arrays(calibration, first.spec), first.spec.roi_size, num_crops, seed)
    if nncf:
        variants.append(_nncf_variant(fp32_onnx, crops, out, preset="defaults"))
        variants.append(_nncf_variant(fp32_onnx, crops, out))
    same_float = float_compute_nodes(Path(ours[0].path)) if nncf_same_float else []
    if same_float:
        # NNCF told to keep float exactly the layers SlicerPTQ kept float: the same
        # choice, so the remaining gap is placement and kernels.
        variants.append(_nncf_variant(fp32_onnx, crops, out, same_float))
    variants += ours
    if norm_inputs:
        variant, reason = _norm_inputs_variant(fp32_onnx, crops, out)
        if variant:
            variants.append(variant)
        else:
            skipped.append({"label": "SlicerPTQ INT8 (max, + Q/DQ on norm inputs)", "reason": reason})
    reason = _lowbit_reason() if lowbit else "not asked for"
    if reason:
        skipped.append({"label": "SlicerPTQ W4A8 (low-bit weights)", "reason": reason})
    else:
        log("SlicerPTQ low-bit quantization, 4-bit weights")
        try:
            start = time.perf_counter()
            result = quantize(model, calibration, out / "slicerptq_w4a8", method=DEFAULT_METHOD,
                              num_crops=num_crops, seed=seed, weight_bits=4, arch=arch, arch_args=arch_args)
            seconds = time.perf_counter() - start
            packed = f"; packed 4-bit weights {file_size_mb(result.packed_weights):.2f} MB" if result.packed_weights else ""
            variants.append(Variant("slicerptq_w4a8", "SlicerPTQ W4A8 (ADMM)", "openvino",
                                    str(result.quantized_onnx), size_mb=file_size_mb(result.quantized_onnx),
                                    quantize_s=seconds, note="4-bit weight grid stored as int8 initializers" + packed))
        except Exception as exc:  # a failing optional variant must not sink the whole benchmark
            skipped.append({"label": "SlicerPTQ W4A8 (low-bit weights)", "reason": f"{type(exc).__name__}: {exc}"})
    return variants, first.quantized_onnx.with_name("model.json"), skipped


def _nncf_variant(fp32_onnx: Path, crops, out: Path, ignored: Sequence[str] = (),
                  preset: str = "performance") -> Variant:
    from SlicerPTQLib.nncf_baseline import quantize_with_nncf

    key = "nncf_int8_same_float" if ignored else ("nncf_int8_defaults" if preset == "defaults" else "nncf_int8")
    log(f"NNCF INT8 quantization ({preset}) on the same {len(crops)} crops"
        + (f", ignoring {list(ignored)}" if ignored else ""))
    result = quantize_with_nncf(fp32_onnx, crops, out / key / "model.int8.xml", preset=preset, ignored_names=ignored)
    if preset == "defaults":
        return Variant(key, "NNCF INT8 (defaults)", "openvino", str(result.xml), size_mb=result.size_mb,
                       quantize_s=result.seconds,
                       note=f"nncf.quantize(model, dataset) as its users call it, {result.num_crops} crops")
    note = f"preset {result.preset}, target CPU, {result.num_crops} crops; from the FP32 ONNX (export not counted)"
    if ignored:
        return Variant(key, "NNCF INT8, SlicerPTQ's float layers ignored", "openvino", str(result.xml),
                       size_mb=result.size_mb, quantize_s=result.seconds,
                       note=f"{note}; IgnoredScope {list(ignored)}")
    return Variant(key, "NNCF INT8 (OpenVINO)", "openvino", str(result.xml), size_mb=result.size_mb,
                   quantize_s=result.seconds, note=note)


COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def float_compute_nodes(quantized_onnx: Path) -> List[str]:
    """Names of the compute nodes a Q/DQ ONNX file leaves in float.

    A node runs in float when its activation or its weight does not come
    out of a DequantizeLinear (e.g. a one-channel stem that reads the image).
    """
    import onnx

    graph = onnx.load(str(quantized_onnx), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    names = []
    for node in graph.node:
        if node.op_type in COMPUTE_OPS and len(node.input) > 1:
            sources = [producers.get(name) for name in node.input[:2]]
            if any(source is None or source.op_type != "DequantizeLinear" for source in sources):
                names.append(node.name)
    return names


NORMS = frozenset({"InstanceNormalization", "BatchNormalization", "GroupNormalization"})
NORM_PLACEMENT = "cpu+norm-inputs"


def _norm_inputs_variant(fp32_onnx: Path, crops, out: Path):
    """An ablation: the "cpu" placement plus Q/DQ on the inputs of norm layers (what NNCF does).

    Then OpenVINO fuses the quantize into the preceding convolution (int8
    output instead of f32) and runs InstanceNorm (MVN) in int8. Returns
    (variant, "") or (None, why not).
    """
    import dataclasses

    from SlicerPTQLib import qdq

    base = qdq.PLACEMENTS["cpu"]
    if NORMS <= base.input_ops:
        return None, "the 'cpu' placement already quantizes norm inputs"
    # Registered in this process only, to measure the proposal beside the shipped placement.
    qdq.PLACEMENTS.setdefault(NORM_PLACEMENT, dataclasses.replace(base, name=NORM_PLACEMENT,
                                                                    input_ops=base.input_ops | NORMS))
    log("ablation: 'cpu' placement + Q/DQ on norm inputs (max)")
    path = out / "slicerptq_int8_norm_inputs" / "model.int8.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    qdq.quantize_onnx(fp32_onnx, path, crops, method=DEFAULT_METHOD, placement=NORM_PLACEMENT)
    seconds = time.perf_counter() - start
    return Variant("slicerptq_int8_norm_inputs", "SlicerPTQ INT8 (max, + Q/DQ on norm inputs)", "openvino",
                   str(path), size_mb=file_size_mb(path), quantize_s=seconds,
                   note="ablation, not the shipped placement; FP32 export not counted"), ""


def default_crops(spec, calibration: Sequence[Path]) -> int:
    """Calibration crops: one per volume when the patch is the whole resized volume, else 20.

    With ``resize == roi_size`` every crop of a volume is the volume itself,
    so 20 crops from 4 volumes are 5 copies of each and give the same
    ranges as 4 (max) or the same histograms up to scale (percentile,
    entropy, mse) at a fifth of the cost.
    """
    if spec.resize is not None and tuple(spec.resize) == tuple(spec.roi_size):
        return len(calibration)
    return 20
