#!/bin/bash
# Build engagement-agent_<version>_<arch>.deb for Debian 12 (bookworm) on amd64, arm64 or armhf,
# on any host: a self-contained virtualenv at /opt/engagement-agent (Debian 12's
# python3-pydantic and python3-paho-mqtt are too old), the systemd unit, sysusers.d/tmpfiles.d
# snippets, /etc/engagement-agent/agent.toml (conffile), the man page engagement-agent(8) and
# bash completion generated from the CLI's own parser, and the Mosquitto config for the device.
#
#   deploy/build-deb.sh [--arch amd64|arm64|armhf] [OUTDIR]     default: this machine, dist/
#
# No compiler for the target is needed: compiled dependencies (pydantic-core, orjson) come as
# the target's wheels from the package index (pip download --platform ...). Dependencies
# published only as source (sdnotify) are built into wheels here and used only if they are
# pure Python.
# If a dependency has no wheel for the target, the build stops and names it (docs/deploy.md,
# "Building", says what to do). The host needs python3.11 (Debian 12's: the bytecode and the
# wheels are for it), python3-venv, dpkg-dev, and the network or PIP_ARGS for the index.
#
# Environment:
#   PYTHON    host interpreter for the build tools (default /usr/bin/python3); must be 3.11
#   PIP_ARGS  extra pip options, e.g. "--no-index --find-links /srv/wheels" for offline builds
#   DEB_VERSION  the package's version (default: the project's version in pyproject.toml),
#             e.g. 0.2.0~rc1 for a test build that a later 0.2.0 must upgrade
set -euo pipefail

usage() {
    echo "usage: deploy/build-deb.sh [--arch amd64|arm64|armhf] [OUTDIR]" >&2
    exit 64
}

ARCH=
OUTARG=
while [ $# -gt 0 ]; do
    case $1 in
    --arch) [ $# -ge 2 ] || usage; ARCH=$2; shift 2 ;;
    --arch=*) ARCH=${1#--arch=}; shift ;;
    -h | --help) sed -n '2,22s/^# \{0,1\}//p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$OUTARG" ] || usage; OUTARG=$1; shift ;;
    esac
done

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${OUTARG:-$SRC/dist}" && cd "${OUTARG:-$SRC/dist}" && pwd)
PYTHON=${PYTHON:-/usr/bin/python3}
PREFIX=/opt/engagement-agent
PKG=engagement-agent
# The target's interpreter: Debian 12 ships python3.11 on every architecture.
PYVER=3.11
ARCH=${ARCH:-$(dpkg --print-architecture)}

# Debian architecture -> the wheel platform tags that run on Debian 12 (glibc 2.36) there,
# and the ELF machine `file` reports for its shared objects (checked below).
case $ARCH in
amd64) WHEEL_ARCH=x86_64; ELF_MACHINE="x86-64" ;;
arm64) WHEEL_ARCH=aarch64; ELF_MACHINE="ARM aarch64" ;;
armhf) WHEEL_ARCH=armv7l; ELF_MACHINE="ARM, EABI5" ;;
*) echo "build-deb.sh: unsupported architecture '$ARCH' (amd64, arm64 or armhf)" >&2; exit 64 ;;
esac
PLATFORMS=(--platform "manylinux2014_$WHEEL_ARCH")
for glibc in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${glibc}_$WHEEL_ARCH"); done

for tool in dpkg-deb file "$PYTHON"; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh: $tool not found" >&2; exit 1; }
done
HOSTVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$HOSTVER" != "$PYVER" ]; then
    echo "build-deb.sh: $PYTHON is Python $HOSTVER; the package is for Debian 12's Python" \
        "$PYVER, and its bytecode must be compiled by that version (set PYTHON=)" >&2
    exit 1
fi

VERSION=${DEB_VERSION:-$("$PYTHON" - "$SRC/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])
PY
)}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
VENV=$ROOT$PREFIX
SITE=$VENV/lib/python$PYVER/site-packages

echo "build-deb.sh: $PKG $VERSION for $ARCH (python$PYVER, $WHEEL_ARCH wheels)" >&2

# A clean copy of the runtime sources, so the build leaves nothing (build/, *.egg-info) in the
# tree. Only the runtime package `agent`: the API stand-in (the agent_devtools package and its
# console script engagement-api-stub) is a developer tool and stays out.
mkdir -p "$WORK/src"
grep -v '^engagement-api-stub *=' "$SRC/pyproject.toml" >"$WORK/src/pyproject.toml"
if [ -f "$SRC/README.md" ]; then cp "$SRC/README.md" "$WORK/src/"; else : >"$WORK/src/README.md"; fi
cp -r "$SRC/agent" "$WORK/src/agent"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +

