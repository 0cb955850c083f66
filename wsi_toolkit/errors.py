"""One exception hierarchy for the toolkit.

Every error subclasses :class:`WsiToolkitError` *and* the builtin it means, so callers can
catch either ``WsiToolkitError`` or, say, ``ValueError``. Messages name the offending file or
value and say how to fix it.
"""

from __future__ import annotations

import os

__all__ = [
    "WsiToolkitError",
    "SlideNotFoundError",
    "SlidePermissionError",
    "SlideFormatError",
    "SlideTooLargeError",
    "SlideReadError",
    "MissingMppError",
    "ConfigError",
    "NoPatchesError",
    "AnnotationError",
    "ReviewConflictError",
    "ModelPackageError",
    "DetectionFileError",
    "one_line",
]


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """A third-party exception's text for our messages: whitespace runs (GEOS and expat put newlines
    in theirs) as single spaces, cut at ``limit`` characters, so a CLI prints one line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WsiToolkitError(Exception):
    """Base class of every error raised on purpose by wsi_toolkit."""


class SlideNotFoundError(WsiToolkitError, FileNotFoundError):
    """The slide path does not exist or is not a file."""


class SlidePermissionError(WsiToolkitError, PermissionError):
    """The slide (or a folder of slides) exists but this user may not read it."""


class SlideFormatError(WsiToolkitError, ValueError):
    """The file is not a slide any backend can open (not a TIFF, empty, unsupported layout)."""


class SlideTooLargeError(SlideFormatError):
    """The slide (or one stored tile/strip of it) is larger than anything a microscope slide can
    be, or than the toolkit reads within its memory bound (see :mod:`wsi_toolkit.limits`)."""


class SlideReadError(WsiToolkitError, OSError):
    """The slide opened but its pixel data is damaged or truncated."""


class MissingMppError(WsiToolkitError, ValueError):
    """The slide has no microns-per-pixel metadata and no override was given."""


class ConfigError(WsiToolkitError, ValueError):
    """A setting is out of range or inconsistent."""


class NoPatchesError(ConfigError):
    """The slide has tissue but the patch grid keeps none of it (patch/stride/--min-tissue settings
    that cannot fit the tissue): a run would report success with nothing analysed."""


class AnnotationError(WsiToolkitError, ValueError):
    """An annotation file (ASAP XML, GeoJSON) is malformed."""


class ReviewConflictError(WsiToolkitError, RuntimeError):
    """A review save based on a version that is no longer the current one (another tab or process saved
    first). ``current_version`` and ``base_version`` say which; reload, merge and save again."""

    def __init__(self, message: str, *, current_version: int, base_version: int):
        self.current_version = current_version
        self.base_version = base_version
        super().__init__(message)


class DetectionFileError(WsiToolkitError, ValueError):
    """A detection CSV (``prob,x,y`` per line, Camelyon16's submission format) is malformed."""


class ModelPackageError(WsiToolkitError, ValueError):
    """A model package (``config.json`` + ``torchscript_model.pt``) is missing, malformed or
    inconsistent. ``field`` names the offending config field (``"transform[2].arguments.mean"``)
    and ``source`` the file, when known; both appear in the message."""

    def __init__(self, problem: str, *, field: str | None = None, source: str | os.PathLike | None = None):
        self.problem = problem
        self.field = field
        self.source = None if source is None else str(source)
        head = [p for p in (self.source, f"field {field!r}" if field else None) if p]
        super().__init__(": ".join(head + [problem]))

    def _located(self, *, source: str | os.PathLike | None = None, prefix: str | None = None) -> ModelPackageError:
        """The same problem, with the file named and/or the field nested under ``prefix``."""
        fld = self.field
        if prefix:
            fld = prefix if not fld else (f"{prefix}{fld}" if fld.startswith("[") else f"{prefix}.{fld}")
        return ModelPackageError(self.problem, field=fld, source=source if source is not None else self.source)
