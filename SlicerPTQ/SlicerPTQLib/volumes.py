"""Reading and writing volumes: NIfTI (nibabel) and NRRD (pynrrd).

Everything comes back as a :class:`Volume` whose affine maps (i, j, k) to
RAS millimetres, whatever the file's own convention (NRRD files from Slicer
and ITK are usually in LPS space). Bad files raise PTQError naming the file
and the fix; writes go to a temp file beside the target and are renamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from .atomic import replacing
from .errors import PTQError
from .volume import Volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
READ_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES
WRITE_SUFFIXES = NIFTI_SUFFIXES + (".nrrd",)

# RAS <- space for the NRRD spaces a 3D scan can be in.
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": np.diag([1.0, 1.0, 1.0]),
    "ras": np.diag([1.0, 1.0, 1.0]),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
    "las": np.diag([-1.0, 1.0, 1.0]),
    "left-posterior-superior": np.diag([-1.0, -1.0, 1.0]),
    "lps": np.diag([-1.0, -1.0, 1.0]),
}
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_NRRD_COMPRESSION_LEVEL = 4
#: The most voxels a volume may have (2^31, 8 GiB as float32; a 0.5 mm whole-body CT is ~1.5e9).
#: Checked on the header before any data is read, so a tiny file claiming 10000^3 maps nothing.
MAX_VOXELS = 2 ** 31


def volume_suffix(path: Path) -> str:
    """The volume extension of ``path`` in lower case (``.nii.gz``, ``.nrrd``, ...), or ''."""
    name = Path(path).name.lower()
    for suffix in READ_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def volume_stem(path: Path) -> str:
    """File name without the volume extension (``.seg`` is kept: it is part of the name)."""
    name = Path(path).name
    return name[: len(name) - len(volume_suffix(path))] if volume_suffix(path) else Path(path).stem


def check_volume_path(path: Path, what: str = "Volume file") -> str:
    """Refuse a path that is missing, a folder or not a volume file; returns its volume suffix."""
    path = Path(path)
    if path.is_dir():
        raise PTQError(f"{what} {path} is a folder, not a file. Give a volume file "
                       f"({', '.join(READ_SUFFIXES)}).")
    if not path.is_file():
        raise PTQError(f"{what} {path} does not exist. Check the path.")
    suffix = volume_suffix(path)
    if not suffix:
        raise PTQError(f"{path} is not a supported volume file; use one of {', '.join(READ_SUFFIXES)} "
                       "(in 3D Slicer: File > Save as NRRD or NIfTI).")
    return suffix


def read_volume(path: Path) -> Volume:
    """Read a 3D scalar volume from .nii/.nii.gz/.nrrd/.nhdr.

    Returns a Volume with ``array`` (I, J, K) in the file's dtype (scaled
    NIfTI data becomes float) and a RAS affine. A trailing 4th axis of
    length 1 is dropped.
    """
    path = Path(path)
    suffix = check_volume_path(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
        else:
            array, affine = _read_nrrd(path)
    except PTQError:
        raise
    except Exception as exc:  # nibabel/pynrrd/gzip raise many unrelated types for bad files
        raise PTQError(f"Cannot read {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
                       "not a valid volume; re-export it (e.g. from 3D Slicer) and retry.") from exc
    return Volume(array=_checked_array(array, path), affine=affine, name=volume_stem(path))


def write_volume(volume: Volume, path: Path, labels: bool = False) -> Path:
    """Write ``volume`` to .nii/.nii.gz/.nrrd, atomically; returns ``path``.

    With ``labels=True`` the array is stored as a label map in the smallest
    unsigned type (:func:`labels_dtype`). NRRD is written in LPS space, as
    3D Slicer writes it.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise PTQError(f"Cannot write {path}: use one of {', '.join(WRITE_SUFFIXES)} "
                       "(detached .nhdr headers are read but not written; use .nrrd).")
    array = _storable(np.asarray(volume.array), labels, path)
    if array.ndim != 3:
        raise PTQError(f"Cannot write {path}: expected a 3D array, got shape {array.shape}.")
    affine = np.asarray(volume.affine, dtype=np.float64)
    with replacing(path, suffix=".tmp" + suffix) as tmp:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(array, affine, tmp)
        else:
            _write_nrrd(array, affine, tmp)
    return path


def labels_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned type holding labels 0..max_label (uint8, uint16 or uint32)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise PTQError(f"Label value {max_label} is too large for a label map (max {np.iinfo(np.uint32).max}).")


