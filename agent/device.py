"""What the device is, for the device properties of session, installation and payment events.

Read once at start. Every source is optional and may be garbled (a half-written file, a
vendor's placeholder string, bytes that are not UTF-8): a device property is never a reason
for the agent not to start, so each reader falls back instead of raising.
"""

from __future__ import annotations

import os
import platform
import shlex
from pathlib import Path

from agent.tracker.model import DeviceInfo

#: Longest value kept for a device property; longer ones are cut (sysfs values are short).
MAX_VALUE_CHARS = 128
#: Never read more than this from one file: these files are tiny, a huge one is not them.
_MAX_FILE_BYTES = 64 * 1024

#: Values firmware vendors leave in DMI fields instead of a real name.
_DMI_PLACEHOLDERS = frozenset(
    {
        "",
        "to be filled by o.e.m.",
        "default string",
        "system product name",
        "system manufacturer",
        "not specified",
        "not applicable",
        "none",
        "unknown",
        "o.e.m.",
        "oem",
    }
)


def read_device_info(
    device_uuid: str, device_type: str, sdk_version: str, root: Path = Path("/")
) -> DeviceInfo:
    """Device properties from the running system; `root` lets tests use a fake file tree."""
    return DeviceInfo(
        device_uuid=device_uuid,
        os_version=os_version(root),
        sdk_version=sdk_version,
        device_model=device_model(root),
        device_type=device_type,
    )


def os_version(root: Path = Path("/")) -> str:
    """`VERSION_ID` of os-release (e.g. "12" on Debian 12), else the kernel release.

    os-release(5): `/etc/os-release` wins, `/usr/lib/os-release` is the fallback. Rolling
    distributions have no VERSION_ID; the kernel release is then the best version there is.
    """
    for candidate in (root / "etc" / "os-release", root / "usr" / "lib" / "os-release"):
        text = _read_text(candidate)
        if text is None:
            continue
        value = _clean(_os_release_fields(text).get("VERSION_ID", ""))
        if value:
            return value
        break  # the first existing file is the authoritative one, even without VERSION_ID
    return _clean(platform.release())


#: Tests simulate a reboot by pointing this environment variable at a file of their own
#: holding the boot id (docs/tracking.md); never set on a device. Not `ENGAGEMENT_AGENT_…`:
#: that prefix is the config's (docs/configuration.md).
BOOT_ID_PATH_ENV = "ENGAGEMENT_TEST_BOOT_ID_PATH"


def boot_id(root: Path = Path("/")) -> str | None:
    """The kernel's id of this boot (a UUID, new at every boot), or None when unreadable.

    Recorded with every queued item: together with the monotonic clock it says whether an
    item was accepted in this boot, which a restart of the agent alone does not change.
    """
    override = os.environ.get(BOOT_ID_PATH_ENV)
    path = Path(override) if override else root / "proc" / "sys" / "kernel" / "random" / "boot_id"
    text = _read_text(path)
    value = _clean(text or "")
    return value or None


def device_model(root: Path = Path("/")) -> str:
    """The board (device tree: "Raspberry Pi 4 Model B Rev 1.4") or the PC's vendor and product
    from DMI ("Dell Inc. OptiPlex 7090"), else the CPU architecture ("aarch64")."""
    model = _clean(_read_text(root / "proc" / "device-tree" / "model") or "")
    if model:
        return model
    dmi = root / "sys" / "class" / "dmi" / "id"
    vendor = _dmi_value(dmi / "sys_vendor")
    product = _dmi_value(dmi / "product_name")
    if product and vendor and not product.lower().startswith(vendor.lower()):
        return _clean(f"{vendor} {product}")
    if product or vendor:
        return product or vendor
    return _clean(platform.machine())


def _dmi_value(path: Path) -> str:
    value = _clean(_read_text(path) or "")
    return "" if value.lower() in _DMI_PLACEHOLDERS else value


def _os_release_fields(text: str) -> dict[str, str]:
    """KEY=value lines with shell quoting; lines that do not parse are skipped."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            words = shlex.split(raw)
        except ValueError:  # unbalanced quotes
            continue
        fields[key.strip()] = " ".join(words)
    return fields


def _read_text(path: Path) -> str | None:
    """The file's text (undecodable bytes replaced), or None if it cannot be read."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_FILE_BYTES)
    except (OSError, ValueError):
        return None
    return data.decode("utf-8", errors="replace")


def _clean(value: str) -> str:
    """Device-tree strings end with NUL; sysfs ones with a newline. Control characters and
    replacement characters are dropped, whitespace collapsed, length capped."""
    kept = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in value)
    return " ".join(kept.split())[:MAX_VALUE_CHARS]
