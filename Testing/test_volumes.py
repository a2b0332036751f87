"""Volume and segmentation IO: real files, 3D Slicer's own readers and writers."""

from __future__ import annotations

import gzip

import nibabel as nib
import nrrd
import numpy as np
import pytest

from SlicerPTQLib import shipped
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.segmentation_io import read_seg_nrrd, write_seg_nrrd
from SlicerPTQLib.spec import ModelSpec
from SlicerPTQLib.volume import Volume
from SlicerPTQLib.volumes import labels_dtype, read_volume, write_volume


def oblique_affine(flip: bool = True) -> np.ndarray:
    """Rotated 17 deg about S, anisotropic spacing, optionally left-handed."""
    angle = np.deg2rad(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.2, 0.8, 2.5]) @ np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    affine[:3, 3] = [5.0, -7.0, 11.0]
    return affine


def same_in_ras(array_a, affine_a, array_b, affine_b) -> bool:
    """True when both arrays hold the same values at the same RAS voxel centres."""
    if array_a.size != array_b.size:
        return False
    ijk_b = np.indices(array_b.shape).reshape(3, -1)
    ras = affine_b[:3, :3] @ ijk_b + affine_b[:3, 3:]
    ijk_a = np.linalg.solve(affine_a[:3, :3], ras - affine_a[:3, 3:])
    index_a = np.rint(ijk_a).astype(int)
    if np.abs(ijk_a - index_a).max() > 1e-3:
        return False
    if (index_a < 0).any() or (index_a >= np.array(array_a.shape)[:, None]).any():
        return False
    return np.array_equal(array_a[tuple(index_a)], array_b.reshape(-1))


@pytest.fixture
def slicer_scene():
    slicer = pytest.importorskip("slicer", reason="slicer-core (test extra) is not installed")
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return slicer, scene, logic


def _matrix(node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def _slicer_volume(slicer, scene, volume: Volume, class_name="vtkMRMLScalarVolumeNode"):
    import vtk

    node = scene.AddNewNodeByClass(class_name)
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            matrix.SetElement(row, col, float(volume.affine[row, col]))
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.array.transpose(2, 1, 0)))
    return node


def _ramp(shape=(9, 7, 5), dtype=np.int16) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape)


# ---- NIfTI / NRRD round trips -------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_write_read_round_trip_keeps_voxels_and_affine(tmp_path, suffix):
    volume = Volume(_ramp(), oblique_affine())
    path = write_volume(volume, tmp_path / f"ramp{suffix}")
    back = read_volume(path)
    assert back.name == "ramp"
    assert back.array.dtype == np.int16 and np.array_equal(back.array, volume.array)
    assert np.allclose(back.affine, volume.affine, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file left behind"


def test_real_volume_round_trip_through_nrrd(tmp_path, evaluation_cases):
    name, image, _ = min(evaluation_cases, key=lambda case: case[1].stat().st_size)
    volume = read_volume(image)
    original = nib.load(str(image))
    assert np.allclose(volume.affine, original.affine)
    assert np.array_equal(volume.array, np.asanyarray(original.dataobj))
    back = read_volume(write_volume(volume, tmp_path / f"{name}.nrrd"))
    assert np.array_equal(back.array, volume.array) and np.allclose(back.affine, volume.affine)


def test_nrrd_is_written_in_lps_space(tmp_path):
    affine = oblique_affine()
    path = write_volume(Volume(_ramp(), affine), tmp_path / "lps.nrrd")
    _, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior"
    lps = np.diag([-1.0, -1.0, 1.0])
    assert np.allclose(header["space directions"], (lps @ affine[:3, :3]).T)
    assert np.allclose(header["space origin"], lps @ affine[:3, 3])


@pytest.mark.parametrize("space, to_ras", [("right-anterior-superior", [1, 1, 1]),
                                           ("left-posterior-superior", [-1, -1, 1]),
                                           ("left-anterior-superior", [-1, 1, 1])])
def test_nrrd_spaces_are_converted_to_ras(tmp_path, space, to_ras):
    directions = np.array([[0.0, 1.5, 0.2], [2.0, 0.0, 0.0], [0.0, -0.1, 3.0]])  # one row per axis
    origin = np.array([10.0, -20.0, 30.0])
    path = tmp_path / "space.nrrd"
    nrrd.write(str(path), _ramp(), {"space": space, "space directions": directions, "space origin": origin})
    volume = read_volume(path)
    flip = np.diag(np.array(to_ras, dtype=float))
    assert np.allclose(volume.affine[:3, :3], flip @ directions.T)
    assert np.allclose(volume.affine[:3, 3], flip @ origin)


def test_nrrd_with_a_single_frame_axis_is_squeezed(tmp_path):
    path = tmp_path / "frame.nrrd"
    data = _ramp()[None]
    directions = np.vstack([np.full(3, np.nan), np.diag([1.0, 2.0, 3.0])])
    nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": directions,
                                 "kinds": ["list", "domain", "domain", "domain"]})
    volume = read_volume(path)
    assert np.array_equal(volume.array, _ramp())
    assert np.allclose(volume.affine[:3, :3], np.diag([-1.0, -2.0, 3.0]))