def nrrd_affine(header: dict, path: Path) -> Tuple[np.ndarray, list]:
    """RAS affine and the spatial axis indices from a pynrrd header."""
    dimension = int(header.get("dimension", len(header.get("sizes", []))))
    directions = header.get("space directions")
    space = str(header.get("space", "")).strip().lower()
    if directions is None:
        # No orientation at all: ITK and Slicer take the axes as LPS with the given spacings.
        spacings = np.asarray(header.get("spacings", [1.0] * dimension), dtype=np.float64)
        spatial = [axis for axis in range(dimension) if np.isfinite(spacings[axis])]
        if len(spatial) != 3:
            raise PTQError(f"{path} has {len(spatial)} spatial axes; a 3D volume is needed.")
        matrix = np.diag(spacings[spatial])
        origin = np.zeros(3)
        space = "left-posterior-superior"
    else:
        directions = np.asarray(directions, dtype=np.float64)
        spatial = [axis for axis in range(dimension) if np.all(np.isfinite(directions[axis]))]
        if len(spatial) != 3 or directions.shape[1] != 3:
            raise PTQError(f"{path} has {len(spatial)} spatial axes in a {directions.shape[1]}-D "
                           "space; a 3D volume is needed.")
        matrix = directions[spatial].T
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        if not space:
            space = "left-posterior-superior"  # 'space dimension: 3' alone: ITK reads it as LPS
    if space not in _NRRD_SPACE_TO_RAS:
        raise PTQError(f"{path} uses NRRD space '{space}'; only right-anterior-superior, "
                       "left-anterior-superior and left-posterior-superior are supported. "
                       "Re-save it from 3D Slicer.")
    to_ras = _NRRD_SPACE_TO_RAS[space]
    affine = np.eye(4)
    affine[:3, :3] = to_ras @ matrix
    affine[:3, 3] = to_ras @ origin
    return affine, spatial


def nrrd_space_fields(affine: np.ndarray) -> dict:
    """NRRD header fields placing a 3D array at ``affine`` (RAS) in LPS space."""
    lps = _LPS_FROM_RAS @ np.asarray(affine, dtype=np.float64)[:3]
    return {
        "space": "left-posterior-superior",
        "space directions": lps[:, :3].T,
        "space origin": lps[:, 3],
        "kinds": ["domain", "domain", "domain"],
    }


def check_voxel_count(shape, path: Path) -> None:
    """Refuse a header whose ``shape`` holds more than :data:`MAX_VOXELS` voxels (before reading data)."""
    count = 1
    for size in shape:
        count *= int(size)
    if count > MAX_VOXELS:
        raise PTQError(f"{path} claims {count:,} voxels (shape {tuple(int(s) for s in shape)}), more than the "
                       f"limit of {MAX_VOXELS:,}. The header is wrong or the volume is too large; crop or "
                       "downsample it (e.g. in 3D Slicer: Crop Volume) and retry.")


def _read_nifti(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    check_voxel_count(image.shape, path)
    array = np.asanyarray(image.dataobj)
    return _squeeze_to_3d(array, list(range(array.ndim))[:3], path), np.asarray(image.affine, dtype=np.float64)


def _read_nrrd(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    import nrrd

    with open(path, "rb") as handle:
        header = nrrd.read_header(handle)
        check_voxel_count(header.get("sizes", ()), path)
        array = nrrd.read_data(header, handle, str(path), index_order="F")
    affine, spatial = nrrd_affine(header, path)
    return _squeeze_to_3d(array, spatial, path), affine


def _squeeze_to_3d(array: np.ndarray, spatial: list, path: Path) -> np.ndarray:
    """Keep the 3 spatial axes; drop other axes only when they have length 1."""
    if array.size == 0:
        raise PTQError(f"{path} is empty (shape {array.shape}). Re-export the volume.")
    if array.ndim < 3 or len(spatial) < 3:
        raise PTQError(f"{path} is a {array.ndim}D image of shape {array.shape}; a 3D volume is needed. "
                       "Stack the slices into a volume (e.g. load the series in 3D Slicer and save it).")
    extra = [axis for axis in range(array.ndim) if axis not in spatial]
    if any(array.shape[axis] != 1 for axis in extra):
        raise PTQError(f"{path} has shape {array.shape}: more than one frame/channel. Pick one "
                       "frame or channel and save it as a 3D volume (e.g. in 3D Slicer: "
                       "Sequences or Vector to Scalar Volume).")
    return array.transpose(spatial + extra).reshape([array.shape[axis] for axis in spatial])


def _checked_array(array: np.ndarray, path: Path) -> np.ndarray:
    if min(array.shape) < 2:
        raise PTQError(f"{path} has shape {array.shape}: a single slice, not a 3D volume. "
                       "Use the full 3D scan.")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise PTQError(f"{path} holds {array.dtype} voxels; a scalar numeric volume is needed. "
                       "Convert it to a scalar volume (e.g. in 3D Slicer: Vector to Scalar Volume).")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise PTQError(f"{path} holds complex voxels; save the magnitude image instead.")
    check_finite(array, str(path))
    return array


def check_finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN or infinite voxels; ``what`` names the file or node in the message."""
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise PTQError(f"{what} has {bad} NaN or infinite voxel(s). Clean them first (e.g. "
                           "replace with 0: numpy.nan_to_num, or fslmaths -nan) and retry.")


def _storable(array: np.ndarray, labels: bool, path: Path) -> np.ndarray:
    """The array in a type both NIfTI and NRRD readers (and Slicer) accept."""
    if labels:
        if array.size and (array.min() < 0 or not np.all(np.equal(np.mod(array, 1), 0))):
            raise PTQError(f"Cannot write label map {path}: labels must be non-negative integers.")
        return array.astype(labels_dtype(int(array.max()) if array.size else 0), copy=False)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        if array.size and np.iinfo(np.int32).min <= array.min() and array.max() <= np.iinfo(np.int32).max:
            return array.astype(np.int32)
        return array.astype(np.float64)
    return array


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.to_filename(str(path))


def _write_nrrd(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nrrd

    header = dict(nrrd_space_fields(affine), encoding="gzip")
    nrrd.write(str(path), array, header, compression_level=_NRRD_COMPRESSION_LEVEL, index_order="F")
