"""The Slicer logic end to end on the real shipped model and a real head MRI.

Volume node -> array -> INT8 inference -> segmentation node, in process and
through the real worker subprocess, compared voxel by voxel with the label
map the ``slicer-ptq segment`` command writes for the same input. The input
is stored with permuted, flipped axes, an oblique direction matrix and
anisotropic spacing, so any slip between (i, j, k), (k, j, i), LPS and RAS
shows up as a mismatch.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from SlicerPTQLib import build_cache, shipped, slicer_nodes  # noqa: E402
from SlicerPTQLib.errors import PTQError  # noqa: E402
from SlicerPTQLib.volume import Volume  # noqa: E402
from SlicerPTQLib.volumes import read_volume  # noqa: E402


@pytest.fixture(scope="module")
def scene(module_mrml_scene):
    return module_mrml_scene


def reoriented(volume: Volume, strides=(2, 1, 3), flip_axis=0, permutation=(2, 0, 1), degrees=12.0) -> Volume:
    """The same head stored differently: strided, flipped, axes permuted, then tilted in the scanner.

    Array and affine change together, so every voxel keeps its physical
    place (up to the rigid tilt): still a head the network can segment.
    """
    array, affine = np.asarray(volume.array), np.array(volume.affine, dtype=float)
    array = array[::strides[0], ::strides[1], ::strides[2]]
    affine[:3, :3] = affine[:3, :3] * np.array(strides, dtype=float)
    affine[:3, 3] += affine[:3, flip_axis] * (array.shape[flip_axis] - 1)
    affine[:3, flip_axis] *= -1
    array = np.flip(array, axis=flip_axis)
    array = np.ascontiguousarray(array.transpose(permutation))
    affine[:3, :3] = affine[:3, list(permutation)]
    angle = np.deg2rad(degrees)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return Volume(array=array, affine=tilt @ affine, name=volume.name)


@pytest.fixture(scope="module")
def head(evaluation_cases):
    """MNI152 T1 (PyPI) and its brain mask, both reoriented the same way."""
    name, image, mask = evaluation_cases[0]
    return reoriented(read_volume(image)), reoriented(shipped.reference_mask(mask))


@pytest.fixture(scope="module")
def built(scene, shipped_model_path, calibration_paths):
    """The shipped model quantized (INT8, max, 2 crops) in process; reused from the build cache."""
    from SlicerPTQLib.logic import PTQLogic

    calibration_node = slicer_nodes.add_volume_node(scene, read_volume(calibration_paths[0]), "calibration")
    return PTQLogic(inProcess=True).quantize(str(shipped_model_path), [calibration_node], numCrops=2)


@pytest.fixture(scope="module")
def input_node(scene, head):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "subject"), "MR study")
    node = slicer_nodes.add_volume_node(scene, head[0], "MNI152 oblique")
    hierarchy.CreateItem(study, node)  # what Slicer's DICOM import / Data module does
    return node


@pytest.fixture(scope="module")
def in_process(built, input_node):
    from SlicerPTQLib.logic import PTQLogic

    # precision named: "auto" could pick the FP32 model where INT8 is slower on this CPU
    return PTQLogic(inProcess=True).segment(built, input_node, compareWithFP32=True, precision="int8")


def test_input_is_really_oblique_and_anisotropic(input_node):
    direction = vtk.vtkMatrix4x4()
    input_node.GetIJKToRASDirectionMatrix(direction)
    matrix = np.array([[direction.GetElement(r, c) for c in range(3)] for r in range(3)])
    assert not np.allclose(np.abs(matrix), np.eye(3), atol=0.05)
    assert len({round(s, 3) for s in input_node.GetSpacing()}) == 3


def test_segmentation_node_named_coloured_and_placed(in_process, input_node, built):
    segmentation_node, table = in_process
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(built.spec.labels) == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "brain"
    assert np.allclose(segment.GetColor(), built.spec.color(1))
    assert "SCT^12738006^Brain" in segment.GetTerminology()
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    assert segmentation_node.GetNodeReferenceID(role) == input_node.GetID()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(input_node.GetScene())
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(input_node))
    assert hierarchy.GetItemLevel(study) == "Study"
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation_node)) == study


def test_segment_matches_the_cli_label_map_in_ras(in_process, input_node, built, tmp_path):
    """Slicer writes the input; ``slicer-ptq segment`` labels it; Slicer reads the result back."""
    segmentation_node, _ = in_process
    scene = input_node.GetScene()
    writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(writer)
    writer.SetFileName(str(tmp_path / "input.nrrd"))
    assert writer.WriteData(input_node)
    cli = shutil.which("slicer-ptq")
    command = ([cli] if cli else [sys.executable, "-m", "SlicerPTQLib.cli"]) + [
        "segment", str(built.quantizedModel), str(tmp_path / "input.nrrd"), "--out", str(tmp_path / "labels.nrrd"),
        "--runtime", "openvino"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    cli_labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "cli labels")
    reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(str(tmp_path / "labels.nrrd"))
    assert reader.ReadData(cli_labels)
    assert np.allclose(slicer_nodes.volume_from_node(cli_labels, allow_labelmap=True).affine,
                       slicer_nodes.volume_from_node(input_node).affine, atol=1e-4)
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported segment")
    segment_ids = vtk.vtkStringArray()
    segment_ids.InsertNextValue(segmentation_node.GetSegmentation().GetNthSegmentID(0))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, segment_ids, exported, cli_labels)
    from_segment = slicer.util.arrayFromVolume(exported)
    from_cli = slicer.util.arrayFromVolume(cli_labels)
    assert from_cli.shape == from_segment.shape
    assert from_cli.sum() > 100_000  # a brain, not an empty map
    assert np.array_equal(from_segment > 0, from_cli == 1)


def test_brain_overlaps_the_reference_mask(in_process, input_node, built, head):
    from SlicerPTQLib.metrics import dice

    labels = slicer_nodes.labels_from_segmentation(in_process[0], input_node, built.spec)
    assert dice(labels.array, head[1].array, [1])[1] > 0.9


def test_compare_table_reports_time_size_and_dice_per_model(in_process):
    rows = in_process[1]["rows"]
    assert [row["model"] for row in rows] == ["INT8", "FP32"]
    int8, fp32 = rows
    assert int8["runtime"] == fp32["runtime"] == "openvino"
    assert int8["Dice vs FP32"] > 0.97 and fp32["Dice vs FP32"] == 1.0
    assert int8["time (s)"] > 0 and fp32["time (s)"] > 0
    assert int8["size (MB)"] < fp32["size (MB)"] / 3


def test_worker_process_gives_the_same_segmentation(built, input_node, in_process):
    """The default path: the pipeline runs in a ``slicer-ptq`` worker subprocess."""
    from SlicerPTQLib.logic import PTQLogic

    progress = []
    segmentation_node, table = PTQLogic().segment(built, input_node, precision="int8",
                                                  progress=lambda *step: progress.append(step))
    assert segmentation_node is not in_process[0]
    assert progress and progress[-1][1] == progress[-1][2]
    worker_labels = slicer_nodes.labels_from_segmentation(segmentation_node, input_node, built.spec)
    in_process_labels = slicer_nodes.labels_from_segmentation(in_process[0], input_node, built.spec)
    assert np.array_equal(worker_labels.array, in_process_labels.array)
    assert [row["model"] for row in table["rows"]] == ["INT8"]


def test_cancelling_a_real_worker_leaves_nothing_behind(built, input_node):
    from SlicerPTQLib.logic import PTQLogic

    scene = input_node.GetScene()
    segmentations_before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    job = PTQLogic().startSegment(built, input_node)
    work_dirs = [path for path in job.cleanupPaths if path.exists()]
    assert work_dirs and (work_dirs[0] / "input.nrrd").is_file()
    time.sleep(1.0)
    assert not job.poll()
    job.cancel()
    assert job.finished and job.cancelled and job.error == "Cancelled."
    assert job.worker.process.returncode is not None
    assert not any(path.exists() for path in work_dirs)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations_before


def test_catalog_model_resolves_to_the_shipped_weights(scene, shipped_model_path):
    from SlicerPTQLib.logic import PTQLogic

    assert PTQLogic().resolveModel("deepbet-brain-extraction") == shipped_model_path


def test_bad_requests_name_the_problem(scene, built, input_node, shipped_model_path, tmp_path):
    from SlicerPTQLib.logic import PTQLogic

    logic = PTQLogic(inProcess=True)
    with pytest.raises(PTQError, match="Unknown calibration method 'minmax'"):
        logic.quantize(str(shipped_model_path), [input_node], method="minmax")
    with pytest.raises(PTQError, match="at least one calibration volume"):
        logic.quantize(str(shipped_model_path), [])
    with pytest.raises(PTQError, match="Unknown precision 'int4'"):
        logic.segment(built, input_node, precision="int4")
    with pytest.raises(PTQError, match="neither a catalog model"):
        logic.segment(str(tmp_path / "nothing.onnx"), input_node)
    with pytest.raises(PTQError, match="not an ONNX model, so it runs in PyTorch"):
        logic.segment("deepbet-brain-extraction", input_node, runtime="openvino")
    with pytest.raises(PTQError, match="Compare with FP32 needs a quantized model"):
        logic.segment("deepbet-brain-extraction", input_node, compareWithFP32=True)
    bare = tmp_path / "bare.onnx"
    shutil.copyfile(built.quantizedModel, bare)
    with pytest.raises(PTQError, match="No model metadata for"):
        logic.segment(str(bare), input_node)
    if logic.availableRuntimes()["tensorrt"]:
        with pytest.raises(PTQError, match="Runtime 'tensorrt' cannot run here"):
            logic.segment(built, input_node, runtime="tensorrt")


@pytest.mark.slow
def test_gui_apply_builds_and_segments_through_workers(scene, shipped_model_path, calibration_paths, input_node,
                                                       tmp_path, monkeypatch):
    """What Apply does: a fresh build in a worker, published atomically, then segmentation in a worker."""
    from SlicerPTQLib.logic import PTQLogic

    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(tmp_path / "cache" / "builds"))
    shutil.copytree(shipped_model_path.parent, tmp_path / "model")
    model = tmp_path / "model" / shipped_model_path.name
    calibration = slicer_nodes.add_volume_node(scene, read_volume(calibration_paths[0]), "calibration 2")
    stages = []
    # runtime named: "auto" runs FP32 where the self-check timed INT8 slower, which on a loaded AVX2 machine varies.
    job = PTQLogic().startBuildAndSegment(str(model), [calibration], input_node, numCrops=2, compareWithFP32=True,
                                          runtime="openvino",
                                          progress=lambda stage, done, total: stages.append(stage))
    segmentation_node, table = job.wait()
    assert "calibrate" in stages
    builds = build_cache.build_entries(tmp_path / "cache" / "builds")
    assert len(builds) == 1 and not builds[0].name.startswith(".")
    assert {"model.fp32.onnx", "model.int8.onnx", "model.json", "quantization.json"} <= {p.name for p in builds[0].iterdir()}
    assert not any(path.exists() for path in job.cleanupPaths)
    assert table["rows"][0]["Dice vs FP32"] > 0.97
    assert segmentation_node.GetSegmentation().GetNthSegment(0).GetName() == "brain"


@pytest.fixture(scope="module")
def tiny_node(scene):
    """A small volume node: enough for the logic to plan a build and write the worker's input."""
    return slicer_nodes.add_volume_node(scene, Volume(array=np.zeros((8, 8, 8), np.float32), affine=np.eye(4),
                                                      name="tiny"), "tiny")


