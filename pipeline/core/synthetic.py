"""The project's own default data set: SYNTHETIC dermoscopy-like images of the 7 classes.

These images are generated from random numbers; they show no real patient. They exist so that
the whole pipeline runs end to end without downloading anything, on data a small CNN can learn
but not trivially.

How an image is made (all numpy, vectorised over the pixel grid):

1. **Lesion** (drawn from an RNG seeded by ``(seed, class, lesion index)``): a star-shaped outline
   ``R(theta) = R0 (1 + e cos 2(theta - theta_e)) (1 + sum_k a_k cos(k theta + phi_k))`` whose
   size, ellipticity, asymmetry (low harmonics), border irregularity (high harmonics) and border
   softness depend on the class, a skin tone, and a stack of colour *layers* painted inside the
   outline. A layer is a colour and a weight field: uniform, radial (centre patch / ring),
   thresholded smooth noise (patches), noise ridges (cracks, network), Gaussian blobs (colour
   islands, lacunae, milia) or line segments (branching vessels). Class recipes:

   ====== ===================================================================================
   nv     round, regular, uniform light-to-dark brown, faint network, slightly darker centre
   mel    large, asymmetric, irregular border; islands of dark brown, black, blue-grey, red
   bkl    light-brown/tan waxy, sharp border, dark crack (cerebriform) ridges, white milia
   bcc    pink pearly translucent, thin red branching vessels, sometimes blue-grey nests
   akiec  red-pink, ill-defined patchy border, rough white-yellow scale patches
   df     small, light-brown ring with a central white patch, delicate peripheral network
   vasc   red/purple base with many round red, purple and dark lacunae and lighter septa
   ====== ===================================================================================

   Size and colour ranges overlap between classes (small nv vs df, dark bkl vs nv, light mel vs
   nv, bcc vs akiec pinks), so colour or size alone does not separate them.
2. **View** (RNG seeded by ``(seed, class, lesion index, view index)``): position, rotation and
   scale of the lesion (patterns live in lesion coordinates, so every view shows the *same*
   lesion), illumination gain, colour cast, gradient and dermoscope vignette, 0-6 hairs and
   sensor noise. ``synthetic.images_per_lesion > 1`` gives several views sharing a lesion id.
3. JPEG encoding (quality ``synthetic.jpeg_quality``).

Because every image has its own RNG derived from its identity, the bytes of an image do not depend
on generation order, on the other classes' counts, or on parallelism. Changing counts changes
which ids exist (ids are numbered in class order) but not what ``(class, lesion, view)`` looks like.

Output, in the HAM10000 layout (so the ``ham10000`` reader ingests it), written as one folder
atomically: ``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,dx_type,age,sex,localization,
dataset`` with ``dx_type = dataset = synthetic``), ``images/SYN_0000001.jpg`` ..., the lesion
masks ``masks/SYN_0000001_segmentation.png`` ... (the ISIC segmentation naming; uint8 grey PNG,
0 = skin, 255 = lesion, the image's size and pixel grid, from :func:`lesion_mask`; deterministic
by seed like the images; the ``_segmentation`` suffix keeps the mask's file stem from colliding
with the image id when the ``ham10000`` reader indexes the folder), and a ``README.txt`` stating
that the images are synthetic. The masks are the ground truth of "where the lesion is", used to
check that class activation maps point at it (:func:`pipeline.core.cam.pointing_hit`).

This module is pure (it returns arrays, JPEG bytes and tables); the ``synthesize`` stage
(:mod:`pipeline.stages.synthesize`) writes them. The pipeline runs that stage only when
``data.source`` is ``synthetic``; run by hand with another source it writes to the default folder
``<work_dir>/data/synthetic``, never into ``data.root`` (which then holds real data).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import SyntheticConfig
from pipeline.labels import CLASS_TO_INDEX, CLASSES

METADATA_NAME = "HAM10000_metadata.csv"
MASKS_DIR = "masks"  # lesion masks: <MASKS_DIR>/<image_id><MASK_SUFFIX>
MASK_SUFFIX = "_segmentation.png"
README_NAME = "README.txt"
README_MARKER = "SYNTHETIC DATA"
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
# Namespaces the per-image seeds so they never coincide with other uses of the global seed.
_SEED_TAG = 0x5EED5117

_LOCALIZATIONS = (
    "back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot",
    "neck", "scalp", "hand", "ear",
)  # fmt: skip

Color = tuple[float, float, float]


# ----------------------------------------------------------------------------- RNG
def image_rng(seed: int, cls: str, lesion: int, view: int | None = None) -> np.random.Generator:
    """RNG of one lesion (``view=None``) or one view, derived from its identity only."""
    key = [_SEED_TAG, seed % (1 << 64), CLASS_TO_INDEX[cls], lesion]
    if view is not None:
        key.append(view + 1)
    return np.random.default_rng(np.random.SeedSequence(key))


# ----------------------------------------------------------------------------- weight fields
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class Noise:
    """Smooth random field: a sum of random plane waves (rotation-consistent, resolution-free)."""

    freqs: np.ndarray
    angles: np.ndarray
    phases: np.ndarray

    @classmethod
    def sample(cls, rng: np.random.Generator, n: int, fmin: float, fmax: float) -> "Noise":
        return cls(rng.uniform(fmin, fmax, n), rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n))

    def __call__(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.zeros_like(u)
        for f, a, p in zip(self.freqs, self.angles, self.phases, strict=True):
            out += np.cos(float(f) * (math.cos(a) * u + math.sin(a) * v) + float(p))
        return out * np.float32(math.sqrt(2.0 / len(self.freqs)))  # ~unit variance


def _segment_distance(x: np.ndarray, y: np.ndarray, segs: np.ndarray, chunk: int = 16) -> np.ndarray:
    """Distance from each grid point to the nearest of ``segs`` (N, 4: x0, y0, x1, y1)."""
    best = np.full(x.shape, np.inf, dtype=np.float32)
    for s in range(0, len(segs), chunk):
        seg = segs[s : s + chunk].astype(np.float32)
        x0, y0 = seg[:, 0, None, None], seg[:, 1, None, None]
        dx, dy = (seg[:, 2] - seg[:, 0])[:, None, None], (seg[:, 3] - seg[:, 1])[:, None, None]
        den = np.maximum(dx * dx + dy * dy, 1e-12)
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / den, 0.0, 1.0)
        d = np.hypot(x - x0 - t * dx, y - y0 - t * dy).min(axis=0)
        np.minimum(best, d, out=best)
    return best


@dataclass(frozen=True)
class Uniform:
    def __call__(self, u: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.ones_like(u)


@dataclass(frozen=True)
class Radial:
    """Gaussian in relative radius ``q`` (0 centre, 1 border): centre patch (q0=0) or ring."""

    q0: float
    width: float

    def __call__(self, u: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.exp(-(((q - self.q0) / self.width) ** 2))


@dataclass(frozen=True)
class Patches:
    """Thresholded smooth noise: irregular patches covering roughly ``P(noise > threshold)``."""

    noise: Noise
    threshold: float
    softness: float

    def __call__(self, u: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
        return _sigmoid((self.noise(u, v) - self.threshold) / self.softness)


@dataclass(frozen=True)
class Ridges:
    """Thin lines along the zero set of a smooth noise: cracks, pigment network."""

    noise: Noise
    width: float

    def __call__(self, u: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.exp(-((self.noise(u, v) / self.width) ** 2))


@dataclass(frozen=True)
class Blobs:
    """Gaussian blobs (centres (N, 2), radii (N,)) in lesion-normalised coordinates."""

    centers: np.ndarray
    radii: np.ndarray

    def __call__(self, u: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
        out = np.zeros_like(u)
        for (cx, cy), r in zip(self.centers.tolist(), self.radii.tolist(), strict=True):
            out += np.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2.0 * r * r))
        return np.minimum(out, 1.0)


@dataclass(frozen=True)
class Lines:
    """Line segments (N, 4) of a given width: vessels."""

    segments: np.ndarray
    width: float

    def __call__(self, u: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.exp(-((_segment_distance(u, v, self.segments) / self.width) ** 2))


WeightField = Uniform | Radial | Patches | Ridges | Blobs | Lines


@dataclass(frozen=True)
class Layer:
    color: Color
    amount: float
    field: WeightField


@dataclass(frozen=True)
class Lesion:
    """Everything about one synthetic lesion that all its views share."""

    cls: str
    radius: float  # R0, in image half-widths
    ellipticity: float
    ell_angle: float
    harmonics: np.ndarray  # (K, 3): k, amplitude, phase
    edge: float  # border softness, lesion-normalised units
    opacity: float
    layers: tuple[Layer, ...]
    skin: Color
    border_patchiness: float = 0.0  # akiec: mask eaten by noise
    border_noise: Noise | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class View:
    center: tuple[float, float]
    rotation: float
    scale: float
    gain: float
    cast: Color
    gradient: tuple[float, float]  # direction, amplitude
    vignette: tuple[float, float]  # strength, radius
    hairs: tuple[tuple[np.ndarray, float, Color], ...]  # (segments, width, colour)
    noise_sigma: float
    noise_seed: int


# ----------------------------------------------------------------------------- class recipes
def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(float(x + (y - x) * t) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _jitter(rng: np.random.Generator, c: Color, amount: float = 0.04) -> Color:
    return tuple(float(np.clip(x + rng.normal(0, amount), 0, 1)) for x in c)  # type: ignore[return-value]


def _points_in_disc(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    r = radius * np.sqrt(rng.uniform(0, 1, n))
    a = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _harmonics(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """Outline harmonics: k=1..3 scaled by ``low`` (asymmetry), k=4..12 by ``high`` (irregularity)."""
    ks = np.arange(1, 13, dtype=np.float64)
    amp = np.where(ks <= 3, rng.uniform(0, low, 12), rng.uniform(0, high, 12) / np.sqrt(ks / 4))
    return np.stack([ks, amp, rng.uniform(0, 2 * np.pi, 12)], axis=1)


def _vessel_tree(rng: np.random.Generator, roots: int) -> np.ndarray:
    """Branching thin vessels as segments, in lesion-normalised coordinates."""
    segs: list[list[float]] = []
    stack = [(*p, rng.uniform(0, 2 * np.pi), 0.35, 0) for p in _points_in_disc(rng, roots, 0.6)]
    while stack:
        x, y, a, length, depth = stack.pop()
        pts = [(x, y)]
        for _ in range(3):  # a slightly wiggly branch of 3 segments
            a += rng.normal(0, 0.35)
            x, y = x + length / 3 * math.cos(a), y + length / 3 * math.sin(a)
            pts.append((x, y))
        segs.extend([*pts[i], *pts[i + 1]] for i in range(3))
        if depth < 2:
            for _ in range(int(rng.integers(1, 3))):
                stack.append((x, y, a + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0), length * 0.65, depth + 1))
    return np.asarray(segs, dtype=np.float64)


BROWN_LIGHT: Color = (0.66, 0.47, 0.33)
BROWN_MID: Color = (0.50, 0.33, 0.22)
BROWN_DARK: Color = (0.30, 0.19, 0.13)
BLACK: Color = (0.12, 0.09, 0.09)
BLUE_GREY: Color = (0.42, 0.47, 0.56)
WHITE: Color = (0.93, 0.90, 0.86)


def _nv(rng: np.random.Generator) -> dict[str, Any]:
    base = _jitter(rng, _mix(BROWN_LIGHT, BROWN_DARK, rng.uniform(0.1, 0.95)))
    layers = [
        Layer(base, 1.0, Uniform()),
        Layer(_mix(base, BROWN_DARK, 0.5), rng.uniform(0.0, 0.5), Radial(0.0, rng.uniform(0.4, 0.8))),
        Layer(_mix(base, BROWN_DARK, 0.6), rng.uniform(0.0, 0.35), Ridges(Noise.sample(rng, 10, 10, 18), 0.25)),
    ]
    return dict(
        radius=rng.uniform(0.30, 0.62),
        ellipticity=rng.uniform(0.0, 0.15),
        harmonics=_harmonics(rng, 0.04, 0.012),
        edge=rng.uniform(0.03, 0.09),
        layers=layers,
    )


def _mel(rng: np.random.Generator) -> dict[str, Any]:
    base = _jitter(rng, _mix(BROWN_LIGHT, BROWN_DARK, rng.uniform(0.0, 0.8)))
    layers = [Layer(base, 1.0, Uniform())]
    palette = [BROWN_DARK, BLACK, BLUE_GREY, (0.62, 0.32, 0.30), BROWN_LIGHT]
    n_colours = int(rng.integers(2, 5))
    for ci in rng.choice(len(palette), n_colours, replace=False):
        n = int(rng.integers(1, 5))
        blobs = Blobs(_points_in_disc(rng, n, 0.75), rng.uniform(0.12, 0.35, n))
        layers.append(Layer(_jitter(rng, palette[int(ci)], 0.03), rng.uniform(0.6, 0.95), blobs))
    if rng.uniform() < 0.5:  # atypical network
        layers.append(Layer(BROWN_DARK, rng.uniform(0.2, 0.5), Ridges(Noise.sample(rng, 10, 6, 16), 0.3)))
    return dict(
        radius=rng.uniform(0.42, 0.80),
        ellipticity=rng.uniform(0.0, 0.3),
        harmonics=_harmonics(rng, 0.18, 0.07),
        edge=rng.uniform(0.015, 0.06),
        layers=layers,
    )


def _bkl(rng: np.random.Generator) -> dict[str, Any]:
    base = _jitter(rng, _mix(BROWN_LIGHT, BROWN_MID, rng.uniform(-0.2, 0.9)))
    n_milia = int(rng.integers(3, 16))
    layers = [
        Layer(base, 1.0, Uniform()),
        Layer(_mix(base, (0.85, 0.75, 0.6), 0.5), rng.uniform(0.2, 0.5), Patches(Noise.sample(rng, 8, 2, 6), 0.3, 0.4)),
        Layer(_mix(base, BROWN_DARK, 0.7), rng.uniform(0.45, 0.8), Ridges(Noise.sample(rng, 12, 5, 12), 0.18)),
        Layer((0.96, 0.94, 0.84), rng.uniform(0.6, 0.9), Blobs(_points_in_disc(rng, n_milia, 0.8),
                                                               rng.uniform(0.025, 0.05, n_milia))),
    ]  # fmt: skip
    return dict(
        radius=rng.uniform(0.36, 0.72),
        ellipticity=rng.uniform(0.05, 0.3),
        harmonics=_harmonics(rng, 0.08, 0.03),
        edge=rng.uniform(0.01, 0.03),
        layers=layers,
    )


def _bcc(rng: np.random.Generator) -> dict[str, Any]:
    base = _jitter(rng, _mix((0.90, 0.64, 0.63), (0.78, 0.52, 0.56), rng.uniform()))
    layers = [
        Layer(base, 1.0, Uniform()),
        Layer((0.97, 0.90, 0.90), rng.uniform(0.2, 0.5), Patches(Noise.sample(rng, 8, 2, 5), 0.5, 0.5)),  # pearly
        Layer(_jitter(rng, (0.72, 0.12, 0.16), 0.03), rng.uniform(0.7, 0.95),
              Lines(_vessel_tree(rng, int(rng.integers(2, 5))), rng.uniform(0.025, 0.05))),
    ]  # fmt: skip
    if rng.uniform() < 0.4:  # blue-grey ovoid nests
        n = int(rng.integers(1, 4))
        amount = rng.uniform(0.5, 0.85)
        nests = Blobs(_points_in_disc(rng, n, 0.6), rng.uniform(0.06, 0.14, n))
        layers.append(Layer(BLUE_GREY, amount, nests))
    return dict(
        radius=rng.uniform(0.30, 0.65),
        ellipticity=rng.uniform(0.0, 0.25),
        harmonics=_harmonics(rng, 0.08, 0.025),
        edge=rng.uniform(0.04, 0.10),
        layers=layers,
    )


def _akiec(rng: np.random.Generator) -> dict[str, Any]:
    base = _jitter(rng, _mix((0.86, 0.50, 0.46), (0.76, 0.40, 0.40), rng.uniform()))
    layers = [
        Layer(base, 1.0, Uniform()),
        Layer(_mix(base, (0.70, 0.25, 0.25), 0.6), rng.uniform(0.2, 0.5),
              Patches(Noise.sample(rng, 8, 3, 8), 0.2, 0.5)),
        Layer((0.93, 0.90, 0.78), rng.uniform(0.4, 0.85),  # white-yellow scale
              Patches(Noise.sample(rng, 14, 8, 20), rng.uniform(0.7, 1.3), 0.2)),
    ]  # fmt: skip
    return dict(
        radius=rng.uniform(0.35, 0.72),
        ellipticity=rng.uniform(0.0, 0.3),
        harmonics=_harmonics(rng, 0.12, 0.05),
        edge=rng.uniform(0.08, 0.16),
        layers=layers,
        border_patchiness=rng.uniform(0.3, 0.6),
        border_noise=Noise.sample(rng, 10, 3, 9),
    )


def _df(rng: np.random.Generator) -> dict[str, Any]:
    base = _jitter(rng, _mix(BROWN_LIGHT, BROWN_MID, rng.uniform(0.0, 0.7)))
    layers = [
        Layer(base, 1.0, Uniform()),
        Layer(_mix(base, BROWN_DARK, 0.5), rng.uniform(0.2, 0.45), Radial(rng.uniform(0.7, 0.9), 0.2)),  # ring
        Layer(_mix(base, BROWN_DARK, 0.6), rng.uniform(0.1, 0.3), Ridges(Noise.sample(rng, 10, 10, 18), 0.25)),
        Layer(_jitter(rng, WHITE, 0.02), rng.uniform(0.65, 0.95), Radial(0.0, rng.uniform(0.3, 0.5))),  # scar patch
    ]
    return dict(
        radius=rng.uniform(0.20, 0.45),
        ellipticity=rng.uniform(0.0, 0.25),
        harmonics=_harmonics(rng, 0.05, 0.015),
        edge=rng.uniform(0.05, 0.12),
        layers=layers,
    )


def _vasc(rng: np.random.Generator) -> dict[str, Any]:
    septa = _jitter(rng, (0.80, 0.52, 0.54))
    layers = [Layer(septa, 1.0, Uniform())]
    for colour in [(0.74, 0.12, 0.18), (0.46, 0.13, 0.38), (0.30, 0.06, 0.14)]:
        n = int(rng.integers(3, 10))
        lacunae = Blobs(_points_in_disc(rng, n, 0.8), rng.uniform(0.07, 0.16, n))
        layers.append(Layer(_jitter(rng, colour, 0.03), rng.uniform(0.75, 1.0), lacunae))
    return dict(
        radius=rng.uniform(0.22, 0.55),
        ellipticity=rng.uniform(0.0, 0.25),
        harmonics=_harmonics(rng, 0.06, 0.02),
        edge=rng.uniform(0.015, 0.04),
        layers=layers,
    )


RECIPES: dict[str, Callable[[np.random.Generator], dict[str, Any]]] = {
    "akiec": _akiec, "bcc": _bcc, "bkl": _bkl, "df": _df, "mel": _mel, "nv": _nv, "vasc": _vasc,
}  # fmt: skip


def sample_lesion(seed: int, cls: str, lesion: int) -> Lesion:
    """The shared description of lesion number ``lesion`` of class ``cls``."""
    rng = image_rng(seed, cls, lesion)
    skin = _jitter(rng, _mix((0.92, 0.76, 0.66), (0.78, 0.58, 0.47), rng.uniform()), 0.02)
    meta = {
        "age": int(5 * rng.integers(4, 18)),
        "sex": str(rng.choice(["male", "female"])),
        "localization": str(rng.choice(_LOCALIZATIONS)),
    }
    params = RECIPES[cls](rng)
    return Lesion(
        cls=cls,
        ell_angle=float(rng.uniform(0, np.pi)),
        opacity=float(rng.uniform(0.85, 1.0)),
        skin=skin,
        meta=meta,
        **params,
    )


def sample_view(seed: int, cls: str, lesion: int, view: int) -> View:
    rng = image_rng(seed, cls, lesion, view)
    hairs = []
    n_hairs = 0 if rng.uniform() < 0.4 else int(rng.integers(1, 7))
    for _ in range(n_hairs):
        p0 = rng.uniform(-1.2, 1.2, 2)
        direction = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.8, 2.5)
        p2 = p0 + length * np.array([math.cos(direction), math.sin(direction)])
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.25, 2)  # bend
        t = np.linspace(0, 1, 13)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
        segs = np.concatenate([pts[:-1], pts[1:]], axis=1)
        hairs.append((segs, float(rng.uniform(0.008, 0.02)), _jitter(rng, (0.16, 0.11, 0.09), 0.04)))
    return View(
        center=(float(rng.uniform(-0.12, 0.12)), float(rng.uniform(-0.12, 0.12))),
        rotation=float(rng.uniform(0, 2 * np.pi)),
        scale=float(rng.uniform(0.85, 1.15)),
        gain=float(rng.uniform(0.85, 1.08)),
        cast=_jitter(rng, (1.0, 1.0, 1.0), 0.03),
        gradient=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 0.12))),
        vignette=(float(rng.uniform(0, 0.8)) if rng.uniform() < 0.5 else 0.0, float(rng.uniform(0.95, 1.3))),
        hairs=tuple(hairs),
        noise_sigma=float(rng.uniform(0.005, 0.03)),
        noise_seed=int(rng.integers(0, 2**63)),
    )


# ----------------------------------------------------------------------------- rendering
def _geometry(
    lesion: Lesion, view: View, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel grid ``xx, yy`` (image coordinates in [-1, 1]), lesion coordinates ``u, v``, relative
    radius ``q`` and the signed inside-ness ``inside`` (> 0 inside the outline, in border-softness
    units) of one view: what :func:`render` paints with and :func:`lesion_mask` thresholds."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    # lesion coordinates: translate, rotate, scale, then normalise by the lesion radius
    du, dv = xx - view.center[0], yy - view.center[1]
    cr, sr = math.cos(view.rotation), math.sin(view.rotation)
    r0 = lesion.radius * view.scale
    u = (cr * du + sr * dv) / r0
    v = (-sr * du + cr * dv) / r0
    rho = np.hypot(u, v)
    th = np.arctan2(v, u)
    outline = 1.0 + lesion.ellipticity * np.cos(2 * (th - lesion.ell_angle))
    for k, amp, phase in lesion.harmonics.tolist():
        outline = outline * (1.0 + amp * np.cos(k * th + phase)) if k <= 3 else outline + amp * np.cos(k * th + phase)
    outline = np.maximum(outline, 0.3)
    q = rho / outline
    inside = (outline - rho) / lesion.edge
    if lesion.border_noise is not None:
        inside = inside - lesion.border_patchiness * np.maximum(lesion.border_noise(u, v), 0) / lesion.edge * q
    return xx, yy, u, v, q, inside


def render(lesion: Lesion, view: View, size: int) -> np.ndarray:
    """One image as uint8 (size, size, 3)."""
    xx, yy, u, v, q, inside = _geometry(lesion, view, size)
    mask = _sigmoid(inside) * lesion.opacity

    colour = np.empty((size, size, 3), dtype=np.float32)
    colour[:] = lesion.layers[0].color
    for layer in lesion.layers[1:]:
        w = (layer.amount * layer.field(u, v, q))[..., None].astype(np.float32)
        colour += w * (np.asarray(layer.color, dtype=np.float32) - colour)

    # skin: base tone with low-frequency mottling (in image coordinates)
    rng = np.random.default_rng(view.noise_seed)
    skin = np.empty_like(colour)
    skin[:] = lesion.skin
    skin *= (1.0 + 0.03 * Noise.sample(rng, 6, 1, 4)(xx, yy))[..., None]
    img = skin + mask[..., None] * (colour - skin)

    for segs, width, hair_colour in view.hairs:
        w = np.exp(-((_segment_distance(xx, yy, segs) / width) ** 2))[..., None] * 0.9
        img += w * (np.asarray(hair_colour, dtype=np.float32) - img)

    direction, amp = view.gradient
    light = view.gain * (1.0 + amp * (math.cos(direction) * xx + math.sin(direction) * yy))
    strength, radius = view.vignette
    if strength > 0:
        light = light * (1.0 - strength * _sigmoid((np.hypot(xx, yy) - radius) / 0.06))
    img = img * light[..., None] * np.asarray(view.cast, dtype=np.float32)
    img += rng.normal(0.0, view.noise_sigma, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def lesion_mask(lesion: Lesion, view: View, size: int) -> np.ndarray:
    """Where :func:`render` draws the lesion: uint8 (size, size), 255 inside, 0 outside.

    A pixel is inside where the lesion's soft outline has weight >= 1/2 (``sigmoid(inside) >=
    0.5``, i.e. the outline itself, border irregularity and akiec's eaten border included; the
    soft border's outer half, hairs and the vignette are not). Same pixel grid as the image: row 0
    is the top row of the picture, column 0 the left column.
    """
    inside = _geometry(lesion, view, size)[5]
    return np.where(inside >= 0, 255, 0).astype(np.uint8)


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the data set
def class_counts(cfg: SyntheticConfig) -> dict[str, int]:
    """Images per class: ``class_counts`` where given, else ``images_per_class``."""
    return {c: int(cfg.class_counts.get(c, cfg.images_per_class)) for c in CLASSES}


@dataclass(frozen=True)
class PlannedImage:
    image_id: str
    lesion_id: str
    cls: str
    lesion: int  # index within the class
    view: int


def plan(cfg: SyntheticConfig) -> list[PlannedImage]:
    """Ids and (class, lesion, view) of every image, numbered in class order."""
    out: list[PlannedImage] = []
    n_lesions = 0
    for cls, n in class_counts(cfg).items():
        for i in range(n):
            lesion, view = divmod(i, cfg.images_per_lesion)
            if view == 0:
                n_lesions += 1
            out.append(PlannedImage(f"SYN_{len(out) + 1:07d}", f"SYNL_{n_lesions:07d}", cls, lesion, view))
    return out


def generate_image(seed: int, item: PlannedImage, size: int) -> tuple[np.ndarray, Lesion]:
    lesion = sample_lesion(seed, item.cls, item.lesion)
    return render(lesion, sample_view(seed, item.cls, item.lesion, item.view), size), lesion


def generate_mask(seed: int, item: PlannedImage, size: int) -> np.ndarray:
    """The lesion mask (:func:`lesion_mask`) of the image :func:`generate_image` makes for ``item``:
    uint8 (size, size), 0/255, a pure function of ``(seed, item)`` like the image."""
    lesion = sample_lesion(seed, item.cls, item.lesion)
    return lesion_mask(lesion, sample_view(seed, item.cls, item.lesion, item.view), size)


def readme_text(cfg: SyntheticConfig, seed: int, n_images: int) -> str:
    return f"""{README_MARKER} - NOT REAL PATIENTS

