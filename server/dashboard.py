"""``fedfusion coordinator dashboard``: a read-only web page over the coordinator's run folders.

Coordinators watch a study for days; the report only appears at the end. This page shows what the
round loop already writes, finished or live (:mod:`fedfusion.server.run_folders` reads it), plus the
SuperLink's own list of runs (``flwr ls``), and never writes anything. Every numeric column is drawn,
whatever its name, so figures other parts add later (``secagg_*`` per round, ``epsilon`` and
``epsilon-budget`` per site) appear without a change here. Only aggregates that sites chose to send
reach the coordinator, so nothing here can show a patient value.
Safety rules (loopback, token, escaping, GET only) live in :mod:`fedfusion.common.dashboard`.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse
from markupsafe import Markup

from fedfusion.common.dashboard import (
    check_bind,
    file_inside,
    json_safe,
    line_chart,
    link,
    make_environment,
    resolve_token,
    secure,
    serve,
)
from fedfusion.server.run_folders import (
    SECAGG_PREFIX,
    RunFolder,
    discover_runs,
    is_number,
    load_run,
    numeric_columns,
    site_table,
)

DOWNLOADS = ("model.pt", "checkpoint", "report.md", "metrics.csv", "site_metrics.csv", "summary.json", "privacy.csv")
SUPERLINK_REFRESH_S = 15.0


def _series(rows: list[dict[str, Any]], column: str) -> list[tuple[float, float]]:
    return [(float(r["round"]), float(r[column])) for r in rows if is_number(r.get(column)) and "round" in r]


def run_charts(run: RunFolder) -> dict[str, list[Markup]]:
    """SVG charts by section: the headline metric, ε against budget, then every numeric column."""
    metric = run.primary_metric
    names = sorted({str(m.get("site")) for m in run.site_metrics} | {str(r.get("site")) for r in run.refusals})
    per_site: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for m in run.site_metrics:
        for column in numeric_columns([m], skip=("round", "site", "phase")):
            key = f"{m.get('phase', '')}: {column}"
            per_site.setdefault(key, {}).setdefault(str(m.get("site")), []).append(
                (float(m["round"]), float(m[column])))
    headline = [line_chart({"global (site-weighted)": _series(run.rounds, f"eval_{metric}")},
                           title=f"global model {metric} per round", y_label=metric),
                line_chart(per_site.get(f"evaluate: {metric}", {}), title=f"{metric} per site (own test split)",
                           y_label=metric, names=names)]
    charts: dict[str, list[Markup]] = {"headline": headline, "epsilon": [], "global": [], "sites": []}
    if "train: epsilon" in per_site:
        eps = {s: list(p) for s, p in per_site["train: epsilon"].items()}
        for r in run.refusals:
            if is_number(r.get("epsilon")):
                eps.setdefault(str(r.get("site")), []).append((float(r["round"]), float(r["epsilon"])))
        budgets = {row["site"]: row["epsilon_budget"] for row in site_table(run) if row["epsilon_budget"]}
        charts["epsilon"].append(line_chart(eps, title="ε spent per site (dashed: its budget)", y_label="ε",
                                            limits=budgets, names=names))
    for column in numeric_columns(run.rounds):
        charts["global"].append(line_chart({column: _series(run.rounds, column)}, title=column, width=300,
                                           height=170))
    for key in sorted(per_site):
        charts["sites"].append(line_chart(per_site[key], title=key, width=420, height=200, names=names))
    return charts


class SuperLinkRuns:
    """``flwr ls`` (runs) and ``flwr supernode ls`` (nodes online/offline) against the coordinator's state
    dir, refreshed in the background: they take seconds, or hang on a stopped SuperLink, and the page
    must not wait for them."""

    def __init__(self, state_dir: Path, runner: Any = subprocess.run) -> None:
        self.state_dir = state_dir
        self.runner = runner
        self.snapshot: dict[str, Any] = {"available": False, "runs": [], "nodes": [], "message": "not read yet",
                                         "time": None}
        self._started = False
        self._lock = threading.Lock()

    def configured(self) -> bool:
        return (self.state_dir / "flwr" / "config.toml").is_file()

    def _flwr(self, *args: str) -> dict[str, Any]:
        from fedfusion.common.flower_tools import executable, tool_env
        from fedfusion.server.coordinator import CONNECTION, CoordinatorPaths

        done = self.runner([executable("flwr"), *args, CONNECTION, "--format", "json"], capture_output=True,
                           text=True, timeout=20,
                           env=tool_env({"FLWR_HOME": str(CoordinatorPaths(self.state_dir).flwr_home)}))
        start = done.stdout.find("{")
        reply = json.loads(done.stdout[start:]) if start >= 0 else {}
        if not reply.get("success"):
            raise ValueError(str(reply.get("error-message") or done.stderr.strip() or "no answer")[-300:])
        return reply

    def refresh(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = {"available": False, "runs": [], "nodes": [], "message": "", "time": time.time()}
        try:
            snapshot.update(available=True, runs=list(self._flwr("ls").get("runs", [])))
            snapshot["nodes"] = list(self._flwr("supernode", "ls").get("nodes", []))
        except (OSError, ValueError, subprocess.SubprocessError) as err:
            snapshot["message"] = f"{'SuperNode list' if snapshot['available'] else 'SuperLink'} not readable: {err}"
        self.snapshot = snapshot
        return snapshot

    def current(self) -> dict[str, Any]:
        if not self.configured():
            return {"available": False, "runs": [], "nodes": [], "time": None,
                    "message": f"no coordinator state in {self.state_dir} (pass --state-dir, the folder given to "
                               "'fedfusion coordinator start')"}
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._loop, daemon=True, name="flwr-ls").start()
        return self.snapshot

    def _loop(self) -> None:
        while True:
            self.refresh()
            time.sleep(SUPERLINK_REFRESH_S)


PAGE = """{% extends "base.html" %}
{% block content %}
<section><h2>Runs <span class="muted small">under {{ runs_dir }}</span></h2>
{% if not runs %}<p class="muted">No run folder yet (a folder holding run_config.json, metrics.csv or
checkpoints/).</p>{% else %}
<div class="scroll"><table id="runs-table"><tr><th>run</th><th>status</th><th>rounds</th><th>sites</th>
<th>started</th><th>ended</th><th>last update</th></tr>
{% for r in runs %}<tr><td><a href="{{ url('/', run=r.key) }}">{{ r.key }}</a></td>
<td><span class="badge {{ badge(r.status) }}">{{ r.status }}</span></td>
<td class="n">{{ r.rounds_done }} / {{ r.total_rounds if r.total_rounds is not none else '?' }}</td>
<td class="n">{{ r.summary().sites }}</td><td>{{ r.started|when }}</td><td>{{ r.ended|when }}</td>
<td>{{ r.updated|when }}</td></tr>{% endfor %}</table></div>{% endif %}
</section>
{% if run %}
<section id="run"><h2>Run <code>{{ run.key }}</code>
<span class="badge {{ badge(run.status) }}" id="run-status">{{ run.status }}</span></h2>
<div class="counter" id="round-counter" data-round="{{ run.rounds_done }}"
 data-total="{{ run.total_rounds if run.total_rounds is not none else '' }}">round {{ run.rounds_done }} / {{
 run.total_rounds if run.total_rounds is not none else '?' }}</div>
