"""Loading the configuration: TOML file, environment overrides, `*_file` secrets, validation.

`load_config()` either returns a complete, validated `AgentConfig` or raises `ConfigError`
listing every problem as `dotted.key.path: reason`, which `run` and `check-config` print before
exiting with 78 (EX_CONFIG). The keys, their defaults and the checks on values alone are the
models of `agent.config.model`; this module says where values come from and reports problems.

Loading happens in this order, each step keeping track of where a value came from so that a
problem is reported against the key the user actually wrote:

1. the TOML file (or nothing: every key has a default);
2. `ENGAGEMENT_AGENT_<SECTION>__<KEY>` environment overrides;
3. `*_file` secrets read into their key (`authorization_token_file` -> `authorization_token`,
   `mqtt.password_file` -> `mqtt.password`), and TLS file paths resolved;
4. default queue/socket paths filled in for the environment we run in;
5. pydantic validation, with each `[apps.<name>]` table validated on its own so its errors keep
   their path, then checks that need the file system (TLS files).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.commands import EVENT_TYPES
from agent.config.model import (
    APPS_RESERVED_KEYS,
    DEFAULT_PROJECT_NAME,
    PROJECT_NAME_TAG,
    PROJECT_TABLE_TAG,
    SYSTEM_RUNTIME_DIR,
    SYSTEM_STATE_DIR,
    AgentConfig,
    ProjectConfig,
    socket_input_problem,
)
from agent.tracker.model import ProjectKey

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Debian 12's Python 3.11 anyway
    # Only installed on 3.10 (pyproject marker); mypy checks this branch for its 3.10 target.
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

DEFAULT_CONFIG_PATH = Path("/etc/engagement-agent/agent.toml")
ENV_PREFIX = "ENGAGEMENT_AGENT_"
EX_CONFIG = 78

#: `*_file` keys whose file content replaces the key without the suffix (secrets).
SECRET_FILE_KEYS = frozenset({"authorization_token_file", "password_file"})
#: `mqtt.*_file` keys that stay paths (the TLS library reads them) but must exist when `tls`.
TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file")

Problem = tuple[str, str]
KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration is unusable; `problems` are `(dotted key, reason)` pairs.

    `str()` is the complete listing that `check-config` and `run` print: a header line naming
    the source, then one indented `key: reason` line per problem.
    """

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        lines = [f"{key}: {reason}" for key, reason in problems]
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n  " + "\n  ".join(lines))


class _Load:
    """Book-keeping of one `load_config()` call: where values came from, what went wrong."""

    def __init__(self, environ: Mapping[str, str], config_dir: Path | None) -> None:
        self.environ = environ
        self.config_dir = config_dir
        self.problems: list[Problem] = []
        #: key path set by the environment -> (variable name, raw text)
        self.from_env: dict[KeyPath, tuple[str, str]] = {}
        #: key path of a secret read from a file -> the `*_file` key the user wrote
        self.renamed: dict[KeyPath, str] = {}
        #: key paths whose `*_file` could not be read (already reported; "missing" is noise)
        self.unreadable: set[KeyPath] = set()

    @property
    def credentials_dir(self) -> str:
        return self.environ.get("CREDENTIALS_DIRECTORY", "").split(":")[0]

    def dotted(self, path: KeyPath) -> str:
        if path in self.renamed:
            path = (*path[:-1], self.renamed[path])
        text = ""
        for part in path:
            if isinstance(part, int):
                text += f"[{part}]"
            else:
                text += f".{part}" if text else part
        return text or "(config)"

    def origin(self, path: KeyPath) -> str:
        """ " (from ENGAGEMENT_AGENT_...)" when `path` or a table above it came from the env."""
        for length in range(len(path), 0, -1):
            found = self.from_env.get(path[:length])
            if found:
                return f" (from {found[0]})"
        below = sorted(name for key, (name, _) in self.from_env.items() if key[: len(path)] == path)
        return f" (from {', '.join(below)})" if below else ""

    def problem(self, path: KeyPath, reason: str) -> None:
        self.problems.append((self.dotted(path), reason + self.origin(path)))


