"""What the low-bit solver hands back: INT8-grid weights and a per-layer table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass
class LayerReport:
    """One layer's outcome; errors are weighted output MSE on the calibration sample.

    ``rtn_error``: round-to-nearest (MSE-fitted scales) on the quantized
    prefix's input; ``admm_error``: the solver's (None for ``solver="rtn"``).
    """

    name: str
    op_type: str
    weight: str
    bits: int
    axis: int
    rtn_error: Optional[float]
    admm_error: Optional[float]
    seconds: float
    note: str = ""


@dataclass
class LowBitResult:
    """Low-bit weights ready for the QDQ writer.

    ``weight_quant`` maps a weight initializer to ``(q, scales)``: ``q``
    int8 of the weight's shape holding only values of the layer's grid
    (|q| <= 2**(bits-1) - 1), ``scales`` float32 per output channel along
    the layer's ``axis`` (0 Conv, 1 ConvTranspose / MatMul / Gemm without
    transB); the weight is ``q * scales``.
    """

    weight_quant: Dict[str, Tuple[np.ndarray, np.ndarray]]
    layers: List[LayerReport]
    seconds: float
    weight_bits: int
    activation_bits: int
    solver: str
    settings: Dict[str, object] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def bits(self) -> Dict[str, int]:
        """Weight initializer -> its grid's bit width."""
        return {layer.weight: layer.bits for layer in self.layers}

    @property
    def axes(self) -> Dict[str, int]:
        """Weight initializer -> axis of its per-channel scales."""
        return {layer.weight: layer.axis for layer in self.layers}

    def summary(self) -> Dict[str, object]:
        """A JSON-ready report (settings, time, per-layer table, notes)."""
        return {
            "solver": self.solver,
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "activations": "int8 Q/DQ" if self.activation_bits == 8
            else f"{self.activation_bits}-bit simulated only (INT8 kernels run 8-bit activations)",
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
            "layers": [asdict(layer) for layer in self.layers],
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """The per-layer table as aligned text."""
        lines = [f"{'layer':<44} {'op':<13} {'bits':>4} {'rtn_mse':>11} {'solver_mse':>11} {'s':>6}"]
        for layer in self.layers:
            solved = "" if layer.admm_error is None else f"{layer.admm_error:11.4g}"
            rtn = "" if layer.rtn_error is None else f"{layer.rtn_error:11.4g}"
            lines.append(f"{layer.name[-44:]:<44} {layer.op_type:<13} {layer.bits:>4} {rtn:>11} {solved:>11} "
                         f"{layer.seconds:6.1f}" + (f"  ({layer.note})" if layer.note else ""))
        return "\n".join(lines)
