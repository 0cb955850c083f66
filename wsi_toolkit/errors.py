"""One exception hierarchy for the toolkit.

Every error subclasses :class:`WsiToolkitError` *and* the builtin it means, so callers can
catch either ``WsiToolkitError`` or, say, ``ValueError``. Messages name the offending file or
value and say how to fix it.
"""

from __future__ import annotations

__all__ = [
    "WsiToolkitError",
    "SlideNotFoundError",
    "SlideFormatError",
    "SlideReadError",
    "MissingMppError",
    "ConfigError",
    "AnnotationError",
]


class WsiToolkitError(Exception):
    """Base class of every error raised on purpose by wsi_toolkit."""


class SlideNotFoundError(WsiToolkitError, FileNotFoundError):
    """The slide path does not exist or is not a file."""


class SlideFormatError(WsiToolkitError, ValueError):
    """The file is not a slide any backend can open (not a TIFF, empty, unsupported layout)."""


class SlideReadError(WsiToolkitError, OSError):
    """The slide opened but its pixel data is damaged or truncated."""


class MissingMppError(WsiToolkitError, ValueError):
    """The slide has no microns-per-pixel metadata and no override was given."""


class ConfigError(WsiToolkitError, ValueError):
    """A setting is out of range or inconsistent."""


class AnnotationError(WsiToolkitError, ValueError):
    """An annotation file (ASAP XML, GeoJSON) is malformed."""
