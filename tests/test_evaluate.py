"""Camelyon16 FROC / slide AUC on hand-built cases whose answers are worked out in the comments.

Geometry used throughout (unless a test says otherwise): level-0 0.25 um/px, so one evaluation
pixel (level 5) is 32 level-0 px = 8 um; the 37.5 um dilation is 4.6875 px (pixels at distance
<= 4 px = 32 um join, 5 px = 40 um do not); the ITC limit is 275 um = 34.375 px.
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
import shapely
import tifffile

from wsi_toolkit.errors import ConfigError, WsiToolkitError
from wsi_toolkit.evaluate import (
    TARGET_FPS,
    DetectionFileError,
    EvalConfig,
    EvaluationMask,
    detections_from_heatmap,
    evaluation_mask,
    evaluation_mask_from_tumor,
    froc,
    froc_curve,
    match_detections,
    read_detections_csv,
    read_mask_tiff,
    sensitivities_at,
    slide_auc,
    write_detections_csv,
)

L0_MPP = 0.25
K = 32  # level-0 px per evaluation pixel
SIZE = (200 * K, 200 * K)  # a 200 x 200 px evaluation grid


def px_box(c0, r0, c1, r1):
    """Level-0 polygon covering evaluation pixels cols c0..c1-1, rows r0..r1-1 (pixel centres inside)."""
    return shapely.box(c0 * K, r0 * K, c1 * K, r1 * K)


def at(c, r):
    """Level-0 (x, y) of the centre of evaluation pixel (col c, row r)."""
    return ((c + 0.5) * K, (r + 0.5) * K)


def det(*rows):
    """Detections from (prob, (x, y)) pairs."""
    return np.array([[p, x, y] for p, (x, y) in rows], dtype=np.float64).reshape(-1, 3)


# --------------------------------------------------------------------------------------------
# Evaluation mask
# --------------------------------------------------------------------------------------------


def test_evaluation_mask_uses_level_5_of_the_slides_own_resolution():
    mask = evaluation_mask(px_box(20, 20, 70, 70), l0_size=(6400, 4800), l0_mpp=0.226)
    assert mask.labels.shape == (150, 200)  # ceil(4800 / 32), ceil(6400 / 32)
    assert mask.l0_per_px == 32
    assert mask.mpp == pytest.approx(32 * 0.226)


@pytest.mark.parametrize(("offset_um", "hit"), [
    (1, True),    # col 100: 1 px from the tumour's last column (99)
    (30, True),   # x = 3200 + 120 = 3320 -> col 103: 4 px = 32 um < 37.5 um: inside the dilation ring
    (38, False),  # x = 3352 -> col 104: 5 px = 40 um >= 37.5 um: outside (the ring is whole pixels)
    (45, False),  # x = 3380 -> col 105: 48 um
])
def test_detection_in_the_37_5_um_dilation_ring_is_a_hit(offset_um, hit):
    # Tumour: evaluation pixels 50..99 (level-0 x in [1600, 3200]); 400 um wide, not an ITC.
    mask = evaluation_mask(px_box(50, 50, 100, 100), l0_size=SIZE, l0_mpp=L0_MPP)
    assert mask.n_labels == 1 and not mask.itc_labels
    x = 3200 + offset_um / L0_MPP
    m = match_detections(det((0.9, (x, 2400))), mask)
    assert (m.n_found, m.n_fp) == ((1, 0) if hit else (0, 1))


@pytest.mark.parametrize(("gap_px", "n_labels"), [
    (6, 1),   # 48 um apart: every gap pixel is <= 3 px (24 um) from one of them -> one lesion
    (15, 2),  # 120 um apart: the middle pixel is 8 px (64 um) from both -> two lesions
])
def test_tumors_closer_than_75_um_are_one_lesion(gap_px, n_labels):
    region = shapely.union_all([px_box(10, 10, 60, 60), px_box(60 + gap_px, 10, 110 + gap_px, 60)])
    mask = evaluation_mask(region, l0_size=SIZE, l0_mpp=L0_MPP)
    assert mask.n_labels == n_labels
    assert not mask.itc_labels


def test_holes_are_filled():
    # A tumour ring 80 px wide with a 40 px (320 um) hole: the dilation alone cannot close it
    # (it shrinks by 4 px from each side), the hole filling does: a detection in it is a hit.
    ring = px_box(40, 40, 120, 120).difference(px_box(60, 60, 100, 100))
    mask = evaluation_mask(ring, l0_size=SIZE, l0_mpp=L0_MPP)
    assert mask.n_labels == 1
    assert mask.label_at(np.array([at(80, 80)]))[0] == 1


@pytest.mark.parametrize(("radius_um", "l0_mpp", "itc"), [
    (60, 0.25, True),    # 120 um across + 75 um dilation = ~195 um < 275 um
    (120, 0.25, False),  # 240 + 75 = ~315 um
    (60, 0.226, True),
    (120, 0.226, False),
    # 300 + 75 = ~375 um = ~23 px of 16 um: a lesion with the slide's own 0.5 um/px; with the
    # challenge's hard-coded 0.243 um/px the limit would be 275 / 7.776 = 35.4 px and it an ITC.
    (150, 0.5, False),
])
def test_itc_is_major_axis_below_275_um_after_dilation(radius_um, l0_mpp, itc):
    r_l0 = radius_um / l0_mpp
    centre = 3000 / l0_mpp  # 3 mm from the top-left
    disk = shapely.Point(centre, centre).buffer(r_l0, quad_segs=64)
    mask = evaluation_mask(disk, l0_size=(int(6000 / l0_mpp),) * 2, l0_mpp=l0_mpp)
    assert mask.n_labels == 1
    assert (mask.itc_labels == {1}) is itc
    assert len(mask.lesion_labels) == (0 if itc else 1)


def test_empty_tumor_gives_an_empty_mask():
    mask = evaluation_mask_from_tumor(np.zeros((10, 12), bool), eval_mpp=8.0)
    assert mask.n_labels == 0 and mask.labels.shape == (10, 12)
    assert mask.lesion_labels.size == 0


# --------------------------------------------------------------------------------------------
# FROC on hand-built cases
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_tumor_masks():
    t1 = evaluation_mask(px_box(20, 20, 70, 70), l0_size=SIZE, l0_mpp=L0_MPP)       # one lesion, 400 um
    t2 = evaluation_mask(px_box(100, 100, 160, 140), l0_size=SIZE, l0_mpp=L0_MPP)   # one lesion
    return t1, t2


@pytest.mark.parametrize("probs", [(0.9, 0.6), (0.9, 0.9)])
def test_perfect_detector_scores_one(two_tumor_masks, probs):
    t1, t2 = two_tumor_masks
    slides = [
        (det((probs[0], at(45, 45))), t1),
        (det((probs[1], at(130, 120))), t2),
        (det(), None),  # a normal slide without detections
    ]
    # probs (0.9, 0.6): thresholds 0.6, 0.9 -> points (0 FP, 2/2), (0 FP, 1/2), then (0, 0).
    # Increasing FPs: fps [0, 0, 0]; no point reaches any target, so the last point (sensitivity 1)
    # is taken at all six: score 1. (The 2016 script, dropping the smallest distinct probability,
    # would score (0.9, 0.9) as 0; the data-release rule, followed here, scores it 1.)
    result = froc(slides)
    assert result.score == 1.0
    assert result.sensitivities == (1.0,) * 6
    assert (result.n_slides, result.n_lesions, result.n_fp) == (3, 2, 0)
    expected_thresholds = sorted(set(probs))
    np.testing.assert_allclose(result.thresholds, expected_thresholds)
    assert result.avg_fps.tolist() == [0.0] * (len(expected_thresholds) + 1)
    assert result.sensitivity[0] == 1.0 and result.sensitivity[-1] == 0.0

    # Only the best detection per lesion counts: a second, weaker one inside is no false positive.
    again = froc([(det((probs[0], at(45, 45)), (0.2, at(30, 60))), t1), *slides[1:]])
    assert again.score == 1.0 and again.n_fp == 0
    np.testing.assert_array_equal(again.thresholds, result.thresholds)


def test_detections_in_isolated_tumor_cells_change_nothing():
    # One lesion (pixels 20..69) and an ITC (disk of 60 um radius around pixel (150, 150)).
    region = shapely.union_all([px_box(20, 20, 70, 70), shapely.Point(150 * K, 150 * K).buffer(60 / L0_MPP)])
    mask = evaluation_mask(region, l0_size=SIZE, l0_mpp=L0_MPP)
    assert mask.n_labels == 2
    (itc,) = mask.itc_labels
    assert mask.label_at(np.array([at(150, 150)]))[0] == itc
    assert mask.label_at(np.array([at(45, 45)]))[0] not in mask.itc_labels

    base = [(0.7, at(45, 45)), (0.8, at(150, 40))]  # lesion hit 0.7; a false positive 0.8
    # Hand: thresholds 0.7, 0.8 -> (1 FP/slide, 1/1), (1, 0/1), (0, 0). Increasing FPs:
    # fps [0, 1, 1], sens [0, 0, 1]. Targets 1/4, 1/2 -> first point >= target is (1, 0): 0;
    # target 1 -> the first of the two points at exactly 1: 0; targets 2, 4, 8 -> last point: 1.
    # Score = 3/6 = 0.5.
    ref = froc([(det(*base), mask)])
    assert ref.score == pytest.approx(0.5)
    assert (ref.n_lesions, ref.n_itc) == (1, 1)

    with_itc = froc([(det(*base, (0.95, at(150, 150)), (0.3, at(152, 151))), mask)])
    assert with_itc.score == ref.score
    assert with_itc.sensitivities == ref.sensitivities
    np.testing.assert_array_equal(with_itc.thresholds, ref.thresholds)
    np.testing.assert_array_equal(with_itc.avg_fps, ref.avg_fps)
    np.testing.assert_array_equal(with_itc.sensitivity, ref.sensitivity)
    assert with_itc.matches[0].n_itc_hits == 2

    # Control: the same 0.95 detection 50 px away from the ITC is a false positive and does count.
    # Hand: thresholds 0.7, 0.8, 0.95 -> (2, 1), (2, 0), (1, 0), (0, 0); increasing FPs
    # fps [0, 1, 2, 2], sens [0, 0, 0, 1]: 1/4, 1/2, 1 -> 0; 2 -> first point at 2 -> 0;
    # 4, 8 -> last -> 1. Score 2/6.
    moved = froc([(det(*base, (0.95, at(150, 100))), mask)])
    assert moved.score == pytest.approx(2 / 6)


def label_image(shape, *boxes):
    """Labels 1, 2, ... on (r0, c0, r1, c1) boxes (end exclusive)."""
    labels = np.zeros(shape, np.int32)
    for i, (r0, c0, r1, c1) in enumerate(boxes, start=1):
        labels[r0:r1, c0:c1] = i
    return labels


def test_fp_per_slide_arithmetic_at_the_six_points():
    # Four slides: T1 with lesions L1, L2; T2 with L3; two normal slides N1, N2 -> 3 lesions, 4 slides,
    # so each false positive is 1/4 FP per slide.
    t1 = EvaluationMask(labels=label_image((40, 40), (2, 2, 6, 6), (20, 20, 30, 30)), itc_labels=frozenset(), mpp=8.0)
    t2 = EvaluationMask(labels=label_image((40, 40), (10, 10, 20, 20)), itc_labels=frozenset(), mpp=8.0)
    slides = [
        (det((0.9, at(3, 3)), (0.7, at(25, 25)), (0.5, at(35, 5))), t1),  # L1 0.9, L2 0.7, FP 0.5
        (det((0.4, at(15, 15)), (0.35, at(12, 12))), t2),                # L3 0.4 (0.35: same lesion, ignored)
        (det((0.8, at(5, 5))), None),                                    # FP 0.8 (normal slide)
        (det((0.6, at(5, 5)), (0.6, at(30, 30))), None),                 # two FPs at 0.6
    ]
    # FPs {0.5, 0.8, 0.6, 0.6}; lesion bests {0.9, 0.7, 0.4}; thresholds = distinct non-zero of both
    # (0.35 is neither): 0.4 0.5 0.6 0.7 0.8 0.9.
    #   t     FPs >= t   avg FP   lesions >= t   sensitivity
    #   0.4   4          1.00     3              1
    #   0.5   4          1.00     2              2/3
    #   0.6   3          0.75     2              2/3
    #   0.7   1          0.25     2              2/3
    #   0.8   1          0.25     1              1/3
    #   0.9   0          0.00     1              1/3
    #   end   0          0.00     0              0
    result = froc(slides)
    np.testing.assert_allclose(result.thresholds, [0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    np.testing.assert_allclose(result.avg_fps, [1.0, 1.0, 0.75, 0.25, 0.25, 0.0, 0.0])
    np.testing.assert_allclose(result.sensitivity, [1, 2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0])
    # Increasing FPs: fps [0, 0, .25, .25, .75, 1, 1], sens [0, 1/3, 1/3, 2/3, 2/3, 2/3, 1].
    #   1/4: first point with fps >= 0.25 is index 2 (exactly 0.25, the higher threshold): 1/3
    #   1/2: no point at 0.5; the first above it is 0.75 (index 4): 2/3
    #   1:   first of the two points at exactly 1 (index 5, threshold 0.5): 2/3
    #   2, 4, 8: beyond the curve: the last point: 1
    expected = (1 / 3, 2 / 3, 2 / 3, 1.0, 1.0, 1.0)
    np.testing.assert_allclose(result.sensitivities, expected)
    assert result.score == pytest.approx(7 / 9)  # (1/3 + 2/3 + 2/3 + 3) / 6
    assert (result.n_slides, result.n_lesions, result.n_fp, result.n_detections) == (4, 3, 4, 8)
    assert [m.n_found for m in result.matches] == [2, 1, 0, 0]


@pytest.mark.parametrize(("targets", "expected"), [
    ((0.25,), (0.5,)),  # jumps over 0.25 to the point at 1 FP
    ((1.0,), (0.5,)),   # exactly at a point
    ((2.0,), (1.0,)),   # jumps over 2 to the point at 3 FP
    ((4.0, 8.0), (1.0, 1.0)),  # beyond the curve: its last point
])
def test_sensitivity_pick_rule(targets, expected):
    # Challenge order (thresholds up, FPs down, final (0, 0)): (3, 1), (1, 0.5), (0, 0).
    got = sensitivities_at([3.0, 1.0, 0.0], [1.0, 0.5, 0.0], targets)
    np.testing.assert_allclose(got, expected)


def test_normal_slide_detections_are_all_false_positives(two_tumor_masks):
    t1, _ = two_tumor_masks
    # The same coordinates that hit the lesion on T1 are false positives on a normal slide.
    m = match_detections(det((0.9, at(45, 45)), (0.2, at(1, 1))), None)
    assert m.n_fp == 2 and m.n_lesions == 0 and not m.is_tumor
    assert match_detections(det((0.9, at(45, 45))), t1).n_fp == 0


def test_detection_outside_the_mask_is_a_false_positive(two_tumor_masks):
    t1, _ = two_tumor_masks
    m = match_detections(det((0.5, (-10, 100)), (0.5, (SIZE[0] + 5, 100))), t1)
    assert m.n_fp == 2


def test_no_lesions_gives_undefined_score():
    result = froc([(det((0.5, (10, 10))), None)])
    assert math.isnan(result.score) and result.n_lesions == 0 and result.n_fp == 1


def _reference_froc(slides):
    """An independent, loop-by-loop statement of the Camelyon16 rules (for the random cross-check)."""
    fps, tps, n_tumors = [], [], 0
    for dets, mask in slides:
        if mask is None:
            fps += [p for p, _, _ in dets]
            continue
        best = {}
        for p, x, y in dets:
            r, c = int(y // 32), int(x // 32)
            lab = int(mask.labels[r, c]) if 0 <= r < mask.labels.shape[0] and 0 <= c < mask.labels.shape[1] else 0
            if lab == 0:
                fps.append(p)
            elif lab not in mask.itc_labels and best.get(lab, 0.0) < p:
                best[lab] = p
        lesions = [v for v in range(1, int(mask.labels.max()) + 1) if v not in mask.itc_labels]
        tps += [best.get(v, 0.0) for v in lesions]
        n_tumors += len(lesions)
    thresholds = sorted(set(fps + tps) - {0.0})
    avg = [sum(f >= t for f in fps) / len(slides) for t in thresholds] + [0.0]
    sens = [sum(s >= t for s in tps) / n_tumors for t in thresholds] + [0.0]
    avg_r, sens_r = avg[::-1], sens[::-1]
    picks = [sens_r[min(bisect.bisect_left(avg_r, t), len(sens_r) - 1)] for t in TARGET_FPS]
    return sum(picks) / 6, avg, sens


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_agree_with_a_loop_statement_of_the_rules(seed):
    rng = np.random.default_rng(seed)
    slides = []
    for i in range(6):
        if i % 3 == 2:
            mask = None
        else:
            labels = label_image((30, 30), (2, 2, 8, 8), (12, 3, 20, 9), (5, 15, 25, 28))
            mask = EvaluationMask(labels=labels, itc_labels=frozenset({2}) if i == 0 else frozenset(), mpp=8.0)
        n = int(rng.integers(0, 15))
        probs = rng.choice([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 1.0], n)
        xy = rng.uniform(-40, 31 * K, (n, 2)).astype(int)
        slides.append((np.column_stack([probs, xy]).astype(float).reshape(-1, 3), mask))
    score, avg, sens = _reference_froc(slides)
    result = froc(slides)
    np.testing.assert_allclose(result.avg_fps, avg)
    np.testing.assert_allclose(result.sensitivity, sens)
    assert result.score == pytest.approx(score)


# --------------------------------------------------------------------------------------------
# Detections from heatmaps
# --------------------------------------------------------------------------------------------


def test_detection_coordinates_are_cell_centres_x_column_y_row():
    prob = np.zeros((5, 8))
    prob[1, 6] = 0.7
    got = detections_from_heatmap(prob, 137.6, l0_mpp=0.226)
    # x = floor(6.5 * 137.6) = floor(894.4) = 894; y = floor(1.5 * 137.6) = floor(206.4) = 206
    assert got.tolist() == [[0.7, 894.0, 206.0]]
    shifted = detections_from_heatmap(prob, 137.6, l0_mpp=0.226, origin_l0=(100, 1000))
    assert shifted[0, 1:].tolist() == [994.0, 1206.0]


# cell_l0 128 at 0.243 um/px: one cell = 31.104 um, the 150 um radius = 4.82 cells.
@pytest.mark.parametrize(("second_col", "n"), [(4, 1), (6, 2)])  # 124 um apart: merged; 187 um: two
def test_nms_radius(second_col, n):
    prob = np.zeros((9, 12))
    prob[4, 2] = 0.9
    prob[4, 2 + second_col] = 0.8
    got = detections_from_heatmap(prob, 128, l0_mpp=0.243, nms_radius_um=150)
    assert len(got) == n
    assert got[0, 0] == 0.9 and got[0, 1] == 2.5 * 128  # the stronger one is kept first


def test_plateau_gives_one_detection():
    prob = np.zeros((10, 10))
    prob[3:6, 4:7] = 1.0  # 3 x 3 cells of 31 um: within one 150 um radius
    got = detections_from_heatmap(prob, 128, l0_mpp=0.243)
    assert got.tolist() == [[1.0, 4.5 * 128, 3.5 * 128]]  # the first in raster order


def test_slope_is_not_a_detection():
    # A ramp falling from 0.9 to 0.5 over 11 cells: only its top is a local maximum, although the
    # far end is beyond the suppression radius (2 cells) of the top.
    prob = np.zeros((3, 11))
    prob[1] = np.linspace(0.9, 0.5, 11)
    got = detections_from_heatmap(prob, 128, l0_mpp=0.243, nms_radius_um=2 * 31.104)
    assert got.shape == (1, 3) and got[0, 0] == pytest.approx(0.9)


def test_min_prob():
    prob = np.zeros((14, 14))
    prob[1, 1], prob[11, 11] = 0.05, 0.5  # 14 cells (435 um) apart: both local maxima
    assert detections_from_heatmap(prob, 128, l0_mpp=0.243, min_prob=0.1)[:, 0].tolist() == [0.5]
    assert len(detections_from_heatmap(prob, 128, l0_mpp=0.243, min_prob=0.01)) == 2
    with pytest.raises(ConfigError):
        detections_from_heatmap(prob, 128, l0_mpp=0.243, min_prob=0)


# --------------------------------------------------------------------------------------------
# Slide AUC
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scores", "truths", "auc"), [
    ([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], 1.0),
    # pairs (tumour, normal): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, 0.1) ok, (0.8, 0.4) ok -> 3/4
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
    ([0.5, 0.5], [1, 0], 0.5),  # a tie counts half
])
def test_slide_auc(scores, truths, auc):
    assert slide_auc(scores, truths) == pytest.approx(auc)


def test_slide_auc_needs_both_classes():
    assert math.isnan(slide_auc([0.3, 0.9], [1, 1]))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_detection_csv_round_trip(tmp_path):
    d = np.array([[0.996078431372549, 894, 206], [0.1, 0, 12345]])
    write_detections_csv(tmp_path / "a.csv", d)
    text = (tmp_path / "a.csv").read_text()
    assert text == "0.996078431372549,894,206\n0.1,0,12345\n"  # no header: the submission format
    np.testing.assert_array_equal(read_detections_csv(tmp_path / "a.csv"), d)


def test_detection_csv_with_header_and_float_coordinates(tmp_path):
    (tmp_path / "b.csv").write_text("x,y,p\n10.7,20.2,0.5\n\n3,4,0.25\n")
    np.testing.assert_array_equal(read_detections_csv(tmp_path / "b.csv"), [[0.5, 10, 20], [0.25, 3, 4]])
    (tmp_path / "e.csv").write_text("")
    assert read_detections_csv(tmp_path / "e.csv").shape == (0, 3)


@pytest.mark.parametrize("text", ["0.5,10\n", "0.5,ten,3\n", "a,b,c\n1,2,3\n", "-0.1,1,2\n"])
def test_bad_detection_csv(tmp_path, text):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DetectionFileError) as info:
        read_detections_csv(tmp_path / "bad.csv")
    assert isinstance(info.value, (WsiToolkitError, ValueError)) and "bad.csv" in str(info.value)


def write_mask_pyramid(path, level0, *, levels=4):
    with tifffile.TiffWriter(path) as tw:
        data = level0
        for i in range(levels):
            tw.write(data, tile=(256, 256), photometric="minisblack", compression="zlib",
                     subfiletype=0 if i == 0 else 1, metadata=None)
            data = data[::2, ::2]


@pytest.mark.parametrize("mask_scale", [1, 4])  # mask level 0 = the slide's level 0, or 4x coarser
def test_mask_tiff_matches_the_polygon_truth(tmp_path, mask_scale):
    l0_w, l0_h = 4096, 3072
    full = np.zeros((l0_h // mask_scale, l0_w // mask_scale), np.uint8)
    s = mask_scale
    full[256 // s:2816 // s, 256 // s:3840 // s] = 1     # tissue
    full[512 // s:1536 // s, 1024 // s:2048 // s] = 2    # tumour: level-0 [1024, 2048) x [512, 1536)
    write_mask_pyramid(tmp_path / "m_mask.tif", full)
    tumor, size, _ = read_mask_tiff(tmp_path / "m_mask.tif", l0_size=(l0_w, l0_h), l0_per_px=32, tumor_value=2)
    expected = np.zeros((96, 128), bool)
    expected[16:48, 32:64] = True  # level-0 / 32
    np.testing.assert_array_equal(tumor, expected)
    assert size == (l0_w, l0_h)
    nonzero, _, _ = read_mask_tiff(tmp_path / "m_mask.tif", l0_size=(l0_w, l0_h), l0_per_px=32)
    assert nonzero.sum() == (2816 - 256) // 32 * (3840 - 256) // 32  # any non-zero: the tissue too


def test_eval_config_validates():
    with pytest.raises(ConfigError):
        EvalConfig(min_prob=0)
    with pytest.raises(ConfigError):
        EvalConfig(slide_score="mean")
    with pytest.raises(ConfigError):
        EvalConfig(nms_radius_um=-1)


def test_froc_curve_needs_slides():
    with pytest.raises(ConfigError):
        froc_curve([])


# --------------------------------------------------------------------------------------------
# Issue 11: detection CSVs that used to end in tracebacks or wrong line numbers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,line", [
    ("prob,x,y\n0.5,10,10\n0.5,abc,10\n", 3),          # header: the bad row is line 3 of the file
    ("0.5,10,10\n\n\n0.5,abc,10\n", 4),                 # blank lines count
    ("x,y,p\n1,2,0.5\n1,2\n", 3),
])
def test_detection_csv_errors_give_the_files_line_number(tmp_path, text, line):
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(DetectionFileError, match=rf"d\.csv: line {line}\b"):
        read_detections_csv(tmp_path / "d.csv")


@pytest.mark.parametrize("data,match", [
    (b"prob,x,y\n0.5,10,10\n\xff\xfe,1,2\n", r"line 3 is not UTF-8"),
    (b"0.5,1e300,10\n", r"line 1: .* not a level-0 pixel"),
    (b"0.5,10,inf\n", r"line 1 .* non-finite"),
    (b"0.5,1,2\x00\n", r"line 1"),
])
def test_detection_csv_damage_is_a_detection_file_error(tmp_path, data, match):
    (tmp_path / "d.csv").write_bytes(data)
    with pytest.raises(DetectionFileError, match=match):
        read_detections_csv(tmp_path / "d.csv")


def test_eval_mask_is_the_annotations_not_the_farthest_detection(tmp_path):
    """A detection at (2e6, 2e6) grew the evaluation mask to 62501^2 px (3.6 GiB): it is a false
    positive outside the mask instead."""
    from wsi_toolkit.evaluate.truth import slide_truth

    ann = tmp_path / "s.xml"
    ann.write_text('<ASAP_Annotations><Annotations><Annotation Name="t" Type="Polygon" PartOfGroup="_0">'
                   '<Coordinates><Coordinate Order="0" X="100" Y="100"/><Coordinate Order="1" X="3000" Y="100"/>'
                   '<Coordinate Order="2" X="3000" Y="3000"/></Coordinates></Annotation></Annotations>'
                   '</ASAP_Annotations>')
    det = np.array([[0.9, 2500, 500], [0.5, 2_000_000, 2_000_000]])
    is_tumor, mask, _ = slide_truth(ann, l0_size=None, l0_mpp=0.25)
    assert is_tumor and mask.labels.shape == (math.ceil(3001 / 32), math.ceil(3001 / 32))
    m = match_detections(det, mask)
    assert m.n_fp == 1 and m.n_found == 1


@pytest.mark.parametrize("mpp", [1e-6, 50.0, 0.0, float("nan")])
def test_eval_config_mpp_must_be_physical(mpp):
    with pytest.raises(ConfigError, match=r"\[0.05, 20\] um/px"):
        EvalConfig(mpp=mpp)


def test_annotation_off_the_slide_is_refused_when_the_slide_size_is_known(tmp_path):
    from wsi_toolkit.errors import AnnotationError
    from wsi_toolkit.evaluate.truth import slide_truth

    ann = tmp_path / "s.xml"
    ann.write_text('<ASAP_Annotations><Annotations><Annotation Name="t" Type="Polygon" PartOfGroup="_0">'
                   '<Coordinates><Coordinate Order="0" X="90000" Y="100"/><Coordinate Order="1" X="99000" Y="100"/>'
                   '<Coordinate Order="2" X="99000" Y="3000"/></Coordinates></Annotation></Annotations>'
                   '</ASAP_Annotations>')
    with pytest.raises(AnnotationError, match="entirely outside"):
        slide_truth(ann, l0_size=(4000, 4000), l0_mpp=0.25)
