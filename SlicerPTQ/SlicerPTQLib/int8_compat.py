"""The form of a Q/DQ INT8 graph that runs right on the CPU at hand.

The quantized file is one portable artifact; this module adapts it when
OpenVINO loads it. Measured with OpenVINO 2026.4 on an AMX Xeon with
oneDNN capped by ``ONEDNN_MAX_CPU_ISA`` (``Testing/test_int8_compat.py``
keeps the cases), and matching what an AMD EPYC (AVX2) gave:

- Everywhere but AMX, OpenVINO shifts signed int8 activations to u8 for
  its kernels, and a signed activation that reaches a Conv through a
  Concat then loses its scale: the Conv sees it rounded to whole float
  units (relative error ~0.13-0.19 on a Concat -> Conv, correlation 0.96
  with FP32 on a small Concat U-Net; held-out U-Nets gave empty masks).
  Written as uint8 with zero point 128 (``q_u8 = q_s8 + 128``: the same
  grid, so nothing changes numerically) the pair runs right.
- Without VNNI (AVX2: AMD Zen 2/3, Intel before Ice Lake) int8 products
  go through ``vpmaddubsw``: u8 activations x s8 weights, input channels
  2k and 2k+1 at the same tap summed into int16 with saturation (probed on
  an AMD EPYC for Conv, grouped Conv, ConvTranspose and MatMul: taps and
  other channels never pair). A pair overflows once its same-sign weights
  add up to more than 128, so a channel whose pairs do is scaled down just
  enough (:func:`_requantize_weight`), rounded so that each convolution
  kernel keeps its sum (:func:`_kernel_sum_rounding`). Weights read
  otherwise go to 7 bits, safe for any pairing. There a ConvTranspose also
  reads its input in float: OpenVINO's int8 one is no faster than f32.

:func:`adapted_model` is that rewrite; ONNX Runtime on its output is the
reference for what OpenVINO computes (:func:`as_run_here`). ONNX Runtime's
own int8 MatMul sums the same pairs in int16 without VNNI (measured), so
its runtime fits those weights the same way (:data:`ONNXRUNTIME_PAIR_SUMMING_OPS`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

#: Largest same-sign weight sum of a u8 x s8 pair that fits int16: 255 * 128 = 32640 <= 32767.
SAFE_PAIR_SUM = 128
#: Largest weight magnitude safe whatever the pairing: 2 * 255 * 63 < 32767.
SAFE_WEIGHT_MAX = 63
#: Readers whose int8 activations keep their signed form (see :func:`adapted_model`).
_SIGNED_READERS = frozenset({"ConvTranspose", "InstanceNormalization"})
#: ``/proc/cpuinfo`` flags by int8 level: 2 = AMX (s8 x s8 tiles), 1 = VNNI (u8 x s8 into int32).
_FLAG_LEVELS = (("amx_int8", 2), ("avx512_vnni", 1), ("avx_vnni", 1))
#: ``ONEDNN_MAX_CPU_ISA`` values that hold oneDNN below AMX (1) or below VNNI (0).
_CAP_LEVELS = {"SSE41": 0, "AVX": 0, "AVX2": 0, "AVX512_CORE": 0, "AVX512_MIC": 0, "AVX512_MIC_4OPS": 0,
               "AVX2_VNNI": 1, "AVX2_VNNI_2": 1, "AVX512_CORE_VNNI": 1, "AVX512_CORE_BF16": 1,
               "AVX512_CORE_FP16": 1, "AVX10_1_512": 1, "AVX10_2_512": 1}


@dataclass(frozen=True)
class Int8Path:
    """How this CPU runs int8 products, and what :func:`adapted_model` must change for it.

    ``shift_activations``: OpenVINO turns signed activations into u8 here
    (everything but AMX), so the file's int8 pairs are written as uint8 with
    zero point 128 themselves. ``pair_safe_weights``: products are summed
    in int16 pairs (no VNNI), so no pair's same-sign weights exceed
    :data:`SAFE_PAIR_SUM`.
    """

    shift_activations: bool
    pair_safe_weights: bool
    reason: str

    @property
    def name(self) -> str:
        """The int8 instruction set in effect, in words."""
        if not self.shift_activations:
            return "AMX INT8"
        return "VNNI" if not self.pair_safe_weights else "AVX2 without VNNI (int16 pair sums)"

    @property
    def float_deconvolution_inputs(self) -> bool:
        """OpenVINO's int8 transposed convolution is slower than its f32 one here (AVX2 without VNNI:
        deepbet's 16 -> 8 one 33 vs 28 ms, and one over IC^2 x voxels > 2^26 runs f32 anyway after an
        f32 FakeQuantize), so ConvTranspose reads its input in float: 4-5% less CPU time per patch."""
        return self.pair_safe_weights

    @property
    def needs_adaptation(self) -> bool:
        return self.shift_activations or self.pair_safe_weights


def int8_path(isa_flags, environ: Optional[Dict[str, str]] = None) -> Int8Path:
    """Decide from the CPU's ISA flags and oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``).

    Unknown flags (no /proc/cpuinfo) count as the lowest level: the fully
    adapted graph is right on every CPU, only slightly coarser in its weights.
    """
    environ = os.environ if environ is None else environ
    present = [(flag, level) for flag, level in _FLAG_LEVELS if flag in set(isa_flags)]
    flag, level = present[0] if present else ("", 0)
    cap = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if _CAP_LEVELS.get(cap, 2) < level:
        level, why = _CAP_LEVELS[cap], f"ONEDNN_MAX_CPU_ISA={cap} hides {flag}"
    elif flag:
        why = f"int8 via {flag}"
    else:
        why = "this CPU has no VNNI/AMX" if isa_flags else "this CPU's instruction sets are unknown"
    return Int8Path(shift_activations=level < 2, pair_safe_weights=level < 1, reason=why)


def adapted_model(model, shift_activations: bool = True, pair_safe_weights: bool = True,
                  weight_readers: Optional[frozenset] = None,
                  float_deconvolution_inputs: bool = False) -> Tuple[object, Dict[str, int]]:
    """Rewrite an ONNX Q/DQ model in place for a CPU's :class:`Int8Path`.

    ``shift_activations``: activation pairs with an int8 zero point of 0 get
    a uint8 zero point of 128 (same grid), except those only ConvTranspose or
    InstanceNormalization nodes read. ``pair_safe_weights``: int8 weight initializers read by a
    DequantizeLinear are requantized per channel where a pair of them could
    overflow int16 (:func:`_requantize_weight`), only those ``weight_readers``
    (op types) read where given. ``float_deconvolution_inputs``: activation
    pairs only ConvTranspose nodes read are taken out, so they read the float
    tensor (:attr:`Int8Path.float_deconvolution_inputs`) and keep their full weight grid. Returns the model and
    ``{"activation_pairs", "weights_requantized", "float_deconvolution_inputs"}``.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    constant_inputs = set(initializers)
    uint8_zero_points: Dict[str, str] = {}
    activation_pairs = weights_requantized = 0

    def shifted_zero_point(name: str) -> Optional[str]:
        """The uint8-128 twin of a scalar int8 zero-point initializer of 0."""
        tensor = initializers.get(name)
        if tensor is None:
            return None
        value = numpy_helper.to_array(tensor)
        if value.dtype != np.int8 or value.size != 1 or value.item() != 0:
            return None
        if name not in uint8_zero_points:
            twin = f"{name}_uint8_128"
            graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), twin))
            uint8_zero_points[name] = twin
        return uint8_zero_points[name]

    # Pairs read only by ConvTranspose stay int8 (unless taken out): OpenVINO runs a transposed
    # convolution over uint8 with a zero point in f32 (measured, AVX2 and AMX),
    # and pair-safe weights alone keep it exact there. Pairs read only by
    # InstanceNormalization stay int8 too: signed, OpenVINO fuses the quantize
    # into the producer and runs MVN on int8 (as for NNCF's models); shifted,
    # the FakeQuantize stays a separate f32 op before an f32 MVN (AVX2, measured).
    readers: Dict[str, set] = {}
    readers_of: Dict[str, list] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, set()).add(node.op_type)
            readers_of.setdefault(name, []).append((node, position))
    dequantized_by = {node.input[0]: node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}

    quantized_outputs = {}
    float_inputs = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) != 3 or node.input[0] in constant_inputs:
            continue
        read_by = readers.get(dequantized_by.get(node.output[0]), set())
        if float_deconvolution_inputs and read_by == {"ConvTranspose"} and len(readers_of[node.output[0]]) == 1:
            float_inputs.append(node)
        elif shift_activations:
            if read_by and read_by <= _SIGNED_READERS:
                continue
            twin = shifted_zero_point(node.input[2])
            if twin:
                node.input[2] = twin
                quantized_outputs[node.output[0]] = twin
                activation_pairs += 1
    released = set(uint8_zero_points)
    float_readers = set()
    for quantize in float_inputs:
        dequantize = next(node for node, _ in readers_of[quantize.output[0]])
        for reader, position in readers_of[dequantize.output[0]]:
            reader.input[position] = quantize.input[0]
            float_readers.add(id(reader))
        released.update(quantize.input[1:])
        released.update(dequantize.input[1:])
        graph.node.remove(quantize)
        graph.node.remove(dequantize)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        if node.input[0] in quantized_outputs:
            node.input[2] = quantized_outputs[node.input[0]]
        elif (pair_safe_weights and node.input[0] in initializers
              and (weight_readers is None or readers.get(node.output[0], {""}) <= weight_readers)
              # A convolution over a float input runs in f32: its weights need no pair room.
              and not all(id(reader) in float_readers for reader, _ in readers_of.get(node.output[0], []))):
            pair_axis = _pair_axis(readers_of.get(node.output[0], []), initializers[node.input[0]])
            weights_requantized += _requantize_weight(node, initializers, pair_axis)
    # Drop the int8 zero points and the scales of taken-out pairs that nothing reads any more
    # (ONNX Runtime warns on each).
    read = {name for node in graph.node for name in node.input}
    unread = [tensor for tensor in graph.initializer if tensor.name in released and tensor.name not in read]
    for tensor in unread:
        graph.initializer.remove(tensor)
    return model, {"activation_pairs": activation_pairs, "weights_requantized": weights_requantized,
                   "float_deconvolution_inputs": len(float_inputs)}


