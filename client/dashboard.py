"""``fedfusion site dashboard site.toml``: a local, read-only page for hospital IT.

Hospital IT must answer "is our node up, and what left our building?" in minutes, from the files the
site already keeps: ``site.toml``, the manifest (through ``site check``'s validation), the audit log
(:mod:`fedfusion.client.audit`) and the privacy ledger (:mod:`fedfusion.client.ledger`). The page
writes nothing and talks to nobody outside this machine.

Never a patient value: the manifest appears as counts and coverage fractions only (``site check``'s
summary without its median follow-up time, which is one patient's value when the count is odd), a
manifest with problems shows only how many (``fedfusion site check`` lists them in a terminal, where
they may name cases), and the audit log holds shapes, norms and the aggregate metrics that left.

Health: the supervisor's status file (``site-status.json`` beside the audit log, written by
``fedfusion site start``: running / restarting / stopped / failed, restarts, last exit code) plus a
read-only probe: is the SuperNode's local Runtime API port (``[supernode] port``) accepting
connections, and is a warm SuperExec process for that port running (``/proc``)? Where neither can be
told, it says "unknown".
Safety rules (loopback, token, escaping, GET only) live in :mod:`fedfusion.common.dashboard`.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, PlainTextResponse

from fedfusion.client.audit import AuditLogError, audit_path_for, filter_records, iter_records, summarise
from fedfusion.client.daemon import SiteConfig
from fedfusion.common.config import ConfigError
from fedfusion.common.dashboard import (
    DashboardError,
    check_bind,
    json_safe,
    line_chart,
    link,
    make_environment,
    resolve_token,
    secure,
    serve,
)

LIVE_WINDOW_S = 600.0  # the page refreshes itself while the audit log or ledger changed this recently
MAX_RECORDS = 200
#: ``Manifest.summary()`` keys shown; anything else (e.g. ``median_time``) stays off the page.
MANIFEST_KEYS = ("rows", "splits", "labels", "events", "modality_coverage", "clinical_missing")


def _probe_port(port: int, timeout: float = 0.3) -> bool | None:
    """True when something accepts connections on 127.0.0.1:``port``; None when that cannot be tried."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except (ConnectionRefusedError, TimeoutError):
        return False
    except OSError:
        return None


def _processes(markers: tuple[str, ...]) -> list[int] | None:
    """Ids of processes whose command line holds every marker; None where /proc cannot be read."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in args]
        if all(any(m in a for a in text) for m in markers):
            found.append(int(entry.name))
    return sorted(found)


def site_health(cfg: SiteConfig) -> dict[str, Any]:
    """Liveness of the SuperNode and the warm SuperExec, and the connection settings (no secrets)."""
    listening = _probe_port(cfg.port)
    supernode_pids = _processes(("fedfusion.client.supernode_runner", cfg.site_id))
    if listening:
        supernode = {"state": "up", "detail": f"Runtime API listening on 127.0.0.1:{cfg.port}"}
    elif listening is False:
        supernode = {"state": "down", "detail": f"nothing listens on 127.0.0.1:{cfg.port} ([supernode] port)"}
    else:
        supernode = {"state": "unknown", "detail": "the port could not be probed"}
    if supernode_pids:
        supernode["detail"] += f"; process {', '.join(map(str, supernode_pids))}"
    if not cfg.warm:
        superexec = {"state": "not used", "detail": "[supernode] warm = false: Flower's own SuperExec"}
    else:
        pids = _processes(("fedfusion.client.warm_executor", f"127.0.0.1:{cfg.port}"))
        superexec = ({"state": "unknown", "detail": "process table not readable here"} if pids is None else
                     {"state": "up", "detail": f"process {', '.join(map(str, pids))}"} if pids else
                     {"state": "down", "detail": "no warm SuperExec process for this port"})
    return {"supernode": supernode, "superexec": superexec, "coordinator": cfg.address,
            "transport": "INSECURE (no TLS)" if cfg.insecure else "TLS",
            "node_auth": "on" if cfg.auth_private_key else "off", "device": cfg.device,
            "privacy_policy": "on" if cfg.privacy.required else "none",
            "app_approval": "off" if cfg.approved_apps is None else f"{len(cfg.approved_apps)} approved app(s)",
            "daemon": _daemon_status(cfg), "source": "status file + probe"}


def _daemon_status(cfg: SiteConfig) -> dict[str, Any]:
    """What ``fedfusion site start``'s supervisor last wrote (state, restarts, last exit), or unknown."""
    from fedfusion.client.daemon import status_path_for
    from fedfusion.client.supervisor import read_status

    try:
        status = read_status(status_path_for(cfg))
    except ConfigError:
        status = None
    if status is None:
        return {"state": "unknown", "detail": "no status file: the site has not been started with this site.toml"}
    keep = ("state", "restarts", "last_exit_code", "started", "updated", "message", "retry_in_s")
    return {k: status[k] for k in keep if k in status}


