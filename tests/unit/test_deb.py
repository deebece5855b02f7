"""deploy/build-deb.sh: build the package (a real virtualenv, dependencies from the package
index), inspect it, install it into a scratch root with dpkg and purge it again.

Takes about 30-40 s (most of it pip); the build runs once per module.
"""

from __future__ import annotations

import marshal
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFIX = "opt/engagement-agent"


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    result = subprocess.run(
        [str(REPO / "deploy" / "build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    built = Path(result.stdout.strip().splitlines()[-1])
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    version = subprocess.run(
        ["dpkg-deb", "-f", str(built), "Version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert built == out / f"engagement-agent_{version}_{arch}.deb"
    return built


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The package installed by dpkg into an empty root, maintainer scripts included."""
    root = tmp_path_factory.mktemp("root")
    for name in ("var/lib/dpkg/updates", "var/lib/dpkg/info", "etc", "usr/lib"):
        (root / name).mkdir(parents=True)
    for name in ("status", "available"):
        (root / "var/lib/dpkg" / name).touch()
    result = dpkg(root, "-i", str(deb))
    assert result.returncode == 0, result.stderr
    yield root


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends"]
    command += ["--log=/dev/null", *args]
    if os.geteuid() != 0:
        command.insert(1, "--force-not-root")
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_control_and_conffiles(deb: Path) -> None:
    info = subprocess.run(
        ["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    assert "Package: engagement-agent" in info
    assert "Depends: python3." in info
    for script in ("postinst", "prerm", "postrm", "conffiles"):
        assert script in info
    conffiles = subprocess.run(
        ["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True, check=True
    ).stdout
    assert conffiles.split() == ["/etc/engagement-agent/agent.toml"]


def test_contents(deb: Path) -> None:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    for path in (
        "/lib/systemd/system/engagement-agent.service",
        "/usr/lib/sysusers.d/engagement-agent.conf",
        "/usr/lib/tmpfiles.d/engagement-agent.conf",
        "/etc/engagement-agent/agent.toml",
        "/opt/engagement-agent/bin/python3",
        "/opt/engagement-agent/bin/engagement-agent",
        "/opt/engagement-agent/pyvenv.cfg",
        "/usr/bin/engagement-agent",
    ):
        assert path in paths, path
    assert all(line.split()[1] == "root/root" for line in listing.splitlines())
    assert not any("/pip/" in path or "__pycache__/build" in path for path in paths)


def test_install_into_scratch_root(installed: Path) -> None:
    root = installed
    assert "engagement-agent:x:" in (root / "etc/passwd").read_text()
    assert (root / "var/lib/engagement-agent").is_dir()
    wants = root / "etc/systemd/system/multi-user.target.wants/engagement-agent.service"
    assert wants.is_symlink()
    config = root / "etc/engagement-agent/agent.toml"
    assert config.stat().st_mode & 0o777 == 0o640
    script = (root / PREFIX / "bin/engagement-agent").read_text()
    assert script.startswith(f"#!/{PREFIX}/bin/python")
    assert str(root) not in (root / PREFIX / "pyvenv.cfg").read_text()
    assert os.readlink(root / PREFIX / "bin/python3").startswith("/usr/bin/python3")


def test_installed_venv_works(installed: Path) -> None:
    """The bundled interpreter finds its own packages and reads the packaged config."""
    python = installed / PREFIX / "bin/python"
    code = (
        "import sys, paho.mqtt, pydantic, sqlite_utils, urllib3, sdnotify\n"
        "from pathlib import Path\n"
        "from agent.config import load_config\n"
        "import agent.logs, agent.notify\n"
        "config = load_config(Path(sys.argv[1]), {})\n"
        "print(config.queue.path, config.socket.path, pydantic.VERSION)\n"
    )
    result = subprocess.run(
        [str(python), "-I", "-c", code, str(installed / "etc/engagement-agent/agent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    queue, sock, version = result.stdout.split()
    assert queue == "/var/lib/engagement-agent/queue.db"
    assert sock == "/run/engagement-agent/agent.sock"
    assert version.startswith("2.")


def test_bytecode_names_installed_paths(installed: Path) -> None:
    site = next((installed / PREFIX / "lib").glob("python3.*/site-packages"))
    pyc = next((site / "agent" / "__pycache__").glob("config.*.pyc"))
    code = marshal.loads(pyc.read_bytes()[16:])
    assert (
        code.co_filename
        == f"/{PREFIX}/{(site / 'agent/config.py').relative_to(installed / PREFIX)}"
    )


def test_purge(installed: Path) -> None:
    result = dpkg(installed, "--purge", "engagement-agent")
    assert result.returncode == 0, result.stderr
    assert not (installed / PREFIX / "bin").exists()
    assert not (installed / "var/lib/engagement-agent").exists()
    assert not (installed / "etc/engagement-agent").exists()
    assert not (
        installed / "etc/systemd/system/multi-user.target.wants/engagement-agent.service"
    ).is_symlink()


def test_ansible_template_renders_a_valid_config(tmp_path: Path) -> None:
    """The role's template, rendered the way Ansible does, passes the agent's validation."""
    import json

    import jinja2
    import yaml

    from agent.config import load_config

    role = REPO / "deploy/ansible/roles/engagement_agent"
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(role / "templates"),
        trim_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["to_json"] = json.dumps
    env.filters["bool"] = bool
    env.tests["sameas"] = lambda a, b: a is b
    variables = yaml.safe_load((role / "defaults/main.yml").read_text())
    variables.update(
        engagement_agent_device_id="kiosk-042",
        engagement_agent_mqtt_username="kiosk-042",
        engagement_agent_project_token="project-1",
        engagement_agent_mqtt_password="pw",
        engagement_agent_app_defaults={
            "session_timeout": 30,
            "default_properties": {"site": "berlin", "floors": [1, 2], "open": True},
        },
        engagement_agent_apps={"kiosk-ui": {"allowed_uids": [1001]}, "pos.v2": {}},
    )
    config_path = tmp_path / "agent.toml"
    config_path.write_text(env.get_template("agent.toml.j2").render(**variables))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "authorization_token").write_text("secret\n")
    (creds / "mqtt_password").write_text("pw\n")
    config = load_config(config_path, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert config.device_id == "kiosk-042"
    assert config.project is not None and config.project.authorization_token == "secret"
    assert config.mqtt.password == "pw"
    kiosk = config.app_config("kiosk-ui")
    assert kiosk is not None and kiosk.allowed_uids == [1001] and kiosk.session_timeout == 30
    assert config.apps.defaults.default_properties["floors"] == [1, 2]
    assert set(config.apps.named()) == {"kiosk-ui", "pos.v2"}
