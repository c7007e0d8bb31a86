"""What the coordinator and site dashboards share: safe serving, the token check, the page frame and
server-rendered SVG charts.

Why one module in ``common``: both pages must follow the same safety rules (hospital networks, patient
data next door) and ``client``/``server`` never import each other. The rules:

- **Loopback by default.** Binding any other address needs a token (:func:`check_bind`); with a token,
  every request must carry it (``?token=``, ``Authorization: Bearer``, or ``X-Fedfusion-Token``),
  compared in constant time. Without a token the page answers only to loopback ``Host`` headers, so
  a web page elsewhere cannot read it through DNS rebinding.
- **Read-only.** Only GET is served; every other method is 405.
- **Escaped.** Pages are Jinja2 templates with autoescaping on; chart labels are escaped here. A strict
  Content-Security-Policy (no script at all, images only from this server) backs that up: the pages
  refresh themselves with ``<meta http-equiv="refresh">``, not JavaScript.
- **Offline.** Charts are inline SVG drawn here; nothing is loaded from a CDN.
- **Confined.** A file is served only when :func:`file_inside` its run folder: no symlink on the way,
  so a link planted in a run folder (``model.pt -> /etc/shadow``) is not followed out of it.

FastAPI, Starlette and uvicorn come with Flower; Jinja2 and MarkupSafe come with torch.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from jinja2 import DictLoader, Environment, StrictUndefined
from markupsafe import Markup, escape

TOKEN_ENV = "FEDFUSION_DASHBOARD_TOKEN"
TOKEN_HEADER = "x-fedfusion-token"
MIN_TOKEN_LENGTH = 16
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_SECURITY_HEADERS = {
    # No script at all: the pages need none, so an injection that slipped past escaping could not run.
    "content-security-policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # a token in the URL must not leak to other sites
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")


class DashboardError(ValueError):
    """The dashboard cannot start as asked (unsafe bind, bad token, unreadable config); the message says why."""


def file_inside(folder: Path, path: Path) -> bool:
    """True when ``path`` is a regular file under ``folder`` reached without following any symlink.

    Every component from ``folder`` down to the file itself is checked, then the resolved path must still
    lie in the resolved folder; a dashboard serving downloads calls this first.
    """
    folder, path = Path(folder), Path(path)
    try:
        parts = path.relative_to(folder).parts
    except ValueError:
        return False
    current = folder
    for part in parts:
        if part in ("", ".", ".."):
            return False
        current = current / part
        if current.is_symlink():
            return False
    return path.is_file() and path.resolve().is_relative_to(folder.resolve())


def is_loopback(host: str) -> bool:
    """True for names and addresses only this machine can reach (``localhost``, 127.0.0.0/8, ``::1``)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so treat it as exposed


def resolve_token(token: str | None) -> str | None:
    """``--token`` if given, else the ``FEDFUSION_DASHBOARD_TOKEN`` environment variable (a token on the
    command line is visible to every local user in ``ps``; the variable is not)."""
    value = token if token is not None else os.environ.get(TOKEN_ENV)
    return value if value else None


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token, or with a token too short to resist guessing."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise DashboardError(f"--token must be at least {MIN_TOKEN_LENGTH} characters (e.g. the output of "
                             "'python -c \"import secrets; print(secrets.token_urlsafe(24))\"')")
    if not is_loopback(host) and token is None:
        raise DashboardError(f"refusing to serve the dashboard on {host}: another machine could read it. Pass "
                             f"--token (or set {TOKEN_ENV}) so every request must carry it, or keep the default "
                             "--host 127.0.0.1 and reach it through an SSH tunnel")


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8050`` -> ``::1``, ``localhost:8050`` -> ``localhost``)."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def presented_token(request: Request) -> str | None:
    """The token a request carries, from the query, a bearer header or the dashboard's own header."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get(TOKEN_HEADER) or request.query_params.get("token")


def secure(app: FastAPI, *, token: str | None, host: str) -> FastAPI:
    """Wrap every route of ``app`` in the rules of this module's docstring; return ``app``."""
    loopback_only = token is None and is_loopback(host)
    expected = token.encode() if token is not None else b""

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        given = presented_token(request) if token is not None else None
        if request.method != "GET":
            response: Response = PlainTextResponse("read-only dashboard: only GET is served", status_code=405,
                                                   headers={"allow": "GET"})
        elif loopback_only and not is_loopback(_host_name(request.headers.get("host", ""))):
            response = PlainTextResponse("this dashboard answers only to localhost / 127.0.0.1", status_code=400)
        elif token is not None and given is None:
            response = PlainTextResponse("this dashboard needs its token: add ?token=... to the address",
                                         status_code=401, headers={"www-authenticate": "Bearer"})
        elif token is not None and not hmac.compare_digest(str(given).encode(), expected):
            response = PlainTextResponse("wrong dashboard token", status_code=403)
        else:
            response = await call_next(request)
        response.headers.update(_SECURITY_HEADERS)
        return response

    return app


