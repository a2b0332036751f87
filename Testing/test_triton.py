"""A real Triton Inference Server on loopback, serving the quantized shipped model.

The server is NVIDIA's ``tritonserver`` from the ``nvidia-pytriton`` wheel
(installed apart, :mod:`SlicerPTQLib.triton_server`), hosting the
project's OpenVINO runtime in its Python backend. Cohorts of the shipped
evaluation volumes segmented through it must equal the local run voxel for
voxel, from the CLI and from the Logic; a server killed mid-cohort must
give each remaining volume a clear error and leave a resumable folder.
Everything skips (never passes) where the server cannot run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from SlicerPTQLib import triton_server
from SlicerPTQLib.cohort import remote_source, segment_cohort
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.triton_export import export_repository, model_name
from SlicerPTQLib.volumes import read_volume


@pytest.fixture(scope="module")
def server_home() -> Path:
    for module in ("tritonclient.http", "tritonclient.grpc"):
        pytest.importorskip(module, reason="the Triton client is not installed: pip install '.[test]' (or "
                                           "'tritonclient[grpc,http]')")
    try:
        triton_server.install()
    except PTQError as exc:
        pytest.skip(f"Triton server not installable here: {exc}")
    reason = triton_server.unavailable_reason() or triton_server.python_backend_reason()
    if reason:
        pytest.skip(f"Triton server cannot run here: {reason}")
    return triton_server.triton_home()


@pytest.fixture(scope="module")
def build(tmp_path_factory, shipped_model_path, calibration_paths):
    from SlicerPTQLib import pipeline

    return pipeline.quantize(shipped_model_path, calibration_paths[:1], tmp_path_factory.mktemp("build"),
                             num_crops=2)


@pytest.fixture(scope="module")
def repository(build, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    export_repository(build.out_dir, repo)
    return repo


@pytest.fixture(scope="module")
def python_model(build) -> str:
    return model_name(build.spec, "python")


@pytest.fixture(scope="module")
def server(server_home, repository, python_model):
    with triton_server.TritonServer(repository, models=[python_model]) as running:
        yield running


@pytest.fixture(scope="module")
def volumes(evaluation_cases, tmp_path_factory):
    """The shipped evaluation volumes in one folder."""
    folder = tmp_path_factory.mktemp("cohort-in")
    for _, image, _ in evaluation_cases:
        shutil.copyfile(image, folder / image.name)
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SlicerPTQLib.cli", *args], capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def local_cohort(build, volumes, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort-local")
    completed = _cli("segment", str(build.quantized_onnx), str(volumes), "--out-dir", str(out))
    assert completed.returncode == 0, completed.stderr
    return out


def _labels(folder: Path):
    return {path.name: read_volume(path).array for path in sorted(folder.glob("*.nii.gz"))}


def test_exported_repository_layout(repository, build, python_model):
    models = json.loads((repository / "slicer_ptq_repository.json").read_text())["models"]
    assert models == sorted([model_name(build.spec, "openvino"), python_model])
    config = (repository / python_model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "dynamic_batching" in config
    assert f"dims: {[1] + list(build.spec.roi_size)}" in config
    assert (repository / python_model / "1" / "model.py").is_file()
    assert json.loads((repository / python_model / "slicer_ptq.json").read_text())["labels"] == {"1": "brain"}
    assert (repository / model_name(build.spec, "openvino") / "1" / "model.onnx").is_file()


def test_server_loads_the_cpu_model_and_parses_the_openvino_config(server, python_model, build):
    with urllib.request.urlopen(f"{server.url}/v2/models/{python_model}/ready") as response:
        assert response.status == 200
    # The wheel's server has no OpenVINO backend: loading that model must get past the config (parsed,
    # valid) and stop only at the missing backend library.
    openvino_model = model_name(build.spec, "openvino")
    request = urllib.request.Request(f"{server.url}/v2/repository/models/{openvino_model}/load", data=b"{}",
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    message = refused.value.read().decode()
    assert "openvino" in message and "backend" in message, message
    assert "pars" not in message.lower(), message


def test_cohort_through_the_server_equals_the_local_run(server, python_model, volumes, local_cohort, tmp_path):
    """Over gRPC, two volumes in flight; the run again (HTTP) skips every finished volume."""
    out = tmp_path / "remote"
    completed = _cli("segment", python_model, str(volumes), "--out-dir", str(out), "--server", server.grpc_url,
                     "--jobs", "2")
    assert completed.returncode == 0, completed.stderr
    local, remote = _labels(local_cohort), _labels(out)
    assert local.keys() == remote.keys() and len(local) >= 1
    for name in local:
        assert np.array_equal(local[name], remote[name]), name
        assert remote[name].sum() > 100_000  # a brain, not an empty map
    summary = json.loads((out / "cohort_summary.json").read_text())
    assert summary["counts"] == {"done": len(local), "skipped": 0, "error": 0}
    assert all(row["voxels"]["brain"] > 0 for row in summary["volumes"])
    again = _cli("segment", python_model, str(volumes), "--out-dir", str(out), "--server", server.url)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "cohort_summary.json").read_text())["counts"]["skipped"] == len(local)


def test_one_volume_over_http_equals_the_local_run(server, python_model, volumes, local_cohort, tmp_path):
    image = sorted(volumes.iterdir())[0]
    out = tmp_path / "one.nii.gz"
    completed = _cli("segment", python_model, str(image), "--out", str(out), "--server", server.url)
    assert completed.returncode == 0, completed.stderr
    assert np.array_equal(read_volume(out).array, read_volume(local_cohort / out.name.replace("one", _stem(image)))
                          .array)


def _stem(image: Path) -> str:
    from SlicerPTQLib.volumes import volume_stem

    return volume_stem(image)


def _recording(commands):
    def launch(command, **kwargs):
        commands.append(command)
        return subprocess.Popen(command, **kwargs)

    return launch


def test_logic_segments_through_the_server_in_a_worker_like_locally(server, python_model, build, volumes,
                                                                     local_cohort, mrml_scene):
    """The GUI's job (gRPC) and the console call (HTTP) both run a worker; the segmentation sits on the volume
    (under its parent transform) with the local run's labels."""
    pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    from SlicerPTQLib import slicer_nodes
    from SlicerPTQLib.logic import PTQLogic

    image = sorted(volumes.iterdir())[0]
    node = slicer_nodes.add_volume_node(mrml_scene, read_volume(image), "head")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    local = read_volume(local_cohort / f"{_stem(image)}.nii.gz").array
    commands = []
    logic = PTQLogic(launcher=_recording(commands))
    job = logic.startBatch(python_model, [], [node], runtime="triton", serverUrl=server.grpc_url, precision="int8")
    assert not job.finished  # in the background: Slicer's process only polls
    [(from_job, table)] = job.wait()
    from_console, _ = logic.segment(python_model, node, runtime="triton", serverUrl=server.url)
    assert [command[command.index("--server") + 1] for command in commands] == [server.grpc_url, server.url]
    assert all("segment" in command for command in commands)  # no runtime probe, no build
    for segmentation in (from_job, from_console):
        labels = slicer_nodes.labels_from_segmentation(segmentation, node, build.spec).array
        assert labels.sum() > 100_000 and np.array_equal(labels, local)
        assert segmentation.GetTransformNodeID() == transform.GetID()
    assert table["rows"][0]["runtime"] == "triton" and table["rows"][0]["file"] == server.grpc_url
    assert "Triton server at " + server.grpc_url in table["notes"][0]


