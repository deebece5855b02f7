"""Upgrades keep everything: the previous release's package (built by its own
deploy/build-deb.sh from commit fd56f82) is installed with dpkg into a scratch root, its agent
accepts commands while the API is down; the package is upgraded to this tree's under the
running agent (dpkg -i, the admin's config kept as unattended upgrades keep it), which takes
more commands until it is restarted on the new code; the new agent opens the same
database (migrating its schema if this release has a newer one), and every acknowledged
command reaches the API; the app's cookie, customer ids, session, push token and default
properties survive. Then a downgrade: if this release's schema is newer, the older agent
refuses the database with a clear message and leaves it byte for byte untouched; and a
database claiming a schema newer than the older agent knows is refused the same way on any
branch.

    ./test.sh -m package tests/package/test_upgrade.py      (about 2 min; docs/deploy.md)
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sqlite3
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_devtools.apistub import ApiStub
from tests.fixtures.api import API_PROJECTS
from tests.fixtures.daemon import SocketClient, to_toml, wait_for
from tests.fixtures.debian import PREFIX, REPO, build_deb, dpkg, field, scratch_root
from tests.fixtures.mosquitto import free_port

pytestmark = pytest.mark.package

PREVIOUS_RELEASE = "fd56f82"
APP = "kiosk-ui"
UPGRADE = ["--force-confdef", "--force-confold"]


class InstalledAgent:
    """The agent of the package installed in `root`, run by that package's interpreter."""

    def __init__(self, root: Path, config: Path, log: Path) -> None:
        self.root = root
        self.config = config
        self.log = log
        self.socket = root / "run/engagement-agent/agent.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        venv = self.root / PREFIX
        command = [str(venv / "bin/python"), str(venv / "bin/engagement-agent")]
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*command, "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
            )
        return self.process

    def wait_listening(self) -> None:
        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}:\n{self.text()}")
            with socket.socket(socket.AF_UNIX) as probe:
                return probe.connect_ex(str(self.socket)) == 0

        wait_for(listening, 60, "the installed agent's socket")

    def request(self, command: dict[str, Any]) -> dict[str, Any]:
        with SocketClient(self.socket) as client:
            return client.request({"app": APP, **command})

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(60) == 0, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(previous release's package, this tree's package with a higher version)."""
    work = tmp_path_factory.mktemp("packages")
    old_tree = work / "previous"
    old_tree.mkdir()
    result = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", PREVIOUS_RELEASE],
        capture_output=True,
    )
    assert result.returncode == 0, (
        f"the previous release's commit {PREVIOUS_RELEASE} must be in the repository's history "
        f"(not a shallow clone): {result.stderr.decode(errors='replace')}"
    )
    archive = result.stdout
    archive_path = work / "previous.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(old_tree, filter="tar")
    old = build_deb(old_tree, work / "old")
    (work / "new").mkdir()
    new = build_deb(REPO, work / "new")
    old_version, new_version = field(old, "Version"), field(new, "Version")
    newer = subprocess.run(["dpkg", "--compare-versions", new_version, "gt", old_version])
    assert newer.returncode == 0, f"this tree's version {new_version} must be above {old_version}"
    return old, new


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield scratch_root(tmp_path / "root")


def files_digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def schema_of(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    return version


def agent_schema(root: Path) -> int:
    """SCHEMA_VERSION of the agent installed in `root`, asked of that agent's own code."""
    venv = root / PREFIX
    result = subprocess.run(
        # -I: not the checkout's `agent` from the working directory, the installed one.
        [
            str(venv / "bin/python"),
            "-I",
            "-c",
            "from agent.store import SCHEMA_VERSION; print(SCHEMA_VERSION)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout)


def test_upgrade_keeps_queue_and_app_state_and_downgrade_is_refused(
    packages: tuple[Path, Path], root: Path, tmp_path: Path
) -> None:
    old_deb, new_deb = packages
    result = dpkg(root, "-i", str(old_deb))
    assert result.returncode == 0, result.stderr

    # The admin's config (a conffile): the API on a port where nothing listens yet.
    api_port = free_port()
    state = root / "var/lib/engagement-agent"
    config_path = root / "etc/engagement-agent/agent.toml"
    config = {
        "device_id": "kiosk-042",
        "project": {
            "project_token": "proj-a",
            "authorization_token": API_PROJECTS["proj-a"],
            "base_url": f"http://127.0.0.1:{api_port}",
        },
        "apps": {APP: {"application_id": "kiosk-ui-app", "session_timeout": 3600.0}},
        "queue": {"path": str(state / "queue.db")},
        "socket": {"path": str(root / "run/engagement-agent/agent.sock")},
        "mqtt": {"enabled": False},
        "sync": {"max_backoff": 2.0},
    }
    config_path.write_text(to_toml(config))
    (root / "run/engagement-agent").mkdir(parents=True)
    log = tmp_path / "agent.log"

    # The previous release takes commands while the API is down.
    agent = InstalledAgent(root, config_path, log)
    agent.start()
    agent.wait_listening()
    acked: list[int] = []
    for command in (
        {"command": "app_foreground"},
        {"command": "identify_customer", "ids": {"registered": "jane@example.com"}},
        {"command": "set_default_properties", "properties": {"store": "berlin"}},
        {"command": "track_push_token", "token": "push-token-1"},
    ):
        reply = agent.request(command)
        assert reply["ok"], reply
    for seq in range(20):
        event = {"command": "track_event", "name": "queued", "properties": {"seq": seq}}
        reply = agent.request(event)
        assert reply["ok"], reply
        acked.append(seq)
    before = agent.request({"command": "get_customer"})["result"]
    status = agent.request({"command": "status"})["result"]
    assert status["apps"][APP]["session"] == "active"
    token_time = status["apps"][APP]["push_token_tracked_at"]
    assert token_time is not None
    assert status["queue"]["items"] >= len(acked)
    old_schema = agent_schema(root)

    # Upgrade as on a device: dpkg replaces the files under the running agent (prerm does not
    # stop it), which keeps taking commands until postinst restarts it (try-restart; without
    # systemd here, the test restarts it).
    result = dpkg(root, *UPGRADE, "-i", str(new_deb))
    assert result.returncode == 0, result.stderr
    assert f"Version: {field(new_deb, 'Version')}" in dpkg(root, "-s", "engagement-agent").stdout
    assert config_path.read_text() == to_toml(config), "the admin's config must be kept"
    for seq in range(20, 25):
        event = {"command": "track_event", "name": "queued", "properties": {"seq": seq}}
        reply = agent.request(event)
        assert reply["ok"], reply
        acked.append(seq)
    agent.stop()

    api = ApiStub("127.0.0.1", api_port, API_PROJECTS)
    api.start()
    try:
        agent = InstalledAgent(root, config_path, log)
        agent.start()
        agent.wait_listening()
        new_schema = schema_of(state / "queue.db")
        assert new_schema == agent_schema(root)
        assert new_schema >= old_schema

        def delivered() -> set[int]:
            return {
                r.data["properties"]["seq"]
                for r in api.received()
                if r.data.get("event_type") == "queued"
            }

        assert api.wait_for(lambda: delivered() == set(acked), 120), (delivered(), agent.text())
        after = agent.request({"command": "get_customer"})["result"]
        assert after["ids"] == before["ids"]
        assert after["ids"]["registered"] == "jane@example.com"
        status = agent.request({"command": "status"})["result"]
        assert status["apps"][APP]["session"] == "active"
        assert status["apps"][APP]["push_token_tracked_at"] == token_time
        # Every delivered event carries the same customer and the persisted defaults.
        events = [r.data for r in api.received() if r.data.get("event_type") == "queued"]
        assert all(e["customer_ids"]["cookie"] == before["ids"]["cookie"] for e in events)
        reply = agent.request({"command": "track_event", "name": "after_upgrade"})
        assert reply["ok"], reply
        assert api.wait_for(
            lambda: any(r.data.get("event_type") == "after_upgrade" for r in api.received()), 60
        )
        late = next(r.data for r in api.received() if r.data.get("event_type") == "after_upgrade")
        assert late["properties"]["store"] == "berlin"
        assert late["customer_ids"]["cookie"] == before["ids"]["cookie"]
        agent.stop()
    finally:
        api.stop()

    # Downgrade to the previous release.
    digest = files_digest(state)
    result = dpkg(root, *UPGRADE, "-i", str(old_deb))
    assert result.returncode == 0, result.stderr
    assert files_digest(state) == digest, "dpkg must not touch the database"
    agent = InstalledAgent(root, config_path, tmp_path / "downgraded.log")
    process = agent.start()
    if new_schema > old_schema:
        assert process.wait(60) != 0
        assert "newer" in agent.text() and "Upgrade the agent" in agent.text(), agent.text()
        assert files_digest(state) == digest
    else:
        # Same schema: the previous release reads this database as its own.
        agent.wait_listening()
        assert agent.request({"command": "get_customer"})["result"]["ids"] == before["ids"]
        agent.stop()

    # Whatever this branch's schema: a database newer than the older agent knows is refused,
    # untouched.
    with sqlite3.connect(state / "queue.db") as conn:
        conn.execute(f"PRAGMA user_version = {max(new_schema, old_schema) + 1}")
    conn.close()
    digest = files_digest(state)
    agent = InstalledAgent(root, config_path, tmp_path / "newer.log")
    process = agent.start()
    assert process.wait(60) != 0
    assert "newer than this agent's" in agent.text(), agent.text()
    assert files_digest(state) == digest
