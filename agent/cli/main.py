"""The argument parser and the verbs that are not "send one command": run, check-config, send.

Global options are defined once in parent parsers with `SUPPRESS` defaults and attached to the
root parser and to every subparser, so they work before or after the verb and a value given
before the verb is not overwritten by the subparser's default.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__
from agent.cli.context import (
    EX_CONFIG,
    EX_OK,
    EX_REJECTED,
    EX_UNAVAILABLE,
    EX_USAGE,
    PROG,
    CliError,
    Options,
    error_line,
    exit_code,
    positive_float,
    write_json,
    write_line,
)
from agent.cli.fleet import add_fleet
from agent.cli.queue import queue_verbs, run_queue_verb
from agent.cli.verbs import add_verbs, command_verbs
from agent.client import DEFAULT_TIMEOUT, AgentUnavailable, Client, stream_requests

_FORMATTER = argparse.RawDescriptionHelpFormatter

_OVERVIEW = f"""\
Talks to the engagement-agent daemon over its Unix socket; `run` is the daemon itself.

examples:
  {PROG} status
  {PROG} track purchase_started -p item=handbag -p price=12.5 --app kiosk-ui
  {PROG} send < commands.ndjson
  {PROG} queue list
  {PROG} fleet --host broker.example.com

Global options (--socket, --config, --json, --timeout) work before or after the verb.
exit codes: 0 ok, 1 command rejected, 64 usage, 69 agent not reachable, 78 bad config
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE, docs/cli.md) in one line, not 2 with a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def _global_options(*, socket: bool, json: bool = True) -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("global options")
    if socket:
        group.add_argument(
            "--socket",
            type=Path,
            default=argparse.SUPPRESS,
            metavar="PATH",
            help="the agent's socket (default: socket.path from the config)",
        )
    group.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="config file (default: /etc/engagement-agent/agent.toml if it exists)",
    )
    if json:
        group.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print the result as JSON instead of text (a refusal: the reply on stderr)",
        )
    if socket:
        group.add_argument(
            "--timeout",
            type=positive_float,
            default=argparse.SUPPRESS,
            metavar="SECONDS",
            help=f"how long to wait for the agent (default {DEFAULT_TIMEOUT:g}; flush --wait 600)",
        )
    return parent


def build_parser() -> argparse.ArgumentParser:
    common = _global_options(socket=True)
    config_only = _global_options(socket=False)
    run_options = _global_options(socket=False, json=False)
    root = _Parser(
        prog=PROG,
        description=_OVERVIEW,
        formatter_class=_FORMATTER,
        parents=[common],
    )
    root.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbs = root.add_subparsers(dest="verb", metavar="VERB", required=True)

    run = verbs.add_parser(
        "run",
        parents=[run_options],
        formatter_class=_FORMATTER,
        help="run the agent (what systemd starts)",
        description="Run the agent in the foreground until SIGTERM; SIGHUP reloads the config.",
        epilog=f"examples:\n  {PROG} run\n  {PROG} run --config ./agent.toml",
    )
    run.set_defaults(handler=_run_daemon)

    check = verbs.add_parser(
        "check-config",
        parents=[config_only],
        formatter_class=_FORMATTER,
        help="validate the configuration and list every problem",
        description="Load the configuration as `run` would, without starting; exit 78 if bad.",
        epilog=f"examples:\n  {PROG} check-config\n  {PROG} check-config --config ./agent.toml"
        "\n  ENGAGEMENT_AGENT_SYNC__FLUSH_MODE=manual engagement-agent check-config",
    )
    check.set_defaults(handler=_check_config)

    add_verbs(verbs, command_verbs(), common, _FORMATTER)
    add_fleet(verbs, config_only, _FORMATTER)

    metrics = verbs.add_parser(
        "metrics",
        parents=[_global_options(socket=True, json=False)],
        formatter_class=_FORMATTER,
        help="print the agent's status as Prometheus metrics",
        description="Ask the agent for its status and print it in the Prometheus text format "
        "(the same as metrics.textfile writes for node_exporter).",
        epilog=f"examples:\n  {PROG} metrics\n  {PROG} metrics | grep engagement_agent_queue_items",
    )
    metrics.set_defaults(handler=_metrics)

    reload = verbs.add_parser(
        "reload",
        parents=[common],
        formatter_class=_FORMATTER,
        help="validate the config, tell the agent to reload it, wait until it has",
        description="What `systemctl reload` runs (ExecReload=): checks the config file first "
        "(exit 78 and no signal if it is invalid), sends SIGHUP to the agent and returns when the "
        "agent reports the reload done. Exit 78 if the agent refused the new config (it keeps "
        "the old one), 69 if it cannot be reached or did not finish in time.",
        epilog=f"examples:\n  {PROG} reload\n  {PROG} reload --pid $MAINPID   (in the unit)",
    )
    reload.add_argument(
        "--pid", type=int, default=None, help="the agent's pid (default: the socket's peer)"
    )
    reload.set_defaults(handler=_reload)

    send = verbs.add_parser(
        "send",
        parents=[common],
        formatter_class=_FORMATTER,
        help="send NDJSON commands from stdin, print one reply line each",
        description="Send commands (one JSON object per line) from stdin and print each reply "
        "line. Requests are pipelined; exits 1 if any was rejected.",
        epilog="examples:\n"
        f'  echo \'{{"command": "track_event", "name": "ping"}}\' | {PROG} send\n'
        f"  {PROG} send < backlog.ndjson > replies.ndjson",
    )
    send.set_defaults(handler=_send)

    queue = verbs.add_parser(
        "queue",
        parents=[common],
        formatter_class=_FORMATTER,
        help="inspect and repair the queue (live, or on the file when the agent is stopped)",
        description="Inspect and repair the queue. With the agent running this goes through its "
        "socket (root or the agent's user only); with it stopped, the CLI opens the database.",
        epilog=f"examples:\n  {PROG} queue list\n  {PROG} queue show 1501\n"
        f"  {PROG} queue dead-letters\n  {PROG} queue retry-dead\n  {PROG} queue purge --dead",
    )
    queue_actions = queue.add_subparsers(dest="queue_verb", metavar="ACTION", required=True)
    add_verbs(queue_actions, queue_verbs(), common, _FORMATTER, run_queue_verb)
    return root


