"""Output folder names: ``OUT/<safe stem>``, unique in the batch and never another slide's folder."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from wsi_toolkit.analysis import slide_identity
from wsi_toolkit.pipeline.results import FAILED_FILE, RESERVED_NAMES, read_json

_UNSAFE_CHARS = frozenset('/\\:*?"<>|')


def safe_dir_name(stem: str) -> str:
    """A slide stem as a folder name that stays inside ``OUT`` and is not one of the batch's own
    files.

    Path separators, ``: * ? " < > |`` and control characters become ``_``; leading dots and
    spaces and trailing dots and spaces are dropped (so ``..`` and ``.`` cannot name the parent
    or ``OUT`` itself, and no slide folder is hidden); an empty result becomes ``slide``; a name
    in :data:`RESERVED_NAMES` (``summary.csv``) gets ``_slide`` appended.
    """
    name = "".join("_" if (c in _UNSAFE_CHARS or unicodedata.category(c).startswith("C")) else c
                   for c in unicodedata.normalize("NFC", stem))
    name = name.lstrip(". ").rstrip(". ")
    if not name:
        name = "slide"
    if name.casefold() in RESERVED_NAMES:
        name = f"{name}_slide"
    return name


def _owner(folder: Path) -> dict | None:
    """The slide identity recorded in a slide folder (run.json, else failed.json), if any."""
    for doc_name in ("run.json", FAILED_FILE):
        doc = read_json(folder / doc_name)
        if doc is None:
            continue
        ident = (doc.get("output_key") or {}).get("slide")
        if isinstance(ident, dict) and ident.get("name"):
            return ident
        path = (doc.get("slide") or {}).get("path") if isinstance(doc.get("slide"), dict) else doc.get("slide")
        if isinstance(path, str) and path:
            return {"name": Path(path).name, "size": None}
    return None


def _same_slide(a: dict, b: dict) -> bool:
    return a.get("name") == b.get("name") and (a.get("size") is None or b.get("size") is None
                                               or a.get("size") == b.get("size"))


def slide_out_dir(out: Path, slide_path: Path, taken: set[str]) -> Path:
    """``OUT/<safe stem>`` (:func:`safe_dir_name`), unique in the batch and on disk.

    A second slide of this batch with the same (case-insensitive) name gets
    ``<name>_<suffix>`` (``a.tif``, ``a.svs``), then ``<name>_2``, ...; so does a slide whose
    folder already holds another slide's results (by file name and size), so one never
    overwrites another. ``taken`` (casefolded names) is updated.
    """
    out, slide_path = Path(out), Path(slide_path)
    base = safe_dir_name(slide_path.stem)
    me = slide_identity(slide_path)

    def free(name: str) -> bool:
        if name.casefold() in taken or name.casefold() in RESERVED_NAMES:
            return False
        owner = _owner(out / name)
        return owner is None or _same_slide(owner, me)

    candidates = [base]
    suffix = safe_dir_name(slide_path.suffix.lstrip("."))
    if slide_path.suffix:
        candidates.append(f"{base}_{suffix}")
    name = next((c for c in candidates if free(c)), None)
    i = 2
    while name is None:
        name = f"{base}_{i}" if free(f"{base}_{i}") else None
        i += 1
    taken.add(name.casefold())
    return out / name
