"""`queue list|show|dead-letters|retry-dead|purge`: live through the agent, or on the file.

Live, the agent does the work (it owns the database). When no agent listens (socket missing or
refused) the CLI opens the database itself, which is how a queue is inspected or repaired while
the service is stopped. The database's lock decides, not the socket: if the agent holds it, the
CLI says so instead of touching a file in use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.cli.context import (
    EX_REJECTED,
    EX_UNAVAILABLE,
    EX_USAGE,
    PROG,
    CliError,
    Options,
    write_line,
)
from agent.cli.verbs import Arg, Verb, build_command, show_reply
from agent.client import DEFAULT_TIMEOUT, AgentUnavailable, Reply

if TYPE_CHECKING:
    from agent.config import AgentConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _page_args() -> tuple[Arg, ...]:
    return (
        Arg(
            ("--limit",),
            "limit",
            {
                "type": _positive_int,
                "metavar": "N",
                "help": "show at most N (default 100, at most 10000)",
            },
        ),
        Arg(
            ("--after",),
            "after_id",
            {"type": int, "metavar": "ID", "help": "start after this id (to page through)"},
        ),
    )


def queue_verbs() -> tuple[Verb, ...]:
    p = f"{PROG} queue"
    return (
        Verb(
            "list",
            "queue_list",
            "list queued items, oldest first",
            f"  {p} list\n  {p} list --limit 20 --after 1500",
            _page_args(),
            app=False,
        ),
        Verb(
            "show",
            "queue_show",
            "show one queued item with its payload",
            f"  {p} show 1501",
            (Arg(("ID",), "id", {"type": _positive_int}),),
            app=False,
        ),
        Verb(
            "dead-letters",
            "queue_dead_letters",
            "list items the API refused, with the reason",
            f"  {p} dead-letters",
            _page_args(),
            app=False,
        ),
        Verb(
            "retry-dead",
            "queue_retry_dead",
            "move dead letters back to the queue (all of them, or the given ids)",
            f"  {p} retry-dead\n  {p} retry-dead 12 13",
            (
                Arg(
                    ("ID",),
                    "ids",
                    {"type": _positive_int, "nargs": "*"},
                    lambda ids: list(ids) or None,
                ),
            ),
            app=False,
        ),
        Verb(
            "purge",
            "queue_purge",
            "delete every queued item (or one project's, or every dead letter) for good",
            f"  {p} purge            # asks first\n  {p} purge --dead --yes\n"
            f"  {p} purge --project 0b7e5a9c-1d2f-11ee-8c3a-0242ac120002",
            (
                Arg(
                    ("--dead",),
                    "dead",
                    {"action": "store_true", "help": "purge the dead letters instead"},
                ),
                Arg(
                    ("--project",),
                    "project_token",
                    {"metavar": "TOKEN", "help": "only the queued items of this project token"},
                ),
                Arg(
                    ("--yes",),
                    None,
                    {
                        "action": "store_true",
                        "help": "do not ask (required when stdin is not a terminal)",
                    },
                ),
            ),
            app=False,
        ),
    )


def _confirm(command: Mapping[str, Any], *, ask: bool) -> None:
    """Refuses --dead with --project (a usage error, before anything is sent); asks unless
    --yes, and without a terminal to ask on insists on --yes."""
    if command.get("dead") and command.get("project_token"):
        raise CliError("queue purge takes --dead or --project, not both", EX_USAGE)
    if command.get("dead"):
        what = "every dead letter"
    elif command.get("project_token"):
        what = f"every queued item of project {command['project_token']} (they will never be sent)"
    else:
        what = "every queued item (it will never be sent)"
    if not ask:
        return
    if not sys.stdin.isatty():
        raise CliError(
            f"queue purge deletes {what}; stdin is not a terminal, so pass --yes to confirm",
            EX_USAGE,
        )
    sys.stderr.write(f"Delete {what}? This cannot be undone. [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise CliError("not purged", EX_REJECTED)


def run_queue_verb(verb: Verb, ns: argparse.Namespace) -> int:
    options = Options.from_namespace(ns)
    command = build_command(verb, ns)
    if command["command"] == "queue_purge":
        _confirm(command, ask=not ns.v_yes)
    try:
        with options.client(DEFAULT_TIMEOUT) as client:
            reply = client.request(command)
    except AgentUnavailable as exc:
        if not exc.offline:
            raise
        reply = run_offline(command, options.load_config(), exc)
    code = show_reply(command, reply, options.json)
    _hint_next_page(command, reply, options)
    return code


def _hint_next_page(command: Mapping[str, Any], reply: Reply, options: Options) -> None:
    rows = reply.result.get("items", reply.result.get("dead_letters"))
    limit = command.get("limit", 100)
    if options.json or not isinstance(rows, list) or len(rows) < limit or not rows:
        return
    verb = "list" if command["command"] == "queue_list" else "dead-letters"
    write_line(f"(more: {PROG} queue {verb} --after {rows[-1].get('id')})")


# -- offline -------------------------------------------------------------------------------


def run_offline(
    command: Mapping[str, Any], config: AgentConfig, unreachable: AgentUnavailable
) -> Reply:
    """Run an admin command on the database file; the answer is shaped like the agent's."""
    from agent.commands import validate_command
    from agent.errors import AgentError
    from agent.queue_admin import run_admin
    from agent.store import Store, StoreError, StoreLocked

    path = config.queue.path
    if not path.exists():
        raise CliError(f"{unreachable.message}; no queue database at {path} either", EX_UNAVAILABLE)
    store = Store(config.queue)
    try:
        store.open()
    except StoreLocked:
        raise CliError(
            f"the agent is running (it holds {path}) but its socket is unreachable: "
            f"{unreachable.message}",
            EX_UNAVAILABLE,
        ) from None
    except (StoreError, OSError) as exc:
        raise CliError(f"cannot open the queue database {path}: {exc}", EX_UNAVAILABLE) from None
    sys.stderr.write(f"{PROG}: the agent is not running; working on {path} directly\n")
    data: dict[str, Any] = {"ok": True, "request_id": None}
    try:
        data["result"] = run_admin(store, validate_command(dict(command)))
    except AgentError as exc:
        data = {"ok": False, "request_id": None, "error": exc.to_reply_error()}
    finally:
        store.close()
    return Reply(json.dumps(data, separators=(",", ":"), ensure_ascii=False), data)
