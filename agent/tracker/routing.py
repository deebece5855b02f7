"""Where an app's items go: its project and mapping, the switch `anonymize` makes, and the rule
that an app may only name projects the config names (docs/tracking.md, "Projects").

Pure like the rest of the tracker. The policy is decided here and nowhere else: `switch_for()`
either returns the app's next routing or raises `Forbidden` before anything is decided, so a
refused anonymize changes nothing (no state, no items).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from agent.commands import Anonymize, ProjectSpec
from agent.errors import Forbidden
from agent.tracker.model import (
    AppSettings,
    AppState,
    Project,
    ProjectKey,
    ProjectSwitch,
    SwitchTarget,
)

Routing = tuple[Project, Mapping[str, tuple[Project, ...]]]


def projects_for(category: str, state: AppState, settings: AppSettings) -> list[Project]:
    """The app's project plus every project mapped for `category`, each project once."""
    project, mapping = routing(state, settings)
    mapped = mapping.get(category)
    if not mapped:  # the common case: the app's project alone
        return [project]
    seen: set[ProjectKey] = set()
    projects: list[Project] = []
    for candidate in (project, *mapped):
        if candidate.key not in seen:
            seen.add(candidate.key)
            projects.append(candidate)
    return projects


def routing(state: AppState, settings: AppSettings) -> Routing:
    """Where the app sends now: its anonymize switch if it has one, else its config. `state`
    must come from `current_state()`, which keeps only switches to configured projects."""
    switch = state.project_switch
    if switch is None:
        return settings.project, settings.mapping
    mapping = {
        category: tuple(_by_key(target, settings) for target in targets)
        for category, targets in switch.mapping.items()
    }
    return _by_key(switch, settings), mapping


def current_state(state: AppState | None, settings: AppSettings) -> AppState:
    """The app's state with its switch dropped once the config's project or mapping for the
    app changed, or once the config no longer lets the app use a project of the switch
    (removed, or left out of `apps.<app>.projects`): an operator's config change wins over a
    choice an app made before it. (This also voids a switch an older version accepted to a
    project the config never named.)"""
    state = state if state is not None else AppState()
    switch = state.project_switch
    if switch is None:
        return state
    targets: list[ProjectSwitch | SwitchTarget] = [switch]
    for entries in switch.mapping.values():
        targets.extend(entries)
    usable = all(allowed((t.base_url, t.project_token), settings) for t in targets)
    if not usable or switch.config_fingerprint != config_fingerprint(settings):
        state = state.model_copy(update={"project_switch": None})
    return state


def config_fingerprint(settings: AppSettings) -> str:
    """Identifies the config's project and mapping by project keys (not credentials: fixing an
    authorization token does not undo an app's switch)."""
    text = json.dumps([list(settings.project.key), _mapping_keys(settings.mapping)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def switch_for(command: Anonymize, state: AppState, settings: AppSettings) -> ProjectSwitch | None:
    """The routing an anonymize chooses, as the SDKs do: no `project` keeps the app's current
    project (which may come from an earlier anonymize), no `mapping` keeps the current
    mapping, each one given replaces the current one (`mapping: {}` clears it).

    Raises `Forbidden` if any project named is not configured or not allowed for this app.
    None means "the config's own routing" (also when the app chose exactly that).
    """
    current_project, current_mapping = routing(state, settings)
    project = current_project if command.project is None else resolve(command.project, settings)
    mapping = current_mapping
    if command.mapping is not None:
        mapping = {
            category: tuple(resolve(ref, settings) for ref in refs)
            for category, refs in command.mapping.items()
        }
    wanted = _mapping_keys(mapping)
    if project.key == settings.project.key and wanted == _mapping_keys(settings.mapping):
        return None
    return ProjectSwitch(
        project_token=project.project_token,
        base_url=project.base_url,
        mapping={
            category: [SwitchTarget(project_token=token, base_url=url) for url, token in keys]
            for category, keys in wanted.items()
        },
        config_fingerprint=config_fingerprint(settings),
    )


def resolve(ref: ProjectSpec | str, settings: AppSettings) -> Project:
    """The configured project a command names (by name, or by `project_token` and `base_url`),
    with the config's credentials. Raises `Forbidden` for anything else."""
    catalog = settings.catalog
    if isinstance(ref, str):
        named = catalog.named.get(ref)
        if named is None:
            raise Forbidden(f"project not configured: no project is named {ref!r}")
        project = named
    else:
        key = (ref.base_url.rstrip("/"), ref.project_token)
        found = settings.project if key == settings.project.key else catalog.configured.get(key)
        if found is None:
            raise Forbidden("project not configured: no configured project has that token and URL")
        project = found
    if not allowed(project.key, settings):
        raise Forbidden("project not allowed for this app: it is not in apps.<app>.projects")
    return project


def allowed(key: ProjectKey, settings: AppSettings) -> bool:
    """Whether this app may switch to the project with this key: the projects its config
    sends to (its project and its mapping's) always, so an anonymize that keeps the current
    mapping is never refused for it; others when configured and, if `apps.<app>.projects` is
    set, listed there."""
    if key == settings.project.key or any(
        key == project.key for projects in settings.mapping.values() for project in projects
    ):
        return True
    catalog = settings.catalog
    if key not in catalog.configured:
        return False
    return catalog.allowed is None or key in catalog.allowed


def _by_key(target: ProjectSwitch | SwitchTarget, settings: AppSettings) -> Project:
    """The configured project a switch names, with the config's credentials."""
    key = (target.base_url, target.project_token)
    return settings.project if key == settings.project.key else settings.catalog.configured[key]


def _mapping_keys(
    mapping: Mapping[str, tuple[Project, ...]],
) -> dict[str, list[ProjectKey]]:
    """A mapping as comparable project keys, empty entries left out, in the given order."""
    return {
        category: [project.key for project in projects]
        for category, projects in sorted(mapping.items())
        if projects
    }
