"""Partitioners split real shipped data into usable sites, reproducibly, with the skew they promise."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfusion.common.config import Schema, load_schema
from fedfusion.common.manifest import load_manifest
from fedfusion.simulations.datasets import build_dataset
from fedfusion.simulations.partition import PARTITION_FILE, PARTITIONS, PartitionError, partition_manifest
from tests.sitegen import make_site

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wdbc_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped WDBC data set (569 real patients, rendered images), built once per module."""
    out = tmp_path_factory.mktemp("wdbc")
    build_dataset("wdbc-multimodal", out, seed=0)
    return out


@pytest.fixture(scope="module")
def lung_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NCCTG lung: 176 real patients from 9 institutions (survival, a natural site column)."""
    out = tmp_path_factory.mktemp("lung")
    build_dataset("lung", out, seed=0)
    return out


def _copy(build: Path, dest: Path, images: bool = False) -> tuple[Path, Schema]:
    """A private copy of a built data set: every partition writes its site files beside the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("manifest.csv", "schema.json"):
        shutil.copy(build / name, dest / name)
    if images:
        shutil.copytree(build / "images", dest / "images")
    return dest / "manifest.csv", load_schema(dest / "schema.json")


def _sites(paths: dict[str, Path]) -> dict[str, pd.DataFrame]:
    return {site: pd.read_csv(path, dtype=str, keep_default_na=False) for site, path in paths.items()}


def _record(manifest: Path) -> dict:
    return json.loads((manifest.parent / PARTITION_FILE).read_text())


def _label_tv(frames: dict[str, pd.DataFrame], column: str) -> float:
    """Mean total-variation distance between each site's class mix and the pooled mix."""
    pooled = pd.concat(frames.values())[column].value_counts(normalize=True)
    return float(
        np.mean(
            [
                0.5 * (f[column].value_counts(normalize=True).reindex(pooled.index, fill_value=0) - pooled).abs().sum()
                for f in frames.values()
            ]
        )
    )


SIMULATED = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("quantity", {}),
    ("quantity", {"size_law": "power"}),
    ("covariate-shift", {"shift_feature": "radius_worst"}),
    ("modality-missing", {"missing_fraction": 0.2}),
]


# --------------------------------------------------------------------------- invariants of every partitioner