Every image in this folder is SYNTHETIC: generated from random numbers by pipeline/core/synthetic.py
of the skin-twin project. No image shows a real person or a real lesion, and none may be used for
any medical purpose. The data set exists only to run and test the pipeline end to end.

How it was made: for each of the 7 HAM10000 classes (akiec bcc bkl df mel nv vasc) a random
lesion is drawn with a class-dependent outline (size, asymmetry, border irregularity, border
softness) and colour/texture layers (e.g. nv uniform brown, mel multi-coloured islands incl.
black and blue-grey, bkl cracks and milia, bcc pink with branching red vessels, akiec red with
white scale, df central white patch and ring, vasc red/purple lacunae), painted on a random skin
tone; each view adds rotation, scale, position, illumination, vignette, hairs and noise, and is
saved as JPEG (quality {cfg.jpeg_quality}). Metadata follows the HAM10000 layout; dx_type is
"synthetic", dataset is "synthetic" (or synthetic_1 .. synthetic_<sites> with synthetic.sites > 1),
age/sex/localization are random.

Lesion masks: masks/<image_id>_segmentation.png, one per image: 8-bit greyscale PNG of the
image's size, 255 where the lesion is drawn (its outline), 0 on skin; row 0 is the top row of the
image. They are the ground truth for checking where class activation maps point.

Parameters: seed={seed}, image_size={cfg.image_size}, images_per_lesion={cfg.images_per_lesion},
images={n_images}, per class={class_counts(cfg)}.
"""


def site_of(item: PlannedImage, sites: int = 1) -> str:
    """The synthetic acquisition site (HAM10000 column ``dataset``) of one image: ``synthetic``
    with one site, else ``synthetic_1`` .. ``synthetic_<sites>`` by lesion index within the class
    (round robin), so every view of a lesion shares its site and every site gets every class that
    has at least ``sites`` lesions. A label only: the pixels do not depend on it."""
    return "synthetic" if sites <= 1 else f"synthetic_{item.lesion % sites + 1}"


def metadata_row(item: PlannedImage, lesion: Lesion, sites: int = 1) -> dict[str, Any]:
    """The HAM10000-layout metadata row of one generated image."""
    return {
        "lesion_id": item.lesion_id,
        "image_id": item.image_id,
        "dx": item.cls,
        "dx_type": "synthetic",
        **lesion.meta,
        "dataset": site_of(item, sites),
    }
