"""Personalisation through the real ClientApp and round loop: private heads (FedPer) never leave a site,
persist at the site across rounds and a resume, the server averages only the shared part; FedAvg+FT
reports a fine-tuned copy's metrics under ``personal_*`` and sends nothing of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedfusion.client.app import make_client_app
from fedfusion.client.personalization import PrivatePartStore, predictions_path, read_predictions
from fedfusion.common.config import ConfigError, ModelConfig
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.models import create_model
from fedfusion.common.personalization import PERSONAL_EPOCHS_KEY, Personalization, private_keys
from fedfusion.common.records import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, arrays_to_numpy, model_to_arrays
from fedfusion.common.training import metrics_from
from fedfusion.server.federation import FederationResult, run_federation
from tests.dashboard_runs import toy_schema
from tests.secagg_fakes import LoopbackGrid
from tests.sitegen import make_site

pytestmark = pytest.mark.usefixtures("one_torch_thread", "flower_task_identity")
NODES = (1, 2)
SITES = {1: "A", 2: "B"}



@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]]]:
    """Two toy sites (30 cases: 18 train, 6 val, 6 test) that release every metric (min-eval-cases 0)."""
    root = tmp_path_factory.mktemp("personal")
    schema_path = toy_schema().save(root / "schema.json")
    nodes = {node: {"manifest": str(make_site(root / f"site{node}", n=30, seed=node)), "schema": str(schema_path),
                    "site-id": SITES[node], "device": "cpu", "min-eval-cases": "0"} for node in NODES}
    return schema_path, nodes


def _run_config(schema_path: Path, run_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"num-server-rounds": 2, "min-sites": 2, "seed": 5, "schema": str(schema_path), "run-dir": str(run_dir),
            "local-epochs": 1, "local-batch-size": 16, "local-lr": 3e-3, "fusion": "concat", "local-device": "cpu",
            "round-timeout": 60.0, "model-selection": "last", **extra}


def _federate(study: tuple[Path, dict[int, dict[str, Any]]], run_config: dict[str, Any]
              ) -> tuple[FederationResult, LoopbackGrid]:
    grid = LoopbackGrid(make_client_app(run_config), list(NODES), node_configs=study[1])
    return run_federation(grid, FederationConfig.from_run_config(run_config)), grid  # type: ignore[arg-type]


def _store(study: tuple[Path, dict[int, dict[str, Any]]], node: int, run_config: dict[str, Any]) -> PrivatePartStore:
    cfg = FederationConfig.from_run_config(run_config)
    folder = Path(study[1][node]["manifest"]).parent  # deployment: the ledger's folder, beside the manifest
    return PrivatePartStore.in_folder(folder, SITES[node], "schema:toy", cfg.config_hash())


def _last_train_replies(grid: LoopbackGrid) -> list[Message]:
    """The last round's train replies (rounds arrive in order, one reply per site)."""
    return [m for m in grid.received if m.metadata.message_type == "train"][-len(NODES):]


