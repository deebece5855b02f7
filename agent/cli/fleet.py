"""`engagement-agent fleet`: every device's retained status from the MQTT broker, one line each.

Each agent keeps its status retained on `<prefix>/<device_id>/status` (docs/mqtt.md), and its
last will replaces it with `{"online": false}`. Subscribing to `<prefix>/+/status` therefore
returns the whole fleet at once, right after the SUBACK; the collection stops when no message
came for a moment (or at a deadline), so the command ends on its own and fast.

The summary of one status document (`device_row`) and the table are pure; only `collect` and
`watch` talk to the broker, with a throwaway client id and a clean session — never the agent's
own client id, which would disconnect the agent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.context import (
    EX_OK,
    EX_UNAVAILABLE,
    EX_USAGE,
    PROG,
    CliError,
    Options,
    positive_float,
    write_json,
)
from agent.cli.render import ago, duration, table
from agent.metrics import sync_rank
from agent.mqtt.status import STATUS_MAX_INTERVAL

if TYPE_CHECKING:
    import paho.mqtt.client as paho

#: A retained message arriving after this much silence is not part of the initial burst.
QUIET_SECONDS = 0.5
DEFAULT_TIMEOUT = 10.0
DEFAULT_INTERVAL = 2.0
#: A status document is a few KiB; anything far larger on a status topic is not ours.
MAX_STATUS_BYTES = 1024 * 1024

#: The largest integer a float holds exactly; larger numbers in a status are not ours.
MAX_NUMBER = 2**53
#: A status older than this should have been replaced by a heartbeat (every
#: `STATUS_MAX_INTERVAL`, give or take the 10 s publishing rhythm): the device, or a bridge
#: between it and this broker, stopped publishing, though no last will has come (yet).
STALE_AFTER = STATUS_MAX_INTERVAL + 60.0
Row = dict[str, Any]


# -- pure: one device's line ------------------------------------------------------------------


def _number(value: Any) -> float | int | None:
    """A JSON number that arithmetic and the table can use, else None: whatever is retained on
    a status topic may come from anyone with access to the broker (Python's JSON reads
    `Infinity` and numbers of any length, and a 300-digit figure would make the table useless)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if abs(value) <= MAX_NUMBER else None


def _worst_sync(projects: Any) -> tuple[str | None, float | None]:
    """The worst state of the device's projects and that project's last success (the oldest,
    when several share the worst state: the one that has been failing longest)."""
    if not isinstance(projects, list):
        return None, None
    ranked: list[tuple[int, float, str, float | None]] = []
    for project in projects:
        if not isinstance(project, Mapping) or not isinstance(project.get("state"), str):
            continue
        state = project["state"]
        rank = sync_rank(state)
        last = _number(project.get("last_success"))
        ranked.append((rank, last if last is not None else float("-inf"), state, last))
    if not ranked:
        return "idle", None  # nothing queued for any project yet
    _rank, _order, state, last = min(ranked)
    return state, last


def device_row(device_id: str, payload: bytes, now: float) -> Row:
    """One device's line from its retained status; fields the document lacks are None.

    A device known only by its last will (`{"online": false}`) has nulls everywhere else; a
    payload that is not a status document says so in `error` instead of stopping the listing.
    `now` is this machine's wall-clock time: see `_age_now` for what it is used for.
    """
    row: Row = {
        "device_id": device_id,
        "online": None,
        "version": None,
        "queue_items": None,
        "oldest_age": None,
        "sync_state": None,
        "last_success": None,
        "clock_synchronized": None,
        "status_age": None,
    }
    try:
        status = json.loads(payload) if len(payload) <= MAX_STATUS_BYTES else None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can read
        status = None
    if not isinstance(status, dict):
        row["error"] = "unreadable status message"
        return row
    if isinstance(status.get("online"), bool):
        row["online"] = status["online"]
    if isinstance(status.get("version"), str):
        row["version"] = status["version"]
    clock = status.get("clock")
    if isinstance(clock, Mapping) and isinstance(clock.get("synchronized"), bool):
        row["clock_synchronized"] = clock["synchronized"]
        as_of = _number(status.get("as_of"))
        if as_of is not None and clock["synchronized"]:
            # `skew`: how far the device's clock is behind the API's, when it is wrong by more
            # than `clock.max_skew` even though NTP says synchronized.
            made = as_of + (_number(clock.get("skew")) or 0)
            row["status_age"] = round(max(0.0, now - made), 3)
    queue = status.get("queue")
    if isinstance(queue, Mapping):
        items = _number(queue.get("items"))
        row["queue_items"] = int(items) if items is not None else None
        row["oldest_age"] = _age_now(_number(queue.get("oldest_age")), row["status_age"])
    sync = status.get("sync")
    if isinstance(sync, Mapping):
        row["sync_state"], row["last_success"] = _worst_sync(sync.get("projects"))
    return row


