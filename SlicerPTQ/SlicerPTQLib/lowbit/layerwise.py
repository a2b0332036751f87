"""Layer-wise low-bit weight quantization of an FP32 ONNX network.

Walks the weighted layers in execution order. For each one, its input
comes from the network as it will be deployed up to that point (earlier
layers on their solved grids, activations through their Q/DQ), its target
is the FP32 network's output of the same layer, and its weights are solved
on the low-bit grid against that target (ADMM, or round-to-nearest as the
baseline), weighting voxels by the self-adaptive attention map.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..calibration import collect_ranges
from ..errors import PTQError
from ..progress import ProgressCallback, track
from ..qdq import PLACEMENTS, choose_activation_tensors, quantized_readers
from .admm import solve_admm, solve_rtn
from .attention import pool_to, voxel_weights
from .features import LayerMatrix
from .graph import Layer, boundary_layers, find_layers, insert_fake_quant, node_label
from .grid import fit_scale, level_limit
from .result import LayerReport, LowBitResult
from .runner import IncrementalRunner

SOLVERS = ("admm", "rtn")


def quantize_weights(fp32_onnx: Path, sample: np.ndarray, weight_bits: int, solver: str = "admm",
                     activation_ranges: Optional[Dict[str, float]] = None, attention: bool = True,
                     regularizer: bool = True, keep_first_last_8bit: bool = True, iterations: int = 200,
                     progress_callback: Optional[ProgressCallback] = None, *, placement: str = "cpu",
                     keep_float: Iterable[str] = frozenset(), activation_bits: int = 8,
                     device: Optional[str] = None) -> LowBitResult:
    """Low-bit weights for every Conv/ConvTranspose/Gemm/MatMul of ``fp32_onnx``.

    ``sample``: one preprocessed calibration input (C, *spatial) float32
    (center-cropped or zero-padded when the model's input shape is fixed).
    Activations get the Q/DQ pairs the QDQ writer puts with ``placement``
    and ``keep_float``, with ``activation_ranges`` ({tensor: amax}, as
    given to the writer) or, when None, ``max |x|`` of the FP32 network on
    ``sample``. ``activation_bits`` other than 8 are simulated only (INT8
    kernels run 8-bit activations). First and last layers stay 8-bit with
    ``keep_first_last_8bit``; nodes in ``keep_float`` are left alone.

    Example::

        result = quantize_weights(Path("model.fp32.onnx"), crop, 4)
        quantize_onnx(fp32, out, ranges, weight_quant=result.weight_quant)
    """
    started = time.perf_counter()
    _check_arguments(solver, weight_bits, activation_bits, iterations, placement)
    keep_float = frozenset(keep_float)
    model = _load(Path(fp32_onnx))
    layers, notes = find_layers(model)
    skipped = [layer.name for layer in layers if layer.node_name in keep_float]
    layers = [layer for layer in layers if layer.node_name not in keep_float]
    notes += [f"{name}: kept float (keep_float)." for name in skipped]
    if not layers:
        raise PTQError(f"{fp32_onnx} has no Conv, ConvTranspose, Gemm or MatMul with constant float32 "
                       "weights to quantize (or all are in keep_float). Give the FP32 ONNX export.")
    boundary = boundary_layers(model, layers) if keep_first_last_8bit else set()
    feeds = _feeds(model, sample, fp32_onnx)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    if activation_ranges is None:
        tensors = choose_activation_tensors(model, PLACEMENTS[placement], keep_float)
        activation_ranges = collect_ranges(Path(fp32_onnx), tensors, list(next(iter(feeds.values()))), "max")
    targets = _activation_targets(model, activation_ranges, keep_float, placement)
    simulated, quantizers = insert_fake_quant(model, targets, activation_bits)
    deployed = IncrementalRunner(simulated, feeds)
    limit = 2 ** (activation_bits - 1) - 1
    for tensor, amax in activation_ranges.items():
        deployed.set_initializer(quantizers[tensor].scale, np.array(max(float(amax), 1e-8) / limit, np.float32))
    fp32 = IncrementalRunner(model, feeds)
    voxel_map = _attention_map(model, feeds, torch_device) if attention else None

    weight_quant: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    reports: List[LayerReport] = []
    initializers = {t.name: t for t in model.graph.initializer}
    for layer in track(layers, "low-bit weights", callback=progress_callback):
        layer_started = time.perf_counter()
        bits = 8 if layer.name in boundary else weight_bits
        reads_quantized = layer.name in targets.get(layer.input, ())
        (x,) = deployed.compute([quantizers[layer.input].output if reads_quantized else layer.input])
        (y,) = fp32.compute([layer.output])
        weight = numpy_helper.to_array(initializers[layer.weight]).astype(np.float32)
        q, scales, rtn_error, solved_error, note = _solve_layer(
            layer, weight, x, y, voxel_map, bits, solver, iterations, regularizer, torch_device)
        weight_quant[layer.weight] = (q, scales)
        deployed.set_initializer(layer.weight, _dequantize(q, scales, layer.out_axis))
        reports.append(LayerReport(name=layer.name, op_type=layer.op_type, weight=layer.weight, bits=bits,
                                   axis=layer.out_axis, rtn_error=rtn_error, admm_error=solved_error,
                                   seconds=time.perf_counter() - layer_started, note=note))
    settings = {"attention": attention, "regularizer": regularizer, "keep_first_last_8bit": keep_first_last_8bit,
                "iterations": iterations, "placement": placement, "device": str(torch_device),
                "activation_tensors": len(activation_ranges)}
    return LowBitResult(weight_quant=weight_quant, layers=reports, seconds=time.perf_counter() - started,
                        weight_bits=weight_bits, activation_bits=activation_bits, solver=solver,
                        settings=settings, notes=notes)


def _check_arguments(solver: str, weight_bits: int, activation_bits: int, iterations: int, placement: str) -> None:
    if solver not in SOLVERS:
        raise PTQError(f"Unknown low-bit solver {solver!r}; choose one of {', '.join(SOLVERS)}.")
    level_limit(weight_bits)
    if not 2 <= activation_bits <= 8:
        raise PTQError(f"Activation bits must be between 2 and 8, got {activation_bits}.")
    if iterations < 1:
        raise PTQError(f"The solver needs at least one iteration, got {iterations}.")
    if placement not in PLACEMENTS:
        raise PTQError(f"Unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")


def _load(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises several types for unreadable files
        raise PTQError(f"Cannot read the FP32 ONNX model {path}: {exc}. Export it again "
                       "(slicer-ptq quantize writes model.fp32.onnx).") from exc
    for node in model.graph.node:
        node.name = node_label(node)  # readers are matched by name; exporters may leave some unnamed
    return model


def _feeds(model: onnx.ModelProto, sample: np.ndarray, path: Path) -> Dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise PTQError(f"{path} has {len(inputs)} inputs; the low-bit solver handles single-input networks.")
    sample = np.asarray(sample, dtype=np.float32)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if sample.ndim != len(dims) - 1:
        raise PTQError(f"The calibration sample has shape {sample.shape} but {path} takes "
                       f"{len(dims)}-D input (N, C, ...); give one preprocessed sample (C, ...).")
    if dims[1] is not None and sample.shape[0] != dims[1]:
        raise PTQError(f"The calibration sample has {sample.shape[0]} channel(s); {path} takes {dims[1]}.")
    return {inputs[0].name: _fit_shape(sample, dims[2:])[None]}


def _fit_shape(sample: np.ndarray, spatial: List[Optional[int]]) -> np.ndarray:
    """Center-crop or zero-pad ``sample`` (C, *S) to the model's fixed spatial sizes."""
    for axis, size in enumerate(spatial, start=1):
        current = sample.shape[axis]
        if size is None or size == current:
            continue
        if current > size:
            start = (current - size) // 2
            sample = np.take(sample, range(start, start + size), axis=axis)
        else:
            before = (size - current) // 2
            widths = [(0, 0)] * sample.ndim
            widths[axis] = (before, size - current - before)
            sample = np.pad(sample, widths)
    return np.ascontiguousarray(sample)


def _attention_map(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], device: torch.device):
    """Voxel weights (N, *S) from the FP32 prediction, or None for non-spatial outputs."""
    (prediction,) = IncrementalRunner(model, feeds).compute([model.graph.output[0].name])
    if prediction.ndim < 3:
        return None
    return torch.from_numpy(voxel_weights(prediction)).to(device)


