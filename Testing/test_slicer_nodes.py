"""MRML glue on a real MRML scene (slicer-core wheel, no Slicer application).

Geometry is checked independently of the code under test: voxel positions
go through VTK's own IJK-to-RAS matrices and the segment's oriented image
data, and files are written by Slicer's own volume storage node.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from SlicerPTQLib import catalog, slicer_nodes  # noqa: E402
from SlicerPTQLib.errors import PTQError  # noqa: E402
from SlicerPTQLib.spec import ModelSpec  # noqa: E402
from SlicerPTQLib.volume import Volume  # noqa: E402
from SlicerPTQLib.volumes import read_volume  # noqa: E402


def oblique_affine(spacing=(0.9, 1.3, 2.5), degrees=17.0, origin=(-40.0, 12.5, 88.0)) -> np.ndarray:
    """Axes permuted and flipped, rotated off-axis, anisotropic spacing: nothing like identity."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    permute_flip = np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permute_flip @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.fixture
def scene(mrml_scene):
    return mrml_scene


@pytest.fixture
def spec() -> ModelSpec:
    return ModelSpec(name="three-organs", out_channels=4, labels={1: "liver", 2: "spleen", 4: "kidney"},
                     colors={1: (0.86, 0.55, 0.4), 2: (0.62, 0.36, 0.73)})


def _image(shape=(23, 17, 11), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(array=rng.normal(100, 20, size=shape).astype(np.int16), affine=oblique_affine(), name="head")


def _labels(image: Volume) -> Volume:
    array = np.zeros(image.array.shape, dtype=np.uint8)
    array[2:9, 3:12, 1:6] = 1
    array[12:20, 5:9, 4:10] = 2
    array[0, 0, 0] = 1  # a corner voxel: catches off-by-one and flipped axes
    return image.with_array(array, name="labels")


def _ras(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.append(np.asarray(ijk, dtype=float), 1.0))[:3]


def test_volume_node_round_trip_keeps_ijk_order_and_ras_geometry(scene):
    image = _image()
    node = slicer_nodes.add_volume_node(scene, image)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    for ijk in [(0, 0, 0), (22, 16, 10), (5, 3, 7)]:
        expected = matrix.MultiplyPoint(list(ijk) + [1.0])[:3]
        assert np.allclose(_ras(image.affine, ijk), expected)
    # Slicer's own array view is (k, j, i): the same voxel seen from both sides.
    assert slicer.util.arrayFromVolume(node)[7, 3, 5] == image.array[5, 3, 7]
    back = slicer_nodes.volume_from_node(node)
    assert back.array.shape == image.array.shape
    assert np.array_equal(back.array, image.array)
    assert np.allclose(back.affine, image.affine)
    assert np.allclose(back.spacing, [0.9, 1.3, 2.5])


def test_volume_written_by_slicer_reads_back_on_the_same_grid(scene, tmp_path):
    """Slicer writes NRRD in LPS; the core must land on the same RAS grid."""
    image = _image()
    node = slicer_nodes.add_volume_node(scene, image)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "written_by_slicer.nrrd"))
    assert storage.WriteData(node)
    read = read_volume(tmp_path / "written_by_slicer.nrrd")
    assert np.array_equal(read.array, image.array)
    assert np.allclose(read.affine, image.affine, atol=1e-6)


def test_volume_from_node_rejects_missing_or_vector_volumes(scene):
    with pytest.raises(PTQError, match="Select a loaded scalar volume"):
        slicer_nodes.volume_from_node(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(PTQError, match="Select a loaded scalar volume"):
        slicer_nodes.volume_from_node(empty)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((4, 5, 6, 3), dtype=np.uint8))
    with pytest.raises(PTQError, match="3 components"):
        slicer_nodes.volume_from_node(rgb)


def test_segmentation_has_one_named_coloured_segment_per_label(scene, spec):
    image = _image()
    node = slicer_nodes.add_volume_node(scene, image)
    terminology = catalog.terminology_string(("SCT", "123037004", "Anatomical Structure"),
                                             ("SCT", "10200004", "Liver"))
    segmentation_node = slicer_nodes.labels_to_segmentation(_labels(image), spec, node, terminologies={1: terminology})
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["liver", "spleen", "kidney"]  # kidney is empty in this label map but still listed
    for value in spec.labels:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(spec.labels[value]))
        assert np.allclose(segment.GetColor(), spec.color(value))
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    assert liver.GetTerminology() == terminology
    assert "SCT^10200004^Liver" in liver.GetTerminology()
    reference_role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    assert segmentation_node.GetNodeReferenceID(reference_role) == node.GetID()
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # temporary node removed
    color_table = segmentation_node.GetLabelmapConversionColorTableNode()
    assert color_table.GetColorName(4) == "kidney"


