"""The packed wire format (common/packing.py): exact round trip, a layout mismatch refused on both sides,
one Array per aggregation group in a real ClientApp reply, and aggregation identical to the per-tensor path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedfusion.common.packing import LAYOUT_KEY, LayoutMismatch, PackLayout, received_state
from fedfusion.common.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SITE_KEY, arrays_to_numpy, numpy_to_arrays
from fedfusion.server.privacy import ClientLevelDP
from fedfusion.server.strategy import build_strategy
from tests.secagg_fakes import roundtrip

GROUPS = {"encoders.image.w": "image", "encoders.image.b": "image", "encoders.omics.w": "omics",
          "fusion.w": "fusion", "heads.risk.w": "head", "heads.risk.b": "head"}


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights of several groups, a float32 buffer (shared), an int64 0-d counter and a float64."""
    rng = np.random.default_rng(seed)
    shapes = {"encoders.image.w": (4, 3), "encoders.image.b": (4,), "encoders.omics.w": (5, 2), "fusion.w": (6,),
              "heads.risk.w": (2, 6), "heads.risk.b": (2,), "encoders.image.bn.running_mean": (4,)}
    out = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    out["encoders.image.bn.num_batches_tracked"] = np.array(7 + seed, dtype=np.int64)
    out["fusion.scale"] = rng.normal(size=(3,))  # float64
    return out


def test_pack_unpack_round_trip_is_exact_and_one_array_per_group_and_dtype() -> None:
    model = _model()
    layout = PackLayout.of(model, GROUPS)
    record = roundtrip(RecordDict({ARRAYS_KEY: layout.pack(model)}))[ARRAYS_KEY]
    # image, omics, shared (fusion, heads, the image encoder's buffer: parameter_groups() lists no buffers)
    assert sorted(record.keys()) == ["group/image", "group/omics", "group/shared", "group/shared/float64",
                                     "group/shared/int64"]
    assert record["group/image"].numpy().size == 16 and record["group/shared"].numpy().size == 6 + 12 + 2 + 4
    back = layout.unpack(record, layout.sha256)
    assert set(back) == set(model)
    for name, value in model.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype, name
        assert back[name].tobytes() == value.tobytes(), name
    # the layout depends on names, shapes, dtypes and groups only, not on the dict's order or values
    assert PackLayout.of(dict(reversed(list(_model(1).items()))), GROUPS).sha256 == layout.sha256


def test_layout_mismatch_is_refused_with_a_clear_error() -> None:
    model = _model()
    layout = PackLayout.of(model, GROUPS)
    packed = layout.pack(model)
    other = PackLayout.of({**model, "fusion.w": np.zeros(7, np.float32)}, GROUPS)  # another model version
    with pytest.raises(LayoutMismatch, match="different model versions"):
        other.unpack(packed, layout.sha256)
    regrouped = PackLayout.of(model, {**GROUPS, "fusion.w": "omics"})
    assert regrouped.sha256 != layout.sha256
    with pytest.raises(LayoutMismatch, match="cannot pack 'fusion.w'"):
        other.pack(model)

    # the coordinator rejects (does not average) a reply packed with another layout, and says why
    strategy = build_strategy("fedavg", GROUPS, min_sites=1)
    strategy._global = model
    bad = _reply("B", _model(2), packed_with=regrouped)
    arrays, _ = strategy.aggregate_train(1, [_reply("A", _model(1), packed_with=layout), bad])
    assert [r["site"] for r in strategy.rejected] == ["B"] and "layout" in strategy.rejected[0]["reason"]
    np.testing.assert_array_equal(arrays_to_numpy(arrays)["fusion.w"], _model(1)["fusion.w"])


def _reply(site: str, update: dict[str, np.ndarray], packed_with: PackLayout | None, n: int = 10) -> Message:
    request = Message(RecordDict({}), dst_node_id=sum(map(ord, site)), message_type="train")
    counts = {"num-examples": n, "num-examples-image": n - 2 if site != "C" else 0, "num-examples-omics": n,
              "num-examples-clinical": n}
    record = {"site-id": site}
    if packed_with is not None:
        record[LAYOUT_KEY] = packed_with.sha256
    arrays = packed_with.pack(update) if packed_with is not None else numpy_to_arrays(update)
    return Message(roundtrip(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(counts),
                                         SITE_KEY: ConfigRecord(record)})), reply_to=request)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "client-dp", "private-head"])
