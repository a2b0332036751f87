"""Low-bit (2-8 bit) weights that run on INT8 kernels: EfficientQ-style layer-wise ADMM.

Files, one concern each: ``grid`` (symmetric grids with a zero, scale
fitting), ``attention`` (self-adaptive voxel weights), ``graph`` (layers of
the ONNX graph, BN folding, simulated activation Q/DQ), ``runner``
(incremental onnxruntime execution), ``features`` (im2col and normal
equations), ``admm`` (the per-layer solvers), ``layerwise`` (the walk over
the network), ``result`` and ``packing`` (the packed weight file).
"""

from .layerwise import SOLVERS, quantize_weights
from .packing import PackedWeights, load_packed, read_packed, save_packed
from .result import LayerReport, LowBitResult

__all__ = ["SOLVERS", "quantize_weights", "LowBitResult", "LayerReport", "save_packed", "load_packed",
           "read_packed", "PackedWeights"]