def _pair_axis(readers, weight) -> Optional[int]:
    """The weight axis whose channels 2k and 2k+1 the AVX2 kernels sum as a pair; None if unknown.

    Conv pairs input channels within a group (axis 1), ConvTranspose
    (ungrouped) its input channels (axis 0), MatMul with a 2-D weight
    as its second input the reduced axis (axis 0).
    """
    axes = set()
    for node, position in readers:
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        if node.op_type == "Conv" and position == 1:
            axes.add(1)
        elif node.op_type == "ConvTranspose" and position == 1 and group == 1:
            axes.add(0)
        elif node.op_type == "MatMul" and position == 1 and len(weight.dims) == 2:
            axes.add(0)
        else:
            return None
    return axes.pop() if len(axes) == 1 else None


def _pair_peaks(q: np.ndarray, pair_axis: int) -> np.ndarray:
    """Each pair's larger same-sign weight sum, the pair axis halved (odd lengths padded with 0)."""
    values = np.moveaxis(q.astype(np.int32), pair_axis, 0)
    if values.shape[0] % 2:
        values = np.concatenate([values, np.zeros_like(values[:1])])
    pairs = values.reshape(values.shape[0] // 2, 2, *values.shape[1:])
    peaks = np.maximum(np.clip(pairs, 0, None).sum(axis=1), np.clip(-pairs, 0, None).sum(axis=1))
    return np.moveaxis(peaks, 0, pair_axis)


def _requantize_weight(node, initializers, pair_axis: Optional[int]) -> int:
    """Scale down the channels of an int8 weight whose int16 pair sums could saturate; 1 if any.

    With a known ``pair_axis`` a channel's step grows by its largest pair
    sum / (SAFE_PAIR_SUM - 1): each tap then moves by less than one step
    when rounded, so the pair sums stay <= SAFE_PAIR_SUM (on the AVX2 EPYC,
    UNesT's channels grow by 1.6x on average instead of 2x, and its OpenVINO
    agreement with FP32 on the ITK T1 rose from 0.9057 with 7-bit weights to
    0.9595). Otherwise channels go to ``|q| <= SAFE_WEIGHT_MAX``.
    """
    from onnx import numpy_helper

    q_tensor, scale_tensor = initializers[node.input[0]], initializers.get(node.input[1])
    q = numpy_helper.to_array(q_tensor)
    if q.dtype != np.int8 or scale_tensor is None:
        return 0
    peaks, limit, target = np.abs(q.astype(np.int32)), SAFE_WEIGHT_MAX, SAFE_WEIGHT_MAX
    if pair_axis is not None:
        peaks, limit, target = _pair_peaks(q, pair_axis), SAFE_PAIR_SUM, SAFE_PAIR_SUM - 1
    if peaks.max() <= limit:
        return 0
    scale = numpy_helper.to_array(scale_tensor).astype(np.float32)
    axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 1) % q.ndim
    # Per-channel peak, shaped to broadcast along the scale's axis.
    reduce_axes = tuple(i for i in range(q.ndim) if i != axis) if scale.size > 1 else None
    peak = peaks.max(axis=reduce_axes, keepdims=True)
    factor = np.where(peak > limit, peak / target, 1.0)   # 1 where the channel already fits
    new_q = _kernel_sum_rounding(q / factor)
    if pair_axis is None:
        new_q = np.clip(new_q, -SAFE_WEIGHT_MAX, SAFE_WEIGHT_MAX)
    new_q = new_q.astype(np.int8)
    new_scale = (scale * factor.reshape(scale.shape)).astype(np.float32)
    q_tensor.CopyFrom(numpy_helper.from_array(new_q, q_tensor.name))
    scale_tensor.CopyFrom(numpy_helper.from_array(new_scale, scale_tensor.name))
    return 1


