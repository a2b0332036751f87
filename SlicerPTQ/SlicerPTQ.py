"""SlicerPTQ: quantize a 3D segmentation network to INT8 and segment with it.

Thin Slicer layer: the GUI state lives in a parameter node, the work in
``SlicerPTQLib`` (``logic.PTQLogic`` runs the pipeline in a worker process).
"""

import logging
import os
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from SlicerPTQLib import catalog, dependencies, slicer_nodes
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.logic import METHODS, PRECISIONS, PTQLogic

RUNTIMES = ["auto", "openvino", "tensorrt", "onnxruntime", "triton"]
#: What the runtime list shows instead of the logic's name.
RUNTIME_LABELS = {"triton": _("Remote Triton server")}
#: Input modality override: "auto" uses the metadata's own preprocessing.
MODALITIES = ["auto", "CT", "MR"]
DEFAULT_MODEL = "deepbet-brain-extraction"
#: Lines the log box keeps (the whole output also goes to Slicer's application log).
LOG_LINES = 2000


class SlicerPTQ(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PTQ Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerPTQ contributors"]
        self.parent.helpText = _(
            "Post-training quantization of 3D segmentation networks: calibrate on a few unlabeled volumes, "
            "build an INT8 (or low-bit) model that runs on real integer kernels (OpenVINO on the CPU, "
            "TensorRT on NVIDIA GPUs) and segment volumes with it. "
            '<a href="https://github.com/SlicerPTQ/SlicerPTQ#slicer-module">Documentation</a>.')
        self.parent.acknowledgementText = _(
            "Shipped model: deepbet (Fisch et al., MIT licence). Quantization follows MedPTQ (explicit Q/DQ, "
            "max/entropy calibration) and EfficientQ (low-bit weights by ADMM).")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The shipped evaluation volumes in the Sample Data module, so a new user can try the module in two clicks."""
    import SampleData

    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "SlicerPTQ.png")
    for volume in PTQLogic().sampleVolumes():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="PTQ", sampleName=volume["name"], uris=volume["url"], fileNames=f"{volume['name']}.nii.gz",
            nodeNames=volume["name"], thumbnailFileName=icon, customDownloader=ShippedVolumeLoader(volume["name"]))


class ShippedVolumeLoader:
    """Sample Data's downloader for a shipped volume: fetched from its pinned archive, loaded with its brain mask."""

    def __init__(self, name):
        self.name = name

    def __call__(self, source):
        with slicer.util.tryWithErrorDisplay(_("Could not load the sample volume."), waitCursor=True):
            image, mask = PTQLogic().sampleVolumeFiles(self.name)
            slicer.util.loadLabelVolume(str(mask), {"name": f"{self.name} brain mask"})
            return [slicer.util.loadVolume(str(image), {"name": self.name})]


@parameterNodeWrapper
class SlicerPTQParameterNode:
    model: str = DEFAULT_MODEL  # catalog id or path of a model file / bundle folder
    specFile: str = ""  # the model's metadata JSON; empty: the one beside the model
    modality: Annotated[str, Choice(MODALITIES)] = "auto"
    calibrationVolumes: list[vtkMRMLScalarVolumeNode]
    numCrops: Annotated[int, WithinRange(1, 500)] = 20
    method: Annotated[str, Choice(list(METHODS))] = "max"
    precision: Annotated[str, Choice(list(PRECISIONS))] = "int8"
    keepAccuracy: bool = False  # int8 only: keep the worst layers float until accuracyBudget is met
    accuracyBudget: Annotated[float, WithinRange(0.9, 1.0)] = 0.99
    runtime: Annotated[str, Choice(RUNTIMES)] = "auto"
    serverUrl: str = ""  # runtime "triton": the server's HTTP or gRPC endpoint
    serverModel: str = ""  # runtime "triton": the model's name on the server
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    batchVolumes: list[vtkMRMLScalarVolumeNode]  # segmented in the same run as inputVolume
    compareWithFP32: bool = False
    showIn3D: bool = True
    resultsTable: vtkMRMLTableNode


class SlicerPTQWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._job = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.timeout.connect(self.onPollJob)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SlicerPTQ.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SlicerPTQLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelSearchLineEdit.textChanged.connect(self.onModelSearchChanged)
        self.ui.modelListWidget.currentItemChanged.connect(self.onModelSelected)
        self.ui.loadModelFileButton.clicked.connect(self.onLoadModelFile)
        self.ui.specFilePathLineEdit.currentPathChanged.connect(self.onSpecFileChanged)
        self.ui.calibrationVolumesComboBox.checkedNodesChanged.connect(self.onCalibrationVolumesChanged)
        self.ui.batchVolumesComboBox.checkedNodesChanged.connect(self.onBatchVolumesChanged)
        self.ui.addFolderButton.clicked.connect(self.onAddFolder)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.openCacheButton.clicked.connect(self.onOpenCache)
        self.ui.clearCacheButton.clicked.connect(self.onClearCache)
        self.ui.logTextEdit.setMaximumBlockCount(LOG_LINES)
        self.showSensitivity(None)
        self.ui.buildInfoLabel.text = ""
        self.showCacheInfo()
        self.initializeParameterNode()

    def cleanup(self):
        self._pollTimer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        self.removeObservers()

    def onReload(self):
        """Reload SlicerPTQLib too (reloading only this file would keep the old library)."""
        if self._job is not None:
            self._job.cancel()
        for name in [name for name in sys.modules if name == "SlicerPTQLib" or name.startswith("SlicerPTQLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            # The connection fills the list with the logic's names and keeps choices by index: relabel them.
            for index, runtime in enumerate(RUNTIMES):
                self.ui.runtimeComboBox.setItemText(index, RUNTIME_LABELS.get(runtime, runtime))
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            self.updateGui()

    def updateGui(self, caller=None, event=None):
        """Show the parameter node state the automatic GUI connection does not cover."""
        if self._parameterNode is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            listed = self.ui.modelListWidget.currentItem()
            if listed is None or listed.data(qt.Qt.UserRole) != self._parameterNode.model:
                self.onModelSearchChanged(self.ui.modelSearchLineEdit.text)
            checked = set(self._parameterNode.calibrationVolumes)
            batch = set(self._parameterNode.batchVolumes)
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                self.ui.calibrationVolumesComboBox.setCheckState(node, qt.Qt.Checked if node in checked else qt.Qt.Unchecked)
                self.ui.batchVolumesComboBox.setCheckState(node, qt.Qt.Checked if node in batch else qt.Qt.Unchecked)
            if self.ui.specFilePathLineEdit.currentPath != self._parameterNode.specFile:
                self.ui.specFilePathLineEdit.currentPath = self._parameterNode.specFile
            inputVolume = self._parameterNode.inputVolume
            # A new output segmentation is named after the input, like the results the logic creates.
            self.ui.outputSegmentationSelector.baseName = (f"{inputVolume.GetName()} segmentation" if inputVolume
                                                           else _("Segmentation"))
            self.ui.resultsTableView.setMRMLTableNode(self._parameterNode.resultsTable)
            # A served model runs as exported: the server fields replace the model, calibration and build choices.
            remote = self._parameterNode.runtime == "triton"
            for widget in (self.ui.serverUrlLabel, self.ui.serverUrlLineEdit, self.ui.serverModelLabel,
                           self.ui.serverModelLineEdit):
                widget.visible = remote
            for widget in (self.ui.modelSearchLineEdit, self.ui.modelListWidget, self.ui.loadModelFileButton,
                           self.ui.calibrationVolumesComboBox, self.ui.numCropsSpinBox, self.ui.methodComboBox,
                           self.ui.precisionComboBox, self.ui.compareCheckBox, self.ui.specFilePathLineEdit,
                           self.ui.modalityComboBox):
                widget.enabled = not remote
            budgetable = PRECISIONS[self._parameterNode.precision].takes_accuracy_budget and not remote
            self.ui.keepAccuracyCheckBox.enabled = budgetable
            self.ui.accuracyBudgetSpinBox.enabled = budgetable and self._parameterNode.keepAccuracy
            self.ui.applyButton.enabled = self._job is not None or self._parameterNode.inputVolume is not None
        finally:
            self._updatingGui = False

    def onModelSearchChanged(self, text):
        """List catalog models matching ``text``, plus the loaded model file, keeping the selection."""
        current = self._parameterNode.model if self._parameterNode else DEFAULT_MODEL
        entries = [(model.title, model.id, model.describe()) for model in catalog.search(self.logic.models, text)]
        if current and all(current != model.id for model in self.logic.models):
            entries.insert(0, (_("File: {name}").format(name=current.replace("\\", "/").split("/")[-1]), current, current))
        wasBlocked = self.ui.modelListWidget.blockSignals(True)
        self.ui.modelListWidget.clear()
        for title, key, details in entries:
            item = qt.QListWidgetItem(title)
            item.setData(qt.Qt.UserRole, key)
            item.setToolTip(details)
            self.ui.modelListWidget.addItem(item)
            if key == current:
                self.ui.modelListWidget.setCurrentItem(item)
                self.ui.modelDetailsLabel.text = details
        self.ui.modelListWidget.blockSignals(wasBlocked)

    def onModelSelected(self, item, previous=None):
        if item is not None and self._parameterNode is not None:
            self.ui.modelDetailsLabel.text = item.toolTip()
            self._parameterNode.model = item.data(qt.Qt.UserRole)

    def onLoadModelFile(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load model"), "",
            _("Models (*.pt *.pth *.ts *.onnx metadata.json);;All files (*)"))
        if path:
            # A MONAI bundle is chosen through its configs/metadata.json: the bundle is two folders up.
            bundle = os.path.basename(path) == "metadata.json"
            self._parameterNode.model = os.path.dirname(os.path.dirname(path)) if bundle else path

    def onSpecFileChanged(self, path):
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.specFile = path

    def onCalibrationVolumesChanged(self):
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.calibrationVolumes = list(self.ui.calibrationVolumesComboBox.checkedNodes())

    def onBatchVolumesChanged(self):
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.batchVolumes = list(self.ui.batchVolumesComboBox.checkedNodes())

    def onAddFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder of volumes to segment"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Could not load the folder."), waitCursor=True):
                nodes = self.logic.loadVolumeFolder(folder)
                self._parameterNode.batchVolumes = list(self._parameterNode.batchVolumes) + nodes

    def onApplyButton(self):
        if self._job is not None:
            self._job.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start."), waitCursor=True):
            if not self.ensureDependencies(remote=self._parameterNode.runtime == "triton"):
                return
            parameters = self._parameterNode
            self.ui.logTextEdit.clear()
            self.showSensitivity(None)
            self.ui.buildInfoLabel.text = ""
            volumes = [parameters.inputVolume] + [node for node in parameters.batchVolumes
                                                  if node is not parameters.inputVolume]
            # Greyed-out check boxes keep their state (for int8, for local runtimes) but do not apply.
            remote = parameters.runtime == "triton"
            keepAccuracy = parameters.keepAccuracy and PRECISIONS[parameters.precision].takes_accuracy_budget
            self._job = self.logic.startBatch(
                parameters.serverModel if remote else parameters.model, list(parameters.calibrationVolumes),
                volumes, parameters.outputSegmentation if len(volumes) == 1 else None, method=parameters.method,
                numCrops=parameters.numCrops, precision=parameters.precision, runtime=parameters.runtime,
                compareWithFP32=parameters.compareWithFP32 and not remote,
                accuracyBudget=parameters.accuracyBudget if keepAccuracy and not remote else None,
                progress=self.onProgress, log=self.appendLog, showIn3D=parameters.showIn3D,
                serverUrl=parameters.serverUrl if remote else None,
                specFile=(parameters.specFile or None) if not remote else None,
                modality=None if remote or parameters.modality == "auto" else parameters.modality)
            self.setRunning(True)
            self._pollTimer.start()

    def appendLog(self, line):
        self.ui.logTextEdit.appendPlainText(line)
        logging.info(line)  # also in Slicer's application log, which keeps what the bounded box drops

    def onPollJob(self):
        if self._job is None or not self._job.poll():
            return
        job, self._job = self._job, None
        self._pollTimer.stop()
        self.setRunning(False)
        parameters = self.logic.getParameterNode()  # also valid when the user left the module meanwhile
        if job.cancelled:
            self.ui.progressBar.format = _("Cancelled")
        elif job.error is not None:
            self.ui.progressBar.format = _("Failed")
            slicer.util.errorDisplay(job.error)
        else:
            results = job.result
            # A batch leaves the selector alone: the next Apply must not overwrite one. A regression model's
            # result is a scalar volume node, not a segmentation.
            if len(results) == 1 and not results[0][1].get("map"):
                parameters.outputSegmentation = results[0][0]
            if not parameters.resultsTable:
                parameters.resultsTable = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", _("PTQ results"))
            rows = [{"input": node.GetName(), **row} for node, table in results for row in table["rows"]]
            slicer_nodes.update_table_node(parameters.resultsTable, rows)
            self.ui.resultsTableView.setMRMLTableNode(parameters.resultsTable)
            build = results[0][1].get("build")
            self.showSensitivity(build.sensitivitySummary() if build is not None else None)
            self.ui.buildInfoLabel.text = build.describe() if build is not None else ""
            self.ui.progressBar.format = _("Done")
        self.showCacheInfo()

    def showSensitivity(self, summary):
        """What the accuracy budget kept in float, above the results table (hidden without a budget)."""
        self.ui.sensitivityLabel.text = summary or ""
        self.ui.sensitivityLabel.visible = bool(summary)

    def showCacheInfo(self):
        """Where builds and downloads are kept, their size, and the package versions the worker runs."""
        info = self.logic.cacheInfo()
        self.ui.cacheInfoLabel.text = "\n".join(
            _("{what}: {size} MB in {location}").format(what=what, size=usage["sizeMB"], location=usage["location"])
            for what, usage in ((_("Builds"), info["builds"]), (_("Downloads"), info["downloads"])))
        self.ui.packageInfoLabel.text = _("Packages: {versions}").format(versions=self.logic.packageInfo())

    def onOpenCache(self):
        location = self.logic.cacheInfo()["builds"]["location"]
        location.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(location)))

    def onClearCache(self):
        if self._job is not None:
            slicer.util.warningDisplay(_("Wait for the running job to end (or cancel it) before clearing builds."))
            return
        if slicer.util.confirmOkCancelDisplay(_("Remove every quantized build? The next Apply builds again.")):
            with slicer.util.tryWithErrorDisplay(_("Could not clear the builds."), waitCursor=True):
                self.logic.clearCache()
        self.showCacheInfo()

    def onProgress(self, stage, done, total):
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = min(done, max(total, 1))
        self.ui.progressBar.format = f"{stage}: %v / %m"

    def setRunning(self, running):
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        for section in (self.ui.modelCollapsibleButton, self.ui.calibrationCollapsibleButton,
                        self.ui.buildCollapsibleButton, self.ui.segmentCollapsibleButton):
            section.enabled = not running

    def ensureDependencies(self, remote=False):
        """Install what the core (and with ``remote`` the Triton client) needs on first use, after asking.
        False if the user declined."""
        plan = dependencies.install_plan(remote=remote)
        if plan.empty:
            return True
        if not slicer.util.confirmOkCancelDisplay(plan.question(), _("SlicerPTQ needs Python packages"),
                                                  detailedText=plan.details()):
            return False
        self.ui.applyButton.enabled = False  # no second Apply while packages install
        try:
            with slicer.util.WaitCursor():
                dependencies.install(plan, pip_install=slicer.util.pip_install, install_torch=self.installTorch)
        finally:
            self.ui.applyButton.enabled = True
        return True

    def installTorch(self):
        try:
            import PyTorchUtils
        except ModuleNotFoundError as exc:
            raise PTQError(_("Install the PyTorch extension from the Extensions Manager, restart 3D Slicer "
                             "and try again.")) from exc
        # The extension picks the CUDA or CPU build; torch is never imported here before it is installed.
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=dependencies.TORCH_REQUIREMENT)


