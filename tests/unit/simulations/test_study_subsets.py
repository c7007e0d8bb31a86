"""A modality subset leaves out a site that has no rows with the kept modality, and says why in
words (the manifest's problem), not only the "N problem(s)" header of the error."""

from __future__ import annotations

from pathlib import Path

from fedfusion.common.config import Schema
from fedfusion.simulations.study_runner import write_modality_subset
from tests.sitegen import make_site


def test_a_site_without_images_is_left_out_of_the_image_only_arm_with_the_reason(tmp_path: Path,
                                                                                  schema: Schema) -> None:
    data = tmp_path / "data"
    data.mkdir()
    sites = {"A": make_site(data, n=20, seed=0),
             "B": make_site(tmp_path / "b", n=20, seed=1, with_images=False)}

    _, kept, skipped = write_modality_subset(schema, data, sites, ("image",), "only-image")

    assert list(kept) == ["A.only-image"]
    assert list(skipped) == ["B"]
    assert "no patient rows" in skipped["B"] and "problem(s)" not in skipped["B"]