_MANIFEST_CACHE: dict[tuple[str, str], tuple[tuple[float, float], dict[str, Any]]] = {}


def manifest_summary(cfg: SiteConfig) -> dict[str, Any]:
    """``site check``'s validation of the manifest (images not opened), as counts and fractions only."""
    from fedfusion.common.config import load_schema
    from fedfusion.common.manifest import ManifestError, load_manifest

    try:
        stamp = (cfg.manifest.stat().st_mtime, cfg.schema.stat().st_mtime)
    except OSError as err:
        return {"ok": False, "message": f"cannot read {err.filename}: {err.strerror}"}
    key = (str(cfg.manifest), str(cfg.schema))
    cached = _MANIFEST_CACHE.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    try:
        schema = load_schema(cfg.schema)
        manifest = load_manifest(cfg.manifest, schema, check_images=False)
    except ConfigError as err:
        result: dict[str, Any] = {"ok": False, "message": f"schema error: {err}"}
    except ManifestError as err:  # the issues may name cases and values: only their number is shown
        result = {"ok": False, "message": f"{len(err.issues)} problem(s) in the manifest; run 'fedfusion site "
                                          f"check {cfg.manifest} --schema {cfg.schema}' on this machine to list them"}
    else:
        summary = manifest.summary()
        result = {"ok": True, "schema": f"{schema.name} ({schema.task})", "warnings": list(manifest.warnings),
                  **{k: summary[k] for k in MANIFEST_KEYS if k in summary}}
    _MANIFEST_CACHE[key] = (stamp, result)
    return result


def ledger_view(cfg: SiteConfig) -> dict[str, Any]:
    """Each study's ε spent and remaining (the ledger's own accounting), plus its last charges.

    If the ledger API cannot be used (a newer ledger format, a missing accountant library) the ledger
    JSON is read directly and ε is the ``epsilon_after`` its last entry recorded."""
    from fedfusion.common.privacy_policy import PrivacyError

    policy = cfg.privacy
    path = Path(policy.ledger)
    view: dict[str, Any] = {"path": str(path), "max_epsilon": policy.max_epsilon, "delta": policy.delta,
                            "accountant": policy.accountant, "policy": policy.required, "studies": [],
                            "charges": [], "error": "", "method": "the ledger's accountant"}
    if not path.is_file():
        return view
    try:
        raw = json.loads(path.read_text())
        studies = raw["studies"] if isinstance(raw, dict) and isinstance(raw.get("studies"), dict) else {}
    except (OSError, ValueError) as err:
        return {**view, "error": f"the ledger cannot be read ({err}); the site will not train until it can"}
    try:
        from fedfusion.client.ledger import PrivacyLedger, status_rows

        view["studies"] = status_rows(PrivacyLedger(path, policy.accountant), policy.max_epsilon, policy.delta)
    except PrivacyError as err:
        return {**view, "error": str(err)}
    except (ImportError, AttributeError, TypeError, KeyError, ValueError):
        view["method"] = "epsilon_after recorded in the ledger"
        view["studies"] = [_raw_study_row(name, study, policy.max_epsilon) for name, study in sorted(studies.items())]
    for name, study in studies.items():
        for entry in study.get("entries", []) if isinstance(study, dict) else []:
            if isinstance(entry, dict):
                view["charges"].append({"study": name, "time": entry.get("time", ""), "run": entry.get("run"),
                                        "round": entry.get("round"), "steps": entry.get("steps"),
                                        "noise_multiplier": entry.get("noise_multiplier"),
                                        "epsilon_after": entry.get("epsilon_after")})
    view["charges"].sort(key=lambda c: str(c["time"]))
    return view


def _raw_study_row(name: str, study: Any, max_epsilon: float) -> dict[str, Any]:
    entries = [e for e in (study.get("entries", []) if isinstance(study, dict) else []) if isinstance(e, dict)]
    spent = next((float(e["epsilon_after"]) for e in reversed(entries)
                  if isinstance(e.get("epsilon_after"), int | float)), math.nan)
    return {"study": name, "rounds": len(entries), "steps": sum(int(e.get("steps", 0)) for e in entries),
            "epsilon": spent, "max_epsilon": max_epsilon,
            "remaining": max(max_epsilon - spent, 0.0) if math.isfinite(max_epsilon) else math.inf,
            "last": entries[-1].get("time", "") if entries else ""}


