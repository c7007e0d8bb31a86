"""The nucleus renderer: geometry follows the morphometry, output is deterministic and centred."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedfusion.simulations.rendering import (
    IMAGE_SIZE,
    Morphometry,
    nucleus_rng,
    render_nucleus,
    save_png,
)

# a typical benign-looking nucleus (close to the WDBC medians)
TYPICAL = Morphometry(
    radius=13.4,
    texture=18.8,
    perimeter=86.2,
    area=551.0,
    smoothness=0.096,
    compactness=0.093,
    concavity=0.062,
    concave_points=0.034,
    symmetry=0.179,
    fractal_dimension=0.062,
)
THRESHOLD = 147  # halfway between nucleus (~90) and background (~205) grey


def _mask(img: np.ndarray) -> np.ndarray:
    return img < THRESHOLD


def _with_size(radius: float) -> Morphometry:
    return dataclasses.replace(TYPICAL, radius=radius, area=np.pi * radius**2, perimeter=2 * np.pi * radius)


def test_render_returns_grey_uint8_of_requested_size() -> None:
    img = render_nucleus(TYPICAL, nucleus_rng(0, 0))

    assert img.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert img.dtype == np.uint8
    assert 150 < _mask(img).sum() < 1200  # a typical nucleus covers a decent part of the frame


def test_same_case_and_seed_give_identical_pixels_and_others_differ() -> None:
    a = render_nucleus(TYPICAL, nucleus_rng(7, 3))
    b = render_nucleus(TYPICAL, nucleus_rng(7, 3))
    other_case = render_nucleus(TYPICAL, nucleus_rng(8, 3))
    other_seed = render_nucleus(TYPICAL, nucleus_rng(7, 4))

    assert np.array_equal(a, b)
    assert not np.array_equal(a, other_case)
    assert not np.array_equal(a, other_seed)


def test_larger_radius_renders_larger_nucleus_area() -> None:
    areas = [_mask(render_nucleus(_with_size(r), nucleus_rng(1, 0))).sum() for r in (7.0, 10.0, 14.0, 19.0, 25.0)]

    assert all(a < b for a, b in zip(areas, areas[1:], strict=False)), areas
    # pixel area follows measured area: (25 / 7)^2 = 12.8; allow for the anti-aliased edge
    assert 8 < areas[-1] / areas[0] < 16


def test_higher_concavity_lowers_solidity() -> None:
    measure = pytest.importorskip("skimage.measure")
    solidities = []
    for concavity in (0.0, 0.08, 0.18, 0.35):
        m = dataclasses.replace(TYPICAL, concavity=concavity, concave_points=0.1)
        img = render_nucleus(m, nucleus_rng(2, 0))
        (region,) = measure.regionprops(_mask(img).astype(int))
        solidities.append(region.solidity)

    assert all(a > b for a, b in zip(solidities, solidities[1:], strict=False)), solidities
    assert solidities[0] - solidities[-1] > 0.05


def test_higher_texture_raises_grey_level_spread_inside_nucleus() -> None:
    spreads = []
    for texture in (10.0, 20.0, 35.0):
        img = render_nucleus(dataclasses.replace(TYPICAL, texture=texture), nucleus_rng(3, 0))
        core = img[_mask(img)]
        spreads.append(core.std())

    assert spreads[0] < spreads[1] < spreads[2], spreads


def test_asymmetric_and_largest_nuclei_stay_centred_and_inside_the_frame() -> None:
    lopsided = dataclasses.replace(TYPICAL, symmetry=0.304, compactness=0.345)
    largest = dataclasses.replace(_with_size(28.11), smoothness=0.163, fractal_dimension=0.097)
    for m in (lopsided, largest):
        for case in range(5):
            img = render_nucleus(m, nucleus_rng(case, 0))
            ys, xs = np.nonzero(_mask(img))
            centre = (IMAGE_SIZE - 1) / 2

            assert abs(xs.mean() - centre) < 1.5 and abs(ys.mean() - centre) < 1.5
            border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
            assert border.min() >= THRESHOLD  # nothing of the nucleus touches the edge


def test_save_png_writes_grey_64x64_with_stable_bytes(tmp_path: Path) -> None:
    img = render_nucleus(TYPICAL, nucleus_rng(4, 0))
    first = save_png(img, tmp_path / "a.png").read_bytes()
    second = save_png(img, tmp_path / "b.png").read_bytes()

    with Image.open(tmp_path / "a.png") as loaded:
        assert loaded.mode == "L" and loaded.size == (64, 64)
        assert np.array_equal(np.asarray(loaded), img)
    assert first == second


def test_morphometry_reads_scikit_learn_feature_names() -> None:
    names = {"mean " + f.name.replace("_", " "): float(i) for i, f in enumerate(dataclasses.fields(Morphometry))}

    m = Morphometry.from_mapping(names)

    assert m.concave_points == 7.0 and m.fractal_dimension == 9.0
    with pytest.raises(KeyError, match="fractal_dimension"):
        Morphometry.from_mapping({k: v for k, v in names.items() if "fractal" not in k})
