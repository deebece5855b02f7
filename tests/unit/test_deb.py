"""deploy/build-deb.sh: build the package (a real virtualenv, dependencies from the package
index), for this machine and cross-built for arm64 and armhf, inspect it, run lintian, install
it into a scratch root with dpkg and purge it again.

Takes about 1-2 min (pip and lintian); each build runs once per module.
"""

from __future__ import annotations

import argparse
import marshal
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from agent.cli import build_parser
from tests.fixtures.debian import (
    ELF_MACHINE,
    PREFIX,
    REPO,
    build_deb,
    dpkg,
    elf_machine,
    field,
    scratch_root,
)

HOST_ARCH = subprocess.run(
    ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
).stdout.strip()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    built = build_deb(REPO, out)
    assert built == out / f"engagement-agent_{field(built, 'Version')}_{HOST_ARCH}.deb"
    return built


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    return tree


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The package installed by dpkg into an empty root, maintainer scripts included."""
    root = scratch_root(tmp_path_factory.mktemp("root"))
    result = dpkg(root, "-i", str(deb))
    assert result.returncode == 0, result.stderr
    yield root


def test_control_and_conffiles(deb: Path) -> None:
    info = subprocess.run(
        ["dpkg-deb", "-I", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    assert "Package: engagement-agent" in info
    assert "Depends: python3.11," in info
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
        "/usr/share/man/man8/engagement-agent.8.gz",
        "/usr/share/bash-completion/completions/engagement-agent",
        "/usr/share/doc/engagement-agent/copyright",
        "/usr/share/engagement-agent/mosquitto/engagement.conf",
        "/usr/share/engagement-agent/mosquitto/engagement.acl",
        "/usr/share/engagement-agent/mosquitto/add-app",
    ):
        assert path in paths, path
    assert all(line.split()[1] == "root/root" for line in listing.splitlines())
    assert not any("/pip/" in path or "__pycache__/build" in path for path in paths)


def test_api_stand_in_left_out(unpacked: Path) -> None:
    """The API stand-in is a developer tool (agent_devtools, formerly agent/apistub.py)."""
    names = [str(p.relative_to(unpacked)) for p in unpacked.rglob("*")]
    assert not [n for n in names if "apistub" in n or "agent_devtools" in n]
    entry_points = next(unpacked.glob(f"{PREFIX}/lib/python3.11/site-packages/engagement_agent-*"))
    assert "engagement-api-stub" not in (entry_points / "entry_points.txt").read_text()


def lintian_clean(deb: Path) -> None:
    """Errors none; warnings none either (each override is explained in docs/deploy.md)."""
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"^[EW]: ", result.stdout, re.M), result.stdout


def test_lintian_finds_no_errors(deb: Path) -> None:
    lintian_clean(deb)


def test_man_page_from_the_parser(unpacked: Path) -> None:
    page = unpacked / "usr/share/man/man8/engagement-agent.8.gz"
    result = subprocess.run(
        ["man", "--warnings", "-l", "-Tutf8", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "100"},
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
    text = re.sub(r".\x08", "", result.stdout)
    assert text.startswith("ENGAGEMENT-AGENT(8)")
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb in verbs.choices:
        assert f"engagement-agent {verb}" in text, verb
    for flag in ("--socket", "--config", "--json", "--app", "--yes"):
        assert flag in text, flag
    assert "EXIT STATUS" in text and "78" in text


def test_bash_completion_from_the_parser(unpacked: Path, tmp_path: Path) -> None:
    """The completion function, sourced in bash with bash-completion's two helpers stubbed."""
    script = unpacked / "usr/share/bash-completion/completions/engagement-agent"

    def complete(*line: str) -> list[str]:
        words = ["engagement-agent", *line]
        program = (
            "_init_completion() { cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]};"
            ' words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD; }\n'
            "_filedir() { COMPREPLY=(FILES); }\n"
            f"source {script}\n"
            'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))\n'
            "_engagement_agent\n"
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        )
        result = subprocess.run(
            ["bash", "-c", program, "bash", *words], capture_output=True, text=True, check=True
        )
        return result.stdout.split()

    assert complete("que") == ["queue"]
    assert set(complete("queue", "")) >= {"list", "show", "dead-letters", "retry-dead", "purge"}
    assert "--dead" in complete("queue", "purge", "--")
    assert complete("session", "st") == ["start"]
    assert complete("--config", "") == ["FILES"]
    assert "--app" in complete("track", "--config", "x.toml", "ping", "--a")


def test_safe_default_config(unpacked: Path) -> None:
    """The packaged config: only listed apps, the example app commented out, and it loads."""
    from agent.config import load_config

    path = unpacked / "etc/engagement-agent/agent.toml"
    data = tomllib.loads(path.read_text())
    assert data["apps"]["allow_unknown"] is False
    assert set(data["apps"]) == {"allow_unknown", "defaults"}
    assert "# [apps.kiosk-ui]" in path.read_text()
    config = load_config(path, {})
    assert config.apps.allow_unknown is False


