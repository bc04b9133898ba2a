"""LiverSeg engine: liver segmentation in abdominal CT, with no Slicer import.

The Slicer module, the batch script and the ``liverseg`` CLI are thin doors onto this package.
"""

from LiverSegExtension.errors import LiverSegError

__version__ = "1.0.0"

__all__ = ["LiverSegError", "__version__"]
