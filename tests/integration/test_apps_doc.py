"""The Python examples of docs/apps.md run as written against a real agent: a reader who
copies them gets working code."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.daemon import REPO, AgentProcess


def python_examples() -> list[str]:
    """The indented code blocks of the "Python apps" section that use the client."""
    text = (REPO / "docs" / "apps.md").read_text()
    section = text.split("## Python apps", 1)[1].split("\n## ", 1)[0]
    blocks, current = [], []
    for line in [*section.splitlines(), ""]:
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:])
            continue
        if current:
            blocks.append("\n".join(current).strip() + "\n")
        current = []
    return [b for b in blocks if b.startswith(("from agent.client", "with Client", "results ="))]


def test_the_examples_run_against_the_agent(
    make_agent: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    agent: AgentProcess = make_agent({"sync": {"flush_mode": "manual"}})
    agent.start()
    monkeypatch.setattr("agent.config.load.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.setenv("ENGAGEMENT_AGENT_SOCKET__PATH", str(agent.socket_path))
    examples = python_examples()
    assert len(examples) >= 3, examples
    namespace: dict[str, Any] = {
        "readings": [{"at": time.time() - i, "temperature": 20 + i} for i in range(100)],
        "log": None,
        "keep_for_later": None,
    }
    for example in examples:
        if "except CommandError" in example:
            continue  # the error-handling pattern needs the app's own logger
        exec(compile(example, "docs/apps.md", "exec"), namespace)
    assert len(namespace["batch"].results) == 100
    assert len(namespace["refused"]) == 1
    assert agent.status()["queue"]["items"] >= 100