@pytest.mark.parametrize("arch", ["arm64", "armhf"])
def test_cross_built_package(arch: str, tmp_path: Path) -> None:
    """Built here for another architecture: the Architecture field and every compiled file in
    it match the target; the interpreter is the target's Debian 12 python3.11."""
    built = build_deb(REPO, tmp_path, arch=arch)
    assert built.name == f"engagement-agent_{field(built, 'Version')}_{arch}.deb"
    assert field(built, "Architecture") == arch
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(built), str(tree)], check=True)
    compiled = [p for p in tree.rglob("*.so*") if p.is_file()]
    assert compiled, "pydantic-core's extension must be there"
    for path in compiled:
        assert elf_machine(path) == ELF_MACHINE[arch], path
    assert os.readlink(tree / PREFIX / "bin/python3") == "/usr/bin/python3.11"
    pyc = next((tree / PREFIX / "lib").rglob("agent/config/__pycache__/load.cpython-311.pyc"))
    assert pyc.is_file()
    lintian_clean(built)


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO / "deploy/build-deb.sh"), "--arch", "mips", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 64
    assert "unsupported architecture 'mips'" in result.stderr


def test_install_into_scratch_root(installed: Path) -> None:
    root = installed
    assert "engagement-agent:x:" in (root / "etc/passwd").read_text()
    assert "\nengagement-agent-clients:x:" in "\n" + (root / "etc/group").read_text()
    assert (root / "var/lib/engagement-agent").is_dir()
    wants = root / "etc/systemd/system/multi-user.target.wants/engagement-agent.service"
    assert wants.is_symlink()
    config = root / "etc/engagement-agent/agent.toml"
    assert config.stat().st_mode & 0o777 == 0o640
    script = (root / PREFIX / "bin/engagement-agent").read_text()
    assert script.startswith(f"#!/{PREFIX}/bin/python3\n")
    assert str(root) not in (root / PREFIX / "pyvenv.cfg").read_text()
    assert os.readlink(root / PREFIX / "bin/python3") == "/usr/bin/python3.11"


def test_installed_venv_works(installed: Path) -> None:
    """The bundled interpreter finds its own packages and reads the packaged config."""
    python = installed / PREFIX / "bin/python"
    code = (
        "import sys, paho.mqtt, pydantic, urllib3, sdnotify, orjson\n"
        "from pathlib import Path\n"
        "from agent.config import load_config\n"
        "import agent.logs, agent.notify, agent.daemon\n"
        "config = load_config(Path(sys.argv[1]), {})\n"
        "print(config.queue.path, config.socket.path, pydantic.VERSION, sys.prefix)\n"
    )
    result = subprocess.run(
        [str(python), "-I", "-c", code, str(installed / "etc/engagement-agent/agent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    queue, sock, version, prefix = result.stdout.split()
    assert queue == "/var/lib/engagement-agent/queue.db"
    assert sock == "/run/engagement-agent/agent.sock"
    assert version.startswith("2.")
    assert prefix == str(installed / PREFIX)
    # The entry point, run by the bundled interpreter (its #! names the installed path).
    entry = subprocess.run(
        [str(python), str(installed / PREFIX / "bin/engagement-agent"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert entry.returncode == 0 and entry.stdout.startswith("engagement-agent "), entry


def test_bytecode_names_installed_paths(installed: Path) -> None:
    site = next((installed / PREFIX / "lib").glob("python3.*/site-packages"))
    pyc = next((site / "agent" / "config" / "__pycache__").glob("load.*.pyc"))
    code = marshal.loads(pyc.read_bytes()[16:])
    assert (
        code.co_filename
        == f"/{PREFIX}/{(site / 'agent/config/load.py').relative_to(installed / PREFIX)}"
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


def test_missing_wheel_for_the_target_is_named(tmp_path: Path) -> None:
    """A compiled dependency with a wheel for the host but none for the target stops the
    cross-build with a message naming it (a tree that depends on a made-up `fakeext`)."""
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tag = "cp311-cp311-manylinux_2_17_x86_64"
    with zipfile.ZipFile(wheels / f"fakeext-1.0-{tag}.whl", "w") as whl:
        whl.writestr("fakeext/__init__.py", "")
        metadata = "Metadata-Version: 2.1\nName: fakeext\nVersion: 1.0\n"
        whl.writestr("fakeext-1.0.dist-info/METADATA", metadata)
        whl.writestr(
            "fakeext-1.0.dist-info/WHEEL",
            f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}\n",
        )
        whl.writestr("fakeext-1.0.dist-info/RECORD", "")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("agent", "deploy", "systemd"):
        shutil.copytree(REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (REPO / "pyproject.toml").read_text()
    (tree / "pyproject.toml").write_text(
        pyproject.replace("dependencies = [\n", 'dependencies = [\n    "fakeext",\n', 1)
    )
    result = subprocess.run(
        [str(tree / "deploy/build-deb.sh"), "--arch", "arm64", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PIP_ARGS": f"--find-links {wheels}"},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "no arm64 (aarch64, CPython 3.11) wheel on the package index for: fakeext" in (
        result.stderr
    ), result.stderr[-3000:]
    assert not list((tmp_path / "out").glob("*.deb"))
