"""Fuzz / robustness suite over everything a hospital site hands to fedfusion (issue 7).

Malformed manifests, schemas, ``site.toml`` files, images and node configs, table-driven and
hypothesis-generated (derandomised, so CI sees the same cases every run). Every case must end in a
*named* error: ``fedfusion site check`` / ``fedfusion site start`` exit 2 and name the bad file (and
line / column where the manifest issue list does) without a traceback; library calls raise
ManifestError / ConfigError / ImageReadError whose message names the file. The site's privacy
ledger and audit log, present before every case, must be byte-identical after it.

Nothing really starts: ``subprocess.Popen`` and the site supervisor are patched to fail the test.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fedfusion.cli import main
from fedfusion.client import daemon
from fedfusion.client.daemon import SiteConfig
from fedfusion.client.runtime import site_from_context
from fedfusion.common.config import ClinicalColumn, ConfigError, ImageSpec, Schema, load_schema
from fedfusion.common.imaging import ImageReadError, read_image
from fedfusion.common.manifest import ManifestError, load_manifest
from tests.sitegen import OMICS, make_site

HYPO = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HYPO_EXAMPLES: dict[str, int] = {}  # per hypothesis test: max_examples (planned generated cases)
EXECUTED: dict[str, int] = {}  # category -> cases actually run in this session


def _count(category: str) -> None:
    EXECUTED[category] = EXECUTED.get(category, 0) + 1


def _hypo(name: str, n: int) -> settings:
    HYPO_EXAMPLES[name] = n
    return settings(HYPO, max_examples=n)


LEDGER_BYTES = json.dumps({"format": 1, "studies": {"s": {"entries": [
    {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8, "time": "t", "epsilon_after": 0.5,
     "delta": 1e-5, "accountant": "rdp"}]}}}).encode()
AUDIT_BYTES = b'{"v":1,"site_id":"fuzz","run_id":1,"round":1,"message_type":"train"}\n'


def _schema() -> Schema:
    return Schema(
        name="toy", task="both", classes=("benign", "malignant"),
        clinical=(ClinicalColumn("age"), ClinicalColumn("size_mm"),
                  ClinicalColumn("grade", kind="categorical", categories=("G1", "G2", "G3"))),
        omics=OMICS, image=ImageSpec(size=(32, 32), channels=1),
    )


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small valid site (10 cases with PNGs), its schema, a ledger and an audit log beside site.toml."""
    root = tmp_path_factory.mktemp("fuzz")
    manifest = make_site(root / "site", n=10)
    schema = _schema().save(root / "site" / "schema.json")
    ledger, audit = root / "site" / "privacy-ledger.json", root / "site" / "audit.jsonl"
    ledger.write_bytes(LEDGER_BYTES)
    audit.write_bytes(AUDIT_BYTES)
    return {"root": root / "site", "manifest": manifest, "schema": schema, "ledger": ledger, "audit": audit}


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a malformed site must not start processes: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(daemon, "_run_site_processes", refuse)


@pytest.fixture(autouse=True)
def state_untouched(kit: dict[str, Path]) -> Iterator[None]:
    yield
    _assert_state(kit)


def _assert_state(kit: dict[str, Path]) -> None:
    assert kit["ledger"].read_bytes() == LEDGER_BYTES, "privacy ledger changed by a failing case"
    assert kit["audit"].read_bytes() == AUDIT_BYTES, "audit log changed by a failing case"


def _good_frame(kit: dict[str, Path]) -> pd.DataFrame:
    return pd.read_csv(kit["manifest"], dtype=str, keep_default_na=False)


def _cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    done = capsys.readouterr()
    return code, done.out + done.err


