"""Human-readable output. `--json` bypasses all of this and prints the agent's reply as is.

Every renderer takes a reply's `result` and tolerates missing keys: the CLI may be newer or
older than the agent it talks to, and a status line with a "-" beats a traceback.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any

Result = Mapping[str, Any]


def duration(seconds: float) -> str:
    """Two units at most: `3d 4h`, `2h 5m`, `5m 3s`, `12s`, `0.4s`."""
    if seconds < 10:
        return f"{seconds:.1f}".removesuffix(".0") + "s"
    total = int(seconds)
    for (major, major_size), (minor, minor_size) in _UNIT_PAIRS:
        if total >= major_size:
            count, rest = divmod(total, major_size)
            rest //= minor_size
            return f"{count}{major} {rest}{minor}" if rest else f"{count}{major}"
    return f"{total}s"


_UNIT_PAIRS = ((("d", 86400), ("h", 3600)), (("h", 3600), ("m", 60)), (("m", 60), ("s", 1)))


def ago(timestamp: Any, now: float) -> str:
    if not isinstance(timestamp, (int, float)):
        return "never"
    delta = now - timestamp
    return (
        "just now"
        if abs(delta) < 0.5
        else (f"{duration(delta)} ago" if delta > 0 else f"in {duration(-delta)}")
    )


def until(timestamp: Any, now: float) -> str:
    if not isinstance(timestamp, (int, float)):
        return "-"
    return "now" if timestamp <= now else f"in {duration(timestamp - now)}"


def local_time(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)):
        return "-"
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{int(amount)} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) else "-"


def status(result: Result, now: float | None = None) -> str:
    now = time.time() if now is None else now
    online = "online" if result.get("online") else "offline"
    head = f"engagement-agent {result.get('version', '?')}: {online}"
    if isinstance(result.get("uptime"), (int, float)):
        head += f", up {duration(result['uptime'])}"
    if result.get("device_id"):
        head += f", device {result['device_id']}"
    lines = [head]

    queue = result.get("queue") or {}
    fill = ""
    if isinstance(queue.get("bytes"), int) and isinstance(queue.get("max_bytes"), int):
        fill = f" ({100 * queue['bytes'] / max(queue['max_bytes'], 1):.0f}%)"
    oldest = queue.get("oldest_age")
    lines.append(
        f"queue:    {_count(queue.get('items'))} items, {size(queue.get('bytes'))} of "
        f"{size(queue.get('max_bytes'))}{fill}"
        + (f", oldest {duration(oldest)}" if isinstance(oldest, (int, float)) else "")
    )
    lines.append(
        f"          dropped {_count(queue.get('dropped'))}, rejected "
        f"{_count(queue.get('rejected'))}, dead letters {_count(queue.get('dead_letters'))}"
    )

    mqtt = result.get("mqtt") or {}
    if mqtt.get("enabled") is False:
        lines.append("mqtt:     disabled")
    else:
        protocol = f" (MQTT {mqtt['protocol']})" if mqtt.get("protocol") else ""
        state = "connected" + protocol if mqtt.get("connected") else "not connected"
        lines.append("mqtt:     " + state)

    clock = result.get("clock")
    if isinstance(clock, Mapping) and "synchronized" in clock:
        text = "synchronized" if clock["synchronized"] else "NOT synchronized"
        if clock.get("source"):
            text += f", source {clock['source']}"
        if clock.get("held"):
            text += f", {_count(clock['held'])} items held until the time is known"
        lines.append("clock:    " + text)

    projects = (result.get("sync") or {}).get("projects") or []
    lines.append("projects:" + ("" if projects else " none yet"))
    for project in projects:
        token = project.get("project_token") or "(not configured)"
        lines.append(
            f"  {token} @ {project.get('base_url', '?')}: {project.get('state', '?')}, "
            f"sent {_count(project.get('sent'))}, last success "
            f"{ago(project.get('last_success'), now)}"
        )
        if project.get("last_error"):
            lines.append(f"    last error: {project['last_error']}")
        if project.get("next_attempt") is not None:
            lines.append(f"    next attempt {until(project['next_attempt'], now)}")

    apps = result.get("apps") or {}
    lines.append("apps:" + ("" if apps else " none yet"))
    for name, app in apps.items():
        tracked = app.get("push_token_tracked_at")
        lines.append(
            f"  {name}: session {app.get('session', '?')}, "
            + ("push token tracked " + ago(tracked, now) if tracked else "no push token")
        )

    recovered = queue.get("recovered") or result.get("recovered") or []
    if recovered:
        lines.append("recovered database files (moved aside as unreadable):")
        lines.extend(
            f"  {entry.get('file', '?')} at {local_time(entry.get('at'))}: "
            f"{entry.get('reason', '?')}"
            for entry in recovered
        )
    return "\n".join(lines)


def customer(result: Result) -> str:
    ids = result.get("ids") or {}
    rows = [("app", result.get("app", "-")), ("project", result.get("project_token") or "-")]
    rows += [(str(key), str(value)) for key, value in ids.items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in rows)


def flush(result: Result) -> str:
    if "flushed" in result:
        return f"sent {result['flushed']} items; {result.get('remaining', '?')} remaining"
    if "remaining" in result:
        return f"flush started; {result['remaining']} items queued"
    return "flush started"


def accepted(result: Result) -> str:
    """Tracking commands: their result carries little, so `ok` plus whatever it holds."""
    return "\n".join(["ok", *(f"  {key}: {_scalar(value)}" for key, value in result.items())])


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; an empty last header makes a free-text column."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _age(created_at: Any, now: float) -> str:
    return duration(max(0.0, now - created_at)) if isinstance(created_at, (int, float)) else "-"


def _item_rows(items: Sequence[Mapping[str, Any]], now: float, dead: bool) -> list[list[str]]:
    rows = []
    for item in items:
        row = [
            _text(item.get("id")),
            _text(item.get("project_token")),
            _text(item.get("app")),
            _text(item.get("kind")),
            _age(item.get("created_at"), now),
            size(item.get("size")),
        ]
        if dead:
            row += [ago(item.get("failed_at"), now), _text(item.get("reason"))]
        elif item.get("held"):
            row.append("held: waiting for the true time")
        rows.append(row)
    return rows


def _listing(key: str, noun: str, dead: bool) -> Callable[[Result], str]:
    def render(result: Result) -> str:
        items = result.get(key) or []
        if not items:
            return f"no {noun}"
        headers = ["ID", "PROJECT", "APP", "KIND", "AGE", "SIZE"]
        headers += ["FAILED", "REASON"] if dead else [""]
        rows = _item_rows(items, time.time(), dead)
        width = len(headers)
        return table(headers, [row + [""] * (width - len(row)) for row in rows])

    return render


def queue_show(result: Result) -> str:
    """The item's facts, then its wire payload: the command as it goes to the API's batch."""
    now = time.time()
    created = result.get("created_at")
    lines = [
        f"id:       {_text(result.get('id'))}",
        f"project:  {_text(result.get('project_token'))} @ {_text(result.get('base_url'))}",
        f"app:      {_text(result.get('app'))}",
        f"kind:     {_text(result.get('kind'))}",
        f"queued:   {local_time(created)} ({_age(created, now)} ago)",
        f"size:     {size(result.get('size'))}",
    ]
    if result.get("held"):
        lines.append("held:     waiting for the true time before it is sent")
    payload = result.get("payload")
    if isinstance(payload, str):
        with contextlib.suppress(ValueError):  # not JSON: shown as the text it is
            payload = json.loads(payload)
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2)
    return "\n".join([*lines, "payload:", text])


#: Human renderers by the command whose reply they show (`queue_purge` split by its `dead`).
RENDERERS: Mapping[str, Callable[[Result], str]] = MappingProxyType(
    {
        "status": status,
        "get_customer": customer,
        "flush": flush,
        "queue_list": _listing("items", "queued items", dead=False),
        "queue_dead_letters": _listing("dead_letters", "dead letters", dead=True),
        "queue_show": queue_show,
        "queue_retry_dead": lambda r: (
            f"moved {r.get('retried', '?')} dead letters back to the queue"
        ),
        "queue_purge": lambda r: f"deleted {r.get('purged', '?')} queued items",
        "queue_purge_dead": lambda r: f"deleted {r.get('purged', '?')} dead letters",
    }
)


def render(command: Mapping[str, Any], result: Result) -> str:
    name = str(command.get("command"))
    if name == "queue_purge" and command.get("dead"):
        name = "queue_purge_dead"
    return RENDERERS.get(name, accepted)(result)