def test_segment_voxels_sit_at_the_label_map_positions_in_ras(scene, spec):
    """Read each segment's own oriented image at the RAS position of every labelled voxel."""
    image = _image()
    labels = _labels(image)
    node = slicer_nodes.add_volume_node(scene, image)
    segmentation_node = slicer_nodes.labels_to_segmentation(labels, spec, node)
    segmentation = segmentation_node.GetSegmentation()
    for value, name in spec.labels.items():
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
        oriented = segment.GetRepresentation("Binary labelmap")
        world_to_image = vtk.vtkMatrix4x4()
        oriented.GetWorldToImageMatrix(world_to_image)
        extent = oriented.GetExtent()
        inside = 0
        for ijk in np.argwhere(labels.array >= 0)[::7]:
            index = np.rint(world_to_image.MultiplyPoint(list(_ras(image.affine, ijk)) + [1.0])[:3]).astype(int)
            in_extent = all(extent[2 * a] <= index[a] <= extent[2 * a + 1] for a in range(3))
            scalar = oriented.GetScalarComponentAsDouble(*index, 0) if in_extent else 0
            is_segment = in_extent and scalar == segment.GetLabelValue()
            assert is_segment == (labels.array[tuple(ijk)] == value), (name, ijk)
            inside += is_segment
        assert (inside > 0) == (value != 4)  # the empty kidney has no voxel
    exported = slicer_nodes.labels_from_segmentation(segmentation_node, node, spec)
    assert np.array_equal(exported.array, labels.array)
    assert np.allclose(exported.affine, image.affine)


def test_segmentation_goes_under_the_input_study_and_transform(scene, spec):
    hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    hierarchy_logic.SetMRMLScene(scene)
    image = _image()
    node = slicer_nodes.add_volume_node(scene, image)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study")
    hierarchy.CreateItem(study, node)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    segmentation_node = slicer_nodes.labels_to_segmentation(_labels(image), spec, node)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation_node)) == study
    assert segmentation_node.GetTransformNodeID() == transform.GetID()
    hierarchy_logic.SetMRMLScene(None)


def test_existing_segmentation_is_replaced_not_appended(scene, spec):
    image = _image()
    node = slicer_nodes.add_volume_node(scene, image)
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    existing.GetSegmentation().AddEmptySegment("old", "old segment")
    result = slicer_nodes.labels_to_segmentation(_labels(image), spec, node, existing)
    assert result is existing
    assert result.GetSegmentation().GetNumberOfSegments() == 3
    assert not result.GetSegmentation().GetSegmentIdBySegmentName("old segment")
    empty = image.with_array(np.zeros(image.array.shape, dtype=np.uint8))
    slicer_nodes.labels_to_segmentation(empty, spec, node, existing)
    assert slicer_nodes.labels_from_segmentation(existing, node, spec).array.max() == 0


def test_label_values_the_spec_does_not_define_are_rejected(scene, spec):
    image = _image()
    node = slicer_nodes.add_volume_node(scene, image)
    labels = _labels(image)
    labels.array[1, 1, 1] = 3
    with pytest.raises(PTQError, match=r"values \[3\]"):
        slicer_nodes.labels_to_segmentation(labels, spec, node)


def test_results_table_node_gets_numeric_and_text_columns(scene):
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode")
    rows = [{"model": "INT8", "time (s)": 1.25, "Dice vs FP32": 0.998},
            {"model": "FP32", "time (s)": 2.5, "Dice vs FP32": 1.0}]
    slicer_nodes.update_table_node(table_node, rows)
    assert table_node.GetNumberOfRows() == 2
    assert table_node.GetColumnName(0) == "model"
    assert table_node.GetCellText(1, 0) == "FP32"
    assert table_node.GetTable().GetColumnByName("time (s)").IsA("vtkDoubleArray")
    assert table_node.GetTable().GetColumnByName("Dice vs FP32").GetValue(0) == pytest.approx(0.998)


