"""``--method auto``: the calibration method chosen per network from its own calibration data.

No fixed method suits every network: ``max`` keeps a GroupNorm + Mish
network's outliers and doubles its logit error, ``percentile`` clips a
ReLU U-Net's useful tail. So every method's ranges are fitted on most of
the crops (one histogram per tensor serves all of them, see
:class:`calibration.RangeCollector`), a Q/DQ model is written with each,
and each runs (ONNX Runtime, CPU) on the crops held back. The method with
the smallest relative RMSE of the outputs against FP32 there wins (``max``,
the default, winning exact ties). The output error, not the label Dice,
decides: on a few crops Dice hangs on a handful of boundary voxels (on
bench_methods.py's networks choosing by held-out Dice picked the worst
method twice), while the error over every output value ranked the methods
as the whole-volume agreement did. Each method's Dice on the held-back
crops is recorded too. The held-back crops then join the winner's
statistics, so the final ranges see every crop.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import onnx_graph
from .calibration import MEMORY_BUDGET, RangeCollector
from .errors import PTQError
from .progress import ProgressCallback

#: The methods tried, in order of preference when they do equally well.
CANDIDATES = ("max", "percentile", "mse", "entropy")
#: Share of the crops held back to judge the methods (at least one when there are two or more).
HELD_OUT_FRACTION = 0.25


@dataclass
class MethodChoice:
    """What ``auto`` chose and why, as ``quantization.json`` records it."""

    chosen: str
    reason: str
    fit_crops: int
    held_out_crops: int
    agreement: Dict[str, float] = field(default_factory=dict)
    relative_rmse: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"requested": "auto", **asdict(self)}


def choose_method(fp32_onnx: Path, tensors: Sequence[str], crops: Sequence[np.ndarray], placement: str = "cpu",
                  keep_float: Iterable[str] = (), label_rule=None,
                  progress_callback: Optional[ProgressCallback] = None,
                  memory_budget: int = MEMORY_BUDGET) -> Tuple[MethodChoice, Dict[str, float]]:
    """Pick the method for ``fp32_onnx`` from ``crops``; returns the choice and its ranges over all crops.

    ``label_rule`` is the spec's :meth:`ModelSpec.label_rule` (how outputs
    become labels for the agreement).
    """
    from .qdq import quantize_onnx
    from .sensitivity import output_error

    if len(crops) == 0:
        raise PTQError("No calibration crops to choose a method from; pass --calib with one or more volumes.")
    held = max(1, int(round(len(crops) * HELD_OUT_FRACTION))) if len(crops) >= 2 else 0
    fit, judge = (list(crops[:-held]), list(crops[-held:])) if held else (list(crops), list(crops))
    collector = RangeCollector(fp32_onnx, tensors, CANDIDATES, memory_budget)
    collector.feed(fit, progress_callback)
    reference = _outputs(fp32_onnx, judge)
    agreement, error = {}, {}
    with tempfile.TemporaryDirectory(prefix="ptq-auto-") as folder:
        for method in CANDIDATES:
            candidate = Path(folder) / f"{method}.onnx"
            quantize_onnx(fp32_onnx, candidate, collector.ranges(method), method=method, placement=placement,
                          keep_float=keep_float)
            measured = output_error(reference, _outputs(candidate, judge), output_kind=label_rule)
            agreement[method] = float(measured.dice)
            error[method] = float(np.sqrt(measured.relative_mse))
            candidate.unlink()
    chosen = min(CANDIDATES, key=lambda method: (error[method], CANDIDATES.index(method)))
    where = f"{held} held-back crop(s)" if held else "the single calibration crop (none could be held back)"
    reason = (f"smallest output error against FP32 on {where}: relative RMSE {error[chosen]:.4f} "
              f"(Dice {agreement[chosen]:.4f})")
    if held:
        collector.feed(judge, progress_callback)  # the final ranges see every crop
    return (MethodChoice(chosen=chosen, reason=reason, fit_crops=len(fit), held_out_crops=held,
                         agreement=agreement, relative_rmse=error), collector.ranges(chosen))


def _outputs(onnx_path: Path, crops: Sequence[np.ndarray]) -> List[np.ndarray]:
    """The first output of ``onnx_path`` on each crop, ``(1, K, D, H, W)`` each."""
    session = onnx_graph.cpu_session(onnx_path, memory_arena=False)
    name = session.get_inputs()[0].name
    return [session.run(None, {name: np.asarray(crop, dtype=np.float32)[None]})[0] for crop in crops]