def _assert_named(code: int, output: str, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"


def _check_manifest_cli(kit: dict[str, Path], capsys: pytest.CaptureFixture[str], manifest: Path,
                        *needles: str) -> str:
    code, output = _cli(capsys, ["site", "check", str(manifest), "--schema", str(kit["schema"])])
    _assert_named(code, output, manifest.name, *needles)
    _assert_state(kit)
    return output


# ------------------------------------------------------------------------------------------ manifests

Edit = Callable[[pd.DataFrame], "pd.DataFrame | bytes"]


def _set(row: int, column: str, value: str) -> Edit:
    def edit(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[row, column] = value
        return frame
    return edit


def _drop(column: str) -> Edit:
    return lambda frame: frame.drop(columns=[column])


def _dup_column(column: str) -> Edit:
    def edit(frame: pd.DataFrame) -> bytes:
        text = frame.to_csv(index=False)
        header, rest = text.split("\n", 1)
        extra = frame[column].to_csv(index=False, header=False).splitlines()
        body = "\n".join(f"{line},{value}" for line, value in zip(rest.splitlines(), extra, strict=True))
        return (header + f",{column}\n" + body + "\n").encode()
    return edit


def _raw(data: bytes) -> Edit:
    return lambda frame: data


def _text(fn: Callable[[str], str]) -> Edit:
    return lambda frame: fn(frame.to_csv(index=False)).encode()


REQUIRED = ("case_id", "label", "time", "event", "age", "size_mm", "grade", *OMICS)
# (id, edit, needles that must appear in the output besides the file name)
MANIFEST_CASES: list[tuple[str, Edit, tuple[str, ...]]] = [
    *[(f"missing-column-{c}", _drop(c), ("missing required column", c)) for c in REQUIRED],
    *[(f"duplicate-column-{c}", _dup_column(c), ("line 1", repr(c), "more than once"))
      for c in ("case_id", "label", "age", "grade", "image", "split", "gene0", "time")],
    ("duplicate-case-id", _set(4, "case_id", "P001"), ("line 6", "duplicate case_id")),
    ("duplicate-case-id-first", _set(9, "case_id", "P000"), ("line 11", "duplicate case_id")),
    ("duplicate-case-id-padded", _set(2, "case_id", " P001 "), ("line 4", "duplicate case_id")),
    ("empty-case-id", _set(3, "case_id", ""), ("line 5", "empty case_id")),
    ("blank-case-id", _set(3, "case_id", "   "), ("line 5", "empty case_id")),
    *[(f"bad-label-{i}", _set(2, "label", v), ("line 4", "'label'"))
      for i, v in enumerate(("maybe", "", "Benign", "1", "benign;malignant", "NaN"))],
    *[(f"non-numeric-age-{i}", _set(1, "age", v), ("line 3", "'age'", "not a number"))
      for i, v in enumerate(("old", "12,5", "1e", "--3", "5 5", "0x10", "1e400", "9" * 400 + "e9999"))],
    ("non-numeric-size", _set(6, "size_mm", "big"), ("line 8", "'size_mm'")),
    ("non-numeric-gene", _set(7, "gene3", "high"), ("line 9", "'gene3'")),
    *[(f"infinite-{c}-{i}", _set(5, c, v), ("line 7", repr(c), "infinite"))
      for c in ("age", "gene0", "time") for i, v in enumerate(("inf", "-inf", "Infinity"))],
    *[(f"unknown-category-{i}", _set(3, "grade", v), ("line 5", "'grade'", "unknown category"))
      for i, v in enumerate(("G9", "g1", "G 1", "4", "grade1"))],
    *[(f"missing-time-{i}", _set(4, "time", v), ("line 6", "'time'", "missing value"))
      for i, v in enumerate(("", "nan", "NA", "null"))],
    *[(f"missing-event-{i}", _set(4, "event", v), ("line 6", "'event'", "missing value"))
      for i, v in enumerate(("", "None"))],
    *[(f"non-positive-time-{i}", _set(8, "time", v), ("line 10", "'time'", "not positive"))
      for i, v in enumerate(("-1", "0", "-0.5", "-1e308"))],
    *[(f"bad-event-{i}", _set(8, "event", v), ("line 10", "'event'"))
      for i, v in enumerate(("2", "0.5", "-1", "yes"))],
    *[(f"bad-split-{i}", _set(2, "split", v), ("line 4", "'split'"))
      for i, v in enumerate(("training", "", "holdout"))],
    ("no-train-rows", lambda f: f.assign(split="test"), ("'split'", "train")),
    *[(f"image-outside-{i}", _set(3, "image", v), ("line 5", "'image'", "outside the manifest folder"))
      for i, v in enumerate(("../outside.png", "/etc/hostname", "images/../../x.png", "../site/../../x.png"))],
    *[(f"image-missing-{i}", _set(3, "image", v), ("line 5", "'image'", "not found"))
      for i, v in enumerate(("images/nope.png", "images", "case003.png"))],
    ("empty-file", _raw(b""), ("not a readable CSV",)),
    ("blank-lines-only", _raw(b"\n\n\n"), ("not a readable CSV",)),
    ("header-only", lambda f: f.iloc[:0], ("no patient rows",)),
    ("binary-garbage", _raw(bytes(range(256)) * 4), ()),
    ("utf16-bom", lambda f: f.to_csv(index=False).encode("utf-16"), ()),
    ("latin1-accents", _text(lambda t: t.replace("G2", "G\xe9")), ("'grade'",)),
    ("latin1-bytes", lambda f: f.to_csv(index=False).replace("benign", "b\xe9nign").encode("latin-1"),
     ("line 2", "'label'", "b'\\xe9'", "not UTF-8", "Save As > CSV UTF-8")),
    ("ragged-long-row", _text(lambda t: t.replace("\nP004,", "\nP004,extra,", 1)), ()),
    ("unclosed-quote", _text(lambda t: t.replace("\nP004,", '\n"P004,', 1)), ()),
    ("tab-separated", _text(lambda t: t.replace(",", "\t")), ("line 1", "looks tab-separated", "export with ','")),
    ("semicolon-separated", _text(lambda t: t.replace(",", ";")), ("line 1", "looks ';'-separated",
                                                                   "export with ','")),
    *[(f"empty-column-{c}", lambda f, c=c: f.assign(**{c: ""}), (repr(c), "no value in any of the"))
      for c in ("age", "grade", "gene2")],
    ("json-not-csv", _raw(b'{"case_id": "P000", "label": "benign"}'), ()),
    ("huge-values", lambda f: f.assign(age="1" + "0" * 5000), ("'age'",)),
]


@pytest.mark.parametrize(("edit", "needles"), [pytest.param(e, n, id=i) for i, e, n in MANIFEST_CASES])
def test_malformed_manifest_is_named_by_site_check(kit: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                   edit: Edit, needles: tuple[str, ...]) -> None:
    result = edit(_good_frame(kit))
    bad = kit["root"] / "bad-manifest.csv"
    if isinstance(result, bytes):
        bad.write_bytes(result)
    else:
        result.to_csv(bad, index=False)
    _check_manifest_cli(kit, capsys, bad, *needles)
    with pytest.raises(ManifestError, match="bad-manifest.csv"):
        load_manifest(bad, load_schema(kit["schema"]))
    _count("manifest")


MANIFEST_PATH_CASES = ["does-not-exist.csv", "images", "", "schema.json"]


@pytest.mark.parametrize("name", MANIFEST_PATH_CASES)
def test_manifest_path_that_is_not_a_csv(kit: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = kit["root"] / name if name else kit["root"]
    code, output = _cli(capsys, ["site", "check", str(path), "--schema", str(kit["schema"])])
    _assert_named(code, output, path.name)
    _count("manifest")


NUMERIC_COLUMNS = ("age", "size_mm", "time", "event", *OMICS)
_NOT_NUMBER = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
                      max_size=12).filter(lambda s: s.strip().lower() not in ("", "na", "nan", "null", "none")
                                          and "," not in s and '"' not in s and _not_float(s))


def _not_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return True
    return False


@_hypo("manifest-cells", 40)
@given(row=st.integers(0, 9), column=st.sampled_from(NUMERIC_COLUMNS), value=_NOT_NUMBER)
def test_generated_non_numeric_cells_are_named_with_line_and_column(
        kit: dict[str, Path], capsys: pytest.CaptureFixture[str], row: int, column: str, value: str) -> None:
    frame = _good_frame(kit)
    frame.loc[row, column] = value
    bad = kit["root"] / "gen-manifest.csv"
    frame.to_csv(bad, index=False)
    _check_manifest_cli(kit, capsys, bad, f"line {row + 2}", repr(column))
    _count("manifest")


@_hypo("manifest-bytes", 25)
@given(data=st.binary(max_size=400))
def test_generated_garbage_manifests_raise_manifest_error(kit: dict[str, Path], data: bytes) -> None:
    bad = kit["root"] / "garbage.csv"
    bad.write_bytes(data)
    with pytest.raises(ManifestError, match="garbage.csv"):
        load_manifest(bad, load_schema(kit["schema"]), check_images=False)
    _count("manifest")


@_hypo("manifest-duplicates", 20)
@given(rows=st.lists(st.integers(0, 9), min_size=2, max_size=5, unique=True))
def test_generated_duplicate_case_ids_name_every_duplicate_line(
        kit: dict[str, Path], capsys: pytest.CaptureFixture[str], rows: list[int]) -> None:
    frame = _good_frame(kit)
    frame.loc[rows, "case_id"] = "DUP"
    bad = kit["root"] / "dups.csv"
    frame.to_csv(bad, index=False)
    later = sorted(rows)[1:]
    _check_manifest_cli(kit, capsys, bad, "duplicate case_id", *(f"line {r + 2}" for r in later))
    _count("manifest")


# ------------------------------------------------------------------------------------------ images


def _png_bytes(shape: tuple[int, ...] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(shape, 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


_DICOM_HEAD = b"\x00" * 128 + b"DICM"
READABLE_BUT_TOO_SMALL = ("png-1-pixel", "png-one-row")  # read_image works; site check refuses the shape
IMAGE_CASES: list[tuple[str, str, bytes]] = [
    ("zero-byte-png", "x.png", b""),
    ("truncated-png", "x.png", _png_bytes()[:60]),
    ("truncated-png-header", "x.png", _png_bytes()[:8]),
    ("text-named-png", "x.png", b"this is a radiology report, not an image\n"),
    ("random-png", "x.png", bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))),
    ("png-1-pixel", "x.png", _png_bytes((1, 1))),
    ("png-one-row", "x.png", _png_bytes((1, 40))),
    ("jpeg-garbage", "x.jpg", b"\xff\xd8\xff\xe0garbage"),
    ("tiff-garbage", "x.tif", b"II*\x00garbage"),
    ("bmp-text", "x.bmp", b"BM not really"),
    ("zero-byte-dcm", "x.dcm", b""),
    ("dcm-marker-then-garbage", "x.dcm", _DICOM_HEAD + b"\x02\x00garbage" * 10),
    ("dcm-text", "x.dcm", b"not dicom at all"),
    ("dcm-no-suffix-marker", "IM000001", _DICOM_HEAD + b"\xff" * 40),
    ("nii-garbage", "x.nii", b"garbage" * 60),
    ("nii-zero-byte", "x.nii", b""),
    ("niigz-not-gzip", "x.nii.gz", b"not gzip"),
    ("niigz-gzip-of-garbage", "x.nii.gz", gzip.compress(b"garbage" * 60)),
    ("npy-zero-byte", "x.npy", b""),
    ("npy-garbage", "x.npy", b"\x93NUMPY garbage"),
    ("npy-truncated", "x.npy", _npy_bytes(np.zeros((32, 32), np.float32))[:100]),
    ("npy-object-dtype", "x.npy", _npy_bytes(np.array([{"a": 1}, None], dtype=object))),
    ("npy-complex", "x.npy", _npy_bytes(np.zeros((8, 8), np.complex64))),
    ("npy-empty", "x.npy", _npy_bytes(np.zeros((0, 8), np.float32))),
    ("npy-1d", "x.npy", _npy_bytes(np.zeros(64, np.float32))),
    ("npy-4d", "x.npy", _npy_bytes(np.zeros((2, 2, 8, 8), np.float32))),
    ("npy-strings", "x.npy", _npy_bytes(np.array([["a", "b"], ["c", "d"]]))),
    ("unsupported-gif", "x.gif", b"GIF89a"),
    ("unsupported-txt", "x.txt", b"hello"),
    ("no-suffix-no-marker", "IMAGE", b"\x00" * 200),
]


@pytest.mark.parametrize(("case_id", "name", "data"), [pytest.param(i, n, d, id=i) for i, n, d in IMAGE_CASES])
def test_malformed_image_is_named_by_site_check(kit: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                case_id: str, name: str, data: bytes) -> None:
    image = kit["root"] / "images" / "bad" / name
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(data)
    frame = _good_frame(kit)
    frame.loc[6, "image"] = f"images/bad/{name}"
    bad = kit["root"] / "image-manifest.csv"
    frame.to_csv(bad, index=False)
    _check_manifest_cli(kit, capsys, bad, "line 8", "'image'", name)
    if case_id in READABLE_BUT_TOO_SMALL:
        assert min(read_image(image).shape) < 2
    else:
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
            read_image(image)
    image.unlink()
    _count("image")


@_hypo("image-bytes", 30)
@given(suffix=st.sampled_from([".png", ".jpg", ".tif", ".dcm", ".nii", ".nii.gz", ".npy"]),
       data=st.binary(max_size=300))
def test_generated_garbage_images_raise_image_read_error(kit: dict[str, Path], suffix: str, data: bytes) -> None:
    image = kit["root"] / "images" / f"fuzz{suffix}"
    image.write_bytes(data)
    with pytest.raises(ImageReadError, match="fuzz"):
        read_image(image)
    _count("image")


# ------------------------------------------------------------------------------------------ schemas

_GOOD_SCHEMA = _schema().to_dict()


def _schema_with(**changes: object) -> bytes:
    raw = {**_GOOD_SCHEMA, **changes}
    return json.dumps({k: v for k, v in raw.items() if v is not _DROP}).encode()


_DROP = object()
SCHEMA_CASES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("whitespace", b"  \n"),
    ("open-brace", b"{"),
    ("trailing-comma", b'{"name": "x", "task": "survival",}'),
    ("single-quotes", b"{'name': 'x'}"),
    ("list", b"[1, 2]"),
    ("null", b"null"),
    ("number", b"42"),
    ("string", b'"schema"'),
    ("binary-garbage", bytes(range(256))),
    ("utf16", json.dumps(_GOOD_SCHEMA).encode("utf-16")),
    ("latin1", _schema_with(description="cafe").replace(b'"cafe"', b'"caf\xe9"')),
    ("nan-size", _schema_with(image={"size": [float("nan"), 32]})),
    ("unknown-key", _schema_with(labels=["a", "b"])),
    ("missing-name", _schema_with(name=_DROP)),
    ("missing-task", _schema_with(task=_DROP)),
    ("unknown-task", _schema_with(task="regression")),
    ("task-number", _schema_with(task=5)),
    ("task-list", _schema_with(task=["classification"])),
    ("empty-classes", _schema_with(classes=[])),
    ("one-class", _schema_with(classes=["benign"])),
    ("classes-string", _schema_with(classes="benign")),
    ("classes-number", _schema_with(classes=2)),
    ("duplicate-classes", _schema_with(classes=["benign", "benign"])),
    ("duplicate-clinical", _schema_with(clinical=[{"name": "age"}, {"name": "age"}])),
    ("duplicate-omics", _schema_with(omics=["gene0", "gene0"])),
    ("omics-clinical-overlap", _schema_with(omics=["age"])),
    ("clinical-string", _schema_with(clinical="age")),
    ("clinical-numbers", _schema_with(clinical=[5])),
    ("clinical-no-name", _schema_with(clinical=[{"kind": "numeric"}])),
    ("clinical-bad-kind", _schema_with(clinical=[{"name": "age", "kind": "text"}])),
    ("categorical-no-categories", _schema_with(clinical=[{"name": "grade", "kind": "categorical"}])),
    ("categories-number", _schema_with(clinical=[{"name": "grade", "kind": "categorical", "categories": 3}])),
    ("omics-string", _schema_with(omics="gene0")),
    ("omics-number", _schema_with(omics=7)),
    ("image-string", _schema_with(image="yes")),
    ("image-list", _schema_with(image=[32, 32])),
    ("image-size-3", _schema_with(image={"size": [1, 2, 3]})),
    ("image-size-text", _schema_with(image={"size": "ab"})),
    ("image-size-zero", _schema_with(image={"size": [0, 32]})),
    ("image-size-negative", _schema_with(image={"size": [-4, 32]})),
    ("image-channels-2", _schema_with(image={"channels": 2})),
    ("image-channels-text", _schema_with(image={"channels": "grey"})),
    ("image-depth-negative", _schema_with(image={"depth": -1})),
    ("no-modalities", _schema_with(clinical=[], omics=[], image=None)),
]


@pytest.mark.parametrize("data", [pytest.param(d, id=i) for i, d in SCHEMA_CASES])
def test_malformed_schema_is_named(kit: dict[str, Path], capsys: pytest.CaptureFixture[str], data: bytes) -> None:
    bad = kit["root"] / "bad-schema.json"
    bad.write_bytes(data)
    with pytest.raises(ConfigError, match="bad-schema.json"):
        load_schema(bad)
    code, output = _cli(capsys, ["site", "check", str(kit["manifest"]), "--schema", str(bad)])
    _assert_named(code, output, "schema error", "bad-schema.json")
    _count("schema")


@_hypo("schema-bytes", 25)
@given(data=st.binary(max_size=200))
def test_generated_garbage_schemas_raise_config_error(kit: dict[str, Path], data: bytes) -> None:
    bad = kit["root"] / "gen-schema.json"
    bad.write_bytes(data)
    with pytest.raises(ConfigError, match="gen-schema.json"):
        load_schema(bad)
    _count("schema")


_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)