def audit_view(config_path: Path, run: str | None = None, server_round: int | None = None) -> dict[str, Any]:
    """The audit log, filtered by run and/or round: per-round summary, the last records, the last rounds."""
    path = audit_path_for(config_path)
    view: dict[str, Any] = {"path": str(path), "exists": path.is_file(), "runs": {}, "records": [], "last_rounds": [],
                            "error": "", "total": 0}
    if not view["exists"]:
        return view
    try:
        runs = summarise(path, run=run, server_round=server_round)
        records = list(filter_records(iter_records(path), run=run, server_round=server_round))
    except AuditLogError as err:
        return {**view, "error": str(err)}
    view["total"] = len(records)
    view["records"] = [{k: r.get(k) for k in ("time", "site_id", "run_id", "round", "message_type", "num_tensors",
                                              "payload_bytes", "epsilon", "metrics", "sha256")}
                       for r in records[-MAX_RECORDS:]][::-1]
    view["runs"] = {run_id: {"replies": s.replies, "payload_bytes": s.payload_bytes, "last_epsilon": s.last_epsilon,
                             "rounds": {n: {"replies": p.replies, "payload_bytes": p.payload_bytes,
                                            "types": dict(p.message_types), "last_epsilon": p.last_epsilon,
                                            "first_time": p.first_time, "last_time": p.last_time}
                                        for n, p in sorted(s.rounds.items())}}
                    for run_id, s in runs.items()}
    flat = [{"run": run_id, "round": n, **part}
            for run_id, s in view["runs"].items() for n, part in s["rounds"].items()]
    view["last_rounds"] = sorted(flat, key=lambda r: str(r["last_time"]), reverse=True)[:10]
    return view


def _charts(audit: dict[str, Any], ledger: dict[str, Any]) -> list[Any]:
    sent = {f"run {run_id}": [(float(n), float(p["payload_bytes"])) for n, p in s["rounds"].items()]
            for run_id, s in audit["runs"].items()}
    spent: dict[str, list[tuple[float, float]]] = {}
    for charge in ledger["charges"]:
        if isinstance(charge["epsilon_after"], int | float):
            points = spent.setdefault(str(charge["study"]), [])
            points.append((float(len(points) + 1), float(charge["epsilon_after"])))
    budget = {s: ledger["max_epsilon"] for s in spent} if math.isfinite(ledger["max_epsilon"]) else {}
    return [line_chart(sent, title="bytes that left this site per round", y_label="bytes"),
            line_chart(spent, title="ε spent per study after each charge (dashed: max-epsilon)", x_label="charge",
                       y_label="ε", limits=budget)]


