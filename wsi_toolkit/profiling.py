"""Where a ``wsi-infer`` run's time went, stage by stage (``wsi-infer --profile``).

Every slide's ``run.json`` records its stage times (``timings``); the batch adds what happens once
(process start and imports, loading the package, the INT8 graph). :func:`profile_rows` sums them
over the slides of the batch and :func:`profile_table` prints them as a Markdown table, with the
time no stage accounts for (``other``) so the rows add up to the wall time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["process_age_s", "profile_rows", "profile_table"]

#: (row label, timings key) of the per-slide stages, in the order they happen. The patch loop
#: (``seconds_total``) holds the model's set-up, the model and the waits for reads.
SLIDE_STAGES = (
    ("slide open + thumbnail", "seconds_open_thumbnail"),
    ("tissue detection", "seconds_tissue_detect"),
    ("grid", "seconds_grid"),
    ("model set-up (runtime choice, cache lookup, compile)", "seconds_model_setup"),
    ("model (forward passes; async: waits for a free request)", "seconds_model"),
    ("waiting for patch reads", "seconds_wait_for_reads"),
    ("stitch + regions", "seconds_stitch_regions"),
    ("exports (heatmap.tif, overlay.png, GeoJSON, ASAP, tiles.csv)", "seconds_export"),
)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux: ``/proc/self/stat``), None where unknown."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the command name
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def profile_rows(slide_timings: Iterable[Mapping[str, Any]], batch: Mapping[str, float | None]
                 ) -> list[tuple[str, float]]:
    """(stage, seconds) rows: the batch's one-off stages, each slide stage summed over
    ``slide_timings`` (``run.json`` ``timings`` of the slides this run analysed), ``other`` and the
    total. ``batch``: ``seconds_imports``, ``seconds_package_load``, ``seconds_int8_prepare``,
    ``seconds_wall`` (None or absent: not measured)."""
    slides = list(slide_timings)
    rows: list[tuple[str, float]] = []
    for label, key in (("process start + imports", "seconds_imports"),
                       ("model package load", "seconds_package_load"),
                       ("INT8 graph (calibrate + quantize, or cache lookup)", "seconds_int8_prepare")):
        if batch.get(key) is not None:
            rows.append((label, float(batch[key])))  # type: ignore[arg-type]
    for label, key in SLIDE_STAGES:
        rows.append((label, float(sum(float(t.get(key) or 0.0) for t in slides))))
    loop = sum(float(t.get("seconds_total") or 0.0) for t in slides)
    in_loop = sum(float(t.get(k) or 0.0) for t in slides
                  for k in ("seconds_model_setup", "seconds_model", "seconds_wait_for_reads"))
    rows.append(("patch loop, rest (cutting patches, preprocessing, re-batching)", max(0.0, loop - in_loop)))
    wall = batch.get("seconds_wall")
    if wall is not None:
        rows.append(("other (outside the stages above)", max(0.0, float(wall) - sum(s for _, s in rows))))
        rows.append(("total wall", float(wall)))
    return rows


def profile_table(slide_timings: Iterable[Mapping[str, Any]], batch: Mapping[str, float | None]) -> str:
    """:func:`profile_rows` as a Markdown table (seconds and share of the wall time), with the
    patches predicted, the patches/s over the wall time and the reader's CPU time (in its own
    threads, beside the model)."""
    slides = list(slide_timings)
    rows = profile_rows(slides, batch)
    wall = batch.get("seconds_wall")
    lines = ["| stage | seconds | share of wall |", "|---|---:|---:|"]
    for label, seconds in rows:
        share = f"{100 * seconds / wall:.1f}%" if wall else ""
        bold = "**" if label == "total wall" else ""
        lines.append(f"| {bold}{label}{bold} | {bold}{seconds:.2f}{bold} | {share} |")
    n = sum(int(t.get("n_patches") or 0) for t in slides)
    read = sum(float(t.get("seconds_read_cpu") or 0.0) for t in slides)
    rate = f", {n / wall:.1f} patches/s over the wall time" if wall and n else ""
    lines.append(f"\n{len(slides)} slide(s), {n} patches{rate}; reader CPU time {read:.2f} s in its own "
                 "thread(s), beside the model.")
    return "\n".join(lines)