class SlicerPTQLogic(ScriptedLoadableModuleLogic, PTQLogic):
    """PTQLogic with the module's parameter node (see SlicerPTQLib.logic for the API)."""

    def __init__(self, inProcess=False):
        ScriptedLoadableModuleLogic.__init__(self)
        PTQLogic.__init__(self, inProcess=inProcess)

    def getParameterNode(self):
        return SlicerPTQParameterNode(super().getParameterNode())


class SlicerPTQTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentShippedVolume()

    def test_SegmentShippedVolume(self):
        """Quantize the shipped model on a real head MRI and segment it through the worker."""
        from SlicerPTQLib import metrics, shipped

        if not dependencies.install_plan().empty:
            self.skipTest("Python dependencies are not installed (open the module once and let it install them).")
        try:
            model = shipped.shipped_model()
            name, image, mask = shipped.evaluation_volumes(include_debian=False)[0]
        except PTQError as exc:
            self.skipTest(f"shipped model or volume unavailable: {exc}")
        self.delayDisplay(f"Segmenting {name} with the INT8 model")
        volumeNode = slicer.util.loadVolume(str(image))
        logic = SlicerPTQLogic()
        built = logic.quantize(str(model), [volumeNode], numCrops=4)
        segmentationNode, table = logic.segment(built, volumeNode, compareWithFP32=True, precision="int8")
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        self.assertEqual(segmentation.GetNthSegment(0).GetName(), "brain")
        self.assertGreater(table["rows"][0]["Dice vs FP32"], 0.95)
        labels = slicer_nodes.labels_from_segmentation(segmentationNode, volumeNode, built.spec)
        reference = shipped.reference_mask(mask)
        self.assertGreater(metrics.dice(labels.array, reference.array, [1])[1], 0.9)
        self.delayDisplay("Test passed")
