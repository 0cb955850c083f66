"""What the slide path does to a patch: JPEG, focus, pyramid resampling, stain, brightness and contrast.

One place for the perturbations that real slides put between tissue and model, used by both the
robustness suite (``scripts/bench_robustness.py``: each at fixed strengths) and the training
augmentation ``--augment ...+scanner`` (:class:`ScannerAugment`: random strengths, via
:class:`patch_model.augment.ScannerItem`). Pure functions: uint8 ``(H, W, 3)`` RGB in, a new uint8
``(H, W, 3)`` array out, randomness only from an explicit ``numpy.random.Generator``. No fastai,
no torch.

Patches are at PCam's 0.972 um/px (:data:`PCAM_MPP`); pixel units (blur sigma) are at that scale.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsi_toolkit.errors import ConfigError

__all__ = [
    "PCAM_MPP",
    "FILTERS",
    "jpeg",
    "gaussian_blur",
    "resample",
    "hed_shift",
    "random_hed",
    "brightness_contrast",
    "ScannerAugment",
]

#: um/px of a PCam patch (level 2 of a 0.243 um/px Radboud slide).
PCAM_MPP = 0.972

#: Resampling filters by name (PIL's; ``box`` is area averaging, ``bilinear``/``bicubic``/``lanczos``
#: widen their support when shrinking, i.e. they are antialiased).
FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")

_OD_FLOOR = 1e-6  # transmittance floor before the log, as patch_model.augment.hed_jitter


def _check(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ConfigError(f"expected a uint8 (H, W, 3) RGB patch; got {img.shape} {img.dtype}")
    return img


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """``img`` JPEG-compressed at ``quality`` (1-100, PIL/libjpeg; chroma subsampled 4:2:0 as PIL
    does by default, like most scanners' YCbCr JPEG tiles) and decoded again."""
    from PIL import Image

    img = _check(img)
    q = int(quality)
    if not 1 <= q <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100; got {quality!r}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """``img`` blurred by a Gaussian of ``sigma_px`` (pixels of the patch, i.e. x 0.972 um on a PCam
    patch; edges reflected): defocus. ``sigma_px = 0`` returns an unchanged copy."""
    from scipy.ndimage import gaussian_filter

    img = _check(img)
    s = float(sigma_px)
    if s < 0:
        raise ConfigError(f"blur sigma must be >= 0 px; got {sigma_px!r}")
    if s == 0:
        return img.copy()
    return _to_uint8(gaussian_filter(img.astype(np.float32), sigma=(s, s, 0), mode="reflect"))


def resample(img: np.ndarray, path: Sequence[tuple[float, str]], *, mpp: float = PCAM_MPP) -> np.ndarray:
    """``img`` (at ``mpp`` um/px) taken along a resampling ``path`` and back to its own size.

    ``path``: ``(step_mpp, filter)`` steps; each resizes the current image to the size it has at
    ``step_mpp`` (``round(side * mpp / step_mpp)``) with the PIL filter named (:data:`FILTERS`);
    ``box`` by an integer factor is the exact block mean.
    The last step must be at ``mpp``. E.g. a 40x pyramid's level at 0.972 um/px:
    ``[(0.243, "bicubic"), (0.486, "box"), (0.972, "box")]`` (level 0 upsampled, two 2x area
    reductions); an empty path returns an unchanged copy.
    """
    from PIL import Image

    img = _check(img)
    steps = [(float(m), str(f)) for m, f in path]
    if not steps:
        return img.copy()
    if abs(steps[-1][0] - mpp) > 1e-9:
        raise ConfigError(f"a resampling path must end at the patch's {mpp} um/px; got {steps[-1][0]}")
    h, w = img.shape[:2]
    cur = img
    for step_mpp, name in steps:
        if name not in FILTERS or step_mpp <= 0:
            raise ConfigError(f"resampling step ({step_mpp}, {name!r}): um/px must be > 0 and the filter one of "
                              f"{', '.join(FILTERS)}")
        size = (max(1, round(w * mpp / step_mpp)), max(1, round(h * mpp / step_mpp)))
        ch, cw = cur.shape[:2]
        k = cw // size[0]
        if name == "box" and k > 1 and (cw, ch) == (k * size[0], k * size[1]):
            # An integer reduction, as a pyramid makes its levels: the exact k x k block mean, rounded
            # once (PIL's box rounds after each of its two passes: +0.5 grey level on average).
            cur = _to_uint8(cur.reshape(size[1], k, size[0], k, 3).mean(axis=(1, 3), dtype=np.float64))
        else:
            cur = np.array(Image.fromarray(cur).resize(size, getattr(Image.Resampling, name.upper())))
    return cur.copy() if cur is img else cur


def hed_shift(img: np.ndarray, scale: Sequence[float] | np.ndarray, shift: Sequence[float] | np.ndarray) -> np.ndarray:
    """Each stain's optical density (haematoxylin, eosin, DAB; natural log, scikit-image's
    deconvolution matrices) times ``scale[k]`` plus ``shift[k]``, back to RGB. The numpy twin of
    :func:`patch_model.augment.hed_jitter` (Tellez et al. 2018); ``scale = 1, shift = 0`` returns
    ``img``."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    img = _check(img)
    a = np.asarray(scale, np.float64).reshape(1, 1, 3)
    b = np.asarray(shift, np.float64).reshape(1, 1, 3)
    rgb = np.maximum(img.astype(np.float64) / 255.0, _OD_FLOOR)
    stains = (-np.log(rgb)) @ hed_from_rgb
    out = np.exp(-((stains * a + b) @ rgb_from_hed))
    return _to_uint8(np.clip(out, 0, 1) * 255.0)


def random_hed(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """:func:`hed_shift` with ``scale ~ U(1 - sigma, 1 + sigma)`` and ``shift ~ U(-sigma, sigma)`` per stain."""
    s = float(sigma)
    if s < 0:
        raise ConfigError(f"HED sigma must be >= 0; got {sigma!r}")
    return hed_shift(img, rng.uniform(1 - s, 1 + s, 3), rng.uniform(-s, s, 3))


def brightness_contrast(img: np.ndarray, *, brightness: float = 0.0, contrast: float = 0.0) -> np.ndarray:
    """Brightness: every value times ``1 + brightness``; then contrast: the deviation from the
    patch's mean (over all pixels and channels) times ``1 + contrast``. Clipped to 0..255.
    E.g. ``brightness=0.1`` is +10 %; both 0 return ``img``."""
    img = _check(img)
    b, c = float(brightness), float(contrast)
    if b <= -1 or c <= -1:
        raise ConfigError(f"brightness and contrast must be > -1; got {brightness!r}, {contrast!r}")
    x = img.astype(np.float64) * (1 + b)
    if c:
        m = x.mean()
        x = m + (x - m) * (1 + c)
    return _to_uint8(x)


@dataclass(frozen=True)
class ScannerAugment:
    """The training augmentation ``+scanner``: what a slide path does, at random strengths.

    Each op runs with probability ``p``, independently, in the order of the slide path: stain
    (:func:`random_hed`, ``hed_sigma``), focus (:func:`gaussian_blur`, sigma ``U(blur_sigma_px)``),
    camera brightness and contrast (each ``U(-x, x)``), pyramid resampling (:func:`resample`: down
    then up or up then down by a factor ``U(resample_factor)``, each step a random filter of
    ``resample_filters``), JPEG re-compression (quality uniform over ``jpeg_quality``, inclusive).

    ``aug(img, rng)``: uint8 ``(H, W, 3)`` -> uint8 ``(H, W, 3)``; the same ``rng`` state gives the
    same output.
    """

    p: float = 0.5
    hed_sigma: float = 0.1
    blur_sigma_px: tuple[float, float] = (0.0, 1.5)
    brightness: float = 0.2
    contrast: float = 0.2
    resample_factor: tuple[float, float] = (1.0, 2.0)
    resample_filters: tuple[str, ...] = ("box", "bilinear", "bicubic", "lanczos")
    jpeg_quality: tuple[int, int] = (50, 95)

    def __post_init__(self) -> None:
        ok = (0 <= self.p <= 1 and self.hed_sigma >= 0 and 0 <= self.blur_sigma_px[0] <= self.blur_sigma_px[1]
              and 0 <= self.brightness < 1 and 0 <= self.contrast < 1
              and 1 <= self.resample_factor[0] <= self.resample_factor[1]
              and bool(self.resample_filters) and set(self.resample_filters) <= set(FILTERS)
              and 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100)
        if not ok:
            raise ConfigError(f"invalid scanner augmentation settings: {self!r}")

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = _check(img)
        if rng.random() < self.p:
            out = random_hed(out, self.hed_sigma, rng)
        if rng.random() < self.p:
            out = gaussian_blur(out, rng.uniform(*self.blur_sigma_px))
        if rng.random() < self.p:
            out = brightness_contrast(out, brightness=rng.uniform(-self.brightness, self.brightness),
                                      contrast=rng.uniform(-self.contrast, self.contrast))
        if rng.random() < self.p:
            factor = rng.uniform(*self.resample_factor)
            via = PCAM_MPP * factor if rng.random() < 0.5 else PCAM_MPP / factor  # coarser, or finer, and back
            f1, f2 = (self.resample_filters[int(i)] for i in rng.integers(0, len(self.resample_filters), 2))
            out = resample(out, [(via, f1), (PCAM_MPP, f2)])
        if rng.random() < self.p:
            out = jpeg(out, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        return out if out is not img else img.copy()

    def describe(self) -> str:
        """One line of plain words for ``settings.json``."""
        b0, b1 = self.blur_sigma_px
        r0, r1 = self.resample_factor
        q0, q1 = self.jpeg_quality
        return (f"scanner (each with p={self.p:g}, CPU, per image): HED stain jitter sigma {self.hed_sigma:g}, "
                f"Gaussian blur sigma U({b0:g}, {b1:g}) px, brightness/contrast U(+-{self.brightness:g}), "
                f"resampling down/up by U({r0:g}, {r1:g}) with {'/'.join(self.resample_filters)}, "
                f"JPEG quality {q0}-{q1}")