def test_logic_says_when_the_server_is_unreachable_or_lacks_the_model(server, python_model, volumes, mrml_scene):
    pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    from SlicerPTQLib import slicer_nodes
    from SlicerPTQLib.logic import PTQLogic

    node = slicer_nodes.add_volume_node(mrml_scene, read_volume(sorted(volumes.iterdir())[0]), "head")
    gone = f"grpc://127.0.0.1:{triton_server.free_port()}"
    with pytest.raises(PTQError, match=f"The Triton server at {gone} did not answer .* Check that the server runs"):
        PTQLogic().segment(python_model, node, runtime="triton", serverUrl=gone)
    with pytest.raises(PTQError, match=f"has no model 'missing' ready.*Models there: .*{python_model}"):
        PTQLogic().startSegment("missing", node, runtime="triton", serverUrl=server.url).wait()
    job = PTQLogic().startSegment(python_model, node, runtime="triton", serverUrl=server.url)
    job.cancel()  # Cancel in the module
    assert job.cancelled and job.worker.process.returncode is not None
    assert mrml_scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_killed_server_fails_each_remaining_volume_and_the_cohort_resumes(server, repository, python_model,
                                                                          volumes, local_cohort, tmp_path):
    images = sorted(volumes.iterdir())
    if len(images) < 2:
        pytest.skip("needs at least two evaluation volumes")
    out = tmp_path / "resumable"
    first = triton_server.TritonServer(repository, models=[python_model]).start()
    try:
        make_runtime, spec, model_id = remote_source(first.url, python_model, timeout=30, retries=1)

        def kill_after_first(stage, done, total):
            if done == 1:
                first.kill()

        results = segment_cohort(images, out, make_runtime, spec, model_id, jobs=1, progress=kill_after_first)
    finally:
        first.stop()
    assert [result.status for result in results] == ["done"] + ["error"] * (len(images) - 1)
    for result in results[1:]:
        assert f"The Triton server at {first.url} did not answer" in result.error
        assert not Path(result.output).exists()
    # Resumed against another server (another port) serving the same model.
    make_runtime, spec, model_id = remote_source(server.url, python_model, timeout=60, retries=1)
    resumed = segment_cohort(images, out, make_runtime, spec, model_id, jobs=2)
    assert [result.status for result in resumed] == ["skipped"] + ["done"] * (len(images) - 1)
    local = _labels(local_cohort)
    for name, array in _labels(out).items():
        assert np.array_equal(array, local[name]), name


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_and_model_errors_are_one_sentence(server, python_model, protocol):
    from SlicerPTQLib.runtimes.triton_runtime import TritonRuntime

    url = server.url if protocol == "http" else server.grpc_url
    with pytest.raises(PTQError, match="has no model 'missing' ready.*Models there: .*" + python_model):
        TritonRuntime(url, "missing")
    with pytest.raises(PTQError, match=r"did not answer \(to check that the server is live\) after 1 tries"
                                       r".*[Cc]onnect.*Check that the server runs"):
        TritonRuntime(f"{protocol}://127.0.0.1:{triton_server.free_port()}", python_model, retries=0)
    runtime = TritonRuntime(url, python_model)
    try:
        assert runtime.spec().labels == {1: "brain"} and python_model in runtime.models()
        with pytest.raises(PTQError, match=r"takes patches \[1, 128, 128, 128\].*got \[1, 64, 64, 64\]"):
            runtime.predict(np.zeros((1, 1, 64, 64, 64), np.float32))
    finally:
        runtime.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("peer", ["silent", "hangs up"])
