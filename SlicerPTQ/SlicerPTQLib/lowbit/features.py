"""A layer as ``Y = W X`` per group, and its weighted normal equations.

For convolutions ``X`` holds the input patches (im2col): built a slab of
output rows at a time with ``Tensor.unfold`` and reduced straight into
``X D X^T`` and ``Y D X^T``, so the full patch matrix never exists. A
transposed convolution is the stride-1 convolution of the zero-inserted,
re-padded input with the flipped, transposed kernel. Gemm/MatMul rows are
the input vectors. Column order matches ``weight.reshape(C_out, -1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .graph import Layer

# Floats per patch slab (64 MB): bounds memory whatever the layer size.
_SLAB_FLOATS = 1 << 24


@dataclass
class NormalEquations:
    """Weighted least-squares statistics of one group of output channels.

    With per-voxel weights ``d`` (voxels ``v``), patches ``x_v`` (P,) and
    targets ``y_v`` (C,) (the fixed bias already subtracted): ``gram`` =
    sum d x x^T (P, P) float64 when there are at least P voxels, otherwise
    ``factor`` = [sqrt(d_v) x_v] (P, n) float32 (gram = factor factor^T,
    cheaper when n < P); ``cross`` = sum d y x^T (C, P); ``target_energy``
    = sum d y^2 (C,).
    """

    gram: Optional[torch.Tensor]
    factor: Optional[torch.Tensor]
    cross: torch.Tensor
    target_energy: torch.Tensor
    weight_sum: float
    voxels: int
    target_std: float

    def weighted_error(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_v d_v ||W x_v - y_v||^2 per output channel (C,) for ``weights`` (C, P)."""
        w = weights.to(self.cross.dtype)
        if self.gram is not None:
            quadratic = ((w @ self.gram) * w).sum(dim=1)
        else:
            quadratic = ((weights.to(self.factor.dtype) @ self.factor).double() ** 2).sum(dim=1)
        return (quadratic - 2.0 * (w * self.cross).sum(dim=1) + self.target_energy).clamp_min(0.0)


