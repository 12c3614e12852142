"""VNetSegmentationLogic: CT volume node -> core -> segmentation node with a "Spleen" segment.

Qt-free and scriptable: it never opens a dialog, takes its scene as an argument (default
``slicer.mrmlScene``), and runs on Slicer's real MRML classes with or without the application.
Two ways to run:

* :meth:`VNetSegmentationLogic.segment` - synchronous, for scripts and tests (in this process, or
  ``background=True`` to go through the separate process and wait for it);
* :meth:`~VNetSegmentationLogic.startSegmentation` -> :class:`BackgroundRun` (``poll()`` /
  ``cancel()``) -> :meth:`~VNetSegmentationLogic.finishSegmentation` - what the panel uses, from a
  timer, so Slicer never freezes.

A node is added to the scene only when a run has succeeded; a failed or cancelled run leaves the
scene as it was.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import checks, nodes, parameters, probability
from .environment import TorchStatus, detectDevices, installTorch, torchStatus
from .export import ExportResult, caseNameFrom, exportCase
from .models import ModelEntry, ModelStore, modelCardText, readCardWithoutTorch
from .process import CANCELLED, SUCCEEDED, BackgroundProcess, PredictCommand, pythonExecutable, removeFolder
from .runs import BackgroundRun, PreRunCheckError, SegmentationCancelled, SegmentationOptions, SegmentationResult

__all__ = ["VNetSegmentationLogic"]


class VNetSegmentationLogic:
    """Everything the panel does, without the panel.

    Args:
        scene: the MRML scene; default ``slicer.mrmlScene`` (looked up at each use).
        modelFolder: the user's model folder; default ``models.defaultModelFolder()``.
        includeShippedModels: also offer the models shipped with the core.
    """

    def __init__(self, scene=None, modelFolder=None, includeShippedModels: bool = True) -> None:
        self._scene = scene
        self.models = ModelStore(modelFolder, includeShippedModels)
        # interpreter of the background process; None: PythonSlicer in Slicer (process.pythonExecutable)
        self.pythonExecutable: str | None = None

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise RuntimeError("no MRML scene: pass scene= to VNetSegmentationLogic outside Slicer")
        return scene

    def getParameterNode(self):
        """The module's vtkMRMLScriptedModuleNode (the Widget wraps it with parameterNodeWrapper)."""
        return parameters.getParameterNode(self.scene)

    # ----------------------------------------------------------------------- environment
    torchStatus = staticmethod(torchStatus)
    installTorch = staticmethod(installTorch)
    detectDevices = staticmethod(detectDevices)

    def torchReady(self) -> TorchStatus:
        """Like :func:`torchStatus`, raising RuntimeError with the install advice when torch is missing."""
        status = torchStatus()
        if not status.installed:
            raise RuntimeError(status.message)
        return status

    # ---------------------------------------------------------------------------- models
    def listModels(self) -> list[ModelEntry]:
        return self.models.listModels()

    def importModel(self, path, sha256: str | None = None, overwrite: bool = False) -> ModelEntry:
        return self.models.importModel(path, sha256, overwrite)

    def resolveModel(self, model) -> ModelEntry:
        """A ModelEntry from an entry, a listed model name, or a model file path."""
        if isinstance(model, ModelEntry):
            return model
        if model is None or str(model) == "":
            raise ValueError(self.models.noModelMessage())
        entry = self.models.findModel(str(model))
        if entry is not None:
            return entry
        path = Path(model)
        if path.is_file():
            return ModelEntry(path.stem, path, "", "file")
        names = ", ".join(e.name for e in self.listModels()) or "none installed"
        raise ValueError(f"model {model!r} is neither an installed model ({names}) nor a model file")

    def modelCardText(self, model) -> str:
        """The model's card for the panel; without a usable PyTorch it is read without torch, plus what to do."""
        entry = self.resolveModel(model)
        status = torchStatus()
        if status.installed:
            return modelCardText(self.models.readInfo(entry))
        card = modelCardText(readCardWithoutTorch(entry.path, entry.sha256 or None))
        return card + "\nTo use this model: " + status.message

    # ---------------------------------------------------------------------------- checks
    def preRunChecks(
        self, volumeNode, model=None, options: SegmentationOptions | None = None, availableBytes: int | None = None
    ) -> list[checks.CheckMessage]:
        """Every check before a run; errors first. ``availableBytes`` overrides the free memory found."""
        missing = checks.checkVolumePresent(volumeNode)
        if missing:
            return [missing]
        try:
            shape = nodes.volumeShape(volumeNode)
            array = nodes.volumeArrayIJK(volumeNode)
        except ValueError as exc:  # no image data, or several components per voxel
            code = "noVolume" if volumeNode.GetImageData() is None else "notScalar"
            return [checks.CheckMessage(code, checks.ERROR, str(exc))]
        spacing = np.linalg.norm(nodes.ijkToRas(volumeNode)[:3, :3], axis=0)
        found = [checks.checkShape(shape, spacing)]
        torch = torchStatus()
        if model is not None and not torch.installed:
            found.append(checks.CheckMessage("torchMissing", checks.ERROR, torch.message))
        if found[0] is None or found[0].level != checks.ERROR:
            found.append(checks.checkCtLike(array))
            if model is not None and torch.installed:
                found.append(self._memoryCheck(shape, spacing, model, options or SegmentationOptions(), availableBytes))
        messages = [m for m in found if m is not None]
        return sorted(messages, key=lambda m: m.level != checks.ERROR)

    def _memoryCheck(self, shape, spacing, model, options, availableBytes):
        from vnetseg.inference import window_memory_bytes

        info = self.models.readInfo(self.resolveModel(model))
        windowBytes = window_memory_bytes(info.config, info.preprocessing.patch_size)
        device = options.device.lower()
        onGpu = device.startswith(("cuda", "gpu")) or (device == "auto" and bool(detectDevices().get("cuda")))
        host = checks.estimateMemoryBytes(
            shape, spacing, info.preprocessing, info.config.out_channels, 0 if onGpu else windowBytes
        )
        if onGpu:  # the GPU's total memory: measuring what is free would create a CUDA context here
            total = availableBytes if availableBytes is not None else detectDevices().get("cudaTotalBytes", 0)
            gpuCheck = checks.checkMemory(windowBytes, total, "cuda", total=availableBytes is None) if total else None
            if gpuCheck:
                return gpuCheck
        return checks.checkMemory(
            host, availableBytes if availableBytes is not None else checks.hostAvailableBytes(), "cpu"
        )

    def _prepare(self, volumeNode, model, options, outputSegmentation, replace):
        entry = self.resolveModel(model)
        messages = self.preRunChecks(volumeNode, entry, options)
        errors = [m for m in messages if m.level == checks.ERROR]
        if errors:
            raise PreRunCheckError(errors)
        info = self.models.readInfo(entry)
        if outputSegmentation is not None and not replace:
            taken = [
                lab.name
                for lab in info.labels
                if outputSegmentation.GetSegmentation().GetSegmentIdBySegmentName(lab.name)
            ]
            if taken:
                raise FileExistsError(
                    f"segmentation '{outputSegmentation.GetName()}' already has a segment named {', '.join(taken)}; "
                    "confirm replacing it (replace=True) or choose 'Create new segmentation'"
                )
        return entry, info, messages

    # --------------------------------------------------------------------------- running
    def segment(
        self,
        volumeNode,
        model,
        options: SegmentationOptions | None = None,
        outputSegmentation=None,
        replace: bool = False,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        background: bool = False,
        timeout: float | None = None,
    ):
        """Segment ``volumeNode`` and return ``(segmentationNode, SegmentationResult)``, blocking.

        Args:
            volumeNode: the CT (vtkMRMLScalarVolumeNode).
            model: a model name from :meth:`listModels`, a ModelEntry, or a model file path.
            options: device, overlap, post-processing.
            outputSegmentation: fill this node instead of creating one; with ``replace=False`` it
                must not already hold a segment of the model's labels.
            progress: called with (fraction 0-1, message); cancel: polled, True stops the run.
            background: run in a separate process (the path the panel uses) and wait for it.
            timeout: seconds to wait in background mode before the run is stopped.

        Raises:
            PreRunCheckError, FileExistsError, SegmentationCancelled, RuntimeError (process failed).
        """
        options = options or SegmentationOptions()
        if background:
            run = self.startSegmentation(volumeNode, model, options, outputSegmentation, replace)
            deadline = None if timeout is None else time.monotonic() + timeout
            while not run.finished:
                for event in run.poll():
                    if progress is not None and event.get("event") == "progress":
                        progress(float(event.get("fraction", 0.0)), str(event.get("message", "")))
                if (cancel is not None and cancel()) or (deadline is not None and time.monotonic() > deadline):
                    run.cancel()
                    break
                time.sleep(0.05)
            return self.finishSegmentation(run)
        return self._segmentHere(volumeNode, model, options, outputSegmentation, replace, progress, cancel)

    def _segmentHere(self, volumeNode, model, options, outputSegmentation, replace, progress, cancel):
        started = time.monotonic()
        entry, info, warnings = self._prepare(volumeNode, model, options, outputSegmentation, replace)
        self.torchReady()
        from vnetseg.checkpoint import load_model
        from vnetseg.inference import Cancelled, InferenceOptions, predict_volume

        net, info = load_model(entry.path, sha256=entry.sha256 or None)
        image = nodes.imageFromVolumeNode(volumeNode)
        from vnetseg.io import replace_nan

        replace_nan(image, volumeNode.GetName(), in_place=False)  # NaN voxels as air, on a copy: the node is untouched
        readNotes = list(image.notes)
        core = InferenceOptions(
            options.coreDevice(), float(options.overlap), postprocess=options.postprocess, mode=options.mode,
            probability="float32" if options.probabilityMap else None, min_located_ml=float(options.minLocatedMl),
        )
        try:
            prediction = predict_volume(image, net, info, core, progress, cancel)
        except Cancelled:
            raise SegmentationCancelled("the segmentation was cancelled; nothing was added to the scene") from None
        del image
        if not prediction.report.found:
            return None, self._noSpleen(prediction.report.message, started, prediction.device,
                                        prediction.report.warnings + prediction.notes, warnings, entry.name,
                                        background=False)
        node, result = self._output(
            volumeNode,
            prediction.labelmap,
            info,
            outputSegmentation,
            started,
            device=prediction.device,
            warnings=checks.warningsFromTexts(readNotes + prediction.report.warnings + prediction.notes),
            preRunWarnings=warnings,
            modelName=entry.name,
            background=False,
        )
        confidence = prediction.confidence
        self._addProbability(result, volumeNode, prediction.probability, prediction.probability_covers,
                             confidence.as_dict() if confidence is not None else None)
        return node, result

    def startSegmentation(
        self,
        volumeNode,
        model,
        options: SegmentationOptions | None = None,
        outputSegmentation=None,
        replace: bool = False,
    ) -> BackgroundRun:
        """Check, write the CT to a temporary file, and start the core in a separate process."""
        from vnetseg import io as vio

        options = options or SegmentationOptions()
        entry, info, warnings = self._prepare(volumeNode, model, options, outputSegmentation, replace)
        self.torchReady()
        tempDir = Path(tempfile.mkdtemp(prefix="vnetseg-"))
        try:
            inputPath = tempDir / "input.nii"
            vio.write_nifti(inputPath, _niftiSafe(nodes.volumeArrayIJK(volumeNode)), nodes.ijkToRas(volumeNode))
            command = PredictCommand(
                inputPath,
                tempDir / "mask.nii",
                entry.path,
                options.coreDevice(),
                float(options.overlap),
                options.postprocess,
                tempDir / "report.json",
                entry.sha256 or None,
                options.mode,
                tempDir / "probability.nii" if options.probabilityMap else None,
                float(options.minLocatedMl),
            )
            process = BackgroundProcess(
                command.arguments(), python=self.pythonExecutable or pythonExecutable(), workDir=tempDir
            )
        except Exception:
            removeFolder(tempDir)
            raise
        return BackgroundRun(
            process,
            tempDir,
            command.outputPath,
            volumeNode.GetID(),
            entry,
            info,
            options,
            outputSegmentation.GetID() if outputSegmentation is not None else None,
            replace,
            warnings,
        )

    def finishSegmentation(self, run: BackgroundRun):
        """Turn a finished run into ``(segmentationNode, SegmentationResult)``; always deletes its files."""
        try:
            if not run.finished:
                raise RuntimeError("the segmentation is still running; poll() until it has finished")
            if run.state == CANCELLED:
                raise SegmentationCancelled("the segmentation was cancelled; nothing was added to the scene")
            if run.state != SUCCEEDED:
                raise RuntimeError(f"the segmentation failed: {run.error}")
            volumeNode = self.scene.GetNodeByID(run.volumeNodeID)
            if volumeNode is None:
                raise RuntimeError("the input volume was removed from the scene while it was being segmented")
            labelmap = _readMask(run.outputPath, volumeNode)
            output = self.scene.GetNodeByID(run.outputSegmentationID) if run.outputSegmentationID else None
            done = run.process.result or {}
            if done.get("spleen_found") is False and not labelmap.any():
                return None, self._noSpleen(str(done.get("message") or ""), run.started, str(done.get("device", "")),
                                            done.get("warnings") or [], run.preRunWarnings, run.model.name, True)
            probabilityMap = None
            if run.options.probabilityMap:  # read (and checked) before anything is added to the scene
                probabilityMap = probability.readProbability(run.tempDir / "probability.nii", volumeNode)
            node, result = self._output(
                volumeNode,
                labelmap,
                run.info,
                output,
                run.started,
                device=str(done.get("device", "")),
                warnings=checks.warningsFromTexts(done.get("warnings") or []),
                preRunWarnings=run.preRunWarnings,
                modelName=run.model.name,
                background=True,
            )
            self._addProbability(result, volumeNode, probabilityMap, str(done.get("probability_covers") or ""),
                                 done.get("confidence"))
            return node, result
        finally:
            run.cleanup()

    def _addProbability(self, result: SegmentationResult, volumeNode, probabilityMap, covers: str, confidence) -> None:
        """Put the confidence into ``result`` and, when there is a map, add it as "Spleen probability"."""
        result.confidence = confidence
        if probabilityMap is None:
            return
        node = probability.addProbabilityNode(self.scene, volumeNode, probabilityMap, covers)
        result.probabilityNodeID, result.probabilityCovers = node.GetID(), covers

    def showProbability(self, volumeNode, probabilityNode, opacity: float = probability.FOREGROUND_OPACITY) -> int:
        """Show ``probabilityNode`` as the foreground over ``volumeNode`` in every slice view (returns the count)."""
        return probability.showAsForeground(self.scene, volumeNode, probabilityNode, opacity)

    @staticmethod
    def _noSpleen(message, started, device, notes, preRunWarnings, modelName, background) -> SegmentationResult:
        """ "No spleen in view" is an answer: the scene is left exactly as it was (no empty or replaced segment)."""
        return SegmentationResult(
            "", [], 0.0, time.monotonic() - started, device,
            warnings=checks.warningsFromTexts(notes), preRunWarnings=preRunWarnings, modelName=modelName,
            background=background, found=False, message=message or "no spleen found in the field of view",
        )

    def _output(self, volumeNode, labelmap, info, outputSegmentation, started: float, **details):
        """Put (I, J, K) ``labelmap`` into a new or the given segmentation node; return it and the result.

        ``details`` are the remaining SegmentationResult fields (device, warnings, model...).
        """
        scene = self.scene
        if outputSegmentation is None:
            name = scene.GenerateUniqueName(f"{volumeNode.GetName()} segmentation")
            node = nodes.createSegmentationNode(scene, volumeNode, labelmap, info.labels, name)
            ids = [node.GetSegmentation().GetSegmentIdBySegmentName(lab.name) for lab in info.labels]
        else:
            node = outputSegmentation
            nodes.ensureConverterRules()
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            ids = nodes.fillSegments(node, volumeNode, labelmap, info.labels)
            node.CreateClosedSurfaceRepresentation()
        volumeMl = float(np.count_nonzero(labelmap == info.labels[0].value)) * _voxelMl(volumeNode)
        return node, SegmentationResult(node.GetID(), ids, volumeMl, time.monotonic() - started, **details)

    # ----------------------------------------------------------------------- after a run
    def qualityWarnings(self, segmentationNode, volumeNode, segmentName: str = "Spleen"):
        """Post-run warnings for a segment as it is now (e.g. after correction): (QualityReport, messages)."""
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName)
        if not segmentId:
            raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no segment named {segmentName!r}")
        mask = nodes.segmentMask(segmentationNode, segmentId, volumeNode)
        return checks.postRunWarnings(mask, _voxelMl(volumeNode), name=segmentName.lower())

    def exportForTraining(
        self,
        volumeNode,
        segmentationNode,
        folder,
        caseName: str | None = None,
        overwrite: bool = False,
        segmentName: str = "Spleen",
    ) -> ExportResult:
        """Write the CT and the segment (as corrected now) as an MSD training case; see ``export.exportCase``."""
        if volumeNode is None or segmentationNode is None:
            raise ValueError("exportForTraining needs the CT volume and the segmentation; select both")
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName)
        if not segmentId:
            raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no segment named {segmentName!r}")
        mask = nodes.segmentMask(segmentationNode, segmentId, volumeNode)
        image = _niftiSafe(nodes.volumeArrayIJK(volumeNode))
        return exportCase(
            folder, caseName or caseNameFrom(volumeNode.GetName()), image, mask, nodes.ijkToRas(volumeNode), overwrite
        )

    # ----------------------------------------------------------------- improving the model
    def startFinetune(self, exportFolder, baseModel, newName: str, settings=None):
        """Fine-tune ``baseModel`` on an export folder in a separate process; see ``finetune.startFinetune``."""
        from . import finetune

        return finetune.startFinetune(self.models, self.resolveModel(baseModel), exportFolder, newName, settings)

    def finishFinetune(self, run):
        """Install a finished fine-tune's model (unless worse) and report; see ``finetune.finishFinetune``."""
        from . import finetune

        return finetune.finishFinetune(self.models, run)

    def improveModel(self, exportFolder, baseModel, newName: str, settings=None, progress=None, cancel=None,
                     timeout=None):
        """Blocking fine-tune for scripts and tests; see ``finetune.runFinetune``."""
        from . import finetune

        return finetune.runFinetune(
            self.models, self.resolveModel(baseModel), exportFolder, newName, settings, progress, cancel, timeout
        )