def _first_worker_call(model, node, **settings):
    """The first worker command a quantize job launches (recorded, never run), and its staging folder."""
    from SlicerPTQLib.logic import PTQLogic

    commands = []
    PTQLogic().availableRuntimes()  # asked of a real worker once; then jobs start with their own step

    def launcher(command, **kwargs):
        commands.append(command)
        raise OSError("recorded, not started")

    job = PTQLogic(launcher=launcher).startQuantize(str(model), [node], runtime="openvino", **settings)
    assert job.finished and "recorded, not started" in job.error
    return commands[0], job.cleanupPaths[0]


def test_accuracy_budget_reaches_the_worker_and_keys_the_build_folder(shipped_model_path, tiny_node):
    without, staging = _first_worker_call(shipped_model_path, tiny_node)
    assert "--accuracy-budget" not in without
    with_budget, budget_staging = _first_worker_call(shipped_model_path, tiny_node, accuracyBudget=0.99)
    assert with_budget[-2:] == ["--accuracy-budget", "0.99"]
    assert with_budget[:-2] == [part.replace(str(staging), str(budget_staging)) for part in without]
    # Staged as ".partial-<build folder>.<pid>-*": a budget is another build than none, or than another budget.
    _, other_staging = _first_worker_call(shipped_model_path, tiny_node, accuracyBudget=0.98)
    folders = {path.name.split(".partial-")[1].rsplit(".", 1)[0] for path in (staging, budget_staging, other_staging)}
    assert len(folders) == 3


