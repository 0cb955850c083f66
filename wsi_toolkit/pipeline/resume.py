"""Resuming a batch: a finished slide is skipped only when its output key is unchanged
(:func:`decide`); otherwise the log says which fields differ."""

from __future__ import annotations

from pathlib import Path

from wsi_toolkit.pipeline.results import finished
from wsi_toolkit.records import RunRecord, upgrade_output_key


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _key_differences(old: dict, new: dict) -> list[str]:
    """``["threshold 0.5 -> 0.6", ...]``: the fields of two output keys that differ."""
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for k in list(b) + [k for k in a if k not in b]:
        va, vb = a.get(k, "(absent)"), b.get(k, "(absent)")
        if va != vb:
            if isinstance(va, str) and isinstance(vb, str) and len(va) == len(vb) == 64:  # sha256: short form
                va, vb = va[:12], vb[:12]
            diffs.append(f"{k} {va} -> {vb}")
    return diffs


def decide(out_dir: Path, key: dict, overwrite: bool) -> tuple[str, RunRecord | None, str]:
    """("skip", run, "") for a finished slide with the same output key; ("run", None, why) otherwise."""
    run = finished(out_dir)
    if overwrite:  # say "redoing" only where there was something to redo
        return "run", None, "--overwrite" if run is not None else ""
    if run is None:
        return "run", None, ""
    old = upgrade_output_key(run.output_key)
    if not isinstance(old, dict):
        return "run", None, "its run.json has no output_key (made by an older wsi-toolkit)"
    diffs = _key_differences(old, key)
    if diffs:
        return "run", None, "; ".join(diffs)
    return "skip", run, ""