@_hypo("schema-fields", 30)
@given(key=st.sampled_from(["task", "classes", "clinical", "omics", "image"]), value=_JSON_VALUES)
def test_generated_wrong_typed_schema_fields_raise_config_error(kit: dict[str, Path], key: str,
                                                                value: object) -> None:
    bad = kit["root"] / "typed-schema.json"
    bad.write_bytes(_schema_with(**{key: value}))
    try:
        load_schema(bad)
    except ConfigError as err:
        assert "typed-schema.json" in str(err)
    # a generated value may happen to be valid (e.g. image = {}); what must never happen is another exception
    _count("schema")


# ------------------------------------------------------------------------------------------ site.toml


def _toml(kit: dict[str, Path], *, site: str | None = None, coordinator: str | None = None,
          extra: str = "") -> str:
    site = site if site is not None else (f'id = "fuzz"\nmanifest = "{kit["manifest"].name}"\n'
                                         f'schema = "{kit["schema"].name}"')
    coordinator = coordinator if coordinator is not None else 'address = "127.0.0.1:9092"\ninsecure = true'
    return f"[site]\n{site}\n\n[coordinator]\n{coordinator}\n\n{textwrap.dedent(extra)}"


_OK_SITE = 'id = "fuzz"\nmanifest = "manifest.csv"\nschema = "schema.json"'
SITE_TOML_CASES: list[tuple[str, Callable[[dict[str, Path]], str]]] = [
    ("empty", lambda k: ""),
    ("bad-toml", lambda k: "[site\nid = fuzz"),
    ("unclosed-string", lambda k: '[site]\nid = "fuzz'),
    ("duplicate-key", lambda k: _toml(k, site=_OK_SITE + '\nid = "again"')),
    ("binary-garbage", lambda k: bytes(range(1, 256)).decode("latin-1")),
    ("missing-site", lambda k: '[coordinator]\naddress = "x:1"\ninsecure = true\n'),
    ("missing-id", lambda k: _toml(k, site='manifest = "manifest.csv"\nschema = "schema.json"')),
    ("missing-manifest", lambda k: _toml(k, site='id = "a"\nschema = "schema.json"')),
    ("missing-schema", lambda k: _toml(k, site='id = "a"\nmanifest = "manifest.csv"')),
    ("missing-address", lambda k: _toml(k, coordinator="insecure = true")),
    ("no-tls-no-insecure", lambda k: _toml(k, coordinator='address = "x:1"')),
    ("site-not-table", lambda k: 'site = 3\n[coordinator]\naddress = "x:1"\ninsecure = true\n'),
    ("coordinator-not-table", lambda k: f'coordinator = "x:1"\n[site]\n{_OK_SITE}\n'),
    ("supernode-not-table", lambda k: _toml(k).replace("[site]", "supernode = 5\n[site]")),
    ("manifest-number", lambda k: _toml(k, site='id = "a"\nmanifest = 3\nschema = "schema.json"')),
    ("schema-list", lambda k: _toml(k, site='id = "a"\nmanifest = "manifest.csv"\nschema = ["schema.json"]')),
    ("insecure-string", lambda k: _toml(k, coordinator='address = "x:1"\ninsecure = "false"')),
    ("insecure-number", lambda k: _toml(k, coordinator='address = "x:1"\ninsecure = 1')),
    ("root-cert-number", lambda k: _toml(k, coordinator='address = "x:1"\nroot-certificates = 5')),
    ("require-secagg-string", lambda k: _toml(k, site=_OK_SITE + '\nrequire-secure-aggregation = "no"')),
    *[(f"port-{i}", lambda k, v=v: _toml(k, extra=f"[supernode]\nport = {v}\n"))
      for i, v in enumerate(('"abc"', "true", "1.5", "-1", "0", "70000", "[9094]", "{}"))],
    *[(f"poll-interval-{i}", lambda k, v=v: _toml(k, extra=f"[supernode]\npoll-interval = {v}\n"))
      for i, v in enumerate(('"fast"', "0", "-1", "1000", "nan", "inf", "true", "[1]"))],
    *[(f"max-restarts-{i}", lambda k, v=v: _toml(k, extra=f"[supernode]\nmax-restarts = {v}\n"))
      for i, v in enumerate(("-1", "1.5", '"10"', "true", "[]"))],
    ("warm-string", lambda k: _toml(k, extra='[supernode]\nwarm = "no"\n')),
    *[(f"privacy-{i}", lambda k, v=v: _toml(k, extra=f"[privacy]\n{v}\n"))
      for i, v in enumerate(("delta = 1e-5", 'max-epsilon = "lots"', "max-epsilon = -1", "max-epsilon = nan",
                             "max-epsilon = 3\ndelta = 2", 'max-epsilon = 3\naccountant = "magic"',
                             "max-epsilon = 3\nmax-grad-norm = 0", "max-epsilon = 3\nbudget = 1",
                             "max-epsilon = 3\nmin-noise-multiplier = -0.1", "max-epsilon = true",
                             "max-epsilon = [3]", "max-epsilon = 3\nledger = 5"))],
    ("privacy-not-table", lambda k: _toml(k).replace("[site]", "privacy = 3\n[site]")),
    *[(f"approval-{i}", lambda k, v=v: _toml(k, extra=f"[approval]\n{v}\n"))
      for i, v in enumerate(('apps = "abc"', 'apps = ["not-a-hash"]', "apps = [1, 2]", "apps = 5", "other = 1"))],
    ("approval-not-table", lambda k: _toml(k).replace("[site]", "approval = [1]\n[site]")),
    ("approval-cold", lambda k: _toml(k, extra="[supernode]\nwarm = false\n[approval]\napps = []\n")),
    *[(f"auth-{i}", lambda k, v=v: _toml(k, coordinator='address = "x:1"\nroot-certificates = "ca.pem"',
                                         extra=f"[auth]\n{v}\n"))
      for i, v in enumerate(("public-key = \"site.pub\"", "private-key = 5", 'private-key = "missing.key"',
                             'private-key = "manifest.csv"', 'private-key = "schema.json"\npublic-key = 3'))],
    ("auth-with-insecure", lambda k: _toml(k, extra='[auth]\nprivate-key = "site.key"\n')),
    ("auth-not-table", lambda k: _toml(k).replace("[site]", "auth = \"site.key\"\n[site]")),
    ("manifest-missing-file", lambda k: _toml(k, site='id = "a"\nmanifest = "nope.csv"\nschema = "schema.json"')),
    ("schema-missing-file", lambda k: _toml(k, site='id = "a"\nmanifest = "manifest.csv"\nschema = "nope.json"')),
    ("manifest-is-folder", lambda k: _toml(k, site='id = "a"\nmanifest = "images"\nschema = "schema.json"')),
]
_SITE_TOML_NEEDLE = {"manifest-missing-file": "nope.csv", "schema-missing-file": "nope.json",
                     "manifest-is-folder": "images"}


