"""The panel's state, saved with the scene (Slicer's parameterNodeWrapper over a vtkMRMLScriptedModuleNode)."""

from __future__ import annotations

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper


@parameterNodeWrapper
class LiverSegParameterNode:
    """Panel state, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    device: str = "auto"
    modelPath: str = ""
    annotator: str = ""
