"""The catalogue of hostile-but-fair inputs and faults (issue 14): security and integrity.

Each case is real: real bundles on disk, real builds, real processes killed
with SIGKILL, real file modes. Security: no code runs from a model file
unless the user trusts it. Integrity: no corrupt or half-published build is
served, no worker outlives its driver, no partial stays forever, outputs
honour the umask.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from SlicerPTQLib import atomic, build_cache, pipeline
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.models import build_monai_network, load_model
from SlicerPTQLib.spec import ModelSpec, sidecar_path
from SlicerPTQLib.volumes import write_volume
from tiny_models import UNET_ARGS, random_volume, save_tiny_unet

PAYLOAD = "$__import__('os').system('touch MARKER') or [16, 16, 16]"
HOUR = 3600.0


# --- fixtures -----------------------------------------------------------------------------------


def _bundle(folder: Path, **changes) -> Path:
    """A MONAI bundle with a small UNet; ``changes`` replace top-level config keys."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.manual_seed(0)
    torch.save(build_monai_network("UNet", UNET_ARGS).state_dict(), folder / "models" / "model.pt")
    inference = {
        "imports": ["$import glob"],  # never read, so never run
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "UNet", **UNET_ARGS},
        "network": "$@network_def.to(@device)",
        "roi": [16, 16, 16],
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "overlap": 0.25},
    }
    inference.update(changes)
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    (folder / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {
        "inputs": {"image": {"num_channels": 1, "modality": "MR"}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "tissue"}}}}}))
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A small TorchScript UNet with its spec beside it: a build takes seconds."""
    return save_tiny_unet(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_volume(tmp_path_factory) -> Path:
    return random_volume(tmp_path_factory.mktemp("volumes") / "calib.nrrd")


@pytest.fixture
def builds(tmp_path, monkeypatch) -> Path:
    """A build cache of this test's own."""
    folder = tmp_path / "builds"
    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(folder))
    return folder


def _age(path: Path, seconds: float) -> None:
    """Make ``path`` and everything in it look untouched for ``seconds``."""
    then = time.time() - seconds
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(item, (then, then), follow_symlinks=False)


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


# --- security: no code from a model file ----------------------------------------------------------


def test_bundle_expression_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundle = _bundle(tmp_path / "bundle", inferer={"_target_": "SlidingWindowInferer", "roi_size": PAYLOAD})
    with pytest.raises(PTQError, match=r"key 'inferer::roi_size' is a Python expression .*--trust-bundle-code"):
        load_model(bundle)
    assert not (tmp_path / "MARKER").exists()


