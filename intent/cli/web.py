"""``pp web``: a read-only status page of the fleet, served from the store.

The page lists every app's clusters and nodes: the desired version, what each agent
reports running, a colour per node state, the error line and the age of the newest
report; a page per app adds its audit trail. It updates itself: a small script fetches
the table again every ``--refresh`` seconds and swaps it in, without reloading.

Reads only: GET and HEAD, nothing else. Binds to 127.0.0.1 unless told otherwise. Values
in the store are written by app owners and their running apps (an error line is often
an app's own health output), so every one is HTML-escaped where it is rendered, and the
page forbids inline script (Content-Security-Policy) as a second line of defence.
The standard library's ThreadingHTTPServer is enough for a page a few operators watch;
no framework, no build step.
"""

from __future__ import annotations

import html
import re
import socket
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import quote, unquote, urlsplit

import click

from intent.cli import fleet, render
from intent.cli.group import Env, PPUsageError, echo, pass_env
from intent.cli.rollout import NodeProgress, Rollout
from intent.listen import parse_listen
from intent.model import AuditRecord, is_safe_name
from intent.store import IntentStore, StoreError

DEFAULT_LISTEN = "127.0.0.1:8765"

CSS = """\
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.message { max-width: 48em; font-family: monospace; font-size: 12px; white-space: pre-wrap; }
tr.converged td.state { background: #d4f5d4; }
tr.converging td.state { background: #fff3c4; }
tr.failed td.state, tr.rolled_back td.state { background: #ffd0d0; font-weight: bold; }
tr.silent td.state, tr.held td.state { background: #e8d4f5; }
.problem { color: #a00; }
.muted { color: #888; }
"""

SCRIPT = """\
(function () {
  var box = document.getElementById("fleet");
  var every = Number(box.getAttribute("data-refresh")) * 1000;
  function again() {
    fetch(box.getAttribute("data-source"), {cache: "no-store"})
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.text(); })
      .then(function (text) { box.innerHTML = text; box.removeAttribute("data-stale"); })
      .catch(function () { box.setAttribute("data-stale", "yes"); })
      .then(function () { setTimeout(again, every); });
  }
  setTimeout(again, every);
})();
"""

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_APP_PATH = re.compile(r"^/app/([^/]+)(/table)?$")


def e(value: object) -> str:
    """Every value from the store goes through here on its way into HTML."""
    return html.escape(render.terminal_safe(str(value)), quote=True)


# -- pages ------------------------------------------------------------------------------------


def fleet_table(rollout: Rollout, now: float) -> str:
    """The fleet (or one app) as HTML: a summary row per cluster, a row per node."""
    rows = []
    for target in rollout.targets:
        nodes = [n for n in rollout.nodes if (n.app, n.cluster) == (target.app, target.cluster)]
        done = sum(1 for n in nodes if n.done)
        problem = f' <span class="problem">{e(target.problem)}</span>' if target.problem else ""
        rows.append(
            f'<tr class="cluster"><th colspan="7"><a href="/app/{quote(target.app)}">'
            f"{e(target.app)}</a> / {e(target.cluster)}: desired "
            f'<span class="desired">{e(target.version or "(stopped)")}</span>,'
            f" {done}/{len(nodes)} converged{problem}</th></tr>"
        )
        rows.extend(_node_row(node, target.version, now) for node in nodes)
        if not nodes:
            rows.append('<tr><td colspan="7" class="muted">no node runs this cluster</td></tr>')
    if not rows:
        rows.append('<tr><td colspan="7" class="muted">no intent in this store</td></tr>')
    header = "".join(
        f"<th>{h}</th>"
        for h in ("NODE", "DESIRED", "REPORTED", "STATE", "MESSAGE", "LAST REPORT", "APP")
    )
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return (
        f'<table class="fleet"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody>'
        f'</table><p class="muted">read from the store at <span class="updated">{updated}'
        "</span></p>"
    )


def _node_row(node: NodeProgress, desired: str | None, now: float) -> str:
    reported = ", ".join(f"{e(a.agent)} {e(a.version or '-')}" for a in node.agents)
    ages = [a.last_report_age for a in node.agents if a.last_report_age is not None]
    age = render.age(min(ages)) if ages else "never"
    return (
        f'<tr class="node {e(node.state)}" data-node="{e(node.node)}">'
        f'<td class="name">{e(node.node)}</td><td>{e(desired or "(stopped)")}</td>'
        f'<td class="reported">{reported}</td><td class="state">{e(node.state.replace("_", " "))}'
        f'</td><td class="message">{e(node.reason)}</td><td class="age">{e(age)}</td>'
        f"<td>{e(node.app)}</td></tr>"
    )


