"""LiverSeg: one-click liver segmentation of abdominal CT (the Slicer door onto LiverSegExtension).

Slicer loads this file at startup: it only registers the module. The panel, its logic and the self-test
live in ``LiverSegLib/``; the engine runs in a process of its own (``LiverSegLib/engine.py``).
"""

from __future__ import annotations

from LiverSegLib import resource_path
from LiverSegLib.logic import LiverSegLogic, SlicerResult  # noqa: F401 - the module's public logic
from LiverSegLib.parameters import LiverSegParameterNode  # noqa: F401 - the panel's state
from LiverSegLib.selftest import LiverSegTest  # noqa: F401 - found here by Slicer's test runners
from LiverSegLib.widget import LiverSegWidget  # noqa: F401 - found here by Slicer's module loader
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class LiverSeg(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LiverSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverSeg developers (LiverSeg project)"]
        self.parent.helpText = (
            "Segment the liver in an abdominal CT with one click, on CPU (ONNX Runtime, no PyTorch needed) or GPU, "
            "fully offline. Correct the result in Segment Editor, then export it as training data to fine-tune "
            "the model. The bundled model is for non-commercial research use only (see its model card)."
        )
        self.parent.acknowledgementText = (
            "The bundled model was trained on 3D-IRCADb-01 (IRCAD) data; see its model card for sources and "
            "licences (non-commercial research use)."
        )
        # Slicer looks for Resources/Icons/LiverSeg.png beside this file; a source checkout keeps it at the top.
        icon = resource_path("Icons", "LiverSeg.png")
        if icon.is_file():
            import qt

            self.parent.icon = qt.QIcon(str(icon))
