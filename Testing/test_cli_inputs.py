"""The catalogue of hostile-but-fair inputs (issue 14): bounds before work, and the command line as a
new user tries it.

Every case is real: real files (a tiny NIfTI claiming 10^12 voxels, macOS
resource forks), real models, real read-only and full file systems (a
tmpfs mounted for the test where the machine allows it). A refusal must be
one sentence naming the file or option, and come before any work or any
output folder.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from SlicerPTQLib import cli, pipeline
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.volume import Volume
from SlicerPTQLib.volumes import read_volume, write_volume
from tiny_models import random_volume, save_tiny_unet


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A small TorchScript UNet (one stride-2 level) with its spec: a build takes seconds."""
    return save_tiny_unet(tmp_path_factory.mktemp("tiny"), spatial_multiple=2)


@pytest.fixture(scope="module")
def tiny_volume(tmp_path_factory) -> Path:
    return random_volume(tmp_path_factory.mktemp("volumes") / "calib.nrrd")


@pytest.fixture(scope="module")
def tiny_build(tiny_model, tiny_volume, tmp_path_factory) -> pipeline.QuantizeResult:
    return pipeline.quantize(tiny_model, [tiny_volume], tmp_path_factory.mktemp("build") / "out", num_crops=2)


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.name == "nt" or os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    """A folder nobody can write to: a read-only tmpfs as root (root ignores modes), mode 0555 otherwise."""
    folder = tmp_path / "read-only"
    if _mount_tmpfs(folder, "ro,size=64k"):
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=True)
        return
    if os.name == "nt" or os.geteuid() == 0:
        pytest.skip("needs a read-only location: root without mount permission here")
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def full_disk(tmp_path) -> Path:
    """A real file system with 16 KiB of space, less than a tiny build needs (a tmpfs; needs root)."""
    folder = tmp_path / "full"
    if not _mount_tmpfs(folder, "size=16k"):
        pytest.skip("needs permission to mount a small tmpfs")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def _cli(*argv: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SlicerPTQLib.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _refused(done: subprocess.CompletedProcess, *phrases: str) -> str:
    """The one-line refusal of a CLI run, checked: exit 1, no traceback, every phrase in it."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, (phrase, done.stderr)
    return done.stderr


def _tripwire(*_, **__):
    raise AssertionError("work started before the inputs were checked")


# --- bounds before work: volumes ------------------------------------------------------------------


def _huge_header_files(folder: Path) -> list:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))
    header.set_data_dtype(np.float32)
    raw = header.binaryblock + b"\0" * 4
    (folder / "huge.nii.gz").write_bytes(gzip.compress(raw))
    (folder / "huge.nii").write_bytes(raw)
    (folder / "huge.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10000 10000 10000\n"
                                       b"encoding: raw\n\n")
    return [folder / name for name in ("huge.nii.gz", "huge.nii", "huge.nrrd")]


def test_volume_header_claiming_10000_cubed_voxels_is_refused_before_reading(tmp_path):
    for path in _huge_header_files(tmp_path):
        assert path.stat().st_size < 400
        start = time.perf_counter()
        with pytest.raises(PTQError) as caught:
            read_volume(path)
        assert time.perf_counter() - start < 2.0
        message = str(caught.value)
        assert str(path) in message and "1,000,000,000,000 voxels" in message and "2,147,483,648" in message


def test_huge_calibration_header_stops_quantize_without_a_traceback(tiny_model, tmp_path):
    huge = _huge_header_files(tmp_path)[0]
    done = _cli("quantize", str(tiny_model), "--calib", str(huge), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _refused(done, "huge.nii.gz claims 1,000,000,000,000 voxels")
    assert not (tmp_path / "out").exists()


# --- bounds before work: options ------------------------------------------------------------------


@pytest.mark.parametrize("argv, phrase", [
    (["--num-crops", "10000000"], "--num-crops must be from 1 to 10,000, got 10,000,000"),
    (["--num-crops", "0"], "--num-crops must be from 1 to 10,000, got 0"),
    (["--seed", "-1"], "--seed must be from 0 to 4,294,967,295, got -1"),
    (["--seed", str(2 ** 40)], "--seed must be from 0 to 4,294,967,295"),
    (["--roi", "2048"], "--roi must be from 1 to 512, got 2,048"),
    (["--roi", "0"], "--roi must be from 1 to 512, got 0"),
    (["--roi", "16", "16"], "--roi takes 1 or 3 sizes"),
])
def test_quantize_options_out_of_bounds_are_refused_before_any_work(argv, phrase, tiny_volume, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", _tripwire)
    out = tmp_path / "new" / "out"
    args = cli._parser().parse_args(["quantize", "model.pt", "--calib", str(tiny_volume), "--out", str(out), *argv])
    with pytest.raises(PTQError, match=phrase):
        cli.run(args)
    assert not out.parent.exists()


def test_pipeline_quantize_bounds_its_settings_too(tiny_volume, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "load_model", _tripwire)
    for settings, phrase in [({"num_crops": 10 ** 7}, "--num-crops"), ({"seed": -1}, "--seed"),
                             ({"roi": (2048, 64, 64)}, "--roi")]:
        with pytest.raises(PTQError, match=phrase):
            pipeline.quantize("model.pt", [tiny_volume], tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, phrase", [
    (["segment", "m.onnx", "i.nii.gz", "--out", "o.nii.gz", "--batch-size", "0"], "--batch-size must be from 1"),
    (["segment", "m.onnx", "i.nii.gz", "--out", "o.nii.gz", "--batch-size", "100000"], "--batch-size must be"),
    (["demo", "--repeats", "0"], "--repeats must be from 1 to 1,000, got 0"),
    (["demo", "--num-crops", "10000000"], "--num-crops must be from 1 to 10,000"),
])
def test_segment_and_demo_options_are_bounded(argv, phrase, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PTQError, match=phrase):
        cli.check_args(cli._parser().parse_args(argv))


def test_roi_not_a_multiple_of_the_network_stride_is_refused(tiny_model, tiny_volume, tmp_path):
    with pytest.raises(PTQError, match=r"--roi 17 17 17 does not fit the network: .*tiny.pt's metadata says patch "
                                       r"sizes must be multiples of 2 \(spatial_multiple\). Use e.g. --roi 16"):
        pipeline.quantize(tiny_model, [tiny_volume], tmp_path / "out", roi=(17, 17, 17))
    assert not (tmp_path / "out").exists()


def test_roi_33_on_deepbet_is_refused_with_its_multiple_of_32(shipped_model_path, tiny_volume, tmp_path):
    done = _cli("quantize", str(shipped_model_path), "--calib", str(tiny_volume), "--roi", "33",
                "--out", str(tmp_path / "out"), cwd=tmp_path)
    _refused(done, "--roi 33 33 33 does not fit the network", "multiples of 32", "--roi 32 or --roi 64")
    assert not (tmp_path / "out").exists()


def test_failed_quantize_leaves_no_empty_output_folder(tiny_model, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume at all")
    missing = tmp_path / "missing.nii.gz"
    for calib, phrase in [(missing, "does not exist"), (broken, "Cannot read")]:
        out = tmp_path / "a" / "b" / "out"
        done = _cli("quantize", str(tiny_model), "--calib", str(calib), "--out", str(out), cwd=tmp_path)
        _refused(done, str(calib), phrase)
        assert not (tmp_path / "a").exists(), list((tmp_path / "a").rglob("*"))


# --- output locations -------------------------------------------------------------------------------


def test_segment_checks_its_output_before_any_inference(tiny_build, tiny_volume, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "segment", _tripwire)
    model = str(tiny_build.quantized_onnx)
    (tmp_path / "folder.nii.gz").mkdir()
    for out, phrase in [(tmp_path / "no" / "such" / "labels.nii.gz", "does not exist. Create it first"),
                        (tmp_path / "folder.nii.gz", "is a folder"),
                        (tmp_path / "labels.txt", "write a label map as .nii.gz, .nii, .nrrd")]:
        with pytest.raises(PTQError, match=phrase):
            cli.run(cli._parser().parse_args(["segment", model, str(tiny_volume), "--out", str(out)]))
    with pytest.raises(PTQError, match="Image .* is a folder, not a file"):
        cli.run(cli._parser().parse_args(["segment", model, str(tmp_path), "--out", str(tmp_path / "l.nii.gz")]))
    with pytest.raises(PTQError, match="Model .*nothing.onnx does not exist"):
        cli.run(cli._parser().parse_args(["segment", str(tmp_path / "nothing.onnx"), str(tiny_volume),
                                          "--out", str(tmp_path / "l.nii.gz")]))


def test_read_only_output_locations_are_one_sentence(tiny_build, tiny_model, tiny_volume, read_only_folder,
                                                     tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "segment", _tripwire)
    model = str(tiny_build.quantized_onnx)
    cases = [["segment", model, str(tiny_volume), "--out", str(read_only_folder / "labels.nii.gz")],
             ["evaluate", str(tiny_model), model, "--images", str(tiny_volume),
              "--json", str(read_only_folder / "table.json")],
             ["report", str(tmp_path / "results.json"), "--out", str(read_only_folder / "report")],
             ["quantize", str(tiny_model), "--calib", str(tiny_volume), "--out", str(read_only_folder / "q")]]
    (tmp_path / "results.json").write_text("[]")
    for argv in cases:
        with pytest.raises(PTQError, match=f"Cannot write --(out|json) {read_only_folder}.*is not writable"):
            cli.run(cli._parser().parse_args(argv))
    # The writer itself, reached without the CLI's checks, also answers in one sentence.
    with pytest.raises(PTQError, match=f"Cannot write {read_only_folder / 'x.nii.gz'}: "):
        write_volume(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)), read_only_folder / "x.nii.gz")


def test_full_disk_during_quantize_is_one_sentence_and_leaves_nothing(tiny_model, tiny_volume, full_disk):
    out = full_disk / "out"
    with pytest.raises(PTQError, match=f"(Cannot write the build into {out}|Cannot write {out}).*No space left"):
        pipeline.quantize(tiny_model, [tiny_volume], out, num_crops=1)
    assert list(full_disk.iterdir()) == []


def test_full_disk_while_writing_labels_names_the_users_file(full_disk, tmp_path):
    target = full_disk / "labels.nii"
    big = Volume(np.ones((64, 64, 64), np.float32), np.eye(4))
    with pytest.raises(PTQError) as caught:
        write_volume(big, target)
    message = str(caught.value)
    assert message.startswith(f"Cannot write {target}: No space left") and ".tmp" not in message
    assert list(full_disk.iterdir()) == []


def test_cli_turns_an_unforeseen_os_error_into_one_sentence(tmp_path, monkeypatch, capsys):
    def disk_gone(*_, **__):
        raise OSError(5, "Input/output error", str(tmp_path / "labels.nii.gz"))

    monkeypatch.setattr(cli, "run", disk_gone)
    assert cli.main(["info"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("slicer-ptq: error: Input/output error: ") and "labels.nii.gz" in error


# --- calibration folders ------------------------------------------------------------------------


def test_macos_and_hidden_files_in_a_calibration_folder_are_skipped(tiny_model, tiny_volume, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "scan.nrrd").write_bytes(tiny_volume.read_bytes())
    (folder / "._scan.nrrd").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / ".scan.nii.gz.swp").write_bytes(b"editor")
    assert cli.expand_volumes([str(folder)]) == [folder / "scan.nrrd"]
    done = _cli("quantize", str(tiny_model), "--calib", str(folder), "--out", str(tmp_path / "out"),
                "--num-crops", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.int8.onnx").is_file()


# --- evaluate and report ----------------------------------------------------------------------------


def _mask(path: Path, dtype, value=1.0) -> Path:
    array = np.zeros((20, 20, 20), dtype=dtype)
    array[4:16, 4:16, 4:16] = value
    return write_volume(Volume(array=array, affine=np.diag([2.0, 2.0, 2.0, 1.0])), path)


def test_evaluate_takes_binary_masks_of_any_type_and_says_so(tiny_model, tiny_build, tiny_volume, tmp_path,
                                                              caplog):
    from SlicerPTQLib.evaluation import evaluate_models

    masks = [_mask(tmp_path / "float.nii.gz", np.float32), _mask(tmp_path / "u8.nrrd", np.uint8, 255)]
    with caplog.at_level("WARNING"):
        rows = evaluate_models(tiny_model, tiny_build.quantized_onnx, [tiny_volume, tiny_volume], masks)
    assert len(rows) == 2 and all(0.0 <= row["dice_fp32_vs_reference"] <= 1.0 for row in rows)
    assert rows[0]["dice_fp32_vs_reference"] == pytest.approx(rows[1]["dice_fp32_vs_reference"])
    notes = " ".join(record.getMessage() for record in caplog.records)
    assert "float.nii.gz holds float32 values [0, 1]; taken as a binary mask: voxels > 0 are label 1" in notes, notes
    assert "u8.nrrd holds uint8 values [0, 255]" in notes


def test_evaluate_checks_every_input_before_loading_a_model(tiny_model, tiny_build, tiny_volume, tmp_path,
                                                             monkeypatch):
    from SlicerPTQLib import runtimes
    from SlicerPTQLib.evaluation import evaluate_models

    monkeypatch.setattr(runtimes, "create_runtime", _tripwire)
    cases = [([tiny_volume], [tmp_path / "nope.nii.gz"], "Label map .*nope.nii.gz does not exist"),
             ([tmp_path], None, "Image .* is a folder, not a file"),
             ([tiny_volume], [_mask(tmp_path / "labels.nii.gz", np.float32, 0.5)], None)]
    for images, references, phrase in cases[:2]:
        with pytest.raises(PTQError, match=phrase):
            evaluate_models(tiny_model, tiny_build.quantized_onnx, images, references)
    # A fine input passes the checks and reaches the models (the tripwire).
    with pytest.raises(AssertionError, match="work started"):
        evaluate_models(tiny_model, tiny_build.quantized_onnx, *cases[2][:2])


def test_report_reads_evaluates_json(tiny_model, tiny_build, tiny_volume, tmp_path):
    table = tmp_path / "table.json"
    done = _cli("evaluate", str(tiny_model), str(tiny_build.quantized_onnx), "--images", str(tiny_volume),
                "--labels", str(_mask(tmp_path / "mask.nii.gz", np.float32)), "--json", str(table), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "taken as a binary mask" in done.stderr
    done = _cli("report", str(table), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "openvino int8" in page and "Dice vs reference" in page
    charts = {path.name for path in (tmp_path / "report").glob("*.png")}
    assert {"table_dice.png", "table_volume_time.png", "table_agreement.png"} <= charts


# --- import cost --------------------------------------------------------------------------------


def test_segment_of_a_one_window_volume_never_imports_monai(tiny_build, tmp_path):
    image = random_volume(tmp_path / "small.nii.gz", seed=3, shape=(12, 14, 10))
    code = ("import sys; from SlicerPTQLib import pipeline; "
            f"labels, timings = pipeline.segment({str(tiny_build.quantized_onnx)!r}, {str(image)!r}, "
            "runtime='onnxruntime', self_check=False); "
            "assert labels.array.shape == (12, 14, 10), labels.array.shape; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai')[:3])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_monai_import_is_not_timed_as_network(tiny_build, tmp_path):
    image = random_volume(tmp_path / "big.nii.gz", seed=4, shape=(40, 40, 40))
    code = ("import json, sys; from SlicerPTQLib import pipeline; "
            f"labels, timings = pipeline.segment({str(tiny_build.quantized_onnx)!r}, {str(image)!r}, "
            "runtime='onnxruntime', self_check=False); "
            "timings.pop('self_check'); print(json.dumps(timings))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    timings = json.loads(done.stdout.strip().splitlines()[-1])
    assert timings["import_s"] > timings["network_s"]  # a fresh process pays MONAI's import, outside the stage
    stages = timings["preprocess_s"] + timings["network_s"] + timings["restore_s"]
    assert stages == pytest.approx(timings["total_s"], rel=1e-6)


# --- messages and help ----------------------------------------------------------------------------


def test_every_cli_option_has_help_text():
    parser = cli._parser()
    subcommands = next(action for action in parser._actions if action.dest == "command").choices
    missing = [f"{name} {action.dest}" for name, sub in subcommands.items() for action in sub._actions
               if action.dest != "help" and not (action.help or "").strip()]
    assert missing == []


def test_info_shows_runtime_versions(capsys):
    assert cli.main(["info"]) == 0
    runtimes = json.loads(capsys.readouterr().out)["runtimes"]
    assert runtimes and all(value for value in runtimes.values())
    import onnxruntime

    assert runtimes["onnxruntime"] == onnxruntime.__version__


def test_offline_error_suggests_only_flags_that_exist():
    from SlicerPTQLib import fetch

    suggestion = fetch._USE_OWN_FILES
    assert "--model" not in suggestion
    parser = cli._parser()
    quantize = next(action for action in parser._actions if action.dest == "command").choices["quantize"]
    flags = {flag for action in quantize._actions for flag in action.option_strings}
    assert {word for word in suggestion.split() if word.startswith("--")} <= flags


def test_arch_args_that_are_not_json_are_one_sentence(capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "w.pt", "--calib", "c.nii.gz", "--out", "o", "--arch", "UNet", "--arch-args", "{bad"])
    error = capsys.readouterr().err
    assert "argument --arch-args: is not valid JSON" in error and "Traceback" not in error


def test_missing_volume_and_folder_are_told_apart(tmp_path):
    with pytest.raises(PTQError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz")
    folder = tmp_path / "scan.nii.gz"
    folder.mkdir()
    with pytest.raises(PTQError, match="is a folder, not a file"):
        read_volume(folder)


def test_test_extra_installs_jsonschema():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(item.split("[")[0].split("=")[0].split(">")[0].strip() == "jsonschema"
               for item in project["optional-dependencies"]["test"])


# --- the demo is never silent ---------------------------------------------------------------------


def test_demo_says_what_it_does_before_each_long_step(tmp_path, monkeypatch, capsys):
    from SlicerPTQLib import demo, shipped

    def offline():
        raise PTQError("offline")

    monkeypatch.setattr(shipped, "shipped_model", offline)
    with pytest.raises(PTQError):
        demo.run_demo(tmp_path / "demo")
    assert "fetching the shipped model and volumes" in capsys.readouterr().out


def test_text_progress_shows_stage_starts_and_ends():
    import io

    from SlicerPTQLib.progress import text_lines_callback

    stream = io.StringIO()
    report = text_lines_callback(stream)
    for done in range(4):
        report("calibrate", done, 3)
    report("self-check", 0, 1)
    report("self-check", 1, 1)
    assert stream.getvalue().splitlines() == ["  calibrate: 0/3", "  calibrate: 3/3 done", "  self-check: 0/1",
                                              "  self-check: 1/1 done"]


# --- the report -------------------------------------------------------------------------------------


def _evaluation_rows(stages: bool) -> list:
    rows = []
    for index, name in enumerate(("mni152", "colin27")):
        row = {"volume": name, "fp32": "torch fp32", "quantized": "openvino int8",
               "dice_quantized_vs_fp32": 0.995 - index / 100, "time_fp32_s": 2.0, "time_quantized_s": 0.8,
               "dice_fp32_vs_reference": 0.95, "dice_quantized_vs_reference": 0.945}
        if stages:
            row["timings_fp32"] = {"preprocess_s": 0.5, "network_s": 1.2, "restore_s": 0.3, "total_s": 2.0}
            row["timings_quantized"] = {"preprocess_s": 0.5, "network_s": 0.1, "restore_s": 0.2, "total_s": 0.8}
        rows.append(row)
    return rows


@pytest.fixture
def figures(monkeypatch) -> dict:
    """Every chart the report saves, by file name, as the real matplotlib figure (inspected before closing)."""
    from SlicerPTQLib import report

    drawn = {}
    save = report._save

    def keep(fig, path):
        drawn[Path(path).name] = {
            "titles": [ax.get_title() for ax in fig.axes], "xlabels": [ax.get_xlabel() for ax in fig.axes],
            "texts": [text.get_text() for ax in fig.axes for text in ax.texts],
            "legends": [[(text.get_text(), text.get_fontsize()) for text in ax.get_legend().get_texts()]
                        for ax in fig.axes if ax.get_legend() is not None]}
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return drawn


def test_report_draws_stages_int8_vs_fp32_and_a_legible_legend(tmp_path, figures):
    from SlicerPTQLib.report import build_report

    results = tmp_path / "table.json"
    results.write_text(json.dumps(_evaluation_rows(stages=True)))
    build_report(results, tmp_path / "report")
    stages = figures["table_volume_time.png"]["legends"][0]
    assert [name for name, _ in stages] == ["preprocess", "sliding window", "labels + resample back"]
    dice_legend = figures["table_dice.png"]["legends"][0]
    assert [name for name, _ in dice_legend] == ["torch fp32", "openvino int8"]
    assert min(size for _, size in dice_legend) >= 9
    agreement = figures["table_agreement.png"]
    assert agreement["titles"] == ["Agreement with FP32", "Time against FP32 (below 1: faster)"]
    assert "table_agreement.png" in (tmp_path / "report" / "index.html").read_text()


def test_report_drops_the_stage_chart_without_stages_and_says_mib(tmp_path, figures):
    from SlicerPTQLib.report import build_report

    results = tmp_path / "table.json"
    results.write_text(json.dumps(_evaluation_rows(stages=False)))
    build_report(results, tmp_path / "report")
    assert "table_volume_time.png" not in figures and not (tmp_path / "report" / "table_volume_time.png").exists()
    demo = {"model": "/m/bbox_model.pt", "size_mb": {"torchscript": 1.5, "fp32_onnx": 1.4, "quantized_onnx": 0.4},
            "patch_latency": [{"backend": "PyTorch eager FP32", "median_s": 0.5, "p90_s": 0.6},
                              {"backend": "OpenVINO INT8", "median_s": 0.1, "p90_s": 0.12}],
            "volumes": _evaluation_rows(stages=True)}
    (tmp_path / "demo.json").write_text(json.dumps(demo))
    page = build_report(tmp_path / "demo.json", tmp_path / "demo_report").read_text()
    size = figures["bbox_model_pt_size.png"]
    assert "MiB" in size["xlabels"][0] and all(text.endswith("MiB") for text in size["texts"])
    assert "MB)" not in page and "file (MiB)" in page
    assert "bbox_model_pt_volume_time.png" in figures and "bbox_model_pt_agreement.png" in figures


# --- messages name the user's file or node ------------------------------------------------------------


def test_nan_volume_node_is_named_not_the_workers_temporary_file(tiny_build, request):
    pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
    from SlicerPTQLib import slicer_nodes
    from SlicerPTQLib.logic import PTQLogic

    scene = request.getfixturevalue("mrml_scene")
    array = np.full((20, 20, 20), 100.0, np.float32)
    array[3, 4, 5] = np.nan
    node = slicer_nodes.add_volume_node(scene, Volume(array=array, affine=np.eye(4), name="head T1"), name="head T1")
    with pytest.raises(PTQError) as caught:
        PTQLogic().segment(tiny_build.quantized_onnx, node, runtime="onnxruntime")
    message = str(caught.value)
    assert message.startswith("Volume 'head T1' has 1 NaN or infinite voxel(s)") and "slicer-ptq-segment" not in message


def test_empty_onnx_and_junk_zip_are_named_for_what_they_are(tiny_volume, tmp_path):
    from SlicerPTQLib.models import load_model

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(PTQError, match=f"{empty} holds no ONNX graph \\(0 bytes\\)"):
        load_model(empty)
    junk = tmp_path / "junk.pt"
    import zipfile

    with zipfile.ZipFile(junk, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(PTQError) as caught:
        load_model(junk)
    assert "state dict" not in str(caught.value) and f"Cannot load {junk} as TorchScript" in str(caught.value)
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(PTQError, match="holds weights only \\(a state dict\\)"):
        load_model(weights)
    from SlicerPTQLib.spec import ModelSpec

    ModelSpec(name="empty").save(tmp_path / "empty.json")  # the CLI refuses a model without metadata before reading it
    done = _cli("quantize", str(empty), "--calib", str(tiny_volume), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert ".partial" not in _refused(done, "empty.onnx holds no ONNX graph")