@pytest.mark.parametrize(("case_id", "make"), [pytest.param(i, m, id=i) for i, m in SITE_TOML_CASES])
def test_malformed_site_toml_is_named_by_site_start(kit: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                    case_id: str, make: Callable[[dict[str, Path]], str]) -> None:
    config = kit["root"] / "site.toml"
    config.write_text(make(kit), encoding="latin-1" if case_id == "binary-garbage" else "utf-8")
    code, output = _cli(capsys, ["site", "start", str(config)])
    _assert_named(code, output, _SITE_TOML_NEEDLE.get(case_id, "site.toml"))
    if case_id not in _SITE_TOML_NEEDLE and "auth" not in case_id:
        with pytest.raises(ConfigError, match="site.toml"):
            SiteConfig.load(config)
    _count("site.toml")


@pytest.mark.parametrize(("edit", "needles"), [pytest.param(e, n, id=i) for i, e, n in MANIFEST_CASES[::6]])
def test_site_start_refuses_a_malformed_manifest(kit: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                 edit: Edit, needles: tuple[str, ...]) -> None:
    result = edit(_good_frame(kit))
    bad = kit["root"] / "start-manifest.csv"
    if isinstance(result, bytes):
        bad.write_bytes(result)
    else:
        result.to_csv(bad, index=False)
    config = kit["root"] / "site.toml"
    config.write_text(_toml(kit, site='id = "a"\nmanifest = "start-manifest.csv"\nschema = "schema.json"',
                            extra="[privacy]\nmax-epsilon = 3.0\n"))
    code, output = _cli(capsys, ["site", "start", str(config)])
    _assert_named(code, output, "start-manifest.csv", "not starting", *needles)
    _count("site.toml")