# Build tools in a throw-away venv on the host. Every dependency as a wheel for the host:
# the ones published only as source are built here.
"$PYTHON" -m venv "$WORK/tools"
PIP=("$WORK/tools/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
# shellcheck disable=SC2086  # PIP_ARGS is a list of options on purpose
"${PIP[@]}" install --quiet ${PIP_ARGS:-} wheel   # for packages built the setup.py way
mkdir -p "$WORK/host" "$WORK/pure" "$WORK/target"
# shellcheck disable=SC2086
"${PIP[@]}" wheel --quiet ${PIP_ARGS:-} -w "$WORK/host" "$WORK/src"
# Pure-Python wheels (py3-none-any) serve every architecture.
cp "$WORK"/host/*-none-any.whl "$WORK/pure/"

# The target's wheels: pure ones from above or the index, compiled ones from the index only.
# shellcheck disable=SC2086
if ! "${PIP[@]}" download --quiet ${PIP_ARGS:-} --only-binary=:all: "${PLATFORMS[@]}" \
    --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none \
    --find-links "$WORK/pure" -d "$WORK/target" "$WORK"/pure/engagement_agent-*.whl \
    2>"$WORK/download.log"; then
    cat "$WORK/download.log" >&2
    missing=$(sed -n 's/.*satisfies the requirement \([^ ]*\).*/\1/p' "$WORK/download.log" |
        sort -u | tr '\n' ' ')
    echo "build-deb.sh: no $ARCH ($WHEEL_ARCH, CPython $PYVER) wheel on the package index" \
        "for: ${missing:-see above}. Build that wheel on a $ARCH machine (pip wheel NAME)" \
        "and pass PIP_ARGS=\"--find-links DIR\"; docs/deploy.md, \"Building\"." >&2
    exit 1
fi

# The virtualenv, laid out by hand (the target's python cannot run here): the wheels unpacked
# into site-packages, and the interpreter linked to the target's /usr/bin/python3.11, pinned
# so that a later change of /usr/bin/python3 does not swap the interpreter under the wheels.
# shellcheck disable=SC2086
"${PIP[@]}" install --quiet --no-index --no-deps --no-compile --only-binary=:all: \
    "${PLATFORMS[@]}" --python-version "$PYVER" --implementation cp \
    --abi "cp${PYVER/./}" --abi abi3 --abi none --target "$SITE" "$WORK"/target/*.whl
rm -rf "${SITE:?}/bin"
# Library modules that start with a `#!` line but are not executable (prometheus_client has a
# few) are modules, not scripts: blank the line (keeping line numbers for tracebacks) so that
# lintian does not take them for scripts with an unusual interpreter.
find "$SITE" -name '*.py' ! -perm /111 -exec sed -i '1s/^#!.*//' {} +
mkdir -p "$VENV/bin"
ln -s "/usr/bin/python$PYVER" "$VENV/bin/python3"
ln -s python3 "$VENV/bin/python"
ln -s python3 "$VENV/bin/python$PYVER"
cat >"$VENV/pyvenv.cfg" <<CFG
home = /usr/bin
include-system-site-packages = false
version = $PYVER
executable = /usr/bin/python$PYVER
CFG
cat >"$VENV/bin/engagement-agent" <<SCRIPT
#!$PREFIX/bin/python3
import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
SCRIPT
chmod 0755 "$VENV/bin/engagement-agent"

# Every compiled file must be for the target: a host .so here would fail only on the device.
wrong=$(find "$VENV" -name '*.so*' -type f -print0 | xargs -0 -r file -L |
    grep -v -F "$ELF_MACHINE" || true)
if [ -n "$wrong" ]; then
    echo "build-deb.sh: compiled files not for $ARCH ($ELF_MACHINE):" >&2
    echo "$wrong" >&2
    exit 1
fi

# Byte-compile with the installed paths in the code objects (tracebacks show real files);
# /opt is read-only for the service (ProtectSystem=strict), so it could not do it itself.
"$PYTHON" -m compileall -q -j 0 -s "$ROOT" -p / "$VENV/lib" >/dev/null

# Man page and bash completion from the CLI's own parser (host build tools + our wheels).
"${PIP[@]}" install --quiet --no-index --find-links "$WORK/host" "$WORK"/host/engagement_agent-*.whl
mkdir -p "$ROOT/usr/share/man/man8" "$ROOT/usr/share/bash-completion/completions"
"$WORK/tools/bin/python" "$SRC/deploy/cli_docs.py" man --version "$VERSION" |
    gzip -9n >"$ROOT/usr/share/man/man8/engagement-agent.8.gz"