def _age_now(age: float | None, status_age: float | None) -> float | None:
    """`queue.oldest_age` brought forward from when the device made its status to now.

    The retained status is republished within ~20 s of a change (a new item, a drained one) but
    only every `STATUS_MAX_INTERVAL` otherwise, so without this the oldest item's age would be
    up to 5 minutes behind. Nothing but time changes it between two publications, so adding
    the status's age is exact when both clocks are right; it is done only when the device said
    its clock is synchronized (`status_age` is None otherwise), and by at most one heartbeat
    interval, so a wrong clock on this machine cannot make a queue look hours older. A status
    older than that is flagged in the table instead (`STALE_AFTER`)."""
    if age is None or status_age is None:
        return age
    return round(age + min(status_age, STATUS_MAX_INTERVAL), 3)


def sort_rows(rows: Iterable[Row]) -> list[Row]:
    """Offline devices first (what an operator looks for in an incident), then unknown ones,
    then online; by device id within each group."""
    order = {False: 0, None: 1, True: 2}
    return sorted(rows, key=lambda row: (order[row["online"]], row["device_id"]))


def _cell(value: Any, show: Callable[[Any], str] = str) -> str:
    return "-" if value is None else show(value)


def fleet_table(rows: Sequence[Row], now: float) -> str:
    headers = ["DEVICE", "ONLINE", "VERSION", "QUEUE", "OLDEST", "SYNC", "LAST SUCCESS", "CLOCK"]
    cells = [
        [
            row["device_id"],
            {True: "online", False: "OFFLINE", None: "?"}[row["online"]],
            _cell(row["version"]),
            _cell(row["queue_items"]),
            _cell(row["oldest_age"], duration),
            _cell(row["sync_state"]),
            "-" if row["sync_state"] is None else ago(row["last_success"], now),
            _cell(row["clock_synchronized"], lambda ok: "synced" if ok else "UNSYNCED"),
            _note(row),
        ]
        for row in rows
    ]
    offline = sum(1 for row in rows if row["online"] is False)
    return table([*headers, ""], cells) + f"\n{len(rows)} devices, {offline} offline"


def _note(row: Row) -> str:
    if "error" in row:
        return f"({row['error']})"
    age = row["status_age"]
    if row["online"] and age is not None and age > STALE_AFTER:
        return f"(status {duration(age)} old)"
    return ""


# -- the broker -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int
    username: str
    password: str
    tls: bool
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    topic_prefix: str

    def topics(self, devices: Sequence[str]) -> list[str]:
        """`<prefix>/+/status`, or the named devices' exact topics (for brokers that send
        retained messages only to exact subscriptions, such as RabbitMQ's MQTT plugin)."""
        return [f"{self.topic_prefix}/{device}/status" for device in devices or ["+"]]

    def device_of(self, topic: str) -> str | None:
        head, tail = self.topic_prefix + "/", "/status"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        device = topic[len(head) : -len(tail)]
        return device if device and "/" not in device else None


