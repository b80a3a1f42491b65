#!/usr/bin/env bash
# A block-server machine (runs as root in the guest; the Vagrantfile calls it with this
# machine's private address and the port): fusefs installed, the data disk (the second disk,
# labelled fusefs-data) formatted once and mounted at /srv/fusefs, and `blockserver` running
# as the systemd service fusefs-blockserver, user fusefs, listening on the private address
# only, with the cluster secret. A power cut loses nothing the server acknowledged: it
# acknowledges a block once it is fsynced on that disk, and the disk survives.
set -euo pipefail
# shellcheck source=vagrant/lib.sh
source "$(dirname "$0")/lib.sh"

ADDRESS="${1:?usage: provision-server.sh ADDRESS PORT}"
PORT="${2:?usage: provision-server.sh ADDRESS PORT}"
LABEL=fusefs-data
MOUNT=/srv/fusefs
DATA="$MOUNT/blocks"
UNIT=/etc/systemd/system/fusefs-blockserver.service

# The whole disk holding /, as /dev/NAME (root may sit on a partition or on the disk itself).
root_disk() {
  local src parent
  src="$(findmnt -no SOURCE /)"
  parent="$(lsblk -npo PKNAME "$src" 2>/dev/null | head -n1)"
  echo "${parent:-$src}"
}

# The data disk: named by its serial (libvirt), already labelled (a second run), or the one
# whole disk besides the root disk that holds no partition and no filesystem (VirtualBox).
find_data_disk() {
  local dev root candidates=()
  if [ -e /dev/disk/by-id/virtio-$LABEL ]; then readlink -f /dev/disk/by-id/virtio-$LABEL; return; fi
  if dev="$(blkid -L "$LABEL" 2>/dev/null)"; then echo "$dev"; return; fi
  root="$(root_disk)"
  while read -r dev; do
    [ "$dev" = "$root" ] && continue
    case "$dev" in /dev/zram*|/dev/loop*|/dev/ram*|/dev/sr*) continue ;; esac
    grep -q "^$dev " /proc/swaps && continue
    [ "$(lsblk -nro NAME "$dev" | wc -l)" -eq 1 ] || continue   # has partitions
    blkid -p "$dev" >/dev/null 2>&1 && continue                  # holds something
    candidates+=("$dev")
  done < <(lsblk -dnpo NAME,TYPE,RO | awk '$2 == "disk" && $3 == 0 { print $1 }')
  [ ${#candidates[@]} -eq 1 ] || die "expected one empty data disk besides $root, found" \
    "${#candidates[@]} (${candidates[*]:-none}); with VirtualBox run VAGRANT_EXPERIMENTAL=disks vagrant up"
  echo "${candidates[0]}"
}

prepare_data_disk() {
  local dev
  dev="$(find_data_disk)"
  if ! blkid -p "$dev" >/dev/null 2>&1; then
    say "formatting the data disk $dev (ext4, label $LABEL)"
    mkfs.ext4 -q -L "$LABEL" "$dev"
  elif [ "$(blkid -s LABEL -o value "$dev")" != "$LABEL" ]; then
    die "$dev holds data that is not labelled $LABEL; not touching it"
  fi
  install -d -m 0755 "$MOUNT"
  grep -q "^LABEL=$LABEL " /etc/fstab || echo "LABEL=$LABEL $MOUNT ext4 defaults,nofail 0 2" >> /etc/fstab
  mountpoint -q "$MOUNT" || mount "$MOUNT"
  install -d -m 0700 -o fusefs -g fusefs "$DATA"
}

write_unit() {
  cat > "$UNIT.tmp" <<UNIT
[Unit]
Description=fusefs block server on $ADDRESS:$PORT (data on the $LABEL disk)
Documentation=file://$TREE/docs/vagrant.md
RequiresMountsFor=$MOUNT
Wants=network-online.target
After=network-online.target
# The private address may come up after the service: keep retrying instead of giving up.
StartLimitIntervalSec=0

[Service]
User=fusefs
Group=fusefs
ExecStart=$VENV/bin/blockserver serve --data $DATA --listen $ADDRESS:$PORT --secret-file $ETC/secret
Restart=always
RestartSec=2
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths=$DATA

[Install]
WantedBy=multi-user.target
UNIT
  mv "$UNIT.tmp" "$UNIT"
}

# Poll until the server accepts connections on its address.
wait_listening() {
  for _ in $(seq 1 60); do
    if "$VENV/bin/python" - "$ADDRESS" "$PORT" <<'PY' 2>/dev/null; then return 0; fi
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
PY
    sleep 1
  done
  systemctl status --no-pager fusefs-blockserver || true
  die "the block server does not listen on $ADDRESS:$PORT; see journalctl -u fusefs-blockserver"
}

need_pkgs python3 python3-venv e2fsprogs
install_fusefs
id fusefs >/dev/null 2>&1 || useradd --system --home-dir "$MOUNT" --shell /usr/sbin/nologin fusefs
install_secret fusefs
prepare_data_disk
write_unit
systemctl daemon-reload
systemctl enable -q fusefs-blockserver
systemctl restart fusefs-blockserver
wait_listening
say "block server ready at http://$ADDRESS:$PORT (data on $(findmnt -no SOURCE "$MOUNT"))"
