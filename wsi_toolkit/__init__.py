"""wsi-toolkit: slide-level computational pathology (tissue, tiling, heatmaps) for Camelyon16-style WSIs."""

from wsi_toolkit.errors import (
    AnnotationError,
    ConfigError,
    MissingMppError,
    ModelPackageError,
    SlideFormatError,
    SlideNotFoundError,
    SlideReadError,
    WsiToolkitError,
)
from wsi_toolkit.slide import SlideReader, open_slide

__version__ = "0.1.0"

__all__ = [
    "open_slide",
    "SlideReader",
    "WsiToolkitError",
    "SlideNotFoundError",
    "SlideFormatError",
    "SlideReadError",
    "MissingMppError",
    "ConfigError",
    "AnnotationError",
    "ModelPackageError",
    "__version__",
]