def _kernel_sum_rounding(values: np.ndarray) -> np.ndarray:
    """Round to integers, keeping each convolution kernel's sum as close as rounding allows.

    A kernel is one (output, input) channel pair's spatial taps (the first
    two axes of a Conv or ConvTranspose weight). Medical images and their
    feature maps are smooth, so a kernel's sum, its response to a locally
    constant input, carries most of its output; rounding each tap to the
    nearest step lets those errors add up. Here each tap goes to its
    floor or ceiling, and the kernel's sum goes to the nearest integer of
    the exact sum, the taps with the largest fractions rounded up (on the
    AVX2 EPYC: DynUNet's OpenVINO agreement with FP32 0.9568 -> 0.9631 on
    the ITK T1). Weights with fewer than three axes (MatMul, Gemm) are
    rounded to nearest.
    """
    if values.ndim < 3:
        return np.round(values)
    kernels = values.reshape(values.shape[0], values.shape[1], -1)
    floor = np.floor(kernels)
    fraction = kernels - floor
    rounded_up = np.round(kernels.sum(axis=-1, keepdims=True)) - floor.sum(axis=-1, keepdims=True)
    # Rank of each tap's fraction within its kernel, largest first.
    rank = np.argsort(np.argsort(-fraction, axis=-1, kind="stable"), axis=-1, kind="stable")
    return (floor + (rank < rounded_up)).reshape(values.shape)