<p class="small muted">numbers from {{ run.source or 'nothing yet' }} · started {{ run.started|when }}
{% if run.ended %}· ended {{ run.ended|when }}{% endif %}
{% if run.note %} · <strong>{{ run.note }}</strong>{% endif %}</p>
<p class="small">Downloads: {% for name in downloads %}<a href="{{ url('/download/' + name, run=run.key) }}">{{
 'latest checkpoint' if name == 'checkpoint' else name }}</a>{% if not loop.last %} · {% endif %}{% else %}<span
 class="muted">none yet (the model and report are written when the run ends)</span>{% endfor %}
{% if 'report.md' in downloads %} · <a href="{{ url('/report', run=run.key) }}">report (HTML)</a>{% endif %}</p>
<div class="charts">{% for c in charts.headline %}{{ c }}{% endfor %}</div>
</section>
<section><h2>Sites</h2><div class="scroll"><table id="sites-table">
<tr><th>site</th><th>in last round</th><th>last seen (round)</th><th>rounds contributed</th><th>refusals</th>
<th>dropouts</th><th>rejected replies</th><th>{{ metric }}</th><th>ε spent</th><th>ε budget</th><th></th></tr>
{% for s in sites %}<tr><td class="site-id">{{ s.site }}</td>
<td><span class="badge {{ 'ok' if s.in_last_round else 'warn' }}">{{ 'yes' if s.in_last_round else 'no' }}</span></td>
<td class="n">{{ s.last_seen|num }}</td><td class="n">{{ s.rounds_contributed }}</td><td class="n">{{ s.refusals }}</td>
<td class="n">{{ s.dropouts }}</td><td class="n">{{ s.rejected }}</td><td class="n">{{ s[metric]|num }}</td>
<td class="n">{{ s.epsilon|num }}</td><td class="n">{{ s.epsilon_budget|num }}</td>
<td>{% if s.epsilon is not none and s.epsilon_budget %}<span class="bar" title="ε spent / budget"><span
 class="{{ 'over' if s.epsilon > s.epsilon_budget else '' }}" style="width:{{ [100, 100 * s.epsilon /
 s.epsilon_budget]|min|round(1) }}%"></span></span>{% endif %}</td></tr>
{% else %}<tr><td colspan="11" class="muted">no site has reported yet</td></tr>{% endfor %}</table></div>
{% if secure_rounds %}<p class="small muted">Secure-aggregation rounds: the coordinator holds only the sum, so
contributions and dropouts per site are not known for them (see the secure-aggregation table).</p>{% endif %}
{% if charts.epsilon %}<h3>Privacy: ε spent per site, as the sites reported it</h3>
<div class="charts">{% for c in charts.epsilon %}{{ c }}{% endfor %}</div>{% endif %}
{% if run.refusals %}<h3>Refused rounds</h3><table id="refusals-table"><tr><th>round</th><th>site</th><th>reason</th>
</tr>{% for r in run.refusals %}<tr><td class="n">{{ r.get('round', '') }}</td><td>{{ r.get('site', '') }}</td>
<td>{{ r.get('reason', '') }}</td></tr>
{% endfor %}</table>{% endif %}
</section>
{% if secagg_columns %}<section><h2>Secure aggregation per round</h2><div class="scroll">
<table id="secagg-table"><tr><th>round</th>{% for c in secagg_columns %}<th>{{ c[7:] }}</th>{% endfor %}</tr>
{% for r in run.rounds if r.round %}<tr><td class="n">{{ r.round }}</td>{% for c in secagg_columns %}
<td class="n">{{ r.get(c)|num }}</td>{% endfor %}</tr>{% endfor %}</table></div></section>{% endif %}
<section><h2>Every round figure (metrics{{ '.csv' if run.source == 'metrics.csv' else ' so far' }})</h2>
<div class="charts">{% for c in charts.global %}{{ c }}{% endfor %}</div>
<div class="scroll"><table id="rounds-table"><tr><th>round</th>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for r in run.rounds %}<tr><td class="n">{{ r.round }}</td>{% for c in columns %}<td class="n">{{ r.get(c)|num }}</td>
{% endfor %}</tr>{% endfor %}</table></div></section>
<section><h2>Per-site figures per round</h2><div class="charts">{% for c in charts.sites %}{{ c }}{% endfor %}</div>
</section>
{% endif %}
<section><h2>SuperLink runs <span class="muted small">(flwr ls)</span></h2>
{% if superlink.available %}<table id="superlink-table"><tr><th>run id</th><th>app</th><th>status</th><th>elapsed</th>
<th>running since</th><th>finished</th></tr>{% for r in superlink.runs %}<tr><td>{{ r.get('run-id', '') }}</td>
<td>{{ r.get('fab-name', '') }} {{ r.get('fab-version', '') }}</td><td>{{ r.get('status', '') }}</td>
<td>{{ r.get('elapsed', '') }}</td><td>{{ r.get('running-at', '') }}</td><td>{{ r.get('finished-at', '') }}</td></tr>
{% endfor %}</table>
{% if superlink.nodes %}<h3>SuperNodes <span class="muted small">(flwr supernode ls)</span></h3>
<table id="supernodes-table"><tr><th>node id</th><th>status</th><th>online since</th><th>offline since</th></tr>
{% for n in superlink.nodes %}<tr><td>{{ n.get('node-id', '') }}</td><td><span class="badge {{ 'ok' if n.get('status')
 == 'online' else 'warn' }}">{{ n.get('status', '') }}</span></td><td>{{ n.get('online-at', '') }}</td>
