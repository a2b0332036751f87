"""Mixed precision by layer sensitivity: keep the layers INT8 hurts most in float.

1. Collect activation ranges once on the calibration crops.
2. Quantize one layer at a time (every other node kept float) and measure
   the network output against FP32 on the same crops (relative MSE and
   agreement Dice of the argmax labels). The FP32 outputs are computed once.
3. Starting from the fully quantized model, keep the worst layers in float
   (``keep_float``) until a user-set :class:`Budget` is met: 1, 2, 4, 8, ...
   layers, then a bisection between the last failing and first passing
   count, so a model of N layers costs about 2 log2 N evaluations.
   Given whole ``volumes``, the budget is checked on them by sliding window
   (what a user sees: crops can agree where whole volumes do not), while
   the per-layer ranking stays on the cheaper crops.

A "layer" is a Conv, ConvTranspose, MatMul or Gemm with a constant weight
(what runs in INT8 kernels) together with the quantized nodes feeding it
(:func:`layer_groups`); keeping it float removes its weight and input
quantization.

Example::

    result = mixed_precision(Path("m.fp32.onnx"), Path("m.int8.onnx"), crops, Budget("dice", 0.99))
    result.keep_float  # node names left in float, pass to pipeline.quantize(keep_float=...)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import PTQError
from .float_policy import float_policy_nodes
from .progress import ProgressCallback, track

METRICS = ("dice", "mse")
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


@dataclass(frozen=True)
class Budget:
    """The accuracy to keep: ``metric`` "dice" (agreement Dice with FP32 >=
    ``threshold``) or "mse" (output MSE / output energy <= ``threshold``).
    ``min_fraction``: the Dice leaves out classes covering less than this
    fraction of the voxels (see :func:`metrics.mean_dice`); 0 counts all."""

    metric: str = "dice"
    threshold: float = 0.99
    min_fraction: float = 0.0

    def __post_init__(self):
        if self.metric not in METRICS:
            raise PTQError(f"Unknown accuracy metric '{self.metric}'. Choose one of: {', '.join(METRICS)}.")
        if self.metric == "dice" and not 0.0 < self.threshold <= 1.0:
            raise PTQError(f"A Dice budget must lie in (0, 1], got {self.threshold}.")
        if self.metric == "mse" and not self.threshold >= 0.0:
            raise PTQError(f"A relative MSE budget must be >= 0, got {self.threshold}.")

    def met(self, error: "OutputError") -> bool:
        """True when ``error`` is within the budget."""
        if self.metric == "dice":
            return error.dice >= self.threshold
        return error.relative_mse <= self.threshold


@dataclass(frozen=True)
class OutputError:
    """How far a quantized model's outputs are from FP32 over the crops.

    ``relative_mse``: sum of squared differences / sum of squared FP32
    outputs; ``dice``: mean Dice over labels of the label maps (argmax over
    channels; a single channel is thresholded at 0), all crops pooled.
    """

    relative_mse: float
    dice: float


@dataclass
class LayerSensitivity:
    """Error of the model with only this layer quantized.

    ``name``/``op_type``: the weighted node; ``nodes``: it and the quantized
    glue nodes feeding it (see :func:`layer_groups`), kept float together.
    """

    name: str
    op_type: str
    relative_mse: float
    dice: float
    nodes: List[str] = field(default_factory=list)


@dataclass
class SensitivityResult:
    """What :func:`mixed_precision` chose and measured."""

    keep_float: List[str]
    #: layers the sensitivity pass put in float / nodes float by policy (attention scores)
    fallback: List[str]
    policy_float: List[str]
    budget: Budget
    met: bool
    full_int8: OutputError
    final: OutputError
    layers: List[LayerSensitivity]
    evaluations: int
    seconds: float
    quantized_path: str
    backend: str
    report: Dict = field(default_factory=dict)
    #: where the budget was checked: "crops" or whole "volumes"
    checked_on: str = "crops"
    #: layers kept float (worst first) -> error, for every count the search tried
    trials: Dict[int, OutputError] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers_total"] = len(self.layers)
        return data


def output_error(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray],
                 min_fraction: float = 0.0, output_kind: Optional[str] = None) -> OutputError:
    """:class:`OutputError` of ``outputs`` against ``reference``, each ``(B, K, D, H, W)``.

    Dice pools the voxels of all crops (one Dice per label over all of
    them), so a class with a few voxels in one crop does not swing it;
    ``min_fraction`` as in :func:`metrics.mean_dice`. ``output_kind``: the
    model spec's ``output`` or ``label_rule()`` (labels as
    :func:`inference.to_labels` makes them); ``None`` takes argmax, or ``> 0`` for one channel of logits.
    """
    from .metrics import mean_dice

    squared, energy, reference_labels, output_labels = 0.0, 0.0, [], []
    for ref, out in zip(reference, outputs):
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        squared += float(np.sum((out64 - ref64) ** 2))
        energy += float(np.sum(ref64 ** 2))
        for ref_item, out_item in zip(ref, out):
            reference_labels.append(_labels(ref_item, output_kind).ravel())
            output_labels.append(_labels(out_item, output_kind).ravel())
    agreement = mean_dice(np.concatenate(reference_labels), np.concatenate(output_labels),
                          min_fraction=min_fraction)
    return OutputError(relative_mse=squared / max(energy, 1e-30), dice=agreement)


def _labels(output: np.ndarray, output_kind=None) -> np.ndarray:
    """Labels by ``output_kind``: a spec's ``output`` or its ``label_rule`` (kind, threshold, direction)."""
    if output_kind is not None:
        from .inference import to_labels

        rule = (output_kind,) if isinstance(output_kind, str) else tuple(output_kind)
        return to_labels(output, *rule)
    if output.shape[0] == 1:
        return (output[0] > 0).astype(np.uint8)
    return output.argmax(axis=0).astype(np.uint8)


