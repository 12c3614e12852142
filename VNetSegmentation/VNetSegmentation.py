"""VNet Segmentation: segment the spleen in abdominal CT with a V-Net (3D Slicer scripted module).

Thin by design: the Widget moves values between the GUI, the parameter node and the Logic
(``VNetSegmentationLib``, Qt-free and tested headless); all the work happens in the Logic and in
the core package ``vnetseg``. Inference runs in a separate ``PythonSlicer`` process polled by a
timer, so Slicer never freezes and a run can be cancelled.
"""

# No "from __future__ import annotations" in this file (unlike the rest of the project):
# parameterNodeWrapper builds the parameter class from typing.get_type_hints(cls, include_extras=True)
# when the decorator runs, and plain annotations are evaluated right there, so a wrong name fails at
# import with a clear error, whatever the loader does with sys.modules. Slicer 5.10 and newer run
# Python 3.12, where "X | None" works without it.
import contextlib
import html
import logging
import os
import tempfile
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from VNetSegmentationLib import FinetuneSettings, SegmentationOptions, VNetSegmentationLogic
from VNetSegmentationLib.checks import ERROR
from VNetSegmentationLib.environment import (
    dependencyAdvice,
    deviceLabels,
    installPackages,
    missingPackages,
    pyTorchUtilsLogic,
    selfTestSkipReason,
)

__all__ = ["VNetSegmentation", "VNetSegmentationLogic", "VNetSegmentationTest", "VNetSegmentationWidget"]


