"""The server's secure round over a loopback Grid: it equals modality-aware FedAvg, the server
receives nothing but keys, ciphertexts and masked vectors, dropouts are recovered or fail the
round cleanly, and fewer than 3 sites are refused unless overridden."""

from __future__ import annotations

import numpy as np
import pytest

from fedfusion.common.config import ConfigError
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.records import ARRAYS_KEY, METRICS_KEY, arrays_to_numpy, numpy_to_arrays
from fedfusion.common.secagg.settings import (
    ACTION_MASKED_INPUT,
    ACTION_UNMASK,
    BUNDLES_KEY,
    CLIPPED_ENTRY,
    KEYS_KEY,
    MASKED_KEY,
    SHARES_KEY,
    SIGNATURE_KEY,
    TWO_SITES_HELP,
)
from fedfusion.server.secure_aggregation import check_secure_compatible, masked_layout, run_secure_round
from fedfusion.server.strategy import build_strategy, modality_weighted_average
from tests.secagg_fakes import (
    COUNTER,
    PARAMETER_GROUPS,
    FakeSite,
    LoopbackGrid,
    global_model,
    identity_configs,
    make_app,
    make_sites,
)

NODES = [11, 2**63 + 5, 305, 2**64 - 2]  # Flower node ids are uint64
RUN = {"secure-aggregation": True, "secagg-weight-bound": 1000.0, "secagg-timeout": 0.3, "round-timeout": 5.0,
       "min-sites": 1}
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


def _setup(sites: list[FakeSite], nodes: list[int] = NODES, policy: dict | None = None,
           **run: object) -> tuple[LoopbackGrid, object, dict]:
    by_node = dict(zip(nodes, sites, strict=False))
    run_config = {**RUN, **run}
    grid = LoopbackGrid(make_app(by_node, run_config), list(by_node),
                        node_configs=identity_configs(by_node, **(policy or {})))
    strategy = build_strategy("fedavg", PARAMETER_GROUPS, min_sites=1)
    return grid, strategy, run_config


def _plain(current: dict[str, np.ndarray], sites: list[FakeSite]) -> dict[str, np.ndarray]:
    updates = [{k: (v + s.delta[k]).astype(v.dtype) if k in s.delta else v for k, v in current.items()}
               for s in sites]
    return modality_weighted_average(updates, [s.counts for s in sites], current, PARAMETER_GROUPS)


def _round(grid: LoopbackGrid, strategy: object, run_config: dict, current: dict[str, np.ndarray],
           server_round: int = 1):
    cfg = FederationConfig.from_run_config(run_config)
    return run_secure_round(grid, strategy, server_round, numpy_to_arrays(current), cfg)  # type: ignore[arg-type]


