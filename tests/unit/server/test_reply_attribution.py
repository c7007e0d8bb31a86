"""The coordinator attributes replies by signature against its roster: a site claiming another site's id
is refused, through the real ClientApp (signing mod) and the real federation loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedfusion.client.app import make_client_app
from fedfusion.common.reply_signature import PURPOSE, SIGNATURE_RECORD, signed_statement, unsigned_reply_sha256
from fedfusion.common.roster import Roster, sign, write_roster
from fedfusion.server.reply_attribution import attribute_reply
from tests.dashboard_runs import InProcessGrid, run_in_process, toy_schema
from tests.sitegen import make_site

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages built outside Flower's runtime


def _keypair(folder: Path, name: str) -> tuple[Path, str, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = folder / f"{name}.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return path, line, key


def test_a_site_claiming_another_sites_id_is_refused(tmp_path: Path) -> None:
    schema_path = toy_schema().save(tmp_path / "schema.json")
    keys = {site: _keypair(tmp_path, site) for site in ("A", "B")}
    roster_path = tmp_path / "roster.json"
    write_roster(roster_path, {site: line for site, (_, line, _) in keys.items()})
    node_configs = {}
    # Node 2 is site B (its own key) but reports as site A.
    for node, claimed, key_of in ((1, "A", "A"), (2, "A", "B")):
        manifest = make_site(tmp_path / f"site{node}", n=40, seed=node)
        node_configs[node] = {"manifest": str(manifest), "schema": str(schema_path), "site-id": claimed,
                              "device": "cpu", "signing-key": str(keys[key_of][0]), "min-eval-cases": "0"}
    run_config = {"num-server-rounds": 1, "min-sites": 1, "seed": 3, "schema": str(schema_path),
                  "run-dir": str(tmp_path / "run"), "local-epochs": 1, "local-batch-size": 16, "fusion": "concat",
                  "round-timeout": 30.0, "roster": str(roster_path)}
    result = run_in_process(InProcessGrid(make_client_app(run_config), node_configs), run_config)

    trained = [m for m in result.site_metrics if m["phase"] == "train"]
    evaluated = [m for m in result.site_metrics if m["phase"] == "evaluate"]
    assert [m["site"] for m in trained] == ["A"]  # only node 1's update was averaged
    assert trained[0]["num-examples"] == result.rounds[1]["train_num-examples"]  # the impostor's cases not counted
    assert {m["site"] for m in evaluated} == {"A"} and len(evaluated) == 2  # rounds 0 and 1, node 1 only
    (rejected,) = result.rejected
    assert rejected["site"] == "2" and "claims site 'A' but its signature does not verify" in rejected["reason"]

    # Without the roster the same impostor is counted as site A: the attack the roster stops.
    open_config = {**run_config, "run-dir": str(tmp_path / "open")}
    open_config.pop("roster")
    unchecked = run_in_process(InProcessGrid(make_client_app(open_config), node_configs), open_config)
    assert [m["site"] for m in unchecked.site_metrics if m["phase"] == "train"] == ["A", "A"]


def _reply(site_named: str) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=4,
                      message_type="evaluate")
    request.metadata.__dict__["_message_id"] = "req-1"  # what the Grid sets when it pushes
    return Message(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))}),
                               "metrics": MetricRecord({"num-examples": 5}),
                               "site": ConfigRecord({"site-id": site_named})}), reply_to=request)


def _signed(reply: Message, key: ec.EllipticCurvePrivateKey, signer: str, reply_to: str = "req-1") -> Message:
    statement = signed_statement(reply.metadata.run_id, reply_to, signer, unsigned_reply_sha256(reply))
    reply.content.config_records[SIGNATURE_RECORD] = ConfigRecord({"site-id": signer,
                                                                   "signature": sign(key, PURPOSE, statement)})
    return reply


@pytest.fixture()
def roster_keys(tmp_path: Path) -> tuple[Roster, dict[str, ec.EllipticCurvePrivateKey]]:
    keys = {site: _keypair(tmp_path, site) for site in ("A", "B")}
    return Roster.from_lines({s: line for s, (_, line, _) in keys.items()}), {s: k for s, (_, _, k) in keys.items()}


def test_attribution_binds_site_payload_and_request(roster_keys) -> None:
    roster, keys = roster_keys
    assert attribute_reply(_signed(_reply("A"), keys["A"], "A"), roster) == ("A", "")
    unsigned = attribute_reply(_reply("A"), roster)
    assert unsigned[0] is None and "not signed" in unsigned[1]
    mismatch = attribute_reply(_signed(_reply("A"), keys["B"], "B"), roster)  # B signs honestly, names A inside
    assert mismatch[0] is None and "names site 'A' but was signed by site 'B'" in mismatch[1]
    altered = _signed(_reply("A"), keys["A"], "A")
    altered.content["metrics"]["num-examples"] = 500  # changed after signing
    assert attribute_reply(altered, roster)[0] is None
    replayed = _signed(_reply("A"), keys["A"], "A", reply_to="an-earlier-request")
    assert attribute_reply(replayed, roster)[0] is None
    outsider = ec.generate_private_key(ec.SECP256R1())
    assert attribute_reply(_signed(_reply("C"), outsider, "C"), roster)[0] is None
