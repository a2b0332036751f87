"""Label maps as 3D Slicer segmentation files (``.seg.nrrd``).

A ``.seg.nrrd`` is an NRRD label map whose header carries Slicer's
segmentation fields: one ``Segment<i>_*`` group per segment (ID, name,
colour, label value, layer, extent) and ``Segmentation_*`` fields saying the
binary labelmap is the master representation. Slicer opens it as a
segmentation node with the segments named and coloured from the ModelSpec.
The header is written here (not by pynrrd) so segment names may hold any
UTF-8 text, as Slicer's own files do.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from .errors import PTQError
from .spec import ModelSpec
from .volume import Volume
from .volumes import labels_dtype, nrrd_affine, nrrd_space_fields

SEG_SUFFIX = ".seg.nrrd"
_NRRD_TYPES = {np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
               np.dtype(np.uint32): "unsigned int"}
_GZIP_LEVEL = 4

#: label value -> (segment name, RGB colour in [0, 1])
SegmentTable = Dict[int, Tuple[str, Tuple[float, float, float]]]


def write_seg_nrrd(labels: Volume, spec: ModelSpec, path: Path) -> Path:
    """Write a label map (I, J, K ints, RAS affine) as a Slicer ``.seg.nrrd``, atomically.

    Every label of ``spec.labels`` becomes a segment (empty ones too, so
    the segment list is always the model's); a value present in the array
    but missing from the spec gets a segment named ``Label_<value>``.
    """
    path = Path(path)
    if not path.name.lower().endswith(SEG_SUFFIX):
        raise PTQError(f"Segmentation file {path} must end with {SEG_SUFFIX} for 3D Slicer to open it "
                       "as a segmentation.")
    array = np.asarray(labels.array)
    if array.ndim != 3:
        raise PTQError(f"Cannot write {path}: labels must be 3D, got shape {array.shape}.")
    if array.size and (array.min() < 0 or not np.issubdtype(array.dtype, np.integer)):
        raise PTQError(f"Cannot write {path}: labels must be non-negative integers, got {array.dtype} "
                       f"with minimum {array.min()}.")
    present = [int(value) for value in np.unique(array) if value != 0]
    values = sorted(set(spec.labels) | set(present))
    array = array.astype(labels_dtype(max(values, default=0)), copy=False)
    fields = _segment_fields(array, values, spec)
    header = _nrrd_header(array, labels.affine, fields)
    if not path.parent.is_dir():
        raise PTQError(f"Cannot write {path}: folder {path.parent} does not exist. Create it first.")
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(header)
            stream.write(gzip.compress(np.asfortranarray(array).astype(array.dtype.newbyteorder("<"))
                                       .tobytes(order="F"), compresslevel=_GZIP_LEVEL))
        os.replace(tmp, path)
    except OSError as exc:
        raise PTQError(f"Cannot write {path}: {exc}. Check free disk space and permissions.") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_seg_nrrd(path: Path) -> Tuple[Volume, SegmentTable]:
    """Read a single-layer ``.seg.nrrd``: label Volume and {label: (name, colour)}."""
    import nrrd

    path = Path(path)
    if not path.is_file():
        raise PTQError(f"Segmentation file {path} does not exist. Check the path.")
    try:
        with open(path, "rb") as stream:
            head = stream.read(1 << 20)
            end = head.find(b"\n\n")
            if end < 0:
                raise ValueError("no end of NRRD header found")
            lines = head[: end + 1].decode("utf-8").splitlines(keepends=True)
            header = nrrd.read_header(lines)
            stream.seek(end + 2)
            array = nrrd.read_data(header, stream, str(path), index_order="F")
    except (OSError, ValueError, UnicodeDecodeError, nrrd.NRRDError) as exc:
        raise PTQError(f"Cannot read segmentation {path}: {exc}. Re-save it from 3D Slicer.") from exc
    if array.ndim != 3:
        raise PTQError(f"{path} has {array.ndim} dimensions (overlapping segments in several layers). "
                       "In 3D Slicer, export the segmentation to a label map and use that file.")
    affine, _ = nrrd_affine(header, path)
    segments: SegmentTable = {}
    index = 0
    while f"Segment{index}_ID" in header:
        prefix = f"Segment{index}_"
        value = int(header.get(prefix + "LabelValue", index + 1))
        color = tuple(float(part) for part in str(header.get(prefix + "Color", "0.5 0.5 0.5")).split())
        segments[value] = (str(header.get(prefix + "Name", f"Label_{value}")), color)
        index += 1
    name = path.name[: -len(SEG_SUFFIX)] if path.name.lower().endswith(SEG_SUFFIX) else path.stem
    return Volume(array=array, affine=affine, name=name), segments


def _segment_fields(array: np.ndarray, values, spec: ModelSpec) -> Dict[str, str]:
    fields: Dict[str, str] = {}
    for index, value in enumerate(values):
        prefix = f"Segment{index}_"
        name = spec.labels.get(value, f"Label_{value}")
        fields[prefix + "Color"] = " ".join(f"{channel:.6g}" for channel in spec.color(value))
        fields[prefix + "ColorAutoGenerated"] = "0"
        fields[prefix + "Extent"] = _extent(array == value)
        fields[prefix + "ID"] = f"Segment_{value}"
        fields[prefix + "LabelValue"] = str(value)
        fields[prefix + "Layer"] = "0"
        fields[prefix + "Name"] = _one_line(name)
        fields[prefix + "NameAutoGenerated"] = "0"
    fields["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    fields["Segmentation_MasterRepresentation"] = "Binary labelmap"
    fields["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    return fields


def _extent(mask: np.ndarray) -> str:
    """'i0 i1 j0 j1 k0 k1' bounding box of a segment; Slicer's empty extent when none."""
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bounds += [str(hits[0]), str(hits[-1])]
    return " ".join(bounds)


def _nrrd_header(array: np.ndarray, affine: np.ndarray, fields: Dict[str, str]) -> bytes:
    space = nrrd_space_fields(affine)

    def vector(values) -> str:
        return "(" + ",".join(f"{float(v):.17g}" for v in values) + ")"

    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_NRRD_TYPES[array.dtype]}",
        "dimension: 3",
        f"space: {space['space']}",
        "sizes: " + " ".join(str(size) for size in array.shape),
        "space directions: " + " ".join(vector(row) for row in space["space directions"]),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: gzip",
        "space origin: " + vector(space["space origin"]),
    ]
    lines += [f"{key}:={value}" for key, value in fields.items()]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _one_line(text: str) -> str:
    # A newline would end the header field early.
    return " ".join(str(text).splitlines())