def _assert_close(new: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for key, value in expected.items():
        if key == COUNTER:
            continue
        np.testing.assert_allclose(new[key], value, atol=TOL, err_msg=key)


def test_secure_round_equals_modality_aware_fedavg() -> None:
    sites = make_sites("ABCD", lacking={"B": {"omics"}, "D": {"image", "omics"}})
    grid, strategy, run_config = _setup(sites)
    current = global_model()
    outcome = _round(grid, strategy, run_config, current)
    assert outcome.failure == "" and outcome.arrays is not None
    new = arrays_to_numpy(outcome.arrays)
    _assert_close(new, _plain(current, sites))
    assert new[COUNTER] == current[COUNTER]  # integer buffers are not averaged
    assert outcome.metrics["num-examples"] == pytest.approx(sum(s.counts["num-examples"] for s in sites), abs=0.01)
    assert outcome.metrics["num-examples-omics"] == pytest.approx(
        sum(s.counts["num-examples-omics"] for s in sites), abs=0.01)
    row = outcome.row
    assert (row["secagg_sites"], row["secagg_masked"], row["secagg_recovered_dropouts"], row["secagg_failed"]) == (
        4, 4, 0, 0)
    assert row["secagg_threshold"] == 3 and row["secagg_clipped_fraction"] == pytest.approx(0.0, abs=1e-6)
    assert all(s.trained == 1 for s in sites)


def test_server_receives_only_keys_ciphertexts_and_masked_vectors() -> None:
    sites = make_sites("ABC")
    grid, strategy, run_config = _setup(sites)
    current = global_model()
    _round(grid, strategy, run_config, current)
    allowed = {KEYS_KEY, BUNDLES_KEY, MASKED_KEY, SIGNATURE_KEY, SHARES_KEY}
    assert len(grid.received) == 15  # 3 sites x 5 stages (4 + the consistency round)
    for reply in grid.received:
        names = set(reply.content.keys())
        assert names <= allowed and len(names) == 1, names
        assert ARRAYS_KEY not in names and METRICS_KEY not in names and not reply.content.metric_records
        for record in reply.content.array_records.values():
            for array in record.values():
                assert array.numpy().dtype == np.uint32  # masked integers, never a float update
    # a masked vector is far from the site's quantised update: it looks uniformly random
    masked = [r.content[MASKED_KEY]["masked-input"].numpy() for r in grid.received if MASKED_KEY in r.content]
    # (an unmasked encoding of these small updates sits near the middle of the range, top bit ~ constant)
    assert np.mean(np.concatenate(masked) >= 2**31) == pytest.approx(0.5, abs=0.2)


def test_site_dropping_after_its_masked_input_is_still_in_the_sum() -> None:
    sites = make_sites("ABCD", seed=3)
    grid, strategy, run_config = _setup(sites)
    grid.silent.add((NODES[1], ACTION_UNMASK))
    current = global_model()
    outcome = _round(grid, strategy, run_config, current)
    _assert_close(arrays_to_numpy(outcome.arrays), _plain(current, sites))
    assert (outcome.row["secagg_masked"], outcome.row["secagg_dropped_at_unmask"],
            outcome.row["secagg_recovered_dropouts"]) == (4, 1, 1)


def test_site_dropping_before_masking_is_left_out_of_the_sum() -> None:
    sites = make_sites("ABCD", seed=4)
    grid, strategy, run_config = _setup(sites)
    grid.silent.add((NODES[2], ACTION_MASKED_INPUT))
    current = global_model()
    outcome = _round(grid, strategy, run_config, current)
    kept = [s for node, s in zip(NODES, sites, strict=True) if node != NODES[2]]
    _assert_close(arrays_to_numpy(outcome.arrays), _plain(current, kept))
    assert (outcome.row["secagg_masked"], outcome.row["secagg_dropped_before_masking"]) == (3, 1)


def test_too_many_dropouts_fail_the_round_cleanly() -> None:
    sites = make_sites("ABC", seed=5)
    grid, strategy, run_config = _setup(sites)
    grid.silent.add((NODES[0], ACTION_MASKED_INPUT))
    outcome = _round(grid, strategy, run_config, global_model())
    assert outcome.arrays is None and outcome.row["secagg_failed"] == 1
    assert "only 2 sites" in outcome.failure
    assert any(r["site"] == "(round)" for r in strategy.rejected)
    # the silent site still holds its update and keys until its next round starts; the others
    # answered stage 3 and deleted their updates
    assert ["secagg-update" in grid.states[n] for n in NODES[:3]] == [True, False, False]


def test_two_sites_are_refused_unless_overridden() -> None:
    sites = make_sites("AB", seed=6)
    grid, strategy, run_config = _setup(sites)
    with pytest.raises(ConfigError, match="at least 3 sites") as err:
        _round(grid, strategy, run_config, global_model())
    assert TWO_SITES_HELP in str(err.value)
    assert all(s.trained == 0 for s in sites)  # refused before anything trained
    grid, strategy, run_config = _setup(sites, **{"secagg-allow-two-sites": True})
    outcome = _round(grid, strategy, run_config, global_model())  # the run config alone: the sites refuse
    assert outcome.arrays is None and outcome.row["secagg_failed"] == 1
    assert all("policy needs at least 3" in r["reason"] for r in strategy.rejected if r["site"] in map(str, NODES))
    grid, strategy, run_config = _setup(sites, policy={"secagg-allow-two-sites": "true"},
                                        **{"secagg-allow-two-sites": True})
    current = global_model()
    outcome = _round(grid, strategy, run_config, current)  # and the sites' own policy allows it
    _assert_close(arrays_to_numpy(outcome.arrays), _plain(current, sites))


def test_a_refusing_site_is_recorded_and_the_others_aggregate() -> None:
    sites = make_sites("ABCD", seed=7)
    sites[3].refuse = True
    grid, strategy, run_config = _setup(sites)
    current = global_model()
    outcome = _round(grid, strategy, run_config, current)
    assert [r["site"] for r in outcome.refusals] == ["D"] and outcome.refusals[0]["epsilon"] == 1.5
    _assert_close(arrays_to_numpy(outcome.arrays), _plain(current, sites[:3]))
    assert outcome.row["secagg_keys_advertised"] == 3


def test_clipped_entries_are_reported_only_as_a_federation_mean() -> None:
    sites = make_sites("ABC", seed=8)
    sites[0].delta["fusion.w"][:] = 5.0  # 6 of the site's entries beyond clip 1.0
    grid, strategy, run_config = _setup(sites)
    outcome = _round(grid, strategy, run_config, global_model())
    per_site = 6 / sum(v.size for v in sites[0].delta.values())
    weight = sites[0].counts["num-examples"] / sum(s.counts["num-examples"] for s in sites)
    assert outcome.row["secagg_clipped_fraction"] == pytest.approx(per_site * weight, abs=1e-4)


def test_masked_layout_leaves_integer_buffers_out() -> None:
    layout, weight_keys = masked_layout(global_model(), PARAMETER_GROUPS)
    names = {entry.name for entry in layout.entries}
    assert COUNTER not in names and CLIPPED_ENTRY in names and "fusion.bn.running_mean" in names
    assert weight_keys == {"shared": "num-examples", "image": "num-examples-image",
                           "clinical": "num-examples-clinical", "omics": "num-examples-omics"}


@pytest.mark.parametrize("extra", [{"strategy": "fedadam"}, {"dp-mode": "client"}, {"min-sites": 2}])
def test_incompatible_settings_are_refused_up_front(extra: dict) -> None:
    with pytest.raises(ConfigError, match="secure-aggregation"):
        check_secure_compatible(FederationConfig.from_run_config({"secure-aggregation": True, "min-sites": 3, **extra}))
    check_secure_compatible(FederationConfig.from_run_config(extra))  # fine without secure aggregation


def test_min_sites_below_three_needs_the_override() -> None:
    with pytest.raises(ConfigError, match="each site could subtract its own update"):
        check_secure_compatible(FederationConfig.from_run_config({"secure-aggregation": True, "min-sites": 2}))
    check_secure_compatible(FederationConfig.from_run_config(
        {"secure-aggregation": True, "min-sites": 2, "secagg-allow-two-sites": True}))


def test_fedprox_config_reaches_the_sites() -> None:
    sites = make_sites("ABC", seed=9)
    by_node = dict(zip(NODES, sites, strict=False))
    seen: list[float] = []
    grid = LoopbackGrid(make_app(by_node, RUN), list(by_node), node_configs=identity_configs(by_node))
    strategy = build_strategy("fedprox", PARAMETER_GROUPS, min_sites=1, proximal_mu=0.3)
    original = grid.push_messages

    def spy(messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        seen.extend(float(m.content["config"]["proximal-mu"]) for m in messages if "config" in m.content)
        return original(messages)

    grid.push_messages = spy  # type: ignore[method-assign]
    outcome = _round(grid, strategy, RUN, global_model())
    assert outcome.arrays is not None and seen == [0.3, 0.3, 0.3]


def _multisequence_sites(groups: dict[str, str], seed: int) -> tuple[list[FakeSite], dict[str, np.ndarray]]:
    """Sites of a two-sequence (t1, flair) schema: each reports a count per sequence, none for ``image``;
    site B has no FLAIR images. Weights are keyed like ``groups`` (the encoder's state_dict names)."""
    rng = np.random.default_rng(seed)
    shapes = {name: (3, 2) for name in groups}
    current = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}
    sites = []
    for name, flair in (("A", 40.0), ("B", 0.0), ("C", 70.0)):
        n = float(rng.integers(60, 120))
        counts = {"num-examples": n, "num-examples-image:t1": n - 5, "num-examples-image:flair": flair,
                  "num-examples-clinical": n}
        delta = {k: (rng.normal(size=s) * 0.05).astype(np.float32) for k, s in shapes.items()}
        sites.append(FakeSite(name, delta, counts))
    return sites, current


@pytest.mark.parametrize("groups", [
    # one shared image encoder: its group "image" is weighted by t1 + flair images at each site
    {"encoders.image.w": "image", "encoders.clinical.w": "clinical", "fusion.w": "fusion"},
    # one encoder per sequence: each weighted by its own sequence's count, B's FLAIR encoder by 0
    {"encoders.image:t1.w": "image:t1", "encoders.image:flair.w": "image:flair", "encoders.clinical.w": "clinical",
     "fusion.w": "fusion"},
], ids=["shared", "separate"])
def test_secure_round_weights_multisequence_groups_like_plain_fedavg(groups: dict[str, str]) -> None:
    sites, current = _multisequence_sites(groups, seed=11)
    by_node = dict(zip(NODES, sites, strict=False))
    grid = LoopbackGrid(make_app(by_node, RUN), list(by_node), node_configs=identity_configs(by_node))
    strategy = build_strategy("fedavg", groups, min_sites=1)
    outcome = _round(grid, strategy, RUN, current)
    assert outcome.failure == "" and outcome.arrays is not None
    updates = [{k: v + s.delta[k] for k, v in current.items()} for s in sites]
    expected = modality_weighted_average(updates, [s.counts for s in sites], current, groups)
    _assert_close(arrays_to_numpy(outcome.arrays), expected)
    if "encoders.image.w" in groups:  # the shared encoder's weights: t1 + flair counts, by hand
        w = [s.counts["num-examples-image:t1"] + s.counts["num-examples-image:flair"] for s in sites]
        by_hand = sum(wi * u["encoders.image.w"] for wi, u in zip(w, updates, strict=True)) / sum(w)
        np.testing.assert_allclose(arrays_to_numpy(outcome.arrays)["encoders.image.w"], by_hand, atol=TOL)
    else:  # site B trained no FLAIR encoder: it must not pull that encoder towards its update
        w = [s.counts["num-examples-image:flair"] for s in sites]
        by_hand = sum(wi * u["encoders.image:flair.w"] for wi, u in zip(w, updates, strict=True)) / sum(w)
        np.testing.assert_allclose(arrays_to_numpy(outcome.arrays)["encoders.image:flair.w"], by_hand, atol=TOL)