def test_bundle_expression_is_refused_by_the_cli_without_a_traceback(tmp_path):
    bundle = _bundle(tmp_path / "bundle", roi=PAYLOAD)
    done = subprocess.run([sys.executable, "-m", "SlicerPTQLib.cli", "quantize", str(bundle),
                           "--calib", str(random_volume(tmp_path / "calib.nrrd")), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "key 'roi' is a Python expression" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("network_def, key", [
    ({"_target_": "os.system", "command": "touch MARKER"}, "network_def::_target_"),
    ({"_target_": "monai.bundle.scripts.run"}, "network_def::_target_"),
    ({"_target_": "monai.networks.nets.drop_connect"}, "network_def::_target_"),
    ({"_target_": "UNet", **UNET_ARGS, "act": {"_target_": "os.system", "command": "touch MARKER"}},
     "network_def::act"),
    ({"_target_": "UNet", **UNET_ARGS, "channels": "$__import__('os').system('touch MARKER') or [4, 8]"},
     "network_def::channels"),
    ({"_target_": "UNet", **UNET_ARGS, "_requires_": "$__import__('os').system('touch MARKER')"},
     "network_def::_requires_"),
])
def test_bundle_network_other_than_a_literal_network_class_is_refused(tmp_path, monkeypatch, network_def, key):
    monkeypatch.chdir(tmp_path)
    bundle = _bundle(tmp_path / "bundle", network_def=network_def)
    with pytest.raises(PTQError, match=rf"key '{key}'.*--trust-bundle-code"):
        load_model(bundle)
    assert not (tmp_path / "MARKER").exists()


def test_yaml_bundle_is_read_as_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundle = _bundle(tmp_path / "bundle")
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    (bundle / "configs" / "inference.json").unlink()
    import yaml

    config["inferer"]["roi_size"] = PAYLOAD
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(PTQError, match="inferer::roi_size"):
        load_model(bundle)
    (bundle / "configs" / "inference.yaml").write_text("network_def: !!python/object/apply:os.system "
                                                       "['touch MARKER']\n")
    with pytest.raises(PTQError, match="Cannot read bundle config .*inference.yaml"):
        load_model(bundle)
    assert not (tmp_path / "MARKER").exists()


def test_trusted_bundle_code_is_evaluated_by_monai(tmp_path):
    bundle = _bundle(tmp_path / "bundle", roi="$[8 * 2] * 3")
    with pytest.raises(PTQError, match="key 'roi'"):
        load_model(bundle)
    assert load_model(bundle, trust_bundle_code=True).spec.roi_size == (16, 16, 16)


def test_plain_bundle_quantizes_and_segments_end_to_end(tmp_path):
    bundle = _bundle(tmp_path / "bundle")
    loaded = load_model(bundle)
    assert loaded.spec.roi_size == (16, 16, 16) and loaded.spec.overlap == 0.25
    assert loaded.spec.intensity.kind == "zscore" and loaded.spec.intensity.nonzero
    image = random_volume(tmp_path / "image.nii.gz", seed=1)
    result = pipeline.quantize(bundle, [image], tmp_path / "out", num_crops=2)
    labels, _ = pipeline.segment(result.quantized_onnx, image, runtime="onnxruntime")
    assert labels.array.shape == (20, 20, 20)
    assert build_cache.verify(tmp_path / "out") is None


def test_arch_accepts_networks_only(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(build_monai_network("UNet", UNET_ARGS).state_dict(), weights)
    for name in ("drop_connect", "get_pretrained_resnet_medicalnet", "BlockArgs", "_utils"):
        with pytest.raises(PTQError, match=rf"'{name}' is not a network|Unknown architecture '{name}'") as caught:
            load_model(weights, arch=name, arch_args={})
        assert "UNet" in str(caught.value)
    with pytest.raises(PTQError, match="pretrained weights, which would be downloaded"):
        load_model(weights, arch="UNet", arch_args={**UNET_ARGS, "pretrained": True})


def test_pickled_model_error_never_advises_weights_only_false(tmp_path):
    pickled = tmp_path / "whole_model.pt"
    torch.save(build_monai_network("UNet", UNET_ARGS), pickled)  # the whole module object, not a state dict
    with pytest.raises(PTQError) as caught:
        load_model(pickled, arch="UNet", arch_args=UNET_ARGS)
    message = str(caught.value)
    assert "weights_only" not in message and "pickled Python objects" in message
    assert "state_dict()" in message and str(pickled) in message


# --- integrity: the build cache -----------------------------------------------------------------------


def _int8_weight_offset(model_file: Path) -> tuple:
    data = model_file.read_bytes()
    for tensor in onnx.load(str(model_file)).graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.raw_data) >= 64:
            offset = data.find(tensor.raw_data)
            if offset >= 0:
                return offset, len(tensor.raw_data)
    raise AssertionError(f"no INT8 weight found in {model_file}")


def test_corrupted_int8_weight_in_the_cache_is_rebuilt_not_served(tiny_model, tiny_volume, builds, caplog):
    first = pipeline.quantize(tiny_model, [tiny_volume], num_crops=1)
    assert first.out_dir.parent == builds and "cached" not in first.report
    good = first.quantized_onnx.read_bytes()
    offset, length = _int8_weight_offset(first.quantized_onnx)
    with open(first.quantized_onnx, "r+b") as stream:
        stream.seek(offset)
        stream.write(np.random.default_rng(0).integers(0, 256, length, dtype=np.uint8).tobytes())
    onnx.load(str(first.quantized_onnx))  # still a valid model: only the check catches it
    with caplog.at_level("WARNING"):
        second = pipeline.quantize(tiny_model, [tiny_volume], num_crops=1)
    assert "cached" not in second.report and second.out_dir == first.out_dir
    assert "model.int8.onnx changed since it was built" in caplog.text
    assert second.quantized_onnx.read_bytes() == good
    assert pipeline.quantize(tiny_model, [tiny_volume], num_crops=1).report["cached"] is True


def test_truncated_cached_model_is_rebuilt(tiny_model, tiny_volume, builds):
    first = pipeline.quantize(tiny_model, [tiny_volume], num_crops=1)
    size = first.quantized_onnx.stat().st_size
    with open(first.quantized_onnx, "r+b") as stream:
        stream.truncate(size // 2)
    second = pipeline.quantize(tiny_model, [tiny_volume], num_crops=1)
    assert "cached" not in second.report and second.quantized_onnx.stat().st_size == size
    # No partial, no aside copy left.
    assert [path.name for path in build_cache.build_entries(builds)] == [first.out_dir.name]


def test_build_without_a_valid_manifest_is_not_served(tiny_model, tiny_volume, builds, tmp_path):
    from SlicerPTQLib.logic import BuiltModel

    first = pipeline.quantize(tiny_model, [tiny_volume], num_crops=1)
    assert BuiltModel.fromFolder(first.out_dir) is not None
    (first.out_dir / build_cache.MANIFEST_NAME).unlink()
    assert BuiltModel.fromFolder(first.out_dir) is None
    assert "cached" not in pipeline.quantize(tiny_model, [tiny_volume], num_crops=1).report
    (first.out_dir / build_cache.MANIFEST_NAME).write_text("{not json")
    assert BuiltModel.fromFolder(first.out_dir) is None
    # One model's files beside another build's report and manifest (an interrupted file-by-file publish).
    other = pipeline.quantize(tiny_model, [tiny_volume], tmp_path / "other", num_crops=1, method="percentile")
    for name in (pipeline.REPORT_NAME, build_cache.MANIFEST_NAME):
        (first.out_dir / name).write_bytes((other.out_dir / name).read_bytes())
    assert BuiltModel.fromFolder(first.out_dir) is None


def test_interrupted_publish_into_a_user_folder_is_never_taken_for_complete(tiny_model, tiny_volume, tmp_path,
                                                                            monkeypatch):
    from SlicerPTQLib.logic import BuiltModel

    out = tmp_path / "out"
    pipeline.quantize(tiny_model, [tiny_volume], out, num_crops=1)
    assert BuiltModel.fromFolder(out) is not None
    moves = []

    class KilledAfterTwoMoves:
        """``os`` for build_cache only, dying (as by SIGKILL) between two renames of the publish."""

        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, source, target):
            if len(moves) == 2:
                raise KeyboardInterrupt
            moves.append(target)
            os.replace(source, target)

    monkeypatch.setattr(build_cache, "os", KilledAfterTwoMoves())
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(tiny_model, [tiny_volume], out, num_crops=1, method="percentile")
    monkeypatch.undo()
    assert len(moves) == 2 and BuiltModel.fromFolder(out) is None
    assert "no manifest" in build_cache.verify(out)


# --- integrity: processes and partial files -----------------------------------------------------------


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_worker_exits_when_its_driver_is_killed(tmp_path):
    """A real driver process runs a real worker (a CLI blocked opening a FIFO as its model), then dies by SIGKILL."""
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    ModelSpec(name="model", roi_size=(16, 16, 16)).save(sidecar_path(fifo))  # metadata, or quantize refuses at once
    random_volume(tmp_path / "c.nrrd")
    driver = textwrap.dedent(f"""
        import sys, time
        from SlicerPTQLib.worker_process import WorkerProcess, worker_command, worker_environment
        command = worker_command(["quantize", {str(fifo)!r}, "--calib", {str(tmp_path / "c.nrrd")!r},
                                  "--out", {str(tmp_path / "out")!r}])
        worker = WorkerProcess(command, env=worker_environment()).start()
        print(worker.process.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    worker_pid = int(parent.stdout.readline())
    try:
        time.sleep(3.0)
        assert _running(worker_pid), "the worker ended before its driver was killed"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(worker_pid), "the worker outlived the process driving it"
    finally:
        if _running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps orphans here)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return atomic.process_alive(pid)


def _partials(folder: Path, dead: int) -> dict:
    """Partials a SIGKILL left (old, owner gone), one still being written, one of a live owner."""
    made = {
        "stale": folder / f".partial-{dead}-abcd1234",
        "stale_legacy": folder / ".partial-abcd1234",  # from an older version: no owner pid, two days old
        "fresh": folder / f".partial-{dead}-fresh123",
        "live": folder / f".partial-{os.getpid()}-live1234",
    }
    for path in made.values():
        path.mkdir(parents=True)
        (path / "model.fp32.onnx").write_bytes(b"half")
    _age(made["stale"], 2 * HOUR)
    _age(made["stale_legacy"], 48 * HOUR)
    _age(made["live"], 2 * HOUR)
    return made


def test_stale_partials_in_the_output_folder_are_removed_on_the_next_run(tiny_model, tiny_volume, tmp_path):
    out = tmp_path / "out"
    made = _partials(out, _dead_pid())
    pipeline.quantize(tiny_model, [tiny_volume], out, num_crops=1)
    assert not made["stale"].exists() and not made["stale_legacy"].exists()
    assert made["fresh"].exists() and made["live"].exists()


def test_stale_atomic_temp_files_are_removed_on_the_next_write(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".labels.nii.gz.{dead}-abcd1234.tmp.nii.gz"
    legacy = tmp_path / ".labels.nii.gz.abcd1234.tmp.nii.gz"
    fresh = tmp_path / f".labels.nii.gz.{dead}-fresh123.tmp.nii.gz"
    for path in (stale, legacy, fresh):
        path.write_bytes(b"half")
    _age(stale, 2 * HOUR)
    _age(legacy, 48 * HOUR)
    random_volume(tmp_path / "labels.nii.gz")
    assert not stale.exists() and not legacy.exists() and fresh.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([fresh.name, "labels.nii.gz"])


def test_killed_fetch_work_folder_is_removed_by_the_next_fetch(tmp_path, monkeypatch):
    from SlicerPTQLib.fetch import Source, fetch

    monkeypatch.setenv("SLICER_PTQ_CACHE", str(tmp_path))
    dead = _dead_pid()
    stale, fresh = tmp_path / f".fetch-{dead}-abcd1234", tmp_path / f".fetch-{dead}-fresh123"
    for path in (stale, fresh):
        (path / "download").mkdir(parents=True)
        (path / "download" / "archive.deb").write_bytes(b"half")
    _age(stale, 2 * HOUR)
    missing = Source("debian", "slicer-ptq-no-such-package", "0", "0" * 64, "usr/share/x", "0" * 64)
    with pytest.raises(PTQError):  # apt-get (where present) knows no such package: no network needed
        fetch(missing)
    assert not stale.exists() and fresh.exists()


# --- integrity: file modes ---------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_honour_the_umask(umask, tiny_model, tiny_volume, tmp_path, builds):
    from SlicerPTQLib.evaluation import write_json
    from SlicerPTQLib.segmentation_io import write_seg_nrrd

    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        result = pipeline.quantize(tiny_model, [tiny_volume], out, num_crops=1)
        cached = pipeline.quantize(tiny_model, [tiny_volume], num_crops=1)
        labels, _ = pipeline.segment(result.quantized_onnx, tiny_volume, runtime="onnxruntime")
        written = [*out.iterdir(), *cached.out_dir.iterdir(),
                   write_volume(labels, tmp_path / "labels.nii.gz", labels=True),
                   write_seg_nrrd(labels, result.spec, tmp_path / "labels.seg.nrrd")]
        write_json({"rows": []}, tmp_path / "table.json")
        written.append(tmp_path / "table.json")
    finally:
        os.umask(previous)
    modes = {path.name: oct(_mode(path)) for path in written if path.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert {"model.int8.onnx", "model.fp32.onnx", "model.json", "quantization.json",
            build_cache.MANIFEST_NAME} <= set(modes)
    assert _mode(out) == _mode(cached.out_dir) == 0o777 & ~umask


def test_builds_go_to_a_temporary_cache_in_tests(tiny_model, tiny_volume, temporary_builds_cache):
    from SlicerPTQLib.fetch import cache_dir

    folder = pipeline.build_folder(tiny_model, ModelSpec(name="tiny"), [tiny_volume], {})
    assert folder.parent == temporary_builds_cache == build_cache.builds_dir()
    assert cache_dir() not in folder.parents  # the fetched-files cache stays shared, the builds do not