def test_detached_nhdr_header_is_read(tmp_path):
    path = tmp_path / "detached.nhdr"
    nrrd.write(str(path), _ramp(), {"space": "left-posterior-superior",
                                    "space directions": np.diag([1.0, 2.0, 3.0])}, detached_header=True)
    volume = read_volume(path)
    assert volume.name == "detached" and np.array_equal(volume.array, _ramp())
    assert np.allclose(volume.affine[:3, :3], np.diag([-1.0, -2.0, 3.0]))


# ---- 3D Slicer's own volume IO agrees with ours -----------------------------------------------

@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("left_handed", [False, True])
def test_slicer_reads_our_files_at_the_same_place(tmp_path, slicer_scene, suffix, left_handed):
    slicer, scene, _ = slicer_scene
    volume = Volume(_ramp(), oblique_affine(flip=left_handed))
    path = write_volume(volume, tmp_path / f"ours{suffix}")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    # Slicer may flip a left-handed grid; the voxels must still sit at the same RAS points.
    assert same_in_ras(volume.array, volume.affine, slicer.util.arrayFromVolume(node).transpose(2, 1, 0),
                       _matrix(node))


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_we_read_slicer_written_files_at_the_same_place(tmp_path, slicer_scene, suffix):
    slicer, scene, _ = slicer_scene
    node = _slicer_volume(slicer, scene, Volume(_ramp(), oblique_affine(flip=False)))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / f"slicer{suffix}"))
    assert storage.WriteData(node)
    volume = read_volume(tmp_path / f"slicer{suffix}")
    assert same_in_ras(volume.array, volume.affine, slicer.util.arrayFromVolume(node).transpose(2, 1, 0),
                       _matrix(node))


# ---- bad inputs ---------------------------------------------------------------------------------

def _error(path) -> str:
    with pytest.raises(PTQError) as info:
        read_volume(path)
    return str(info.value)


def test_missing_file(tmp_path):
    message = _error(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in message and "does not exist" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"DICM")
    message = _error(path)
    assert "scan.dcm" in message and ".nrrd" in message


@pytest.mark.parametrize("suffix, payload", [(".nii.gz", b"not a gzip stream"),
                                             (".nii", b"\x00" * 400),
                                             (".nrrd", b"NRRD0004\ntype: short\n\n")])
def test_corrupt_files(tmp_path, suffix, payload):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(payload)
    message = _error(path)
    assert f"broken{suffix}" in message and "corrupt" in message


def test_truncated_real_file(tmp_path, evaluation_cases):
    _, image, _ = evaluation_cases[0]
    data = image.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    assert "cut.nii.gz" in _error(path)


def test_2d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), str(path))
    assert "2D" in _error(path)


def test_4d_with_several_frames(tmp_path):
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4)), str(path))
    message = _error(path)
    assert "series.nii.gz" in message and "frame" in message


def test_4d_with_one_frame_is_squeezed(tmp_path):
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(_ramp()[..., None], np.eye(4)), str(path))
    assert np.array_equal(read_volume(path).array, _ramp())


def test_nan_voxels_are_counted(tmp_path):
    data = np.ones((5, 5, 5), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    message = _error(path)
    assert "4 NaN or infinite" in message and "nan.nii.gz" in message


def test_empty_volume(tmp_path):
    path = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 5, 5), np.float32), np.eye(4)), str(path))
    assert "empty" in _error(path)


def test_write_errors_leave_no_file(tmp_path):
    with pytest.raises(PTQError, match="does not exist"):
        write_volume(Volume(_ramp(), np.eye(4)), tmp_path / "missing" / "x.nii.gz")
    with pytest.raises(PTQError, match="non-negative integers"):
        write_volume(Volume(-_ramp(), np.eye(4)), tmp_path / "neg.nii.gz", labels=True)
    with pytest.raises(PTQError, match="use .nrrd"):
        write_volume(Volume(_ramp(), np.eye(4)), tmp_path / "x.nhdr")
    assert list(tmp_path.iterdir()) == []


