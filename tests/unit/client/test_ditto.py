"""Ditto through the real ClientApp and round loop: the update a site sends is exactly the plain one, its
personal model v_k stays at the site (trained toward the delivered global model, persisted across rounds
and a resume) and is reported only as ``personal_*`` evaluation metrics."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedfusion.client.app import make_client_app
from fedfusion.client.personalization import PrivatePartStore, train_personal
from fedfusion.client.runtime import site_from_context
from fedfusion.common.config import ConfigError, ModelConfig
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.models import create_model
from fedfusion.common.personalization import PERSONALIZE_PRESETS, Personalization
from fedfusion.common.records import ARRAYS_KEY, METRICS_KEY, arrays_to_numpy, model_to_arrays
from fedfusion.server.federation import run_federation
from tests.dashboard_runs import toy_schema
from tests.secagg_fakes import LoopbackGrid
from tests.sitegen import make_site

pytestmark = pytest.mark.usefixtures("one_torch_thread", "flower_task_identity")
NODES = (1, 2)
SITES = {1: "A", 2: "B"}



@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, dict[int, dict[str, Any]]]:
    """Two toy sites (30 cases: 18 train, 6 val, 6 test), every metric released; a fresh state folder per test."""
    schema_path = toy_schema().save(tmp_path / "schema.json")
    nodes = {node: {"manifest": str(make_site(tmp_path / f"site{node}", n=30, seed=node)), "schema": str(schema_path),
                    "site-id": SITES[node], "device": "cpu", "min-eval-cases": "0"} for node in NODES}
    return schema_path, nodes


def _run_config(schema_path: Path, run_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"num-server-rounds": 2, "min-sites": 2, "seed": 5, "schema": str(schema_path), "run-dir": str(run_dir),
            "local-epochs": 1, "local-batch-size": 16, "local-lr": 3e-3, "fusion": "concat", "local-device": "cpu",
            "round-timeout": 60.0, "model-selection": "last", **extra}


def _ditto_store(nodes: dict[int, dict[str, Any]], node: int, run_config: dict[str, Any]) -> PrivatePartStore:
    cfg = FederationConfig.from_run_config(run_config)
    study = str(run_config.get("study") or "schema:toy")
    return PrivatePartStore.in_folder(Path(nodes[node]["manifest"]).parent, SITES[node], study, cfg.config_hash(),
                                      kind="ditto")


def _message(model: torch.nn.Module, node: int, server_round: int, kind: str) -> Message:
    content = RecordDict({ARRAYS_KEY: model_to_arrays(model), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=node, message_type=kind)


def test_ditto_config_is_validated_and_preset() -> None:
    assert Personalization.from_run_config({"ditto-lambda": 0.5}).ditto_lambda == 0.5
    assert Personalization.from_run_config({"ditto-lambda": 0.5}).reports_personal
    assert FederationConfig.from_run_config(PERSONALIZE_PRESETS["ditto"]).personal.ditto_lambda == 0.1
    with pytest.raises(ConfigError, match="ditto-lambda must be a finite number >= 0"):
        FederationConfig.from_run_config({"ditto-lambda": -1.0})
    with pytest.raises(ConfigError, match="does not combine with private-parts"):
        FederationConfig.from_run_config({"ditto-lambda": 0.1, "private-parts": "head"})
    with pytest.raises(ConfigError, match="does not combine with personal-finetune-epochs"):
        FederationConfig.from_run_config({"ditto-lambda": 0.1, "personal-finetune-epochs": 2})


def test_the_proximal_term_pulls_the_personal_model_toward_the_delivered_one(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    schema_path, nodes = study
    cfg = FederationConfig.from_run_config(_run_config(schema_path, tmp_path, **{"local-epochs": 3}))
    site = site_from_context(dict(nodes[1]), {})
    torch.manual_seed(0)
    delivered = create_model(toy_schema(), ModelConfig(fusion="concat"))
    before = {k: v.clone() for k, v in delivered.state_dict().items()}

    def distance(lam: float) -> float:
        personal = copy.deepcopy(delivered)
        with torch.no_grad():  # v_k starts away from w (as after earlier rounds): the pull has work to do
            for p in personal.parameters():
                p.add_(0.05)
        train_personal(personal, delivered, site, cfg.train, lam, server_round=1)
        with torch.no_grad():
            return float(sum(((p - w) ** 2).sum() for p, w in zip(personal.parameters(), delivered.parameters(),
                                                                  strict=True)))

    weak, strong = distance(1e-4), distance(50.0)
    assert strong < 0.5 * weak, (strong, weak)
    for key, value in delivered.state_dict().items():  # the anchor itself is never trained
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_ditto_sends_the_plain_update_and_keeps_its_own_model(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    schema_path, nodes = study
    plain_config = _run_config(schema_path, tmp_path / "plain", study="ditto-handler")
    ditto_config = {**plain_config, "ditto-lambda": 0.1}
    plain_app, ditto_app = make_client_app(plain_config), make_client_app(ditto_config)
    torch.manual_seed(1)
    model = create_model(toy_schema(), ModelConfig(fusion="concat"))
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    store = _ditto_store(nodes, 1, ditto_config)

    def call(app: Any, server_round: int, kind: str = "train") -> Message:
        reply = app(_message(model, 1, server_round, kind),
                    Context(run_id=1, node_id=1, node_config=nodes[1], state=RecordDict(), run_config={}))
        assert not reply.has_error(), reply.error
        return reply

    plain = arrays_to_numpy(call(plain_app, 1).content[ARRAYS_KEY])
    sent = arrays_to_numpy(call(ditto_app, 1).content[ARRAYS_KEY])
    assert set(sent) == set(state)
    for key in state:  # the global update is bit-for-bit the one without Ditto: v_k plays no part in it
        np.testing.assert_array_equal(sent[key], plain[key])
    kept = store.latest(upto=1)
    assert kept is not None and kept[0] == 1 and set(kept[1]) == set(state)
    floats = [k for k in state if state[k].dtype.kind == "f"]
    assert any(not np.array_equal(kept[1][k], state[k]) for k in floats)  # trained at the site ...
    assert any(not np.allclose(kept[1][k], sent[k]) for k in floats)  # ... and not the update it sent

    # evaluation reports v_k as personal_* (no arrays leave); round 2 trains v_k from round 1's
    evaluated = call(ditto_app, 1, "evaluate")
    assert not evaluated.content.array_records
    metrics = dict(evaluated.content[METRICS_KEY])
    assert np.isfinite(metrics["personal_c_index"]) and metrics["personal_loss"] != metrics["loss"]
    assert "personal_epochs" not in metrics and "personal_val_loss" not in metrics
    again = arrays_to_numpy(call(ditto_app, 2).content[ARRAYS_KEY])
    from_round_1 = store.latest(upto=2)
    assert store.rounds() == [1, 2] and from_round_1 is not None
    store.path.unlink()
    again_fresh = arrays_to_numpy(call(ditto_app, 2).content[ARRAYS_KEY])
    fresh = store.latest(upto=2)
    assert fresh is not None
    assert any(not np.allclose(from_round_1[1][k], fresh[1][k]) for k in floats)  # v_k carried over rounds
    for key in state:  # while the update sent did not depend on it
        np.testing.assert_array_equal(again[key], again_fresh[key])


def test_ditto_federation_reports_personal_metrics_and_resumes_exactly(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    schema_path, nodes = study

    def federate(config: dict[str, Any]) -> Any:
        grid = LoopbackGrid(make_client_app(config), list(NODES), node_configs=nodes)
        return run_federation(grid, FederationConfig.from_run_config(config))  # type: ignore[arg-type]

    whole = federate(_run_config(schema_path, tmp_path / "whole", **{"ditto-lambda": 0.1}))
    evaluations = [m for m in whole.site_metrics if m["phase"] == "evaluate"]
    assert all("personal_c_index" not in m for m in evaluations if m["round"] == 0)  # no v_k before training
    last = {m["site"]: m for m in evaluations if m["round"] == 2}
    assert set(last) == {"A", "B"} and all(np.isfinite(m["personal_c_index"]) for m in last.values())
    assert all(m["personal_loss"] != m["loss"] for m in last.values())
    for node in NODES:  # the first run's state is removed: the resumed run must rebuild it itself
        _ditto_store(nodes, node, _run_config(schema_path, tmp_path, **{"ditto-lambda": 0.1})).path.unlink()

    parted = _run_config(schema_path, tmp_path / "parted", **{"ditto-lambda": 0.1, "num-server-rounds": 1})
    federate(parted)
    resumed = federate({**parted, "num-server-rounds": 2, "resume": True})
    again = {m["site"]: m for m in resumed.site_metrics if m["phase"] == "evaluate" and m["round"] == 2}
    for site in ("A", "B"):  # the same personal models after a resume in "new processes"
        assert again[site]["personal_c_index"] == last[site]["personal_c_index"]
        assert again[site]["personal_loss"] == last[site]["personal_loss"]
    final, resumed_final = arrays_to_numpy(whole.arrays), arrays_to_numpy(resumed.arrays)
    for key in final:
        np.testing.assert_array_equal(resumed_final[key], final[key])


def test_study_and_simulate_offer_ditto(tmp_path: Path) -> None:
    from fedfusion.simulations.experiment import parse_study
    from fedfusion.simulations.simulate import SimulationSpec, run_config_for

    config = run_config_for(SimulationSpec(dataset="ovarian", out_dir=tmp_path, personalize="ditto"),
                            tmp_path / "schema.json", {"A": tmp_path / "a.csv"})
    assert config["ditto-lambda"] == 0.1 and config["model-selection"] == "last"
    method = parse_study({"dataset": "ovarian", "methods": ["ditto"]}).method("ditto")
    assert method.overrides["ditto-lambda"] == 0.1 and method.overrides["strategy"] == "fedavg"


def test_secure_aggregation_with_ditto_masks_the_normal_update(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    from fedfusion.common.secagg.settings import MASKED_ARRAY, MASKED_KEY
    from fedfusion.server.secure_aggregation import masked_layout
    from tests.secagg_fakes import identity_config

    schema_path, nodes = study
    secure_nodes = {n: {**nodes[n], **identity_config(SITES[n], **{"secagg-allow-two-sites": "true"})} for n in NODES}
    config = _run_config(schema_path, tmp_path / "secure", **{
        "ditto-lambda": 0.1, "num-server-rounds": 1, "secure-aggregation": True, "secagg-allow-two-sites": True,
        "secagg-weight-bound": 100.0, "secagg-clip": 1.0})
    grid = LoopbackGrid(make_client_app(config), list(NODES), node_configs=secure_nodes)
    result = run_federation(grid, FederationConfig.from_run_config(config))  # type: ignore[arg-type]
    assert not result.rejected and result.rounds[-1]["sites_trained"] == 2, result.rejected
    model = create_model(toy_schema(), ModelConfig(fusion="concat"))
    groups = {name: group for group, names in model.parameter_groups().items() for name in names}
    layout, _ = masked_layout({k: v.numpy() for k, v in model.state_dict().items()}, groups)
    vectors = [m.content[MASKED_KEY][MASKED_ARRAY].numpy() for m in grid.received if MASKED_KEY in m.content]
    assert len(vectors) == 2 and all(v.size == layout.length for v in vectors)  # the whole normal update, once
    evaluated = [m for m in result.site_metrics if m["phase"] == "evaluate" and m["round"] == 1]
    assert len(evaluated) == 2 and all(np.isfinite(m["personal_c_index"]) for m in evaluated)
    for node in NODES:
        assert _ditto_store(nodes, node, config).rounds() == [1]