def test_a_peer_that_is_no_triton_server_fails_in_one_sentence(protocol, peer):
    """Transport failures of either client (a timeout, a closed connection) are retried, then one PTQError."""
    import socket
    import threading

    pytest.importorskip(f"tritonclient.{protocol}", reason="the Triton client is not installed")
    from SlicerPTQLib.runtimes.triton_runtime import TritonRuntime

    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            accepted.append(connection)
            if peer == "hangs up":
                connection.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"{protocol}://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(PTQError, match=rf"The Triton server at {url} did not answer \(to check that the server "
                                           rf"is live\) after 2 tries .*Check that the server runs") as failed:
            TritonRuntime(url, "model", timeout=1.0, retries=1)
    finally:
        listener.close()
        for connection in accepted:
            connection.close()
    assert accepted and ("raise --server-timeout" in str(failed.value)) == (peer == "silent")


def test_server_addresses_are_checked_before_any_request():
    from SlicerPTQLib.runtimes.triton_runtime import parse_url

    assert parse_url("127.0.0.1") == ("http://127.0.0.1:8000", "http", "127.0.0.1:8000")
    assert parse_url("grpc://host") == ("grpc://host:8001", "grpc", "host:8001")
    assert parse_url("https://host/")[0] == "https://host:443"
    for url, message in [("ftp://host", "not a Triton server address"), ("http://host/v2", "not a Triton server"),
                         ("http://host:99999", "bad port")]:
        with pytest.raises(PTQError, match=message):
            parse_url(url)