class _Evaluator:
    """Runs FP32 and quantized variants of one model on fixed inputs.

    Inputs are ``(C, D, H, W)`` arrays: crops run as one forward each; with
    ``roi`` they are whole volumes segmented by sliding window.
    """

    def __init__(self, fp32_onnx: Path, inputs: Sequence[np.ndarray], backend: str, threads: Optional[int],
                 workdir: Path, roi: Optional[Sequence[int]] = None, overlap: float = 0.25,
                 min_fraction: float = 0.0, output_kind: Optional[str] = None):
        self.fp32_onnx = fp32_onnx
        self.inputs = [np.asarray(array, dtype=np.float32) for array in inputs]
        self.backend = backend
        self.threads = threads
        self.workdir = workdir
        self.roi = roi
        self.overlap = overlap
        self.min_fraction = min_fraction
        self.output_kind = output_kind
        self.evaluations = 0
        self.reference = self._run(fp32_onnx)

    def _run(self, path: Path) -> List[np.ndarray]:
        from .inference import sliding_window
        from .runtimes import create_runtime

        runtime = create_runtime(path, self.backend, threads=self.threads)
        try:
            if self.roi is None:
                return [runtime.predict(array[None]) for array in self.inputs]
            return [sliding_window(runtime, array, self.roi, overlap=self.overlap)[None] for array in self.inputs]
        finally:
            runtime.close()

    def error(self, quantize: Callable[[Path], object]) -> OutputError:
        """Error of the variant ``quantize(path)`` writes (deleted afterwards)."""
        path = self.workdir / f"variant{self.evaluations}.onnx"
        quantize(path)
        try:
            return self.error_of(path)
        finally:
            path.unlink(missing_ok=True)

    def error_of(self, path: Path) -> OutputError:
        """Error of the quantized model at ``path`` against the FP32 outputs."""
        self.evaluations += 1
        return output_error(self.reference, self._run(path), self.min_fraction, self.output_kind)


def quantized_nodes(int8_onnx: Path) -> List[Tuple[str, str]]:
    """``(name, op type)`` of the nodes reading INT8 (Q/DQ) inputs in a QDQ file, in graph order."""
    from . import onnx_graph

    graph = onnx_graph.load_model(int8_onnx).graph
    dq_outputs = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    return [(node.name, node.op_type) for node in graph.node
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(name in dq_outputs for name in node.input)]