def history_table(records: Iterable[AuditRecord]) -> str:
    rows = "".join(
        f"<tr><td>{e(render.timestamp(r.at))}</td><td>{e(r.actor)}</td><td>{e(r.action)}</td>"
        f'<td>{e(r.key)}</td><td class="message">{e(render.change_summary(r.old, r.new))}</td>'
        "</tr>"
        for r in reversed(list(records))
    )
    header = "".join(f"<th>{h}</th>" for h in ("TIME", "ACTOR", "ACTION", "KEY", "CHANGE"))
    return f'<table class="history"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>'


def page(title: str, table: str, source: str, refresh_s: float, extra: str = "") -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{e(title)}</title><link rel="stylesheet" href="/static/page.css"></head><body>'
        f'<h1>{e(title)}</h1><p><a href="/">fleet</a></p>'
        f'<div id="fleet" data-source="{e(source)}" data-refresh="{refresh_s:g}">{table}</div>'
        f'{extra}<script src="/static/page.js"></script></body></html>'
    )


# -- the server -------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    store: ClassVar[IntentStore]
    refresh_s: ClassVar[float] = 2.0
    server_version = "pp-web"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _refuse(self) -> None:
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"read-only\n", {"Allow": "GET, HEAD"}
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def log_message(self, format: str, *args: object) -> None:
        pass  # the operator's terminal is not an access log

    def _answer(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            status, kind, body = self._route(path)
        except StoreError as exc:
            status, kind = HTTPStatus.SERVICE_UNAVAILABLE, "text/html; charset=utf-8"
            body = f'<p class="problem">the store cannot be read: {e(exc)}</p>'
        self._send(status, kind, body.encode(), send_body=send_body)

    def _route(self, path: str) -> tuple[HTTPStatus, str, str]:
        page_kind = "text/html; charset=utf-8"
        if path == "/static/page.css":
            return HTTPStatus.OK, "text/css; charset=utf-8", CSS
        if path == "/static/page.js":
            return HTTPStatus.OK, "text/javascript; charset=utf-8", SCRIPT
        now = time.time()
        if path in ("/", "/table"):
            table = fleet_table(fleet.overview(self.store), now)
            if path == "/table":
                return HTTPStatus.OK, page_kind, table
            return HTTPStatus.OK, page_kind, page("Platypus fleet", table, "/table", self.refresh_s)
        match = _APP_PATH.match(path)
        if match is None or not is_safe_name(match.group(1)):
            return HTTPStatus.NOT_FOUND, page_kind, "<p>no such page</p>"
        app = match.group(1)
        table = fleet_table(fleet.overview(self.store, app), now)
        if match.group(2):
            return HTTPStatus.OK, page_kind, table
        history = "<h2>History</h2>" + history_table(self.store.history(app))
        source = f"/app/{quote(app)}/table"
        return HTTPStatus.OK, page_kind, page(f"{app}", table, source, self.refresh_s, history)

    def _send(
        self,
        status: HTTPStatus,
        kind: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        send_body: bool = True,
    ) -> None:
        self.send_response(status)
        for name, value in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def make_server(store: IntentStore, listen: str, refresh_s: float) -> ThreadingHTTPServer:
    host, port = parse_listen(listen)
    handler = type("BoundHandler", (Handler,), {"store": store, "refresh_s": refresh_s})
    server_class = _Server6 if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), handler)
    server.daemon_threads = True
    return server


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@click.command()
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="[ADDR:]PORT",
    help="Where to serve the page; a bare PORT listens on 127.0.0.1.",
)
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.5),
    default=2.0,
    show_default=True,
    help="Seconds between the page's updates.",
)
@pass_env
def web(env: Env, listen: str, refresh: float) -> None:
    """Serve a read-only status page of the fleet (apps x clusters x nodes) that updates
    itself, with a page per app holding its audit trail. Stop it with Ctrl-C."""
    try:
        server = make_server(env.store(), listen, refresh)
    except ValueError as exc:
        raise PPUsageError(f"--listen {exc}") from None
    except OSError as exc:
        raise PPUsageError(f"--listen {listen}: {exc.strerror or exc}") from None
    host, port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    echo(f"pp web: serving http://{shown}:{port}/ (read-only; Ctrl-C stops it)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
