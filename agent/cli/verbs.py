"""Verbs that send one command and show its reply: tracking commands plus status/flush/customer.

They differ only in their arguments and in the command those become, so each is one row of a
table (`command_verbs()`), and one builder turns any row plus parsed arguments into the command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.cli.context import (
    EX_OK,
    PROG,
    CliError,
    Options,
    error_line,
    exit_code,
    write_json,
    write_line,
)
from agent.cli.render import render
from agent.client import DEFAULT_TIMEOUT, FLUSH_WAIT_TIMEOUT, Reply

# -- argument types (argparse turns their ValueError/ArgumentTypeError into exit 64) -----------


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def property_pair(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses as JSON, else the literal string (docs/cli.md).

    So `-p n=5` is a number, `-p ok=true` a bool, `-p code=007` the string "007" (not JSON),
    and `-p 'n="5"'` the string "5".
    """
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = _strict_json(raw)
    except ValueError:
        value = raw
    if isinstance(value, float) and not math.isfinite(value):
        value = raw  # 1e999: JSON-shaped, but the agent would refuse it; keep the text
    return key, value


def id_pair(text: str) -> tuple[str, str]:
    """`--id name=value`: customer ids are always strings."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    return key, value


def json_object(text: str) -> dict[str, Any]:
    try:
        value = _strict_json(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object ({...})")
    return value


def project_choice(text: str) -> str | dict[str, Any]:
    """`--project NAME` (a project the agent's config names), or a JSON object selecting one
    by `project_token` and `base_url`."""
    if text.lstrip().startswith("{"):
        return json_object(text)
    if not text:
        raise argparse.ArgumentTypeError("expected a project name or a JSON object")
    return text


def timestamp(text: str) -> float:
    """Unix seconds, or ISO 8601 (`2024-05-01T12:00:00Z`; without an offset: local time)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected Unix seconds or an ISO 8601 time, got {text!r}"
        ) from None
    return moment.timestamp() if moment.tzinfo else moment.astimezone().timestamp()


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One argument: `flags` as for argparse (a bare name is positional), `wire` the dotted
    field it fills in the command (None: it only selects the command), `convert` the last step
    from the parsed value to the wire value."""

    flags: tuple[str, ...]
    wire: str | None
    options: Mapping[str, Any] = field(default_factory=dict)
    convert: Callable[[Any], Any] | None = None

    @property
    def dest(self) -> str:
        return "v_" + self.flags[-1].lstrip("-").replace("-", "_").lower()

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.flags[0].startswith("-"):
            parser.add_argument(*self.flags, dest=self.dest, **self.options)
        else:
            parser.add_argument(self.dest, **{"metavar": self.flags[0], **self.options})


@dataclass(frozen=True)
class Verb:
    name: str
    command: str | Callable[[argparse.Namespace], str]
    help: str
    examples: str
    args: tuple[Arg, ...] = ()
    properties: bool = False  # -p key=value and --json-properties
    app: bool = True  # --app: the command is about one local app
    timeout: Callable[[argparse.Namespace], float] = lambda _ns: DEFAULT_TIMEOUT

    def command_name(self, ns: argparse.Namespace) -> str:
        return self.command if isinstance(self.command, str) else self.command(ns)


def _timestamp_arg() -> Arg:
    return Arg(
        ("--timestamp",),
        "timestamp",
        {
            "type": timestamp,
            "metavar": "T",
            "help": "when it happened: Unix seconds or ISO 8601 "
            "(default: when the agent accepts the command)",
        },
    )


def _app_version_arg() -> Arg:
    return Arg(("--app-version",), "app_version", {"metavar": "V", "help": "the app's version"})


def _payment_arg(flag: str, wire: str, kind: type = str, required: bool = True) -> Arg:
    return Arg((flag,), f"item.{wire}", {"type": kind, "required": required, "metavar": "X"})


def command_verbs() -> tuple[Verb, ...]:
    p = PROG
    return (
        Verb(
            "track",
            "track_event",
            "track a custom event",
            f"  {p} track purchase_started -p item=handbag -p price=12.5 -p gift=true\n"
            f'  {p} track page_view --json-properties \'{{"path": "/home"}}\' --app kiosk-ui\n'
            f"  {p} track door_opened --timestamp 2024-05-01T12:00:00Z",
            (Arg(("NAME",), "name", {"help": "the event type"}), _timestamp_arg()),
            properties=True,
        ),
        Verb(
            "identify",
            "identify_customer",
            "identify the app's customer by hard ids",
            f"  {p} identify --id registered=jane@example.com\n"
            f"  {p} identify --id registered=jane@example.com -p first_name=Jane --app kiosk-ui",
            (
                Arg(
                    ("--id",),
                    "ids",
                    {
                        "type": id_pair,
                        "action": "append",
                        "required": True,
                        "metavar": "NAME=VALUE",
                        "help": "a customer id (repeatable)",
                    },
                    dict,
                ),
            ),
            properties=True,
        ),
        Verb(
            "anonymize",
            "anonymize",
            "forget the customer and start a new anonymous one",
            f"  {p} anonymize --app kiosk-ui\n"
            f"  {p} anonymize --project eu-shop --app kiosk-ui\n"
            f'  {p} anonymize --project eu-shop --mapping \'{{"payment": ["payments"]}}\'',
            (
                Arg(
                    ("--project",),
                    "project",
                    {
                        "type": project_choice,
                        "metavar": "NAME|JSON",
                        "help": "switch to this project of the config (its name, or a JSON object "
                        "with project_token and base_url)",
                    },
                ),
                Arg(
                    ("--mapping",),
                    "mapping",
                    {
                        "type": json_object,
                        "metavar": "JSON",
                        "help": "and this event-type mapping (to project names of the config)",
                    },
                ),
            ),
        ),
        Verb(
            "session",
            lambda ns: f"track_session_{ns.v_which}",
            "start or end a manual session (automatic session tracking off)",
            f"  {p} session start --app kiosk-ui\n  {p} session end --app kiosk-ui",
            (
                Arg(("which",), None, {"choices": ("start", "end"), "metavar": "start|end"}),
                _timestamp_arg(),
            ),
        ),
        Verb(
            "foreground",
            "app_foreground",
            "the app came to the foreground",
            f"  {p} foreground --app kiosk-ui --app-version 2.4.1",
            (_app_version_arg(), _timestamp_arg()),
        ),
        Verb(
            "background",
            "app_background",
            "the app went to the background",
            f"  {p} background --app kiosk-ui",
            (_app_version_arg(), _timestamp_arg()),
        ),
        Verb(
            "push-token",
            lambda ns: "track_hms_push_token" if ns.v_hms else "track_push_token",
            "track a push token now (Firebase, or Huawei with --hms)",
            f"  {p} push-token 'fcm-token...' --app kiosk-ui\n  {p} push-token 'hms...' --hms",
            (
                Arg(("TOKEN",), "token"),
                Arg(("--hms",), None, {"action": "store_true", "help": "a Huawei (HMS) token"}),
            ),
        ),
        Verb(
            "verify-push-token",
            "verify_push_token",
            "re-track the stored push token if the token frequency says so",
            f"  {p} verify-push-token --app kiosk-ui",
        ),
        Verb(
            "payment",
            "track_payment",
            "track a payment",
            f"  {p} payment --value 12.34 --currency EUR --payment-system Virtual \\\n"
            f"      --product-id handbag --product-title 'Red handbag' --receipt R-1001",
            (
                _payment_arg("--value", "value", float),
                _payment_arg("--currency", "currency"),
                _payment_arg("--payment-system", "payment_system"),
                _payment_arg("--product-id", "product_id"),
                _payment_arg("--product-title", "product_title"),
                _payment_arg("--receipt", "receipt", required=False),
                _timestamp_arg(),
            ),
        ),
        Verb(
            "default-properties",
            "set_default_properties",
            "replace the app's runtime default properties (none given: clear them)",
            f"  {p} default-properties -p store=berlin-3 -p floor=2 --app kiosk-ui\n"
            f"  {p} default-properties --app kiosk-ui    # clears them",
            properties=True,
        ),
        Verb(
            "flush",
            "flush",
            "send the queue now",
            f"  {p} flush\n  {p} flush --wait    # prints how many were sent",
            (
                Arg(
                    ("--wait",),
                    "wait",
                    {"action": "store_true", "help": "wait for one upload attempt to finish"},
                ),
            ),
            app=False,
            timeout=lambda ns: FLUSH_WAIT_TIMEOUT if ns.v_wait else DEFAULT_TIMEOUT,
        ),
        Verb(
            "customer",
            "get_customer",
            "show the app's customer ids and project",
            f"  {p} customer --app kiosk-ui\n  {p} customer --json",
        ),
        Verb(
            "status",
            "status",
            "show the agent's state at a glance",
            f"  {p} status\n  {p} status --json | jq .queue",
            app=False,
        ),
    )


def _set_path(document: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        document = document.setdefault(key, {})
    document[last] = value


def build_command(verb: Verb, ns: argparse.Namespace) -> dict[str, Any]:
    command: dict[str, Any] = {"command": verb.command_name(ns)}
    if verb.app and getattr(ns, "app", None):
        command["app"] = ns.app
    for arg in verb.args:
        value = getattr(ns, arg.dest, None)
        if value is not None and arg.convert is not None:
            value = arg.convert(value)
        if arg.wire is not None and value is not None:
            _set_path(command, arg.wire, value)
    if verb.properties:
        command["properties"] = {**(ns.json_properties or {}), **dict(ns.properties or ())}
    return command


def run_verb(verb: Verb, ns: argparse.Namespace) -> int:
    options = Options.from_namespace(ns)
    command = build_command(verb, ns)
    with options.client(verb.timeout(ns)) as client:
        reply = client.request(command)
    return show_reply(command, reply, options.json)


def show_reply(command: Mapping[str, Any], reply: Reply, as_json: bool) -> int:
    """Print a reply the way every single-command verb does; returns the exit code.

    With `--json` stdout carries only the `result` (so `status --json | jq .queue.items`
    works) and a rejection leaves stdout empty: the whole reply, with the error code and
    details, goes to stderr, so a pipeline never mistakes an error for data.
    """
    if as_json:
        if reply.ok:
            write_json(reply.data.get("result", {}))
        else:
            sys.stderr.write(reply.raw + "\n")
        return exit_code(reply)
    if not reply.ok:
        raise CliError(error_line(reply.error), exit_code(reply))
    write_line(render(command, reply.result))
    return EX_OK


Runner = Callable[[Verb, argparse.Namespace], int]


def add_verbs(
    subparsers: Any,
    verbs: tuple[Verb, ...],
    common: argparse.ArgumentParser,
    formatter: type[argparse.HelpFormatter],
    runner: Runner = run_verb,
) -> None:
    """One subparser per row; `common` carries the global options so they work after the verb."""
    for verb in verbs:
        parser = subparsers.add_parser(
            verb.name,
            parents=[common],
            help=verb.help,
            description=verb.help[0].upper() + verb.help[1:] + ".",
            epilog="examples:\n" + verb.examples,
            formatter_class=formatter,
        )
        for arg in verb.args:
            arg.add_to(parser)
        if verb.properties:
            parser.add_argument(
                "-p",
                "--property",
                dest="properties",
                type=property_pair,
                action="append",
                metavar="KEY=VALUE",
                help="a property (repeatable); VALUE is JSON if it parses, else a string",
            )
            parser.add_argument(
                "--json-properties",
                type=json_object,
                metavar="JSON",
                help="properties as one JSON object; -p values override its keys",
            )
        if verb.app:
            parser.add_argument(
                "--app", metavar="APP", help="the local app this is for (default: default)"
            )
        parser.set_defaults(handler=lambda ns, verb=verb: runner(verb, ns))
