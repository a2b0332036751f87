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