def layer_groups(fp32_onnx: Path, in_int8: Sequence[Tuple[str, str]]) -> Dict[str, Tuple[str, List[str]]]:
    """Split the quantized nodes ``in_int8`` into layers: ``{layer: (op type, nodes)}``.

    A layer is a weighted node (Conv, ConvTranspose, MatMul, Gemm) plus the
    quantized non-weighted nodes (norm outputs, activations, residual Add,
    Concat, pooling) on the way back from its input to the previous weighted
    nodes: their INT8 error reaches the network through that layer, and
    keeping the layer float without them would leave most of its error.
    A node feeding several layers joins the first one in graph order. The
    quantized nodes feeding no weighted layer (e.g. a residual Add that makes
    the network output) form layers of their own, one per chain of such nodes
    joined by tensors: a Q/DQ pair between two of them exists only while both
    are quantized (VISTA3D's class-head LeakyReLU -> Reshape), so one alone
    would measure as harmless however much the pair costs.
    """
    from . import onnx_graph

    graph = onnx_graph.load_model(fp32_onnx).graph
    producers = onnx_graph.producers(graph)
    ops = dict(in_int8)
    weighted = [node for node in graph.node if ops.get(node.name) in LAYER_OPS]
    claimed: set = set()
    groups: Dict[str, Tuple[str, List[str]]] = {}
    for layer in weighted:
        members, stack, seen = [layer.name], list(layer.input), set()
        while stack:
            producer = producers.get(stack.pop())
            if producer is None or producer.name in seen or producer.op_type in LAYER_OPS:
                continue
            seen.add(producer.name)
            if producer.name in ops and producer.name not in claimed:
                members.append(producer.name)
                claimed.add(producer.name)
            stack.extend(producer.input)
        groups[layer.name] = (layer.op_type, members)
    rest = [name for name, op in in_int8 if name and op not in LAYER_OPS and name not in claimed]
    chain_of = {name: name for name in rest}

    def root(name: str) -> str:
        while chain_of[name] != name:
            name = chain_of[name]
        return name

    for node in graph.node:
        if node.name not in chain_of:
            continue
        for tensor in node.input:
            producer = producers.get(tensor)
            if producer is not None and producer.name in chain_of:
                chain_of[root(node.name)] = root(producer.name)
    chains: Dict[str, List[str]] = {}
    for name in rest:  # graph order: a chain is named after its first node
        chains.setdefault(root(name), []).append(name)
    for members in chains.values():
        groups[members[0]] = (ops[members[0]], members)
    return groups


