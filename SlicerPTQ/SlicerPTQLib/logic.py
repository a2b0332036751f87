"""The Slicer module's logic, usable from the Python console without the GUI.

A volume travels one path: volume node -> :class:`Volume` -> (file for the
worker) -> ``pipeline.quantize`` / ``pipeline.segment`` -> label map ->
segmentation node. By default the pipeline runs out of process (a
``slicer-ptq`` worker, so Slicer stays responsive and Cancel kills it);
``PTQLogic(inProcess=True)`` calls the pipeline directly.

Console example (inside 3D Slicer)::

    from SlicerPTQLib.logic import PTQLogic
    logic = PTQLogic()
    volume = slicer.util.getNode("MRHead")
    built = logic.quantize("deepbet-brain-extraction", [volume], method="max", numCrops=20)
    segmentation, table = logic.segment(built, volume, compareWithFP32=True)
    print(table["rows"])
    kept = logic.quantize("deepbet-brain-extraction", [volume], accuracyBudget=0.99)
    print(kept.sensitivitySummary())
    job = logic.startBatch("deepbet-brain-extraction", [], [volume, other])  # default calibration, one build
    for segmentation, table in job.wait():
        print(segmentation.GetName(), table["build"].describe())
    # a model served by Triton (slicer-ptq export-triton): a worker segments through the server
    served, table = logic.segment("deepbet-brain-extraction_python", volume, runtime="triton",
                                  serverUrl="grpc://triton.example.org:8001")
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import build_cache, catalog, pipeline, slicer_nodes
from .atomic import owned_prefix, remove_stale, replacing, staging_folder
from .errors import PTQError
from .metrics import file_size_mb
from .progress import ProgressCallback
from .spec import ModelSpec, find_sidecar, sidecar_path
from .volume import Volume
from .worker_process import Launcher, LogCallback, WorkerProcess, worker_command, worker_environment

METHODS = ("max", "percentile", "entropy", "mse", "auto")
REPORT_NAME = "quantization.json"
GRID_TOLERANCE_MM = 1e-3
INFO_TIMEOUT_S = 120.0
#: Packages whose versions :meth:`PTQLogic.packageInfo` reports.
PACKAGE_INFO = ("torch", "onnx", "onnxruntime", "openvino", "tensorrt", "monai", "numpy")

#: What a worker's ``slicer-ptq info`` said (runtimes, CPU), asked once per run of this process.
_RUNTIME_INFO: Dict[str, Any] = {}


@dataclass(frozen=True)
class Precision:
    """A build choice: quantized weight bits, or a float model and its runtime precision."""

    key: str
    weight_bits: int = 8
    quantized: bool = True

    def runtime_precision(self, runtime: str) -> Optional[str]:
        """What to ask the runtime for (None: the model decides, i.e. INT8 for Q/DQ files)."""
        if self.quantized:
            return None
        if self.key == "fp16":
            return {"tensorrt": "fp16", "openvino": "bf16"}.get(runtime, "fp32")
        return "fp32"

    @property
    def takes_accuracy_budget(self) -> bool:
        """W8A8 only: the budget picks INT8 layers to keep float; low-bit and float builds have none to pick."""
        return self.quantized and self.weight_bits == 8


#: int8: 8-bit weights and activations; w4a8/w2a8: low-bit weights (layer-wise ADMM) on INT8
#: kernels; fp16 (BF16 on the CPU) and fp32 run the float model of the same build.
PRECISIONS: Dict[str, Precision] = {p.key: p for p in (
    Precision("int8"),
    Precision("w4a8", weight_bits=4),
    Precision("w2a8", weight_bits=2),
    Precision("fp16", quantized=False),
    Precision("fp32", quantized=False),
)}


@dataclass
class BuiltModel:
    """The files one quantization produced (FP32 ONNX, quantized ONNX, spec)."""

    folder: Path
    fp32Model: Path
    quantizedModel: Path
    spec: ModelSpec
    precision: str = "int8"
    report: Dict = field(default_factory=dict, repr=False)

    @property
    def sensitivity(self) -> Optional[Dict]:
        """The accuracy-budget section of ``quantization.json`` (None: built without a budget)."""
        return self.report.get("sensitivity")

    def sensitivitySummary(self) -> Optional[str]:
        """The accuracy-budget outcome in one line for the user (None: built without a budget)."""
        found = self.sensitivity
        if found is None:
            return None
        return pipeline.describe_sensitivity(found)

    @property
    def madeAt(self) -> datetime.datetime:
        """When the build was finished (its manifest is written last), in local time."""
        manifest = self.folder / build_cache.MANIFEST_NAME
        return datetime.datetime.fromtimestamp(manifest.stat().st_mtime)

    def describe(self) -> str:
        """Which build this is and when it was made, in one line for the user."""
        settings = self.report.get("settings", {})
        calibration = self.report.get("calibration", [])
        names = ", ".join(Path(str(name)).name for name in calibration[:3]) + (", ..." if len(calibration) > 3 else "")
        return (f"Build {self.folder.name} ({self.precision}, {settings.get('method', '?')} calibration on "
                f"{len(calibration)} volume(s): {names}), made {self.madeAt:%Y-%m-%d %H:%M}.")

    def modelFor(self, precision: Optional[str] = None) -> Path:
        """The file to run for ``precision`` (default: the one it was built for)."""
        choice = _precision(precision or self.precision)
        return self.quantizedModel if choice.quantized else self.fp32Model

    @classmethod
    def fromFolder(cls, folder: Path, precision: str = "int8") -> Optional["BuiltModel"]:
        """A finished build in ``folder`` (its manifest verifies, its report lists its files), else None."""
        report_file = Path(folder) / REPORT_NAME
        if not report_file.is_file() or not build_cache.reusable(folder):
            return None
        try:
            report = json.loads(report_file.read_text())
            files = {key: Path(folder) / name for key, name in report["files"].items()}
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if not {"fp32_onnx", "quantized_onnx"} <= set(files) or not all(p.is_file() for p in files.values()):
            return None
        return cls(folder=Path(folder), fp32Model=files["fp32_onnx"], quantizedModel=files["quantized_onnx"],
                   spec=ModelSpec.load(sidecar_path(files["quantized_onnx"])), precision=precision, report=report)


@dataclass
class WorkerStep:
    """One worker run: ``arguments()`` gives the CLI arguments (None: skip), ``done(result)`` takes its result."""

    arguments: Callable[[], Optional[List[str]]]
    done: Callable[[dict], None]
    #: shown before the step's progress stages, e.g. the volume a batch is at
    label: str = ""
    #: the module the worker runs (``python -m``)
    module: str = "SlicerPTQLib.cli"


class PTQJob:
    """Worker steps run one after another, then ``finish()`` in the caller's thread.

    The GUI calls :meth:`poll` from a timer; the console calls :meth:`wait`.
    ``cleanup`` paths are removed when the job ends, whatever the outcome.
    """

    def __init__(self, steps: Sequence[WorkerStep], finish: Callable[[], Any], cleanup: Sequence[Path] = (),
                 progress: Optional[ProgressCallback] = None, log: Optional[LogCallback] = None,
                 launcher: Launcher = subprocess.Popen, scene=None):
        self.steps = list(steps)
        self.finishCallback = finish
        self.cleanupPaths = [Path(p) for p in cleanup]
        self.progress = progress
        self.log = log
        self.launcher = launcher
        self.worker: Optional[WorkerProcess] = None
        self.result: Any = None
        self.error: Optional[str] = None
        self.finished = False
        self.cancelled = False
        self._index = 0
        self._scene = scene
        self._sceneObserver = None
        if scene is not None:
            # Results written into a closed scene would go nowhere (or raise): closing it cancels the job.
            self._sceneObserver = scene.AddObserver(scene.StartCloseEvent, self._onSceneClose)

    def extend(self, steps: Sequence[WorkerStep], cleanup: Sequence[Path] = ()) -> None:
        """Append steps planned once an earlier step's result is known (run after the current ones)."""
        self.steps.extend(steps)
        self.cleanupPaths.extend(Path(p) for p in cleanup)

    def start(self) -> "PTQJob":
        self._guarded(self._launchNext)
        return self

    def poll(self) -> bool:
        """Advance the job; True once it has ended (see :attr:`error` / :attr:`result`)."""
        if self.finished or self.worker is None or not self.worker.poll():
            return self.finished
        if self.worker.error is not None:
            self._end(error=self.worker.error)
            return True
        step, result = self.steps[self._index], self.worker.result or {}
        self._index += 1

        def advance() -> None:
            step.done(result)
            self._launchNext()

        self._guarded(advance)
        return self.finished

    def wait(self, interval: float = 0.05) -> Any:
        """Block until the job ends; the result, or PTQError."""
        if not self.finished and self.worker is None:
            self.start()
        while not self.poll():
            time.sleep(interval)
        if self.error is not None:
            raise PTQError(self.error)
        return self.result

    def cancel(self, reason: str = "Cancelled.") -> None:
        """Kill the running worker (its whole process tree) and remove the job's files."""
        if self.finished:
            return
        self.cancelled = True
        if self.worker is not None:
            self.worker.cancel()
        self._end(error=reason)

    def _onSceneClose(self, caller, event) -> None:
        self.cancel("Cancelled: the scene was closed.")

    def _launchNext(self) -> None:
        while self._index < len(self.steps):
            step = self.steps[self._index]
            arguments = step.arguments()
            if arguments is not None:
                progress = self.progress
                if progress is not None and step.label:
                    progress = _labelled(self.progress, step.label)
                self.worker = WorkerProcess(worker_command(arguments, step.module), on_progress=progress,
                                            on_log=self.log, env=worker_environment(), cleanup=self.cleanupPaths,
                                            launcher=self.launcher).start()
                return
            self._index += 1
        self._end(result=self.finishCallback())

    def _guarded(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except PTQError as exc:
            self._end(error=str(exc))
        except Exception as exc:  # anything else still ends the job and removes its files
            if self.log is not None:
                self.log(traceback.format_exc())
            self._end(error=f"{type(exc).__name__}: {exc}")

    def _end(self, result: Any = None, error: Optional[str] = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.result, self.error = result, error
        if self._sceneObserver is not None:
            self._scene.RemoveObserver(self._sceneObserver)
            self._sceneObserver = None
        _remove(self.cleanupPaths)


class PTQLogic:
    """Quantize models on MRML volumes and segment volumes into segmentation nodes.

    Blocking by default (console); the GUI uses the ``start*`` methods,
    which return a :class:`PTQJob` to poll. ``launcher`` starts worker
    processes (``subprocess.Popen``; tests may inject their own).
    """

    def __init__(self, inProcess: bool = False, launcher: Launcher = subprocess.Popen,
                 models: Optional[Sequence[catalog.CatalogModel]] = None):
        self.inProcess = inProcess
        self.launcher = launcher
        self._models = list(models) if models is not None else None

    # --- models and runtimes -------------------------------------------------------------

    @property
    def models(self) -> List[catalog.CatalogModel]:
        """The catalog entries (``Resources/Models.json``), read once."""
        if self._models is None:
            self._models = catalog.load_catalog()
        return self._models

    def catalogModel(self, model) -> Optional[catalog.CatalogModel]:
        """The catalog entry ``model`` names (None: a model file or folder)."""
        if isinstance(model, str):
            return next((entry for entry in self.models if entry.id == model), None)
        return None

    def resolveModel(self, model: Union[str, Path]) -> Path:
        """A catalog id (weights fetched from their pinned archive) or a model path, as a local path."""
        entry = self.catalogModel(model)
        if entry is not None:
            return entry.fetch()
        path = Path(model)
        if not path.exists():
            raise PTQError(f"Model '{model}' is neither a catalog model ({', '.join(m.id for m in self.models)}) "
                           "nor an existing file or MONAI bundle folder.")
        return path

    def availableRuntimes(self) -> Dict[str, str]:
        """Runtime name -> "" when usable here, else why not.

        Out of process, a worker is asked once per run (``slicer-ptq info``):
        probing OpenVINO, CUDA or TensorRT would load them into Slicer's own
        process and block its GUI. In process they are probed here.
        """
        if self.inProcess:
            from .runtimes import available_backends

            return available_backends()
        if not _RUNTIME_INFO:
            worker = WorkerProcess(worker_command(["info"]), env=worker_environment(), launcher=self.launcher)
            _remember_runtime_info(worker.wait(timeout=INFO_TIMEOUT_S))
        return dict(_RUNTIME_INFO["runtimes"])

    def resolveRuntime(self, runtime: Optional[str], modelPath: Optional[Path] = None) -> str:
        """The backend for an ONNX model: ``None``/"auto" is TensorRT when a CUDA GPU can run it, else
        OpenVINO. A TorchScript ``modelPath`` (an original, unquantized network) runs in torch."""
        if modelPath is not None and Path(modelPath).suffix.lower() != ".onnx":
            if runtime not in (None, "", "auto", "torch"):
                raise PTQError(f"{Path(modelPath).name} is not an ONNX model, so it runs in PyTorch, not "
                               f"'{runtime}'. Build (quantize) it first to run it with {runtime}.")
            return "torch"
        available = self.availableRuntimes()
        if runtime in (None, "", "auto"):
            return "tensorrt" if available.get("tensorrt") == "" else "openvino"
        if runtime not in available:
            raise PTQError(f"Unknown runtime '{runtime}'. Choose one of: auto, {', '.join(available)}.")
        if available[runtime]:
            raise PTQError(f"Runtime '{runtime}' cannot run here: {available[runtime]}. Choose 'auto'.")
        return runtime

    def loadVolumeFolder(self, folder: Union[str, Path], scene=None) -> List[Any]:
        """A volume node in ``scene`` (default: Slicer's) for each volume file directly in ``folder``, named
        after its file: what a batch segments when the scans are on disk rather than loaded."""
        import slicer

        from .cli import expand_volumes
        from .volumes import read_volume, volume_stem

        folder = Path(folder)
        if not folder.is_dir():
            raise PTQError(f"{folder} is not a folder; choose the folder that holds the volumes to segment.")
        scene = scene if scene is not None else slicer.mrmlScene
        return [slicer_nodes.add_volume_node(scene, read_volume(path), volume_stem(path))
                for path in expand_volumes([str(folder)])]

    # --- sample data ------------------------------------------------------------------------

    def sampleVolumes(self) -> List[Dict[str, str]]:
        """The shipped evaluation volumes every machine can fetch (PyPI archives), for Slicer's Sample Data:
        ``name``, ``description`` and ``url`` (the archive's registry page) each."""
        from . import shipped

        return [{"name": entry.name, "description": entry.description,
                 "url": f"https://pypi.org/project/{entry.image.package}/{entry.image.version}/"}
                for entry in shipped.catalog("evaluation", include_debian=False)]

    def sampleVolumeFiles(self, name: str) -> Tuple[Path, Path]:
        """The image and reference brain mask of the shipped volume ``name``, fetched (pinned, cached)."""
        from . import shipped

        entries = [entry for entry in shipped.catalog("evaluation", include_debian=False) if entry.name == name]
        if not entries:
            known = ", ".join(volume["name"] for volume in self.sampleVolumes())
            raise PTQError(f"No shipped sample volume '{name}'. Known: {known}.")
        (_, paths), = shipped.fetch_volumes(entries, "evaluation")
        return paths[0], paths[1]

    # --- caches and versions ----------------------------------------------------------------

    def cacheInfo(self) -> Dict[str, Dict[str, Any]]:
        """Where builds and downloads are kept and how much they take: ``{"builds": {...}, "downloads": {...}}``,
        each with ``location`` (Path), ``sizeMB`` and ``entries``."""
        from .fetch import cache_dir

        builds = build_cache.builds_dir()
        downloads = cache_dir()
        return {"builds": _folder_usage(builds),
                "downloads": _folder_usage(downloads, skip=builds if _inside(builds, downloads) else None)}

    def clearCache(self, downloads: bool = False) -> None:
        """Remove every build (and the downloaded weights and volumes when ``downloads``); rebuilt on demand."""
        from .fetch import cache_dir

        shutil.rmtree(build_cache.builds_dir(), ignore_errors=True)
        if downloads:
            shutil.rmtree(cache_dir(), ignore_errors=True)

    def packageInfo(self) -> str:
        """The versions of the packages the worker runs with, in one line (read from their metadata:
        nothing is imported)."""
        import importlib.metadata

        parts = []
        for package in PACKAGE_INFO:
            try:
                parts.append(f"{package} {importlib.metadata.version(package)}")
            except importlib.metadata.PackageNotFoundError:
                parts.append(f"{package} not installed")
        return ", ".join(parts)

    # --- quantize ---------------------------------------------------------------------------

    def quantize(self, modelPath: Union[str, Path], calibrationVolumeNodes: Sequence, outDir: Optional[Path] = None,
                 method: str = "max", numCrops: int = 20, precision: str = "int8", runtime: Optional[str] = None,
                 accuracyBudget: Optional[float] = None, progress: Optional[ProgressCallback] = None,
                 log: Optional[LogCallback] = None, trustBundleCode: bool = False,
                 specFile: Optional[Union[str, Path]] = None, modality: Optional[str] = None) -> BuiltModel:
        """Calibrate on volume nodes and build FP32 + quantized ONNX models (blocking).

        ``modelPath``: catalog id, TorchScript/ONNX file or MONAI bundle
        folder. ``outDir=None`` keeps builds in the cache, keyed by model,
        settings and calibration voxels, so the same request returns at once.
        No calibration volume: a catalog model calibrates on its default set
        (shipped unlabeled volumes), another model reuses the build it last
        used with these settings (noted in the build cache, so also in later
        Slicer sessions); one build serves every input.
        ``accuracyBudget`` (e.g. 0.99, int8 only): keep the layers INT8 hurts
        most in float until the labels agree with FP32's at this Dice on the
        calibration volumes; see :meth:`BuiltModel.sensitivitySummary`.
        ``trustBundleCode``: let MONAI evaluate the Python expressions in a
        bundle's configs (ask the user first); by default they are refused.
        ``specFile``: the model's metadata JSON (default: found beside the
        model, docs/model-metadata.md); ``modality`` (e.g. "CT"): use the
        metadata's preprocessing for that input modality. Both are checked
        before any work; the build keeps the spec it was made with.
        """
        if not self.inProcess:
            return self.startQuantize(modelPath, calibrationVolumeNodes, outDir, method, numCrops, precision,
                                      runtime, accuracyBudget, progress, log, trustBundleCode, specFile,
                                      modality).wait()
        plan = self._buildPlan(modelPath, calibrationVolumeNodes, outDir, method, numCrops, precision, runtime,
                               accuracyBudget, trustBundleCode, specFile, modality)
        if plan.cached is not None:
            return plan.cached
        result = pipeline.quantize(plan.modelPath, plan.volumes, plan.destination, method=method,
                                   num_crops=numCrops, weight_bits=plan.precision.weight_bits,
                                   placement=plan.placement, accuracy_budget=accuracyBudget, progress=progress,
                                   trust_bundle_code=trustBundleCode, spec_file=plan.settings.get("spec_file"),
                                   modality=plan.settings.get("modality"))
        built = BuiltModel(folder=result.out_dir, fp32Model=result.fp32_onnx, quantizedModel=result.quantized_onnx,
                           spec=result.spec, precision=precision, report=result.report)
        if plan.inCache:
            _remember_build(plan.memoryKey, built.folder)
        return built

    def startQuantize(self, modelPath, calibrationVolumeNodes, outDir=None, method="max", numCrops=20,
                      precision="int8", runtime=None, accuracyBudget=None, progress=None, log=None,
                      trustBundleCode=False, specFile=None, modality=None) -> PTQJob:
        """:meth:`quantize` as a job running in a worker process; its result is a :class:`BuiltModel`."""
        self._checkRequest(method, precision, accuracyBudget, calibrationVolumeNodes)
        self._checkSpec(modelPath, specFile, modality)

        def plan():
            return self._quantizeSteps(self._buildPlan(modelPath, calibrationVolumeNodes, outDir, method, numCrops,
                                                       precision, runtime, accuracyBudget, trustBundleCode,
                                                       specFile, modality), log)

        return self._startJob(plan, progress, log, _scene_of(calibrationVolumeNodes), modelPath,
                              defaultCalibration=not calibrationVolumeNodes)

    # --- segment ----------------------------------------------------------------------------

    def segment(self, model, volumeNode, segmentationNode=None, runtime: Optional[str] = None,
                compareWithFP32: bool = False, precision: Optional[str] = None,
                progress: Optional[ProgressCallback] = None, log: Optional[LogCallback] = None,
                showIn3D: bool = False, serverUrl: Optional[str] = None,
                specFile: Optional[Union[str, Path]] = None, modality: Optional[str] = None):
        """Segment ``volumeNode``; returns ``(segmentationNode, table)`` (blocking).

        ``model``: a :class:`BuiltModel` (runs its quantized or FP32 file per
        ``precision``), a model file with its spec beside it, or a catalog id
        (the original network, not quantized). ``compareWithFP32`` also runs
        the FP32 model and fills ``table["rows"]`` with time and Dice vs FP32
        per model. ``table["build"]`` is the :class:`BuiltModel` that ran
        (None for a model file or catalog id), ``table["notes"]`` what was
        chosen for the user and why. With ``runtime`` "auto" and no
        ``precision``, a build whose self-check found INT8 slower than FP32
        on this CPU runs its FP32 model. ``showIn3D`` also builds the
        surfaces that show the segments in the 3D views.

        ``runtime="triton"`` with ``serverUrl`` (``http://host:8000`` or
        ``grpc://host:8001``): ``model`` is a model's name on that Triton
        server (``slicer-ptq export-triton``); the network runs there, the
        rest in the worker, and nothing is built here.

        ``specFile`` and ``modality`` as in :meth:`quantize`, for a model
        file (a :class:`BuiltModel` carries the spec it was built with). A
        model whose spec says ``"output": "regression"`` gives a float map:
        it comes back as a new scalar volume node in place of the
        segmentation node (``table["map"]`` is True).
        """
        if not self.inProcess:
            return self.startSegment(model, volumeNode, segmentationNode, runtime, compareWithFP32, precision,
                                     progress, log, showIn3D, serverUrl, specFile, modality).wait()
        if runtime != "triton":  # the callers of _segmentRequest check first, so the spec is read once there
            self._checkSpec(model, specFile, modality)
        request = self._segmentRequest(model, volumeNode, runtime, compareWithFP32, precision, serverUrl, specFile,
                                       modality)
        _log_notes(request, log)
        outputs = []
        for run in request.runs:
            if request.server:
                from .cohort import segment_remote

                labels, timings, request.spec = segment_remote(request.server, run["model"], request.volume,
                                                               progress=progress)
            else:
                labels, timings = pipeline.segment(run["model"], request.volume, runtime=request.runtime,
                                                   precision=run["precision"], progress=progress,
                                                   spec_file=request.specFile, modality=request.modality)
            outputs.append((labels, timings))
        return self._showResult(request, outputs, segmentationNode, showIn3D)

    def startSegment(self, model, volumeNode, segmentationNode=None, runtime=None, compareWithFP32=False,
                     precision=None, progress=None, log=None, showIn3D=False, serverUrl=None, specFile=None,
                     modality=None) -> PTQJob:
        """:meth:`segment` as a job running in a worker process."""
        slicer_nodes.volume_from_node(volumeNode)
        remote = runtime == "triton"
        if remote:
            _check_remote(model, serverUrl, compareWithFP32, precision, specFile, modality)
        else:
            self._checkSpec(model, specFile, modality)

        def plan():
            request = self._segmentRequest(model, volumeNode, runtime, compareWithFP32, precision, serverUrl,
                                           specFile, modality)
            _log_notes(request, log)
            return self._segmentSteps(lambda: request, segmentationNode, showIn3D)

        return self._startJob(plan, progress, log, _scene_of([volumeNode]), None if remote else model,
                              askRuntimes=not remote)

    def startBuildAndSegment(self, model, calibrationVolumeNodes, volumeNode, segmentationNode=None,
                             method="max", numCrops=20, precision="int8", runtime=None, compareWithFP32=False,
                             accuracyBudget=None, progress=None, log=None, trustBundleCode=False,
                             showIn3D=False, serverUrl=None, specFile=None, modality=None) -> PTQJob:
        """What the GUI's Apply does: build (or reuse) the model, then segment; one job.

        Calibration without checked volumes: see :meth:`quantize`. The
        result's ``table["build"]`` tells what the build measured.
        """
        return self._startBatch(model, calibrationVolumeNodes, [volumeNode], segmentationNode, method, numCrops,
                                precision, runtime, compareWithFP32, accuracyBudget, progress, log, trustBundleCode,
                                showIn3D, serverUrl, specFile, modality, single=True)

    def startBatch(self, model, calibrationVolumeNodes, volumeNodes, segmentationNode=None, method="max",
                   numCrops=20, precision="int8", runtime=None, compareWithFP32=False, accuracyBudget=None,
                   progress=None, log=None, trustBundleCode=False, showIn3D=False, serverUrl=None, specFile=None,
                   modality=None) -> PTQJob:
        """Build (or reuse) the model once and segment every volume of ``volumeNodes``: one job, one
        progress (stages prefixed with the volume), one Cancel. Its result is a list of
        ``(segmentationNode, table)``, one segmentation per input, named after it.

        ``runtime="triton"``: ``model`` is the name of a model on the Triton
        server at ``serverUrl``; nothing is built (calibration, method,
        precision and accuracy budget do not apply), each volume is
        segmented by a worker through the server."""
        return self._startBatch(model, calibrationVolumeNodes, volumeNodes, segmentationNode, method, numCrops,
                                precision, runtime, compareWithFP32, accuracyBudget, progress, log, trustBundleCode,
                                showIn3D, serverUrl, specFile, modality)

    # --- internals ------------------------------------------------------------------------------

    def _startBatch(self, model, calibrationVolumeNodes, volumeNodes, segmentationNode, method, numCrops, precision,
                    runtime, compareWithFP32, accuracyBudget, progress, log, trustBundleCode, showIn3D,
                    serverUrl=None, specFile=None, modality=None, single=False) -> PTQJob:
        """:meth:`startBatch`; ``single``: the job's result is the one input's ``(segmentationNode, table)``."""
        volumeNodes = list(volumeNodes)
        if not volumeNodes:
            raise PTQError("Select at least one input volume to segment.")
        if segmentationNode is not None and len(volumeNodes) > 1:
            raise PTQError("An output segmentation can take one input's result only; clear the output "
                           "segmentation so each input gets its own.")
        remote = runtime == "triton"
        if remote:  # the server's model runs as exported: no build settings
            _check_remote(model, serverUrl, compareWithFP32, None, specFile, modality)
        else:
            self._checkRequest(method, precision, accuracyBudget, calibrationVolumeNodes)
            self._checkSpec(model, specFile, modality)
        for node in volumeNodes:
            slicer_nodes.volume_from_node(node)
        autoRuntime = runtime in (None, "", "auto")

        def plan():
            if remote:
                steps, buildFinish, cleanup = [], lambda: model, []
            else:
                buildPlan = self._buildPlan(model, calibrationVolumeNodes, None, method, numCrops, precision,
                                            runtime, accuracyBudget, trustBundleCode, specFile, modality)
                steps, buildFinish, cleanup = self._quantizeSteps(buildPlan, log)
            finishers = []
            for index, node in enumerate(volumeNodes):
                requests: Dict[int, _SegmentRequest] = {}

                def request(node=node, requests=requests):
                    if not requests:
                        # auto runtime: no precision asked, so a build slower in INT8 here may run float
                        requests[0] = self._segmentRequest(buildFinish(), node, runtime, compareWithFP32,
                                                           None if autoRuntime or remote else precision, serverUrl)
                        _log_notes(requests[0], log)
                    return requests[0]

                segmentSteps, segmentFinish, segmentCleanup = self._segmentSteps(
                    request, segmentationNode, showIn3D,
                    label=f"{node.GetName()} ({index + 1}/{len(volumeNodes)})" if len(volumeNodes) > 1 else "")
                steps += segmentSteps
                cleanup += segmentCleanup
                finishers.append(segmentFinish)
            if single:
                return steps, finishers[0], cleanup
            return steps, lambda: [finish() for finish in finishers], cleanup

        return self._startJob(plan, progress, log, _scene_of(volumeNodes), None if remote else model,
                              defaultCalibration=not calibrationVolumeNodes, askRuntimes=not remote)

    def _startJob(self, plan: Callable[[], tuple], progress, log, scene, model=None,
                  defaultCalibration: bool = False, askRuntimes: bool = True) -> PTQJob:
        """A job running ``plan()``'s ``(steps, finish, cleanup)``.

        What Slicer's process must not do is done by workers first, and the
        plan made when they are through: ask the runtimes here (once per
        run, unless ``askRuntimes`` is False: a remote server's job needs
        none), and download a catalog ``model``'s weights (and its default
        calibration volumes with ``defaultCalibration``) when not cached.
        """
        first = []
        if askRuntimes and not self.inProcess and not _RUNTIME_INFO:
            first.append(WorkerStep(lambda: ["info"], _remember_runtime_info))
        entry = self.catalogModel(model)
        if not self.inProcess and entry is not None and entry.downloads_pending(defaultCalibration):
            first.append(WorkerStep(lambda: [entry.id] + (["--calibration"] if defaultCalibration else []),
                                    lambda result: None, module="SlicerPTQLib.fetch_worker"))
        if not first:
            steps, finish, cleanup = plan()
            return PTQJob(steps, finish, cleanup, progress, log, self.launcher, scene).start()
        planned: Dict[str, Callable[[], Any]] = {}
        last = first[-1]

        def workersDone(result: dict) -> None:
            last.done(result)
            steps, planned["finish"], cleanup = plan()
            job.extend(steps, cleanup)

        first[-1] = WorkerStep(last.arguments, workersDone, module=last.module)
        job = PTQJob(first, lambda: planned["finish"](), (), progress, log, self.launcher, scene)
        return job.start()

    def _checkRequest(self, method, precision, accuracyBudget, calibrationVolumeNodes) -> None:
        """Refuse bad settings and volumes before any worker starts."""
        if method not in METHODS:
            raise PTQError(f"Unknown calibration method '{method}'. Choose one of: {', '.join(METHODS)}.")
        _check_accuracy_budget(accuracyBudget, _precision(precision))
        for node in calibrationVolumeNodes:
            slicer_nodes.volume_from_node(node)

    def _checkSpec(self, model, specFile, modality) -> None:
        """Refuse bad model metadata before any worker starts: a missing or invalid ``specFile``, a model
        file with none, a ``modality`` it has no preprocessing for. (A catalog model's own metadata is
        checked in :meth:`_buildPlan`, once its weights are fetched and still before any work.)"""
        if isinstance(model, BuiltModel):
            if specFile or modality:
                raise PTQError(f"The {model.describe()} keeps the metadata it was built with; segment it without "
                               "a spec file or modality, or build again with them.")
            return
        entry = self.catalogModel(model)
        if entry is None or specFile:
            _model_spec(self.resolveModel(model) if entry is None else None, specFile, modality)

    def _buildPlan(self, model, calibrationVolumeNodes, outDir, method, numCrops, precision, runtime,
                   accuracyBudget, trustBundleCode=False, specFile=None, modality=None) -> "_BuildPlan":
        self._checkRequest(method, precision, accuracyBudget, ())
        choice = _precision(precision)
        model_path = self.resolveModel(model)
        spec = _model_spec(model_path, specFile, modality)
        volumes: List[pipeline.VolumeSource] = [slicer_nodes.volume_from_node(node)
                                                for node in calibrationVolumeNodes]
        backend = self.resolveRuntime(runtime)
        placement = "tensorrt" if backend == "tensorrt" else "cpu"
        settings = {"method": method, "num_crops": int(numCrops), "weight_bits": choice.weight_bits,
                    "placement": placement}
        if accuracyBudget is not None:  # only when set, so budget-free builds keep their cache folders
            settings["accuracy_budget"] = float(accuracyBudget)
        if specFile:  # likewise; the build folder's key also covers the spec's content
            settings["spec_file"] = str(Path(specFile).resolve())
        if modality:
            settings["modality"] = modality
        memory_key = json.dumps([str(Path(model_path).resolve()), settings], sort_keys=True)
        if not volumes:
            entry = self.catalogModel(model)
            if entry is not None and entry.default_calibration:
                volumes = list(entry.default_calibration_files())
            elif outDir is None:
                cached = _remembered_build(memory_key, choice.key)
                if cached is not None:
                    return _BuildPlan(model_path, [], settings, cached.folder, choice, placement, cached, True,
                                      trustBundleCode, memory_key)
            if not volumes:
                raise PTQError(f"Check at least one calibration volume (a few unlabeled scans like the ones to "
                               f"segment) for the first build of {Path(model_path).name}; later runs reuse "
                               "that build.")
        destination = Path(outDir) if outDir is not None else _build_folder(model_path, spec, volumes, settings)
        cached = BuiltModel.fromFolder(destination, choice.key) if outDir is None else None
        if cached is not None:
            _remember_build(memory_key, cached.folder)
        return _BuildPlan(model_path, volumes, settings, destination, choice, placement, cached, outDir is None,
                          trustBundleCode, memory_key)

    def _quantizeSteps(self, plan: "_BuildPlan", log: Optional[LogCallback] = None):
        if plan.cached is not None:
            if log is not None:
                log(f"Reusing {plan.cached.describe()}")
            return [], lambda: plan.cached, []
        # Staged beside the destination (same file system), renamed into place when complete.
        plan.destination.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(plan.destination.parent, label=f"{plan.destination.name}.")
        settings = plan.settings
        state: Dict[str, BuiltModel] = {}

        def arguments() -> List[str]:
            from .volumes import check_finite, write_volume

            for volume in plan.volumes:  # said here, by node name: the worker only sees a temporary file
                if isinstance(volume, Volume):
                    check_finite(volume.array, f"Volume '{volume.name}'")
            inputs = [write_volume(volume, staging / f"calibration_{index}.nrrd") if isinstance(volume, Volume)
                      else Path(volume) for index, volume in enumerate(plan.volumes)]
            budget = settings.get("accuracy_budget")
            return (["quantize", str(plan.modelPath), "--calib", *map(str, inputs), "--out", str(staging / "build"),
                     "--method", settings["method"], "--num-crops", str(settings["num_crops"]),
                     "--weight-bits", str(settings["weight_bits"]), "--placement", settings["placement"]]
                    + (["--accuracy-budget", str(budget)] if budget is not None else [])
                    + (["--spec", settings["spec_file"]] if "spec_file" in settings else [])
                    + (["--modality", settings["modality"]] if "modality" in settings else [])
                    + (["--trust-bundle-code"] if plan.trustBundleCode else []))

        def finish() -> BuiltModel:
            if "built" not in state:
                state["built"] = _publish_build(staging / "build", plan.destination, plan.precision.key,
                                                inCache=plan.inCache)
                if plan.inCache:
                    _remember_build(plan.memoryKey, plan.destination)
                if log is not None:
                    log(f"Using the new {state['built'].describe()}")
            return state["built"]

        return [WorkerStep(arguments, lambda result: None)], finish, [staging]

    def _segmentRequest(self, model, volumeNode, runtime, compareWithFP32, precision,
                        serverUrl: Optional[str] = None, specFile=None, modality=None) -> "_SegmentRequest":
        volume = slicer_nodes.volume_from_node(volumeNode)
        if runtime == "triton":
            # The spec comes from the server with the labels (set when the run is back).
            name, server = _check_remote(model, serverUrl, compareWithFP32, precision)
            return _SegmentRequest(volumeNode, volume, None, "triton", [{"model": name, "precision": None,
                                                                          "title": name}], None,
                                   [f"Segmenting {volumeNode.GetName()} with model '{name}' on the Triton server "
                                    f"at {server}"], server=server)
        notes = []
        if isinstance(model, BuiltModel):
            choice = _precision(precision or model.precision)
            backend = self.resolveRuntime(runtime, model.modelFor(choice.key))
            if precision is None and runtime in (None, "", "auto") and choice.quantized:
                slower = _int8_slower_note(model, backend)
                if slower:
                    choice = PRECISIONS["fp32"]
                    notes.append(f"Running the FP32 model: {slower}")
            model_path, fp32_path = model.modelFor(choice.key), model.fp32Model
            notes.insert(0, f"Segmenting {volumeNode.GetName()} with {model.describe()}")
        else:
            model_path = self.resolveModel(model)
            fp32_path = _fp32_beside(model_path)
            choice = _precision(precision) if precision else None
            backend = self.resolveRuntime(runtime, model_path)
        run_precision = choice.runtime_precision(backend) if choice else None
        title = (choice.key if choice.quantized else run_precision).upper() if choice else model_path.name
        runs = [{"model": model_path, "precision": run_precision, "title": title}]
        if compareWithFP32:
            if fp32_path is None:
                raise PTQError("Compare with FP32 needs a quantized model with its FP32 ONNX beside it "
                               "(build one with Apply or PTQLogic.quantize), not the original network.")
            if (fp32_path, "fp32") != (model_path, runs[0]["precision"]):  # else it already is the FP32 run
                runs.append({"model": fp32_path, "precision": "fp32", "title": "FP32"})
        # the CLI's lookup and refusal (docs/model-metadata.md)
        spec = pipeline.model_spec_for(model_path, specFile, modality)
        return _SegmentRequest(volumeNode, volume, spec, backend, runs,
                               model if isinstance(model, BuiltModel) else None, notes,
                               specFile=str(Path(specFile).resolve()) if specFile else None, modality=modality)

    def _segmentSteps(self, request: Callable[[], "_SegmentRequest"], segmentationNode, showIn3D=False,
                      label: str = ""):
        remove_stale(Path(tempfile.gettempdir()), "slicer-ptq-segment-")  # left by a killed Slicer
        work = Path(tempfile.mkdtemp(prefix=owned_prefix("slicer-ptq-segment-")))
        timings: List[Optional[dict]] = []

        def arguments(index: int) -> Optional[List[str]]:
            current = request()
            if index >= len(current.runs):
                return None
            if index == 0:
                from .volumes import check_finite, write_volume

                # Said here, by node name: the worker only sees a temporary file.
                check_finite(current.volume.array, f"Volume '{current.volume.name}'")
                write_volume(current.volume, work / "input.nrrd")
            run = current.runs[index]
            options = (["--server", current.server] if current.server else
                       ["--runtime", current.runtime] + (["--precision", run["precision"]] if run["precision"] else [])
                       + (["--spec", current.specFile] if current.specFile else [])
                       + (["--modality", current.modality] if current.modality else []))
            return ["segment", str(run["model"]), str(work / "input.nrrd"), "--out",
                    str(work / f"labels_{index}.nrrd")] + options

        def done(result: dict) -> None:
            timings.append(result.get("timings", {}))
            current = request()
            if current.server:  # the server's model names the segments
                try:
                    current.spec = ModelSpec.from_dict(result["spec"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise PTQError(f"The worker gave no readable model metadata for '{current.runs[0]['model']}' "
                                   f"({exc}); update SlicerPTQ and see the log.") from exc

        def finish():
            from .volumes import read_volume

            current = request()
            outputs = [(read_volume(work / f"labels_{index}.nrrd"), timings[index])
                       for index in range(len(current.runs))]
            return self._showResult(current, outputs, segmentationNode, showIn3D)

        steps = [WorkerStep(lambda i=index: arguments(i), done, label) for index in range(2)]
        return steps, finish, [work]

    def _showResult(self, request: "_SegmentRequest", outputs, segmentationNode, showIn3D=False):
        from .metrics import dice

        labels = [_on_input_grid(label_map, request.volume) for label_map, _ in outputs]
        regression = request.spec.output == "regression"
        if regression:
            # A float map (a distance, a probability...): Slicer shows those as a scalar volume, not segments.
            node = slicer_nodes.add_volume_node(request.volumeNode.GetScene(), labels[0],
                                                f"{request.volumeNode.GetName()} {request.spec.name}")
        else:
            node = slicer_nodes.labels_to_segmentation(labels[0], request.spec, request.volumeNode,
                                                       segmentationNode,
                                                       catalog.terminologies_for(request.spec, self.models))
            if showIn3D:
                node.CreateClosedSurfaceRepresentation()
        rows = []
        for run, label_map, (_, timing) in zip(request.runs, labels, outputs):
            row = {"model": run["title"], "file": request.server or Path(run["model"]).name,
                   "runtime": request.runtime}
            if not request.server:  # a served model's file is on the server
                row["size (MB)"] = round(file_size_mb(run["model"]), 2)
            row["time (s)"] = round(float(timing.get("total_s", float("nan"))), 3)
            if len(labels) > 1 and regression:
                difference = label_map.array.astype(np.float64) - labels[-1].array
                row["RMSE vs FP32"] = round(float(np.sqrt(np.mean(difference ** 2))), 6)
            elif len(labels) > 1:
                scores = dice(label_map.array, labels[-1].array, sorted(request.spec.labels))
                row["Dice vs FP32"] = round(float(np.mean(list(scores.values()))), 4)
                row.update({f"Dice {request.spec.labels[k]}": round(v, 4) for k, v in scores.items()})
            rows.append(row)
        # Plausibility warnings; a worker read the volume from its temporary "input" file: say the node instead.
        warnings = [f"Warning: Volume '{request.volumeNode.GetName()}'{line[len('input'):]}"
                    if line.startswith("input ") else f"Warning: {line}"
                    for line in (outputs[0][1] or {}).get("warnings", [])]
        return node, {"rows": rows, "reference": "FP32" if len(labels) > 1 else None, "build": request.build,
                      "notes": list(request.notes) + warnings, "map": regression}


@dataclass
class _BuildPlan:
    modelPath: Path
    volumes: List[Volume]
    settings: Dict
    destination: Path
    precision: Precision
    placement: str
    cached: Optional[BuiltModel]
    inCache: bool = True
    trustBundleCode: bool = False
    #: model and settings: finds this build again when no calibration volume is given
    memoryKey: str = ""


@dataclass
class _SegmentRequest:
    volumeNode: Any
    volume: Volume
    spec: Optional[ModelSpec]  # None for a served model until its run is back
    runtime: str
    runs: List[Dict]
    build: Optional[BuiltModel]
    notes: List[str] = field(default_factory=list)
    #: the Triton server's URL when the model runs there
    server: Optional[str] = None
    #: the metadata and modality the worker is told (None: the model's own)
    specFile: Optional[str] = None
    modality: Optional[str] = None


def _precision(key: Optional[str]) -> Precision:
    if key not in PRECISIONS:
        raise PTQError(f"Unknown precision '{key}'. Choose one of: {', '.join(PRECISIONS)}.")
    return PRECISIONS[key]


def _check_accuracy_budget(budget: Optional[float], choice: Precision) -> None:
    """Refuse a budget the build cannot honour here, before any worker starts."""
    if budget is None:
        return
    pipeline.check_accuracy_budget(budget)
    if not choice.takes_accuracy_budget:
        kind = "low-bit weights" if choice.quantized else "a float model, nothing is quantized"
        raise PTQError(f"The accuracy budget keeps INT8 layers in float, so it works with precision 'int8' only, "
                       f"not '{choice.key}' ({kind}). Choose precision int8, or turn the accuracy budget off.")


def _model_spec(model_path: Optional[Path], spec_file, modality: Optional[str]) -> Optional[ModelSpec]:
    """The metadata a worker will use: ``spec_file``, else the one beside ``model_path`` (None for a MONAI
    bundle folder, which carries its own), for ``modality``; PTQError, as the CLI says it, when unusable."""
    if spec_file and not Path(spec_file).is_file():
        raise PTQError(f"Model metadata file {spec_file} does not exist; choose the model's metadata JSON "
                       "(docs/model-metadata.md) or clear the field to use the one beside the model.")
    if not spec_file and Path(model_path).is_dir():
        return None
    if not spec_file and find_sidecar(Path(model_path)) is None:
        from .models import missing_spec_message

        raise PTQError(missing_spec_message(Path(model_path), "the module's 'Model metadata (spec) file' field"))
    return pipeline.model_spec_for(model_path, spec_file, modality)


def _build_folder(model_path: Path, spec: Optional[ModelSpec], volumes: Sequence["pipeline.VolumeSource"],
                  settings: Dict) -> Path:
    """The shared build cache folder (see :func:`pipeline.build_folder`), prefixed for builds made here."""
    spec = spec or ModelSpec(name=Path(model_path).name)
    folder = pipeline.build_folder(model_path, spec, volumes, settings)
    return folder.with_name(f"slicer-{folder.name}")


def _publish_build(build: Path, destination: Path, precision: str, inCache: bool) -> BuiltModel:
    """Move a finished, sealed build into ``destination``: a cache folder with one rename, a user's folder
    file by file with its manifest last (see :mod:`build_cache`)."""
    reason = build_cache.verify(build)
    if reason is not None:
        raise PTQError(f"The quantization worker finished but {build} holds no complete build ({reason}). "
                       "See the log.")
    if inCache:
        build_cache.publish_folder(build, destination)
    else:
        destination.mkdir(parents=True, exist_ok=True)
        build_cache.publish_files(build, destination)
    built = BuiltModel.fromFolder(destination, precision)
    if built is None:
        raise PTQError(f"The build published in {destination} does not verify. See the log.")
    return built


def _fp32_beside(model_path: Path) -> Optional[Path]:
    """The FP32 ONNX of the build ``model_path`` belongs to, if it is one."""
    built = BuiltModel.fromFolder(Path(model_path).parent) if Path(model_path).is_file() else None
    return built.fp32Model if built is not None else None


def _on_input_grid(labels: Volume, volume: Volume) -> Volume:
    """The worker's label map with the input's exact affine (a file round trip may round it)."""
    if labels.array.shape != volume.array.shape or not np.allclose(labels.affine, volume.affine,
                                                                     atol=GRID_TOLERANCE_MM):
        raise PTQError(f"The label map came back on another grid (shape {labels.array.shape} vs "
                       f"{volume.array.shape}) than the input; the model output cannot be overlaid. "
                       "Report this with the log.")
    return volume.with_array(labels.array, name=labels.name)


def _remember_runtime_info(result: dict) -> None:
    if not isinstance(result.get("runtimes"), dict):
        raise PTQError("The worker's 'slicer-ptq info' gave no runtime list; update SlicerPTQ and see the log.")
    _RUNTIME_INFO.update(result)


def _last_builds() -> Dict[str, str]:
    try:
        known = json.loads((build_cache.builds_dir() / build_cache.LAST_BUILDS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _remember_build(key: str, folder: Path) -> None:
    """Note the build a model and settings last used, for runs without calibration volumes (later
    Slicer sessions too). Only a convenience: when it cannot be written, calibration is asked again."""
    known = _last_builds()
    if known.get(key) == Path(folder).name:
        return
    known[key] = Path(folder).name
    try:
        with replacing(build_cache.builds_dir() / build_cache.LAST_BUILDS_NAME, suffix=".json") as tmp:
            Path(tmp).write_text(json.dumps(known, indent=2))
    except PTQError:
        pass


def _remembered_build(key: str, precision: str) -> Optional[BuiltModel]:
    """The verified build noted for ``key`` (the index names a folder of the build cache, nothing else)."""
    name = _last_builds().get(key)
    if not isinstance(name, str) or not name:
        return None
    return BuiltModel.fromFolder(build_cache.builds_dir() / Path(name).name, precision)


def _int8_slower_note(model: BuiltModel, backend: str) -> str:
    """The build's self-check sentence when INT8 ran slower than FP32 with ``backend`` here, else ""."""
    from .selfcheck import SelfCheck

    check = model.report.get("self_check")
    if not isinstance(check, dict) or check.get("runtime") != backend:
        return ""
    try:
        return SelfCheck.from_dict(check).speed_note()
    except TypeError:
        return ""


def _check_remote(model, serverUrl: Optional[str], compareWithFP32: bool, precision: Optional[str],
                  specFile=None, modality: Optional[str] = None) -> Tuple[str, str]:
    """``(model name, normalised URL)`` of a request to a Triton server; PTQError for what it cannot do."""
    from .runtimes.triton_runtime import check_server_url

    if specFile or modality:
        raise PTQError("A spec file and a modality do not apply to the 'triton' runtime: the server's model carries "
                       "the metadata it was exported with. Drop them, or export the model again with them.")

    if compareWithFP32 or precision:
        raise PTQError("Compare with FP32 and precision do not apply to the 'triton' runtime: the server runs its "
                       "model as exported. Drop them, or segment here with another runtime.")
    server = check_server_url(serverUrl)
    name = model.strip() if isinstance(model, str) else ""
    if not name:
        raise PTQError(f"Give the name of the model on the Triton server at {server} (as slicer-ptq export-triton "
                       "named it, e.g. from the server's model list), not a file or a build.")
    return name, server


def _log_notes(request: "_SegmentRequest", log: Optional[LogCallback]) -> None:
    if log is not None:
        for note in request.notes:
            log(note)


def _labelled(progress: ProgressCallback, label: str) -> ProgressCallback:
    return lambda stage, done, total: progress(f"{label}: {stage}", done, total)


def _scene_of(nodes: Sequence) -> Any:
    return next((node.GetScene() for node in nodes if node is not None and node.GetScene() is not None), None)


def _inside(folder: Path, parent: Path) -> bool:
    try:
        Path(folder).resolve().relative_to(Path(parent).resolve())
        return True
    except ValueError:
        return False


def _folder_usage(folder: Path, skip: Optional[Path] = None) -> Dict[str, Any]:
    """Location, size in MB and number of entries of a cache folder (``skip``: a sub-folder counted elsewhere)."""
    folder = Path(folder)
    size, entries = 0, 0
    if folder.is_dir():
        skipped = Path(skip).resolve() if skip is not None else None
        entries = sum(1 for child in folder.iterdir() if skipped is None or child.resolve() != skipped)
        for path in folder.rglob("*"):
            if skipped is not None and _inside(path, skipped):
                continue
            if path.is_file() and not path.is_symlink():
                size += path.stat().st_size
    return {"location": folder, "sizeMB": round(size / 1e6, 1), "entries": entries}


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
