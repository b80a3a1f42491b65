# Shared by vagrant/provision-*.sh (sourced, runs as root inside a guest): Debian packages,
# fusefs in /opt/fusefs/venv, the cluster secret in /etc/fusefs. Every step is idempotent,
# so `vagrant provision` can run again after a change of the checkout.
# shellcheck shell=bash

TREE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the rsynced checkout
STATE="$TREE/vagrant/.state"                               # made on the host
VENV=/opt/fusefs/venv
ETC=/etc/fusefs

say() { echo "fusefs-provision[$(hostname)]: $*"; }
die() { echo "fusefs-provision[$(hostname)]: error: $*" >&2; exit 1; }

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing_pkgs() {
  local pkg
  for pkg in "$@"; do have_pkg "$pkg" || echo "$pkg"; done
}

# need_pkgs PKG...: install what is missing, or stop saying what the box lacks.
need_pkgs() {
  local missing
  mapfile -t missing < <(missing_pkgs "$@")
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends "${missing[@]}" >/dev/null; }; then
    die "cannot install ${missing[*]} (no reachable Debian mirror?): use a box that has them" \
        "(FUSEFS_VM_BOX, docs/vagrant.md) or give the guests a mirror"
  fi
}

# want_pkgs PKG...: tools the test scenarios use; missing ones are reported, not fatal.
want_pkgs() {
  local missing
  mapfile -t missing < <(missing_pkgs "$@")
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends "${missing[@]}" >/dev/null; } 2>/dev/null; then
    say "warning: could not install ${missing[*]}; the scenarios that use them will fail"
  fi
}

# fusefs into $VENV: from the host's wheelhouse when there is one (no network needed), else
# from the checkout with its dependencies from PyPI. The project itself is always reinstalled,
# so a changed checkout is what runs after `vagrant provision`.
install_fusefs() {
  local wheels="$STATE/wheels" src
  # Debian's own Python (python3 and python3-venv), never one found first on PATH.
  [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV" || die "python3 -m venv failed"
  if compgen -G "$wheels/fusefs-*.whl" >/dev/null; then
    say "installing fusefs from the host's wheelhouse"
    "$VENV/bin/pip" install -q --no-index --find-links "$wheels" fusefs \
      || die "pip install from $wheels failed: run vagrant/wheelhouse on the host again"
    "$VENV/bin/pip" install -q --no-index --find-links "$wheels" --force-reinstall --no-deps fusefs
  else
    say "installing fusefs from the checkout (dependencies from PyPI)"
    src="$(mktemp -d)"
    cp -a "$TREE/pyproject.toml" "$TREE/README.md" "$TREE/fusefs" "$TREE/blockserver" "$src/"
    "$VENV/bin/pip" install -q "$src" \
      || die "pip install failed (no PyPI from the guest?): build a wheelhouse on the host" \
             "with vagrant/wheelhouse and provision again"
    "$VENV/bin/pip" install -q --force-reinstall --no-deps "$src"
    rm -rf "$src"
  fi
  ln -sf "$VENV/bin/fusefs" /usr/local/bin/fusefs
  ln -sf "$VENV/bin/blockserver" /usr/local/bin/blockserver
}

# install_secret OWNER: the host's cluster secret at $ETC/secret, readable by OWNER only.
install_secret() {
  [ -s "$STATE/secret" ] || die "$STATE/secret is missing: the Vagrantfile makes it on" \
                                "\`vagrant up\`/\`vagrant provision\`; run one of them on the host"
  install -d -m 0755 "$ETC"
  install -m 0600 -o "$1" -g root "$STATE/secret" "$ETC/secret"
}
