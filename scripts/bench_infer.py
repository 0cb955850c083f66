"""Benchmark wsi-infer end to end on a large SYNTHETIC slide with a ResNet50 TorchScript package.

What it measures (one JSON line each):
- ``decode_floor``, ``read_only``, ``readers`` (``--only floor read readers``): reading without the
  model, on this slide: the functions of ``scripts/bench_read.py`` (its docstring says what each
  measures). ``infer-readers``: one ``wsi-infer`` run per reader design.
- ``wsi_infer``: the ``wsi-infer`` command as a new process at stride 96 and stride 32, once per
  ``--runtime`` and ``--precision`` (``runtime_prepare`` first fills the OpenVINO cache, so the
  timed runs start warm): seconds, patches/s, reading vs model split and the runtime that ran (from
  run.json), peak RSS and PSS of the process tree.
- ``precision``: bf16 (and with OpenVINO int8) against fp32 on the same patches, per runtime.
- ``model_only`` (``--only model``): each package's model alone on uint8 batches already on the
  device (preprocessing, channels_last, autocast as wsi-infer runs them; no reading): patches/s and,
  on CUDA, the peak memory torch allocated. With ``--device cuda`` the ``wsi_infer`` rows also carry
  GPU utilisation and memory sampled by nvidia-smi every 0.2 s, and ``seconds_wait_for_reads`` (the
  loop, hence the GPU, waiting for patches) from run.json.
- with ``--wsinfer BIN``: WSInfer 0.6.x on the same slide and package (its default settings unless
  ``--wsinfer-args``) at ``--wsinfer-strides``, and the ratio.

The package is a ResNet50 with RANDOM weights (timing only; its probabilities mean nothing; or
``--model PACKAGE``, e.g. a trained one),
96 px input at 0.972 um/px, its config carrying WSInfer's ``Resize`` step. Run from the
repository root:

    python scripts/bench_infer.py [--data bench_data] [--tissue-mm2 40] [--strides 96 32]
        [--precision auto fp32 bf16 int8] [--runtime auto torch openvino] [--device cpu|cuda] [--workers N]
        [--batch-size N] [--cache-dir DIR] [--wsinfer-strides 96 32]
        [--only floor read infer wsinfer precision readers infer-readers model] [--wsinfer PATH/TO/wsinfer]
        [--slide EXISTING.tif] [--reader-designs threads dataloader slots] [--reader-rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_harness import cpu_flags, loadavg, openvino_installed, run_measured
from bench_read import READER_DESIGNS, compare_readers, decode_floor, grid_blocks, read_only

from wsi_toolkit.runtime.names import RUNTIMES


def precision_diff(slide_path: Path, n: int, device: str, batch_size: int, workers: int, runtime: str = "torch",
                   cache_dir: Path | None = None) -> dict:
    """bf16 autocast vs fp32 on ``n`` patches of the slide: probability differences and speed.

    A random ResNet50's probabilities sit at 0 or 1, where no difference shows; the final layer
    is scaled so its logits spread over about +-3 on these patches (probabilities across (0, 1)).
    Still RANDOM weights: this measures arithmetic, not accuracy.
    """
    import tempfile

    import numpy as np
    import torch
    import torchvision

    from wsi_toolkit.inference import InferenceConfig, cpu_has_fast_bf16, run_inference
    from wsi_toolkit.model_package import Preprocess, load_model_package, pcam_config, save_model_package
    from wsi_toolkit.slide import open_slide

    grid, _ = grid_blocks(slide_path, 96)
    xy = grid.patch_l0_xy()[np.linspace(0, len(grid) - 1, min(n, len(grid))).astype(int)]
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, num_classes=2).eval()
    cfg = pcam_config(architecture="resnet50", input_size=96)
    with open_slide(slide_path) as slide:
        probe = np.stack([slide.read_at_mpp(p, (96, 96), 0.972) for p in xy[:64]])
    with torch.no_grad():
        gap = net(Preprocess(cfg)(torch.from_numpy(probe))) @ torch.tensor([-1.0, 1.0])
        scale = 3.0 / max(float(gap.std()), 1e-6)
        net.fc.weight.mul_(scale)
        net.fc.bias.mul_(scale)
        net.fc.bias[1] -= float(gap.mean()) * scale  # centre the logit gap on 0
    precisions = ["fp32", "bf16"] + (["int8"] if runtime == "openvino" else [])
    if runtime == "openvino" and not cpu_has_fast_bf16():
        precisions.remove("bf16")  # refused there: OpenVINO's bf16 needs native bf16
    with tempfile.TemporaryDirectory() as tmp:
        save_model_package(Path(tmp) / "m", net, cfg, overwrite=True)
        pkg = load_model_package(Path(tmp) / "m")
        got = {}
        for precision in precisions:
            got[precision] = run_inference(slide_path, xy, pkg, config=InferenceConfig(
                workers=workers, progress=False, device=device, precision=precision, batch_size=batch_size,
                runtime=runtime, cache_dir=None if cache_dir is None else str(cache_dir)))
    p32 = got["fp32"].probs[:, 1]
    rec = {"bench": "precision", "runtime": runtime, "patches": len(xy), "device": device,
           "cpu_native_bf16": cpu_has_fast_bf16(), "prob_fp32_range": [round(float(p32.min()), 4),
                                                                      round(float(p32.max()), 4)],
           "fp32_model_patches_per_s": round(len(xy) / got["fp32"].seconds_model, 1),
           "fp32_model_path": got["fp32"].extra.get("model_path")}
    for precision in precisions[1:]:
        p = got[precision].probs[:, 1]
        d = np.abs(p32 - p)
        pre = "" if precision == "bf16" else f"{precision}_"  # bf16 keys as before
        rec.update({f"{pre}max_abs_prob_diff": round(float(d.max()), 5),
                    f"{pre}mean_abs_prob_diff": round(float(d.mean()), 5),
                    f"{pre}label_flips_at_0.5": int(((p32 >= 0.5) != (p >= 0.5)).sum()),
                    f"{precision}_model_patches_per_s": round(len(xy) / got[precision].seconds_model, 1),
                    f"{precision}_model_path": got[precision].extra.get("model_path")})
    return rec


def model_only(pkg_dir: Path, device: str, precision: str, batch_size: int | str, *, seconds: float = 5.0,
               max_batches: int | None = None) -> dict:
    """The model alone, as ``wsi-infer`` runs it but without reading: uint8 batches already on the
    device go through the package's preprocessing (resize, normalise) and the model in
    channels_last under autocast (CUDA; :func:`wsi_toolkit.inference.prepare_model`), with the
    batch size ``wsi-infer`` would take (``auto``: the memory probe on CUDA). Patches/s over
    ``seconds`` (or ``max_batches``) after two warm-up batches; on CUDA the peak memory torch
    allocated (``torch.cuda.max_memory_allocated``). An upper bound for the end-to-end rate."""
    import torch

    from wsi_toolkit.inference import CPU_BATCH_SIZE, autocast_dtype, cuda_batch_size, prepare_model, resolve_device
    from wsi_toolkit.model_package import Preprocess, load_model_package

    dev = resolve_device(device)
    pkg = load_model_package(pkg_dir, device=dev)
    amp = autocast_dtype(dev, precision)  # type: ignore[arg-type]
    model = prepare_model(pkg.model, dev, amp_dtype=amp, optimize=True)
    preprocess = Preprocess(pkg.config).to(dev)
    px = pkg.config.patch_size_pixels
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode(), model:
        if batch_size == "auto":
            batch_size = cuda_batch_size(model, preprocess, dev, amp, px) if cuda else CPU_BATCH_SIZE
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randint(0, 256, (int(batch_size), px, px, 3), dtype=torch.uint8, device=dev, generator=gen)

        def step() -> None:
            y = preprocess(x)
            if cuda:
                y = y.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                model(y).float().softmax(1)

        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize(dev)
        n_batches, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds and (max_batches is None or n_batches < max_batches):
            step()
            n_batches += 1
            if cuda and n_batches % 8 == 0:
                torch.cuda.synchronize(dev)
        if cuda:
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - t0
    rec = {"bench": "model_only", "package": str(pkg_dir), "architecture": pkg.config.architecture,
           "input_px": _input_px(pkg_dir), "device": str(dev), "precision": {None: "fp32", torch.bfloat16: "bf16",
                                                                           torch.float16: "fp16"}[amp],
           "model_format": pkg.format, "model_path": model.path, "batch_size": int(batch_size),
           "batches": n_batches, "seconds": round(elapsed, 3),
           "model_patches_per_s": round(n_batches * int(batch_size) / elapsed, 1)}
    if cuda:
        rec["gpu_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        del x, model, pkg
        torch.cuda.empty_cache()  # the wsi-infer runs after it find the GPU's memory free again
    return rec


def _input_px(pkg_dir: Path) -> int:
    """The model's input px: the package's Resize size, else its patch size."""
    cfg = json.loads((pkg_dir / "config.json").read_text())
    size = cfg["patch_size_pixels"]
    for step in cfg["transform"]:
        if step["name"] == "Resize":
            size = int(step["arguments"]["size"])
    return size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("bench_data"))
    ap.add_argument("--slide", type=Path, default=None,
                    help="an existing slide (e.g. the demo's wsi-synth slide) instead of making one in --data")
    ap.add_argument("--tissue-mm2", type=float, default=40.0)
    ap.add_argument("--strides", type=int, nargs="+", default=[96, 32])
    ap.add_argument("--precision", nargs="+", default=["auto"],
                    help="wsi-infer --precision values (auto fp32 bf16 fp16 int8), each with each --runtime")
    ap.add_argument("--runtime", nargs="+", default=["auto"], choices=RUNTIMES,
                    help="wsi-infer --runtime values (int8 runs with openvino only)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="OpenVINO's converted models [default: DATA/ov_cache]; filled before the timed runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", default="auto", type=lambda v: v if v == "auto" else int(v),
                    help="N or auto (64 on CPU; on CUDA what fills half the free GPU memory)")
    ap.add_argument("--read-workers", type=int, nargs="*", default=[1, 2],
                    help="worker counts for the reader-alone runs (plus --workers)")
    ap.add_argument("--read-passes", type=int, default=3, help="sweeps of the slide per reader-alone run")
    ap.add_argument("--input-size", type=int, nargs="+", default=[96],
                    help="model input px, one package each (96 native, 224 the article's); WSInfer uses the first")
    ap.add_argument("--precision-diff", type=int, default=512, metavar="N",
                    help="patches for the bf16-vs-fp32 probability comparison (part 'precision'; 0 = skip)")
    ap.add_argument("--skip-infer", action="store_true", help="only the decode floor and the reader")
    ap.add_argument("--only", nargs="+", default=None,
                    choices=["floor", "read", "infer", "wsinfer", "precision", "readers", "infer-readers", "model"],
                    help="run only these parts (default: all but readers, infer-readers and model; wsinfer needs "
                         "--wsinfer)")
    ap.add_argument("--model-seconds", type=float, default=5.0,
                    help="part model: seconds each package's model runs alone (after warm-up)")
    ap.add_argument("--model-batches", type=int, default=None,
                    help="part model: at most this many timed batches (tiny runs on a CPU)")
    ap.add_argument("--reader-designs", nargs="+", choices=list(READER_DESIGNS), default=list(READER_DESIGNS),
                    help="part readers: reader designs compared, alone (--read-workers, --strides), interleaved; "
                         "part infer-readers: one wsi-infer run per design (--strides, --workers)")
    ap.add_argument("--reader-rounds", type=int, default=5, help="part readers: rounds of the interleaved comparison")
    ap.add_argument("--repeat", type=int, default=1,
                    help="repetitions of the stride-96 wsi-infer / WSInfer pair (alternating; medians reported)")
    ap.add_argument("--model", type=Path, default=None,
                    help="time this model package (e.g. a trained one) instead of the RANDOM ResNet50 packages; "
                         "--input-size is then the package's")
    ap.add_argument("--variants", nargs="+", default=[""], metavar="ARGS",
                    help="extra wsi-infer arguments, one quoted string per variant, each run for every runtime, "
                         "precision and stride (e.g. '' '--ov-requests auto'); --profile is always added")
    ap.add_argument("--wsinfer", default=None, help="path to a WSInfer 0.6.x `wsinfer` executable")
    ap.add_argument("--wsinfer-strides", type=int, nargs="+", default=[96],
                    help="strides WSInfer runs at (its --patch-overlap-ratio = 1 - stride / patch px)")
    ap.add_argument("--wsinfer-args", nargs="*", default=[],
                    help="extra `wsinfer run` options (default: none, i.e. WSInfer's defaults: batch 32, "
                         "min(cpus, 8) workers)")
    args = ap.parse_args()

    import torch
    import torchvision

    from wsi_toolkit.model_package import pcam_config, save_model_package
    from wsi_toolkit.synthetic import make_spec, write_synthetic_slide

    args.data.mkdir(parents=True, exist_ok=True)
    slide = args.slide or args.data / f"synthetic_{args.tissue_mm2:g}mm2_0.243.tif"
    if not slide.exists():
        t = time.perf_counter()
        write_synthetic_slide(slide, make_spec(tissue_mm2=args.tissue_mm2, seed=7), mpp=0.243)
        print(json.dumps({"made_slide": str(slide), "seconds": round(time.perf_counter() - t, 1)}), flush=True)
    pkgs = {}
    if args.model is not None:
        size = _input_px(args.model)
        args.input_size = [size]
        pkgs[size] = args.model
    for size in args.input_size if args.model is None else []:
        pkg = pkgs[size] = args.data / f"resnet50_random_{size}"
        cfg = pcam_config(architecture="resnet50", input_size=size,
                          extra={"synthetic": True, "description": "RANDOM weights, for timing only"})
        cfg_path = pkg / "config.json"
        # Re-made when the config changed (e.g. packages before the always-present Resize step, which
        # WSInfer needs to bring its level-0 reads to the model's input size).
        old = json.loads(cfg_path.read_text()).get("transform") if cfg_path.exists() else None
        if old != cfg.to_dict()["transform"]:
            torch.manual_seed(0)
            net = torchvision.models.resnet50(weights=None, num_classes=2)
            save_model_package(pkg, net, cfg, overwrite=True)
    pkg = pkgs[args.input_size[0]]
    machine = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__,
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **cpu_flags()}
    print(json.dumps({"bench": "setup", "slide": str(slide), "packages": [str(p) for p in pkgs.values()],
                      **machine}), flush=True)
    parts = set(args.only or ["floor", "read", "infer", "wsinfer", "precision"])
    if args.skip_infer:
        parts -= {"infer", "wsinfer"}
    if "floor" in parts:
        print(json.dumps(decode_floor(slide, blocks=grid_blocks(slide, 96)[1])), flush=True)
    workers = args.workers if args.workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    if "readers" in parts:
        for rec in compare_readers(slide, args.strides, args.read_workers, args.reader_designs, args.reader_rounds,
                                   args.read_passes):
            print(json.dumps(rec), flush=True)
    if "infer-readers" in parts:
        for stride in args.strides:
            for design in args.reader_designs:
                print(json.dumps(run_wsi_infer(None, slide, pkg, args.data, args.input_size[0], args.precision[0],
                                               stride, args, workers, design=design)), flush=True)
    if "read" in parts:
        for w in sorted({workers, *args.read_workers}):
            for stride in args.strides:
                print(json.dumps(read_only(slide, stride, w, passes=args.read_passes)), flush=True)
    exe = shutil.which("wsi-infer", path=str(Path(sys.executable).parent)) or "wsi-infer"
    cache_dir = args.cache_dir or args.data / "ov_cache"
    runs = [(size, runtime, precision, stride, variant) for size in args.input_size for runtime in args.runtime
            for precision in args.precision for stride in args.strides for variant in args.variants
            if precision != "int8" or runtime != "torch"] if "infer" in parts else []
    walls: dict = {}  # (runtime, precision, stride, variant) -> wall seconds of each repetition, first input size
    wsinfer_walls: dict[int, list[float]] = {}  # stride -> WSInfer wall seconds
    if "precision" in parts and args.precision_diff:
        with_ov = openvino_installed() and any(r != "torch" for r in args.runtime)
        for runtime in ["torch", *(["openvino"] if with_ov else [])]:
            print(json.dumps(precision_diff(slide, args.precision_diff, args.device, args.batch_size, workers,
                                            runtime=runtime, cache_dir=cache_dir)), flush=True)
    if "model" in parts:
        for size in args.input_size:
            for precision in args.precision:
                print(json.dumps(model_only(pkgs[size], args.device, precision, args.batch_size,
                                            seconds=args.model_seconds, max_batches=args.model_batches)), flush=True)
    for size, runtime, precision in sorted({(r[0], r[1], r[2]) for r in runs}):
        rec = prepare_runtime(slide, pkgs[size], runtime, precision, args.device, cache_dir)
        if rec is not None:
            print(json.dumps(rec), flush=True)
    # Repetitions alternate wsi-infer and WSInfer, so both see the same machine conditions.
    for rep in range(args.repeat):
        for size, runtime, precision, stride, variant in runs:
            if rep and stride != 96:
                continue  # repetitions only for the comparison at stride 96
            rec = run_wsi_infer(exe, slide, pkgs[size], args.data, size, precision, stride, args, workers,
                                runtime=runtime, cache_dir=cache_dir, variant=variant)
            rec["repetition"] = rep
            if size == args.input_size[0] and rec["returncode"] == 0:
                walls.setdefault((runtime, precision, stride, variant), []).append(rec["seconds_wall"])
            print(json.dumps(rec), flush=True)
        if args.wsinfer and "wsinfer" in parts:
            for stride in args.wsinfer_strides:
                if rep and stride != 96:
                    continue
                overlap = 1 - stride / 96
                extra = [*args.wsinfer_args, *(["--patch-overlap-ratio", f"{overlap:.6f}"] if overlap else [])]
                rec = run_wsinfer(args.wsinfer, extra, slide, pkg, args.data)
                rec.update({"repetition": rep, "stride_px": stride})
                if rec["returncode"] == 0:
                    wsinfer_walls.setdefault(stride, []).append(rec["seconds_wall"])
                print(json.dumps(rec), flush=True)
    for (runtime, precision, stride, variant), w in walls.items():
        ws = wsinfer_walls.get(stride)
        if ws:
            print(json.dumps({"bench": "ratio_vs_wsinfer", "runtime": runtime, "precision": precision,
                              "variant": variant, "stride_px": stride, "wsi_infer_seconds": w, "wsinfer_seconds": ws,
                              "speedup_median": round(statistics.median(ws) / statistics.median(w), 2),
                              "speedup_range": [round(min(ws) / max(w), 2), round(max(ws) / min(w), 2)]}),
                  flush=True)
    return 0


def prepare_runtime(slide: Path, pkg_dir: Path, runtime: str, precision: str, device: str,
                    cache_dir: Path) -> dict | None:
    """Convert (and for int8 calibrate and quantize, from the slide as wsi-infer does) into the cache
    before the timed runs, so they measure a warm start; None when torch runs."""
    import torch

    from wsi_toolkit.inference import resolve_device
    from wsi_toolkit.model_package import load_model_package
    from wsi_toolkit.runtime import calibration_from_slides, select_runtime

    dev = resolve_device(device)
    if runtime == "torch" or dev.type != "cpu" or not openvino_installed():
        return None
    pkg = load_model_package(pkg_dir)
    t0 = time.perf_counter()
    choice = select_runtime(pkg, runtime=runtime, precision=precision, device=dev, cache_dir=cache_dir,
                            calibration=lambda: calibration_from_slides([slide], pkg))
    return {"bench": "runtime_prepare", "runtime": runtime, "precision": precision,
            "runtime_ran": choice.info.get("runtime"), "seconds": round(time.perf_counter() - t0, 2),
            "torch_threads": torch.get_num_threads(), **{f"ov_{k}": v for k, v in choice.stats.items()}}


def run_wsi_infer(exe: str | None, slide: Path, pkg: Path, data: Path, size: int, precision: str, stride: int, args,
                  workers: int, design: str | None = None, runtime: str | None = None,
                  cache_dir: Path | None = None, variant: str = "") -> dict:
    """``wsi-infer`` as a new process; its run.json timings, wall time, memory and ``--profile`` rows.
    With ``design``, wsi-infer with that reader design in place of the package's (this script's
    ``--as-wsi-infer``); ``variant``: extra wsi-infer arguments (one string, split on spaces)."""
    import hashlib

    tag = "_v" + hashlib.sha256(variant.encode()).hexdigest()[:8] if variant else ""
    out = data / (f"out_s{stride}_{precision}_{size}{'_' + design if design else ''}"
                  f"{'_' + runtime if runtime else ''}{tag}")
    launch = [sys.executable, __file__, "--as-wsi-infer", design] if design else [exe]
    cmd = [*launch, str(slide), "--model", str(pkg), "--out", str(out), "--stride-px", str(stride),
           "--precision", precision, "--device", args.device, "--batch-size", str(args.batch_size),
           "--overwrite", "--no-progress", *(["--workers", str(args.workers)] if args.workers is not None else []),
           *(["--runtime", runtime] if runtime else []), *(["--cache-dir", str(cache_dir)] if cache_dir else []),
           *([] if design else ["--profile"]), *variant.split()]
    m = run_measured(cmd, gpu=args.device.startswith("cuda"))
    run_json = out / slide.stem / "run.json"
    record = json.loads(run_json.read_text()) if run_json.exists() and not m["returncode"] else {}
    timings, ran = record.get("timings", {}), record.get("runtime") or {}
    rec = {"bench": "wsi_infer", **({"design": design, "loadavg": loadavg()} if design else {}), "input_px": size,
           "stride_px": stride, "precision": precision, "runtime": runtime or "auto", "loadavg": loadavg(),
           "runtime_ran": ran.get("runtime"), "precision_ran": ran.get("precision"),
           **({"fallback": ran["fallback"]} if ran.get("fallback") else {}),
           "device": args.device, "batch_size": args.batch_size, "batch_size_ran": timings.get("batch_size"),
           "package": str(pkg), "returncode": m["returncode"], "seconds_wall": round(m["seconds"], 2),
           "peak_rss_mb": m["peak_rss_mb"], "peak_pss_mb": m["peak_pss_mb"], **{k: timings.get(k) for k in (
               "n_patches", "patches_per_s", "seconds_total", "seconds_read_cpu",
               "seconds_wait_for_reads", "seconds_model", "precision", "workers", "model_path")}}
    if timings.get("n_patches"):
        rec["read_ms_per_patch"] = round(1000 * timings["seconds_read_cpu"] / timings["n_patches"], 4)
        rec["end_to_end_patches_per_s"] = round(timings["n_patches"] / m["seconds"], 1)
        if timings.get("seconds_model"):  # preprocessing + forward, with the copy to the device
            rec["model_stage_patches_per_s"] = round(timings["n_patches"] / timings["seconds_model"], 1)
    rec.update({k: v for k, v in m.items() if k.startswith("gpu_")})
    if variant:
        rec["variant"] = variant
    if ran.get("runtime") == "openvino":
        rec.update({k: timings.get(k) for k in ("runtime_cache", "runtime_calibration", "runtime_requests")})
    profile = out / "profile.json"
    if profile.exists() and not m["returncode"]:
        rec["profile"] = {r["stage"]: r["seconds"] for r in json.loads(profile.read_text())["rows"]}
    if m["returncode"]:
        rec["output_tail"] = m["output_tail"]
    return rec


def run_wsinfer(wsinfer: str, extra_args: list[str], slide: Path, pkg: Path, data: Path) -> dict:
    """WSInfer 0.6.x on the same slide and package. It reads level 0 for every patch and fetches
    its model registry at start-up, so it runs offline with an empty registry (BENCHMARKS.md)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    reg = Path.home() / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    if not reg.exists():
        reg.parent.mkdir(parents=True, exist_ok=True)
        reg.write_text(json.dumps({"models": {}}))
    wdir = data / "wsinfer_in"
    wdir.mkdir(exist_ok=True)
    for old in wdir.iterdir():  # only this slide
        if old.name != slide.name:
            old.unlink()
    link = wdir / slide.name
    if not link.exists():
        link.symlink_to(slide.resolve())
    wout = data / "wsinfer_out"
    shutil.rmtree(wout, ignore_errors=True)
    m = run_measured([wsinfer, "run", "--wsi-dir", str(wdir), "--results-dir", str(wout),
                      "--model-path", str(pkg / "torchscript_model.pt"), "--config", str(pkg / "config.json"),
                      *extra_args], env=env)
    rec = {"bench": "wsinfer", "args": extra_args or "defaults", "returncode": m["returncode"],
           "seconds_wall": round(m["seconds"], 2), "peak_rss_mb": m["peak_rss_mb"], "peak_pss_mb": m["peak_pss_mb"]}
    csvs = list((wout / "model-outputs-csv").glob("*.csv")) if wout.exists() else []
    if csvs:
        rec["n_patches"] = sum(1 for _ in open(csvs[0])) - 1
        rec["patches_per_s"] = round(rec["n_patches"] / m["seconds"], 1)
    if m["returncode"]:
        rec["output_tail"] = m["output_tail"]
    return rec


def as_wsi_infer(design: str, argv: list[str]) -> int:
    """``wsi-infer`` with reader design ``design`` in place of the package's reader."""
    from wsi_toolkit.cli.infer import main as wsi_infer_main
    from wsi_toolkit.inference import loop

    loop.PatchBlocks = READER_DESIGNS[design]()
    return wsi_infer_main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--as-wsi-infer"]:
        sys.exit(as_wsi_infer(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
