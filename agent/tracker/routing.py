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
    seen: set[ProjectKey] = set()
    projects: list[Project] = []
    for candidate in (project, *mapping.get(category, ())):
        if candidate.key not in seen:
            seen.add(candidate.key)
            projects.append(candidate)
    return projects


def routing(state: AppState, settings: AppSettings) -> Routing:
    """Where the app sends now: its anonymize switch if it has one, else its config."""
    switch = state.project_switch
    if switch is None:
        return settings.project, settings.mapping
    mapping = {
        category: tuple(
            _by_key(target.project_token, target.base_url, settings) for target in targets
        )
        for category, targets in switch.mapping.items()
    }
    return _by_key(switch.project_token, switch.base_url, settings), mapping


def current_state(state: AppState | None, settings: AppSettings) -> AppState:
    """The app's state with a switch dropped once the config's project or mapping changed:
    an operator's config change wins over a choice an app made before it."""
    state = state if state is not None else AppState()
    switch = state.project_switch
    if switch is not None and switch.config_fingerprint != config_fingerprint(settings):
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
    if not allowed(project, settings):
        raise Forbidden("project not allowed for this app: it is not in apps.<app>.projects")
    return project


def allowed(project: Project, settings: AppSettings) -> bool:
    """Whether this app may switch to `project`: its own configured project always; others
    when configured and, if `apps.<app>.projects` is set, listed there."""
    if project.key == settings.project.key:
        return True
    catalog = settings.catalog
    if project.key not in catalog.configured:
        return False
    return catalog.allowed is None or project.key in catalog.allowed


def _by_key(project_token: str, base_url: str, settings: AppSettings) -> Project:
    """The configured project with this key, credentials from the config. One that left the
    config keeps its items queued without credentials (sync shows it as unconfigured)."""
    key = (base_url, project_token)
    if key == settings.project.key:
        return settings.project
    found = settings.catalog.configured.get(key)
    return found if found is not None else Project(project_token, "", base_url)


def _mapping_keys(
    mapping: Mapping[str, tuple[Project, ...]],
) -> dict[str, list[ProjectKey]]:
    """A mapping as comparable project keys, empty entries left out, in the given order."""
    return {
        category: [project.key for project in projects]
        for category, projects in sorted(mapping.items())
        if projects
    }
