"""Code approval: only allow-listed FAB hashes load, the check runs outside the FAB, hashes are Flower's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedfusion.client.approval import (
    AppNotApproved,
    check_approved,
    fab_hash,
    install_approval_check,
    normalise_hashes,
)
from fedfusion.client.daemon import SiteConfig, warm_superexec_command
from fedfusion.common.config import ConfigError

GOOD = "a" * 64
REPO = Path(__file__).resolve().parents[3]


def _project(root: Path, package: str, body: str, version: str = "1.0.0") -> Path:
    """A minimal Flower app project whose ClientApp module runs ``body`` on import."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        f'[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        f'[project]\nname = "demo"\nversion = "{version}"\ndependencies = []\n'
        f'[tool.flwr.app]\npublisher = "hosp"\n'
        f'[tool.flwr.app.components]\nserverapp = "{package}.app:server"\nclientapp = "{package}.app:app"\n'
        f'[tool.flwr.app.config]\nx = 1\n')
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    (root / package / "app.py").write_text(f"{body}\nfrom flwr.clientapp import ClientApp\napp = ClientApp()\n")
    return root


def _build(project: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(project)


@pytest.fixture()
def flower_task(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run Flower's install-then-load steps exactly as ``run_clientapp`` does, in a private FLWR_HOME."""
    import sys

    import flwr.supernode.runtime.run_clientapp as flower_module

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    for name in ("install_from_fab", "get_load_client_app_fn"):  # restored after the test
        monkeypatch.setattr(flower_module, name, getattr(flower_module, name))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)
    before = set(sys.modules)
    yield flower_module

    for name in set(sys.modules) - before:
        if name.startswith(("goodpkg", "evilpkg", "twinpkg")):
            del sys.modules[name]


def _run_task(flower_module, content: bytes, fab_id: str, version: str, claimed: str) -> object:
    """The two lines of Flower's ``run_clientapp`` that install and load a FAB (same names, same calls)."""
    flower_module.install_from_fab(content, skip_prompt=True)
    load = flower_module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    return load(fab_id, version, claimed)


def test_approved_bundle_loads_from_its_full_hash_folder(flower_task, tmp_path: Path) -> None:
    from flwr.clientapp import ClientApp

    marker = tmp_path / "good-imported"
    good = _build(_project(tmp_path / "good", "goodpkg", f"open({str(marker)!r}, 'w').write('ok')"))
    digest = hashlib.sha256(good).hexdigest()
    install_approval_check(frozenset({digest}))
    app = _run_task(flower_task, good, "hosp/demo", "1.0.0", digest)
    assert isinstance(app, ClientApp) and marker.read_text() == "ok"
    home = tmp_path / "flwr-home"
    assert (home / "fedfusion-approved" / digest / "goodpkg" / "app.py").is_file()
    assert not (home / "apps").exists()  # Flower's 8-hex folder is never written nor read


def test_short_hash_collision_folder_is_never_imported(flower_task, tmp_path: Path) -> None:
    """The attack: an earlier, unapproved bundle whose SHA-256 shares the approved one's first 8 hex digits
    (~2^32 hashes to find) left Flower's folder ``apps/hosp.demo.1.0.0.<8 hex>``; Flower skips installing
    over an existing folder and imports from it. Here that folder is pre-placed with the same fab id/version."""
    pwned = tmp_path / "pwned"
    good = _build(_project(tmp_path / "good", "goodpkg", ""))
    evil_project = _project(tmp_path / "evil", "goodpkg", f"open({str(pwned)!r}, 'w').write('x')")
    digest = hashlib.sha256(good).hexdigest()
    import shutil

    from fedfusion.client.flower_runtime import flower_app_folder

    squatted = flower_app_folder("hosp/demo", "1.0.0", digest)
    shutil.copytree(evil_project, squatted)
    install_approval_check(frozenset({digest}))
    _run_task(flower_task, good, "hosp/demo", "1.0.0", digest)
    assert not pwned.exists()  # the squatted folder's code never ran
    import sys

    assert Path(sys.modules["goodpkg.app"].__file__).parent.parent.name == digest


def test_unapproved_bundle_claiming_an_approved_hash_is_not_unpacked(flower_task, tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import ErrorCode

    from fedfusion.client.audit import iter_records
    from fedfusion.common.flower_adapter import message_identity

    pwned = tmp_path / "pwned"
    good = _build(_project(tmp_path / "good", "goodpkg", ""))
    evil = _build(_project(tmp_path / "evil", "evilpkg", f"open({str(pwned)!r}, 'w').write('x')"))
    digest, evil_digest = hashlib.sha256(good).hexdigest(), hashlib.sha256(evil).hexdigest()
    refused: list[tuple[str, str]] = []
    install_approval_check(frozenset({digest}), on_refusal=lambda d, why: refused.append((d, why)))
    app = _run_task(flower_task, evil, "hosp/demo", "1.0.0", digest)  # the coordinator lies about the hash
    assert not pwned.exists() and refused[0][0] == evil_digest
    home = tmp_path / "flwr-home"
    assert not home.exists() or not any(p.name == "app.py" for p in home.rglob("*"))  # nothing unpacked

    # The stand-in answers with the approval reason, and the reply is in the audit log first.
    log = tmp_path / "audit.jsonl"
    with message_identity(task_id=1, run_id=3, node_id=8):  # as Flower's runtime sets it for run 3 on node 8
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=8, message_type="train")
        reply = app(message=msg, context=Context(run_id=3, node_id=8,
                                                 node_config={"audit-log": str(log), "site-id": "A"},
                                                 state=RecordDict(), run_config={}))
    assert reply.has_error() and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert reply.error.reason.startswith(f"refused: this site has not approved app bundle sha256={evil_digest}")
    (record,) = list(iter_records(log))
    assert record["metrics"] == {"error": reply.error.reason}


def test_tampered_unpacked_bundle_is_refused(flower_task, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    good = _build(_project(tmp_path / "good", "twinpkg", ""))
    digest = hashlib.sha256(good).hexdigest()
    folder = tmp_path / "flwr-home" / "fedfusion-approved" / digest
    refused: list[str] = []
    install_approval_check(frozenset({digest}), on_refusal=lambda d, why: refused.append(why))
    _run_task(flower_task, good, "hosp/demo", "1.0.0", digest)  # unpacks (and imports) the approved bundle
    import sys

    del sys.modules["twinpkg.app"], sys.modules["twinpkg"]
    (folder / "twinpkg" / "extra.py").write_text("")
    (folder / "twinpkg" / "app.py").write_text(f"open({str(pwned)!r}, 'w').write('x')\n")
    install_approval_check(frozenset({digest}), on_refusal=lambda d, why: refused.append(why))
    app = _run_task(flower_task, good, "hosp/demo", "1.0.0", digest)
    from flwr.clientapp import ClientApp

    assert not pwned.exists() and not isinstance(app, ClientApp)
    assert "extra: ['twinpkg/extra.py']" in refused[0] and "changed: ['twinpkg/app.py']" in refused[0]


def test_run_naming_another_version_than_the_bundle_is_refused(flower_task, tmp_path: Path) -> None:
    good = _build(_project(tmp_path / "good", "goodpkg", ""))
    digest = hashlib.sha256(good).hexdigest()
    refused: list[str] = []
    install_approval_check(frozenset({digest}), on_refusal=lambda d, why: refused.append(why))
    _run_task(flower_task, good, "hosp/demo", "2.0.0", digest)
    assert refused and "the run names app hosp/demo 2.0.0" in refused[0]
    import sys

    assert "goodpkg.app" not in sys.modules


def test_empty_allow_list_approves_nothing() -> None:
    with pytest.raises(AppNotApproved):
        check_approved(GOOD, frozenset())


def test_hashes_must_be_sha256_hex() -> None:
    assert normalise_hashes([GOOD.upper()], "x") == frozenset({GOOD})
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        normalise_hashes(["deadbeef"], "site.toml [approval] apps")


def test_fab_hash_is_flowers_deterministic_bundle_hash() -> None:
    from flwr.cli.build import build_fab_from_disk

    assert fab_hash(REPO) == hashlib.sha256(build_fab_from_disk(REPO)).hexdigest() == fab_hash(REPO)


def _site_toml(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text('[site]\nid = "A"\nmanifest = "m.csv"\nschema = "s.json"\n[coordinator]\naddress = "c:1"\n'
                    "insecure = true\n" + extra)
    return path


def test_site_toml_approval_reaches_the_warm_superexec(tmp_path: Path) -> None:
    cfg = SiteConfig.load(_site_toml(tmp_path, f'[approval]\napps = ["{GOOD.upper()}"]\n'))
    assert cfg.approved_apps == frozenset({GOOD})
    cmd = warm_superexec_command(cfg, 1)
    assert cmd[cmd.index("--approved-apps") + 1] == GOOD
    empty = SiteConfig.load(_site_toml(tmp_path, "[approval]\napps = []\n"))
    cmd = warm_superexec_command(empty, 1)
    assert cmd[cmd.index("--approved-apps") + 1] == ""
    assert "--approved-apps" not in warm_superexec_command(SiteConfig.load(_site_toml(tmp_path, "")), 1)


@pytest.mark.parametrize(("extra", "needle"), [
    ('[approval]\napps = "x"\n', "must be a list"),
    ('[approval]\napps = ["x"]\n', "not a SHA-256 hex digest"),
    (f'[supernode]\nwarm = false\n[approval]\napps = ["{GOOD}"]\n', "needs [supernode] warm = true"),
])
def test_bad_approval_settings_are_named(tmp_path: Path, extra: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        SiteConfig.load(_site_toml(tmp_path, extra))