def _linear_transform(scene, matrix: np.ndarray, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    vtk_matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            vtk_matrix.SetElement(row, column, float(matrix[row, column]))
    node.SetMatrixTransformToParent(vtk_matrix)
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def _to_world(node) -> np.ndarray:
    """The node's local-to-world matrix through its whole chain of parent transforms (VTK's own)."""
    matrix = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(node.GetParentTransformNode(), None, matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _segment_world_points(segmentation_node, name: str) -> np.ndarray:
    """World RAS of every voxel of a segment, from its own oriented image and the node's transforms."""
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))
    oriented = segment.GetRepresentation("Binary labelmap")
    image_to_local = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(image_to_local)
    local = np.array([[image_to_local.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = oriented.GetExtent()
    scalars = vtk.util.numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(
        extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    kji = np.argwhere(scalars == segment.GetLabelValue())
    ijk = kji[:, ::-1] + np.array([extent[0], extent[2], extent[4]])
    homogeneous = np.c_[ijk, np.ones(len(ijk))].T
    return ((_to_world(segmentation_node) @ local @ homogeneous)[:3]).T


def _rotation(degrees: float, axis: int) -> np.ndarray:
    angle = np.deg2rad(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = [i for i in range(3) if i != axis]
    matrix = np.eye(4)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = cos, -sin, sin, cos
    return matrix


def _shift(x=0.0, y=0.0, z=0.0) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = (x, y, z)
    return matrix


def test_segment_stays_at_the_input_voxel_under_a_shift(scene, spec):
    """One labelled voxel at local (5,5,5) under a 50 mm shift in R must be seen at world (55,5,5)."""
    image = Volume(array=np.zeros((12, 12, 12), dtype=np.int16), affine=np.eye(4), name="grid")
    node = slicer_nodes.add_volume_node(scene, image)
    node.SetAndObserveTransformNodeID(_linear_transform(scene, _shift(x=50.0)).GetID())
    labels = image.with_array(np.zeros((12, 12, 12), dtype=np.uint8))
    labels.array[5, 5, 5] = 1
    segmentation_node = slicer_nodes.labels_to_segmentation(labels, spec, node)
    assert np.allclose(_segment_world_points(segmentation_node, "liver"), [[55.0, 5.0, 5.0]])
    exported = slicer_nodes.labels_from_segmentation(segmentation_node, node, spec)
    assert np.array_equal(exported.array, labels.array)


@pytest.mark.parametrize("chain", ["rotated", "shifted then rotated (two transforms)"])
def test_segment_overlays_the_input_under_parent_transforms(scene, spec, chain):
    """Every labelled voxel of an oblique volume sits, in world RAS, where the input voxel sits."""
    image = _image()
    labels = _labels(image)
    node = slicer_nodes.add_volume_node(scene, image)
    if chain == "rotated":
        parent = _linear_transform(scene, _shift(10.0, -20.0, 5.0) @ _rotation(30.0, axis=2))
    else:
        outer = _linear_transform(scene, _rotation(-25.0, axis=0) @ _shift(z=40.0))
        parent = _linear_transform(scene, _shift(x=50.0) @ _rotation(15.0, axis=1), parent=outer)
    node.SetAndObserveTransformNodeID(parent.GetID())
    segmentation_node = slicer_nodes.labels_to_segmentation(labels, spec, node)
    input_to_world = _to_world(node) @ image.affine
    for value in (1, 2):
        ijk = np.argwhere(labels.array == value)
        expected = (input_to_world @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
        found = _segment_world_points(segmentation_node, spec.labels[value])
        assert len(found) == len(expected)
        assert np.allclose(np.array(sorted(map(tuple, np.round(found, 3)))),
                           np.array(sorted(map(tuple, np.round(expected, 3)))), atol=1e-3)
    assert np.array_equal(slicer_nodes.labels_from_segmentation(segmentation_node, node, spec).array, labels.array)


def test_label_map_volumes_are_refused_as_images(scene):
    image = _image()
    labelmap = slicer_nodes.add_volume_node(scene, _labels(image), "brain mask", labelmap=True)
    with pytest.raises(PTQError, match="'brain mask' is a label map .*select the scan itself"):
        slicer_nodes.volume_from_node(labelmap)
    assert slicer_nodes.volume_from_node(labelmap, allow_labelmap=True).array.max() == 2


def test_nan_voxels_are_refused_like_the_worker_refuses_them(scene, tmp_path):
    """One rule in Slicer's process and in the worker: NaN voxels are refused, never silently zeroed."""
    array = np.ones((6, 7, 8), dtype=np.float32)
    array[1, 2, 3] = np.nan
    array[2, 2, 2] = np.inf
    volume = Volume(array=array, affine=np.eye(4), name="nan")
    node = slicer_nodes.add_volume_node(scene, volume)
    with pytest.raises(PTQError, match="'nan' has 2 NaN or infinite voxel"):
        slicer_nodes.volume_from_node(node)
    path = tmp_path / "nan.nrrd"
    slicer_storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(slicer_storage)
    slicer_storage.SetFileName(str(path))
    assert slicer_storage.WriteData(node)
    with pytest.raises(PTQError, match="has 2 NaN or infinite voxel"):
        read_volume(path)


def test_segmentation_of_another_scene_is_refused(scene, spec):
    image = _image()
    node = slicer_nodes.add_volume_node(scene, image)
    other_scene = slicer.vtkMRMLScene()
    foreign = other_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "elsewhere")
    with pytest.raises(PTQError, match="'elsewhere' is not in the input volume's scene"):
        slicer_nodes.labels_to_segmentation(_labels(image), spec, node, foreign)
    assert foreign.GetSegmentation().GetNumberOfSegments() == 0


def test_input_removed_from_the_scene_is_refused_before_writing(scene, spec):
    image = _image()
    node = slicer_nodes.add_volume_node(scene, image)
    scene.RemoveNode(node)
    with pytest.raises(PTQError, match="no longer in the scene"):
        slicer_nodes.labels_to_segmentation(_labels(image), spec, node)
