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


def test_unapproved_bundle_is_refused_before_flower_loads_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import flwr.supernode.runtime.run_clientapp as flower_module
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    from fedfusion.client.audit import iter_records
    from fedfusion.common.reply_digest import reply_sha256

    loaded: list[str] = []
    monkeypatch.setattr(flower_module, "get_load_client_app_fn",
                        lambda *a, **k: (lambda fab_id, version, digest: loaded.append(digest) or "app"))
    refused: list[str] = []
    install_approval_check(frozenset({GOOD}), on_refusal=refused.append)
    load = flower_module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert load("fedfusion/fedfusion", "0.1.0", GOOD) == "app"
    app = load("fedfusion/fedfusion", "0.1.0", "b" * 64)
    assert loaded == [GOOD] and refused == ["b" * 64]  # nothing was loaded from the unapproved bundle

    # The stand-in answers with the approval reason, and the reply is in the audit log first.
    for attr, value in (("_task_id", 1), ("_run_id", 3), ("_node_id", 8)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    log = tmp_path / "audit.jsonl"
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=8, message_type="train")
    reply = app(message=msg, context=Context(run_id=3, node_id=8, node_config={"audit-log": str(log), "site-id": "A"},
                                             state=RecordDict(), run_config={}))
    assert reply.has_error() and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert reply.error.reason.startswith("refused: this site has not approved app bundle sha256=" + "b" * 64)
    (record,) = list(iter_records(log))
    assert record["metrics"] == {"error": reply.error.reason} and record["sha256"] == reply_sha256(reply)


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
