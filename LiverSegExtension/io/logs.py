"""The native libraries' own log switches: ITK's and VTK's warnings reach the terminal only with --debug."""

from __future__ import annotations

import sys

import SimpleITK as sitk


def quiet_native_logs(debug: bool) -> None:
    """ITK's and VTK's own warnings (\"No Series were found\" for every folder without DICOM, MRML's
    display-node notes) go to the terminal only with --debug; LiverSeg says what matters in one line."""
    sitk.ProcessObject.SetGlobalWarningDisplay(debug)
    vtk = sys.modules.get("vtkmodules.vtkCommonCore")  # only where VTK is in use (the batch): importing it costs 0.7 s
    if vtk is not None:
        vtk.vtkObject.SetGlobalWarningDisplay(int(debug))
