"""The ARM packages on ARM Debian 12 roots, under emulation (qemu-user-static + binfmt_misc):
built here with `deploy/build-deb.sh --arch arm64` (and `armhf`), installed with dpkg in a
debootstrapped root of that architecture, the agent started the way the unit starts it (its
ExecStart= as its User=, the shipped config pointed at the API stand-in on the host), one
command over the socket reaches the stand-in, and SIGTERM stops it with exit 0.

Slow (docs/deploy.md has the measured time), so it runs only when asked:

    ./test.sh -m arm tests/package/test_arm.py            (-k arm64 for one architecture)

Needs root, qemu-user-static, binfmt-support and debootstrap (apt-get install). Each root is
debootstrapped once into $ENGAGEMENT_AGENT_TEST_CACHE/bookworm-<arch> (default
/var/cache/engagement-agent-test, outside the repository) and copied per run.
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

from agent_devtools.apistub import ApiStub
from tests.fixtures.api import api_project
from tests.fixtures.daemon import SocketClient, to_toml, wait_for
from tests.fixtures.debian import REPO, build_deb, in_chroot, unit_settings

pytestmark = pytest.mark.arm

CACHE = Path(os.environ.get("ENGAGEMENT_AGENT_TEST_CACHE", "/var/cache/engagement-agent-test"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
#: Debian architecture -> (qemu's binfmt_misc handler, what uname says under it).
ARCHES = {"arm64": ("qemu-aarch64", "aarch64"), "armhf": ("qemu-arm", "armv7l")}


def register_qemu(handler: str) -> None:
    """binfmt_misc runs the architecture's ELF files through qemu (Debian's qemu-user-static),
    registered from the rule Debian ships in /usr/lib/binfmt.d/ if it is not yet."""
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    if not (BINFMT / handler).exists():
        rule = Path(f"/usr/lib/binfmt.d/{handler}.conf").read_text()
        line = next(x for x in rule.splitlines() if x.startswith(":"))
        (BINFMT / "register").write_text(line)
    assert "enabled" in (BINFMT / handler).read_text()


def debian_root(arch: str) -> Path:
    """The cached debootstrapped Debian 12 root of `arch` (made once, about 2 min)."""
    cached = CACHE / f"bookworm-{arch}"
    if not (cached / "usr/bin/python3.11").exists():
        partial = cached.with_name(cached.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "debootstrap",
                f"--arch={arch}",
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
        partial.rename(cached)
    return cached


@pytest.fixture(scope="module", params=sorted(ARCHES))
def root(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A copy of the cached root with this tree's package installed by dpkg."""
    arch: str = request.param
    assert os.geteuid() == 0, "the ARM smoke test needs root (chroot, mount, binfmt_misc)"
    for tool in ("unshare", "chroot", "debootstrap", f"/usr/bin/{ARCHES[arch][0]}-static"):
        assert shutil.which(tool), f"{tool} missing: apt-get install qemu-user-static debootstrap"
    register_qemu(ARCHES[arch][0])
    work = tmp_path_factory.mktemp(arch)
    copy = work / "root"
    subprocess.run(["cp", "-a", str(debian_root(arch)), str(copy)], check=True)
    deb = build_deb(REPO, work, arch=arch)
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


def test_package_runs_the_agent(root: Path, api_stub: ApiStub) -> None:
    arch = subprocess.run(
        in_chroot(root, ["dpkg", "--print-architecture"]), capture_output=True, text=True
    ).stdout.strip()
    assert arch in ARCHES
    machine = subprocess.run(
        in_chroot(
            root,
            ["/opt/engagement-agent/bin/python3", "-c", "import os; print(os.uname().machine)"],
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert machine.stdout.strip() == ARCHES[arch][1], machine.stderr

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
        wait_for(listening, 300, f"the {arch} agent's socket")
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