def _activation_targets(model: onnx.ModelProto, ranges: Dict[str, float], keep_float: FrozenSet[str],
                        placement: str) -> Dict[str, Set[str]]:
    """Tensor -> nodes that read its Q/DQ copy: the QDQ writer's own rule (``qdq.quantized_readers``)."""
    known = {name for node in model.graph.node for name in node.output} | {i.name for i in model.graph.input}
    unknown = sorted(set(ranges) - known)
    if unknown:
        raise PTQError(f"Activation ranges name tensors that are not in the model: {unknown[:5]}. "
                       "Calibrate the ranges on this same FP32 ONNX file.")
    labels = {node.name: node_label(node) for node in model.graph.node}
    readers = quantized_readers(model, PLACEMENTS[placement], ranges, keep_float)
    return {tensor: {labels.get(name, name) for name in names} for tensor, names in readers.items()}


def _dequantize(q: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scales.reshape(shape)


def _solve_layer(layer: Layer, weight: np.ndarray, x: np.ndarray, y: np.ndarray, voxel_map, bits: int,
                 solver: str, iterations: int, regularizer: bool, device: torch.device):
    """(q int8, scales float32, rtn MSE, solver MSE, note) for one layer."""
    matrix = LayerMatrix(layer)
    rows = torch.from_numpy(matrix.to_rows(weight).astype(np.float32)).to(device)
    if layer.op_type == "ConvTranspose" and layer.groups > 1:
        # Per-channel scales along axis 1 span several groups: quantize those rows directly.
        scale, q = fit_scale(rows, bits)
        return (_int8(matrix.from_rows(q.cpu().numpy())), scale.cpu().numpy().astype(np.float32),
                None, None, "grouped ConvTranspose: round-to-nearest")
    weights = None
    if voxel_map is not None and matrix.spatial and voxel_map.ndim - 1 == matrix.spatial:
        weights = pool_to(voxel_map, y.shape[2:])
    equations = matrix.equations(x, y, weights, device)
    gain = torch.as_tensor(layer.gain, dtype=torch.float32, device=device)
    gain = torch.where(gain == 0, torch.ones_like(gain), gain)
    q_rows = torch.zeros_like(rows)
    scales = torch.zeros(rows.shape[0], dtype=torch.float32, device=device)
    rtn_total = solved_total = normaliser = 0.0
    for group, eq in enumerate(equations):
        part = matrix.group_rows(group)
        effective = rows[part] * gain[part, None]
        rtn = solve_rtn(eq, effective, bits)
        solution = rtn if solver == "rtn" else solve_admm(eq, effective, bits, rtn, iterations, regularizer)
        q_rows[part] = solution.q * torch.sign(gain[part])[:, None]
        scales[part] = solution.scale / gain[part].abs()
        rtn_total += rtn.error
        solved_total += solution.error
        normaliser += eq.weight_sum * (part.stop - part.start)
    q = _int8(matrix.from_rows(q_rows.cpu().numpy()))
    rtn_mse = rtn_total / max(normaliser, 1e-30)
    solved_mse = None if solver == "rtn" else solved_total / max(normaliser, 1e-30)
    return q, scales.cpu().numpy().astype(np.float32), rtn_mse, solved_mse, ""


def _int8(values: np.ndarray) -> np.ndarray:
    return np.rint(values).astype(np.int8)