class VNetSegmentation(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VNet Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["VNetSegmentation contributors"]
        self.parent.helpText = _(
            "Segments the spleen in an abdominal CT with a V-Net. Select the CT and a model, click "
            "<b>Segment spleen</b>; correct the result in the Segment Editor and export it for training. "
            "See the <a href='https://github.com/vnetsegmentation/VNetSegmentation'>documentation</a>."
        )
        self.parent.acknowledgementText = _(
            "V-Net: Milletari, Navab and Ahmadi, 3DV 2016. Training data layout: Medical Segmentation Decathlon "
            "Task09_Spleen. Built on 3D Slicer and PyTorch."
        )


@parameterNodeWrapper
class VNetSegmentationParameterNode:
    """The panel's state; names, types and defaults mirror VNetSegmentationLib.parameters."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelName: str = ""
    device: Annotated[str, Choice(["auto", "gpu", "cpu"])] = "auto"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.25
    postprocess: bool = True
    mode: Annotated[str, Choice(["auto", "fast", "full"])] = "auto"
    resultSummary: str = ""
    probabilityMap: bool = False
    minLocatedMl: Annotated[float, WithinRange(0.5, 500.0)] = 10.0


class VNetSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI <-> parameter node <-> Logic; never computes."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = None
        self._updating = False
        self._finetuneRun = None
        self._finetuneTimer = None
        self._finetuneRequest = None

    # ------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VNetSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VNetSegmentationLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", self.onDeviceSelected)
        self.ui.installTorchButton.connect("clicked(bool)", self.onInstallTorch)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3D)
        self.ui.editButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.recheckButton.connect("clicked(bool)", self.onRecheck)
        self.ui.exportButton.connect("clicked(bool)", self.onExportForTraining)
        self.ui.improveModelButton.connect("clicked(bool)", self.onImproveModel)
        self.ui.finetuneReportLabel.visible = False
        self._finetuneTimer = qt.QTimer()
        self._finetuneTimer.setInterval(500)
        self._finetuneTimer.connect("timeout()", self.onFinetuneTimer)

        self.refreshTorchAndDevices()
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self._run = None
        if self._finetuneRun is not None:
            self._finetuneRun.cancel()
            self._finetuneRun = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(VNetSegmentationParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
            if not self._parameterNode.modelName and self.ui.modelSelector.count and self.ui.modelSelector.enabled:
                self._parameterNode.modelName = self.ui.modelSelector.currentText
        self.updateGui()

    # --------------------------------------------------------------------- GUI state
    @contextlib.contextmanager
    def busy(self):
        """The wait cursor around work only: never around a dialog the user has to answer."""
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            yield
        finally:
            slicer.app.restoreOverrideCursor()

    def refreshTorchAndDevices(self) -> None:
        """Say what is missing and offer the right install button; neither call raises (a broken torch is reported)."""
        status = self.logic.torchStatus()
        message, buttonText = dependencyAdvice(status, missingPackages())
        self.ui.torchStatusLabel.text = message
        self.ui.torchStatusLabel.visible = bool(message)
        self.ui.installTorchButton.text = buttonText or _("Install PyTorch")
        self.ui.installTorchButton.visible = bool(message)
        found = self.logic.detectDevices() if status.installed else {}
        labels = deviceLabels(found)
        self._updating = True
        try:
            self.ui.deviceSelector.clear()
            for key in ("auto", "gpu", "cpu"):
                self.ui.deviceSelector.addItem(labels[key], key)
        finally:
            self._updating = False
        gpus = ", ".join(found.get("cuda") or []) or ("Apple MPS" if found.get("mps") else "none")
        self.ui.deviceInfoLabel.text = _("Detected GPU: {gpus}").format(gpus=gpus)

    def refreshModels(self, select: str | None = None) -> None:
        entries = self.logic.listModels()
        self._updating = True
        try:
            self.ui.modelSelector.clear()
            for entry in entries:
                self.ui.modelSelector.addItem(entry.name)
            if not entries:
                self.ui.modelSelector.addItem(_("No model installed"))
            self.ui.modelSelector.enabled = bool(entries)
        finally:
            self._updating = False
        if not entries:
            self.ui.modelCardLabel.text = self.logic.models.noModelMessage()
        if self._parameterNode is not None:
            names = [e.name for e in entries]
            wanted = select or self._parameterNode.modelName
            self._parameterNode.modelName = wanted if wanted in names else (names[0] if names else "")
        self.updateGui()

    def updateGui(self, caller=None, event=None) -> None:
        """Parameter node -> the widgets parameterNodeWrapper does not bind; enable what can be used."""
        p = self._parameterNode
        if p is None or self._updating:
            return
        self._updating = True
        try:
            index = self.ui.modelSelector.findText(p.modelName)
            if index >= 0 and self.ui.modelSelector.currentIndex != index:
                self.ui.modelSelector.currentIndex = index
            index = self.ui.deviceSelector.findData(p.device)
            if index >= 0 and self.ui.deviceSelector.currentIndex != index:
                self.ui.deviceSelector.currentIndex = index
            self.ui.resultLabel.text = p.resultSummary or _("No result yet.")
            if p.modelName:
                self.ui.modelCardLabel.text = self._modelCard(p.modelName)
        finally:
            self._updating = False
        running = self._run is not None
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment spleen")
        self.ui.segmentButton.enabled = running or bool(p.inputVolume and p.modelName)
        self.ui.segmentButton.toolTip = (
            "" if self.ui.segmentButton.enabled else _("Select an input CT volume and a model.")
        )
        for widget in (
            self.ui.inputVolumeSelector,
            self.ui.modelSelector,
            self.ui.importModelButton,
            self.ui.outputSegmentationSelector,
            self.ui.advancedCollapsibleButton,
        ):
            widget.enabled = not running and (widget is not self.ui.modelSelector or bool(self.logic.listModels()))
        hasOutput = p.outputSegmentation is not None and p.inputVolume is not None
        for button in (self.ui.show3DButton, self.ui.editButton, self.ui.recheckButton, self.ui.exportButton):
            button.enabled = hasOutput and not running
        improving = self._finetuneRun is not None
        self.ui.improveModelButton.text = _("Cancel improving") if improving else _("Improve the model...")
        self.ui.improveModelButton.enabled = improving or (not running and bool(p.modelName))

    def _modelCard(self, name: str) -> str:
        try:
            return self.logic.modelCardText(name)
        except Exception as exc:  # a damaged file must not break the panel: say what is wrong
            return _("This model cannot be used: {error}").format(error=exc)

    def onModelSelected(self, index: int) -> None:
        if not self._updating and self._parameterNode is not None and self.ui.modelSelector.enabled:
            self._parameterNode.modelName = self.ui.modelSelector.currentText

    def onDeviceSelected(self, index: int) -> None:
        if not self._updating and self._parameterNode is not None and index >= 0:
            self._parameterNode.device = self.ui.deviceSelector.itemData(index)

    # ---------------------------------------------------------------------- running
    def onSegmentButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        try:  # tryWithErrorDisplay shows the error, then re-raises it
            with slicer.util.tryWithErrorDisplay(_("The segmentation could not be started.")):
                self.startRun()
        finally:
            self.updateGui()

    def startRun(self) -> None:
        """Check, ask (warnings, replacing a segment), start: the wait cursor only while working."""
        p = self._parameterNode
        if not self.logic.torchStatus().installed or missingPackages():
            self.installDependencies()  # errors reach this call's tryWithErrorDisplay
            return
        options = SegmentationOptions(p.device, p.overlap, p.postprocess, p.mode, probabilityMap=p.probabilityMap,
                                      minLocatedMl=p.minLocatedMl)
        with self.busy():
            messages = self.logic.preRunChecks(p.inputVolume, p.modelName, options)
        errors = [m.message for m in messages if m.level == ERROR]
        if errors:
            raise ValueError("\n\n".join(errors))
        warnings = [m.message for m in messages if m.level != ERROR]
        if warnings and not slicer.util.confirmOkCancelDisplay("\n\n".join(warnings) + "\n\n" + _("Segment anyway?")):
            return
        replace = False
        output = p.outputSegmentation
        if output is not None:
            with self.busy():
                labels = self.logic.models.readInfo(self.logic.resolveModel(p.modelName)).labels
            taken = [lab.name for lab in labels if output.GetSegmentation().GetSegmentIdBySegmentName(lab.name)]
            if taken:
                question = _("Replace the segment '{names}' in '{node}'? Any correction made to it will be lost.")
                if not slicer.util.confirmOkCancelDisplay(
                    question.format(names=", ".join(taken), node=output.GetName())
                ):
                    return
                replace = True
        with self.busy():
            self._run = self.logic.startSegmentation(p.inputVolume, p.modelName, options, output, replace)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting the segmentation process...")
        self._timer.start()

    def onTimer(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        run.poll()
        self.ui.progressBar.value = round(100 * run.fraction)
        self.ui.statusLabel.text = run.message
        if not run.finished:
            return
        self._timer.stop()
        self._run = None
        try:
            if run.state == "cancelled":
                run.cleanup()
                self.ui.progressBar.value = 0
                self.ui.statusLabel.text = _("Cancelled: nothing was changed.")
                return
            if run.state != "succeeded":
                self.ui.statusLabel.text = _("Failed: {error}").format(error=run.error)
            with slicer.util.tryWithErrorDisplay(_("The segmentation failed."), waitCursor=True):
                node, result = self.logic.finishSegmentation(run)
                self.showResult(node, result)
        finally:
            self.updateGui()

    def showResult(self, node, result) -> None:
        p = self._parameterNode
        p.resultSummary = result.summary()
        if not result.found:  # "no spleen in view" is an answer: the scene was left as it was
            if any(w.code == "thinView" for w in result.warnings):  # too thin a CT for "none" to be sure
                text = _("No spleen found ({seconds:.1f} s), but the CT is too thin for that to be sure: see the warning.")
            else:
                text = _("No spleen found in the field of view ({seconds:.1f} s).")
            self.ui.statusLabel.text = text.format(seconds=result.seconds)
            return
        p.outputSegmentation = node
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s.").format(seconds=result.seconds)
        slicer.util.setSliceViewerLayers(background=p.inputVolume, fit=True)
        node.GetDisplayNode().SetVisibility(True)
        if result.probabilityNodeID:  # the network's probability as the foreground over the CT
            self.logic.showProbability(p.inputVolume, slicer.mrmlScene.GetNodeByID(result.probabilityNodeID))

    # ---------------------------------------------------------------------- after a run
    def onShow3D(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The 3D view could not be shown."), waitCursor=True):
            node = self._parameterNode.outputSegmentation
            node.CreateClosedSurfaceRepresentation()
            node.GetDisplayNode().SetVisibility3D(True)
            layoutManager = slicer.app.layoutManager()
            if layoutManager.threeDViewCount == 0:
                layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
            view = layoutManager.threeDWidget(0).threeDView()
            view.resetFocalPoint()
            view.resetCamera()

    def onEditInSegmentEditor(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The Segment Editor could not be opened."), waitCursor=True):
            p = self._parameterNode
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(p.outputSegmentation)
            editor.setSourceVolumeNode(p.inputVolume)

    def onRecheck(self) -> None:
        """Post-run warnings again, for the segment as it is now (after corrections)."""
        with slicer.util.tryWithErrorDisplay(_("The segment could not be checked."), waitCursor=True):
            p = self._parameterNode
            report, messages = self.logic.qualityWarnings(p.outputSegmentation, p.inputVolume)
            lines = [_("Spleen volume: {ml:.1f} mL (as corrected)").format(ml=report.volume_ml)]
            lines += [_("Warning: {text}").format(text=m.message) for m in messages] or [_("No warnings.")]
            p.resultSummary = "\n".join(lines)

    def askExportFolder(self, title: str) -> str:
        """A folder chosen by the user, starting from the last export folder ("" when cancelled)."""
        start = qt.QSettings().value("VNetSegmentation/exportFolder", os.path.expanduser("~"))
        return qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), title, start)

    def onExportForTraining(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export for training failed.")):
            p = self._parameterNode
            folder = self.askExportFolder(_("Training set folder (MSD layout)"))
            if not folder:
                return
            qt.QSettings().setValue("VNetSegmentation/exportFolder", folder)
            from VNetSegmentationLib.export import caseNameFrom

            caseName = qt.QInputDialog.getText(
                slicer.util.mainWindow(),
                _("Export for training"),
                _("Case name:"),
                qt.QLineEdit.Normal,
                caseNameFrom(p.inputVolume.GetName()),
            )
            if not caseName:
                return
            try:
                with self.busy():
                    result = self.logic.exportForTraining(p.inputVolume, p.outputSegmentation, folder, caseName)
            except FileExistsError as exc:
                if not slicer.util.confirmOkCancelDisplay(str(exc) + "\n\n" + _("Replace the existing case?")):
                    return
                with self.busy():
                    result = self.logic.exportForTraining(
                        p.inputVolume, p.outputSegmentation, folder, caseName, overwrite=True
                    )
            self.ui.statusLabel.text = _("Exported '{case}': {n} training case(s) in {folder}").format(
                case=result.caseName, n=result.numTraining, folder=folder
            )

    # ------------------------------------------------------------ improving the model
    def onImproveModel(self) -> None:
        if self._finetuneRun is not None:
            self._finetuneRun.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Improving the model could not be started.")):
                self.startFinetune()  # asks for the folder and the name: no wait cursor over the dialogs
        finally:
            self.updateGui()

    def startFinetune(self, request=None, force: bool = False) -> None:
        """Ask for the export folder and the new model's name (unless ``request`` repeats a run), then start."""
        p = self._parameterNode
        if request is None:
            folder = self.askExportFolder(_("Folder of the cases exported for training"))
            if not folder:
                return
            name = qt.QInputDialog.getText(
                slicer.util.mainWindow(),
                _("Improve the model"),
                _("Name of the new model (the model '{base}' is not changed):").format(base=p.modelName),
                qt.QLineEdit.Normal,
                f"{p.modelName}-improved",
            )
            if not name:
                return
            request = (folder, p.modelName, name)
        folder, base, name = request
        device = SegmentationOptions(p.device).coreDevice()
        with self.busy():
            self._finetuneRun = self.logic.startFinetune(folder, base, name, FinetuneSettings(device=device, force=force))
        self._finetuneRequest = request
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting to improve the model...")
        self._finetuneTimer.start()

    def onFinetuneTimer(self) -> None:
        run = self._finetuneRun
        if run is not None:
            run.poll()
            self.ui.progressBar.value = round(100 * run.fraction)
            self.ui.statusLabel.text = run.message
        if run is not None and not run.finished:
            return
        self._finetuneTimer.stop()
        self._finetuneRun = None
        if run is None:
            return
        try:
            if run.state == "cancelled":
                self.ui.progressBar.value = 0
                self.ui.statusLabel.text = _(
                    "Cancelled: no model was installed. Improve again with the same name to resume."
                )
                return
            with slicer.util.tryWithErrorDisplay(_("Improving the model failed.")):
                with self.busy():
                    outcome = self.logic.finishFinetune(run)
                self.showFinetuneOutcome(outcome)  # may ask whether to install a worse model: normal cursor
        finally:
            self.updateGui()

    def showFinetuneOutcome(self, outcome) -> None:
        """The before/after table; select the new model, or offer to install a worse one anyway."""
        self.ui.finetuneReportLabel.text = "<pre>" + html.escape(outcome.table) + "</pre>"
        self.ui.finetuneReportLabel.visible = True
        self.ui.statusLabel.text = outcome.message
        if outcome.installed:
            self.refreshModels(select=outcome.model.name)
            return
        question = _("{message}\n\nInstall the new model anyway?").format(message=outcome.message)
        if outcome.worse and slicer.util.confirmYesNoDisplay(question, detailedText=outcome.table):
            self.startFinetune(self._finetuneRequest, force=True)

    # -------------------------------------------------------------------- models, torch
    def onImportModel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The model could not be imported.")):
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Import model file"), "", _("VNet model (*.pt)")
            )
            if not path:
                return
            try:
                with self.busy():
                    entry = self.logic.importModel(path)
            except FileExistsError as exc:
                if not slicer.util.confirmOkCancelDisplay(str(exc) + "\n\n" + _("Replace it?")):
                    return
                with self.busy():
                    entry = self.logic.importModel(path, overwrite=True)
            self.refreshModels(select=entry.name)

    def onInstallTorch(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed.")):
            self.installDependencies()

    def installDependencies(self) -> None:
        """Offer to install what is missing (packages, then PyTorch); nothing without the user's OK."""
        missing = missingPackages()
        if missing:
            question = _("Install the missing Python packages ({names}) with pip?").format(names=", ".join(missing))
            if not slicer.util.confirmOkCancelDisplay(question):
                return
            with self.busy():
                installPackages(missing)
        status = self.logic.torchStatus()
        if not status.installed:
            withExtension = pyTorchUtilsLogic() is not None
            action = _("Reinstall") if status.broken else _("Install")
            if not withExtension and not slicer.util.confirmOkCancelDisplay(
                _(
                    "{action} PyTorch with pip now (a download of up to a few GB)? For a GPU build that matches "
                    "your driver, cancel, install the 'PyTorch' extension from the Extensions Manager, "
                    "and try again."
                ).format(action=action)
            ):
                return
            if withExtension:  # the PyTorch extension asks its own question: no wait cursor over it
                how = self.logic.installTorch(askConfirmation=True, reinstall=status.broken)
            else:
                with self.busy():
                    how = self.logic.installTorch(askConfirmation=False, reinstall=status.broken)
            logging.info(f"PyTorch installed through {how}")
            if status.broken:
                slicer.util.infoDisplay(_("PyTorch was reinstalled. Restart Slicer before segmenting."))
        self.refreshTorchAndDevices()
        self.updateGui()


def sampleCtOrSkip(testCase):
    """Slicer's CTChest sample volume; skips the test (clearly) without PyTorch, packages or network.

    The self-tests need PyTorch and the core's packages in Slicer's Python and download a sample CT;
    a fresh Slicer or a ctest machine may have none of these, and then the test is skipped, never
    failed with ModuleNotFoundError.
    """
    reason = selfTestSkipReason()
    if reason:
        testCase.skipTest(reason)
    import SampleData

    try:
        volume = SampleData.downloadSample("CTChest")
    except Exception as exc:  # no network, proxy, server down
        testCase.skipTest(f"VNetSegmentation self-test skipped: the sample CT could not be downloaded ({exc})")
    if volume is None:
        testCase.skipTest("VNetSegmentation self-test skipped: the sample CT could not be downloaded")
    return volume


class VNetSegmentationTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the full Logic path on a Slicer sample CT with a small model made here."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_sample_ct()

    def test_segment_sample_ct(self):
        import numpy as np

        self.delayDisplay("Loading a sample CT")
        volume = sampleCtOrSkip(self)

        from VNetSegmentationLib.models import writeRandomModel  # needs torch: after the check

        self.delayDisplay("Making a small random-weight model")
        folder = tempfile.mkdtemp(prefix="VNetSegmentationTest-")
        modelPath = str(writeRandomModel(os.path.join(folder, "selftest.pt"), "self-test model"))
        logic = VNetSegmentationLogic(modelFolder=os.path.join(folder, "models"), includeShippedModels=False)
        entry = logic.importModel(modelPath)
        self.assertIn("random weights", logic.modelCardText(entry))

        self.delayDisplay("Segmenting in a background process (the panel's path)")
        options = SegmentationOptions("cpu", 0.0, postprocess=False)
        run = logic.startSegmentation(volume, entry, options)
        deadline = time.monotonic() + 600
        while not run.finished and time.monotonic() < deadline:
            run.poll()
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertEqual(run.state, "succeeded", run.error)
        node, result = logic.finishSegmentation(run)

        segmentation = node.GetSegmentation()
        segment = segmentation.GetSegment(result.segmentIDs[0])
        self.assertEqual(segment.GetName(), "Spleen")
        self.assertIn("SCT^123037004^Anatomical Structure~SCT^78961009^Spleen", segment.GetTerminology())
        self.assertTrue(np.allclose(segment.GetColor(), np.array([157, 108, 162]) / 255.0, atol=1e-6))
        self.assertIs(node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()), volume)
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, result.segmentIDs[0], volume)
        self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
        spacing = np.linalg.norm(slicer.util.arrayFromVTKMatrix(_ijkToRas(volume))[:3, :3], axis=0)
        self.assertAlmostEqual(result.volumeMl, mask.astype(bool).sum() * np.prod(spacing) / 1000.0, places=3)

        self.delayDisplay("Segmenting in this process: same voxels")
        here, hereResult = logic.segment(volume, entry, options)
        hereMask = slicer.util.arrayFromSegmentBinaryLabelmap(here, hereResult.segmentIDs[0], volume)
        self.assertLess(np.count_nonzero(hereMask != mask), 1e-4 * mask.size)

        self.delayDisplay("The probability map: on the CT's grid, shown over it")
        withMap = SegmentationOptions("cpu", 0.0, postprocess=False, probabilityMap=True)
        _, mapResult = logic.segment(volume, entry, withMap)
        probabilityNode = slicer.mrmlScene.GetNodeByID(mapResult.probabilityNodeID)
        self.assertIsNotNone(probabilityNode)
        self.assertEqual(probabilityNode.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(_ijkToRas(probabilityNode)),
                                    slicer.util.arrayFromVTKMatrix(_ijkToRas(volume)), atol=1e-6))
        self.assertGreater(logic.showProbability(volume, probabilityNode), 0)
        self.delayDisplay("Test passed")


def _ijkToRas(volumeNode) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix
