"""Cut a PCam-style patch set from annotated whole-slide images (``wsi-patches``).

Patches are 96 x 96 px at 0.972 um/px, labelled 1 when annotated tumour (ASAP XML, see
:func:`wsi_toolkit.annotations.tumor_region`) covers part of the centre 32 x 32 px, as in
PatchCamelyon. With ``reviews`` (``wsi-patches --reviews OUT``) the labels come instead from a
pathologist's review in ``wsi-view OUT --review`` (``OUT/<slide>/review.geojson``): centre inside a
``Tumor`` polygon -> 1, inside a ``Normal`` polygon -> 0, a patch touching an ``Exclude`` polygon or
outside every labelled polygon is not sampled (:func:`review_labels`). Candidates are the cells of
the toolkit's own PCam grid over the tissue, so a candidate's centre is exactly one heatmap cell.
Splits are by slide, never by patch.

Output (``out/``): the PCam HDF5 layout (:func:`patch_model.data.write_pcam_h5`), one
``camelyonpatch_level_2_split_{split}_meta.csv`` per split (``slide,l0_x,l0_y,label,split``) and
``patches_summary.json`` (with reviews, the meta CSVs also name each patch's review version and
the review file's sha256); the files in detail: docs/training.md, "wsi-patches".
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import shapely
from tqdm.auto import tqdm

from patch_model.data import PCAM_MPP, PCAM_PATCH_PX, PCAM_SPLITS, _PCamWriter
from wsi_toolkit.annotations import read_asap_xml, read_geojson, tumor_region
from wsi_toolkit.annotations.review import REVIEW_FILE, review_class
from wsi_toolkit.atomic import file_sha256, write_json_atomic, write_text_atomic
from wsi_toolkit.errors import AnnotationError, ConfigError, WsiToolkitError
from wsi_toolkit.inference.reading import PatchBlocks, single_patch_blocks
from wsi_toolkit.limits import check_fraction, check_int, check_number
from wsi_toolkit.pipeline.folders import safe_dir_name
from wsi_toolkit.slide import READ_FROM, ReadFrom, open_slide
from wsi_toolkit.tiling import GridConfig, make_grid
from wsi_toolkit.tissue import TissueConfig, detect_tissue

__all__ = ["patch_label", "review_labels", "cut_pcam_patches", "DEFAULT_SPLIT_FRACTIONS", "REVIEW_FILE"]

logger = logging.getLogger(__name__)

#: Default share of slides per split (by slide count, not patch count).
DEFAULT_SPLIT_FRACTIONS: Mapping[str, float] = MappingProxyType({"train": 0.7, "valid": 0.15, "test": 0.15})

_SUMMARY = "patches_summary.json"
#: A slide's review in wsi-infer's results folder: ``OUT/<slide folder>/review.geojson`` (wsi-view --review).
#: Review classes (``properties.classification.name``, case-insensitive) -> PCam label; ``Exclude`` -> not sampled.
_META = "camelyonpatch_level_2_split_{split}_meta.csv"


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _centre_boxes(l0_xy: np.ndarray, patch_l0: float) -> np.ndarray:
    """Shapely boxes of the centre third of each patch (top-left ``l0_xy`` (N, 2), side ``patch_l0``)."""
    third = patch_l0 / 3.0
    x0, y0 = l0_xy[:, 0] + third, l0_xy[:, 1] + third
    return shapely.box(x0, y0, x0 + third, y0 + third)


def _patch_labels(tumor_l0: Any, l0_xy: np.ndarray, *, patch_l0: float) -> np.ndarray:
    """Vectorised :func:`patch_label`: int64 (N,) for patch top-lefts ``l0_xy`` (N, 2)."""
    l0_xy = np.asarray(l0_xy, np.float64).reshape(-1, 2)
    out = np.zeros(len(l0_xy), np.int64)
    if tumor_l0 is None or tumor_l0.is_empty or not len(l0_xy):
        return out
    boxes = _centre_boxes(l0_xy, patch_l0)
    shapely.prepare(tumor_l0)
    hit = shapely.intersects(tumor_l0, boxes)
    if hit.any():
        # Touching along an edge or at a point is no tumour pixel: require some area.
        area = shapely.area(shapely.intersection(tumor_l0, boxes[hit]))
        out[np.flatnonzero(hit)] = area > 0
    return out


def review_labels(tumor_l0: Any, normal_l0: Any, exclude_l0: Any, l0_xy: np.ndarray, *,
                  patch_l0: float) -> np.ndarray:
    """Labels from a pathologist's review: int64 (N,), 1, 0 or -1 (not sampled), for patch top-lefts
    ``l0_xy`` (N, 2) in level-0 px, from the unions of the review's ``Tumor``, ``Normal`` and ``Exclude``
    polygons (shapely, level-0 px; empty or None = none drawn).

    - -1 when the patch (its whole ``patch_l0`` square) overlaps an ``Exclude`` polygon with some area;
    - 1 when its centre third lies inside ``Tumor``;
    - 0 when its centre third lies inside ``Normal`` and overlaps no ``Tumor``;
    - -1 otherwise: unlike ASAP tumour annotations (where tissue outside the tumour is negative), what
      the pathologist did not label is not learned from.

    >>> t, n = shapely.box(0, 0, 400, 400), shapely.box(400, 0, 800, 400)
    >>> review_labels(t, n, None, np.array([[0, 0], [400, 0], [200, 0], [0, 400]]), patch_l0=384.0).tolist()
    [1, 0, -1, -1]
    """
    l0_xy = np.asarray(l0_xy, np.float64).reshape(-1, 2)
    out = np.full(len(l0_xy), -1, np.int64)
    if not len(l0_xy):
        return out
    centre = _centre_boxes(l0_xy, patch_l0)

    def usable(geom: Any) -> bool:
        return geom is not None and not geom.is_empty

    if usable(normal_l0):
        shapely.prepare(normal_l0)
        normal = shapely.within(centre, normal_l0)
        if usable(tumor_l0):
            shapely.prepare(tumor_l0)
            normal &= ~(shapely.intersects(tumor_l0, centre)
                        & (shapely.area(shapely.intersection(tumor_l0, centre)) > 0))
        out[normal] = 0
    if usable(tumor_l0):
        shapely.prepare(tumor_l0)
        out[shapely.within(centre, tumor_l0)] = 1
    if usable(exclude_l0):
        whole = shapely.box(l0_xy[:, 0], l0_xy[:, 1], l0_xy[:, 0] + patch_l0, l0_xy[:, 1] + patch_l0)
        shapely.prepare(exclude_l0)
        hit = shapely.intersects(exclude_l0, whole)
        hit[hit] = shapely.area(shapely.intersection(exclude_l0, whole[hit])) > 0
        out[hit] = -1
    return out


def patch_label(tumor_geometry_l0: Any, patch_l0_xy: Sequence[float], *, patch_l0: float) -> int:
    """PCam label of one patch: 1 iff tumour covers some area of the patch's centre third.

    Parameters
    ----------
    tumor_geometry_l0
        Shapely (Multi)Polygon of tumour in level-0 px (e.g. :func:`tumor_region`); empty or
        None means no tumour.
    patch_l0_xy
        Top-left ``(x, y)`` of the patch in level-0 px.
    patch_l0
        Side of the patch in level-0 px: ``96 * 0.972 / l0_mpp`` (384 at 0.243 um/px,
        412.9 at 0.226).

    The centre region is the square ``[x + patch_l0/3, x + 2*patch_l0/3]`` (and the same in y),
    i.e. PCam's centre 32 x 32 px. A tumour that only touches its border (zero-area overlap)
    gives 0.

    >>> tumour = shapely.box(250, 250, 300, 300)
    >>> patch_label(tumour, (0, 0), patch_l0=384.0), patch_label(tumour, (-200, -200), patch_l0=384.0)
    (1, 0)
    """
    patch_l0 = check_number(patch_l0, "patch_l0", positive=True, unit="level-0 px")
    return int(_patch_labels(tumor_geometry_l0, np.asarray([patch_l0_xy], np.float64), patch_l0=patch_l0)[0])


# --------------------------------------------------------------------------------------------
# Planning: candidates per slide, slide -> split, how many patches of each
# --------------------------------------------------------------------------------------------


@dataclass
class _SlidePlan:
    path: Path
    stem: str
    annotation: Path | None = None
    review: dict[str, Any] | None = None
    mpp: float = math.nan
    synthetic: bool = False
    tumor_mm2: float = 0.0
    cand_xy: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    cand_label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    split: str | None = None
    take_pos: int = 0
    take_neg: int = 0
    error: str | None = None

    @property
    def n_pos(self) -> int:
        return int(self.cand_label.sum())

    @property
    def n_neg(self) -> int:
        return int(len(self.cand_label) - self.cand_label.sum())

    @property
    def is_tumor(self) -> bool:
        return self.n_pos > 0


def _find_annotation(slide: Path, annotations: Path | None) -> Path | None:
    folder = slide.parent if annotations is None else annotations
    xml = folder / f"{slide.stem}.xml"
    return xml if xml.is_file() else None


def _review_doc(path: Path) -> dict[str, Any]:
    """The ``wsi_toolkit`` object of a review.geojson (kind, version, slide, saved)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{path}: not readable JSON ({exc}); save the review again in wsi-view --review"
                              ) from None
    meta = doc.get("wsi_toolkit") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or meta.get("kind") != "review":
        raise AnnotationError(f"{path}: no \"wsi_toolkit\": {{\"kind\": \"review\", ...}} object; it is not a review "
                              "written by wsi-view --review")
    return meta


def _find_review(slide: Path, reviews: Path) -> Path | None:
    """``reviews/<slide folder>/review.geojson`` whose review names this slide file: the folder
    ``wsi-infer`` writes (``<safe stem>``, or ``<safe stem>_<suffix>`` when two slides share a stem)."""
    name = safe_dir_name(slide.stem)
    suffixed = sorted(p for p in reviews.iterdir() if p.is_dir() and p.name.startswith(f"{name}_"))
    for folder in [reviews / name, *suffixed]:
        path = folder / REVIEW_FILE
        if path.is_file() and _review_doc(path).get("slide") in (slide.name, None):
            return path
    return None


def _read_review(path: Path, l0_size: tuple[int, int]) -> tuple[dict[str, Any], Any, Any, Any]:
    """(provenance, Tumor, Normal, Exclude unions in level-0 px) of a review.geojson."""
    meta = _review_doc(path)
    version = meta.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise AnnotationError(f"{path}: wsi_toolkit.version is {version!r}, not an integer; save the review again "
                              "in wsi-view --review")
    parts: dict[str, list[Any]] = {"tumor": [], "normal": [], "exclude": []}
    counts = {"tumor": 0, "normal": 0, "exclude": 0, "ignored": 0}
    for ann in read_geojson(path, l0_size=l0_size):
        named = review_class(ann.group)  # the viewer's own class vocabulary (synonyms included)
        cls = None if named is None else named.casefold()
        if cls is None:
            counts["ignored"] += 1
            logger.warning("%s: a polygon of class %r is neither Tumor, Normal nor Exclude; ignored", path, ann.group)
            continue
        parts[cls].append(ann.polygon)
        counts[cls] += 1
    unions = {k: shapely.union_all(v) if v else shapely.Polygon() for k, v in parts.items()}
    prov = {"path": str(path), "version": version, "sha256": file_sha256(path), "saved": meta.get("saved"),
            "polygons": counts}
    return prov, unions["tumor"], unions["normal"], unions["exclude"]


def _plan_slide(path: Path, *, annotations: Path | None, mpp: float | None, min_tissue_fraction: float,
                reviews: Path | None = None) -> _SlidePlan:
    """Open the slide, find tissue, list the PCam grid candidates and label them (no patch reads)."""
    plan = _SlidePlan(path=path, stem=path.stem)
    review_path = None
    if reviews is not None:
        review_path = _find_review(path, reviews)
        if review_path is None:
            raise ConfigError(f"no {REVIEW_FILE} for {path.name} in {reviews / safe_dir_name(path.stem)}; review it "
                              f"first (wsi-view {reviews} --review) or leave it out of the slides")
    else:
        plan.annotation = _find_annotation(path, annotations)
    if reviews is None and plan.annotation is None and path.stem.lower().startswith("tumor"):
        # Camelyon16 naming: a tumour slide without its XML would give mislabelled negatives.
        raise ConfigError(f"{path.name} is named like a Camelyon16 tumour slide but has no annotation "
                          f"{path.stem}.xml in {annotations or path.parent}; its patches cannot be labelled")
    tissue_cfg = TissueConfig()
    with open_slide(path, mpp=mpp) as slide:
        # Outlines off the slide or around all of it are refused, ones reaching past it warned of:
        # either would label patches by a drawing that does not belong to this slide.
        if review_path is not None:
            plan.review, tumor, normal, exclude = _read_review(review_path, slide.dimensions)
        else:
            tumor = (tumor_region(read_asap_xml(plan.annotation, l0_size=slide.dimensions)) if plan.annotation
                     else shapely.Polygon())
        plan.mpp = slide.mpp
        plan.synthetic = slide.is_synthetic
        thumb = slide.thumbnail(mpp=tissue_cfg.thumb_mpp)
        tissue = detect_tissue(thumb, l0_mpp=slide.mpp, config=tissue_cfg)
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp,
                         config=GridConfig(min_tissue_fraction=min_tissue_fraction),
                         tissue_mask=tissue.mask, mask_l0_per_px=tissue.l0_per_px, require_patches=False)
        plan.cand_xy = grid.patch_l0_xy()
        if review_path is not None:
            labels = review_labels(tumor, normal, exclude, plan.cand_xy, patch_l0=grid.patch_l0)
            plan.cand_xy, plan.cand_label = plan.cand_xy[labels >= 0], labels[labels >= 0]
            if not len(labels[labels >= 0]):
                logger.warning("%s: the review's Tumor/Normal polygons hold no tissue patch's centre; no patch "
                               "from this slide", path.name)
        else:
            plan.cand_label = _patch_labels(tumor, plan.cand_xy, patch_l0=grid.patch_l0)
    plan.tumor_mm2 = float(tumor.area) * plan.mpp**2 / 1e6
    if plan.annotation is not None and not tumor.is_empty and plan.n_pos == 0:
        logger.warning("%s: annotated tumour (%.3f mm2) covers no centre region of a tissue patch; "
                       "its patches are all negatives", path.name, plan.tumor_mm2)
    return plan


def _allocate(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` items over splits in proportion to ``fractions`` (integers summing to ``n``).

    When ``n`` is at least the number of splits with a positive fraction, each gets at least one;
    with fewer items, the largest fractions get one each.
    """
    active = [s for s in PCAM_SPLITS if fractions.get(s, 0) > 0]
    counts = {s: 0 for s in active}
    if n < len(active):
        for s in sorted(active, key=lambda s: (-fractions[s], PCAM_SPLITS.index(s)))[:n]:
            counts[s] = 1
        return counts
    counts = {s: 1 for s in active}
    for _ in range(n - len(active)):
        s = max(active, key=lambda s: (fractions[s] * n - counts[s], -PCAM_SPLITS.index(s)))
        counts[s] += 1
    return counts


def _assign_splits(plans: list[_SlidePlan], fractions: Mapping[str, float], explicit: Mapping[str, str],
                   seed: int) -> None:
    """Slide -> split: explicit first; the rest by fractions, tumour and normal slides separately."""
    rng = np.random.default_rng(seed)
    rest: list[_SlidePlan] = []
    for p in plans:
        if p.stem in explicit:
            p.split = explicit[p.stem]
        else:
            rest.append(p)
    for group in ([p for p in rest if p.is_tumor], [p for p in rest if not p.is_tumor]):
        group = sorted(group, key=lambda p: p.stem)
        order = rng.permutation(len(group))
        counts = _allocate(len(group), fractions)
        it = iter(order.tolist())
        for split, k in counts.items():
            for _ in range(k):
                group[next(it)].split = split


def _water_fill(budget: int, capacity: list[int]) -> list[int]:
    """Share ``budget`` as evenly as possible over bins of ``capacity`` (total <= budget)."""
    take = [0] * len(capacity)
    left = budget
    open_bins = [i for i, c in enumerate(capacity) if c > 0]
    while left > 0 and open_bins:
        share = max(1, left // len(open_bins))
        for i in list(open_bins):
            add = min(share, capacity[i] - take[i], left)
            take[i] += add
            left -= add
            if take[i] >= capacity[i]:
                open_bins.remove(i)
            if left == 0:
                break
    return take


def _plan_counts(plans: list[_SlidePlan], *, per_slide: int, balance: bool) -> None:
    """How many positives and negatives each slide gives (``take_pos``, ``take_neg``)."""
    half = per_slide // 2
    for split in PCAM_SPLITS:
        members = [p for p in plans if p.split == split]
        if not members:
            continue
        if not balance:
            for p in members:
                n = min(per_slide, len(p.cand_label))
                frac_pos = p.n_pos / max(len(p.cand_label), 1)
                p.take_pos = min(p.n_pos, round(n * frac_pos))
                p.take_neg = min(p.n_neg, n - p.take_pos)
            continue
        for p in members:
            p.take_pos = min(half, p.n_pos)
        budget = sum(p.take_pos for p in members)
        if budget == 0:
            logger.warning("split %r has no tumour slide: it holds negatives only (%d slides)", split, len(members))
            for p in members:
                p.take_neg = min(half, p.n_neg)
            continue
        # Negatives: as many as the split's positives, shared evenly over all its slides
        # (normal slides too), each slide capped at per_slide patches.
        takes = _water_fill(budget, [min(p.n_neg, per_slide - p.take_pos) for p in members])
        for p, k in zip(members, takes):
            p.take_neg = k
        if sum(takes) < budget:
            logger.warning("split %r: only %d negatives for %d positives", split, sum(takes), budget)


def _sample(plan: _SlidePlan, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chosen (l0_xy (n, 2), label (n,)), sorted by (y, x) for read locality; seeded per slide."""
    rng = np.random.default_rng([seed, zlib.crc32(plan.stem.encode())])
    pos = np.flatnonzero(plan.cand_label == 1)
    neg = np.flatnonzero(plan.cand_label == 0)
    idx = np.concatenate([rng.choice(pos, plan.take_pos, replace=False),
                          rng.choice(neg, plan.take_neg, replace=False)]).astype(np.int64)
    xy = plan.cand_xy[idx]
    order = np.lexsort((xy[:, 0], xy[:, 1]))
    return xy[order], plan.cand_label[idx][order]


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _check_settings(split_fractions: Mapping[str, float], splits: Mapping[str, str] | None, per_slide: int,
                    min_tissue_fraction: float, mpp: float | None) -> dict[str, float]:
    unknown = set(split_fractions) - set(PCAM_SPLITS)
    if unknown:
        raise ConfigError(f"split_fractions keys must be among {PCAM_SPLITS}; got {sorted(unknown)}")
    fr = {k: float(v) for k, v in split_fractions.items()}
    if any(not (math.isfinite(v) and v >= 0) for v in fr.values()) or sum(fr.values()) <= 0:
        raise ConfigError(f"split_fractions must be non-negative with a positive sum; got {dict(split_fractions)!r}")
    total = sum(fr.values())
    fr = {k: v / total for k, v in fr.items()}
    for stem, s in (splits or {}).items():
        if s not in PCAM_SPLITS:
            raise ConfigError(f"splits[{stem!r}] must be one of {PCAM_SPLITS}; got {s!r}")
    check_int(per_slide, "per_slide", minimum=2)
    check_fraction(min_tissue_fraction, "min_tissue_fraction")
    if mpp is not None:
        check_number(mpp, "mpp", positive=True, unit="um/px")
    return fr


def cut_pcam_patches(
    slides: Sequence[Path],
    *,
    annotations: Path | None,
    out: Path,
    split_fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
    per_slide: int = 1000,
    balance: bool = True,
    seed: int = 0,
    mpp: float | None = None,
    min_tissue_fraction: float = 0.5,
    splits: Mapping[str, str] | None = None,
    read_from: ReadFrom = "finer",
    reviews: Path | None = None,
) -> dict:
    """Cut a PCam-style, slide-split patch set from annotated slides; returns the summary.

    Parameters
    ----------
    slides
        Slide files (any format :func:`wsi_toolkit.slide.open_slide` reads).
    annotations
        Folder holding ``<slide-stem>.xml`` (ASAP). A slide without one is a normal slide
        (negatives only), except one named ``tumor*`` (Camelyon16), which is recorded as failed.
        None: look for the XML next to each slide.
    out
        Output folder (created); see the module docstring for the files.
    split_fractions
        Share of *slides* per split; tumour and normal slides are distributed separately, and
        with at least 3 tumour slides every split with a positive share gets one.
    per_slide
        At most this many patches per slide. With ``balance``: up to ``per_slide // 2``
        positives per tumour slide, and per split as many negatives as positives, shared
        evenly over the split's slides (normal slides included). A split without tumour
        slides gets up to ``per_slide // 2`` negatives per slide.
        Without ``balance``: up to ``per_slide`` per slide at the slide's own tumour prevalence.
    seed
        Seeds the slide -> split assignment and the sampling (per slide, so one slide's sample
        does not change when others are added).
    mpp
        Level-0 um/px override for slides without resolution metadata.
    min_tissue_fraction
        A candidate's centre 32 x 32 cell must be at least this fraction tissue.
    splits
        Explicit ``{slide stem: split}``; other slides are assigned automatically.
    read_from
        The pyramid level patches are read from (:data:`wsi_toolkit.slide.ReadFrom`), by the reader
        ``wsi-infer`` uses (:class:`wsi_toolkit.inference.reading.PatchBlocks`), so a model trained on
        these patches sees what ``wsi-infer --read-from`` the same value hands it.
    reviews
        A ``wsi-infer`` results folder in which ``wsi-view --review`` saved each slide's review
        (``<slide folder>/review.geojson``): labels from its ``Tumor``/``Normal``/``Exclude`` polygons
        (:func:`review_labels`) instead of ASAP annotations (``annotations`` must then be None). A slide
        without a review is recorded as failed. Each patch's review version and the file's sha256 go
        into the meta CSVs, each slide's review into the summary.

    Raises
    ------
    ConfigError
        A setting is invalid.
    WsiToolkitError
        No slide could be used (each slide's error is in the message); a failing slide
        otherwise is recorded in the summary and the others continue.
    """
    fractions = _check_settings(split_fractions, splits, per_slide, min_tissue_fraction, mpp)
    if read_from not in READ_FROM:
        raise ConfigError(f"read_from must be one of {', '.join(READ_FROM)}; got {read_from!r}")
    out = Path(out)
    ann_dir = None if annotations is None else Path(annotations)
    rev_dir = None if reviews is None else Path(reviews)
    if ann_dir is not None and rev_dir is not None:
        raise ConfigError("pass annotations (ASAP XML) or reviews (wsi-view review.geojson), not both")
    if rev_dir is not None and not rev_dir.is_dir():
        raise ConfigError(f"reviews folder {rev_dir} does not exist; pass the wsi-infer OUT folder in which "
                          "wsi-view --review saved <slide>/review.geojson")
    if ann_dir is not None and not ann_dir.is_dir():
        raise ConfigError(f"annotations folder {ann_dir} does not exist; pass the folder of <slide-stem>.xml files")
    paths = [Path(p) for p in slides]
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ConfigError(f"slide names must be unique (they key annotations and splits); repeated: {dup}")
    if not paths:
        raise ConfigError("no slides given")

    plans: list[_SlidePlan] = []
    failed: dict[str, dict[str, str]] = {}
    for path in tqdm(paths, desc="wsi-patches: finding tissue", unit="slide"):
        try:
            plans.append(_plan_slide(path, annotations=ann_dir, mpp=mpp, min_tissue_fraction=min_tissue_fraction,
                                     reviews=rev_dir))
        except Exception as exc:  # noqa: BLE001 - one bad slide must not stop a batch; recorded below
            logger.error("%s: skipped (%s: %s)", path, type(exc).__name__, exc)
            logger.debug("traceback", exc_info=True)
            failed[path.stem] = {"path": str(path), "error": f"{type(exc).__name__}: {exc}"}
    if not plans:
        details = "; ".join(f"{k}: {v['error']}" for k, v in failed.items())
        raise WsiToolkitError(f"no slide could be used, nothing written ({details})")

    _assign_splits(plans, fractions, dict(splits or {}), seed)
    for split, share in fractions.items():
        if share > 0 and not any(p.split == split for p in plans):
            logger.warning("split %r gets no slide (%d usable slides); it is not written", split, len(plans))
    _plan_counts(plans, per_slide=per_slide, balance=balance)

    out.mkdir(parents=True, exist_ok=True)
    total = sum(p.take_pos + p.take_neg for p in plans)
    written: dict[str, dict[str, int]] = {}
    with tqdm(total=total, desc="wsi-patches: reading patches", unit="patch") as bar:
        for split in PCAM_SPLITS:
            members = [p for p in plans if p.split == split and p.take_pos + p.take_neg > 0]
            if not members:
                continue
            written[split] = _write_split(out, split, members, seed=seed, mpp=mpp, bar=bar, failed=failed,
                                          read_from=read_from)

    summary = _summary(plans, failed, written, out=out, settings=dict(
        split_fractions=fractions, per_slide=int(per_slide), balance=bool(balance), seed=int(seed),
        mpp=mpp, read_from=read_from, min_tissue_fraction=float(min_tissue_fraction),
        explicit_splits=dict(splits or {}),
        annotations=None if ann_dir is None else str(ann_dir), reviews=None if rev_dir is None else str(rev_dir),
        patch_px=PCAM_PATCH_PX, spacing_um_px=PCAM_MPP,
        tissue=TissueConfig().to_dict(),
    ))
    write_json_atomic(out / _SUMMARY, summary)
    return summary


def _write_split(out: Path, split: str, members: list[_SlidePlan], *, seed: int, mpp: float | None, bar,
                 failed: dict, read_from: ReadFrom = "finer") -> dict[str, int]:
    """Read and write one split; a slide whose patches cannot be read is dropped and recorded. Patches are
    read by ``wsi-infer``'s reader (one block per patch), from the level ``read_from`` picks."""
    writer = _PCamWriter(out, split, expected=sum(p.take_pos + p.take_neg for p in members))
    rows: list[tuple[str, float, float, int, dict | None]] = []
    try:
        for plan in members:
            xy, labels = _sample(plan, seed)
            try:
                patches = np.empty((len(xy), PCAM_PATCH_PX, PCAM_PATCH_PX, 3), np.uint8)
                reader = PatchBlocks(plan.path, single_patch_blocks(np.asarray(xy, np.float64), PCAM_PATCH_PX),
                                     patch_px=PCAM_PATCH_PX, spacing_um_px=PCAM_MPP, mpp=mpp, read_from=read_from)
                for got, index, _ in reader.read():
                    patches[index] = got
                    bar.update(len(index))
            except Exception as exc:  # noqa: BLE001 - recorded; the other slides continue
                logger.error("%s: reading patches failed, slide dropped (%s: %s)", plan.path, type(exc).__name__, exc)
                failed[plan.stem] = {"path": str(plan.path), "error": f"{type(exc).__name__}: {exc}"}
                plan.take_pos = plan.take_neg = 0
                continue
            writer.append(patches, labels)
            rows.extend((plan.stem, float(x), float(y), int(lab), plan.review) for (x, y), lab in zip(xy, labels))
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    reviewed = any(r[4] is not None for r in rows)
    w.writerow(["slide", "l0_x", "l0_y", "label", "split", *(("review_version", "review_sha256") if reviewed else ())])
    for stem, x, y, lab, review in rows:
        prov = (review["version"], review["sha256"]) if review else ("", "")
        w.writerow([stem, f"{x:.2f}", f"{y:.2f}", lab, split, *(prov if reviewed else ())])
    write_text_atomic(out / _META.format(split=split), buf.getvalue())
    n_pos = sum(r[3] for r in rows)
    return {"n": len(rows), "n_pos": n_pos, "n_neg": len(rows) - n_pos}


def _summary(plans: list[_SlidePlan], failed: dict, written: dict, *, out: Path, settings: dict) -> dict:
    slides: dict[str, Any] = {}
    for p in plans:
        if p.stem in failed:
            continue
        slides[p.stem] = {
            "path": str(p.path), "split": p.split, "annotation": None if p.annotation is None else str(p.annotation),
            "mpp": p.mpp, "tumor_mm2": round(p.tumor_mm2, 6), "synthetic": p.synthetic,
            "candidates": len(p.cand_label), "candidates_pos": p.n_pos,
            "n_pos": p.take_pos, "n_neg": p.take_neg,
            **({"review": p.review} if p.review is not None else {}),
        }
    split_info: dict[str, Any] = {}
    for split, counts in written.items():
        n = counts["n"]
        split_info[split] = {
            **counts,
            "pos_fraction": round(counts["n_pos"] / n, 4) if n else None,
            "slides": sorted(s for s, v in slides.items() if v["split"] == split and v["n_pos"] + v["n_neg"]),
            "tumor_slides": sorted(s for s, v in slides.items() if v["split"] == split and v["n_pos"]),
            "x": f"camelyonpatch_level_2_split_{split}_x.h5",
            "y": f"camelyonpatch_level_2_split_{split}_y.h5",
            "meta": _META.format(split=split),
        }
    synthetic = any(p.synthetic for p in plans)
    return {
        "format": "PCam HDF5 (camelyonpatch_level_2_split_{split}_{x,y}.h5) + meta CSV",
        "label": ("reviewed (wsi-view --review): 1 = centre 32x32 px inside a Tumor polygon, 0 = inside a Normal "
                  "polygon and touching no Tumor; patches touching Exclude or outside both not sampled"
                  if settings.get("reviews") else
                  "1 iff annotated tumour covers part of the patch's centre 32x32 px (PCam convention)"),
        "split_by": "slide",
        "synthetic": synthetic,
        "out": str(out),
        "settings": settings,
        "splits": split_info,
        "slides": slides,
        "failed": failed,
    }
