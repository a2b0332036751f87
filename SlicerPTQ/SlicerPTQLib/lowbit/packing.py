"""Packed low-bit weight files: b bits per weight on disk, INT8 grids in memory.

A ``.npz`` (stored, not compressed) holding, per weight initializer, its
grid integers as a little-endian bit stream of ``bits`` bits per value
(2-bit: 4 per byte, 4-bit: 2 per byte, 3-bit: 8 values in 3 bytes,
8-bit: 1 per byte), its float32 per-channel scales, and a JSON header with
names, shapes, bit widths and scale axes. Loading gives back the exact
``weight_quant`` dict the QDQ writer consumes, so the INT8 model built
from the file is identical to the one built from the solver's result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from ..atomic import replacing
from ..errors import PTQError
from .grid import level_limit
from .result import LowBitResult

FORMAT = "slicer-ptq-lowbit-1"
# Values per packing step: a multiple of 8 so every step ends on a byte boundary.
_CHUNK = 1 << 20


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Grid integers ``q`` (any shape, |q| <= 2**(bits-1)-1) -> uint8 stream of ``bits`` bits each."""
    limit = level_limit(bits)
    flat = np.asarray(q).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -limit or flat.max() > limit):
        raise ValueError(f"values outside the {bits}-bit grid [-{limit}, {limit}]")
    unsigned = (flat + limit).astype(np.uint16)
    shifts = np.arange(bits, dtype=np.uint16)
    parts = [np.packbits(((unsigned[start:start + _CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1),
                         bitorder="little") for start in range(0, unsigned.size, _CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def unpack_bits(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` int8 grid integers."""
    limit = level_limit(bits)
    flat_bits = np.unpackbits(np.asarray(stream, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits)).astype(np.int16)
    values = flat_bits.reshape(count, bits).astype(np.int16) @ weights
    return (values - limit).astype(np.int8)


@dataclass
class PackedWeights:
    """Contents of a packed file: ``weight_quant`` plus each weight's bits and scale axis."""

    weight_quant: Dict[str, Tuple[np.ndarray, np.ndarray]]
    bits: Dict[str, int]
    axes: Dict[str, int]


def save_packed(path: Path, result: LowBitResult) -> Path:
    """Write ``result``'s weights packed at their bit widths (atomically)."""
    path = Path(path)
    bits, axes = result.bits, result.axes
    header = {"format": FORMAT, "solver": result.solver, "weight_bits": result.weight_bits, "layers": []}
    arrays = {}
    for index, (name, (q, scales)) in enumerate(result.weight_quant.items()):
        arrays[f"q{index}"] = pack_bits(q, bits[name])
        arrays[f"s{index}"] = np.asarray(scales, dtype=np.float32)
        header["layers"].append({"name": name, "bits": bits[name], "shape": list(q.shape), "axis": axes[name]})
    arrays["header"] = np.array(json.dumps(header))
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return path


def read_packed(path: Path) -> PackedWeights:
    """Unpack a file written by :func:`save_packed`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
            packed = PackedWeights(weight_quant={}, bits={}, axes={})
            for index, entry in enumerate(header["layers"]):
                shape = tuple(entry["shape"])
                q = unpack_bits(data[f"q{index}"], entry["bits"], int(np.prod(shape))).reshape(shape)
                packed.weight_quant[entry["name"]] = (q, data[f"s{index}"].astype(np.float32))
                packed.bits[entry["name"]] = int(entry["bits"])
                packed.axes[entry["name"]] = int(entry["axis"])
            return packed
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PTQError(f"Cannot read packed low-bit weights {path}: {exc}. Re-run the low-bit "
                       "quantization (slicer-ptq quantize --weight-bits ...) to write it again.") from exc


def load_packed(path: Path) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``weight_quant`` (initializer -> (q int8, scales float32)) from a packed file."""
    return read_packed(path).weight_quant
