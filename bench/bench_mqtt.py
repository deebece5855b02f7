#!/usr/bin/env python3
"""MQTT ingest: QoS 1 commands from `mosquitto_pub -l` through the adapter into memory.

What it measures: commands/s from the first PUBLISH to the last command committed by an
in-memory backend, through the real path — paho's network thread, the hop to asyncio, `Intake`
(JSON + pydantic validation) and the manual PUBACK after the "commit". The baseline row is the
C client `mosquitto_sub -q 1` draining the same stream from the same private broker in the same
run, i.e. what the broker and the publisher can do at all on this machine.

    python3 bench/bench_mqtt.py                 # 50,000 commands, 3 rounds each, medians
    python3 bench/bench_mqtt.py --count 20000 --rounds 1

The broker runs with `max_queued_messages 0`: the publisher outpaces any subscriber, and
Mosquitto's default (1000 queued per client) would otherwise drop QoS 1 messages — see
docs/mqtt.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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

from agent.config import AgentConfig, MqttConfig  # noqa: E402
from agent.intake import Intake  # noqa: E402
from agent.mqtt import MqttAdapter  # noqa: E402
from tests.fixtures.mosquitto import MosquittoBroker  # noqa: E402

TOPIC = "engagement/bench/kiosk/command"


class MemoryBackend:
    """Commits into a counter; sets `done` when `target` commands have arrived."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done = asyncio.Event()

    async def track(self, app: str, command: Any, now: float) -> Mapping[str, Any] | None:
        self.count += 1
        if self.count == self.target:
            self.done.set()
        return None

    async def query(self, app: str, command: Any) -> Mapping[str, Any]:
        return {}


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


async def adapter_round(
    broker: MosquittoBroker, lines: Path, count: int, protocol: int, round_no: int
) -> float:
    config = AgentConfig(
        device_id="bench",
        mqtt=MqttConfig(
            host="127.0.0.1",
            port=broker.port,
            protocol=protocol,  # type: ignore[arg-type]
            client_id=f"bench-agent-{protocol}-{round_no}",
        ),
    )
    backend = MemoryBackend()
    adapter = MqttAdapter(
        config, Intake(config, backend), asyncio.get_running_loop(), lambda: {"online": True}
    )
    adapter.start()
    # A probe proves the subscription is in place before the clock starts.
    backend.target = 1
    while not backend.done.is_set():
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
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(backend.done.wait(), 1.0)
    await asyncio.sleep(0.2)  # let stray probes land before resetting the counter
    backend.count = 0
    backend.target = count
    backend.done = asyncio.Event()
    start = time.perf_counter()
    producer = publisher(broker.port, lines, protocol)
    await asyncio.wait_for(backend.done.wait(), 600)
    elapsed = time.perf_counter() - start
    await asyncio.to_thread(producer.wait)
    await adapter.stop()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        directory = Path(tmp)
        broker = MosquittoBroker(directory / "broker", ["max_queued_messages 0"])
        broker.directory.mkdir()
        lines = directory / "commands.ndjson"
        write_lines(lines, args.count)
        broker.start()
        try:
            rows: list[tuple[str, list[float]]] = [
                ("mosquitto_sub -q 1 (C baseline)", []),
                ("adapter, MQTT 5 (Intake + manual ack)", []),
                ("adapter, MQTT 3.1.1 (Intake + manual ack)", []),
            ]
            for round_no in range(args.rounds):
                rows[0][1].append(baseline(broker, lines, args.count, round_no))
                rows[1][1].append(
                    asyncio.run(adapter_round(broker, lines, args.count, 5, round_no))
                )
                rows[2][1].append(
                    asyncio.run(adapter_round(broker, lines, args.count, 3, round_no))
                )
        finally:
            broker.stop()
    print(
        f"\nMQTT QoS 1 ingest, {args.count:,} commands from mosquitto_pub -l, "
        f"{args.rounds} round(s), median\n"
    )
    print("| consumer | commands/s | rounds |")
    print("|---|---:|---|")
    for name, results in rows:
        rounds = ", ".join(f"{r:,.0f}" for r in results)
        print(f"| {name} | {statistics.median(results):,.0f} | {rounds} |")


if __name__ == "__main__":
    main()