def link(path: str, token: str | None, **params: Any) -> str:
    """A URL of this dashboard that keeps the token (when one is required) and drops empty parameters."""
    query = {k: v for k, v in params.items() if v is not None and v != ""}
    if token is not None:
        query["token"] = token
    return f"{path}?{urlencode(query)}" if query else path


def fmt_number(value: Any) -> str:
    """Numbers as people read them in a table: counts whole, measurements to 4 significant digits."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "—" if math.isnan(value) else ("∞" if value > 0 else "-∞")
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def json_safe(value: Any) -> Any:
    """JSON has no NaN/Infinity (Starlette refuses them): non-finite numbers become null, sets lists."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fmt_time(timestamp: float | None) -> str:
    """A file time as UTC ISO text (the coordinator and the sites may sit in different time zones)."""
    if timestamp is None:
        return "—"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def fmt_iso(text: Any) -> str:
    """An ISO timestamp from a log (``2026-11-23T10:15:02.123456+00:00``) as short UTC text."""
    try:
        moment = datetime.fromisoformat(str(text))
    except ValueError:
        return "" if text is None else str(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + ("Z" if moment.tzinfo is not None else "")


BASE_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{% if refresh %}<meta http-equiv="refresh" content="{{ refresh }}">{% endif %}
<title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;background:#f5f6f8}
header{background:#1d3557;color:#fff;padding:.7rem 1.5rem;display:flex;gap:1.5rem;align-items:baseline}
header h1{font-size:1.2rem;margin:0} header .sub{opacity:.8;font-size:.9rem}
main{padding:1rem 1.5rem;max-width:1400px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:.8rem 1rem;margin-bottom:1rem}
h2{font-size:1.05rem;margin:.2rem 0 .6rem} h3{font-size:.95rem;margin:.8rem 0 .4rem}
table{border-collapse:collapse;font-size:.85rem;margin:.3rem 0}
th,td{border-bottom:1px solid #e6e9ee;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
td.t{white-space:nowrap}
.scroll{overflow-x:auto} .muted{color:#6b7280} .small{font-size:.8rem}
.badge{display:inline-block;padding:.05rem .5rem;border-radius:9px;font-size:.8rem;background:#e5e7eb}
.ok{background:#d1fae5;color:#065f46} .warn{background:#fef3c7;color:#92400e} .bad{background:#fee2e2;color:#991b1b}
.live{background:#dbeafe;color:#1e40af}
.counter{font-size:1.6rem;font-weight:700;margin:.2rem 0}
.charts{display:flex;flex-wrap:wrap;gap:.8rem} .charts svg{background:#fff;border:1px solid #eef0f3}
.bar{background:#e5e7eb;width:160px;height:.7rem;border-radius:4px;display:inline-block;vertical-align:middle}
.bar span{display:block;height:100%;border-radius:4px;background:#2563eb}
.bar span.over{background:#dc2626}
code{background:#f0f2f5;padding:0 .25rem;border-radius:3px}
a{color:#1d4ed8}
</style></head>
<body><header><h1>{{ heading }}</h1><span class="sub">{{ subheading }}</span>
<span class="sub">read-only{% if refresh %} · refreshes every {{ refresh }} s while a run is live{% endif %}</span>
</header><main>{% block content %}{% endblock %}</main></body></html>
"""


def make_environment(templates: Mapping[str, str]) -> Environment:
    """Jinja2 with autoescaping always on (every value is escaped unless it is :class:`Markup` made here)."""
    env = Environment(loader=DictLoader({"base.html": BASE_TEMPLATE, **templates}), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_number
    env.filters["when"] = fmt_time
    env.filters["iso"] = fmt_iso
    return env


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2, 5 x 10^k steps)."""
    span = high - low
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str, x_label: str = "round",
               y_label: str = "", limits: Mapping[str, float] | None = None, width: int = 520,
               height: int = 240, names: Sequence[str] | None = None) -> Markup:
    """An inline SVG line chart: one line per series, dashed horizontal lines for ``limits`` (e.g. a
    site's ε budget). Non-finite points are skipped; every label is escaped. ``names`` fixes each
    series' colour by its position there, so a site keeps its colour in every chart of a page; a single
    series without limits gets no legend (its title names it)."""
    limits = {k: v for k, v in (limits or {}).items() if isinstance(v, int | float) and math.isfinite(v)}
    points = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(float(x)) and math.isfinite(float(y))]
              for name, pts in series.items()}
    points = {name: pts for name, pts in points.items() if pts}
    label = escape(title)
    head = (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{label}"><title>{label}</title>'
            f'<text x="8" y="16" font-size="13" font-weight="600">{label}</text>')
    if not points:
        return Markup(head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#6b7280" '
                             'font-size="12">no data yet</text></svg>')
    legend = len(points) > 1 or bool(limits)
    left, right, top, bottom = 52, (150 if legend else 14), 26, 34
    order = list(names or []) + sorted(n for n in points if n not in (names or []))
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts] + list(limits.values())
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or max(abs(y0) * 0.1, 0.5)
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [head, f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#d1d5db"/>']
    for tick in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
                     f'stroke="#f0f1f3"/><text x="{left - 4}" y="{py(tick) + 4:.1f}" text-anchor="end" '
                     f'font-size="10" fill="#4b5563">{escape(fmt_number(tick))}</text>')
    x_ticks = sorted(set(xs)) if len(set(xs)) <= 12 else _ticks(x0, x1, 8)
    for tick in x_ticks:
        parts.append(f'<text x="{px(tick):.1f}" y="{top + plot_h + 14}" text-anchor="middle" font-size="10" '
                     f'fill="#4b5563">{escape(fmt_number(tick))}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" font-size="11" '
                 f'fill="#374151">{escape(x_label)}</text>')
    if y_label:
        parts.append(f'<text x="12" y="{top + plot_h / 2}" font-size="11" fill="#374151" text-anchor="middle" '
                     f'transform="rotate(-90 12 {top + plot_h / 2})">{escape(y_label)}</text>')
    legend_y = top + 4
    for name in sorted(points, key=order.index):
        pts = points[name]
        colour = PALETTE[order.index(name) % len(PALETTE)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        if name in limits:
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(limits[name]):.1f}" '
                         f'y2="{py(limits[name]):.1f}" stroke="{colour}" stroke-dasharray="5 4"/>')
        if legend and legend_y > height - 24:
            parts.append(f'<text x="{width - right + 10}" y="{legend_y + 9}" font-size="11">…</text>')
            legend = False
        if legend:
            parts.append(f'<rect x="{width - right + 10}" y="{legend_y}" width="10" height="10" fill="{colour}"/>'
                         f'<text x="{width - right + 24}" y="{legend_y + 9}" font-size="11">'
                         f'{escape(_shorten(name))}</text>')
            legend_y += 15
    if limits and legend:
        parts.append(f'<text x="{width - right + 10}" y="{legend_y + 9}" font-size="10" fill="#6b7280">'
                     '- - - budget</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _shorten(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def serve(app: FastAPI, host: str, port: int, *, token: str | None, what: str,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> int:
    """Run ``app`` with uvicorn in the foreground until interrupted; return the exit code."""
    import uvicorn

    scheme = "https" if ssl_certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    hint = "?token=<your token>" if token else ""
    print(f"{what}: {scheme}://{shown}:{port}/{hint} (read-only; Ctrl+C stops it)", file=sys.stderr)
    if token and not is_loopback(host) and not ssl_certfile:
        print("WARNING: no --ssl-certfile: the token and the pages cross the network unencrypted; put the "
              "dashboard behind TLS (or an SSH tunnel) outside a trusted network", file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", ssl_certfile=ssl_certfile,
                    ssl_keyfile=ssl_keyfile, server_header=False)
    except KeyboardInterrupt:
        return 130
    return 0
