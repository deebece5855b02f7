"""The arm64 package on an arm64 Debian 12, under emulation (qemu-user-static + binfmt_misc):
built here with `deploy/build-deb.sh --arch arm64`, installed with dpkg in a debootstrapped
arm64 root, the agent started the way the unit starts it (its ExecStart= as its User=, the
shipped config pointed at the API stand-in on the host), one command over the socket reaches
the stand-in, and SIGTERM stops it with exit 0.

Slow (a few minutes; docs/deploy.md has the measured time), so it runs only when asked:

    ./test.sh -m arm tests/package/test_arm.py

Needs root, qemu-user-static, binfmt-support and debootstrap (apt-get install). The arm64 root
is debootstrapped once into ENGAGEMENT_AGENT_ARM_ROOT (default
/var/cache/engagement-agent-test/bookworm-arm64, outside the repository) and copied per run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from tests.fixtures.api import ApiStub, api_project
from tests.fixtures.daemon import SocketClient, to_toml, wait_for
from tests.fixtures.debian import REPO, build_deb, in_chroot, unit_settings

pytestmark = pytest.mark.arm

CACHE = Path(
    os.environ.get("ENGAGEMENT_AGENT_ARM_ROOT", "/var/cache/engagement-agent-test/bookworm-arm64")
)
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def register_qemu_aarch64() -> None:
    """binfmt_misc runs arm64 ELF files through qemu-aarch64 (Debian's qemu-user-static)."""
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    if not (BINFMT / "qemu-aarch64").exists():
        rule = Path("/usr/lib/binfmt.d/qemu-aarch64.conf").read_text()
        line = next(x for x in rule.splitlines() if x.startswith(":"))
        (BINFMT / "register").write_text(line)
    assert "enabled" in (BINFMT / "qemu-aarch64").read_text()


def arm64_root() -> Path:
    """The cached debootstrapped Debian 12 arm64 root (made once, about 2 min)."""
    if not (CACHE / "usr/bin/python3.11").exists():
        partial = CACHE.with_name(CACHE.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "debootstrap",
                "--arch=arm64",
                "--variant=minbase",
                "--include=python3,systemd",
                "bookworm",
                str(partial),
                MIRROR,
            ],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        partial.rename(CACHE)
    return CACHE


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    assert os.geteuid() == 0, "the ARM smoke test needs root (chroot, mount, binfmt_misc)"
    for tool in ("unshare", "chroot", "debootstrap", "/usr/bin/qemu-aarch64-static"):
        assert shutil.which(tool), f"{tool} missing: apt-get install qemu-user-static debootstrap"
    register_qemu_aarch64()
    work = tmp_path_factory.mktemp("arm")
    copy = work / "root"
    subprocess.run(["cp", "-a", str(arm64_root()), str(copy)], check=True)
    deb = build_deb(REPO, work, arch="arm64")
    shutil.copy(deb, copy / "tmp" / deb.name)
    result = subprocess.run(
        in_chroot(copy, ["dpkg", "-i", f"/tmp/{deb.name}"]),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield copy
    shutil.rmtree(copy)  # about 400 MB; the cached root stays


def test_arm64_package_runs_the_agent(root: Path, api_stub: ApiStub) -> None:
    arch = subprocess.run(
        in_chroot(root, ["dpkg", "--print-architecture"]), capture_output=True, text=True
    )
    assert arch.stdout.strip() == "arm64"
    machine = subprocess.run(
        in_chroot(
            root,
            ["/opt/engagement-agent/bin/python3", "-c", "import os; print(os.uname().machine)"],
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert machine.stdout.strip() == "aarch64", machine.stderr

    # The shipped config, pointed at the stand-in on the host (same network namespace), with
    # one app listed (the package allows no unknown apps) and no broker.
    config_path = root / "etc/engagement-agent/agent.toml"
    config = tomllib.loads(config_path.read_text())
    config["project"] = api_project(api_stub)
    config["apps"]["kiosk-ui"] = {"application_id": "kiosk-ui-app"}
    config["mqtt"] = {"enabled": False}
    config_path.write_text(to_toml(config))

    unit = unit_settings(root)
    user = unit["User"]
    # What systemd's RuntimeDirectory= and the unit's ExecStartPre= would do.
    passwd = (root / "etc/passwd").read_text().splitlines()
    uid = int(next(line for line in passwd if line.startswith(f"{user}:")).split(":")[2])
    group = (root / "etc/group").read_text().splitlines()
    gid = int(
        next(line for line in group if line.startswith("engagement-agent-clients:")).split(":")[2]
    )
    runtime = root / "run/engagement-agent"
    runtime.mkdir(parents=True, exist_ok=True)
    os.chown(runtime, uid, gid)
    runtime.chmod(0o2750)

    log = root.parent / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            in_chroot(root, unit["ExecStart"].split(), user=user),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    sock = runtime / "agent.sock"

    def listening() -> bool:
        if agent.poll() is not None:
            raise AssertionError(f"agent exited with {agent.returncode}:\n{log.read_text()}")
        if not sock.exists():
            return False
        with socket.socket(socket.AF_UNIX) as probe:
            return probe.connect_ex(str(sock)) == 0

    try:
        wait_for(listening, 300, "the arm64 agent's socket")
        assert sock.stat().st_gid == gid  # the clients group, via the setgid directory
        with SocketClient(sock, timeout=120) as client:
            reply = client.request(
                {
                    "command": "track_event",
                    "app": "kiosk-ui",
                    "name": "arm_smoke",
                    "properties": {"n": 1},
                }
            )
        assert reply["ok"], reply
        assert api_stub.wait_for(
            lambda: any(r.data.get("event_type") == "arm_smoke" for r in api_stub.received()),
            120,
        ), log.read_text()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(120) == 0, log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
