"""The site audit log: whole JSON lines, no tensor values, a recomputable hash, safe concurrent appends."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest

from fedfusion.cli import main
from fedfusion.client.audit import (
    AuditLog,
    AuditLogError,
    audit_path_for,
    filter_records,
    iter_records,
    payload_sha256,
    summarise,
    summary_to_dict,
)
from fedfusion.common.config import ConfigError

# A value no norm, shape or count in these tests can produce by accident.
DISTINCTIVE = 0.123456789012345


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    weight[1, 2] = DISTINCTIVE
    return {
        "encoder.weight": weight,
        "head.bias": np.array([DISTINCTIVE, -2.5], dtype=np.float64),
        "steps": np.array(7, dtype=np.int64),
    }


def _site_toml(folder: Path, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.toml"
    path.write_text(
        f'[site]\nid = "A"\nmanifest = "m.csv"\nschema = "s.json"\n{extra}\n'
        '[coordinator]\naddress = "127.0.0.1:9092"\ninsecure = true\n'
    )
    return path


def test_line_is_strict_json_with_shapes_norms_and_no_values(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", site_id="A")
    tensors = _tensors()

    log.record_reply(
        tensors,
        {"num-examples": 12, "train-loss": 0.5},
        run_id=4711,
        server_round=3,
        message_type="train",
        epsilon=0.75,
    )

    text = (tmp_path / "audit.jsonl").read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    record = json.loads(text)
    assert record["site_id"] == "A" and record["run_id"] == 4711 and record["round"] == 3
    assert record["message_type"] == "train" and record["epsilon"] == 0.75
    assert record["time"].endswith("+00:00")
    by_name = {t["name"]: t for t in record["tensors"]}
    assert by_name["encoder.weight"]["shape"] == [4, 3] and by_name["encoder.weight"]["dtype"] == "float32"
    assert by_name["steps"]["shape"] == [] and by_name["head.bias"]["nbytes"] == 16
    expected_norm = float(np.linalg.norm(tensors["encoder.weight"].astype(np.float64)))
    assert by_name["encoder.weight"]["l2_norm"] == pytest.approx(expected_norm)
    for needle in ("0.123456789", "0.12345678", "1234567"):
        assert needle not in text, "a tensor value leaked into the audit log"


def test_hash_matches_recomputation_and_changes_with_any_byte(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", site_id="A")
    tensors, metrics = _tensors(), {"num-examples": np.int64(12), "loss": np.float32(0.25), "auc": float("nan")}

    written = log.record_reply(tensors, metrics, run_id="r1", server_round=1, message_type="evaluate")

    on_disk = next(iter_records(log.path))
    assert on_disk["sha256"] == written["sha256"] == payload_sha256(tensors, metrics)
    assert on_disk["metrics"]["auc"] == "NaN"  # strict JSON, still visible
    reordered = dict(reversed(list(tensors.items())))
    assert payload_sha256(reordered, metrics) == on_disk["sha256"]  # key order of the mapping does not matter
    changed = {k: v.copy() for k, v in tensors.items()}
    changed["head.bias"][1] = np.nextafter(changed["head.bias"][1], 0)
    assert payload_sha256(changed, metrics) != on_disk["sha256"]
    assert payload_sha256(tensors, {**metrics, "num-examples": 13}) != on_disk["sha256"]
    as_float64 = {**tensors, "encoder.weight": tensors["encoder.weight"].astype(np.float64)}
    assert payload_sha256(as_float64, metrics) != on_disk["sha256"]  # dtype is part of the payload


def test_hash_follows_the_documented_framing() -> None:
    tensors, metrics = {"w": np.arange(3, dtype=np.int32)}, {"n": 3}
    header = b'{"dtype":"<i4","name":"w","shape":[3]}'
    body, metrics_json = tensors["w"].tobytes(), b'{"n":3}'
    stream = b"".join(len(part).to_bytes(8, "big") + part for part in (header, body, metrics_json))

    assert payload_sha256(tensors, metrics) == hashlib.sha256(stream).hexdigest()


def _records_for_summary(log: AuditLog) -> None:
    w = {"w": np.zeros((10,), dtype=np.float32)}  # 40 bytes
    log.record_reply(w, {}, run_id=1, server_round=1, message_type="train", epsilon=0.5)
    log.record_reply({}, {}, run_id=1, server_round=1, message_type="evaluate")
    log.record_reply(w, {}, run_id=1, server_round=2, message_type="train", epsilon=0.9)
    log.record_reply(w, {}, run_id=2, server_round=1, message_type="train")


def test_summarise_counts_bytes_and_last_epsilon(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", site_id="A")
    _records_for_summary(log)

    runs = summarise(log.path)

    assert set(runs) == {"1", "2"}
    run1 = runs["1"]
    assert run1.replies == 3 and run1.last_epsilon == 0.9 and run1.site_ids == ["A"]
    assert run1.payload_bytes == 3 * 2 + 2 * 40  # "{}" metrics per reply + two 40-byte tensors
    assert run1.rounds[1].replies == 2 and run1.rounds[1].message_types == {"train": 1, "evaluate": 1}
    assert run1.rounds[1].last_epsilon == 0.5 and run1.rounds[2].last_epsilon == 0.9
    assert runs["2"].last_epsilon is None
    assert json.loads(json.dumps(summary_to_dict(runs)))["1"]["rounds"]["2"]["replies"] == 1


def test_filter_by_run_and_round(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", site_id="A")
    _records_for_summary(log)

    only_run1 = list(filter_records(iter_records(log.path), run="1"))
    run1_round1 = list(filter_records(iter_records(log.path), run=1, server_round=1))

    assert len(only_run1) == 3 and len(run1_round1) == 2
    assert list(summarise(log.path, server_round=2)) == ["1"]


def test_a_damaged_line_is_an_error_not_skipped(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", site_id="A")
    log.record_reply({}, {}, run_id=1, server_round=1, message_type="train")
    with log.path.open("ab") as handle:
        handle.write(b'{"run_id": 1, "rou')

    with pytest.raises(AuditLogError, match=":2:"):
        summarise(log.path)


def test_site_id_is_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="site id"):
        AuditLog(tmp_path / "a.jsonl").record_reply({}, {}, run_id=1, server_round=1, message_type="train")


def _append_many(path: str, writer: int, count: int) -> None:
    log = AuditLog(path, site_id=f"w{writer}")
    big = {f"layer{i}.weight": np.full((64, 64), writer, dtype=np.float32) for i in range(40)}  # long lines
    for i in range(count):
        log.record_reply(big, {"i": i}, run_id=writer, server_round=i, message_type="train")


def test_concurrent_threads_and_processes_write_whole_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.jsonl")
    threads = [threading.Thread(target=_append_many, args=(path, w, 15)) for w in range(3)]
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_append_many, args=(path, w, 15)) for w in range(3, 5)]

    for worker in [*procs, *threads]:  # fork before any thread exists: no inherited locks
        worker.start()
    for worker in [*threads, *procs]:
        worker.join(timeout=60)

    assert all(p.exitcode == 0 for p in procs)
    records = list(iter_records(path))  # raises on any torn or interleaved line
    assert len(records) == 5 * 15
    for writer in range(5):
        mine = [r for r in records if r["site_id"] == f"w{writer}"]
        assert sorted(r["round"] for r in mine) == list(range(15))


def test_audit_path_default_and_configured(tmp_path: Path) -> None:
    default = _site_toml(tmp_path / "kit")
    configured = _site_toml(tmp_path / "kit2", 'audit-log = "../state/audit.jsonl"')

    assert audit_path_for(default) == (tmp_path / "kit" / "audit.jsonl").resolve()
    assert audit_path_for(configured) == (tmp_path / "state" / "audit.jsonl").resolve()
    with pytest.raises(ConfigError, match="not found"):
        audit_path_for(tmp_path / "missing.toml")


def test_site_audit_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site_toml = _site_toml(tmp_path / "kit")
    assert main(["site", "audit", str(site_toml)]) == 0  # no log yet is not an error
    _records_for_summary(AuditLog(audit_path_for(site_toml), site_id="A"))
    capsys.readouterr()

    assert main(["site", "audit", str(site_toml), "--run", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary) == ["1"] and summary["1"]["replies"] == 3

    assert main(["site", "audit", str(site_toml), "--run", "1", "--round", "1", "--records"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["round"] == 1 for line in lines)

    assert main(["site", "audit", str(site_toml)]) == 0
    assert "evaluate" in capsys.readouterr().out
    assert main(["site", "audit", str(tmp_path / "nope.toml")]) == 2


def test_epsilon_defaults_to_the_reply_metric(tmp_path: Path) -> None:
    from fedfusion.client.audit import EPSILON_METRIC
    from fedfusion.common.records import EPSILON_KEY

    log = AuditLog(tmp_path / "audit.jsonl", site_id="A")

    record = log.record_reply({}, {EPSILON_KEY: 1.25}, run_id=1, server_round=1, message_type="train")

    assert EPSILON_METRIC == EPSILON_KEY and record["epsilon"] == 1.25


def test_audit_path_of_a_non_utf8_site_config_is_a_named_error(tmp_path: Path) -> None:
    from fedfusion.client.audit import audit_path_for
    from fedfusion.common.config import ConfigError

    config = tmp_path / "site.toml"
    config.write_bytes(b'[site]\nid = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="site.toml: not a UTF-8 text file"):
        audit_path_for(config)