def settings_from(ns: argparse.Namespace, options: Options) -> BrokerSettings:
    """The `[mqtt]` section of the config, overridden by the command line's flags.

    Without `--config` the system config is used only if this user may read it (it holds
    secrets); an operator's workstation usually has none and passes `--host` and friends.
    """
    from agent.config import MqttConfig
    from agent.config.load import DEFAULT_CONFIG_PATH

    if options.config is not None or os.access(DEFAULT_CONFIG_PATH, os.R_OK):
        mqtt = options.load_config().mqtt
    else:
        mqtt = MqttConfig()
    password = mqtt.password
    if ns.password is not None:
        password = ns.password
    if ns.password_file is not None:
        try:
            password = ns.password_file.read_text(encoding="utf-8").removesuffix("\n")
        except OSError as exc:
            message = f"cannot read --password-file: {exc.strerror or exc}"
            raise CliError(message, EX_USAGE) from None
    return BrokerSettings(
        host=ns.host or mqtt.host,
        port=ns.port or mqtt.port,
        username=ns.username if ns.username is not None else mqtt.username,
        password=password,
        tls=ns.tls or mqtt.tls,
        ca_file=ns.ca_file or mqtt.ca_file,
        cert_file=ns.cert_file or mqtt.cert_file,
        key_file=ns.key_file or mqtt.key_file,
        topic_prefix=ns.topic_prefix or mqtt.topic_prefix,
    )


