"""OpenVINO's own post-training quantizer (NNCF) as the INT8 competitor.

The benchmark feeds NNCF the same FP32 ONNX file and the same calibration
crops SlicerPTQ uses, twice: as its users call it (``nncf.quantize(model,
dataset)``, every setting at NNCF's default: preset "defaults") and with
the settings that suit these networks on the CPU: the "performance" preset
(symmetric int8 activations and weights; the "mixed" preset's asymmetric
activations leave ConvTranspose3d in f32 on OpenVINO) and CPU as the
target device. The result is an OpenVINO IR pair
(``.xml`` + ``.bin``) that ``create_runtime(path, "openvino")`` runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PTQError
from .metrics import file_size_mb


@dataclass
class NNCFResult:
    """Where the NNCF INT8 model went and what it cost."""

    xml: Path
    bin: Path
    seconds: float
    num_crops: int
    preset: str
    ignored_names: Sequence[str] = ()

    @property
    def size_mb(self) -> float:
        """Size of the IR on disk (graph + weights) in MB."""
        return file_size_mb(self.xml, self.bin)


def _batched(crop: np.ndarray) -> np.ndarray:
    """A crop ``(C, D, H, W)`` or ``(1, C, D, H, W)`` as a float32 batch of one."""
    crop = np.asarray(crop, dtype=np.float32)
    if crop.ndim == 4:
        return crop[None]
    if crop.ndim == 5 and crop.shape[0] == 1:
        return crop
    raise PTQError(f"A calibration crop must be (C, D, H, W) or (1, C, D, H, W), got shape {crop.shape}. "
                   "Pass the crops calibration.sample_crops returns.")


def quantize_with_nncf(fp32_onnx: Path, crops: Sequence[np.ndarray], out_xml: Path,
                       preset: str = "performance", fast_bias_correction: bool = True,
                       ignored_names: Sequence[str] = ()) -> NNCFResult:
    """INT8-quantize ``fp32_onnx`` with ``nncf.quantize`` on its OpenVINO model.

    ``preset``: "defaults" calls ``nncf.quantize(model, dataset)`` with
    nothing else set (``ignored_names`` still applies); "performance" and
    "mixed" set that preset, the CPU target and ``fast_bias_correction``.
    ``crops`` are the calibration patches, each ``(C, D, H, W)`` float32
    (already preprocessed, as fed to the network). ``ignored_names``: ONNX
    node names NNCF must leave in float (its ``IgnoredScope``). Writes
    ``out_xml`` and its ``.bin`` atomically. ``seconds`` covers reading the
    model, NNCF's statistics collection and bias correction, and saving.
    """
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise PTQError(f"The NNCF baseline needs the nncf and openvino packages ({exc}). "
                       "Install them with: pip install nncf openvino") from exc
    fp32_onnx, out_xml = Path(fp32_onnx), Path(out_xml)
    if not fp32_onnx.is_file():
        raise PTQError(f"FP32 ONNX model not found: {fp32_onnx}. Quantize with slicer-ptq first; it writes "
                       "model.fp32.onnx beside the INT8 file.")
    if not crops:
        raise PTQError("No calibration crops given to the NNCF baseline. Pass the crops SlicerPTQ calibrated on.")
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED,
               "defaults": None}
    if preset not in presets:
        raise PTQError(f"Unknown NNCF preset '{preset}'. Choose one of: {', '.join(presets)}.")
    batches = [_batched(crop) for crop in crops]

    start = time.perf_counter()
    model = ov.Core().read_model(str(fp32_onnx))
    ignored = nncf.IgnoredScope(names=list(ignored_names)) if ignored_names else None
    if preset == "defaults":
        quantized = nncf.quantize(model, nncf.Dataset(batches), ignored_scope=ignored)
    else:
        quantized = nncf.quantize(model, nncf.Dataset(batches), preset=presets[preset],
                                  target_device=nncf.TargetDevice.CPU, subset_size=len(batches),
                                  fast_bias_correction=fast_bias_correction, ignored_scope=ignored)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".nncf-", dir=out_xml.parent))
    try:
        # compress_to_fp16=False: keep the float parts exactly as in the FP32
        # model, so any accuracy difference comes from NNCF's INT8 choices.
        ov.save_model(quantized, str(staging / out_xml.name), compress_to_fp16=False)
        out_bin = out_xml.with_suffix(".bin")
        os.replace(staging / out_bin.name, out_bin)
        os.replace(staging / out_xml.name, out_xml)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    return NNCFResult(xml=out_xml, bin=out_bin, seconds=seconds, num_crops=len(batches), preset=preset,
                      ignored_names=tuple(ignored_names))
