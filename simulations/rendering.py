"""Render a grey cell-nucleus image from one patient's measured nuclear morphometry.

The Wisconsin diagnostic breast cancer data (WDBC, scikit-learn ``load_breast_cancer``) holds ten
shape and texture measurements ("mean" group) that were computed from digitised fine-needle
aspirate images; the images themselves were never published. To give the multimodal benchmark an
image branch with *real labels*, :func:`render_nucleus` draws a synthetic nucleus whose geometry
follows that patient's own measurements. **The images are rendered, not photographed**: they carry
exactly the information of the ten "mean" features plus seeded random detail, and must never be
described as histology or cytology images.

How each measurement shapes the picture (a star-shaped contour ``r(theta)`` around the centre):

- ``radius``, ``perimeter``, ``area``: nucleus size. The base radius is the mean of ``radius`` and
  ``sqrt(area / pi)`` (WDBC units), scaled by :data:`PIXELS_PER_UNIT` so the largest WDBC nucleus
  (radius 28.1) is about 26 px and a typical one (13.4) about 12 px in a 64 x 64 image. Pixel area
  therefore grows monotonically with the measured size.
- ``smoothness`` (local variation of radius lengths): amplitude of smooth radial waves, harmonics 4-9.
- ``compactness`` (perimeter^2 / area - 1): elongation, a harmonic-2 (ellipse-like) term.
- ``concave points`` (number of concave portions): how many indentations (0 to 8).
- ``concavity`` (severity of concave portions): depth of each indentation, so a higher concavity
  lowers the solidity (area / convex-hull area) of the rendered nucleus.
- ``symmetry``: asymmetry of the contour, a harmonic-1 and harmonic-3 term that makes one side bulge.
- ``fractal dimension``: high-frequency boundary roughness, harmonics 14-29.
- ``texture`` (standard deviation of grey values): standard deviation, in grey levels, of the
  spatially correlated chromatin noise inside the nucleus.

After the contour is built its area centroid is moved onto the image centre (a Grad-CAM check
expects attention in the middle), and the contour is shrunk only if it would leave the frame.
Nuclei are dark (grey ~ 90) on a light, slightly noisy background (~ 205), with a one-pixel
anti-aliased edge. All randomness (wave phases, indentation positions, noise) comes from
:func:`nucleus_rng`, a numpy Generator seeded from ``(seed, case_index)``, so the same case and seed
always give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

IMAGE_SIZE = 64
#: Largest mean radius in WDBC (28.11) maps to ~26 px, leaving room for boundary bumps.
PIXELS_PER_UNIT = 26.0 / 28.11
#: No contour point may lie further than this from the centre (pixels); 32 is the frame edge.
MAX_CONTOUR_PX = 30.0
BACKGROUND_GREY = 205.0
NUCLEUS_GREY = 90.0
BACKGROUND_NOISE_STD = 4.0
_N_ANGLES = 720


@dataclass(frozen=True)
class Morphometry:
    """The ten WDBC "mean" measurements of one patient, in the data set's own units."""

    radius: float
    texture: float
    perimeter: float
    area: float
    smoothness: float
    compactness: float
    concavity: float
    concave_points: float
    symmetry: float
    fractal_dimension: float

    @classmethod
    def from_mapping(cls, values: Mapping[str, float]) -> Morphometry:
        """Build from a mapping keyed by field name (``concave_points``) or by scikit-learn's
        feature name (``"mean concave points"``)."""
        out = {}
        for f in fields(cls):
            sk_name = "mean " + f.name.replace("_", " ")
            if f.name in values:
                out[f.name] = float(values[f.name])
            elif sk_name in values:
                out[f.name] = float(values[sk_name])
            else:
                raise KeyError(f"morphometry needs '{f.name}' (or '{sk_name}'); got {sorted(values)}")
        return cls(**out)


def nucleus_rng(case_index: int, seed: int = 0) -> np.random.Generator:
    """The Generator that drives every random detail of case ``case_index`` under ``seed``."""
    return np.random.default_rng([int(seed), int(case_index)])


