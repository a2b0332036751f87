"""The whole job on the real shipped model: quantize, segment, compare; and its failure modes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from SlicerPTQLib import pipeline
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.metrics import dice
from SlicerPTQLib.volumes import read_volume


@pytest.fixture(scope="module")
def quantized(shipped_model_path, calibration_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq")
    return pipeline.quantize(shipped_model_path, calibration_paths[:2], out, num_crops=4)


def test_quantize_writes_the_artifacts(quantized):
    names = sorted(p.name for p in quantized.out_dir.iterdir())
    assert names == ["manifest.sha256.json", "model.fp32.onnx", "model.int8.onnx", "model.json", "quantization.json"]
    report = json.loads((quantized.out_dir / "quantization.json").read_text())
    assert report["size_mb"]["quantized_onnx"] <= 0.3 * report["size_mb"]["fp32_onnx"]
    assert report["settings"]["method"] == "max"


def test_int8_agrees_with_fp32_on_a_real_volume(quantized, shipped_model_path, evaluation_cases):
    _, image, _ = evaluation_cases[0]
    fp32, _ = pipeline.segment(shipped_model_path, image)
    int8, timings = pipeline.segment(quantized.quantized_onnx, image, runtime="openvino")
    assert int8.array.shape == read_volume(image).array.shape
    np.testing.assert_allclose(int8.affine, read_volume(image).affine)
    assert dice(int8.array, fp32.array, [1])[1] >= 0.99
    assert timings["total_s"] > 0


def test_cli_end_to_end(quantized, evaluation_cases, tmp_path):
    _, image, _ = evaluation_cases[0]
    out = tmp_path / "brain.seg.nrrd"
    done = subprocess.run([sys.executable, "-m", "SlicerPTQLib.cli", "--progress-json", "segment",
                           str(quantized.quantized_onnx), str(image), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert any("progress" in line for line in lines)
    assert lines[-1]["result"]["labels"] == str(out)
    assert out.is_file()


def test_second_run_without_out_dir_is_served_from_the_cache(shipped_model_path, calibration_paths,
                                                             tmp_path, monkeypatch):
    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(tmp_path))
    first = pipeline.quantize(shipped_model_path, calibration_paths[:1], num_crops=1)
    second = pipeline.quantize(shipped_model_path, calibration_paths[:1], num_crops=1)
    assert "cached" not in first.report and second.report["cached"] is True
    assert second.quantized_onnx == first.quantized_onnx
    other = pipeline.quantize(shipped_model_path, calibration_paths[:1], num_crops=1, method="percentile")
    assert other.out_dir != first.out_dir


def test_output_folder_that_is_a_file(shipped_model_path, calibration_paths, tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    done = subprocess.run([sys.executable, "-m", "SlicerPTQLib.cli", "quantize", str(shipped_model_path),
                           "--calib", str(calibration_paths[0]), "--out", str(target)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "is a file" in done.stderr and "Traceback" not in done.stderr


def test_bad_calibration_volume_leaves_nothing_behind(shipped_model_path, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    out = tmp_path / "out"
    with pytest.raises(PTQError, match="broken.nii.gz"):
        pipeline.quantize(shipped_model_path, [broken], out)
    assert not out.exists()  # not even the empty folder the run created


def test_empty_calibration_set(shipped_model_path, tmp_path):
    with pytest.raises(PTQError, match="calibration"):
        pipeline.quantize(shipped_model_path, [], tmp_path / "out")


def test_unknown_method_and_bits(shipped_model_path, calibration_paths, tmp_path):
    with pytest.raises(PTQError, match="percentile"):
        pipeline.quantize(shipped_model_path, calibration_paths, tmp_path, method="kl")
    with pytest.raises(PTQError, match="Weight bits"):
        pipeline.quantize(shipped_model_path, calibration_paths, tmp_path, weight_bits=5)


def test_accuracy_budget_is_checked_on_the_calibration_volumes(shipped_model_path, calibration_paths, tmp_path):
    # A budget the fully quantized model meets: no per-layer pass, nothing kept float.
    result = pipeline.quantize(shipped_model_path, calibration_paths[:1], tmp_path / "b", num_crops=1,
                               accuracy_budget=0.9)
    sensitivity = json.loads((result.out_dir / "quantization.json").read_text())["sensitivity"]
    assert sensitivity["checked_on"] == "volumes" and sensitivity["met"]
    assert sensitivity["final_dice"] == sensitivity["full_int8_dice"] >= 0.9
    assert sensitivity["layers_kept_float"] == [] and sensitivity["layers_analysed"] == 0
    assert result.report["settings"]["accuracy_budget"] == 0.9


@pytest.mark.slow
def test_tight_accuracy_budget_keeps_the_worst_layers_float(shipped_model_path, calibration_paths, tmp_path):
    loose = pipeline.quantize(shipped_model_path, calibration_paths[:1], tmp_path / "loose", num_crops=1,
                              accuracy_budget=0.9)
    budget = min(1.0, loose.report["sensitivity"]["full_int8_dice"] + 0.0005)
    tight = pipeline.quantize(shipped_model_path, calibration_paths[:1], tmp_path / "tight", num_crops=1,
                              accuracy_budget=budget)
    sensitivity = tight.report["sensitivity"]
    assert sensitivity["met"] and sensitivity["final_dice"] >= budget
    assert sensitivity["layers_kept_float"] and sensitivity["layers_analysed"] > len(sensitivity["layers_kept_float"])
    assert sum(tight.report["qdq"]["quantized_ops"].values()) < sum(loose.report["qdq"]["quantized_ops"].values())


def _summary(kept, analysed=3, met=True):
    return {"budget_dice": 0.995, "met": met, "checked_on": "volumes", "full_int8_dice": 0.9472,
            "final_dice": 1.0 if len(kept) == analysed else 0.996, "layers_kept_float": kept,
            "layers_analysed": analysed}


def test_sensitivity_outcome_says_how_many_layers_stayed_float():
    assert pipeline.describe_sensitivity(_summary([], analysed=0)).endswith("no layer kept float.")
    assert "1 of 3 layers kept float: conv_a." in pipeline.describe_sensitivity(_summary(["conv_a"]))
    # Met only by keeping everything float (seen on a briefly trained VISTA3D): nothing is INT8, and it says so.
    everything = pipeline.describe_sensitivity(_summary(["conv_a", "conv_b", "add"]))
    assert "only with all 3 layers kept float" in everything and "nothing runs in INT8" in everything
    assert "not met" in pipeline.describe_sensitivity(_summary([], met=False))


def test_accuracy_budget_errors(shipped_model_path, calibration_paths, tmp_path):
    with pytest.raises(PTQError, match="agreement Dice"):
        pipeline.quantize(shipped_model_path, calibration_paths, tmp_path, accuracy_budget=99)
    with pytest.raises(PTQError, match="low-bit"):
        pipeline.quantize(shipped_model_path, calibration_paths, tmp_path, accuracy_budget=0.99, weight_bits=4)


def test_segment_needs_metadata(tmp_path, quantized, evaluation_cases):
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(quantized.quantized_onnx.read_bytes())
    with pytest.raises(PTQError, match="No model metadata .*--spec FILE"):
        pipeline.segment(lonely, evaluation_cases[0][1])


def test_model_input_channels_must_match(quantized, evaluation_cases, tmp_path):
    from SlicerPTQLib.spec import ModelSpec

    spec = ModelSpec.load(quantized.out_dir / "model.json")
    spec.in_channels = 2
    with pytest.raises(PTQError, match="channel"):
        pipeline.quantize(quantized.fp32_onnx, [evaluation_cases[0][1]], tmp_path / "o", spec=spec, num_crops=1)


@pytest.mark.slow
def test_cli_low_bit_weights(shipped_model_path, calibration_paths, evaluation_cases, tmp_path):
    out = tmp_path / "w4"
    done = subprocess.run([sys.executable, "-m", "SlicerPTQLib.cli", "quantize", str(shipped_model_path),
                           "--calib", str(calibration_paths[0]), "--out", str(out), "--num-crops", "2",
                           "--weight-bits", "4"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "quantization.json").read_text())
    assert report["size_mb"]["packed_weights"] < 0.6 * report["size_mb"]["quantized_onnx"]
    _, image, _ = evaluation_cases[0]
    fp32, _ = pipeline.segment(shipped_model_path, image)
    w4, _ = pipeline.segment(out / "model.w4a8.onnx", image)
    assert dice(w4.array, fp32.array, [1])[1] >= 0.99