_NOT_PORT = (st.text(max_size=8).filter(lambda s: not s.strip().isdigit()) | st.booleans()
             | st.integers(max_value=0) | st.integers(min_value=65536)
             | st.floats().filter(lambda f: not np.isfinite(f) or f != int(f)))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else
                                             "-inf" if value == float("-inf") else repr(value))
    return json.dumps(value, ensure_ascii=False)


@_hypo("site-toml-supernode", 40)
@given(key=st.sampled_from(["port", "poll-interval", "max-restarts", "warm"]), value=_NOT_PORT)
def test_generated_wrong_supernode_values_are_config_errors(
        kit: dict[str, Path], capsys: pytest.CaptureFixture[str], key: str, value: object) -> None:
    if key == "poll-interval" and isinstance(value, float) and 0.01 <= value <= 60:
        value = -value
    if key == "max-restarts" and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = -1 - value
    if key == "warm" and isinstance(value, bool):
        value = str(value)
    config = kit["root"] / "site.toml"
    config.write_text(_toml(kit, extra=f"[supernode]\n{key} = {_toml_value(value)}\n"))
    with pytest.raises(ConfigError, match="site.toml"):
        SiteConfig.load(config)
    code, output = _cli(capsys, ["site", "start", str(config)])
    _assert_named(code, output, "site.toml", key)
    _count("site.toml")


@_hypo("site-toml-bytes", 20)
@given(data=st.binary(max_size=200))
def test_generated_garbage_site_toml_is_a_config_error(kit: dict[str, Path], data: bytes) -> None:
    config = kit["root"] / "site.toml"
    config.write_bytes(data)
    with pytest.raises(ConfigError, match="site.toml"):
        SiteConfig.load(config)
    _count("site.toml")


# ------------------------------------------------------------------------------------------ node config

NODE_CONFIG_CASES: list[tuple[str, Callable[[dict[str, Path]], tuple[dict, dict]]]] = [
    ("empty", lambda k: ({}, {})),
    ("manifest-no-schema", lambda k: ({"manifest": str(k["manifest"])}, {})),
    ("manifest-empty-schema", lambda k: ({"manifest": str(k["manifest"]), "schema": ""}, {})),
    ("schema-missing-file", lambda k: ({"manifest": str(k["manifest"]), "schema": str(k["root"] / "no.json")}, {})),
    ("manifest-missing-file", lambda k: ({"manifest": str(k["root"] / "no.csv"), "schema": str(k["schema"])}, {})),
    ("manifest-number", lambda k: ({"manifest": 3, "schema": str(k["schema"])}, {})),
    ("manifest-empty", lambda k: ({"manifest": "", "schema": str(k["schema"])}, {})),
    ("schema-is-manifest", lambda k: ({"manifest": str(k["manifest"]), "schema": str(k["manifest"])}, {})),
    ("manifest-is-schema", lambda k: ({"manifest": str(k["schema"]), "schema": str(k["schema"])}, {})),
    ("partition-no-sites", lambda k: ({"partition-id": 0}, {"schema": str(k["schema"]), "data-dir": str(k["root"])})),
    ("partition-out-of-range", lambda k: ({"partition-id": 5}, {"sites": "a,b", "schema": str(k["schema"]),
                                                                "data-dir": str(k["root"])})),
    ("partition-negative", lambda k: ({"partition-id": -1}, {"sites": "a,b", "schema": str(k["schema"]),
                                                             "data-dir": str(k["root"])})),
    ("partition-text", lambda k: ({"partition-id": "first"}, {"sites": "a", "schema": str(k["schema"]),
                                                               "data-dir": str(k["root"])})),
    ("partition-float", lambda k: ({"partition-id": 0.5}, {"sites": "a", "schema": str(k["schema"]),
                                                            "data-dir": str(k["root"])})),
    ("partition-no-data-dir", lambda k: ({"partition-id": 0}, {"sites": "a", "schema": str(k["schema"])})),
    ("partition-no-schema", lambda k: ({"partition-id": 0}, {"sites": "a", "data-dir": str(k["root"])})),
    ("partition-missing-site-file", lambda k: ({"partition-id": 0}, {"sites": "zz", "schema": str(k["schema"]),
                                                                     "data-dir": str(k["root"])})),
]
_NODE_NEEDLE = {"empty": "node-config", "manifest-no-schema": "schema", "manifest-empty-schema": "schema",
                "schema-missing-file": "no.json", "manifest-missing-file": "no.csv", "manifest-number": "manifest",
                "manifest-empty": "manifest", "schema-is-manifest": "manifest.csv",
                "manifest-is-schema": "schema.json", "partition-missing-site-file": "site-zz.csv"}


