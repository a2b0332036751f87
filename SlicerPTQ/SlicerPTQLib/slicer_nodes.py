"""MRML glue: volume nodes <-> :class:`Volume`, label maps -> segmentation nodes.

Slicer's ``arrayFromVolume`` is indexed (k, j, i); :class:`Volume` is
(i, j, k) with a RAS affine, so the IJK-to-RAS matrix carries over as is.
Needs the ``slicer`` MRML classes (inside 3D Slicer, or the ``slicer-core``
wheel), never ``qt``, ``ctk`` or ``slicer.app``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import slicer
import vtk

from .errors import PTQError
from .spec import ModelSpec
from .volume import Volume


def volume_from_node(volume_node, allow_labelmap: bool = False) -> Volume:
    """The voxels ``(I, J, K)`` and RAS affine of a scalar volume node.

    A parent transform is not applied: the segmentation made from this
    volume is placed under the same transform instead, so both move together.
    Label-map volumes are refused unless ``allow_labelmap`` (they are
    segmentations, not images to segment or calibrate on), and so are NaN or
    infinite voxels, by the same rule as volume files the worker reads.
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.GetImageData() is None:
        raise PTQError("Select a loaded scalar volume (the input image) first.")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode") and not allow_labelmap:
        raise PTQError(f"Volume '{volume_node.GetName()}' is a label map (a segmentation), not an image; "
                       "select the scan itself as input and calibration volume.")
    array = slicer.util.arrayFromVolume(volume_node)
    if array.ndim != 3:
        raise PTQError(f"Volume '{volume_node.GetName()}' has {array.shape[-1]} components per voxel; "
                       "segmentation needs a single-component (greyscale) volume. Convert it first "
                       "(Vector to Scalar Volume module).")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise PTQError(f"Volume '{volume_node.GetName()}' has {bad} NaN or infinite voxel(s). Clean them "
                           "first (e.g. replace with 0: numpy.nan_to_num) and retry.")
    return Volume(array=np.ascontiguousarray(array.transpose(2, 1, 0)), affine=_ijk_to_ras(volume_node),
                  name=volume_node.GetName())


def add_volume_node(scene, volume: Volume, name: str = "", labelmap: bool = False):
    """A new volume node in ``scene`` showing ``volume`` (e.g. a file read with ``volumes.read_volume``)."""
    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(node_class, name or volume.name or "volume")
    set_node_from_volume(node, volume)
    return node


def set_node_from_volume(volume_node, volume: Volume) -> None:
    """Replace a volume node's voxels and geometry with ``volume``'s."""
    affine = np.asarray(volume.affine, dtype=float)
    if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise PTQError(f"Volume '{volume.name}' has an invalid affine (need a 4x4 with a non-singular 3x3).")
    slicer.util.updateVolumeFromArray(volume_node, np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0)))
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(affine[row, column]))
    volume_node.SetIJKToRASMatrix(matrix)


def labels_to_segmentation(labels: Volume, spec: ModelSpec, reference_node, segmentation_node=None,
                           terminologies: Optional[Dict[int, str]] = None):
    """Show a label map as a segmentation node: one segment per label of ``spec``.

    ``labels.array`` is (I, J, K) with label values of ``spec.labels``;
    segments are named and coloured from the spec (empty ones too, so the
    user sees what the model can find), carry ``terminologies[value]``
    when given, use ``reference_node`` (the input volume) as reference
    geometry, share its parent transform and sit beside it in the subject
    hierarchy (under its study). An existing ``segmentation_node`` has its
    segments replaced. Returns the segmentation node.
    """
    scene = reference_node.GetScene()
    if scene is None:
        raise PTQError(f"Input volume '{reference_node.GetName()}' is no longer in the scene (removed, or the "
                       "scene was closed); load it again and re-run.")
    if segmentation_node is not None and segmentation_node.GetScene() is not scene:
        raise PTQError(f"Segmentation '{segmentation_node.GetName()}' is not in the input volume's scene; pick "
                       "a segmentation node of the same scene (or none, to create one).")
    unknown = sorted(set(np.unique(labels.array).tolist()) - set(spec.labels) - {0})
    if unknown:
        raise PTQError(f"The label map has values {unknown} that model '{spec.name}' does not define "
                       f"(labels {sorted(spec.labels)}). Its metadata (sidecar JSON) does not match the network.")
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                    f"{reference_node.GetName()} {spec.name}")
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    segment_ids = vtk.vtkStringArray()
    for value in range(1, max(spec.labels) + 1):
        if value in spec.labels:
            segment_id = segmentation.AddEmptySegment(f"label_{value}", spec.labels[value], list(spec.color(value)))
            terminology = (terminologies or {}).get(value)
            if terminology:
                _set_terminology(segmentation.GetSegment(segment_id), terminology)
        segment_ids.InsertNextValue(segment_id if value in spec.labels else "")
    labelmap_node = add_volume_node(scene, labels, name="SlicerPTQ labels (temporary)", labelmap=True)
    # The label map lives in the input's own (untransformed) frame, like the segmentation: both under the
    # same transform, Slicer imports voxel for voxel instead of transforming (and resampling) the labels.
    labelmap_node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap_node, segmentation_node, segment_ids):
            raise PTQError(f"Slicer could not import the label map into segmentation "
                           f"'{segmentation_node.GetName()}'. Check the Slicer error log.")
    finally:
        scene.RemoveNode(labelmap_node)
    segmentation_node.SetLabelmapConversionColorTableNodeID(_color_table(scene, spec).GetID())
    _place_beside(segmentation_node, reference_node)
    return segmentation_node