def _parse_env_value(raw: str) -> Any:
    """Env values are TOML values when they parse as one, else plain strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _table_key(tables: Any, part: str, kind: str, name: str, load: _Load) -> str:
    """Map an env path segment to an app or project name: env names cannot hold '-' or '.',
    so `KIOSK_UI` means the configured app (or project) whose name reads `kiosk_ui` once '-'
    and '.' become '_'."""
    if part in APPS_RESERVED_KEYS or not isinstance(tables, dict):
        return part
    if part in tables:
        return part
    matches = [key for key in tables if key.replace("-", "_").replace(".", "_") == part]
    if len(matches) > 1:
        load.problems.append(
            (name, f"matches more than one {kind} ({', '.join(sorted(matches))}); rename one")
        )
    return matches[0] if len(matches) == 1 else part


def _apply_env(data: dict[str, Any], load: _Load) -> None:
    overrides = []
    for name, raw in load.environ.items():
        if not name.startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            load.problems.append((name, "empty key segment (use __ only between keys)"))
            continue
        overrides.append((len(parts), name, parts, raw))
    for _, name, parts, raw in sorted(overrides):
        if parts[0] in ("apps", "projects") and len(parts) > 1:
            kind = "app" if parts[0] == "apps" else "project"
            parts[1] = _table_key(data.get(parts[0]), parts[1], kind, name, load)
        path: list[str | int] = []
        target: Any = data
        for part in parts[:-1]:
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                index = int(part)
                path.append(index)
                target = target[index]
                continue
            if not isinstance(target, dict):
                break
            nxt = target.get(part)
            if not isinstance(nxt, (dict, list)):
                nxt = target[part] = {}
            path.append(part)
            target = nxt
        if not isinstance(target, dict):
            load.problems.append((name, f"{'.'.join(map(str, path))} is not a table"))
            continue
        target[parts[-1]] = _parse_env_value(raw)
        key_path: KeyPath = (*path, parts[-1])
        load.from_env[key_path] = (name, raw)


def _file_path(value: str, load: _Load) -> Path | str:
    """Where a `*_file` value points. `%d` is systemd's credentials directory; a relative path
    is looked up there too when the unit uses `LoadCredential=`, else next to the config file.
    Returns the problem text instead when it cannot be resolved."""
    creds = load.credentials_dir
    if "%d" in value:
        if not creds:
            return "uses %d but $CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)"
        value = value.replace("%d", creds)
    path = Path(value).expanduser()
    if not path.is_absolute():
        base = Path(creds) if creds else (load.config_dir or Path.cwd())
        path = base / path
    return path


def _is_secret_file_key(key: str, path: KeyPath) -> bool:
    """Whether `key` at `path` is a secret file: `password_file` in `[mqtt]`,
    `authorization_token_file` in a project table (top level, named, mapping entry, app's own)."""
    if key == "password_file":
        return path == ("mqtt",)
    if key != "authorization_token_file":
        return False
    if len(path) == 2 and path[0] == "projects":
        return True
    if path[:1] == ("apps",) and len(path) >= 3:
        path = path[2:]
    return path == ("project",) or (
        len(path) == 3 and path[0] == "mapping" and isinstance(path[2], int)
    )


def _resolve_files(data: Any, path: KeyPath, load: _Load) -> Any:
    """Replace secret `*_file` entries by their key holding the file's text (one trailing
    newline stripped) and make TLS paths absolute. Unknown `*_file` keys stay as they are, so
    validation reports them as unknown under the name the user wrote."""
    if isinstance(data, list):
        return [_resolve_files(item, (*path, i), load) for i, item in enumerate(data)]
    if not isinstance(data, dict):
        return data
    result: dict[str, Any] = {}
    for key, value in data.items():
        here = (*path, key)
        if key in SECRET_FILE_KEYS and _is_secret_file_key(key, path):
            target = key.removesuffix("_file")
            if not isinstance(value, str):
                load.problem(here, "must be a file path (a string)")
                continue
            if target in data:
                load.problem(here, f"give either {target} or {key}, not both")
                continue
            file_path = _file_path(value, load)
            if isinstance(file_path, str):
                load.problem(here, file_path)
                load.unreadable.add((*path, target))
                continue
            try:
                text = file_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                load.problem(here, f"cannot read {file_path}: {reason}")
                load.unreadable.add((*path, target))
                continue
            result[target] = text.removesuffix("\n")
            target_path: KeyPath = (*path, target)
            load.renamed[target_path] = key
            if here in load.from_env:
                load.from_env[target_path] = load.from_env[here]
        elif path == ("mqtt",) and key in TLS_FILE_KEYS and isinstance(value, str):
            file_path = _file_path(value, load)
            if isinstance(file_path, str):
                load.problem(here, file_path)
                continue
            result[key] = str(file_path)
        else:
            result[key] = _resolve_files(value, here, load)
    return result


def default_state_paths(
    environ: Mapping[str, str] | None = None, *, system: bool | None = None
) -> tuple[Path, Path]:
    """Queue and socket paths for a config that does not name them.

    Under systemd: `$STATE_DIRECTORY` / `$RUNTIME_DIRECTORY`. For the system install (root, or
    `system=True` because the config is the packaged one, so the CLI of an ordinary user finds
    the system agent's socket): the FHS paths of the packaged unit. As anyone else: XDG
    directories, so a first try without root just works (the daemon creates them).
    """
    env = os.environ if environ is None else environ
    if system is None:
        system = os.geteuid() == 0
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not state:
        if system:
            state = str(SYSTEM_STATE_DIR)
        else:
            home = env.get("HOME") or str(Path.home())
            base = env.get("XDG_STATE_HOME") or str(Path(home) / ".local" / "state")
            state = str(Path(base) / "engagement-agent")
    if not runtime:
        if system:
            runtime = str(SYSTEM_RUNTIME_DIR)
        elif env.get("XDG_RUNTIME_DIR"):
            runtime = str(Path(env["XDG_RUNTIME_DIR"]) / "engagement-agent")
        else:
            runtime = state
    return Path(state) / "queue.db", Path(runtime) / "agent.sock"


def default_config_path() -> Path | None:
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _fill_paths(data: dict[str, Any], load: _Load, system: bool) -> None:
    """Default `queue.path`/`socket.path`; relative ones live in the state/runtime directory."""
    queue_path, socket_path = default_state_paths(load.environ, system=system)
    for section, default in (("queue", queue_path), ("socket", socket_path)):
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            continue
        value = table.setdefault("path", str(default))
        if isinstance(value, str) and value and not Path(value).is_absolute():
            table["path"] = str(default.parent / value)


def _reason(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "model_type" and PROJECT_TABLE_TAG in err["loc"]:
        return "must be a project table or the name of a configured project"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a table"
    if kind == "literal_error" and err["loc"] and err["loc"][-1] == "[key]":
        return "unknown event type; expected one of " + ", ".join(EVENT_TYPES)
    if kind == "string_pattern_mismatch" and err["loc"][:1] == ("projects",):
        return "invalid project name: it must match [a-z0-9][a-z0-9._-]{0,63}"
    return str(err["msg"]).removeprefix("Value error, ")


def _error_path(loc: tuple[int | str, ...]) -> KeyPath:
    return tuple(
        part
        for part in loc
        if part not in ("[key]", PROJECT_TABLE_TAG, PROJECT_NAME_TAG)
        and not str(part).startswith("function")
    )


def _set_path(data: Any, path: KeyPath, value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def _validate(data: dict[str, Any], load: _Load) -> AgentConfig | None:
    """Validate; an env value that parsed as a TOML number/bool but lands on a string key (a
    numeric password, device id "042") is retried once as the raw text."""
    for attempt in (1, 2):
        try:
            return AgentConfig.model_validate(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
        retry = False
        if attempt == 1:
            for err in errors:
                path = _error_path(err["loc"])
                env = load.from_env.get(path)
                if (
                    env is not None
                    and path not in load.renamed
                    and not isinstance(_parse_env_value(env[1]), str)
                ):
                    _set_path(data, path, env[1])
                    retry = True
        if not retry:
            for err in errors:
                path = _error_path(err["loc"])
                if path not in load.unreadable:
                    load.problem(path, _reason(err))
            return None
    return None  # pragma: no cover - the loop always returns


def _check_tls_files(data: dict[str, Any], load: _Load) -> None:
    """TLS files must exist when TLS is on; checked on the raw data so that these problems are
    listed together with validation problems instead of after the user fixed those."""
    mqtt = data.get("mqtt")
    if not isinstance(mqtt, dict) or mqtt.get("tls") is not True or mqtt.get("enabled") is False:
        return
    for key in TLS_FILE_KEYS:
        value = mqtt.get(key)
        if not isinstance(value, str):
            continue
        if not Path(value).is_file():
            load.problem(("mqtt", key), f"{value} does not exist (needed because mqtt.tls)")
        elif not os.access(value, os.R_OK):
            load.problem(("mqtt", key), f"{value} is not readable by this user")


def _project_refs(data: dict[str, Any]) -> list[tuple[KeyPath, Any]]:
    """Every place in the raw config where a project is expected, with its value: mapping
    entries, apps' `project`, `mapping` and `projects`."""
    refs: list[tuple[KeyPath, Any]] = []

    def mapping_refs(mapping: Any, path: KeyPath) -> None:
        if isinstance(mapping, dict):
            for event_type, entries in mapping.items():
                if isinstance(entries, list):
                    refs.extend(((*path, event_type, i), e) for i, e in enumerate(entries))

    mapping_refs(data.get("mapping"), ("mapping",))
    apps = data.get("apps")
    for app, table in apps.items() if isinstance(apps, dict) else ():
        if not isinstance(table, dict):
            continue
        if "project" in table:
            refs.append((("apps", app, "project"), table["project"]))
        mapping_refs(table.get("mapping"), ("apps", app, "mapping"))
        names = table.get("projects")
        if isinstance(names, list):
            refs.extend((("apps", app, "projects", i), name) for i, name in enumerate(names))
    return refs


def _check_project_names(data: dict[str, Any], load: _Load) -> None:
    """A project name must name a configured project; checked on the raw data (like the TLS
    files) so these problems are listed with every other one."""
    projects = data.get("projects")
    names = set(projects) if isinstance(projects, dict) else set()
    if "project" in data:
        if DEFAULT_PROJECT_NAME in names:
            load.problem(
                ("projects", DEFAULT_PROJECT_NAME),
                "[project] already is the project named 'default'; give only one of them",
            )
        names.add(DEFAULT_PROJECT_NAME)
    known = ", ".join(sorted(names)) or "none; add a [projects.<name>] table"
    for path, value in _project_refs(data):
        if isinstance(value, str) and value and value not in names:
            load.problem(path, f"unknown project {value!r} (configured: {known})")


def _check_conflicting_projects(config: AgentConfig, load: _Load) -> None:
    """A project (token and URL) must have one authorization token: credentials are looked up
    by project when sending, and two different ones would leave it to chance which is used."""
    tables: list[tuple[KeyPath, ProjectConfig]] = []
    if config.project is not None:
        tables.append((("project",), config.project))
    tables.extend((("projects", name), table) for name, table in config.projects.items())

    def add(path: KeyPath, ref: ProjectConfig | str | None) -> None:
        if isinstance(ref, ProjectConfig):
            tables.append((path, ref))

    for event_type, entries in config.mapping.items():
        for i, entry in enumerate(entries):
            add(("mapping", event_type, i), entry)
    for app, app_config in {"defaults": config.apps.defaults, **config.apps.named()}.items():
        add(("apps", app, "project"), app_config.project)
        for event_type, entries in (app_config.mapping or {}).items():
            for i, entry in enumerate(entries):
                add(("apps", app, "mapping", event_type, i), entry)
    first: dict[ProjectKey, tuple[KeyPath, str]] = {}
    for path, table in tables:
        project = table.to_project()
        seen = first.setdefault(project.key, (path, project.authorization_token))
        if seen[1] != project.authorization_token:
            load.problem(
                path,
                f"same project_token and base_url as {load.dotted(seen[0])} "
                "but a different authorization_token",
            )


def _check_socket_input(config: AgentConfig, load: _Load) -> None:
    problem = socket_input_problem(config.socket.max_connections, config.limits.max_command_bytes)
    if problem is not None:
        load.problem(("limits", "max_command_bytes"), problem)


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, merge and validate the configuration; raises `ConfigError` with every problem.

    `path` None means built-in defaults (plus the environment). `environ` defaults to
    `os.environ` and is the only environment consulted (overrides, `$CREDENTIALS_DIRECTORY`,
    `$STATE_DIRECTORY`, XDG variables), which keeps tests hermetic.
    """
    env = os.environ if environ is None else environ
    source = str(path) if path else "built-in defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([("(file)", f"{path} does not exist")], source) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([("(file)", f"cannot read {path}: {exc}")], source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([("(file)", f"not valid TOML: {exc}")], source) from None
    load = _Load(env, Path(path).absolute().parent if path is not None else None)
    _apply_env(data, load)
    data = _resolve_files(data, (), load)
    system = os.geteuid() == 0 or (
        path is not None and Path(path).absolute().parent == DEFAULT_CONFIG_PATH.parent
    )
    _fill_paths(data, load, system)
    _check_tls_files(data, load)
    _check_project_names(data, load)
    config = _validate(data, load)
    if config is not None:
        _check_conflicting_projects(config, load)
        _check_socket_input(config, load)
    if load.problems or config is None:
        raise ConfigError(load.problems, source)
    return config