@pytest.mark.parametrize(("case_id", "make"), [pytest.param(i, m, id=i) for i, m in NODE_CONFIG_CASES])
def test_malformed_node_config_is_a_named_error(kit: dict[str, Path], case_id: str,
                                                make: Callable[[dict[str, Path]], tuple[dict, dict]]) -> None:
    node_config, run_config = make(kit)
    with pytest.raises((ConfigError, ManifestError)) as caught:
        site_from_context(node_config, run_config)
    message = str(caught.value)
    assert "Traceback" not in message
    assert _NODE_NEEDLE.get(case_id, "partition") in message, message
    _count("node config")


# ------------------------------------------------------------------------------------------ totals

TABLE_CASES = {
    "manifest": len(MANIFEST_CASES) + len(MANIFEST_PATH_CASES),
    "image": len(IMAGE_CASES),
    "schema": len(SCHEMA_CASES),
    "site.toml": len(SITE_TOML_CASES) + len(MANIFEST_CASES[::6]),
    "node config": len(NODE_CONFIG_CASES),
}


def test_the_suite_has_at_least_200_malformed_cases() -> None:
    tables = sum(TABLE_CASES.values())
    generated = sum(HYPO_EXAMPLES.values())
    assert tables >= 200, TABLE_CASES
    assert tables + generated >= 300, (TABLE_CASES, HYPO_EXAMPLES)
    if len(EXECUTED) == len(TABLE_CASES):  # the whole module ran before this test (file order)
        assert sum(EXECUTED.values()) >= 200, EXECUTED