PAGE = """{% extends "base.html" %}
{% block content %}
{% if error %}<section><h2>site.toml</h2><p class="badge bad">{{ error }}</p></section>{% else %}
<section id="health"><h2>Health <span class="muted small">{{ health.source }}</span></h2><table>
<tr><th>site</th><td id="site-id">{{ site_id }}</td></tr>
<tr><th>daemon</th><td id="daemon-state"><span class="badge {{ {'running': 'ok', 'failed': 'bad', 'stopped': 'bad'
}.get(health.daemon.state, 'warn') }}">{{ health.daemon.state }}</span> <span class="small muted">{% for k, v in
health.daemon.items() if k != 'state' %}{{ k }} {{ v }}{{ ' · ' if not loop.last }}{% endfor %}</span></td></tr>
{% for name in ('supernode', 'superexec') %}<tr><th>{{ 'SuperNode' if name == 'supernode' else 'warm SuperExec' }}</th>
<td><span class="badge {{ {'up': 'ok', 'down': 'bad'}.get(health[name].state, 'warn') }}">{{ health[name].state
}}</span> <span class="small muted">{{ health[name].detail }}</span></td></tr>{% endfor %}
<tr><th>coordinator</th><td>{{ health.coordinator }} · {{ health.transport }} · node authentication {{
 health.node_auth }}</td></tr>
<tr><th>device · privacy policy · app approval</th><td>{{ health.device }} · {{ health.privacy_policy }} · {{
 health.app_approval }}</td></tr></table></section>
<section id="manifest"><h2>Manifest <span class="muted small">counts and coverage only</span></h2>
{% if manifest.ok %}<table><tr><th>schema</th><td>{{ manifest.schema }}</td></tr>
<tr><th>rows</th><td class="n">{{ manifest.rows }}</td></tr>
<tr><th>splits</th><td>{% for k, v in manifest.splits.items() %}{{ k }} {{ v }}{{ ' · ' if not loop.last }}{% endfor
%}</td></tr>{% if manifest.get('labels') %}<tr><th>labels</th><td>{% for k, v in manifest.labels.items() %}{{ k }} {{
 v }}{{ ' · ' if not loop.last }}{% endfor %}</td></tr>{% endif %}
{% if manifest.get('events') is not none %}<tr><th>events</th><td class="n">{{ manifest.events }}</td></tr>{% endif %}
<tr><th>modality coverage</th><td>{% for k, v in manifest.modality_coverage.items() %}{{ k }} {{ '%.0f'|format(100 * v)
}}%{{ ' · ' if not loop.last }}{% endfor %}</td></tr>
{% if manifest.get('clinical_missing') %}<tr><th>clinical values missing</th><td>{% for k, v in
 manifest.clinical_missing.items() %}{{ k }} {{ '%.0f'|format(100 * v) }}%{{ ' · ' if not loop.last }}{% endfor
%}</td></tr>{% endif %}</table>
{% for w in manifest.warnings %}<p class="small"><span class="badge warn">warning</span> {{ w }}</p>{% endfor %}
{% else %}<p><span class="badge bad">not valid</span> {{ manifest.message }}</p>{% endif %}</section>
<section id="ledger"><h2>Privacy ledger <span class="muted small">{{ ledger.path }}</span></h2>
{% if ledger.error %}<p><span class="badge bad">error</span> {{ ledger.error }}</p>{% endif %}
<p class="small muted">{% if ledger.policy %}max ε {{ ledger.max_epsilon|num }} per study at δ = {{ ledger.delta }},
accountant {{ ledger.accountant }}{% else %}no [privacy] policy in site.toml: the site follows each run's request{%
endif %} · ε from {{ ledger.method }}</p>
<table id="ledger-table"><tr><th>study</th><th>rounds charged</th><th>steps</th><th>ε spent</th><th>ε max</th>
<th>remaining</th><th></th><th>last charge</th></tr>{% for s in ledger.studies %}<tr><td>{{ s.study }}</td>
<td class="n">{{ s.rounds }}</td><td class="n">{{ s.steps }}</td><td class="n">{{ s.epsilon|num }}</td>
<td class="n">{{ s.max_epsilon|num }}</td><td class="n">{{ s.remaining|num }}</td><td>{% if s.max_epsilon is number
 and s.max_epsilon < 1e300 and s.epsilon == s.epsilon %}<span class="bar"><span style="width:{{ [100, 100 * s.epsilon
 / s.max_epsilon]|min|round(1) }}%"></span></span>{% endif %}</td><td>{{ s.last|iso }}</td></tr>
{% else %}<tr><td colspan="8" class="muted">no study has spent privacy budget at this site</td></tr>{% endfor %}
</table></section>
<section id="audit"><h2>What left this site <span class="muted small">audit log {{ audit.path }}</span></h2>
<form method="get" action="/" class="small">{% if token %}<input type="hidden" name="token" value="{{ token }}">{%
 endif %}run <input name="run" value="{{ run or '' }}" size="10"> round <input name="round" type="number" min="0"
 value="{{ server_round if server_round is not none else '' }}" style="width:5em"> <button>filter</button>
 <a href="{{ url('/') }}">all</a></form>
{% if audit.error %}<p><span class="badge bad">damaged</span> {{ audit.error }}</p>
{% elif not audit.exists %}<p class="muted">no reply has left this site yet (no audit log)</p>{% else %}
<h3>Last rounds</h3><table id="rounds-table"><tr><th>run</th><th>round</th><th>replies</th><th>types</th>
<th>bytes</th><th>ε (last)</th><th>last reply</th></tr>{% for r in audit.last_rounds %}<tr>
<td><a href="{{ url('/', run=r.run) }}">{{ r.run }}</a></td><td class="n"><a href="{{ url('/', run=r.run,
 round=r.round) }}">{{ r.round }}</a></td><td class="n">{{ r.replies }}</td><td>{% for k, v in r.types.items() %}{{ k
 }}×{{ v }} {% endfor %}</td><td class="n">{{ r.payload_bytes|num }}</td><td class="n">{{ r.last_epsilon|num }}</td>
<td class="t">{{ r.last_time|iso }}</td></tr>
{% else %}<tr><td colspan="7" class="muted">no matching replies</td></tr>{% endfor %}
</table>
<div class="charts">{% for c in charts %}{{ c }}{% endfor %}</div>
<h3>Replies ({{ audit.total }}{% if audit.total > audit.records|length %}, newest {{ audit.records|length }} shown{%
 endif %})</h3><div class="scroll"><table id="audit-table"><tr><th>time</th><th>run</th><th>round</th><th>type</th>
<th>tensors</th><th>bytes</th><th>ε</th><th>metrics sent</th><th>sha256</th></tr>
{% for r in audit.records %}<tr><td class="t">{{ r.time|iso }}</td><td>{{ r.run_id }}</td>
<td class="n">{{ r.round }}</td>
<td>{{ r.message_type }}</td><td class="n">{{ r.num_tensors }}</td><td class="n">{{ r.payload_bytes|num }}</td>
<td class="n">{{ r.epsilon|num }}</td><td class="small">{% for k, v in (r.metrics or {}).items() %}{{ k }}={{ v|num
 }} {% endfor %}</td><td><code class="small">{{ (r.sha256 or '')[:16] }}…</code></td></tr>{% endfor %}</table></div>
{% endif %}</section>
{% endif %}
{% endblock %}
"""


