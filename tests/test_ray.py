"""``wsi-infer --ray``: the batch on a local Ray cluster (2 CPUs, 2 workers, no dashboard, no network).

SYNTHETIC slides (~0.3 mm^2 of tissue each) and the SYNTHETIC colour-rule model. One Ray start for
the module. Checked: the outputs are the bytes a single-process run writes; a worker killed with
SIGKILL mid-slide costs that slide's partial work only (it is retried on another worker); a slide
whose worker keeps dying is recorded as failed after the bounded retries; a slide that cannot be
read is recorded as failed; a second run skips everything; a node that cannot see ``--out`` stops
the batch before any slide runs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'wsi-toolkit[ray]')")

from wsi_toolkit.cli.infer import main  # noqa: E402
from wsi_toolkit.errors import ConfigError, WsiToolkitError  # noqa: E402
from wsi_toolkit.inference import InferenceConfig  # noqa: E402
from wsi_toolkit.pipeline import RunConfig, run_batch  # noqa: E402
from wsi_toolkit.scale import OutNotSharedError, RaySettings, run_batch_ray  # noqa: E402
from wsi_toolkit.scale import driver as scale_driver  # noqa: E402
from wsi_toolkit.scale.worker import TEST_HOOK_ENV, SlideWorker  # noqa: E402
from wsi_toolkit.synthetic import make_spec, write_synthetic_slide  # noqa: E402
from wsi_toolkit.synthetic_model import make_colour_rule_package  # noqa: E402

COMPARED = ("heatmap.tif", "tumor.geojson", "tumor.xml", "tiles.csv", "overlay.png")
CONFIG = RunConfig(inference=InferenceConfig(workers=0, progress=False))
SLOW_S = 120  # the first attempt at slow.tif waits this long: the test kills its worker before


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Slides, the model, a single-process reference run, and Ray (2 CPUs) started once."""
    root = tmp_path_factory.mktemp("ray")
    (root / "slides").mkdir()
    slides = {}
    for seed, name in enumerate(("a", "slow", "crash")):
        slides[name] = write_synthetic_slide(root / "slides" / f"{name}.tif",
                                             make_spec(tissue_mm2=0.3, n_tumors=1, seed=seed), mpp=0.243,
                                             tile=256).path
    slides["bad"] = root / "slides" / "bad.tif"
    slides["bad"].write_bytes(b"II*\x00 not a slide")
    model = root / "model"
    make_colour_rule_package(model, input_size=96)
    ref = root / "ref"
    assert [r.status for r in run_batch([slides["a"], slides["slow"]], model, ref, CONFIG)] == ["ok", "ok"]
    saved = os.environ.get(TEST_HOOK_ENV)
    os.environ[TEST_HOOK_ENV] = f"slow:slow.tif:{SLOW_S},crash:crash.tif"  # inherited by Ray's workers
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield {"root": root, "slides": slides, "model": model, "ref": ref}
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop(TEST_HOOK_ENV, None)
        else:
            os.environ[TEST_HOOK_ENV] = saved