@pytest.mark.parametrize(
    ("how", "options"), SIMULATED, ids=[f"{h}-{'-'.join(map(str, o.values()))}" for h, o in SIMULATED]
)
def test_every_simulated_partition_is_disjoint_complete_usable_and_recorded(
    wdbc_build: Path, tmp_path: Path, how: str, options: dict
) -> None:
    images = how == "modality-missing"  # the image files matter only where the image column changes
    manifest, schema = _copy(wdbc_build, tmp_path / "data", images=images)
    check = schema if images else schema.with_modalities(("clinical",))
    pooled = pd.read_csv(manifest, dtype=str, keep_default_na=False)

    paths = partition_manifest(manifest, schema, how, num_sites=4, seed=3, **options)

    frames = _sites(paths)
    ids = pd.concat([f["case_id"] for f in frames.values()])
    assert ids.is_unique and set(ids) == set(pooled["case_id"])  # disjoint and complete
    assert list(paths) == ["site1", "site2", "site3", "site4"]
    for site, path in paths.items():
        loaded = load_manifest(path, check, check_images=False)  # both classes in train, or this raises
        frame = frames[site]
        assert path == manifest.parent / f"site-{site}.csv"
        assert len(frame) >= 10 and (frame["split"] == "test").sum() >= 1
        assert set(loaded.frame.loc[loaded.frame["split"] == "train", "label"]) == {"benign", "malignant"}
        original = pooled.set_index("case_id").loc[frame["case_id"], "split"]
        assert (original.to_numpy() == frame["split"].to_numpy()).all()  # the pooled split is kept
    record = _record(manifest)
    assert record["partition"] == how and record["seed"] == 3 and record["simulated"]
    assert record["parameters"]["num_sites"] == 4
    assert all(record["parameters"][k] == v for k, v in options.items())
    assert record["source"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert {s: i["rows"] for s, i in record["sites"].items()} == {s: len(f) for s, f in frames.items()}


@pytest.mark.parametrize(("how", "options"), SIMULATED[:5], ids=[h for h, _ in SIMULATED[:5]])
def test_same_seed_gives_identical_files_and_another_seed_another_split(
    lung_build: Path, tmp_path: Path, how: str, options: dict
) -> None:
    if how == "covariate-shift":
        options = {"shift_feature": "age"}
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        manifest, schema = _copy(lung_build, tmp_path / name)
        paths = partition_manifest(manifest, schema, how, num_sites=3, seed=seed, **options)
        runs[name] = {site: path.read_bytes() for site, path in paths.items()}
        runs[name][PARTITION_FILE] = (manifest.parent / PARTITION_FILE).read_bytes()

    assert runs["a"] == runs["b"]
    if how == "quantity" and options.get("size_law") == "power":
        assert runs["a"]["site1"] != runs["c"]["site1"]  # sizes fixed by the law, rows still drawn
    else:
        assert runs["a"] != runs["c"]
    assert b'"seed": 8' in runs["c"][PARTITION_FILE]


def test_partition_names_cover_the_issue_list() -> None:
    assert set(PARTITIONS) == {"natural", "iid", "dirichlet", "quantity", "covariate-shift", "modality-missing"}


# --------------------------------------------------------------------------- natural and split handling


def test_natural_split_uses_the_real_institutions(lung_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(lung_build, tmp_path)
    pooled = pd.read_csv(manifest)

    paths = partition_manifest(manifest, schema, "natural", seed=11)

    assert sorted(paths) == sorted(pooled["site"].unique())
    assert {s: len(f) for s, f in _sites(paths).items()} == pooled["site"].value_counts().to_dict()
    record = _record(manifest)
    assert record["partition"] == "natural" and not record["simulated"] and record["seed"] == 11


def test_natural_without_a_site_column_says_what_to_use(wdbc_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(wdbc_build, tmp_path)

    with pytest.raises(PartitionError, match="no natural site column; use --partition iid"):
        partition_manifest(manifest, schema, "natural")


def test_manifest_without_split_gets_a_stratified_split_per_site(lung_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(lung_build, tmp_path)
    pd.read_csv(manifest, dtype=str, keep_default_na=False).drop(columns="split").to_csv(manifest, index=False)

    paths = partition_manifest(manifest, schema, "dirichlet", num_sites=3, seed=0, alpha=1.0)

    assert _record(manifest)["parameters"]["split"] == "drawn per site (stratified 70/10/20)"
    for frame in _sites(paths).values():
        counts = frame["split"].value_counts()
        assert set(counts.index) == {"train", "val", "test"}
        assert counts["test"] == max(1, int(np.floor(0.2 * len(frame) + 0.5)))  # 20 % per site, as the builders


# --------------------------------------------------------------------------- what each skew promises


def test_dirichlet_label_skew_is_much_stronger_for_small_alpha(wdbc_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(wdbc_build, tmp_path)
    skew: dict[float, list[float]] = {0.3: [], 100.0: []}
    for alpha, seed in [(a, s) for a in skew for s in range(3)]:
        frames = _sites(partition_manifest(manifest, schema, "dirichlet", 4, seed, alpha=alpha))
        skew[alpha].append(_label_tv(frames, "label"))
        assert _record(manifest)["label_skew_tv"] == pytest.approx(skew[alpha][-1])

    small, large = np.mean(skew[0.3]), np.mean(skew[100.0])
    assert small > 0.15 and large < 0.05, skew
    assert small > 5 * large


def test_survival_dirichlet_skews_the_event_rate_or_the_follow_up_time(lung_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(lung_build, tmp_path)

    def spread(alpha: float, skew_on: str) -> float:
        frames = _sites(partition_manifest(manifest, schema, "dirichlet", 3, 0, alpha=alpha, skew_on=skew_on))
        column = "event" if skew_on == "event" else "time"
        values = [pd.to_numeric(f[column]).mean() for f in frames.values()]
        return max(values) / min(values)

    assert spread(0.2, "event") > spread(100.0, "event")
    assert spread(0.3, "time") > 1.5 > spread(100.0, "time")
    parameters = _record(manifest)["parameters"]
    assert {k: parameters[k] for k in ("num_sites", "alpha", "skew_on", "time_bins")} == {
        "num_sites": 3,
        "alpha": 100.0,
        "skew_on": "time",
        "time_bins": 4,
    }
    assert parameters["split"] == "kept from the pooled manifest" and parameters["flwr_datasets"]


def test_quantity_skew_sizes_differ_but_label_mix_does_not(wdbc_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(wdbc_build, tmp_path)

    dirichlet = _sites(partition_manifest(manifest, schema, "quantity", 5, 1, alpha=0.5, min_site_rows=15))
    power = _sites(partition_manifest(manifest, schema, "quantity", 5, 1, size_law="power", power=1.0))

    sizes = [len(f) for f in dirichlet.values()]
    assert sum(sizes) == 569 and min(sizes) >= 15 and max(sizes) > 3 * min(sizes), sizes
    power_sizes = [len(f) for f in power.values()]
    assert power_sizes == sorted(power_sizes, reverse=True)
    assert power_sizes[0] / power_sizes[1] == pytest.approx(2.0, rel=0.15)  # rank ** -1
    assert _label_tv(dirichlet, "label") < 0.06 and _label_tv(power, "label") < 0.03


def test_modality_missing_blanks_the_image_in_the_written_manifests(wdbc_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(wdbc_build, tmp_path, images=True)
    before = manifest.read_bytes()

    paths = partition_manifest(manifest, schema, "modality-missing", 4, 0, missing_sites=1, missing_fraction=0.25)

    record = _record(manifest)
    (without,) = record["parameters"]["sites_without_modality"]
    for site, path in paths.items():
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        present = load_manifest(path, schema, check_images=True).modality_present()
        if site == without:
            assert (raw["image"] == "").all() and not present["image"].any()
        else:
            assert (raw["image"] == "").sum() == round(0.25 * len(raw))
            assert present["image"].mean() == pytest.approx(0.75, abs=0.01)
        assert present["clinical"].all()  # only the chosen modality goes
        assert record["sites"][site]["modality_present"]["image"] == int(present["image"].sum())
    assert manifest.read_bytes() == before  # the pooled manifest is never touched


def test_modality_missing_blanks_omics_but_never_empties_a_case(schema: Schema, tmp_path: Path) -> None:
    manifest = make_site(tmp_path / "toy", n=60, seed=0, with_images=False)
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame.loc[:9, ["age", "size_mm", "grade"]] = ""  # ten cases hold omics only (no image, no clinical)
    frame.to_csv(manifest, index=False)

    paths = partition_manifest(manifest, schema, "iid", 2, 0, missing_modality="omics", missing_sites=1)

    omics_only = set(frame.loc[:9, "case_id"])
    for path in paths.values():
        present = load_manifest(path, schema, check_images=False).modality_present()
        assert present.any(axis=1).all()
        site = load_manifest(path, schema, check_images=False).frame
        lost = ~present["omics"].to_numpy()
        assert not set(site.loc[lost, "case_id"]) & omics_only
    whole = _record(manifest)["parameters"]["sites_without_modality"][0]
    blanked = pd.read_csv(paths[whole], dtype=str, keep_default_na=False)
    keeps = blanked["case_id"].isin(omics_only)
    assert (blanked.loc[~keeps, list(schema.omics)] == "").all().all()


def test_covariate_shift_gives_sites_different_feature_distributions(wdbc_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(wdbc_build, tmp_path)

    def means(strictness: float) -> list[float]:
        frames = _sites(
            partition_manifest(
                manifest, schema, "covariate-shift", 3, 0, shift_feature="area_worst", shift_strictness=strictness
            )
        )
        return [pd.to_numeric(f["area_worst"]).mean() for f in frames.values()]

    shifted, mixed = means(0.6), means(0.0)
    assert shifted == sorted(shifted) and shifted[-1] > 1.8 * shifted[0], shifted
    assert max(mixed) < 1.3 * min(mixed), mixed
    assert _record(manifest)["sites"]["site1"]["shift_feature_mean"] == pytest.approx(mixed[0])


# --------------------------------------------------------------------------- errors and housekeeping


def test_unusable_sites_are_refused_with_the_site_named(lung_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(lung_build, tmp_path)

    with pytest.raises(PartitionError, match=r"site 'site\d+' has \d+ rows; each site needs >= 10"):
        partition_manifest(manifest, schema, "iid", num_sites=30, max_attempts=2)
    with pytest.raises(PartitionError, match="30 sites x min_site_rows 10 = 300 rows"):
        partition_manifest(manifest, schema, "quantity", num_sites=30)
    with pytest.raises(PartitionError, match="natural sites are what they are"):
        partition_manifest(manifest, schema, "natural", min_site_rows=20)


def test_allow_single_class_keeps_the_untruncated_dirichlet_skew(wdbc_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(wdbc_build, tmp_path)

    with pytest.raises(PartitionError, match=r"failed \(no usable split in 3 attempts.*\n  - (site 'site\d'|no draw)"):
        partition_manifest(manifest, schema, "dirichlet", 4, 0, alpha=0.05, max_attempts=3)
    paths = partition_manifest(manifest, schema, "dirichlet", 4, 0, alpha=0.05, allow_single_class=True)

    train_classes = [f.loc[f["split"] == "train", "label"].nunique() for f in _sites(paths).values()]
    assert min(train_classes) == 1 and _record(manifest)["parameters"]["allow_single_class"]


@pytest.mark.parametrize(
    ("how", "options", "needle"),
    [
        ("stratified", {}, "unknown partition 'stratified'"),
        ("covariate-shift", {"shift_feature": "height"}, "needs --shift-feature, one of the clinical"),
        ("covariate-shift", {"shift_feature": "age", "shift_strictness": 2.0}, "shift_strictness must be in"),
        ("dirichlet", {"alpha": 0.0}, "alpha must be > 0"),
        ("dirichlet", {"skew_on": "label"}, "skew_on='label' does not fit a survival task"),
        ("quantity", {"size_law": "zipf"}, "size_law must be one of"),
        ("modality-missing", {}, "has only the clinical modality"),
    ],
)
def test_bad_options_are_explained(lung_build: Path, tmp_path: Path, how: str, options: dict, needle: str) -> None:
    manifest, schema = _copy(lung_build, tmp_path)

    with pytest.raises(PartitionError, match=needle):
        partition_manifest(manifest, schema, how, 3, **options)


def test_missing_modality_must_leave_some_site_with_it(wdbc_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(wdbc_build, tmp_path)

    with pytest.raises(PartitionError, match=r"missing_sites must be in \[0, 2\]"):
        partition_manifest(manifest, schema, "modality-missing", 3, missing_sites=3)
    with pytest.raises(PartitionError, match="has modalities"):
        partition_manifest(manifest, schema, "iid", 3, missing_modality="omics")


def test_repartitioning_a_folder_removes_the_old_site_files(lung_build: Path, tmp_path: Path) -> None:
    manifest, schema = _copy(lung_build, tmp_path)
    stranger = tmp_path / "site-keep.csv"
    stranger.write_text("not ours\n")

    partition_manifest(manifest, schema, "iid", 5)
    partition_manifest(manifest, schema, "iid", 3)

    assert sorted(p.name for p in tmp_path.glob("site-*.csv")) == [
        "site-keep.csv",
        "site-site1.csv",
        "site-site2.csv",
        "site-site3.csv",
    ]


def test_simulate_and_cli_pass_partition_options_through(tmp_path: Path) -> None:
    from fedfusion.cli import _partition_options, build_parser
    from fedfusion.simulations.simulate import SimulationSpec, prepare_sites

    args = build_parser().parse_args(
        ["simulate", "--dataset", "lung", "--partition", "dirichlet", "--alpha", "0.7", "--skew-on", "time"]
    )
    spec = SimulationSpec(
        dataset="lung",
        out_dir=tmp_path,
        partition=args.partition,
        num_sites=3,
        partition_options=_partition_options(args),
    )

    _, sites = prepare_sites(spec)

    assert _partition_options(args) == {"alpha": 0.7, "skew_on": "time"}
    assert list(sites) == ["site1", "site2", "site3"]
    parameters = _record(tmp_path / "data" / "manifest.csv")["parameters"]
    assert parameters["alpha"] == 0.7 and parameters["skew_on"] == "time"
