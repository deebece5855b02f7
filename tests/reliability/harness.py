"""Shared pieces of the fault-injection suite: producers that know what was acknowledged, and a
checker that compares that with what reached the API stand-in.

The invariant every test checks (docs/protocol.md, docs/sync.md): every acknowledged command's
items are delivered to the API at least once — or dead-lettered, or evicted by the cap policy
and counted in `queue.dropped` — never silently lost. Each produced command is a `track_event`
named `EVENT` with a unique `properties.rid`, so the checker can tell exactly which ids arrived
and how often.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from agent_devtools.apistub import ApiStub
from tests.fixtures.daemon import AgentProcess, wait_for

#: The event type every producer uses; other events (installation, sessions) are ignored.
EVENT = "rel"
#: Every error code a reply may carry (docs/protocol.md, "Replies").
DOCUMENTED_ERROR_CODES = frozenset(
    {
        "invalid_json",
        "invalid_command",
        "too_large",
        "unknown_app",
        "forbidden",
        "invalid_state",
        "queue_full",
        "unavailable",
        "internal",
    }
)
DEVICE_ID = "test-device"  # the make_agent fixture's device_id
#: Broker settings for MQTT tests: mosquitto's default of 1000 queued messages per offline
#: client would drop PUBACKed messages while the agent is down — a broker limit, not ours.
BROKER_CONFIG = ("max_queued_messages 0", "max_queued_bytes 0")


def seeded() -> random.Random:
    """A fresh random source whose seed is printed, so a failing round can be replayed."""
    seed = random.randrange(1 << 32)
    print(f"random seed {seed}")
    return random.Random(seed)


def rounds(sample: int, full: int) -> list[Any]:
    """Parametrize values: a short `sample` run by default, a long one under `-m full`.

    `RELIABILITY_ROUNDS` overrides the full count (e.g. for a soak run)."""
    import pytest

    full = int(os.environ.get("RELIABILITY_ROUNDS", full))
    return [
        pytest.param(sample, id=f"sample-{sample}"),
        pytest.param(full, id=f"full-{full}", marks=pytest.mark.full),
    ]


def project(api: ApiStub, token: str = "proj-a", key: str = "key-a") -> dict[str, str]:
    return {"project_token": token, "authorization_token": key, "base_url": api.url}


def agent_config(api: ApiStub, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A config that drains as fast as the stand-in allows and retries quickly."""
    config: dict[str, Any] = {
        "project": project(api),
        "sync": {"flush_mode": "immediate", "max_backoff": 1.0, "max_requests_per_second": 0},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def command(rid: str, **extra: Any) -> dict[str, Any]:
    return {
        "command": "track_event",
        "name": EVENT,
        "request_id": rid,
        "properties": {"rid": rid, "pad": "x" * 64},
        **extra,
    }


# --------------------------------------------------------------------------- socket producers


class SocketProducer(threading.Thread):
    """Pipelines uniquely numbered track_events over one connection, `window` in flight.

    Records, by request id, what was acknowledged (`ok: true`), refused (with its code) and
    left unanswered (the connection died). It reconnects when `reconnect` is set (for kill
    loops) and stops on `stop()` or after `count` commands.
    """

    def __init__(
        self,
        socket_path: Path,
        name: str,
        *,
        count: int | None = None,
        window: int = 64,
        reconnect: bool = False,
        app: str | None = None,
    ) -> None:
        super().__init__(name=f"producer-{name}", daemon=True)
        self.socket_path = socket_path
        self.tag = name
        self.count = count
        self.window = window
        self.reconnect = reconnect
        self.app = app
        self.lock = threading.Lock()
        self.acked: list[str] = []
        self.refused: dict[str, str] = {}
        self.unanswered: list[str] = []
        self.bad_replies: list[bytes] = []
        self.sent = 0
        self.connections = 0
        self._stop_event = threading.Event()
        self._next = 0

    def stop(self) -> None:
        self._stop_event.set()

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def snapshot_acked(self) -> set[str]:
        with self.lock:
            return set(self.acked)

    def run(self) -> None:
        while not self._stop_event.is_set() and not self._done():
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(30)
                sock.connect(str(self.socket_path))
            except OSError:
                if not self.reconnect:
                    return
                self._stop_event.wait(0.02)  # the agent is restarting: poll for its socket
                continue
            self.connections += 1
            try:
                self._session(sock)
            finally:
                sock.close()
            if not self.reconnect:
                return

    def _done(self) -> bool:
        return self.count is not None and self._next >= self.count

    def _session(self, sock: socket.socket) -> None:
        pending: collections.deque[str] = collections.deque()
        slots = threading.Semaphore(self.window)
        reader_done = threading.Event()
        closed = threading.Event()

        def read() -> None:
            stream = sock.makefile("rb")
            try:
                while True:
                    line = stream.readline()
                    if not line:
                        break
                    with self.lock:
                        rid = pending.popleft() if pending else None
                    self._record(rid, line)
                    slots.release()
            except OSError:
                pass
            finally:
                closed.set()
                reader_done.set()
                slots.release()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while not self._stop_event.is_set() and not self._done() and not closed.is_set():
                slots.acquire()
                if closed.is_set():
                    break
                rid = f"{self.tag}-{self._next}"
                extra = {"app": self.app} if self.app else {}
                line = json.dumps(command(rid, **extra)).encode() + b"\n"
                with self.lock:
                    pending.append(rid)
                try:
                    sock.sendall(line)
                except OSError:
                    break
                self._next += 1
                self.sent += 1
            # Wait for the replies still due (or the connection's end).
            deadline = time.monotonic() + 30
            while not closed.is_set() and time.monotonic() < deadline:
                with self.lock:
                    if not pending:
                        break
                closed.wait(0.01)
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            reader_done.wait(5)
            with self.lock:
                self.unanswered.extend(pending)
                pending.clear()

    def _record(self, rid: str | None, line: bytes) -> None:
        try:
            reply = json.loads(line)
        except ValueError:
            with self.lock:
                self.bad_replies.append(line)
            return
        with self.lock:
            if rid is None or reply.get("request_id") not in (rid, None):
                self.bad_replies.append(line)
                return
            if reply.get("ok") is True:
                self.acked.append(rid)
            else:
                code = (reply.get("error") or {}).get("code")
                self.refused[rid] = str(code)
                if code not in DOCUMENTED_ERROR_CODES:
                    self.bad_replies.append(line)


def start_producers(
    agent: AgentProcess, n: int, prefix: str, **kwargs: Any
) -> list[SocketProducer]:
    producers = [SocketProducer(agent.socket_path, f"{prefix}{i}", **kwargs) for i in range(n)]
    for producer in producers:
        producer.start()
    return producers


def stop_producers(producers: Iterable[SocketProducer], timeout: float = 60) -> None:
    producers = list(producers)
    for producer in producers:
        producer.stop()
    for producer in producers:
        producer.join(timeout)
        assert not producer.is_alive(), f"{producer.name} did not finish"


def join_producers(producers: Iterable[SocketProducer], timeout: float = 120) -> None:
    """Wait for producers with a `count` to send everything and get every reply."""
    for producer in producers:
        producer.join(timeout)
        assert not producer.is_alive(), f"{producer.name} did not finish in {timeout} s"


def wait_ingest_progress(
    agent: AgentProcess, producers: Iterable[SocketProducer], more: int, what: str
) -> int:
    """Until the producers together have `more` acks than now; returns the count before, so a
    fault injected next lands while ingest is in full swing."""
    producers = list(producers)
    before = sum(p.acked_count() for p in producers)
    wait_for(
        lambda: sum(p.acked_count() for p in producers) >= before + more,
        30,
        f"{what}\n{agent.log()[-3000:]}",
    )
    return before


def acked_ids(producers: Iterable[SocketProducer]) -> list[str]:
    return [rid for p in producers for rid in p.acked]


def assert_replies_well_formed(producers: Iterable[SocketProducer]) -> None:
    bad = [line for p in producers for line in p.bad_replies]
    assert not bad, f"malformed or out-of-order replies: {bad[:5]}"


# --------------------------------------------------------------------------- MQTT producer


class MqttProducer(threading.Thread):
    """Publishes uniquely numbered track_events at QoS 1 to the agent's command topic.

    `accepted()` = the ids whose PUBACK came back from the broker: the broker holds them for
    the agent's persistent session, so each must eventually reach the API. Publishing keeps
    going across broker outages (paho reconnects; ids published while down are simply not
    accepted).
    """

    def __init__(
        self,
        port: int,
        name: str,
        *,
        count: int | None = None,
        app: str = "kiosk",
        rate: float = 3000.0,
    ) -> None:
        super().__init__(name=f"mqtt-producer-{name}", daemon=True)
        self.tag = name
        self.count = count
        self.topic = f"engagement/{DEVICE_ID}/{app}/command"
        self.rate = rate  # messages per second, so a backlog stays drainable in the test
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"rel-{name}-{random.randrange(1 << 30)}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.lock = threading.Lock()
        self.published: list[tuple[str, paho.MQTTMessageInfo]] = []
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        n = 0
        start = time.monotonic()
        while not self._stop_event.is_set() and (self.count is None or n < self.count):
            if not self.client.is_connected():
                self._stop_event.wait(0.02)
                continue
            rid = f"{self.tag}-{n}"
            body = command(rid)
            del body["request_id"]  # a request_id asks for a reply on MQTT: not wanted here
            payload = json.dumps(body).encode()
            info = self.client.publish(self.topic, payload, qos=1)
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                with self.lock:
                    self.published.append((rid, info))
                n += 1
            else:
                self._stop_event.wait(0.02)
            if n % 100 == 0:
                ahead = start + n / self.rate - time.monotonic()
                if ahead > 0:
                    self._stop_event.wait(ahead)

    def accepted(self) -> list[str]:
        with self.lock:
            return [rid for rid, info in self.published if info.is_published()]

    def settle(self, timeout: float = 30) -> None:
        """Give in-flight publishes a chance to get their PUBACK (or to be lost with the
        connection) before the accepted set is taken."""
        deadline = time.monotonic() + timeout
        with self.lock:
            infos = [info for _, info in self.published]
        for info in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.client.is_connected():
                break
            if not info.is_published():
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(remaining)

    def close(self) -> None:
        self.stop()
        self.join(10)
        self.client.disconnect()
        self.client.loop_stop()


def wait_mqtt_connected(agent: AgentProcess, timeout: float = 20) -> None:
    wait_for(
        lambda: agent.status()["mqtt"]["connected"],
        timeout,
        f"the agent's MQTT connection\n{agent.log()[-3000:]}",
    )


# --------------------------------------------------------------------------- checking


def delivered(api: ApiStub, project_token: str | None = None) -> collections.Counter[str]:
    """How many times each produced id reached the API."""
    counts: collections.Counter[str] = collections.Counter()
    for record in api.received(project_token):
        data = record.data
        if data.get("event_type") == EVENT:
            rid = (data.get("properties") or {}).get("rid")
            if isinstance(rid, str):
                counts[rid] += 1
    return counts


def delivered_order(api: ApiStub, project_token: str | None = None) -> list[str]:
    return [
        r.data["properties"]["rid"]
        for r in api.received(project_token)
        if r.data.get("event_type") == EVENT
    ]


def safe_status(agent: AgentProcess) -> dict[str, Any] | None:
    try:
        return agent.status()
    except (OSError, ConnectionError, AssertionError, ValueError):
        return None


def wait_drained(agent: AgentProcess, timeout: float = 60) -> dict[str, Any]:
    """Until the agent's queue is empty (everything acked by the API and deleted)."""

    def empty() -> dict[str, Any] | None:
        status = safe_status(agent)
        if status is not None and status["queue"]["items"] == 0:
            return status
        return None

    try:
        result: dict[str, Any] = wait_for(empty, timeout, "the queue to drain")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nstatus: {safe_status(agent)}\nagent log:\n{agent.log()[-6000:]}"
        ) from None
    return result