def _voxelMl(volumeNode) -> float:
    return float(abs(np.linalg.det(nodes.ijkToRas(volumeNode)[:3, :3]))) / 1000.0


def _niftiSafe(array: np.ndarray) -> np.ndarray:
    """The voxels as NIfTI stores them compactly: 64-bit integers become int32 when they fit, else
    float32 (a converted copy); any other type is returned as it is (no copy)."""
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        lo, hi = int(array.min()), int(array.max())
        return np.array(array, dtype=np.int32 if -(2**31) <= lo and hi < 2**31 else np.float32)
    return array


def _readMask(path: Path, volumeNode) -> np.ndarray:
    """Read the process's mask and check it lies on the volume's grid: (I, J, K) uint8."""
    from vnetseg import io as vio

    if not path.is_file():
        raise RuntimeError(f"the segmentation process reported success but wrote no mask ({path.name})")
    image = vio.read_image(path, dtype=None, allow_uniform=True)  # an empty result is a valid mask
    # a copy in memory: a .nii is read memory-mapped, and on Windows a mapped file cannot be deleted,
    # so the run's temporary folder would be left behind after every run
    labelmap = np.array(image.array, dtype=np.uint8, copy=True)
    affine = np.array(image.affine, dtype=float)
    del image
    difference = nodes.geometryDifference(
        affine, labelmap.shape, nodes.ijkToRas(volumeNode), nodes.volumeShape(volumeNode)
    )
    if difference:
        raise RuntimeError(f"the mask does not lie on the CT's grid ({difference}); it was not loaded")
    return labelmap
