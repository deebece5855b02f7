"""The systemd unit and snippets: `systemd-analyze verify`, a hardening score ≤ 2.0 and the
settings other parts rely on (SPEC §10, §11)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import MAX_SOCKET_CONNECTIONS
from agent.ipc import LISTEN_BACKLOG, RESERVED_CONNECTIONS

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "engagement-agent.service"
BINARY = "/opt/engagement-agent/bin/engagement-agent"


def settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart/ExecReload pointing at a binary that exists here; verify
    refuses a missing executable (the real one only exists once the .deb is installed)."""
    stand_in = shutil.which("true")
    assert stand_in
    copy = tmp_path / "engagement-agent.service"
    copy.write_text(UNIT.read_text().replace(BINARY, stand_in))
    return copy


def test_verify(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "engagement-agent.service" not in result.stderr, result.stderr


def test_security_exposure(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit_copy)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_required_settings() -> None:
    unit = settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "engagement-agent",
        "Group": "engagement-agent",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "StateDirectory": "engagement-agent",
        "RuntimeDirectory": "engagement-agent",
        "RuntimeDirectoryMode": "2750",
        "ConfigurationDirectory": "engagement-agent",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert unit["ExecStart"] == [f"{BINARY} run --config /etc/engagement-agent/agent.toml"]
    assert unit["ExecReload"][0].startswith(f"{BINARY} reload ")
    assert "$MAINPID" in unit["ExecReload"][0]
    # The socket's group: the clients group, not the one that reads the config.
    assert unit["ExecStartPre"] == [
        "+/bin/chgrp engagement-agent-clients %t/engagement-agent",
        "+/bin/chmod 2750 %t/engagement-agent",
    ]
    assert "@system-service" in unit["SystemCallFilter"]
    # SO_PEERCRED must report real uids for allowed_uids; DynamicUser would defeat sysusers.
    assert "PrivateUsers" not in unit
    assert "DynamicUser" not in unit
    assert "ProcSubset" not in unit


def test_no_trailing_comments() -> None:
    """systemd takes `Key=value # note` literally; comments must be on their own lines."""
    for number, line in enumerate(UNIT.read_text().splitlines(), 1):
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            assert " #" not in line and "\t#" not in line, f"line {number}: {line}"


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    """The snippets apply cleanly to an empty root and create the user and directories."""
    for kind in ("sysusers", "tmpfiles"):
        target = tmp_path / "usr/lib" / f"{kind}.d" / "engagement-agent.conf"
        target.parent.mkdir(parents=True)
        shutil.copy(REPO / "systemd" / f"engagement-agent.{kind}", target)
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", "engagement-agent.conf"],
        check=True,
        capture_output=True,
    )
    assert "engagement-agent:x:" in (tmp_path / "etc/passwd").read_text()
    groups = (tmp_path / "etc/group").read_text()
    assert "\nengagement-agent-clients:x:" in "\n" + groups
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", "engagement-agent.conf"],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "var/lib/engagement-agent").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "etc/engagement-agent/credentials").stat().st_mode & 0o777 == 0o700


def _bytes(value: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


def test_resource_limits_leave_room_for_the_documented_peaks() -> None:
    """docs/operations.md: the numbers behind MemoryMax=, TasksMax= and LimitNOFILE=."""
    unit = settings(UNIT.read_text())
    mib = 1024 * 1024
    # RSS with a 1,000,000-item backlog (~70 MiB, docs/benchmarks.md), the 64 MB a hostile
    # client may cost (docs/security.md), the reload CLI in the same cgroup (~35 MiB).
    assert _bytes(unit["MemoryMax"][0]) >= 70 * mib + 64 * 1000 * 1000 + 35 * mib
    # About ten threads of our own plus one upload thread per project: room for dozens.
    assert int(unit["TasksMax"][0]) >= 10 + 32
    # Every allowed connection, the reserved ones, a burst of refused connects, the rest.
    fds = MAX_SOCKET_CONNECTIONS + RESERVED_CONNECTIONS + LISTEN_BACKLOG + 64
    assert int(unit["LimitNOFILE"][0]) >= fds