class _Accumulator:
    def __init__(self, patch_size: int, channels: int, voxels: int, device: torch.device):
        self.low_rank = voxels < patch_size
        self.gram = None if self.low_rank else torch.zeros(patch_size, patch_size, dtype=torch.float64, device=device)
        self.columns: List[torch.Tensor] = []
        self.cross = torch.zeros(channels, patch_size, dtype=torch.float64, device=device)
        self.energy = torch.zeros(channels, dtype=torch.float64, device=device)
        self.weight_sum = 0.0
        self.count = 0
        self.y_sum = 0.0
        self.y_square = 0.0
        self.channels = channels

    def add(self, patches: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> None:
        """``patches`` (P, n), ``targets`` (C, n), ``weights`` (n,)."""
        weighted = patches * weights
        if self.low_rank:
            self.columns.append(patches * weights.sqrt())
        else:
            self.gram += (weighted @ patches.T).double()
        self.cross += (targets @ weighted.T).double()
        self.energy += (targets * targets * weights).sum(dim=1).double()
        self.weight_sum += float(weights.sum())
        self.count += patches.shape[1]
        self.y_sum += float(targets.sum(dtype=torch.float64))
        self.y_square += float((targets.double() ** 2).sum())

    def result(self) -> NormalEquations:
        n = self.count * self.channels
        mean = self.y_sum / n
        std = max(self.y_square / n - mean * mean, 0.0) ** 0.5
        factor = torch.cat(self.columns, dim=1) if self.low_rank else None
        return NormalEquations(gram=self.gram, factor=factor, cross=self.cross, target_energy=self.energy,
                               weight_sum=self.weight_sum, voxels=self.count, target_std=std)


class LayerMatrix:
    """Weight layout and input patches of one layer, per group of output channels."""

    def __init__(self, layer: Layer):
        self.layer = layer
        self.op = layer.op_type
        self.spatial = len(layer.weight_shape) - 2 if self.op in ("Conv", "ConvTranspose") else 0
        self.groups = layer.groups if self.spatial else 1

    # Weight layout ---------------------------------------------------------------------------
    def to_rows(self, weight: np.ndarray) -> np.ndarray:
        """The initializer as (C_out, P) rows, one per output channel (no gain applied)."""
        if self.op == "Conv":
            return weight.reshape(weight.shape[0], -1)
        if self.op == "ConvTranspose":
            flipped = np.flip(weight, axis=tuple(range(2, weight.ndim)))
            return np.ascontiguousarray(np.swapaxes(flipped, 0, 1)).reshape(weight.shape[1], -1)
        return weight if self.layer.out_axis == 0 else np.ascontiguousarray(weight.T)

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_rows`: (C_out, P) back to the initializer's shape."""
        shape = self.layer.weight_shape
        if self.op == "Conv":
            return rows.reshape(shape)
        if self.op == "ConvTranspose":
            conv = rows.reshape((shape[1], shape[0]) + tuple(shape[2:]))
            return np.ascontiguousarray(np.flip(np.swapaxes(conv, 0, 1), axis=tuple(range(2, len(shape)))))
        return rows if self.layer.out_axis == 0 else np.ascontiguousarray(rows.T)

    def group_rows(self, group: int) -> slice:
        size = self.layer.out_channels // self.groups
        return slice(group * size, (group + 1) * size)

    # Normal equations ------------------------------------------------------------------------
    def equations(self, x: np.ndarray, y: np.ndarray, weights: Optional[torch.Tensor],
                  device: torch.device) -> List[NormalEquations]:
        """Per group: statistics of the layer's input ``x`` against target ``y``.

        ``x``: the layer's input (N, C_in, *S_in) or (..., K); ``y``: the
        target tensor (N, C_out, *S_out) or (..., C_out); ``weights``:
        voxel weights (N, *S_out) or None (all ones).
        """
        x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(device)
        if self.spatial:
            return self._conv_equations(x_t, y_t, weights, device)
        return [self._linear_equations(x_t, y_t, device)]

    def _bias(self, rows: slice, device: torch.device) -> Optional[torch.Tensor]:
        if self.layer.bias is None:
            return None
        return torch.as_tensor(self.layer.bias[rows], dtype=torch.float32, device=device)

    def _linear_equations(self, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> NormalEquations:
        attributes = self.layer.attributes
        if self.op == "Gemm" and int(attributes.get("transA", 0)):
            x = x.T
        inputs = x.reshape(-1, x.shape[-1])
        targets = y.reshape(-1, y.shape[-1])
        bias = self._bias(slice(None), device)
        if bias is not None:
            targets = targets - bias
        accumulator = _Accumulator(inputs.shape[1], targets.shape[1], inputs.shape[0], device)
        step = max(1, _SLAB_FLOATS // max(inputs.shape[1], 1))
        ones = torch.ones(min(step, inputs.shape[0]), device=device)
        for start in range(0, inputs.shape[0], step):
            chunk = inputs[start:start + step].T
            accumulator.add(chunk, targets[start:start + step].T, ones[:chunk.shape[1]])
        return accumulator.result()

    def conv_geometry(self, in_shape: Sequence[int], out_shape: Sequence[int]) -> Tuple[list, list, list, list]:
        """(kernel, dilations, pads begin, pads end) of the equivalent stride-1-input convolution."""
        attributes = self.layer.attributes
        n = self.spatial
        kernel = list(self.layer.weight_shape[2:])
        strides = list(attributes.get("strides", [1] * n))
        dilations = list(attributes.get("dilations", [1] * n))
        auto_pad = attributes.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        pads = list(attributes.get("pads", [0] * (2 * n)))
        begin, end = pads[:n], pads[n:]
        if self.op == "Conv":
            if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                totals = [max((o - 1) * s + (k - 1) * d + 1 - i, 0)
                          for i, o, s, k, d in zip(in_shape, out_shape, strides, kernel, dilations)]
                begin, end = _split(totals, auto_pad)
            elif auto_pad == "VALID":
                begin, end = [0] * n, [0] * n
            return kernel, dilations, begin, end
        output_padding = list(attributes.get("output_padding", [0] * n))
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") or "output_shape" in attributes:
            totals = [s * (i - 1) + op + (k - 1) * d + 1 - o for i, o, s, k, d, op
                      in zip(in_shape, out_shape, strides, kernel, dilations, output_padding)]
            begin, end = _split(totals, "SAME_LOWER" if auto_pad == "SAME_LOWER" else "SAME_UPPER")
        # Transposed conv == conv over the zero-inserted input padded by d(k-1) - pad.
        reach = [(k - 1) * d for k, d in zip(kernel, dilations)]
        return (kernel, dilations, [r - b for r, b in zip(reach, begin)],
                [r - e + op for r, e, op in zip(reach, end, output_padding)])

    def _conv_equations(self, x: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor],
                        device: torch.device) -> List[NormalEquations]:
        n = self.spatial
        in_spatial, out_spatial = list(x.shape[2:]), list(y.shape[2:])
        kernel, dilations, begin, end = self.conv_geometry(in_spatial, out_spatial)
        strides = list(self.layer.attributes.get("strides", [1] * n))
        if self.op == "ConvTranspose":
            x = _zero_insert(x, strides)
            strides = [1] * n
        # F.pad takes (last-dim begin, last-dim end, ...); negative values crop.
        x = F.pad(x, [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)])
        check = [(size - (k - 1) * d - 1) // s + 1 for size, k, d, s in zip(x.shape[2:], kernel, dilations, strides)]
        if check != out_spatial:
            raise ValueError(f"patch grid {check} does not match the output {out_spatial}")
        in_per_group = x.shape[1] // self.groups
        patch_size = in_per_group * prod(kernel)
        voxels = y.shape[0] * prod(out_spatial)
        if weights is None:
            weights = torch.ones((y.shape[0],) + tuple(out_spatial), device=device)
        row_voxels = prod(out_spatial[1:])
        step = max(1, _SLAB_FLOATS // max(patch_size * row_voxels, 1))
        results = []
        for group in range(self.groups):
            rows = self.group_rows(group)
            bias = self._bias(rows, device)
            accumulator = _Accumulator(patch_size, rows.stop - rows.start, voxels, device)
            for sample in range(x.shape[0]):
                source = x[sample, group * in_per_group:(group + 1) * in_per_group]
                target = y[sample, rows]
                if bias is not None:
                    target = target - bias.view((-1,) + (1,) * n)
                for start in range(0, out_spatial[0], step):
                    stop = min(start + step, out_spatial[0])
                    patches = _patches(source, start, stop, kernel, strides, dilations)
                    accumulator.add(patches, target[:, start:stop].reshape(target.shape[0], -1),
                                    weights[sample, start:stop].reshape(-1))
            results.append(accumulator.result())
        return results


def _split(totals: List[int], mode: str) -> Tuple[List[int], List[int]]:
    small = [t // 2 for t in totals]
    large = [t - t // 2 for t in totals]
    return (small, large) if mode == "SAME_UPPER" else (large, small)


def _zero_insert(x: torch.Tensor, strides: List[int]) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *((S - 1) * stride + 1)) with zeros between the input voxels."""
    if all(s == 1 for s in strides):
        return x
    shape = list(x.shape[:2]) + [(size - 1) * s + 1 for size, s in zip(x.shape[2:], strides)]
    spread = x.new_zeros(shape)
    spread[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = x
    return spread


def _patches(source: torch.Tensor, start: int, stop: int, kernel: List[int], strides: List[int],
             dilations: List[int]) -> torch.Tensor:
    """Patch columns (C * prod(kernel), n) of output rows [start, stop) of a conv over ``source`` (C, *S)."""
    n = len(kernel)
    span0 = (kernel[0] - 1) * dilations[0] + 1
    slab = source[:, start * strides[0]:(stop - 1) * strides[0] + span0]
    for axis, (k, s, d) in enumerate(zip(kernel, strides, dilations)):
        slab = slab.unfold(1 + axis, (k - 1) * d + 1, s)
        if d > 1:
            slab = slab[..., ::d]
    # (C, O1..On, k1..kn) -> (C, k1..kn, O1..On): rows match weight.reshape(C_out, -1).
    order = [0] + list(range(1 + n, 1 + 2 * n)) + list(range(1, 1 + n))
    return slab.permute(order).reshape(source.shape[0] * prod(kernel), -1)
