#!/usr/bin/env python3
"""MQTT ingest: QoS 1 commands from `mosquitto_pub -l` until committed in the real queue.

What it measures: commands/s from the first PUBLISH to the last command committed, through the
agent's real path in this process — paho's network thread, the inbox and one hop to asyncio
per burst, `agent.dispatch` (JSON + pydantic validation, authorization), the engine and the
SQLite store with `durability = "full"` (fsync before the ack), then the manual PUBACK, with
the daemon's GC settings (`agent.daemon.tune_gc`) — and the agent's CPU time per command
(this process's user + system time). The baseline row is the C client `mosquitto_sub -q 1`
draining the same stream from the same private broker in the same run, i.e. what the broker
and the publisher can do at all on this machine.

    python3 bench/bench_mqtt.py                 # 50,000 commands, 3 rounds each, medians
    python3 bench/bench_mqtt.py --count 20000 --rounds 1

The broker runs with `max_queued_messages 0`: the publisher outpaces any subscriber, and
Mosquitto's default (1000 queued per client) would otherwise drop QoS 1 messages — see
docs/mqtt.md.

    python3 bench/bench_mqtt.py --paho-from-loop

runs the design the agent did not take, for comparison: paho driven from the asyncio loop
without a network thread (`add_reader`/`add_writer` on paho's socket and a `loop_misc` task, as
aiomqtt did in its paho era). docs/benchmarks.md has both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.config import AgentConfig, MqttConfig, ProjectConfig, QueueConfig  # noqa: E402
from agent.daemon import tune_gc  # noqa: E402
from agent.device import read_device_info  # noqa: E402
from agent.dispatch import Accepted, Dispatcher  # noqa: E402
from agent.engine import Engine, Runner  # noqa: E402
from agent.mqtt.adapter import MqttAdapter  # noqa: E402
from agent.mqtt.client import PahoClient  # noqa: E402
from agent.mqtt.connection import Connection, Link  # noqa: E402
from agent.store import Store  # noqa: E402
from tests.fixtures.mosquitto import MosquittoBroker  # noqa: E402

TOPIC = "engagement/bench/kiosk/command"


class NoQueries:
    """The benchmark sends tracking commands only."""

    async def query(self, command: Accepted) -> Mapping[str, Any]:
        return {}


class LoopDrivenConnection(Connection):
    """paho driven from the event loop instead of its network thread.

    Only what the benchmark needs: one connection (blocking connect to the local broker), no
    reconnects. Received messages then go through the same inbox, dispatcher and acks.
    """

    def _connect(self, link: Link) -> None:
        loop = self._loop
        cfg = link.config
        version = link.protocol.version
        client: PahoClient = self._build_client(link, version)
        link.client, link.client_version = client, version

        def opened(c: Any, userdata: Any, sock: Any) -> None:
            loop.add_reader(sock, c.loop_read)

        def closed(c: Any, userdata: Any, sock: Any) -> None:
            loop.remove_reader(sock)
            loop.remove_writer(sock)

        def want_write(c: Any, userdata: Any, sock: Any) -> None:
            loop.add_writer(sock, c.loop_write)

        def written(c: Any, userdata: Any, sock: Any) -> None:
            loop.remove_writer(sock)

        client.on_socket_open = opened
        client.on_socket_close = closed
        client.on_socket_register_write = want_write
        client.on_socket_unregister_write = written
        if version == 5:
            client.connect(cfg.host, cfg.port, cfg.keepalive, clean_start=False)
        else:
            client.connect(cfg.host, cfg.port, cfg.keepalive)

        async def misc() -> None:  # keepalive pings
            while client.loop_misc() == 0:
                await asyncio.sleep(1.0)

        self._misc = loop.create_task(misc())

    async def stop(self, relink_timeout: float) -> None:
        self._stopping = True
        link = self.link
        if link is not None and link.client is not None:
            link.client.disconnect()
        self._misc.cancel()


class PahoFromLoop(MqttAdapter):
    """The adapter with `LoopDrivenConnection` in place of its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connection = LoopDrivenConnection(
            self._config,
            self._loop,
            on_message=self._receive,
            on_connected=self._connected,
            on_lost=self._cancel_retries,
            drain=self._drain_work,
            reconnect_base=1.0,
            reconnect_cap=120.0,
            rng=random.Random(),
        )


