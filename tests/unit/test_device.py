"""Device properties are read from a fake root, as they would be on a Pi, a PC and a container."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from agent.device import MAX_VALUE_CHARS, read_device_info


def write(root: Path, relative: str, data: str | bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


def read(root: Path) -> tuple[str, str]:
    info = read_device_info("uuid-1", "kiosk", "1.2.3", root=root)
    return info.os_version, info.device_model


def test_raspberry_pi_with_debian(tmp_path: Path) -> None:
    write(
        tmp_path,
        "etc/os-release",
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
        'VERSION_ID="12"\nVERSION="12 (bookworm)"\nID=debian\n',
    )
    write(tmp_path, "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    info = read_device_info("uuid-1", "kiosk", "1.2.3", root=tmp_path)
    assert info.os_version == "12"
    assert info.device_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert info.device_uuid == "uuid-1"
    assert info.device_type == "kiosk"
    assert info.sdk_version == "1.2.3"
    assert info.os_name == "Linux"
    assert info.sdk == "engagement-agent"


def test_pc_uses_dmi_vendor_and_product(tmp_path: Path) -> None:
    write(tmp_path, "etc/os-release", "ID=ubuntu\nVERSION_ID=24.04\n")
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "Dell Inc.\n")
    write(tmp_path, "sys/class/dmi/id/product_name", "OptiPlex 7090\n")
    assert read(tmp_path) == ("24.04", "Dell Inc. OptiPlex 7090")


def test_dmi_product_that_already_names_the_vendor(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "LENOVO\n")
    write(tmp_path, "sys/class/dmi/id/product_name", "Lenovo ThinkCentre M70q\n")
    assert read(tmp_path)[1] == "Lenovo ThinkCentre M70q"


def test_dmi_placeholders_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "To Be Filled By O.E.M.\n")
    write(tmp_path, "sys/class/dmi/id/product_name", "NUC8i5BEH\n")
    assert read(tmp_path)[1] == "NUC8i5BEH"
    write(tmp_path, "sys/class/dmi/id/product_name", "Default string\n")
    assert read(tmp_path)[1] == platform.machine()


def test_nothing_readable_falls_back_to_platform(tmp_path: Path) -> None:
    assert read(tmp_path) == (platform.release(), platform.machine())


def test_os_release_without_version_id_uses_kernel_release(tmp_path: Path) -> None:
    write(tmp_path, "etc/os-release", 'NAME="Arch Linux"\nID=arch\n')
    write(tmp_path, "usr/lib/os-release", "VERSION_ID=99\n")  # /etc wins even without it
    assert read(tmp_path)[0] == platform.release()


def test_usr_lib_os_release_is_the_fallback(tmp_path: Path) -> None:
    write(tmp_path, "usr/lib/os-release", "VERSION_ID='11'\n")
    assert read(tmp_path)[0] == "11"


@pytest.mark.parametrize(
    "content",
    [
        b'\xff\xfe\x00garbage\nVERSION_ID="unterminated\n',
        b"VERSION_ID\n=\n==\n",
        b"",
        b"\x00" * 100,
    ],
)
def test_garbled_os_release_never_raises(tmp_path: Path, content: bytes) -> None:
    write(tmp_path, "etc/os-release", content)
    version, _ = read(tmp_path)
    assert version == platform.release()


def test_garbled_values_are_cleaned_and_capped(tmp_path: Path) -> None:
    write(tmp_path, "etc/os-release", b'VERSION_ID="12\x07"\n')
    write(tmp_path, "proc/device-tree/model", b"Board\xff\x01 " + b"X" * 500 + b"\x00\x00")
    version, model = read(tmp_path)
    assert version == "12"
    assert model.startswith("Board X")
    assert len(model) == MAX_VALUE_CHARS
    assert model.isprintable()


def test_unreadable_model_is_skipped(tmp_path: Path) -> None:
    # A directory where a file is expected behaves like an unreadable file.
    (tmp_path / "proc" / "device-tree" / "model").mkdir(parents=True)
    write(tmp_path, "sys/class/dmi/id/product_name", "Kiosk 3000\n")
    assert read(tmp_path)[1] == "Kiosk 3000"


def test_empty_device_tree_model_falls_through(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/model", b"\x00")
    write(tmp_path, "sys/class/dmi/id/sys_vendor", "QEMU\n")
    assert read(tmp_path)[1] == "QEMU"
