"""Virtual sites at scale: drawn from the real pooled manifest, reproducible per (seed, site), each
with train and test rows, and never more than ``scale-cache-size`` runtimes resident per process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfusion.client import runtime
from fedfusion.common.config import ConfigError
from fedfusion.common.manifest import load_manifest
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.scale_sites import (
    BoundedRuntimeCache,
    ScaleSiteSource,
    build_virtual_site,
    pooled_data,
    virtual_site_id,
)
from fedfusion.simulations.simulate import SimulationSpec, ray_init_args, run_config_for


@pytest.fixture(scope="module")
def wdbc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shipped WDBC data set (569 real patients, rendered images): (data dir, schema path)."""
    out = tmp_path_factory.mktemp("wdbc")
    return out, build_dataset("wdbc-multimodal", out, seed=0)


def _run_config(wdbc: tuple[Path, Path], **extra: Any) -> dict[str, Any]:
    data_dir, schema = wdbc
    return {"scale-sites": 10_000, "scale-rows-per-site": 50, "data-dir": str(data_dir), "schema": str(schema),
            "seed": 3, **extra}


def _source(wdbc: tuple[Path, Path], **extra: Any) -> ScaleSiteSource:
    source = ScaleSiteSource.from_run_config(_run_config(wdbc, **extra))
    assert source is not None
    return source


def test_scale_mode_is_off_without_scale_sites(wdbc: tuple[Path, Path]) -> None:
    assert ScaleSiteSource.from_run_config({"data-dir": str(wdbc[0]), "schema": str(wdbc[1])}) is None
    assert ScaleSiteSource.from_run_config(_run_config(wdbc, **{"scale-sites": 0})) is None


def test_draw_is_deterministic_per_seed_and_site(wdbc: tuple[Path, Path]) -> None:
    source = _source(wdbc)
    strata = pooled_data(source.manifest_path, source.schema_path).strata
    rows, is_test = source.draw(42, strata)
    again_rows, again_test = _source(wdbc).draw(42, strata)
    np.testing.assert_array_equal(rows, again_rows)
    np.testing.assert_array_equal(is_test, again_test)
    assert not np.array_equal(np.sort(rows), np.sort(source.draw(43, strata)[0]))  # another site
    other_seed = _source(wdbc, seed=4).draw(42, strata)[0]
    assert not np.array_equal(np.sort(rows), np.sort(other_seed))  # another seed
    assert len(np.unique(rows)) == 50  # distinct within a site


def test_virtual_site_holds_real_rows_with_both_splits(wdbc: tuple[Path, Path]) -> None:
    source = _source(wdbc)
    pooled = load_manifest(Path(source.manifest_path), pooled_data(source.manifest_path, source.schema_path).schema,
                           check_images=False)
    by_case = pooled.frame.set_index("case_id")
    for index in (0, 1, 9_999):
        site = build_virtual_site(source, index, "cpu")
        frame = site.manifest.frame
        assert site.site_id == virtual_site_id(index) and len(frame) == 50
        # every row is a real case, its values unchanged
        real = by_case.loc[frame["case_id"]]
        np.testing.assert_array_equal(real["label"].to_numpy(), frame["label"].to_numpy())
        np.testing.assert_array_equal(real["image"].to_numpy(), frame["image"].to_numpy())
        for column in ("radius_se", "area_worst", "fractal_dimension_worst"):
            np.testing.assert_array_equal(real[column].to_numpy(float), frame[column].to_numpy(float))
        assert len(site.test_set) == 10 and len(site.train_set) == 40
        # stratified: the test rows' malignant share is within one row of the site's share
        malignant = (frame["label"] == "malignant").to_numpy()
        test = (frame["split"] == "test").to_numpy()
        assert abs(malignant[test].sum() - malignant.mean() * test.sum()) <= 1.0
        item = site.train_set[0]
        assert item["image"].shape == (1, 64, 64) and item["clinical_num"].numel() > 0


def test_small_test_fraction_still_leaves_one_test_row(wdbc: tuple[Path, Path]) -> None:
    source = _source(wdbc, **{"scale-rows-per-site": 4, "scale-test-fraction": 0.01})
    site = build_virtual_site(source, 7, "cpu")
    assert (len(site.train_set), len(site.test_set)) == (3, 1)