def _contour(m: Morphometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Radius (pixels) at :data:`_N_ANGLES` evenly spaced angles, before centring."""
    theta = np.linspace(0.0, 2.0 * np.pi, _N_ANGLES, endpoint=False)
    base = PIXELS_PER_UNIT * 0.5 * (m.radius + np.sqrt(max(m.area, 0.0) / np.pi))
    rel = np.ones_like(theta)

    # compactness -> elongation (harmonic 2)
    elong = 0.9 * max(m.compactness - 0.015, 0.0)
    rel += elong * np.cos(2.0 * (theta - rng.uniform(0, np.pi)))
    # symmetry -> one side bulges (harmonics 1 and 3 share a direction)
    asym = 0.9 * max(m.symmetry - 0.1, 0.0)
    phi = rng.uniform(0, 2 * np.pi)
    rel += asym * (np.cos(theta - phi) + 0.5 * np.cos(3.0 * (theta - phi)))
    # smoothness -> smooth local radius variation (harmonics 4-9), relative sd ~ 0.6 * excess
    waves = np.zeros_like(theta)
    for k in range(4, 10):
        waves += rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    waves /= max(np.std(waves), 1e-9)
    rel += 0.6 * max(m.smoothness - 0.045, 0.0) * waves
    # fractal dimension -> high-frequency roughness (harmonics 14-29)
    rough = np.zeros_like(theta)
    for k in range(14, 30):
        rough += rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rough /= max(np.std(rough), 1e-9)
    rel += 2.0 * max(m.fractal_dimension - 0.045, 0.0) * rough
    # concave points -> number of indentations; concavity -> their depth
    n_dents = int(np.clip(np.rint(m.concave_points * 40.0), 0, 8))
    depth = float(np.clip(1.3 * m.concavity, 0.0, 0.55))
    if n_dents:
        centres = rng.uniform(0, 2 * np.pi) + np.arange(n_dents) * 2 * np.pi / n_dents
        centres += rng.uniform(-0.25, 0.25, size=n_dents) * 2 * np.pi / n_dents
        widths = rng.uniform(0.12, 0.22, size=n_dents)
        for c, w in zip(centres, widths, strict=True):
            d = np.angle(np.exp(1j * (theta - c)))
            rel -= depth * np.exp(-0.5 * (d / w) ** 2)
    r = base * np.clip(rel, 0.25, None)
    return theta, r


def _centroid(theta: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    """Area centroid (x, y) of the star-shaped polygon with vertices ``r * (cos, sin)``."""
    x, y = r * np.cos(theta), r * np.sin(theta)
    x2, y2 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y2 - x2 * y
    area = cross.sum() / 2.0
    return float(((x + x2) * cross).sum() / (6 * area)), float(((y + y2) * cross).sum() / (6 * area))


def render_nucleus(m: Morphometry, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one nucleus; returns a ``(size, size)`` uint8 array (0 = black, 255 = white).

    ``size`` other than 64 scales the geometry proportionally.
    """
    theta, r = _contour(m, rng)
    cx, cy = _centroid(theta, r)
    # distance from the centroid to every contour point; shrink if the frame would clip it
    reach = np.hypot(r * np.cos(theta) - cx, r * np.sin(theta) - cy).max()
    shrink = min(1.0, MAX_CONTOUR_PX / reach)
    scale = size / IMAGE_SIZE * shrink
    r, cx, cy = r * scale, cx * scale, cy * scale

    centre = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - centre + cx, yy - centre + cy  # pixel position in contour coordinates
    rho = np.hypot(dx, dy)
    ang = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    r_at = np.interp(ang, np.append(theta, 2 * np.pi), np.append(r, r[0]))
    inside = np.clip(r_at - rho + 0.5, 0.0, 1.0)  # one-pixel anti-aliased edge

    chromatin = gaussian_filter(rng.normal(size=(size, size)), sigma=0.8)
    chromatin *= m.texture / max(chromatin.std(), 1e-9)
    background = BACKGROUND_GREY + BACKGROUND_NOISE_STD * rng.normal(size=(size, size))
    nucleus = NUCLEUS_GREY + chromatin
    img = inside * nucleus + (1.0 - inside) * background
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a grey uint8 array as an 8-bit PNG (mode "L"); byte-identical for identical input."""
    path = Path(path)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(path, format="PNG")
    return path