def write_lines(path: Path, count: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            command = {
                "command": "track_event",
                "name": "purchase_viewed",
                "properties": {"i": i, "sku": "handbag-42", "price": 12.34},
            }
            out.write(json.dumps(command, separators=(",", ":")) + "\n")


def publisher(port: int, lines: Path, protocol: int) -> subprocess.Popen[bytes]:
    version = ["-V", "5"] if protocol == 5 else ["-V", "311"]
    with lines.open("rb") as stdin:
        return subprocess.Popen(
            ["mosquitto_pub", "-p", str(port), *version, "-q", "1", "-t", TOPIC, "-l"],
            stdin=stdin,
        )


def baseline(broker: MosquittoBroker, lines: Path, count: int, round_no: int) -> float:
    client_id = f"bench-baseline-{round_no}"
    sub = ["mosquitto_sub", "-p", str(broker.port), "-V", "5", "-q", "1", "-t", TOPIC]
    session = ["-c", "-i", client_id, "-x", "3600"]
    subprocess.run([*sub, *session, "-E"], check=True)  # create the persistent session
    start = time.perf_counter()
    consumer = subprocess.Popen([*sub, *session, "-C", str(count)], stdout=subprocess.DEVNULL)
    producer = publisher(broker.port, lines, 5)
    consumer.wait()
    elapsed = time.perf_counter() - start
    producer.wait()
    return count / elapsed


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def adapter_round(
    broker: MosquittoBroker,
    directory: Path,
    lines: Path,
    count: int,
    protocol: int,
    round_no: int,
    adapter_class: type[MqttAdapter] = MqttAdapter,
) -> tuple[float, float]:
    """(commands/s, agent CPU µs per command) for one run into a fresh database."""
    config = AgentConfig(
        device_id="bench",
        project=ProjectConfig(
            project_token="bench", authorization_token="bench", base_url="http://127.0.0.1:9"
        ),
        queue=QueueConfig(path=directory / f"queue-{protocol}-{round_no}.db", durability="full"),
        mqtt=MqttConfig(
            host="127.0.0.1",
            port=broker.port,
            protocol=protocol,  # type: ignore[arg-type]
            client_id=f"bench-agent-{protocol}-{round_no}",
        ),
    )
    loop = asyncio.get_running_loop()
    store = Store(config.queue)
    store.open()
    engine = Engine(store, config, read_device_info("bench-uuid", "kiosk", "bench"))
    engine.load()
    dispatcher = Dispatcher(config, Runner(engine, loop), NoQueries())
    adapter = adapter_class(config, dispatcher, loop, lambda: {"online": True})
    tune_gc()  # as the daemon does once it is started
    adapter.start()

    def committed() -> int:
        return dispatcher.counts()["mqtt"].get("ok", 0)

    async def until_committed(target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while committed() < target:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    # A probe proves the subscription is in place before the clock starts.
    while True:
        subprocess.run(
            [
                "mosquitto_pub",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-t",
                TOPIC,
                "-m",
                '{"command":"track_event","name":"probe"}',
            ],
            check=True,
        )
        if await until_committed(1, 1.0):
            break
    await asyncio.sleep(0.2)  # let stray probes land before taking the baseline count
    before = committed()
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    producer = publisher(broker.port, lines, protocol)
    if not await until_committed(before + count, 600):
        raise RuntimeError("the commands were not all committed within 600 s")
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_before
    await asyncio.to_thread(producer.wait)
    await adapter.stop()
    store.close()
    return count / elapsed, cpu / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--paho-from-loop", action="store_true", help="the alternative design, for comparison"
    )
    parser.add_argument(
        "--protocol", type=int, choices=(3, 5), action="append", help="only these (default both)"
    )
    args = parser.parse_args()
    protocols = args.protocol or [5, 3]
    adapter_class = PahoFromLoop if args.paho_from_loop else MqttAdapter
    how = "paho driven from the loop" if args.paho_from_loop else "committed"
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        directory = Path(tmp)
        broker = MosquittoBroker(directory / "broker", ["max_queued_messages 0"])
        broker.directory.mkdir()
        lines = directory / "commands.ndjson"
        write_lines(lines, args.count)
        broker.start()
        rows: list[tuple[str, list[float], list[float]]] = [
            ("mosquitto_sub -q 1 (C baseline)", [], []),
            *(
                (f"agent, MQTT {'5' if p == 5 else '3.1.1'} ({how}, durability full)", [], [])
                for p in protocols
            ),
        ]
        try:
            for round_no in range(args.rounds):
                rows[0][1].append(baseline(broker, lines, args.count, round_no))
                for row, protocol in zip(rows[1:], protocols, strict=True):
                    rate, cpu = asyncio.run(
                        adapter_round(
                            broker, directory, lines, args.count, protocol, round_no, adapter_class
                        )
                    )
                    row[1].append(rate)
                    row[2].append(cpu)
        finally:
            broker.stop()
    print(
        f"\nMQTT QoS 1 ingest, {args.count:,} commands from mosquitto_pub -l, "
        f"{args.rounds} round(s), median\n"
    )
    print("| consumer | commands/s | agent CPU µs/command | rounds |")
    print("|---|---:|---:|---|")
    for name, rates, cpus in rows:
        rounds = ", ".join(f"{r:,.0f}" for r in rates)
        cpu_text = f"{statistics.median(cpus):,.0f}" if cpus else "–"
        print(f"| {name} | {statistics.median(rates):,.0f} | {cpu_text} | {rounds} |")


if __name__ == "__main__":
    main()
