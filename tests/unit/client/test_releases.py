"""A coordinator that crashes after the sites released round k but before checkpointing it, then
resumes, asks for round k again: the sites re-send the same release and spend no ε twice. Any other
request (round, model, settings, site, study) is not answered from the kept release."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedfusion.client.releases import AnswerBook, ReleaseStore, answer_key, request_key
from fedfusion.common.reply_digest import payload_sha256, reply_payload


def _content(value: float) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"w": Array(np.full((2, 3), value, dtype=np.float32))}),
                       "metrics": MetricRecord({"num-examples": 12, "epsilon": 0.5}),
                       "site": ConfigRecord({"site-id": "A"})})


def test_a_release_is_kept_per_site_and_study_and_found_only_for_the_same_request(tmp_path: Path) -> None:
    store = ReleaseStore.beside_ledger(tmp_path / "privacy-ledger.json")
    model = {"w": np.zeros((2, 3), dtype=np.float32)}
    key = request_key("A", "study", 2, "cfg1", model, {"server-round": 2})
    store.put("A", "study", key, _content(0.25))
    assert store.folder == tmp_path / "privacy-ledger-releases"

    class _Reply:  # reply_payload reads a Message's content; a RecordDict stands in for it here
        def __init__(self, content: RecordDict) -> None:
            self.content = content

        def has_content(self) -> bool:
            return True

    again = store.get("A", "study", key)
    assert again is not None
    assert payload_sha256(*reply_payload(_Reply(again))) == payload_sha256(*reply_payload(_Reply(_content(0.25))))
    other_round = request_key("A", "study", 3, "cfg1", model, {"server-round": 3})
    other_model = request_key("A", "study", 2, "cfg1", {"w": model["w"] + 1e-7}, {"server-round": 2})
    other_config = request_key("A", "study", 2, "cfg2", model, {"server-round": 2})
    assert len({key, other_round, other_model, other_config}) == 4
    assert store.get("A", "study", other_model) is None and store.get("A", "study", other_config) is None
    assert store.get("B", "study", key) is None and store.get("A", "other-study", key) is None
    store.put("A", "study", other_round, _content(0.5))  # only the newest release of a study is kept
    assert store.get("A", "study", key) is None and store.get("A", "study", other_round) is not None
    # A damaged file is no release (the round trains again: over-counting ε is safe, blocking is not).
    next(store.folder.glob("*.npz")).write_bytes(b"not a zip file")
    assert store.get("A", "study", other_round) is None


def test_releases_are_kept_in_our_own_format_and_come_back_identical(tmp_path: Path) -> None:
    from fedfusion.client.releases import RELEASE_FORMAT

    content = RecordDict({
        "arrays": ArrayRecord({"b": Array(np.arange(3, dtype=np.int64)),
                               "a": Array(np.asfortranarray(np.full((2, 3), 0.5, dtype=np.float32)))}),
        "metrics": MetricRecord({"num-examples": 12, "loss": float("nan"), "per-class": [0.25, 1.0]}),
        "site": ConfigRecord({"site-id": "A", "signature": b"\x00\xff{", "flags": [True, False],
                              "shards": [b"x", b"y"], "weight": 1.0, "count": 1}),
    })
    store = ReleaseStore(tmp_path)
    path = store.put("A", "study", "k", content)
    with np.load(path, allow_pickle=False) as stored:
        assert bytes(stored["format"]).decode() == RELEASE_FORMAT and "root" not in stored.files
    again = store.get("A", "study", "k")
    assert again is not None and again.object_id == content.object_id  # the very same Flower content
    assert list(again["arrays"].keys()) == ["b", "a"]
    site = again["site"]
    assert site["signature"] == b"\x00\xff{" and site["flags"] == [True, False] and site["shards"] == [b"x", b"y"]
    assert isinstance(site["weight"], float) and isinstance(site["count"], int)
    # A file of another (future) format is not guessed at: it is no release, and the round trains afresh.
    with np.load(path, allow_pickle=False) as stored:
        entries = {name: stored[name] for name in stored.files}
    entries["format"] = np.frombuffer(b"fedfusion-release/99", dtype=np.uint8)
    np.savez(path, **entries)
    assert store.get("A", "study", "k") is None


class _CoordinatorCrash(RuntimeError):
    pass


class _CrashesAtEvaluate:
    """Delegates to a grid, but dies when asked to push round ``crash_round``'s evaluate messages: the
    sites have trained that round and replied, and the coordinator has not checkpointed it yet."""

    def __init__(self, grid: object, crash_round: int) -> None:
        self.grid, self.crash_round = grid, crash_round

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        if any(m.metadata.message_type == "evaluate" and int(m.content["config"]["server-round"]) == self.crash_round
               for m in messages):
            raise _CoordinatorCrash(f"coordinator crashed in round {self.crash_round}")
        return self.grid.push_messages(messages)  # type: ignore[attr-defined]


def test_a_resumed_run_gets_the_same_release_and_no_second_charge(tmp_path: Path) -> None:
    from fedfusion.client.app import make_client_app
    from fedfusion.client.audit import iter_records
    from fedfusion.client.ledger import PrivacyLedger
    from fedfusion.common.federation_config import FederationConfig
    from fedfusion.common.flower_adapter import message_identity
    from fedfusion.common.privacy_policy import PrivacyPolicy
    from fedfusion.server.federation import run_federation
    from tests.dashboard_runs import RUN_ID, InProcessGrid, toy_schema
    from tests.sitegen import make_site

    schema_path = toy_schema().save(tmp_path / "schema.json")
    run_dir = tmp_path / "run"
    node_configs, folders = {}, {}
    for node, site in ((1, "A"),):  # one site keeps the test fast; keying by site is tested above
        folders[site] = folder = tmp_path / site
        make_site(folder, n=16, seed=node)
        policy = PrivacyPolicy(max_epsilon=50.0, ledger=str(folder / "privacy-ledger.json"), required=True)
        node_configs[node] = {"manifest": str(folder / "manifest.csv"), "schema": str(schema_path), "site-id": site,
                              "device": "cpu", "audit-log": str(folder / "audit.jsonl"), **policy.node_config()}
    run_config = {"num-server-rounds": 1, "min-sites": 1, "seed": 3, "schema": str(schema_path),
                  "run-dir": str(run_dir), "local-epochs": 1, "local-batch-size": 16, "fusion": "concat",
                  "dp-mode": "sample", "dp-noise-multiplier": 1.0, "study": "toy-dp", "round-timeout": 60.0}
    app = make_client_app(run_config)
    with message_identity(task_id=1, run_id=RUN_ID, node_id=0):  # as Flower's runtime sets it in a ServerApp
        with pytest.raises(_CoordinatorCrash):
            run_federation(_CrashesAtEvaluate(InProcessGrid(app, node_configs), 1),  # type: ignore[arg-type]
                           FederationConfig.from_run_config(run_config))
        assert not list(run_dir.glob("checkpoints/*.pt"))  # the crash came before round 1's checkpoint
        resumed = run_federation(InProcessGrid(app, node_configs),  # type: ignore[arg-type]
                                 FederationConfig.from_run_config({**run_config, "resume": True}))
    assert [row["round"] for row in resumed.rounds] == [0, 1] and resumed.rounds[1]["sites_trained"] == 1
    for site, folder in folders.items():
        entries = PrivacyLedger(folder / "privacy-ledger.json").studies()["toy-dp"]
        assert [e["round"] for e in entries] == [1], (site, entries)  # round 1 charged once
        trains = [r for r in iter_records(folder / "audit.jsonl") if r["message_type"] == "train"]
        assert [r["round"] for r in trains] == [1, 1], trains
        assert trains[0]["sha256"] == trains[1]["sha256"]  # the same release, sent again
        assert trains[0]["epsilon"] == trains[1]["epsilon"] > 0


def test_answer_book_binds_one_survivor_set_per_round_across_restarts(tmp_path: Path) -> None:
    model = {"w": np.arange(4, dtype=np.float32)}
    key = answer_key("A", "study", 3, model)
    assert key == answer_key("A", "study", 3, {"w": np.arange(4, dtype=np.float32)})
    assert key != answer_key("A", "study", 4, model) and key != answer_key("A", "study", 3, {"w": model["w"] + 1})
    book = AnswerBook(tmp_path / "secagg-answers.json")
    assert book.bind(key, '["A","B","C","D"]') and book.bind(key, '["A","B","C","D"]')  # the same set again: fine
    reopened = AnswerBook(tmp_path / "secagg-answers.json")  # a new run, or the site restarted
    assert not reopened.bind(key, '["B","C","D"]')
    assert reopened.entries[key] == '["A","B","C","D"]'
    (tmp_path / "secagg-answers.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="unreadable secure-aggregation answer book"):
        AnswerBook(tmp_path / "secagg-answers.json")
