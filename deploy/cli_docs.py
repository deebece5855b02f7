"""Generate the man page engagement-agent(8) and the bash completion from the CLI's own
argparse parser (`agent.cli.build_parser`), so neither can drift from the verbs and options
the program really has. Run at package build time by deploy/build-deb.sh:

    python deploy/cli_docs.py man --version 0.2.0 > engagement-agent.8
    python deploy/cli_docs.py bash > engagement-agent        (bash-completion file)

Walks argparse's parser objects (their `_actions` are private but stable since Python 3.2;
argparse-manpage and shtab read them the same way).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator

from agent.cli import build_parser

PROG = "engagement-agent"
SUMMARY = "durable Bloomreach Engagement tracking agent for edge devices"
FILES = [
    ("/etc/engagement-agent/agent.toml", "the configuration (docs: configuration.md)"),
    ("/var/lib/engagement-agent/queue.db", "the queue, dead letters and app state"),
    ("/run/engagement-agent/agent.sock", "the agent's socket (group engagement-agent-clients)"),
    ("/usr/share/engagement-agent/mosquitto/", "the device's Mosquitto config and add-app"),
    ("/usr/share/doc/engagement-agent/", "the documentation"),
]
EXIT_CODES = [
    ("0", "success"),
    ("1", "a command was rejected by the agent"),
    ("64", "usage error (EX_USAGE)"),
    ("69", "the agent is not reachable (EX_UNAVAILABLE)"),
    ("78", "the configuration is invalid (EX_CONFIG)"),
]


def subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each verb, in the order the parser lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.option_strings
        and a.help is not argparse.SUPPRESS
        and not isinstance(a, argparse._HelpAction)
    ]


def positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


# --- man page --------------------------------------------------------------------------------


def roff(text: str) -> str:
    """Escape text for roff: backslashes, and lines starting with a control character."""
    text = text.replace("\\", "\\e")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def prose(text: str) -> list[str]:
    """Paragraphs as filled text; blocks with indented lines (examples) kept line by line, as
    the parser's RawDescriptionHelpFormatter prints them."""
    lines: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if any(line.startswith(" ") for line in block.splitlines()):
            lines += [".PP", ".nf", roff(block), ".fi"]
        else:
            lines += [".PP", roff(" ".join(block.split()))]
    return lines


def roff_option(name: str) -> str:
    return "\\fB" + name.replace("-", "\\-") + "\\fR"


def expand_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


def man_options(parser: argparse.ArgumentParser, skip: set[str]) -> list[str]:
    lines: list[str] = []
    for action in positionals(parser):
        lines += [".TP", f"\\fI{roff(metavar(action))}\\fR", roff(expand_help(parser, action))]
    for action in options(parser):
        if set(action.option_strings) & skip:
            continue
        names = ", ".join(roff_option(o) for o in action.option_strings)
        if takes_value(action):
            names += f" \\fI{roff(metavar(action))}\\fR"
        lines += [".TP", names, roff(expand_help(parser, action))]
    return lines


def man_verb(path: str, parser: argparse.ArgumentParser, summary: str, skip: set[str]) -> list[str]:
    lines = [f'.SS "{path}"']
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines += [".PP", roff(re.sub(r"\s+", " ", usage))]
    lines += prose(parser.description or summary)
    lines += man_options(parser, skip)
    if parser.epilog:
        lines += [".PP", ".nf", roff(parser.epilog), ".fi"]
    for name, sub_summary, sub in subcommands(parser):
        lines += man_verb(f"{path} {name}", sub, sub_summary, skip)
    return lines


def manpage(version: str) -> str:
    parser = build_parser()
    global_names = {o for a in options(parser) for o in a.option_strings}
    # Options every verb repeats (--socket, --config, --json) are described once, up front.
    lines = [
        f'.TH ENGAGEMENT\\-AGENT 8 "" "{PROG} {roff(version)}" "System Administration"',
        ".SH NAME",
        f"{PROG} \\- {SUMMARY}",
        ".SH SYNOPSIS",
        f"\\fB{PROG}\\fR [\\fIOPTIONS\\fR] \\fIVERB\\fR [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
        *prose(parser.description or ""),
        ".SH OPTIONS",
        *man_options(parser, set()),
        ".SH VERBS",
    ]
    for name, verb_summary, sub in subcommands(parser):
        lines += man_verb(f"{PROG} {name}", sub, verb_summary, global_names)
    lines.append(".SH EXIT STATUS")
    for code, meaning in EXIT_CODES:
        lines += [".TP", f"\\fB{code}\\fR", meaning]
    lines.append(".SH FILES")
    for path, meaning in FILES:
        lines += [".TP", f"\\fI{path}\\fR", meaning]
    lines += [
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBmosquitto\\fR(8),",
        "\\fI/usr/share/doc/engagement\\-agent/\\fR",
    ]
    return "\n".join(lines) + "\n"


# --- bash completion -------------------------------------------------------------------------


def words(parser: argparse.ArgumentParser) -> str:
    """Options, and the fixed choices of positional arguments (`session start|end`)."""
    choices = [str(c) for a in positionals(parser) if a.choices is not None for c in a.choices]
    return " ".join(choices + [o for a in options(parser) for o in a.option_strings])


def value_options(parser: argparse.ArgumentParser, found: set[str]) -> set[str]:
    for action in options(parser):
        if takes_value(action):
            found.update(action.option_strings)
    for _, _, sub in subcommands(parser):
        value_options(sub, found)
    return found


def completion() -> str:
    parser = build_parser()
    verbs = list(subcommands(parser))
    cases: list[str] = []
    for name, _, sub in verbs:
        actions = list(subcommands(sub))
        if actions:
            inner = "\n".join(
                f'            {action}) opts="{words(action_parser)}" ;;'
                for action, _, action_parser in actions
            )
            names = " ".join(action for action, _, _ in actions)
            cases.append(
                f"        {name})\n"
                f'            if [[ -z $sub ]]; then opts="{names} {words(sub)}"; else\n'
                f"            case $sub in\n{inner}\n            esac; fi ;;"
            )
        else:
            cases.append(f'        {name}) opts="{words(sub)}" ;;')
    takes = sorted(value_options(parser, set()))
    paths = "--config|--socket"
    others = "|".join(o for o in takes if o not in ("--config", "--socket"))
    return f"""# bash completion for {PROG}, generated from its parser by deploy/cli_docs.py.
_engagement_agent() {{
    local cur prev words cword
    _init_completion || return
    case $prev in
        {paths}) _filedir; return ;;
        {others or "--"}) return ;;
    esac
    local verb="" sub="" i
    for ((i = 1; i < cword; i++)); do
        case ${{words[i]}} in
            -*) ;;
            *)
                case ${{words[i - 1]}} in {paths}|{others or "--"}) continue ;; esac
                if [[ -z $verb ]]; then verb=${{words[i]}}
                elif [[ -z $sub ]]; then sub=${{words[i]}}
                fi ;;
        esac
    done
    local opts
    case $verb in
        "") opts="{" ".join(name for name, _, _ in verbs)} {words(parser)}" ;;
{chr(10).join(cases)}
        *) opts="" ;;
    esac
    mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
}} &&
    complete -F _engagement_agent {PROG}
"""


def main(argv: list[str]) -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("kind", choices=["man", "bash"])
    cli.add_argument("--version", default="")
    ns = cli.parse_args(argv)
    sys.stdout.write(manpage(ns.version) if ns.kind == "man" else completion())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