"$WORK/tools/bin/python" "$SRC/deploy/cli_docs.py" bash \
    >"$ROOT/usr/share/bash-completion/completions/engagement-agent"

install -D -m 0644 "$SRC/systemd/engagement-agent.service" \
    "$ROOT/lib/systemd/system/engagement-agent.service"
install -D -m 0644 "$SRC/systemd/engagement-agent.sysusers" \
    "$ROOT/usr/lib/sysusers.d/engagement-agent.conf"
install -D -m 0644 "$SRC/systemd/engagement-agent.tmpfiles" \
    "$ROOT/usr/lib/tmpfiles.d/engagement-agent.conf"
install -D -m 0640 "$SRC/deploy/agent.toml" "$ROOT/etc/engagement-agent/agent.toml"
for file in engagement.conf engagement.acl README.md; do
    install -D -m 0644 "$SRC/deploy/mosquitto/$file" \
        "$ROOT/usr/share/engagement-agent/mosquitto/$file"
done
install -m 0755 "$SRC/deploy/mosquitto/add-app" "$ROOT/usr/share/engagement-agent/mosquitto/"
mkdir -p "$ROOT/usr/bin"
ln -s "$PREFIX/bin/engagement-agent" "$ROOT/usr/bin/engagement-agent"

DOC=$ROOT/usr/share/doc/$PKG
mkdir -p "$DOC"
for doc in README.md docs/*.md; do
    if [ -f "$SRC/$doc" ]; then install -m 0644 "$SRC/$doc" "$DOC/$(basename "$doc")"; fi
done
cat >"$DOC/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: engagement-agent
Source: https://github.com/engagement-agent/engagement-agent

Files: *
Copyright: 2025-2026 engagement-agent contributors
License: MIT

Files: opt/engagement-agent/lib/*
Copyright: the authors of each bundled Python package
License: various
 The bundled virtualenv holds paho-mqtt (EPL-2.0 or EDL-1.0), pydantic and pydantic-core
 (MIT), orjson (Apache-2.0 or MIT), urllib3 (MIT), prometheus_client (Apache-2.0), sdnotify (MIT)
 and their dependencies; each
 package's licence is in its *.dist-info directory under
 /opt/engagement-agent/lib/python3.11/site-packages/.

License: MIT
 Permission is hereby granted, free of charge, to any person obtaining a copy of this
 software and associated documentation files (the "Software"), to deal in the Software
 without restriction, including without limitation the rights to use, copy, modify, merge,
 publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons to
 whom the Software is furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in all copies or
 substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
 INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
 PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
 FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
 OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
 DEALINGS IN THE SOFTWARE.
COPYRIGHT
# The date of the last commit, so rebuilding the same commit gives the same changelog.
DATE=$(git -C "$SRC" log -1 --format=%aD 2>/dev/null || date -R)
cat <<CHANGELOG | gzip -9n >"$DOC/changelog.gz"
$PKG ($VERSION) stable; urgency=medium

  * Release $VERSION; the changes are in the project's history.

 -- engagement-agent maintainers <engagement-agent@users.noreply.github.com>  $DATE
CHANGELOG

# Lintian overrides: each one is explained in docs/deploy.md, "Lintian".
install -D -m 0644 "$SRC/deploy/lintian-overrides" "$ROOT/usr/share/lintian/overrides/$PKG"

mkdir -p "$ROOT/DEBIAN"
cat >"$ROOT/DEBIAN/control" <<CONTROL
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: engagement-agent maintainers <engagement-agent@users.noreply.github.com>
Section: net
Priority: optional
Depends: python$PYVER, libc6, systemd (>= 247), init-system-helpers (>= 1.52)
Suggests: mosquitto, bash-completion
Installed-Size: $(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
Homepage: https://github.com/engagement-agent/engagement-agent
Description: durable Bloomreach Engagement tracking agent for edge devices
 Accepts tracking commands from local apps over MQTT and a Unix socket, runs the
 Engagement SDK tracking logic per app, keeps a size-capped SQLite queue that
 survives crashes and offline periods, and syncs it to the Tracking API.
 Ships its own Python virtualenv in $PREFIX.
CONTROL
echo /etc/engagement-agent/agent.toml >"$ROOT/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$SRC/deploy/debian/$script" "$ROOT/DEBIAN/$script"
done

DEB=$OUT/${PKG}_${VERSION}_${ARCH}.deb
dpkg-deb --build --root-owner-group -Zxz "$ROOT" "$DEB" >/dev/null
echo "$DEB"