def test_export_refuses_what_it_cannot_write(build, tmp_path):
    with pytest.raises(PTQError, match="not a build folder"):
        export_repository(tmp_path, tmp_path / "repo")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PTQError, match="holds other files"):
        export_repository(build.out_dir, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(PTQError, match="needs a TensorRT engine"):
        export_repository(build.out_dir, tmp_path / "repo", backends=["tensorrt"])
    assert not (tmp_path / "repo").exists()
    with pytest.raises(PTQError, match="not found or not a .plan"):
        export_repository(build.out_dir, tmp_path / "repo", engine=tmp_path / "none.plan")


def test_cohort_refuses_colliding_outputs(tmp_path):
    from SlicerPTQLib.cohort import check_cohort

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(PTQError, match="would both be written"):
        check_cohort([tmp_path / "a" / "x.nii.gz", tmp_path / "b" / "x.nrrd"], tmp_path / "out", ".nii.gz")


def test_segment_options_that_do_not_combine(tmp_path):
    image = str(tmp_path / "a.nii.gz")
    for args, message in [(["m.onnx", image, image, "--out", "x.nii.gz"], "give --out-dir DIR"),
                          (["m.onnx", image], "Give --out FILE"),
                          (["m.onnx", image, "--out", "x.nii.gz", "--out-dir", "d"], "do not combine"),
                          (["m", image, "--out-dir", "d", "--server", "http://127.0.0.1:1", "--runtime", "torch"],
                           "--runtime/--precision and --server do not combine"),
                          (["m", image, "--server", "http://127.0.0.1:1"], "Give --out FILE")]:
        completed = _cli("segment", *args)
        assert completed.returncode == 1 and message in completed.stderr, (args, completed.stderr)
        assert "Traceback" not in completed.stderr


def test_inputs_and_limits_are_checked_before_any_work(tmp_path):
    import nibabel as nib
    import numpy as np

    from SlicerPTQLib.cohort import check_cohort
    from SlicerPTQLib.errors import PTQError

    image = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(image))
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "file").write_text("")
    with pytest.raises(PTQError, match="overwritten by its own labels"):
        check_cohort([image], tmp_path, ".nii.gz")
    model, server = str(tmp_path / "m.onnx"), "http://127.0.0.1:1"
    for args, message in [([model, str(image), "--out", str(image)], "is the image itself"),
                          ([model, str(image), "--out", "x.nii.gz", "--jobs", "2"], "--jobs sets the volumes"),
                          ([model, str(image), "--out-dir", "d", "--jobs", "0"], "--jobs must be from 1"),
                          ([model, str(image), "--out-dir", "d", "--retries", "-1"], "--retries must be from 0"),
                          ([model, str(image), "--out-dir", str(tmp_path / "file")], "--out-dir"),
                          # one volume through a server: its --out is checked before the server is asked
                          (["m", str(image), "--server", server, "--out", str(tmp_path / "x.txt")],
                           "write a label map as")]:
        completed = _cli("segment", *args)
        assert completed.returncode == 1 and message in completed.stderr, (args, completed.stderr)
        assert "Traceback" not in completed.stderr and "did not answer" not in completed.stderr


def test_the_logic_refuses_bad_triton_requests_before_any_worker(mrml_scene):
    pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    from SlicerPTQLib import slicer_nodes
    from SlicerPTQLib.logic import PTQLogic
    from SlicerPTQLib.volume import Volume

    node = slicer_nodes.add_volume_node(mrml_scene, Volume(np.zeros((8, 8, 8), np.float32), np.eye(4), "v"), "v")

    def no_worker(command, **kwargs):
        raise AssertionError(f"a worker was started: {command}")

    logic = PTQLogic(launcher=no_worker)
    for kwargs, message in [({"serverUrl": "http://127.0.0.1:1", "compareWithFP32": True}, "do not apply to the"),
                            ({"serverUrl": "http://127.0.0.1:1", "precision": "int8"}, "do not apply to the"),
                            ({"serverUrl": "http://127.0.0.1:1", "modality": "CT"}, "spec file and a modality"),
                            ({}, "needs the server's URL"), ({"serverUrl": "ftp://host"}, "not a Triton server"),
                            ({"serverUrl": "http://127.0.0.1:1", "model": " "}, "Give the name of the model")]:
        model = kwargs.pop("model", "model")
        with pytest.raises(PTQError, match=message):
            logic.startSegment(model, node, runtime="triton", **kwargs)
    with pytest.raises(PTQError, match="needs the server's URL"):
        logic.startBatch("model", [], [node], runtime="triton")


def test_resume_skips_only_verified_outputs(build, volumes, local_cohort, tmp_path):
    """A finished output whose bytes changed (or whose sidecar is gone) is segmented again; the rest is kept."""
    from SlicerPTQLib.cohort import local_source

    out = tmp_path / "resume"
    shutil.copytree(local_cohort, out)
    images = sorted(volumes.iterdir())
    outputs = sorted(out.glob("*.nii.gz"))
    tampered = outputs[0]
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    if len(outputs) > 1:
        Path(str(outputs[1]) + ".json").unlink()
    make_runtime, spec, model_id = local_source(build.quantized_onnx, "openvino", None, 1, False, images[0])
    results = segment_cohort(images, out, make_runtime, spec, model_id)
    redone = {Path(result.output).name for result in results if result.status == "done"}
    assert redone == {path.name for path in outputs[:2]}
    assert all(result.status == "skipped" for result in results if Path(result.output).name not in redone)
    assert np.array_equal(read_volume(tampered).array, read_volume(local_cohort / tampered.name).array)


def test_a_cohort_with_a_failed_volume_ends_in_one_error_line(build, volumes, local_cohort, tmp_path):
    """The JSON-lines caller (the module) gets the result, then one error naming the failed volume; rc 1."""
    inputs = tmp_path / "in"
    shutil.copytree(volumes, inputs)
    (inputs / "broken.nii.gz").write_bytes(b"not a volume")
    out = tmp_path / "out"
    shutil.copytree(local_cohort, out)  # the good volumes are skipped as finished
    completed = _cli("--progress-json", "segment", str(build.quantized_onnx), str(inputs), "--out-dir", str(out))
    assert completed.returncode == 1, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert "result" in lines[-2] and lines[-2]["result"]["counts"]["error"] == 1
    message = lines[-1]["error"]
    assert message.startswith(f"1 of {len(list(inputs.iterdir()))} volumes failed (broken.nii.gz)"), message
    assert "Traceback" not in completed.stderr and message in completed.stderr


def test_a_volume_unlike_the_models_data_is_flagged_in_the_summary(build, volumes, tmp_path):
    """Plausibility warnings reach every cohort row and the CSV (the run goes on)."""
    from SlicerPTQLib.cohort import local_source, write_summary
    from SlicerPTQLib.volume import Volume
    from SlicerPTQLib.volumes import write_volume

    assert build.spec.modality == "MR"
    mr = read_volume(sorted(volumes.iterdir())[0])
    ct_like = write_volume(Volume(array=mr.array - 1000.0, affine=mr.affine, name="ct"), tmp_path / "ct.nii.gz")
    make_runtime, spec, model_id = local_source(build.quantized_onnx, "openvino", None, 1, False, ct_like)
    [result] = segment_cohort([ct_like], tmp_path / "out", make_runtime, spec, model_id)
    assert result.status == "done" and any("looks like CT" in line for line in result.warnings), result
    csv_text = write_summary([result], tmp_path / "out")["csv"].read_text()
    assert "looks like CT" in csv_text


def test_engine_is_exported_as_a_tensorrt_plan(build, tmp_path):
    """The export copies the engine and writes its GPU config; the bytes are not read (no TensorRT here)."""
    engine = tmp_path / "net.plan"
    engine.write_bytes(b"engine bytes")
    written = export_repository(build.out_dir, tmp_path / "repo", engine=engine, max_batch=4)
    folder = written[model_name(build.spec, "tensorrt")]
    assert (folder / "1" / "model.plan").read_bytes() == b"engine bytes"
    config = (folder / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config and "KIND_GPU" in config and "max_batch_size: 4" in config


def test_a_server_that_stops_answering_times_out_after_the_retries(server, python_model):
    """SIGSTOP freezes the server (and its stub): each try waits out the timeout, then one clear error."""
    import os
    import signal
    import time

    from SlicerPTQLib.runtimes.triton_runtime import TritonRuntime

    runtime = TritonRuntime(server.url, python_model, timeout=1.0, retries=1)
    patch = np.zeros((1, 1, 128, 128, 128), np.float32)
    os.killpg(server.process.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(PTQError, match=r"did not answer \(to run the model\) after 2 tries \(.*timed out"):
            runtime.predict(patch)
        assert time.monotonic() - start >= 2.0
    finally:
        os.killpg(server.process.pid, signal.SIGCONT)
    runtime.timeout = 300.0
    try:
        assert runtime.predict(patch).shape == (1, 2, 128, 128, 128)  # a new connection once it answers
    finally:
        runtime.close()