def test_aggregation_of_packed_replies_equals_the_per_tensor_path(name: str) -> None:
    current = _model()
    private = {"heads.risk.w", "heads.risk.b"} if name == "private-head" else set()
    updates = {site: {k: (v + np.asarray(np.random.default_rng(i).normal(size=v.shape)).astype(v.dtype))
                      for k, v in current.items() if k not in private} for i, site in enumerate("ABC")}
    results = []
    for packed in (False, True):
        strategy = build_strategy("fedavg" if name in ("client-dp", "private-head") else name, GROUPS, min_sites=1,
                                  private_keys=private)
        strategy._global = current
        strategy.current_arrays = current
        layout = PackLayout.of({k: v for k, v in current.items() if k not in private}, GROUPS)
        replies = [_reply(site, update, layout if packed else None, n=10 * (i + 1))
                   for i, (site, update) in enumerate(updates.items())]
        if name == "client-dp":
            np.random.seed(11)
            arrays, _ = ClientLevelDP(strategy, noise_multiplier=1.0, clipping_norm=1.0).aggregate_train(1, replies)
        else:
            arrays, _ = strategy.aggregate_train(1, replies)
        assert strategy.rejected == []
        results.append(arrays_to_numpy(arrays))
    per_tensor, from_packed = results
    assert list(from_packed) == list(per_tensor) == list(current)  # the global model's keys, in its order
    for key, value in per_tensor.items():
        assert from_packed[key].dtype == value.dtype
        np.testing.assert_allclose(from_packed[key], value, rtol=0, atol=1e-6, err_msg=key)
    for key in private:
        np.testing.assert_array_equal(from_packed[key], current[key])


def test_real_client_app_answers_packed_with_one_array_per_group(tmp_path: Path) -> None:
    """The site's train handler, behind a serialising Grid: packed request in, one Array per group out, and
    the coordinator's round equals the same round sent per tensor."""
    import torch

    from fedfusion.client.app import make_client_app
    from fedfusion.common.config import ModelConfig
    from fedfusion.common.models import create_model
    from fedfusion.common.packing import name_groups
    from fedfusion.server.messaging import send_and_collect
    from tests.dashboard_runs import toy_schema
    from tests.secagg_fakes import LoopbackGrid
    from tests.sitegen import make_site

    schema_path = toy_schema().save(tmp_path / "schema.json")
    node = {"manifest": str(make_site(tmp_path / "site", n=30, seed=1)), "schema": str(schema_path),
            "site-id": "A", "device": "cpu", "min-eval-cases": "0"}
    run_config = {"num-server-rounds": 1, "min-sites": 1, "seed": 5, "schema": str(schema_path),
                  "run-dir": str(tmp_path / "run"), "local-epochs": 1, "local-batch-size": 16, "local-lr": 3e-3,
                  "fusion": "concat", "local-device": "cpu", "round-timeout": 60.0}
    torch.manual_seed(5)
    model = create_model(toy_schema(), ModelConfig(fusion="concat"))
    groups = name_groups(model)
    current = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    results: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for packed in (True, False):
            strategy = build_strategy("fedavg", groups, min_sites=1)
            if not packed:  # the per-tensor format of before: the site answers in the format it was asked in
                strategy._packed = lambda values, config: (numpy_to_arrays(values), config)  # type: ignore
            grid = LoopbackGrid(make_client_app(run_config), [1], node_configs={1: node})
            messages = list(strategy.configure_train(1, numpy_to_arrays(current), ConfigRecord(), grid))
            assert (LAYOUT_KEY in messages[0].content[CONFIG_KEY]) is packed
            torch.manual_seed(0)
            replies = send_and_collect(grid, messages, timeout=60)
            assert len(replies) == 1 and not replies[0].has_error()
            reply = replies[0].content
            assert len(reply.array_records) == 1
            if packed:
                modalities = {g for g in groups.values() if g in ("image", "clinical", "omics")}
                others = {f"group/shared/{v.dtype.name}" for v in current.values() if v.dtype != np.float32}
                assert sorted(reply[ARRAYS_KEY].keys()) == sorted(
                    {"group/shared", *(f"group/{g}" for g in modalities), *others})
                assert len(reply[ARRAYS_KEY]) < len(current) // 5
                assert reply[SITE_KEY][LAYOUT_KEY] == PackLayout.of(current, groups).sha256
            else:
                assert len(reply[ARRAYS_KEY]) == len(current)
            arrays, _ = strategy.aggregate_train(1, replies)
            assert strategy.rejected == []
            results.append(arrays_to_numpy(arrays))
    finally:
        torch.set_num_threads(threads)
    for key, value in results[1].items():
        np.testing.assert_allclose(results[0][key], value, rtol=0, atol=1e-6, err_msg=key)

    # a site whose model differs from the coordinator's refuses the packed global model
    config = {LAYOUT_KEY: "0" * 64}
    with pytest.raises(LayoutMismatch, match="different model versions"):
        received_state(PackLayout.of(current, groups).pack(current), config, model)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "float16"])
