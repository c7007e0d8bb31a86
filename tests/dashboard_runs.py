"""A real federated run folder in seconds, for the dashboard tests.

The coordinator's real round loop (``run_federation`` + ``write_run_outputs``, what the ServerApp runs)
drives the real ClientApp (training, DP-SGD charged to each site's own ledger, refusals) on small
sites from ``tests.sitegen``. Only the transport differs from ``fedfusion simulate``: an in-process
Grid hands each message to the ClientApp at once, because starting Ray alone takes ~30 s on 2 cores.
Each reply that leaves a site is written to that site's audit log with :class:`AuditLog`, exactly
the record the ClientApp keeps (arrays and metrics as sent).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict

from fedfusion.client.app import make_client_app
from fedfusion.client.audit import AuditLog
from fedfusion.common.config import ClinicalColumn, ImageSpec, Schema
from fedfusion.common.federation_config import FederationConfig
from fedfusion.common.flower_adapter import message_identity
from fedfusion.common.privacy_policy import PrivacyPolicy
from fedfusion.common.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_numpy
from fedfusion.server.federation import FederationResult, run_federation
from fedfusion.server.report import write_run_outputs
from tests.sitegen import OMICS, make_site

EVIL = "<script>alert(1)</script>"
RUN_ID = 4711
# σ = 1, one DP step at sample rate 1 a round: A can afford round 1 (ε 4.73), not round 2 (ε 7.08)
BUDGETS = {"A": 6.0, EVIL: 20.0}
ROUNDS = 2


def toy_schema() -> Schema:
    return Schema(name="toy", task="both", classes=("benign", "malignant"),
                  clinical=(ClinicalColumn("age"), ClinicalColumn("size_mm"),
                            ClinicalColumn("grade", kind="categorical", categories=("G1", "G2", "G3"))),
                  omics=OMICS, image=ImageSpec(size=(32, 32), channels=1))


@dataclass
class InProcessGrid:
    """A Grid whose nodes answer through ``app`` at push time, each with its own node config."""

    app: Any
    node_configs: dict[int, dict[str, Any]]
    audit: dict[int, AuditLog] = field(default_factory=dict)
    _replies: dict[str, Message] = field(default_factory=dict)
    _count: int = 0

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            self._count += 1
            message_id = f"m{self._count}"
            message.metadata.__dict__["_message_id"] = message_id
            node = int(message.metadata.dst_node_id)
            context = Context(run_id=RUN_ID, node_id=node, node_config=dict(self.node_configs[node]),
                              state=RecordDict(), run_config={})
            reply = self.app(message, context)
            if reply.has_content() and node in self.audit:
                self._record(node, message, reply)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def _record(self, node: int, message: Message, reply: Message) -> None:
        config = message.content.config_records.get(CONFIG_KEY)
        arrays = reply.content.array_records.get(ARRAYS_KEY)
        metrics = reply.content.metric_records.get(METRICS_KEY)
        self.audit[node].record_reply(arrays_to_numpy(arrays) if arrays is not None else {},
                                      dict(metrics) if metrics is not None else {}, run_id=RUN_ID,
                                      server_round=int(config["server-round"]) if config else 0,
                                      message_type=message.metadata.message_type)


@dataclass(frozen=True)
class DashboardRun:
    """A finished run folder and, per site, the folder holding its site.toml, audit log and ledger."""

    root: Path
    run_dir: Path
    schema_path: Path
    site_dirs: dict[str, Path]

    def site_toml(self, site: str, folder: Path, *, site_id: str | None = None, port: int = 1) -> Path:
        """A site.toml in ``folder`` for ``site``'s data, audit log and ledger (optionally under another id,
        e.g. a malicious one). Port 1: nothing listens there, so health reads "down"."""
        data = self.site_dirs[site]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "site.toml"
        path.write_text(
            "[site]\n"
            f"id = {_toml(site_id if site_id is not None else site)}\n"
            f"manifest = {_toml(str(data / 'manifest.csv'))}\n"
            f"schema = {_toml(str(self.schema_path))}\n"
            f"audit-log = {_toml(str(data / 'audit.jsonl'))}\n"
            'device = "cpu"\n\n'
            '[coordinator]\naddress = "127.0.0.1:9092"\ninsecure = true\n\n'
            f"[supernode]\nport = {port}\n\n"
            f"[privacy]\nmax-epsilon = {BUDGETS[site]}\nledger = {_toml(str(data / 'privacy-ledger.json'))}\n")
        return path


def _toml(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_dashboard_run(root: Path, rounds: int = ROUNDS, run_dir: Path | None = None) -> DashboardRun:
    """Two sites (one named like an XSS payload) train ``rounds`` DP rounds; site A refuses the last.
    The run folder is ``run_dir`` (default ``root/runs/study/federated``)."""
    run_dir = run_dir or root / "runs" / "study" / "federated"
    root.mkdir(parents=True, exist_ok=True)
    schema_path = toy_schema().save(root / "schema.json")
    site_dirs, node_configs, audit = {}, {}, {}
    for node, site in enumerate(BUDGETS, start=1):
        folder = root / "sites" / f"site{node}"
        make_site(folder, n=20, seed=node)
        policy = PrivacyPolicy(max_epsilon=BUDGETS[site], ledger=str(folder / "privacy-ledger.json"), required=True)
        node_configs[node] = {"manifest": str(folder / "manifest.csv"), "schema": str(schema_path), "site-id": site,
                              "device": "cpu", **policy.node_config()}
        audit[node] = AuditLog(folder / "audit.jsonl", site_id=site)
        site_dirs[site] = folder
    run_config = {"num-server-rounds": rounds, "min-sites": 2, "seed": 3, "schema": str(schema_path),
                  "run-dir": str(run_dir), "local-epochs": 1, "local-batch-size": 16,
                  "local-lr": 3e-3, "fusion": "concat", "dp-mode": "sample", "dp-noise-multiplier": 1.0,
                  "study": "toy-dp", "round-timeout": 60.0}
    grid = InProcessGrid(make_client_app(run_config), node_configs, audit)
    result = run_in_process(grid, run_config)
    write_run_outputs(result)
    return DashboardRun(root=root, run_dir=run_dir, schema_path=schema_path, site_dirs=site_dirs)


def run_in_process(grid: Any, run_config: dict[str, Any]) -> FederationResult:
    """``run_federation`` over an in-process grid, with the task identity Flower's runtime would set
    in a ServerApp process (messages need it), restored afterwards."""
    cfg = FederationConfig.from_run_config(run_config)
    with message_identity(task_id=1, run_id=RUN_ID, node_id=0):
        return run_federation(grid, cfg)


_RUNS: dict[str, DashboardRun] = {}


def shared_dashboard_run(factory: pytest.TempPathFactory) -> DashboardRun:
    """One run per test session, shared by the server and client dashboard tests (it trains for seconds)."""
    key = str(factory.getbasetemp())
    if key not in _RUNS:
        _RUNS[key] = make_dashboard_run(factory.mktemp("dashboard-run"))
    return _RUNS[key]
