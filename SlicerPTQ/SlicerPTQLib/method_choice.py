"""``--method auto``: the calibration method chosen per network from its own calibration data.

No fixed method suits every network: ``max`` keeps a GroupNorm + Mish
network's outliers and doubles its logit error, ``percentile`` clips a
ReLU U-Net's useful tail. So the crops are split in two halves; every
method's ranges are fitted on one half (one histogram per tensor serves
all of them, see :class:`calibration.RangeCollector`), a Q/DQ model is
written with each, and each runs (OpenVINO INT8, CPU) on the other half;
then the halves swap, so every crop judges once while held back from the
ranges it judges. The labels decide first: the Dice with FP32's pooled
over all held-back voxels, per class, averaged over the classes covering
at least 0.1% of them (so a class a network predicts in a handful of
voxels cannot swing it), as the benchmark measures agreement. Methods
within ``DICE_TIE`` of the best Dice count as equal, and among them the
smallest relative RMSE of the outputs wins (then ``max``, the default).

Crops can rank methods otherwise than whole volumes do (on the benchmark,
benchmarks/measured/methods-amd-epyc-avx2.md: UNesT's held-back crops put
``max`` first, its whole volumes last by 0.03 Dice, while the output error
alone lost up to 0.002 on TransUNet and a random DynUNet). So, given the
calibration volumes, the crops only shortlist: every method within
``SHORTLIST_BAND`` of the best crop Dice is built with ranges from all
crops and segments the whole calibration volumes by sliding window in
OpenVINO, as ``segment`` would, and the best mean Dice with FP32's labels
there wins. Methods a few 0.001 apart can still rank otherwise on other
volumes (TransUNet: mse first on its calibration volumes, 0.0017 below max
on the held-out ones). The final ranges of the winner see every crop.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from . import onnx_graph
from .calibration import MEMORY_BUDGET, RangeCollector
from .errors import PTQError
from .progress import ProgressCallback

#: The methods tried, in order of preference when they do equally well.
CANDIDATES = ("max", "percentile", "mse", "entropy")
#: Classes covering less of the held-back voxels than this leave the agreement (metrics.mean_dice's min_fraction).
MIN_FRACTION = 1e-3
#: Held-back Dice gaps below this are noise (they did not carry over to whole volumes): the output error decides.
DICE_TIE = 5e-4
#: Methods this close to the best held-back Dice go on to the whole calibration volumes (entropy, when it
#: clips a network's tails, is 0.03-0.2 below and stays out).
SHORTLIST_BAND = 0.02


@dataclass
class MethodChoice:
    """What ``auto`` chose and why, as ``quantization.json`` records it."""

    chosen: str
    reason: str
    fit_crops: int
    held_out_crops: int
    agreement: Dict[str, float] = field(default_factory=dict)
    relative_rmse: Dict[str, float] = field(default_factory=dict)
    #: mean Dice with FP32 on the whole calibration volumes, per shortlisted method (empty: crops decided)
    volume_agreement: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"requested": "auto", **asdict(self)}


def choose_method(fp32_onnx: Path, tensors: Sequence[str], crops: Sequence[np.ndarray], placement: str = "cpu",
                  keep_float: Iterable[str] = (), label_rule=None,
                  progress_callback: Optional[ProgressCallback] = None,
                  memory_budget: int = MEMORY_BUDGET, volumes: Sequence[np.ndarray] = (),
                  roi=None, overlap: float = 0.25) -> Tuple[MethodChoice, Dict[str, float]]:
    """Pick the method for ``fp32_onnx`` from ``crops``; returns the choice and its ranges over all crops.

    ``label_rule`` is the spec's :meth:`ModelSpec.label_rule` (how outputs
    become labels for the recorded agreement). ``volumes`` (``(C, D, H, W)``
    calibration volumes, windows of ``roi`` with ``overlap``) decide among
    the shortlisted methods.
    """
    if len(crops) == 0:
        raise PTQError("No calibration crops to choose a method from; pass --calib with one or more volumes.")
    halves = [list(crops[0::2]), list(crops[1::2])] if len(crops) >= 2 else [list(crops)]
    scores = {method: _Score(label_rule) for method in CANDIDATES}
    reference = onnx_graph.cpu_session(fp32_onnx, memory_arena=False)
    for fold, fit in enumerate(halves):
        judge = halves[1 - fold] if len(halves) == 2 else fit
        collector = RangeCollector(fp32_onnx, tensors, CANDIDATES, memory_budget)
        collector.feed(fit, progress_callback)
        _judge(fp32_onnx, collector, judge, reference, scores, placement, keep_float)
    error = {method: scores[method].relative_rmse() for method in CANDIDATES}
    agreement = {method: scores[method].dice(MIN_FRACTION) for method in CANDIDATES}
    best = max(agreement.values())
    where = (f"{len(crops)} crops, each held back from the ranges it judged" if len(halves) == 2
             else "the single calibration crop (none could be held back)")
    shortlist = [method for method in CANDIDATES if agreement[method] >= best - SHORTLIST_BAND]
    on_volumes = len(volumes) > 0 and len(shortlist) > 1
    if not on_volumes:
        tied = [method for method in CANDIDATES if agreement[method] >= best - DICE_TIE]
        chosen = min(tied, key=lambda method: (error[method], CANDIDATES.index(method)))
        reason = (f"best label agreement with FP32 on {where}: Dice {agreement[chosen]:.4f}, and of the "
                  f"{len(tied)} method(s) within {DICE_TIE} of the best Dice the smallest output error "
                  f"(relative RMSE {error[chosen]:.4f})")
    final = collector  # with one crop: fitted on it already
    if len(halves) == 2 or on_volumes:
        # Ranges from every crop at once, as --method NAME would give them (a histogram fed in two
        # halves can have grown and merged bins).
        final = RangeCollector(fp32_onnx, tensors, shortlist if on_volumes else [chosen], memory_budget)
        final.feed(crops, progress_callback)
    volume_agreement: Dict[str, float] = {}
    if on_volumes:
        volume_agreement = _judge_volumes(fp32_onnx, final, shortlist, volumes, roi, overlap, placement,
                                          keep_float, label_rule, progress_callback)
        chosen = max(shortlist, key=lambda method: (volume_agreement[method], -CANDIDATES.index(method)))
        reason = (f"best label agreement with FP32 on the {len(volumes)} whole calibration volume(s): Dice "
                  f"{volume_agreement[chosen]:.4f}, among the {len(shortlist)} method(s) within "
                  f"{SHORTLIST_BAND} of the best Dice on {where}")
    return (MethodChoice(chosen=chosen, reason=reason, fit_crops=len(halves[0]),
                         held_out_crops=len(halves[1]) if len(halves) == 2 else 0,
                         agreement=agreement, relative_rmse=error, volume_agreement=volume_agreement),
            final.ranges(chosen))


def _judge_volumes(fp32_onnx: Path, collector: RangeCollector, methods: Sequence[str], volumes, roi,
                   overlap: float, placement: str, keep_float, label_rule,
                   progress_callback: Optional[ProgressCallback] = None) -> Dict[str, float]:
    """Mean label Dice with FP32 over whole ``volumes`` (sliding window, OpenVINO) per method."""
    from .inference import sliding_window
    from .metrics import mean_dice
    from .qdq import quantize_onnx
    from .runtimes import create_runtime

    def labels_of(model: Path, precision: str):
        runtime = create_runtime(model, "openvino", precision=precision)
        try:  # labels only: whole-volume outputs can be hundreds of MB each
            return [_labels(sliding_window(runtime, np.asarray(volume, np.float32), roi, overlap=overlap),
                            label_rule) for volume in volumes]
        finally:
            runtime.close()

    stage = "auto: methods on the whole calibration volumes"
    reference = labels_of(fp32_onnx, "fp32")
    dice = {}
    with tempfile.TemporaryDirectory(prefix="ptq-auto-") as folder:
        for done, method in enumerate(methods):
            if progress_callback:
                progress_callback(stage, done, len(methods))
            candidate = Path(folder) / f"{method}.onnx"
            quantize_onnx(fp32_onnx, candidate, collector.ranges(method), method=method, placement=placement,
                          keep_float=keep_float)
            dice[method] = float(np.mean([mean_dice(expected, got, min_fraction=MIN_FRACTION)
                                          for expected, got in zip(reference, labels_of(candidate, "int8"))]))
    if progress_callback:
        progress_callback(stage, len(methods), len(methods))
    return dice


def _judge(fp32_onnx: Path, collector: RangeCollector, judge: Sequence[np.ndarray], reference, scores,
           placement: str, keep_float) -> None:
    """Each method's Q/DQ model (ranges from ``collector``) against FP32 on the ``judge`` crops, into ``scores``."""
    from .qdq import quantize_onnx
    from .runtimes import create_runtime

    with tempfile.TemporaryDirectory(prefix="ptq-auto-") as folder:
        engines = {}
        try:
            for method in CANDIDATES:
                candidate = Path(folder) / f"{method}.onnx"
                quantize_onnx(fp32_onnx, candidate, collector.ranges(method), method=method, placement=placement,
                              keep_float=keep_float)
                # Judged where the INT8 model will run: OpenVINO's INT8 kernels (ONNX Runtime's
                # differ, and ranked the methods otherwise than OpenVINO did on whole volumes).
                engines[method] = create_runtime(candidate, "openvino")
            name = reference.get_inputs()[0].name
            # One crop's outputs at a time: whole-volume networks give hundreds of MB per output.
            for crop in judge:
                batch = np.asarray(crop, dtype=np.float32)[None]
                expected = reference.run(None, {name: batch})[0][0]
                for method, engine in engines.items():
                    scores[method].add(expected, engine.predict(batch)[0])
        finally:
            for engine in engines.values():
                engine.close()


