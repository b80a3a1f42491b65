#!/usr/bin/env bash
# Runs on the host after `vagrant up`: the multi-machine checks of the journal.
# client1 writes and is killed; client2 (no shared cache) mounts and must see every
# fsynced file; client1 then follows client2 read-only.
set -euo pipefail
cd "$(dirname "$0")/../.."
SERVERS=http://192.168.56.11:7001,http://192.168.56.12:7001,http://192.168.56.13:7001
FS="sudo /fusefs/.venv/bin/fusefs"
AUTH="--secret-file /fusefs/tests/vm/secret"
on() { vagrant ssh "$1" -c "$2"; }
step() { echo "== $*"; }

step "format (once) and mount on client1"
on client1 "$FS mkfs --servers $SERVERS $AUTH --force >/dev/null; sudo mkdir -p /mnt/fs && $FS mount --servers http://192.168.56.11:7001 $AUTH /mnt/fs"
step "write and fsync 200 files on client1"
on client1 "cd /mnt/fs && sudo python3 - <<'PY'
import hashlib, os
with open('/tmp/manifest', 'w') as m:
    for i in range(200):
        data = os.urandom(1000 + i * 997)
        fd = os.open(f'f{i:03d}', os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, data); os.fsync(fd); os.close(fd)
        m.write(f'f{i:03d} {hashlib.sha256(data).hexdigest()}\n')
d = os.open('.', os.O_RDONLY); os.fsync(d); os.close(d)
PY"
on client1 "cat /tmp/manifest" > /tmp/fusefs-vm-manifest
step "kill -9 client1's daemon (a dead machine)"
on client1 "sudo pkill -9 -f 'fusefs mount --foreground' ; sudo umount -l /mnt/fs || true"
step "client2 mounts read-write once the lease expires, with an empty cache"
for attempt in $(seq 1 20); do
  if on client2 "sudo mkdir -p /mnt/fs && $FS mount --servers $SERVERS $AUTH /mnt/fs"; then break; fi
  sleep 3
done
step "every fsynced file is on client2, intact"
on client2 "cd /mnt/fs && sha256sum f*" | awk '{print $2, $1}' | sort > /tmp/fusefs-vm-seen
sort /tmp/fusefs-vm-manifest | diff - /tmp/fusefs-vm-seen
step "client1 follows client2 read-only"
on client1 "$FS mount --servers $SERVERS $AUTH --read-only /mnt/fs"
on client2 "echo from-client2 | sudo tee /mnt/fs/new >/dev/null"
for attempt in $(seq 1 15); do
  if on client1 "cat /mnt/fs/new 2>/dev/null" | grep -q from-client2; then break; fi
  sleep 1
done
on client1 "cat /mnt/fs/new" | grep -q from-client2
step "fsck from client1 is clean"
on client1 "$FS fsck --servers $SERVERS $AUTH"
on client1 "$FS umount /mnt/fs"; on client2 "$FS umount /mnt/fs"
echo "PASS: mount anywhere, crash recovery and read-only following across machines"
