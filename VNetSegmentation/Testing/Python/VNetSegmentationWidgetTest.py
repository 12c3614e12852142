"""Panel test that needs the Slicer application: click Segment spleen, cancel, run again, open the editor.

Registered with ctest by Testing/Python/CMakeLists.txt (``slicer_add_python_unittest``); it downloads
a Slicer sample CT and makes a small random-weight model, so it needs no model installed. Without
PyTorch, the core's packages or the network it is skipped with a message saying what is missing.
"""

from __future__ import annotations

import os
import tempfile
import time
import unittest
from pathlib import Path

import slicer


def _groupAlive(groupId: int) -> bool:
    """True while a process of the POSIX process group ``groupId`` still exists."""
    try:
        os.killpg(groupId, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _waitUntil(condition, timeout: float = 600.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        slicer.app.processEvents()
        time.sleep(0.02)
    return condition()


class VNetSegmentationWidgetTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def _makeModel(self, folder: str) -> str:
        from VNetSegmentationLib.models import writeRandomModel

        return str(writeRandomModel(os.path.join(folder, "widgettest.pt"), "widget test model"))

    def test_segment_cancel_and_edit(self):
        from VNetSegmentation import sampleCtOrSkip

        volume = sampleCtOrSkip(self)
        folder = tempfile.mkdtemp(prefix="VNetSegmentationWidgetTest-")
        slicer.util.selectModule("VNetSegmentation")
        widget = slicer.modules.vnetsegmentation.widgetRepresentation().self()
        widget.logic.models.folder = Path(folder) / "models"  # keep the user's model folder untouched
        entry = widget.logic.importModel(self._makeModel(folder))
        widget.refreshModels(select=entry.name)
        params = widget._parameterNode
        params.inputVolume = volume
        params.device = "cpu"
        params.overlap = 0.0
        self.assertIn("random weights", widget.ui.modelCardLabel.text)
        self.assertTrue(widget.ui.segmentButton.enabled)

        # start, then cancel: the button turns into Cancel, and the scene gets no segmentation
        widget.ui.segmentButton.click()
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        groupId = widget._run.process.pid  # PythonSlicer (a launcher) leads the group of its python-real
        widget.ui.segmentButton.click()
        self.assertTrue(_waitUntil(lambda: widget._run is None, 60))
        if os.name != "nt":  # nothing of the run may keep computing: launcher and interpreter are gone
            self.assertTrue(_waitUntil(lambda: not _groupAlive(groupId), 10), "the segmentation still runs")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 0)
        self.assertEqual(widget.ui.segmentButton.text, "Segment spleen")

        # a full run: the panel shows the result and selects the new segmentation
        widget.ui.segmentButton.click()
        self.assertTrue(_waitUntil(lambda: widget._run is None))
        segmentation = params.outputSegmentation
        self.assertIsNotNone(segmentation)
        self.assertTrue(segmentation.GetSegmentation().GetSegmentIdBySegmentName("Spleen"))
        self.assertIn("Spleen volume", widget.ui.resultLabel.text)
        self.assertTrue(widget.ui.exportButton.enabled)

        widget.ui.editButton.click()
        self.assertEqual(slicer.util.selectedModule(), "SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        self.assertIs(editor.segmentationNode(), segmentation)
        self.assertIs(editor.sourceVolumeNode(), volume)