class _Score:
    """Agreement of one method's outputs with FP32 over all crops: relative RMSE and pooled label Dice.

    The relative squared error is averaged per crop, so one crop with an
    extreme value (whose clipping every method pays for) cannot drown the
    differences on all the others.
    """

    def __init__(self, label_rule) -> None:
        self.label_rule = label_rule
        self.relative_mse = []
        self.counts: Dict[int, np.ndarray] = {}  # label -> [both, reference, candidate] voxel counts
        self.voxels = 0

    def add(self, expected: np.ndarray, got: np.ndarray) -> None:
        expected64, got64 = expected.astype(np.float64), got.astype(np.float64)
        self.relative_mse.append(float(np.sum((got64 - expected64) ** 2)) / max(float(np.sum(expected64 ** 2)), 1e-30))
        ref_labels, out_labels = _labels(expected, self.label_rule), _labels(got, self.label_rule)
        self.voxels += ref_labels.size
        for label in set(np.unique(ref_labels).tolist()) | set(np.unique(out_labels).tolist()):
            if label == 0:
                continue
            in_ref, in_out = ref_labels == label, out_labels == label
            counts = self.counts.setdefault(int(label), np.zeros(3))
            counts += [np.count_nonzero(in_ref & in_out), np.count_nonzero(in_ref), np.count_nonzero(in_out)]

    def relative_rmse(self) -> float:
        return float(np.sqrt(np.mean(self.relative_mse)))

    def dice(self, min_fraction: float = 0.0) -> float:
        """Mean pooled Dice over the classes either labelling covers in at least ``min_fraction`` of the voxels."""
        scores = [2 * both / (ref + out) for both, ref, out in self.counts.values()
                  if ref + out > 0 and max(ref, out) >= min_fraction * self.voxels]
        return float(np.mean(scores)) if scores else 1.0


def _labels(output: np.ndarray, label_rule) -> np.ndarray:
    """Labels of one output ``(K, D, H, W)`` as the spec makes them (argmax, or > 0 for one channel, without one)."""
    from .inference import to_labels

    if label_rule is not None:
        return to_labels(output, *label_rule)
    return (output[0] > 0).astype(np.uint8) if output.shape[0] == 1 else output.argmax(axis=0).astype(np.uint8)
