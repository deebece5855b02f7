#!/bin/bash
# Build engagement-agent_<version>_<arch>.deb: a self-contained virtualenv at
# /opt/engagement-agent (Debian 12's python3-pydantic and python3-paho-mqtt are too old), the
# systemd unit, sysusers.d/tmpfiles.d snippets and /etc/engagement-agent/agent.toml (conffile).
#
#   deploy/build-deb.sh [OUTDIR]          default OUTDIR: dist/
#
# The virtualenv holds compiled wheels (pydantic-core) for the build machine's CPU and links
# to its /usr/bin/python3.X, so build on the target distribution and architecture: for a
# Raspberry Pi (arm64, bookworm) run this on a Pi, an arm64 builder or in an arm64 chroot
# (qemu-user-static + debootstrap). Environment:
#   PYTHON    interpreter for the venv (default /usr/bin/python3: the target's Debian python,
#             not a pyenv/conda one, which would not exist on the device)
#   PIP_ARGS  extra pip options, e.g. "--no-index --find-links /srv/wheels" for offline builds
#   DEB_ARCH  override the architecture name (default: dpkg --print-architecture)
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${1:-$SRC/dist}" && cd "${1:-$SRC/dist}" && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
PREFIX=/opt/engagement-agent
PKG=engagement-agent

for tool in dpkg-deb "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh: $tool not found" >&2; exit 1; }
done

VERSION=$("$PYTHON" - "$SRC/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])
PY
)
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ARCH=${DEB_ARCH:-$(dpkg --print-architecture)}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
VENV=$ROOT$PREFIX

echo "build-deb.sh: $PKG $VERSION for $ARCH with python$PYVER" >&2

# A clean copy of the sources, so the build leaves nothing (build/, *.egg-info) in the tree.
mkdir -p "$WORK/src"
cp "$SRC/pyproject.toml" "$WORK/src/"
if [ -f "$SRC/README.md" ]; then cp "$SRC/README.md" "$WORK/src/"; else : >"$WORK/src/README.md"; fi
cp -r "$SRC/agent" "$WORK/src/agent"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +

"$PYTHON" -m venv "$VENV"
# Pin the interpreter the wheels were built for, not whatever /usr/bin/python3 becomes later.
PYREAL=$("$PYTHON" -c 'import sys; print(sys.executable)')
case $PYREAL in /usr/bin/python3) PYREAL=/usr/bin/python$PYVER ;; esac
ln -sfn "$PYREAL" "$VENV/bin/python3"
# shellcheck disable=SC2086  # PIP_ARGS is a list of options on purpose
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    --no-compile ${PIP_ARGS:-} "$WORK/src"
# pip and setuptools are not needed at run time; the package is replaced as a whole on upgrade.
"$VENV/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null

# The venv was created at $VENV; make every recorded path say $PREFIX (shebangs, activate).
grep -rlI --null -F "$VENV" "$VENV/bin" "$VENV/pyvenv.cfg" | xargs -0 -r sed -i "s#$VENV#$PREFIX#g"
# Byte-compile with the installed paths in the code objects (tracebacks show real files);
# /opt is read-only for the service (ProtectSystem=strict), so it could not do it itself.
"$VENV/bin/python" -m compileall -q -j 0 -s "$ROOT" -p / "$VENV/lib" >/dev/null

install -D -m 0644 "$SRC/systemd/engagement-agent.service" \
    "$ROOT/lib/systemd/system/engagement-agent.service"
install -D -m 0644 "$SRC/systemd/engagement-agent.sysusers" \
    "$ROOT/usr/lib/sysusers.d/engagement-agent.conf"
install -D -m 0644 "$SRC/systemd/engagement-agent.tmpfiles" \
    "$ROOT/usr/lib/tmpfiles.d/engagement-agent.conf"
install -D -m 0640 "$SRC/deploy/agent.toml" "$ROOT/etc/engagement-agent/agent.toml"
mkdir -p "$ROOT/usr/bin" "$ROOT/usr/share/doc/$PKG"
ln -s "$PREFIX/bin/engagement-agent" "$ROOT/usr/bin/engagement-agent"
for doc in README.md docs/configuration.md docs/operations.md deploy/README.md; do
    if [ -f "$SRC/$doc" ]; then
        name=$(basename "$doc"); [ "$doc" = deploy/README.md ] && name=deploy.md
        install -m 0644 "$SRC/$doc" "$ROOT/usr/share/doc/$PKG/$name"
    fi
done

mkdir -p "$ROOT/DEBIAN"
cat >"$ROOT/DEBIAN/control" <<CONTROL
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: engagement-agent maintainers <engagement-agent@users.noreply.github.com>
Section: net
Priority: optional
Depends: python$PYVER, libc6, systemd (>= 247)
Installed-Size: $(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
Homepage: https://github.com/engagement-agent/engagement-agent
Description: durable Bloomreach Engagement tracking agent for edge devices
 Accepts tracking commands from local apps over MQTT and a Unix socket, runs the
 Engagement SDK tracking logic per app, keeps a size-capped SQLite queue that
 survives crashes and offline periods, and syncs it to the Tracking API.
 Ships its own Python virtualenv in $PREFIX.
CONTROL
echo /etc/engagement-agent/agent.toml >"$ROOT/DEBIAN/conffiles"

# Maintainer scripts honour $DPKG_ROOT (dpkg --root --force-script-chrootless).
cat >"$ROOT/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
ROOTOPT=${DPKG_ROOT:+--root=$DPKG_ROOT}
if [ "$1" = configure ]; then
    systemd-sysusers $ROOTOPT engagement-agent.conf
    systemd-tmpfiles $ROOTOPT --create engagement-agent.conf
    if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    if [ -z "$2" ]; then
        # First install: enabled for the next boot, not started before it is configured.
        systemctl $ROOTOPT enable engagement-agent.service >/dev/null 2>&1 || true
        echo "engagement-agent: edit /etc/engagement-agent/agent.toml, check it with" \
             "'engagement-agent check-config', then 'systemctl start engagement-agent'."
    elif [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
        # Upgrade: restart only if it was running.
        systemctl try-restart engagement-agent.service || true
    fi
fi
exit 0
SH
cat >"$ROOT/DEBIAN/prerm" <<'SH'
#!/bin/sh
set -e
# On upgrade the agent keeps running; postinst restarts it on the new code.
if [ "$1" = remove ] && [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl stop engagement-agent.service || true
fi
exit 0
SH
cat >"$ROOT/DEBIAN/postrm" <<'SH'
#!/bin/sh
set -e
case "$1" in
remove)
    if [ -z "$DPKG_ROOT" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
    ;;
purge)
    # Purge deletes the queue, including items never delivered, and the credentials.
    rm -f "$DPKG_ROOT/etc/systemd/system/multi-user.target.wants/engagement-agent.service"
    rm -rf "$DPKG_ROOT/var/lib/engagement-agent" "$DPKG_ROOT/etc/engagement-agent/credentials"
    rmdir --ignore-fail-on-non-empty "$DPKG_ROOT/etc/engagement-agent" 2>/dev/null || true
    ;;
esac
exit 0
SH
chmod 0755 "$ROOT/DEBIAN/postinst" "$ROOT/DEBIAN/prerm" "$ROOT/DEBIAN/postrm"

DEB=$OUT/${PKG}_${VERSION}_${ARCH}.deb
dpkg-deb --build --root-owner-group -Zxz "$ROOT" "$DEB" >/dev/null
echo "$DEB"