def test_vectors_encode_to_numpys_own_bytes_and_decode_without_a_copy(dtype: str) -> None:
    """encode_vector writes exactly the bytes Flower's Array(ndarray) writes (np.save's format), so any
    Flower peer reads them; decode_vector returns the same values as Array.numpy(), as a read-only view."""
    from flwr.app import Array

    from fedfusion.common.packing import decode_vector, encode_vector

    vector = (np.random.default_rng(3).normal(size=1001) * 100).astype(dtype)
    encoded = encode_vector(vector)
    assert encoded.data == Array(vector).data and encoded.dtype == Array(vector).dtype
    decoded = decode_vector(roundtrip(RecordDict({ARRAYS_KEY: ArrayRecord({"v": encoded})}))[ARRAYS_KEY]["v"])
    np.testing.assert_array_equal(decoded, Array(vector).numpy())
    assert decoded.dtype == vector.dtype and not decoded.flags.writeable


def test_decode_refuses_pickles_truncated_bytes_and_other_stypes() -> None:
    from flwr.app import Array

    from fedfusion.common.packing import decode_vector, encode_vector

    good = encode_vector(np.arange(10, dtype=np.float32))
    truncated = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(LayoutMismatch, match="do not match its header"):
        decode_vector(truncated)
    header = good.data[:good.data.index(b"}") + 1].replace(b"'<f4'", b"'|O' ")
    pickled = Array(dtype="object", shape=(10,), stype="numpy.ndarray", data=header + good.data[len(header):])
    with pytest.raises(LayoutMismatch, match="plain C-ordered"):
        decode_vector(pickled)
    with pytest.raises(LayoutMismatch, match="stype"):
        decode_vector(Array(dtype=good.dtype, shape=good.shape, stype="torch.raw", data=good.data))
    with pytest.raises(LayoutMismatch, match="not in numpy's format"):
        decode_vector(Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=b"not numpy" * 10))


def test_pack_writes_each_array_as_numpy_writes_the_concatenated_tensors() -> None:
    """pack joins the tensors' bytes straight into the message; the result is byte for byte what
    Array(np.concatenate(...)) writes, including a non-contiguous tensor and a 0-d counter."""
    from flwr.app import Array

    model = _model()
    model["heads.risk.w"] = np.asfortranarray(model["heads.risk.w"])  # a transposed-layout tensor
    layout = PackLayout.of(model, GROUPS)
    record = layout.pack(model)
    for key, (total, dtype) in layout.sizes.items():
        slots = [s for s in layout.slots if s.key == key]
        expected = np.concatenate([np.asarray(model[s.name]).reshape(-1) for s in slots]).astype(dtype)
        assert record[key].data == Array(expected).data and expected.size == total
    np.testing.assert_array_equal(layout.unpack(record, layout.sha256)["heads.risk.w"], model["heads.risk.w"])