def _update(reply: Message, final: dict[str, np.ndarray], heads: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """A (packed) train reply's tensors, unpacked with the layout of the global model's shared part."""
    from fedfusion.common.packing import name_groups, unpack_tensors
    from fedfusion.common.records import SITE_KEY

    shared = {k: v for k, v in final.items() if k not in heads}
    groups = name_groups(create_model(toy_schema(), ModelConfig(fusion="concat")))
    return unpack_tensors(reply.content[ARRAYS_KEY], reply.content[SITE_KEY], shared, groups)


def test_private_parts_config_is_validated() -> None:
    assert Personalization.from_run_config({"private-parts": "head, omics"}).private_parts == ("head", "omics")
    with pytest.raises(ConfigError, match="private-parts lists \\['norm'\\]"):
        FederationConfig.from_run_config({"private-parts": "norm"})
    with pytest.raises(ConfigError, match="dp-mode"):
        FederationConfig.from_run_config({"private-parts": "head", "dp-mode": "client"})
    names = create_model(toy_schema(), ModelConfig(fusion="concat")).state_dict()
    heads = private_keys(names, ("head",))
    assert heads and all(k.startswith("heads.") for k in heads) and private_keys(names, ()) == frozenset()


def test_train_reply_holds_no_private_keys_and_the_site_trains_its_own_head(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    schema_path, nodes = study
    run_config = _run_config(schema_path, tmp_path / "run", **{"private-parts": "head", "study": "handler"})
    app = make_client_app(run_config)
    model = create_model(toy_schema(), ModelConfig(fusion="concat"))
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    heads = private_keys(state, ("head",))

    def train(node: int, server_round: int) -> dict[str, np.ndarray]:
        msg = Message(RecordDict({ARRAYS_KEY: model_to_arrays(model),
                                  "config": ConfigRecord({"server-round": server_round})}),
                      dst_node_id=node, message_type="train")
        reply = app(msg, Context(run_id=1, node_id=node, node_config=nodes[node], state=RecordDict(), run_config={}))
        assert not reply.has_error(), reply.error
        return arrays_to_numpy(reply.content[ARRAYS_KEY])

    cfg = FederationConfig.from_run_config(run_config)
    stores = {n: PrivatePartStore.in_folder(Path(nodes[n]["manifest"]).parent, SITES[n], "handler", cfg.config_hash())
              for n in NODES}
    for store in stores.values():
        store.path.unlink(missing_ok=True)
    first = {node: train(node, 1) for node in NODES}
    for reply in first.values():  # absent, not zeroed
        assert set(reply) == set(state) - heads
    kept = {node: stores[node].latest(upto=1) for node in NODES}
    for node in NODES:
        assert kept[node] is not None and kept[node][0] == 1 and set(kept[node][1]) == heads
        assert any(not np.array_equal(kept[node][1][k], state[k]) for k in heads)  # trained at the site
    assert any(not np.array_equal(kept[1][1][k], kept[2][1][k]) for k in heads)  # each site its own head

    # round 2 trains from the site's round-1 head: without it (file gone) the shared update differs
    with_head = train(1, 2)
    assert stores[1].rounds() == [1, 2]
    stores[1].path.unlink()
    without = train(1, 2)
    assert any(not np.allclose(with_head[k], without[k]) for k in with_head if with_head[k].dtype.kind == "f")


def test_fedper_federation_averages_shared_parts_and_resumes_exactly(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    schema_path, _ = study
    config = _run_config(schema_path, tmp_path / "whole", **{"private-parts": "head"})
    for node in NODES:
        _store(study, node, config).path.unlink(missing_ok=True)
    whole, grid = _federate(study, config)
    final = arrays_to_numpy(whole.arrays)
    heads = private_keys(final, ("head",))
    replies = _last_train_replies(grid)
    assert len(replies) == 2 and not whole.rejected
    updates = [_update(r, final, heads) for r in replies]
    counts = [float(r.content[METRICS_KEY][NUM_EXAMPLES]) for r in replies]
    assert all(set(u) == set(final) - heads for u in updates)
    for key in set(final) - heads:  # all modalities at both sites: plain FedAvg by example counts
        if final[key].dtype.kind == "f":
            expected = sum(c * u[key].astype(np.float64) for c, u in zip(counts, updates, strict=True)) / sum(counts)
            np.testing.assert_allclose(final[key], expected, atol=1e-6)
    torch.manual_seed(5)  # the server seeds with the run's seed before building the initial model
    initial = {k: v.numpy() for k, v in create_model(toy_schema(), ModelConfig(fusion="concat")).state_dict().items()}
    for key in heads:  # nobody sent the heads: the global keeps the initial values
        np.testing.assert_array_equal(final[key], initial[key])
    evaluated = {m["site"]: m for m in whole.site_metrics if m["phase"] == "evaluate" and m["round"] == 2}
    assert set(evaluated) == {"A", "B"} and all(np.isfinite(m["c_index"]) for m in evaluated.values())

    # the same run interrupted after round 1 and resumed in "new processes" (no context.state survives)
    parted = _run_config(schema_path, tmp_path / "parted", **{"private-parts": "head", "num-server-rounds": 1})
    _federate(study, parted)
    resumed, _ = _federate(study, {**parted, "num-server-rounds": 2, "resume": True})
    again = arrays_to_numpy(resumed.arrays)
    for key in final:
        np.testing.assert_array_equal(again[key], final[key])
    resumed_eval = {m["site"]: m for m in resumed.site_metrics if m["phase"] == "evaluate" and m["round"] == 2}
    for site in ("A", "B"):  # evaluated with the same private heads
        assert resumed_eval[site]["c_index"] == evaluated[site]["c_index"]
        assert resumed_eval[site]["loss"] == evaluated[site]["loss"]


def test_fedavg_ft_reports_personal_metrics_of_the_last_round_only(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    schema_path, _ = study
    config = _run_config(schema_path, tmp_path / "ft", **{"personal-finetune-epochs": 2})
    result, grid = _federate(study, config)
    evaluations = [m for m in result.site_metrics if m["phase"] == "evaluate"]
    assert all(PERSONAL_EPOCHS_KEY not in m for m in evaluations if m["round"] < 2)  # cost: last round only
    last = [m for m in evaluations if m["round"] == 2]
    assert len(last) == 2
    for m in last:
        assert m[PERSONAL_EPOCHS_KEY] in (0.0, 1.0, 2.0) and np.isfinite(m["personal_c_index"])
        assert "personal_val_loss" not in m and "personal_num-examples" not in m
        if m[PERSONAL_EPOCHS_KEY] == 0:  # validation kept the delivered model: the same scores
            assert m["personal_loss"] == m["loss"]
        else:
            assert m["personal_loss"] != m["loss"]
        # the fine-tuned copy's per-case predictions stay at the site, beside its manifest; a deployed site
        # releases 3 decimals, so the file's C-index rounds to the released one
        node = next(n for n in NODES if SITES[n] == m["site"])
        kept = read_predictions(predictions_path(Path(study[1][node]["manifest"]).parent, m["site"], "schema:toy",
                                                 FederationConfig.from_run_config(config).config_hash(), 2))
        assert kept.model == "finetune" and len(kept.case_ids) == 6
        assert round(metrics_from(kept.pred)["c_index"], 3) == pytest.approx(m["personal_c_index"], abs=1e-9)
    # nothing of the fine-tuned copy leaves: evaluate replies carry no arrays; the global model of the
    # last round is the average of that round's train replies (sent before any fine-tuning)
    assert all(not m.content.array_records for m in grid.received if m.metadata.message_type == "evaluate")
    replies = _last_train_replies(grid)
    final = arrays_to_numpy(result.arrays)
    updates = [_update(r, final) for r in replies]
    counts = [float(r.content[METRICS_KEY][NUM_EXAMPLES]) for r in replies]
    assert all(set(u) == set(final) for u in updates)
    key = next(k for k in final if k.startswith("heads.") and final[k].dtype.kind == "f")
    expected = sum(c * u[key].astype(np.float64) for c, u in zip(counts, updates, strict=True)) / sum(counts)
    np.testing.assert_allclose(final[key], expected, atol=1e-6)


def test_secure_aggregation_masks_only_the_shared_part(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path) -> None:
    from fedfusion.common.secagg.settings import MASKED_ARRAY, MASKED_KEY
    from fedfusion.server.secure_aggregation import masked_layout
    from tests.secagg_fakes import identity_config

    schema_path, nodes = study
    secure_nodes = {n: {**nodes[n], **identity_config(SITES[n], **{"secagg-allow-two-sites": "true"})} for n in NODES}
    results = {}
    for secure in (False, True):
        config = _run_config(schema_path, tmp_path / f"secure-{secure}", **{
            "private-parts": "head", "num-server-rounds": 1, "secure-aggregation": secure,
            "secagg-allow-two-sites": True, "secagg-weight-bound": 100.0, "secagg-clip": 1.0, "study": "secure"})
        grid = LoopbackGrid(make_client_app(config), list(NODES), node_configs=secure_nodes)
        result = run_federation(grid, FederationConfig.from_run_config(config))  # type: ignore[arg-type]
        assert not result.rejected, result.rejected
        results[secure] = (arrays_to_numpy(result.arrays), grid)
    plain, (secure, grid) = results[False][0], results[True]
    heads = private_keys(plain, ("head",))
    model = create_model(toy_schema(), ModelConfig(fusion="concat"))
    groups = {name: group for group, names in model.parameter_groups().items() for name in names}
    layout, _ = masked_layout({k: v for k, v in plain.items() if k not in heads}, groups)
    whole, _ = masked_layout(plain, groups)
    assert layout.length == whole.length - sum(plain[k].size for k in heads)
    vectors = [m.content[MASKED_KEY][MASKED_ARRAY].numpy() for m in grid.received if MASKED_KEY in m.content]
    assert len(vectors) == 2 and all(v.size == layout.length for v in vectors)  # no head entries masked or sent
    assert not any(entry.name in heads for entry in layout.entries)
    for key, value in plain.items():  # the same average as a plain round, up to quantisation; heads untouched
        if key in heads:
            np.testing.assert_array_equal(secure[key], value)
        elif value.dtype.kind == "f":
            np.testing.assert_allclose(secure[key], value, atol=1e-4)


def test_simulate_and_study_methods_carry_the_personalisation_keys(tmp_path: Path) -> None:
    from fedfusion.simulations.experiment import parse_study
    from fedfusion.simulations.simulate import SimulationSpec, run_config_for

    schema = tmp_path / "schema.json"
    spec = SimulationSpec(dataset="ovarian", out_dir=tmp_path, personalize="fedper")
    config = run_config_for(spec, schema, {"A": tmp_path / "a.csv", "B": tmp_path / "b.csv"})
    assert config["private-parts"] == "head" and config["model-selection"] == "last"
    cfg = FederationConfig.from_run_config(run_config_for(SimulationSpec(dataset="ovarian", out_dir=tmp_path,
                                                                         personalize="ft"), schema, {"A": schema}))
    assert cfg.personal == Personalization(finetune_epochs=5)
    with pytest.raises(ConfigError, match="personalize must be one of"):
        run_config_for(SimulationSpec(dataset="ovarian", out_dir=tmp_path, personalize="fedbn"), schema, {})
    study = parse_study({"dataset": "ovarian", "methods": ["fedavg", "fedavg-ft", "fedprox-ft", "fedper"]})
    overrides = {m.name: m.overrides for m in study.federated}
    assert overrides["fedper"]["private-parts"] == "head"
    assert overrides["fedprox-ft"]["strategy"] == "fedprox" and overrides["fedprox-ft"]["personal-finetune-epochs"] == 5


@pytest.mark.parametrize("personal", [{"private-parts": "head"}, {"ditto-lambda": 0.1}], ids=["private-head", "ditto"])
def test_dp_rounds_with_personalisation_charge_the_ledger_as_plain_dp_rounds(
        study: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path, personal: dict[str, Any]) -> None:
    """What is accounted is the release of the shared part: a private head (trained inside the same DP-SGD
    steps) or a Ditto model (trained apart, never released) adds no charge."""
    from fedfusion.client.ledger import PrivacyLedger
    from fedfusion.common.privacy_policy import PrivacyPolicy
    from fedfusion.common.records import EPSILON_KEY, refusal_reason

    schema_path, nodes = study
    model = create_model(toy_schema(), ModelConfig(fusion="concat"))
    keys = set(model.state_dict())
    charged = {}
    for variant, extra in (("plain", {}), ("personal", personal)):
        folder = tmp_path / variant
        policy = PrivacyPolicy(max_epsilon=50.0, ledger=str(folder / "privacy-ledger.json"), required=True)
        node = {**nodes[1], **policy.node_config()}
        app = make_client_app(_run_config(schema_path, tmp_path / f"run-{variant}", **{
            "dp-mode": "sample", "dp-noise-multiplier": 1.0, "study": "dp-personal", **extra}))
        epsilons = []
        for server_round in (1, 2):
            msg = Message(RecordDict({ARRAYS_KEY: model_to_arrays(model),
                                      "config": ConfigRecord({"server-round": server_round})}),
                          dst_node_id=1, message_type="train")
            reply = app(msg, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}))
            assert not reply.has_error() and refusal_reason(reply) is None, reply
            shared = keys - (private_keys(keys, ("head",)) if "private-parts" in extra else set())
            assert set(arrays_to_numpy(reply.content[ARRAYS_KEY])) == shared
            epsilons.append(float(reply.content[METRICS_KEY][EPSILON_KEY]))
        ledger = PrivacyLedger(folder / "privacy-ledger.json")
        charged[variant] = (ledger.history("dp-personal"), [e["round"] for e in ledger.studies()["dp-personal"]],
                            epsilons)
        if variant == "personal":  # the personal state was kept, in the ledger's folder
            assert len(list((folder / "personal-state").glob("*.npz"))) == 1
    history, rounds, epsilons = charged["personal"]
    assert rounds == [1, 2] and len(history) == 2 and all(steps > 0 for _, _, steps in history)
    assert charged["personal"] == charged["plain"]  # same (σ, q, steps) per round, same ε reported
    assert 0 < epsilons[0] < epsilons[1]