<td>{{ n.get('offline-at', '') }}</td></tr>{% endfor %}</table>{% endif %}
{% endif %}{% if superlink.message %}<p class="muted small">{{ superlink.message }}</p>{% endif %}</section>
{% endblock %}
"""


_WARMED = threading.Event()


def _warm_up_checkpoint_reader() -> None:
    """Import torch in the background as soon as a run is live: reading the first checkpoint would
    otherwise stall that page load for seconds, just when rounds start to arrive."""
    if not _WARMED.is_set():
        _WARMED.set()
        threading.Thread(target=importlib.import_module, args=("torch",), daemon=True, name="warm-torch").start()


def _download_path(run_dir: Path, name: str) -> Path | None:
    """The file behind a download name (``checkpoint``: the newest one); None when absent or not offered."""
    if name == "checkpoint":
        found = sorted((run_dir / "checkpoints").glob("round-*.pt"))
        path = found[-1] if found else None
    else:
        path = run_dir / name if name in DOWNLOADS else None
    # Never follow a symlink out of the run folder (common/dashboard.py: file_inside).
    return path if path is not None and file_inside(run_dir, path) else None


def _badge(status: str) -> str:
    return {"finished": "ok", "running": "live", "starting": "live", "ended early": "warn"}.get(status, "bad")


def create_app(runs_dir: Path, *, state_dir: Path | None = None, token: str | None = None,
               host: str = "127.0.0.1", refresh: int = 5, superlink: SuperLinkRuns | None = None) -> FastAPI:
    """The coordinator dashboard as an ASGI app (``serve`` runs it; tests drive it with TestClient)."""
    runs_dir = Path(runs_dir)
    check_bind(host, token)
    env = make_environment({"page.html": PAGE})
    superlink = superlink or SuperLinkRuns(Path(state_dir or "coordinator"))
    app = secure(FastAPI(title="fedfusion coordinator dashboard", docs_url=None, redoc_url=None, openapi_url=None),
                 token=token, host=host)

    def all_runs() -> list[RunFolder]:
        runs = [load_run(key, path) for key, path in discover_runs(runs_dir).items()]
        if any(r.live for r in runs):
            _warm_up_checkpoint_reader()
        return sorted(runs, key=lambda r: r.updated, reverse=True)

    def one_run(key: str) -> RunFolder:
        path = discover_runs(runs_dir).get(key)  # a key never becomes a path: only folders found by the walk
        if path is None:
            raise HTTPException(404, f"no run folder {key!r} under the dashboard's --runs-dir")
        return load_run(key, path)

    def url(path: str, **params: Any) -> str:
        return link(path, token, **params)

    @app.get("/", response_class=HTMLResponse)
    def index(run: str | None = None) -> HTMLResponse:
        runs = all_runs()
        chosen = one_run(run) if run else (runs[0] if runs else None)
        context: dict[str, Any] = {"runs": runs, "run": chosen, "runs_dir": str(runs_dir), "url": url,
                                   "badge": _badge, "superlink": superlink.current(), "title": "fedfusion coordinator",
                                   "heading": "fedfusion · coordinator", "subheading": str(runs_dir),
                                   "refresh": refresh if any(r.live for r in runs) else 0}
        if chosen is not None:
            columns = numeric_columns(chosen.rounds)
            context.update(sites=site_table(chosen), charts=run_charts(chosen), metric=chosen.primary_metric,
                           columns=columns, secagg_columns=[c for c in columns if c.startswith(SECAGG_PREFIX)],
                           secure_rounds=any(c.startswith(SECAGG_PREFIX) for c in columns),
                           downloads=[n for n in DOWNLOADS if _download_path(chosen.path, n) is not None])
        return HTMLResponse(env.get_template("page.html").render(**context))

    @app.get("/api/runs")
    def api_runs() -> list[dict[str, Any]]:
        return [json_safe(r.summary()) for r in all_runs()]

    @app.get("/api/run")
    def api_run(run: str = Query(...)) -> dict[str, Any]:
        found = one_run(run)
        return json_safe({**found.summary(), "rounds": found.rounds, "site_metrics": found.site_metrics,
                        "sites": site_table(found), "refusals": found.refusals, "rejected": found.rejected})

    @app.get("/api/superlink")
    def api_superlink() -> dict[str, Any]:
        return superlink.current()

    @app.get("/download/{name}")
    def download(name: str, run: str = Query(...)) -> FileResponse:
        path = _download_path(one_run(run).path, name)
        if path is None:
            raise HTTPException(404, f"{name} is not (yet) in run {run!r}; downloadable: {', '.join(DOWNLOADS)}")
        media = "text/plain; charset=utf-8" if name.endswith((".md", ".csv")) else None
        return FileResponse(path, media_type=media or "application/octet-stream",
                            filename=f"{run.replace('/', '_')}_{path.name}")

    @app.get("/report", response_class=HTMLResponse)
    def report(run: str = Query(...)) -> HTMLResponse:
        found = one_run(run)
        path = found.path / "report.md"
        if not file_inside(found.path, path):
            raise HTTPException(404, f"run {run!r} has no report.md yet (it is written when the run ends)")
        from markdown_it import MarkdownIt

        # html=False: raw HTML in the report (a site id, a reason) is shown as text; unsafe links are dropped.
        body = Markup(MarkdownIt("commonmark", {"html": False}).enable("table").render(path.read_text()))
        page = env.from_string('{% extends "base.html" %}{% block content %}<section class="scroll">{{ body }}'
                               '</section>{% endblock %}')
        return HTMLResponse(page.render(body=body, title=f"report · {run}", heading="fedfusion · run report",
                                        subheading=run, refresh=0))

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    return app




def run_dashboard(runs_dir: str | Path, *, state_dir: str | Path = "coordinator", host: str = "127.0.0.1",
                  port: int = 8050, token: str | None = None, refresh: int = 5, ssl_certfile: str | None = None,
                  ssl_keyfile: str | None = None) -> int:
    """``fedfusion coordinator dashboard``: serve the page until interrupted; exit 2 on an unsafe setup."""
    import sys

    from fedfusion.common.dashboard import DashboardError

    token = resolve_token(token)
    try:
        if not Path(runs_dir).is_dir():
            raise DashboardError(f"--runs-dir {runs_dir} is not a folder (the folder holding the run folders, "
                                 "e.g. runs/)")
        app = create_app(Path(runs_dir), state_dir=Path(state_dir), token=token, host=host, refresh=refresh)
    except DashboardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return serve(app, host, port, token=token, what="coordinator dashboard", ssl_certfile=ssl_certfile,
                 ssl_keyfile=ssl_keyfile)