def _recently_changed(*paths: Path) -> bool:
    now = time.time()
    for path in paths:
        try:
            if now - path.stat().st_mtime < LIVE_WINDOW_S:
                return True
        except OSError:
            continue
    return False


def create_app(config_path: Path, *, token: str | None = None, host: str = "127.0.0.1",
               refresh: int = 5) -> FastAPI:
    """The site dashboard as an ASGI app; ``site.toml`` is re-read on every request, so edits show at once."""
    config_path = Path(config_path)
    check_bind(host, token)
    SiteConfig.load(config_path)  # fail at start, with the file's own message, not on the first request
    env = make_environment({"page.html": PAGE})
    app = secure(FastAPI(title="fedfusion site dashboard", docs_url=None, redoc_url=None, openapi_url=None),
                 token=token, host=host)

    def url(path: str, **params: Any) -> str:
        return link(path, token, **params)

    @app.get("/", response_class=HTMLResponse)
    def index(run: str | None = None, server_round: int | None = Query(None, alias="round")) -> HTMLResponse:
        context: dict[str, Any] = {"title": "fedfusion site", "heading": "fedfusion · site", "url": url,
                                   "token": token, "run": run, "server_round": server_round, "refresh": 0,
                                   "error": ""}
        try:
            cfg = SiteConfig.load(config_path)
        except ConfigError as err:
            return HTMLResponse(env.get_template("page.html").render(**context, error=str(err),
                                                                     subheading=str(config_path)))
        audit, ledger = audit_view(config_path, run or None, server_round), ledger_view(cfg)
        live = _recently_changed(Path(audit["path"]), Path(ledger["path"]))
        context.update(site_id=cfg.site_id, subheading=f"{cfg.site_id} · {config_path}", health=site_health(cfg),
                       manifest=manifest_summary(cfg), ledger=ledger, audit=audit, charts=_charts(audit, ledger),
                       refresh=refresh if live else 0)
        return HTMLResponse(env.get_template("page.html").render(**context))

    @app.get("/api/health")
    def api_health() -> dict[str, Any]:
        cfg = SiteConfig.load(config_path)
        return {"site": cfg.site_id, **site_health(cfg)}

    @app.get("/api/manifest")
    def api_manifest() -> dict[str, Any]:
        return manifest_summary(SiteConfig.load(config_path))

    @app.get("/api/ledger")
    def api_ledger() -> dict[str, Any]:
        return json_safe(ledger_view(SiteConfig.load(config_path)))

    @app.get("/api/audit")
    def api_audit(run: str | None = None, server_round: int | None = Query(None, alias="round")) -> dict[str, Any]:
        return json_safe(audit_view(config_path, run or None, server_round))

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    return app




def run_dashboard(config_path: str | Path, *, host: str = "127.0.0.1", port: int = 8051, token: str | None = None,
                  refresh: int = 5, ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> int:
    """``fedfusion site dashboard``: serve the page until interrupted; exit 2 on an unsafe or broken setup."""
    token = resolve_token(token)
    try:
        app = create_app(Path(config_path), token=token, host=host, refresh=refresh)
    except (DashboardError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return serve(app, host, port, token=token, what=f"site dashboard ({config_path})", ssl_certfile=ssl_certfile,
                 ssl_keyfile=ssl_keyfile)
