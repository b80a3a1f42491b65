#!/usr/bin/env bash
# A client machine (runs as root in the guest; the Vagrantfile calls it with the servers'
# URLs): fusefs installed, the cluster secret in /etc/fusefs/secret (root only), and
# FUSEFS_SERVERS / FUSEFS_SECRET_FILE set for login shells, so `sudo -i fusefs mkfs` and
# `sudo -i fusefs mount /mnt/fusefs` need no flags. Nothing is formatted or mounted here.
set -euo pipefail
# shellcheck source=vagrant/lib.sh
source "$(dirname "$0")/lib.sh"

SERVERS="${1:?usage: provision-client.sh URL,URL,...}"

need_pkgs python3 python3-venv fuse3
if have_pkg libfuse2 || have_pkg libfuse2t64; then :; else need_pkgs libfuse2; fi
want_pkgs attr git sqlite3 rsync
install_fusefs
install_secret root
cat > "$ETC/cluster.env.tmp" <<ENV
FUSEFS_SERVERS=$SERVERS
FUSEFS_SECRET_FILE=$ETC/secret
ENV
mv "$ETC/cluster.env.tmp" "$ETC/cluster.env"
cat > /etc/profile.d/fusefs.sh <<'PROFILE'
# fusefs cluster of this Vagrant set-up (vagrant/provision-client.sh)
set -a; . /etc/fusefs/cluster.env; set +a
PROFILE
install -d -m 0755 /mnt/fusefs
fusefs --version >/dev/null || die "fusefs does not run after installation"
say "client ready: sudo -i fusefs mkfs (once), then sudo -i fusefs mount /mnt/fusefs"