def mixed_precision(fp32_onnx: Path, out_path: Path, crops: Sequence[np.ndarray], budget: Budget = Budget(),
                    method: str = "max", placement: str = "cpu", backend: str = "openvino",
                    threads: Optional[int] = None, analyse_when_met: bool = False,
                    keep_policy_float: bool = True, volumes: Optional[Sequence[np.ndarray]] = None,
                    roi: Optional[Sequence[int]] = None, overlap: float = 0.25,
                    ranges: Optional[Dict[str, float]] = None, keep_float: Sequence[str] = (),
                    output_kind: Optional[str] = None,
                    progress_callback: Optional[ProgressCallback] = None) -> SensitivityResult:
    """Write a QDQ model of ``fp32_onnx`` to ``out_path`` that meets ``budget``.

    ``crops``: calibration patches ``(C, D, H, W)``; they rank the layers,
    give the activation ranges unless ``ranges`` (from
    :func:`calibration.collect_ranges`) are passed, and check the budget
    unless whole ``volumes`` (``(C, D, H, W)``, segmented by sliding window
    of ``roi`` with ``overlap``) are given for that. ``backend``: runtime
    that measures the error: "openvino" (what runs the INT8 model on the
    CPU; 6x faster than ONNX Runtime on VISTA3D's volumes) or "onnxruntime"
    (the reference executor of Q/DQ graphs). ``keep_float``: nodes the
    caller keeps float in every variant. ``output_kind``: the spec's
    ``output``, so labels are the ones segmentation gives (see
    :func:`output_error`). The result lists the per-layer
    sensitivities (worst first) and the node names kept float. When the
    fully quantized model already meets the budget, the per-layer pass is
    skipped (``layers`` stays empty) unless ``analyse_when_met``. With
    ``keep_policy_float`` the :func:`float_policy_nodes` are float in every
    variant too ("fully quantized" means all other nodes).
    """
    from .calibration import collect_ranges
    from .qdq import PLACEMENTS, choose_activation_tensors, quantize_onnx
    from . import onnx_graph

    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if len(crops) == 0:
        raise PTQError("Sensitivity analysis needs calibration crops; pass at least one.")
    if placement not in PLACEMENTS:
        raise PTQError(f"Unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
    if volumes is not None and (len(volumes) == 0 or roi is None):
        raise PTQError("Checking the budget on whole volumes needs at least one volume and the window size "
                       "(roi); pass both, or neither to check it on the crops.")
    started = time.perf_counter()
    model = onnx_graph.load_model(fp32_onnx)
    named = [node.name for node in model.graph.node if node.name]
    policy_float = float_policy_nodes(fp32_onnx) if keep_policy_float else []
    always_float = frozenset(policy_float) | frozenset(keep_float)
    if ranges is None:
        tensors = choose_activation_tensors(model, PLACEMENTS[placement], always_float)
        ranges = collect_ranges(fp32_onnx, tensors, crops, method)
    del model

    def quantizer(float_names) -> Callable[[Path], object]:
        return lambda path: quantize_onnx(fp32_onnx, path, ranges, placement=placement,
                                          keep_float=always_float | frozenset(float_names))

    workdir = Path(tempfile.mkdtemp(prefix="ptq-sensitivity-"))
    try:
        ranking = _Evaluator(fp32_onnx, crops, backend, threads, workdir, min_fraction=budget.min_fraction,
                             output_kind=output_kind)
        checking = ranking if volumes is None else _Evaluator(fp32_onnx, volumes, backend, threads, workdir,
                                                              roi=roi, overlap=overlap,
                                                              min_fraction=budget.min_fraction,
                                                              output_kind=output_kind)
        full_path = workdir / "full.int8.onnx"
        quantizer(())(full_path)
        full_error = checking.error_of(full_path)
        groups = layer_groups(fp32_onnx, quantized_nodes(full_path))
        if budget.met(full_error) and not analyse_when_met:
            groups = {}

        sensitivities = []
        for name, (op, members) in track(list(groups.items()), "layer sensitivity", callback=progress_callback):
            member_set = set(members)
            error = ranking.error(quantizer([other for other in named if other not in member_set]))
            sensitivities.append(LayerSensitivity(name, op, error.relative_mse, error.dice, members))
        sensitivities.sort(key=lambda item: (-item.relative_mse, item.dice))

        def float_nodes(count: int) -> List[str]:
            return [node for item in sensitivities[:count] for node in item.nodes]

        errors: Dict[int, OutputError] = {0: full_error}

        def error_with(count: int) -> OutputError:
            if count not in errors:
                errors[count] = checking.error(quantizer(float_nodes(count)))
            return errors[count]

        chosen = _smallest_passing(budget, error_with, len(sensitivities))
        fallback = [] if chosen is None else float_nodes(chosen)
        report = quantize_onnx(fp32_onnx, out_path, ranges, placement=placement,
                               keep_float=always_float | frozenset(fallback))
        final = errors[chosen] if chosen is not None else errors[max(errors)]
        evaluations = ranking.evaluations + (checking.evaluations if checking is not ranking else 0)
        return SensitivityResult(keep_float=sorted(always_float) + fallback, fallback=fallback,
                                 policy_float=policy_float, budget=budget, met=chosen is not None,
                                 full_int8=full_error, final=final, layers=sensitivities, evaluations=evaluations,
                                 seconds=time.perf_counter() - started, quantized_path=str(out_path),
                                 backend=backend, report=report.to_dict(),
                                 checked_on="volumes" if volumes is not None else "crops",
                                 trials=dict(sorted(errors.items())))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _smallest_passing(budget: Budget, error_with: Callable[[int], OutputError],
                      layer_count: int) -> Optional[int]:
    """Smallest count of worst layers kept float that meets ``budget`` (None: none does)."""
    if budget.met(error_with(0)):
        return 0
    failing, count = 0, 1
    while count < layer_count and not budget.met(error_with(count)):
        failing, count = count, count * 2
    if count >= layer_count:
        count = layer_count
        if not budget.met(error_with(count)):
            return None
    passing = count
    while passing - failing > 1:
        middle = (passing + failing) // 2
        if budget.met(error_with(middle)):
            passing = middle
        else:
            failing = middle
    return passing