def test_bad_scale_settings_are_named(wdbc: tuple[Path, Path]) -> None:
    source = _source(wdbc, **{"scale-rows-per-site": 600})
    with pytest.raises(ConfigError, match=r"manifest\.csv: scale-rows-per-site = 600 but the pooled manifest has "
                                          r"only 569 rows"):
        build_virtual_site(source, 0, "cpu")
    with pytest.raises(ConfigError, match="virtual site 10000 does not exist: scale-sites = 10000"):
        build_virtual_site(_source(wdbc), 10_000, "cpu")
    with pytest.raises(ConfigError, match=r"scale-test-fraction must be between 0 and 1 \(exclusive\), got 1.0"):
        _source(wdbc, **{"scale-test-fraction": 1.0})
    with pytest.raises(ConfigError, match=r"scale-sites = 5 needs \['data-dir'\]"):
        ScaleSiteSource.from_run_config({"scale-sites": 5, "schema": str(wdbc[1])})
    with pytest.raises(ConfigError, match="scale-cache-size must be >= 1, got 0"):
        _source(wdbc, **{"scale-cache-size": 0})


@pytest.mark.parametrize("bound", [1, 2])
def test_resident_runtimes_stay_bounded(wdbc: tuple[Path, Path], bound: int) -> None:
    """30 distinct sites through the ClientApp's resolver: at most ``bound`` runtimes stay built."""
    run_config = _run_config(wdbc, **{"scale-cache-size": bound, "scale-rows-per-site": 10})
    before = runtime.load_site.cache_info().currsize
    seen = set()
    for partition in range(30):
        site = runtime.site_from_context({"partition-id": partition}, run_config)
        seen.add(site.site_id)
        assert runtime.resident_site_runtimes() - before <= bound
    assert len(seen) == 30
    # the last one is still cached (same object), an evicted one is rebuilt (a new object)
    assert runtime.site_from_context({"partition-id": 29}, run_config) is site
    assert runtime.site_from_context({"partition-id": 0}, run_config).site_id == virtual_site_id(0)
    # decoded images are shared per real case: bounded by the data set, not by the number of sites
    pooled = pooled_data(str(wdbc[0] / "manifest.csv"), str(wdbc[1]))
    assert 0 < len(pooled.images) <= 569


def test_bounded_cache_evicts_least_recently_used() -> None:
    cache = BoundedRuntimeCache(2)
    built: list[str] = []

    def build(name: str) -> Any:
        built.append(name)
        return name

    for key in ("a", "b", "a", "c", "a", "b"):
        cache.get((key,), lambda k=key: build(k))
    assert built == ["a", "b", "c", "b"] and len(cache) == 2  # "b" was evicted by "c", "a" never


def test_run_config_samples_and_ray_address(wdbc: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = SimulationSpec(dataset="wdbc-multimodal", out_dir=wdbc[0], scale_sites=10_000, fraction_train=0.01,
                          fraction_evaluate=0.01)
    config = run_config_for(spec, wdbc[1], {})
    assert (config["scale-sites"], config["min-sites"], config["fraction-train"]) == (10_000, 100, 0.01)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_init_args(num_cpus=2)["num_cpus"] == 2 and "address" not in ray_init_args()
    joined = ray_init_args("10.0.0.5:6379", num_cpus=2)  # Ray refuses num_cpus for an existing cluster
    assert joined["address"] == "10.0.0.5:6379" and "num_cpus" not in joined and "num_gpus" not in joined
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert ray_init_args()["address"] == "auto" and "num_cpus" not in ray_init_args()


def test_shared_model_object_trains_exactly_like_a_fresh_one(wdbc: tuple[Path, Path]) -> None:
    """Virtual sites reuse one model object per process; loading the server's weights into it must
    give the same local update, to the bit, as a newly built model."""
    import torch

    from fedfusion.common.federation_config import FederationConfig
    from fedfusion.common.records import arrays_to_model, model_to_arrays

    cfg = FederationConfig.from_run_config({**_run_config(wdbc, **{"scale-rows-per-site": 20}), "local-epochs": 1})
    source = _source(wdbc, **{"scale-rows-per-site": 20})
    first, second = build_virtual_site(source, 5, "cpu"), build_virtual_site(source, 6, "cpu")
    shared = first.build_model(cfg.model)
    assert second.build_model(cfg.model) is shared and first.build_model(cfg.model, fresh=True) is not shared
    torch.manual_seed(0)
    server = model_to_arrays(first.build_model(cfg.model, fresh=True))
    second.train(arrays_to_model(server, second.build_model(cfg.model)), cfg.train, 1)  # leaves state behind
    reused = arrays_to_model(server, first.build_model(cfg.model))
    first.train(reused, cfg.train, 2)
    fresh = arrays_to_model(server, first.build_model(cfg.model, fresh=True))
    first.train(fresh, cfg.train, 2)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, reused.state_dict()[key]), key
