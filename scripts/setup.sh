#!/usr/bin/env bash
# Set up everything fusefs needs on a Debian/Ubuntu machine, idempotently:
# the Debian packages (FUSE 2 library, fuse3 tools, test tools), a virtual environment in
# .venv, and this package with its test extras. Sourced by scripts/test and scripts/up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

apt_install() {
  local missing=() pkg
  for pkg in "$@"; do have_pkg "$pkg" || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: installing Debian packages: ${missing[*]}"
  if [ -z "${FUSEFS_APT_UPDATED:-}" ]; then
    $SUDO apt-get update -qq
    export FUSEFS_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

if command -v dpkg-query >/dev/null; then
  # Ubuntu 24.04 renamed libfuse2 to libfuse2t64.
  if have_pkg libfuse2 || have_pkg libfuse2t64; then :
  elif apt-cache show libfuse2t64 >/dev/null 2>&1; then apt_install libfuse2t64
  else apt_install libfuse2; fi
  # attr: getfattr shows a file's health (user.fusefs.replicas, docs/metrics.md)
  # iproute2: ip and tc for the network-namespace tests (docs/netns-tests.md)
  apt_install fuse3 attr iproute2 ${FUSEFS_EXTRA_PACKAGES:-}
else
  echo "setup: not a Debian/Ubuntu machine; install libfuse 2 and fuse3 yourself" >&2
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "setup: fusefs needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    apt_install python3-venv
    "$PYTHON" -m venv .venv
  fi
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing fusefs and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test]'
  touch .venv/.installed
fi