@pytest.mark.parametrize("precision, problem", [("w4a8", "low-bit weights"), ("w2a8", "low-bit weights"),
                                                ("fp16", "a float model")])
def test_accuracy_budget_refused_for_other_precisions_before_any_worker(precision, problem, shipped_model_path,
                                                                        tiny_node):
    from SlicerPTQLib.logic import PTQLogic

    def launcher(command, **kwargs):
        raise AssertionError(f"no worker should start: {command}")

    logic = PTQLogic(launcher=launcher)
    with pytest.raises(PTQError, match=rf"accuracy budget .* not '{precision}' \({problem}.*Choose precision int8, "
                                       r"or turn the accuracy budget off"):
        logic.quantize(str(shipped_model_path), [tiny_node], precision=precision, accuracyBudget=0.99)
    with pytest.raises(PTQError, match=rf"not '{precision}'"):
        logic.startBuildAndSegment(str(shipped_model_path), [tiny_node], tiny_node, precision=precision,
                                   accuracyBudget=0.99)
    with pytest.raises(PTQError, match=r"agreement Dice with FP32 in \(0, 1\], e\.g\. 0\.99; got 99"):
        logic.quantize(str(shipped_model_path), [tiny_node], accuracyBudget=99)


def test_accuracy_budget_build_in_a_worker_reports_its_sensitivity(scene, shipped_model_path, calibration_paths,
                                                                    tmp_path, monkeypatch):
    """A loose budget the fully quantized model meets: a real worker build, then the same request from the cache."""
    from SlicerPTQLib.logic import PTQLogic

    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(tmp_path / "builds"))
    calibration = slicer_nodes.add_volume_node(scene, read_volume(calibration_paths[0]), "budget calibration")
    built = PTQLogic().quantize(str(shipped_model_path), [calibration], numCrops=1, runtime="openvino",
                                accuracyBudget=0.9)
    sensitivity = built.sensitivity
    assert sensitivity["budget_dice"] == 0.9 and sensitivity["met"] and sensitivity["checked_on"] == "volumes"
    assert sensitivity["layers_kept_float"] == [] and sensitivity["final_dice"] >= 0.9
    assert built.report["settings"]["accuracy_budget"] == 0.9
    summary = built.sensitivitySummary()
    assert summary.startswith(f"Agreement with FP32 on the calibration volumes: {sensitivity['final_dice']:.4f} "
                              "(budget 0.9") and summary.endswith("no layer kept float.")
    cached = PTQLogic(inProcess=True).quantize(str(shipped_model_path), [calibration], numCrops=1,
                                               runtime="openvino", accuracyBudget=0.9)
    assert cached.folder == built.folder and cached.sensitivitySummary() == summary