def wait_delivered(
    api: ApiStub, ids: Iterable[str], agent: AgentProcess | None = None, timeout: float = 60
) -> None:
    wanted = set(ids)

    def all_there() -> bool:
        return not (wanted - set(delivered(api)))

    try:
        wait_for(all_there, timeout, "every acknowledged id at the API")
    except AssertionError:
        missing = sorted(wanted - set(delivered(api)))
        extra = (
            "" if agent is None else f"\nstatus: {safe_status(agent)}\nlog:\n{agent.log()[-6000:]}"
        )
        raise AssertionError(
            f"{len(missing)} acknowledged ids never reached the API, e.g. {missing[:10]}{extra}"
        ) from None


def check_no_loss(
    api: ApiStub,
    acked: Iterable[str],
    *,
    max_duplicates: int,
    agent: AgentProcess | None = None,
    dropped: int = 0,
) -> collections.Counter[str]:
    """Every acked id arrived (dropped ones excepted), duplicates within `max_duplicates`."""
    acked = list(acked)
    counts = delivered(api)
    missing = sorted(set(acked) - set(counts))
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    context = ""
    if agent is not None and (len(missing) > dropped or duplicates > max_duplicates):
        context = f"\nstatus: {safe_status(agent)}\nagent log (tail):\n{agent.log()[-6000:]}"
    assert len(missing) <= dropped, (
        f"{len(missing)} of {len(acked)} acknowledged ids are missing at the API "
        f"(allowed: {dropped} counted as dropped), e.g. {missing[:10]}{context}"
    )
    assert duplicates <= max_duplicates, (
        f"{duplicates} duplicate deliveries, more than the bound {max_duplicates}{context}"
    )
    return counts


def kill_at_random(agent: AgentProcess, rng: random.Random, low: float, high: float) -> float:
    """kill -9 after a random delay; returns the delay (for the failure message)."""
    delay = rng.uniform(low, high)
    time.sleep(delay)  # the randomness *is* the test: a crash at an arbitrary moment
    agent.kill()
    return delay