def _run_daemon(ns: argparse.Namespace) -> int:
    from agent.daemon import run  # here, so that every other verb starts without paho & co.

    return run(Options.from_namespace(ns).config)


def _check_config(ns: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config

    options = Options.from_namespace(ns)
    path = options.config_path()
    source = str(path) if path else "built-in defaults"
    try:
        load_config(path)
    except ConfigError as exc:
        if options.json:
            problems = [{"key": key, "reason": reason} for key, reason in exc.problems]
            write_json({"ok": False, "source": source, "problems": problems})
        else:
            lines = [f"  {key}: {reason}" for key, reason in exc.problems]
            sys.stderr.write(f"{PROG}: invalid configuration in {source}:\n")
            sys.stderr.write("\n".join(lines) + "\n")
        return EX_CONFIG
    if options.json:
        write_json({"ok": True, "source": source})
    else:
        write_line(f"configuration OK: {source}")
    return EX_OK


def _reload(ns: argparse.Namespace) -> int:
    """Validate, SIGHUP, then wait for the agent's config generation to move on.

    systemd 252 has no Type=notify-reload, so `systemctl reload` only waits for this command;
    returning before the agent finished would make a following `status` lie.
    """
    import signal
    import time

    options = Options.from_namespace(ns)
    options.load_config()  # a bad file: exit 78 before the agent is disturbed
    timeout = options.timeout if options.timeout is not None else 60.0
    with Client(options.socket_path(), timeout=DEFAULT_TIMEOUT) as conn:
        before = _config_state(conn)
        pid = ns.pid if ns.pid is not None else conn.peer_pid()
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            raise CliError(f"cannot signal the agent (pid {pid}): {exc.strerror}", 69) from None
        deadline = time.monotonic() + timeout
        while (state := _config_state(conn))["generation"] == before["generation"]:
            if time.monotonic() > deadline:
                raise CliError(f"the agent did not finish reloading within {timeout:g} s", 69)
            time.sleep(0.1)
    if state.get("reload_error"):
        raise CliError(f"the agent kept its old configuration: {state['reload_error']}", EX_CONFIG)
    write_line("configuration reloaded")
    return EX_OK


def _config_state(conn: Client) -> dict[str, Any]:
    reply = conn.request({"command": "status"})
    if not reply.ok:
        raise CliError(error_line(reply.error), exit_code(reply))
    state: dict[str, Any] = dict(reply.result.get("config") or {})
    if "generation" not in state:
        raise CliError("the agent is too old to report reloads; use systemctl restart", 69)
    return state


def _metrics(ns: argparse.Namespace) -> int:
    from agent.metrics import render

    options = Options.from_namespace(ns)
    with options.client(DEFAULT_TIMEOUT) as client:
        reply = client.request({"command": "status"})
    if not reply.ok:
        raise CliError(error_line(reply.error), exit_code(reply))
    sys.stdout.buffer.write(render(reply.result))
    return EX_OK


def _send(ns: argparse.Namespace) -> int:
    """Every reply line as the agent wrote it; output is flushed whenever the replies have
    caught up with the input, so an interactive session sees each answer at once while a bulk
    load is not slowed down by a flush per line."""
    options = Options.from_namespace(ns)
    sink = sys.stdout.buffer
    replies = rejected = 0
    with options.client(DEFAULT_TIMEOUT) as client:
        for reply, caught_up in client.exchange(stream_requests(sys.stdin.buffer)):
            replies += 1
            rejected += not reply.ok
            sink.write(reply.raw.encode() + b"\n")
            if caught_up:
                sink.flush()
    sink.flush()
    if rejected:
        raise CliError(f"{rejected} of {replies} commands were rejected", EX_REJECTED)
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The `engagement-agent` console script; returns the exit code instead of exiting."""
    try:
        # Not kept in a variable: `run` lives in this frame for months, the parser need not.
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EX_USAGE
    try:
        code: int = ns.handler(ns)
        return code
    except CliError as exc:
        message = " ".join(exc.message.split("\n"))
        sys.stderr.write(f"{PROG}: {message}\n")
        return exc.exit_code
    except AgentUnavailable as exc:
        hint = " (raise it with --timeout)" if exc.timed_out else ""
        sys.stderr.write(f"{PROG}: {exc.message}{hint}\n")
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `... | head`: the reader went away; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