def test_label_maps_use_the_smallest_unsigned_type(tmp_path):
    assert labels_dtype(255) == np.uint8 and labels_dtype(256) == np.uint16
    small = write_volume(Volume(np.array(_ramp() % 7, dtype=np.int64), np.eye(4)), tmp_path / "a.nii.gz",
                         labels=True)
    large = write_volume(Volume(np.array(_ramp() % 300, dtype=np.int64), np.eye(4)), tmp_path / "b.nrrd",
                         labels=True)
    assert read_volume(small).array.dtype == np.uint8
    assert read_volume(large).array.dtype == np.uint16
    assert np.array_equal(read_volume(large).array, _ramp() % 300)


def test_reference_masks_are_binary(evaluation_cases):
    for name, image, mask_path in evaluation_cases:
        mask = shipped.reference_mask(mask_path)
        assert mask.array.dtype == np.uint8 and set(np.unique(mask.array)) == {0, 1}, name
        assert mask.array.shape == read_volume(image).array.shape, name
        assert 0.05 < mask.array.mean() < 0.5, f"{name}: brain fraction {mask.array.mean():.3f}"


# ---- .seg.nrrd ------------------------------------------------------------------------------------

SEG_SPEC = ModelSpec(name="test", out_channels=4, labels={1: "brain", 2: "Ventrikel \u00f6", 3: "never drawn"},
                     colors={1: (0.89, 0.8, 0.7), 2: (0.1, 0.2, 0.9)})


def _seg_labels() -> Volume:
    array = np.zeros((20, 15, 10), np.uint8)
    array[2:8, 3:9, 1:5] = 1
    array[10:14, 5:7, 6:9] = 2
    array[15, 12, 3] = 5  # not in the spec: still kept, under a default name
    return Volume(array, oblique_affine())


def test_slicer_opens_seg_nrrd_with_names_colours_and_voxels(tmp_path, slicer_scene):
    slicer, scene, logic = slicer_scene
    labels = _seg_labels()
    path = write_seg_nrrd(labels, SEG_SPEC, tmp_path / "result.seg.nrrd")
    assert [p.name for p in tmp_path.iterdir()] == ["result.seg.nrrd"]

    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    found = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        found[segment.GetLabelValue()] = (segment.GetName(), segment.GetColor())
    assert sorted(found) == [1, 2, 3, 5]
    for value in (1, 2, 3, 5):
        name, color = found[value]
        assert name == SEG_SPEC.labels.get(value, f"Label_{value}")
        assert np.allclose(color, SEG_SPEC.color(value), atol=1e-5)

    import vtk

    reference = _slicer_volume(slicer, scene, labels.with_array(np.zeros(labels.array.shape, np.float32)))
    for index in range(segmentation.GetNumberOfSegments()):
        segment_ids = vtk.vtkStringArray()
        segment_ids.InsertNextValue(segmentation.GetNthSegmentID(index))
        exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert logic.ExportSegmentsToLabelmapNode(segmentation_node, segment_ids, exported, reference)
        assert np.allclose(_matrix(exported), labels.affine, atol=1e-5)
        voxels = slicer.util.arrayFromVolume(exported).transpose(2, 1, 0) > 0
        value = segmentation.GetNthSegment(index).GetLabelValue()
        assert np.array_equal(voxels, labels.array == value), f"segment {value} voxels differ"


def test_seg_nrrd_reads_back(tmp_path):
    labels = _seg_labels()
    volume, segments = read_seg_nrrd(write_seg_nrrd(labels, SEG_SPEC, tmp_path / "r.seg.nrrd"))
    assert volume.name == "r"
    assert np.array_equal(volume.array, labels.array) and np.allclose(volume.affine, labels.affine)
    assert segments[2][0] == "Ventrikel \u00f6" and segments[5][0] == "Label_5"
    assert np.allclose(segments[2][1], (0.1, 0.2, 0.9))


def test_seg_nrrd_needs_its_suffix_and_integer_labels(tmp_path):
    with pytest.raises(PTQError, match=".seg.nrrd"):
        write_seg_nrrd(_seg_labels(), SEG_SPEC, tmp_path / "result.nrrd")
    with pytest.raises(PTQError, match="non-negative integers"):
        write_seg_nrrd(Volume(np.full((4, 4, 4), 0.5), np.eye(4)), SEG_SPEC, tmp_path / "f.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_seg_nrrd_data_is_gzip_of_the_label_array(tmp_path):
    labels = _seg_labels()
    data = write_seg_nrrd(labels, SEG_SPEC, tmp_path / "g.seg.nrrd").read_bytes()
    body = gzip.decompress(data[data.index(b"\n\n") + 2:])
    assert body == labels.array.astype(np.uint8).tobytes(order="F")
