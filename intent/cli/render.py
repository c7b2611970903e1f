"""Text ``pp`` prints: tables, ages, diffs and one-line change summaries. No I/O."""

from __future__ import annotations

import difflib
import json
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from intent.model import AuditRecord, Reality

STALE_AFTER_S = 300.0
"""A live agent re-reports every app on each resync (every minute or so by default) and
the store keeps that write once the last one is 30 s old (REALITY_HEARTBEAT_S); five minutes
without one means the agent is stopped or stuck."""

STATUS_COLUMNS = ("NODE", "AGENT", "APP", "STATUS", "VERSION", "AGE", "MESSAGE")
MADE_REAL = {
    "preparer": "installed",
    "setlive": "running",
    "elb-registrar": "running",
    "iptables": "mapped",
}
"""How each agent has made its report's version real on the node, shown with it in VERSION
(``installed 2.0`` next to ``running 1.0`` after a rollback is no disagreement)."""
HISTORY_COLUMNS = ("TIME", "ACTOR", "ACTION", "KEY", "CHANGE")


def age(seconds: float) -> str:
    """``3s``, ``5m``, ``2h``, ``4d``: rounded down, never negative (clocks drift)."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is left ragged."""
    rows = [list(header), *([terminal_safe(cell) for cell in r] for r in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def terminal_safe(text: str) -> str:
    """``text`` with every character that could steer a terminal shown as an escape.

    Messages, versions and values come from the store, which app owners write: an
    ANSI sequence there could rewrite what ``pp status`` shows (hide an error, fake a
    healthy row) and a bidi override could reorder it. Control and format characters
    (Unicode categories Cc and Cf, line and paragraph separators) become ``\\xNN``
    or ``\\uNNNN``; newlines and tabs stay, so multi-line output keeps its shape."""
    return "".join(c if c in "\n\t" or not _steers(c) else _escape(c) for c in text)


def _steers(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str) -> str:
    return " ".join(text.split())


def status_rows(
    reports: Sequence[Reality], unreported: Iterable[tuple[str, str]], now: float
) -> list[list[str]]:
    """One row per report; AGE is how long the agent has been in this status.

    ``unreported`` are ``(node, app)`` assignments no agent has reported on yet,
    shown so that a freshly assigned node is visibly waiting, not missing."""
    rows = []
    for r in reports:
        message = one_line(r.error or "")
        if now - r.updated_at > STALE_AFTER_S:
            stale = f"no report for {age(now - r.updated_at)}"
            message = f"{stale}: {message}" if message else stale
        rows.append(
            [r.node, r.agent, r.app, r.status, version_cell(r), age(now - r.since), message]
        )
    for node, app in unreported:
        rows.append([node, "-", app, "unknown", "-", "-", "no agent has reported yet"])
    return sorted(rows)


def version_cell(report: Reality) -> str:
    """``installed 2.0``, ``running 1.0``: the version with how the agent made it real."""
    if report.version is None:
        return "-"
    how = MADE_REAL.get(report.agent)
    return f"{how} {report.version}" if how else report.version


def pretty(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        # An undecodable stored value, shown as it is.
        return value if value.endswith("\n") else value + "\n"
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def diff(key: str, old: Any, new: Any) -> str:
    """A unified diff of one key's JSON, pretty-printed with sorted keys."""
    lines = difflib.unified_diff(
        pretty(old).splitlines(keepends=True),
        pretty(new).splitlines(keepends=True),
        fromfile=f"a/{key}" if old is not None else "/dev/null",
        tofile=f"b/{key}" if new is not None else "/dev/null",
    )
    return "".join(lines)


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _differences(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(old.keys() | new.keys(), key=str):
            where = f"{path}.{name}" if path else str(name)
            if name not in old:
                out.append(f"{where}: + {_short(new[name])}")
            elif name not in new:
                out.append(f"{where}: - {_short(old[name])}")
            else:
                _differences(old[name], new[name], where, out)
    elif old != new:
        out.append(f"{path or 'value'}: {_short(old)} -> {_short(new)}")


def change_summary(old: Any, new: Any) -> str:
    """``versions.1.0.0.state: "active" -> "prep"; versions.1.1.0: + {...}``."""
    if old is None:
        return "created"
    if new is None:
        return "deleted"
    parts: list[str] = []
    _differences(old, new, "", parts)
    return "; ".join(parts) or "no change"


def timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def history_rows(records: Sequence[AuditRecord]) -> list[list[str]]:
    return [
        [timestamp(r.at), r.actor, r.action, r.key, change_summary(r.old, r.new)] for r in records
    ]