#: ONNX Runtime's int8 kernels that sum u8 x s8 pairs in int16 without VNNI (measured on the AVX2
#: EPYC: its MatMul saturates as OpenVINO's does; its Conv computes exactly).
ONNXRUNTIME_PAIR_SUMMING_OPS = frozenset({"MatMul"})


def path_here(adapt: Optional[bool] = None) -> Int8Path:
    """This CPU's :class:`Int8Path`; ``adapt`` True/False forces full/no adaptation."""
    from .cpu_info import isa_flags

    if adapt is None:
        return int8_path(isa_flags())
    return Int8Path(adapt, adapt, "asked for" if adapt else "turned off")


def as_run_here(qdq_file, out_dir, adapt: Optional[bool] = None):
    """The Q/DQ file OpenVINO really runs on this CPU, for reference executors.

    Returns ``qdq_file`` itself when no adaptation applies, else the adapted
    graph written to ``out_dir``: ONNX Runtime on it is what OpenVINO's INT8
    output must match here. ``adapt`` as in :func:`path_here`.
    """
    from pathlib import Path

    import onnx

    from .onnx_graph import load_model

    qdq_file = Path(qdq_file)
    path = path_here(adapt)
    if not path.needs_adaptation:
        return qdq_file
    model, _ = adapted_model(load_model(qdq_file), path.shift_activations, path.pair_safe_weights,
                             float_deconvolution_inputs=path.float_deconvolution_inputs)
    out = Path(out_dir) / f"{qdq_file.stem}.as-run-here.onnx"
    onnx.save(model, str(out))
    return out
