"""The batch behind ``wsi-infer``: many slides into one output folder, resumable and shared.

Per slide, :func:`wsi_toolkit.analysis.analyse_slide` computes and
:func:`wsi_toolkit.analysis.write_outputs` writes; this module decides which slides to run, where
their outputs go, and keeps ``summary.csv``. :func:`run_batch` writes, per slide, in
``OUT/<name>/`` (``<name>`` is the slide's stem made safe, see :func:`safe_dir_name`):
``heatmap.tif``, ``overlay.png``, ``tumor.geojson``, ``tumor.xml``, ``tiles.csv`` and, last,
``run.json``. Nothing is written outside ``OUT``. Every file is written under a temporary name and
renamed, and ``run.json`` marks a finished slide: an interrupted run leaves no half-written file
(temporary files of killed processes are deleted when the slide is started again).

A re-run skips a finished slide only when its ``run.json`` was made from the same slide file (name
and size), the same model (sha256 of the weights and of ``config.json``) and the same settings
that change outputs (:func:`output_key`); otherwise the slide is redone and the log says what
differed. ``overwrite=True`` redoes every slide.

Several ``wsi-infer`` processes may share one ``OUT``: each slide is locked while it runs
(``OUT/.locks/<name>.lock``, non-blocking), and a slide locked by another process is left to it
(status ``busy``). ``OUT/summary.csv`` is rebuilt from every finished ``run.json`` and recorded
failure (``failed.json``) in ``OUT``, under a lock, so the last process to finish writes a
summary of all of them. One failing slide is recorded (status ``failed`` with the error) while
the others go on.
"""

from wsi_toolkit.analysis import OUTPUT_FILES, RunConfig, output_key
from wsi_toolkit.pipeline.batch import (
    Int8Graph,
    SlideTask,
    place_slide,
    prepare_int8,
    prepare_out,
    run_batch,
    run_slide,
    run_slide_task,
)
from wsi_toolkit.pipeline.folders import safe_dir_name, slide_out_dir
from wsi_toolkit.pipeline.results import FAILED_FILE, RESERVED_NAMES, SlideResult, record_failed
from wsi_toolkit.pipeline.summary import summary_rows, write_summary

__all__ = ["RunConfig", "SlideResult", "SlideTask", "run_slide", "run_batch", "place_slide", "run_slide_task",
           "prepare_int8", "Int8Graph",
           "OUTPUT_FILES", "RESERVED_NAMES", "safe_dir_name", "slide_out_dir", "output_key", "summary_rows",
           "write_summary", "record_failed", "prepare_out", "FAILED_FILE"]