def labels_from_segmentation(segmentation_node, reference_node, spec: ModelSpec) -> Volume:
    """The segments of ``spec``'s labels as one (I, J, K) label map on ``reference_node``'s grid.

    Segments are matched by name; this is how the overlay is checked in RAS
    (Slicer resamples each segment into the reference geometry).
    """
    segmentation = segmentation_node.GetSegmentation()
    values = sorted(spec.labels)
    segment_ids = vtk.vtkStringArray()
    for value in values:
        segment_id = segmentation.GetSegmentIdBySegmentName(spec.labels[value])
        if not segment_id:
            raise PTQError(f"Segmentation '{segmentation_node.GetName()}' has no segment named "
                           f"'{spec.labels[value]}'.")
        segment_ids.InsertNextValue(segment_id)
    scene = reference_node.GetScene()
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SlicerPTQ export (temporary)")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, segment_ids, labelmap_node, reference_node):
            raise PTQError(f"Slicer could not export segmentation '{segmentation_node.GetName()}'.")
        exported = slicer.util.arrayFromVolume(labelmap_node).transpose(2, 1, 0)
        # Exported values are 1..N in segment order; map them back to the spec's values.
        lookup = np.zeros(len(values) + 1, dtype=np.int64)
        lookup[1:] = values
        array = lookup[exported].astype(np.uint16 if max(values) > 255 else np.uint8)
        return Volume(array=array, affine=_ijk_to_ras(reference_node), name=segmentation_node.GetName())
    finally:
        scene.RemoveNode(labelmap_node)


def update_table_node(table_node, rows: Sequence[Dict[str, object]]) -> None:
    """Fill a ``vtkMRMLTableNode`` with ``rows`` (dicts sharing keys; numbers become numeric columns)."""
    columns: List[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    table = vtk.vtkTable()
    for name in columns:
        values = [row.get(name) for row in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        array.SetName(name)
        for value in values:
            if numeric:
                array.InsertNextValue(float("nan") if value is None else float(value))
            else:
                array.InsertNextValue("" if value is None else str(value))
        table.AddColumn(array)
    table_node.SetAndObserveTable(table)


def _ijk_to_ras(volume_node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _set_terminology(segment, terminology: str) -> None:
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(terminology)
    else:  # Slicer < 5.8 keeps the terminology in a tag
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)


def _color_table(scene, spec: ModelSpec):
    """A colour table with the spec's names/colours, so exports keep the label values."""
    name = f"{spec.name} labels"
    node = scene.GetFirstNodeByName(name)
    if node is None or not node.IsA("vtkMRMLColorTableNode"):
        node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(max(spec.labels) + 1)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value, label in spec.labels.items():
        red, green, blue = spec.color(value)
        node.SetColor(value, label, red, green, blue, 1.0)
    return node


def _place_beside(segmentation_node, reference_node) -> None:
    """Put the segmentation under the input's study (or its folder) in the subject hierarchy."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(segmentation_node.GetScene())
    if hierarchy is None:
        return
    reference_item = hierarchy.GetItemByDataNode(reference_node)
    if not reference_item:
        return
    parent = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(segmentation_node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, segmentation_node)