def _summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {Path(r["slide"]).name: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def ray_run(cluster):
    """One batch on 2 workers: a, slow (its worker killed mid-slide), crash (kills its worker every
    time), bad (not a slide). Returns (results, out, events, kill record)."""
    s = cluster["slides"]
    out = cluster["root"] / "out"
    events: list[tuple[str, dict, str | None]] = []
    killed: dict = {}

    def kill_mid_slide(pid: int, folder: Path) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = folder / f".heatmap.tif.partial-{pid}"
            if partial.exists():  # the worker is inside the slide, with partial work on disk
                killed.update(pid=pid, partial=partial)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    def on_event(kind, worker, slide):
        events.append((kind, worker, slide))
        if kind == "start" and slide and Path(slide).name == "slow.tif" and not killed.get("started"):
            killed["started"] = True
            threading.Thread(target=kill_mid_slide, args=(worker["pid"], out / "slow"), daemon=True).start()

    t0 = time.perf_counter()
    results = run_batch_ray([s["a"], s["slow"], s["crash"], s["bad"]], cluster["model"], out, CONFIG,
                            settings=RaySettings(cpus_per_worker=1, max_attempts=2), progress=False,
                            on_event=on_event)
    return results, out, events, killed, time.perf_counter() - t0


def test_outputs_are_the_bytes_of_a_single_process_run(cluster, ray_run):
    results, out, events, _, _ = ray_run
    assert [r.status for r in results] == ["ok", "ok", "failed", "failed"]
    for name in ("a", "slow"):
        for f in COMPARED:
            assert (out / name / f).read_bytes() == (cluster["ref"] / name / f).read_bytes(), (name, f)
    workers = {w["worker"] for kind, w, _ in events if kind == "start"}
    assert len(workers) >= 2  # the slides went to more than one worker


def test_run_json_says_which_node_and_device_ran_the_slide(ray_run):
    _, out, _, killed, _ = ray_run
    run = json.loads((out / "a" / "run.json").read_text())
    worker = run["worker"]
    assert worker["engine"] == "ray" and worker["node"] and worker["node_ip"] and worker["node_id"]
    assert worker["device"].startswith("cpu") and worker["pid"] > 0 and worker["attempt"] == 1
    assert run["schema_version"] == 1  # an optional key: the schema is unchanged


def test_a_worker_killed_mid_slide_costs_that_slide_only(ray_run):
    results, out, events, killed, _ = ray_run
    assert killed.get("pid"), "the slow slide's worker was not caught mid-slide"
    assert not killed["partial"].exists()  # its partial work was removed when the slide started again
    run = json.loads((out / "slow" / "run.json").read_text())
    assert run["worker"]["attempt"] == 2 and run["worker"]["pid"] != killed["pid"]
    died = [w for kind, w, slide in events if kind == "died" and slide and slide.endswith("slow.tif")]
    assert [w["pid"] for w in died] == [killed["pid"]]
    assert results[0].status == "ok" and not list(out.rglob(".*.partial-*"))


def test_a_slide_that_keeps_killing_its_worker_is_recorded_failed(ray_run):
    results, out, events, _, _ = ray_run
    crash = results[2]
    assert crash.status == "failed" and "died 2 times" in crash.error and "after 2 attempts" in crash.error
    assert json.loads((out / "crash" / "failed.json").read_text())["error"] == crash.error
    assert sum(1 for kind, _, slide in events if kind == "died" and slide and slide.endswith("crash.tif")) == 2


def test_a_failing_slide_is_recorded_and_the_summary_lists_all(ray_run):
    results, out, _, _, _ = ray_run
    bad = results[3]
    assert bad.status == "failed" and "bad.tif" in bad.error
    assert (out / "bad" / "failed.json").is_file()
    rows = _summary(out)
    assert {k: v["status"] for k, v in rows.items()} == {"a.tif": "ok", "slow.tif": "ok", "crash.tif": "failed",
                                                          "bad.tif": "failed"}


def test_second_run_through_the_cli_skips_everything(cluster, ray_run, capsys):
    _, out, _, _, _ = ray_run
    s = cluster["slides"]
    rc = main([str(s["a"]), str(s["slow"]), "--model", str(cluster["model"]), "--out", str(out), "--ray", "local",
               "--cpus-per-worker", "1", "--workers", "0", "--no-progress"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert text.out.count("skipped") == 2 and "[ray]" in text.err  # one line per change on stderr
    rows = _summary(out)
    assert rows["a.tif"]["status"] == rows["slow.tif"]["status"] == "skipped"
    assert rows["crash.tif"]["status"] == "failed"  # folders of earlier runs stay listed


def test_exit_status_is_1_when_a_slide_fails(cluster, tmp_path, capsys):
    s = cluster["slides"]
    rc = main([str(s["bad"]), "--model", str(cluster["model"]), "--out", str(tmp_path), "--ray", "local",
               "--cpus-per-worker", "2", "--no-progress"])
    assert rc == 1 and "FAILED" in capsys.readouterr().err


def test_a_node_that_cannot_see_out_stops_the_batch_at_start(cluster, tmp_path, monkeypatch):
    # The driver writes its probe under another name: to the workers, --out looks like another filesystem.
    monkeypatch.setattr(scale_driver, "PROBE_DRIVER_FILE", "elsewhere.txt")
    with pytest.raises(OutNotSharedError, match="does not see --out.*every node mounts"):
        run_batch_ray([cluster["slides"]["a"]], cluster["model"], tmp_path / "o", CONFIG,
                      settings=RaySettings(cpus_per_worker=2), progress=False)
    assert not (tmp_path / "o" / "a").exists()  # no slide started
    assert not list((tmp_path / "o").glob(".ray-probe-*"))


def test_a_model_the_workers_cannot_load_stops_the_batch_at_start(cluster, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(WsiToolkitError, match="Ray worker 0 could not start: .*config.json"):
        run_batch_ray([cluster["slides"]["a"]], broken, tmp_path / "o", CONFIG,
                      settings=RaySettings(cpus_per_worker=2), progress=False)
    assert not (tmp_path / "o" / "a").exists()


@pytest.fixture
def keep_torch_threads():
    """A SlideWorker sets torch's thread count for its own (actor) process; made in the test process,
    it must not leave 1 thread to the tests that follow (their run.json records the threads)."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_worker_probe_and_settings_without_a_cluster(cluster, tmp_path, keep_torch_threads):
    w = SlideWorker(str(cluster["model"]), CONFIG, cpus=1, index=7)
    reply = w.probe(str(tmp_path), "token")
    assert reply["ok"] is False and "cannot read" in reply["error"] and reply["worker"] == 7
    (tmp_path / "driver.txt").write_text("token\n")
    assert w.probe(str(tmp_path), "token")["ok"] is True
    for bad in ({"cpus_per_worker": 0}, {"max_attempts": 0}, {"address": ""}, {"start_timeout_s": -1}):
        with pytest.raises(ConfigError):
            RaySettings(**bad)
    with pytest.raises(ConfigError, match="does not exist"):
        run_batch_ray([cluster["slides"]["a"]], tmp_path / "no_model", tmp_path / "o", CONFIG)