def test_build_without_budget_has_no_sensitivity_and_the_table_names_the_build(built, in_process):
    assert built.sensitivity is None and built.sensitivitySummary() is None
    assert in_process[1]["build"] is built


def test_precision_choices_map_to_what_each_runtime_runs():
    from SlicerPTQLib.logic import PRECISIONS

    assert PRECISIONS["int8"].runtime_precision("openvino") is None  # a Q/DQ file runs INT8 by itself
    assert PRECISIONS["w2a8"].weight_bits == 2 and PRECISIONS["w4a8"].weight_bits == 4
    assert PRECISIONS["fp16"].runtime_precision("openvino") == "bf16"
    assert PRECISIONS["fp16"].runtime_precision("tensorrt") == "fp16"
    assert PRECISIONS["fp32"].runtime_precision("openvino") == "fp32"
    assert [key for key, choice in PRECISIONS.items() if choice.takes_accuracy_budget] == ["int8"]


def test_user_model_asks_for_calibration_once_then_reuses_its_build(built, shipped_model_path, input_node):
    """After one build with calibration volumes, Apply with none checked reuses it for any input."""
    from SlicerPTQLib.logic import PTQLogic

    again = PTQLogic(inProcess=True).quantize(str(shipped_model_path), [], numCrops=2)
    assert again.folder == built.folder
    description = again.describe()
    assert description.startswith(f"Build {built.folder.name} (int8, max calibration on 1 volume(s): ")
    assert f"made {built.madeAt:%Y-%m-%d %H:%M}" in description
    # A later Slicer session (a new process, same build cache) reuses it too.
    code = ("import sys; from SlicerPTQLib.logic import PTQLogic; "
            "print(PTQLogic(inProcess=True).quantize(sys.argv[1], [], numCrops=2).folder)")
    completed = subprocess.run([sys.executable, "-c", code, str(shipped_model_path)], capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(built.folder)


def test_auto_runs_the_fp32_model_where_the_self_check_found_int8_slower(built, input_node):
    """The build's self-check measured INT8 slower than FP32 here: 'auto' runs float and says why."""
    import dataclasses

    from SlicerPTQLib.logic import PTQLogic

    check = dict(built.report["self_check"], runtime="openvino", int8_speedup=0.7)
    slower = dataclasses.replace(built, report=dict(built.report, self_check=check))
    lines = []
    _, table = PTQLogic(inProcess=True).segment(slower, input_node, runtime="auto", log=lines.append)
    assert [row["model"] for row in table["rows"]] == ["FP32"]
    assert table["rows"][0]["file"] == built.fp32Model.name
    reason = [line for line in lines if line.startswith("Running the FP32 model: INT8 is not faster than FP32")]
    assert len(reason) == 1 and "0.70x" in reason[0]
    _, asked = PTQLogic(inProcess=True).segment(slower, input_node, runtime="openvino")
    assert [row["model"] for row in asked["rows"]] == ["INT8"]


def test_batch_segments_each_volume_with_one_build_one_progress(scene, built, shipped_model_path, head,
                                                                 input_node):
    """Two inputs, one job: the build is reused, each gets its own segmentation named after it, shown in 3D."""
    from SlicerPTQLib.logic import PTQLogic

    second = slicer_nodes.add_volume_node(scene, head[0], "second head")
    stages, lines = [], []
    job = PTQLogic().startBatch(str(shipped_model_path), [], [input_node, second], numCrops=2, runtime="openvino",
                                precision="int8", showIn3D=True, progress=lambda s, d, t: stages.append(s),
                                log=lines.append)
    results = job.wait()
    assert [node.GetName() for node, _ in results] == [f"{input_node.GetName()} {built.spec.name}",
                                                       f"second head {built.spec.name}"]
    assert {stage.split(":")[0] for stage in stages} == {f"{input_node.GetName()} (1/2)", "second head (2/2)"}
    assert not any("calibrate" in stage for stage in stages)
    assert any(line.startswith(f"Reusing Build {built.folder.name}") for line in lines)
    for node, table in results:
        assert node.GetSegmentation().ContainsRepresentation("Closed surface")
        assert table["build"].folder == built.folder
    first_labels = slicer_nodes.labels_from_segmentation(results[0][0], input_node, built.spec)
    second_labels = slicer_nodes.labels_from_segmentation(results[1][0], second, built.spec)
    assert np.array_equal(first_labels.array, second_labels.array) and first_labels.array.sum() > 100_000


def test_a_volume_unlike_the_models_data_is_flagged_by_its_node_name(scene, built, head):
    """The worker reads a temporary file; its plausibility warning still names the user's node."""
    from SlicerPTQLib.logic import PTQLogic

    ct_like = Volume(array=head[0].array - 1000.0, affine=head[0].affine, name="chest CT")
    node = slicer_nodes.add_volume_node(scene, ct_like, "chest CT")
    _, table = PTQLogic().segment(built, node, precision="int8")
    warned = [note for note in table["notes"] if note.startswith("Warning:")]
    assert warned and all("input" not in note for note in warned), table["notes"]
    assert any("Volume 'chest CT' looks like CT" in note for note in warned), warned