class Listener:
    """A short-lived subscriber driven by `loop()` in this thread (no network thread)."""

    def __init__(self, settings: BrokerSettings, devices: Sequence[str]) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.settings = settings
        self.where = f"{settings.host}:{settings.port}"
        self.payloads: dict[str, bytes] = {}
        self.last_message = 0.0
        self.subscribed_at: float | None = None
        self.refused: str | None = None
        self._topics = settings.topics(devices)
        # MQTT 3.1.1: every broker speaks it, and a reader needs nothing from MQTT 5.
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{PROG}-fleet-{uuid.uuid4().hex[:12]}",
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        if settings.username or settings.password:
            self.client.username_pw_set(settings.username, settings.password or None)
        if settings.tls:
            self.client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
            )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            return
        client.subscribe([(topic, 0) for topic in self._topics])

    def _on_subscribe(self, _c: paho.Client, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            self.refused = f"subscription refused ({', '.join(failed)})"
        self.subscribed_at = time.monotonic()

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        device = self.settings.device_of(message.topic)
        if device is None:
            return
        if message.payload:
            self.payloads[device] = bytes(message.payload)
        else:  # a cleared retained status: the device was removed
            self.payloads.pop(device, None)
        self.last_message = time.monotonic()

    def connect(self, timeout: float) -> None:
        self.client.connect_timeout = max(1.0, timeout)
        try:
            self.client.connect(self.settings.host, self.settings.port, keepalive=60)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
            raise CliError(
                f"cannot reach the MQTT broker at {self.where}: {reason}", EX_UNAVAILABLE
            ) from None

    def pump(self, seconds: float) -> None:
        """Process network traffic for about `seconds`."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            rc = self.client.loop(timeout=min(left, 0.1))
            self._check(rc)

    def _check(self, rc: Any) -> None:
        if self.refused is not None:
            raise CliError(
                f"the MQTT broker at {self.where} refused: {self.refused}", EX_UNAVAILABLE
            )
        if rc != 0:
            import paho.mqtt.client as paho

            raise CliError(
                f"lost the connection to the MQTT broker at {self.where}: {paho.error_string(rc)}",
                EX_UNAVAILABLE,
            )

    def collect(self, timeout: float) -> bool:
        """Wait for the retained burst: until `QUIET_SECONDS` pass without a message after the
        SUBACK, or `timeout`. Returns False when it was cut short by the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self.subscribed_at is not None:
                quiet_since = max(self.subscribed_at, self.last_message)
                if now - quiet_since >= QUIET_SECONDS:
                    return True
            if now >= deadline:
                if self.subscribed_at is None:
                    raise CliError(
                        f"the MQTT broker at {self.where} did not answer within {timeout:g} s",
                        EX_UNAVAILABLE,
                    )
                return False
            self._check(self.client.loop(timeout=min(0.1, deadline - now)))

    def rows(self) -> list[Row]:
        now = time.time()
        return sort_rows(device_row(d, p, now) for d, p in self.payloads.items())

    def close(self) -> None:
        self.client.disconnect()


def _show(rows: list[Row], as_json: bool, clear: bool) -> None:
    if as_json:
        write_json(rows)
    else:
        if clear:
            sys.stdout.write("\x1b[H\x1b[2J")
        body = fleet_table(rows, time.time()) if rows else "no devices found"
        sys.stdout.write(body + "\n")
    sys.stdout.flush()


def run_fleet(ns: argparse.Namespace) -> int:
    options = Options.from_namespace(ns)
    settings = settings_from(ns, options)
    listener = Listener(settings, ns.devices)
    listener.connect(ns.timeout)
    try:
        complete = listener.collect(ns.timeout)
        if not complete:
            sys.stderr.write(
                f"{PROG}: still receiving statuses after {ns.timeout:g} s; showing the "
                f"{len(listener.payloads)} devices so far (raise --timeout for all)\n"
            )
        rows = listener.rows()
        if not ns.watch:
            _show(rows, options.json, clear=False)
            return EX_OK
        clear = sys.stdout.isatty() and not options.json
        try:
            while True:
                _show(rows, options.json, clear)
                listener.pump(ns.interval)
                rows = listener.rows()
        except KeyboardInterrupt:
            return EX_OK  # Ctrl-C is how --watch ends
    finally:
        listener.close()


def add_fleet(verbs: Any, config_only: argparse.ArgumentParser, formatter: Any) -> None:
    parser = verbs.add_parser(
        "fleet",
        parents=[config_only],
        formatter_class=formatter,
        help="every device's status from the MQTT broker, one line each, offline first",
        description="Read every agent's retained status (<prefix>/+/status) from the MQTT "
        "broker and print one line per device: online, version, queue items and oldest age, "
        "worst sync state and its last success, clock. Offline devices first. The broker "
        "settings are the [mqtt] section of the config, or the options below.",
        epilog=f"examples:\n  {PROG} fleet\n"
        f"  {PROG} fleet --host broker.example.com --port 8883 --tls --username ops "
        "--password-file ~/.mqtt-pass\n"
        f"  {PROG} fleet --json | jq '.[] | select(.online == false) | .device_id'\n"
        f"  {PROG} fleet --watch\n"
        f"  {PROG} fleet kiosk-041 kiosk-042    # exact topics only (RabbitMQ)",
    )
    parser.add_argument(
        "devices",
        nargs="*",
        type=_topic_level,
        metavar="DEVICE",
        help="only these devices (subscribes to their exact status topics)",
    )
    broker = parser.add_argument_group("broker (default: the [mqtt] section of the config)")
    broker.add_argument("--host", help="broker host name or address")
    broker.add_argument("--port", type=_port, help="broker port")
    broker.add_argument("--username", help="user name")
    secret = broker.add_mutually_exclusive_group()
    secret.add_argument("--password", help="password (visible to other users: prefer a file)")
    secret.add_argument("--password-file", type=Path, metavar="PATH", help="read it from a file")
    broker.add_argument("--tls", action="store_true", default=None, help="connect with TLS")
    broker.add_argument("--ca-file", type=Path, metavar="PATH", help="CA bundle for TLS")
    broker.add_argument("--cert-file", type=Path, metavar="PATH", help="client certificate")
    broker.add_argument("--key-file", type=Path, metavar="PATH", help="client certificate key")
    broker.add_argument(
        "--topic-prefix", type=_topic_level, metavar="PREFIX", help="topic prefix (engagement)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"longest wait for the broker and the statuses (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    parser.add_argument(
        "--interval",
        type=positive_float,
        default=DEFAULT_INTERVAL,
        metavar="SECONDS",
        help=f"refresh period for --watch (default {DEFAULT_INTERVAL:g})",
    )
    parser.set_defaults(handler=run_fleet)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(text)
    return value


def _topic_level(text: str) -> str:
    """A device id or topic prefix: no MQTT wildcards (they would widen the subscription)."""
    if not text or "+" in text or "#" in text or text.startswith("$"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a topic name (no +, # or leading $)")
    return text
