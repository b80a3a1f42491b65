"""Guest-side helper of the VM suite (runs in a client VM with the project on PYTHONPATH).

Commands (each prints JSON or one line per result on stdout; exit 0 means the check held):
  write DIR N SIZE    write N files of about SIZE bytes into DIR, fsync each and the directory,
                      print "name sha256" once each file is durable (the host keeps these lines:
                      the manifest of what was promised); SIGTERM ends it cleanly (exit 0)
                      after the file in progress
  verify DIR          read the manifest from stdin, print {"checked", "bad": [...]}; exit 1 if bad
  list URL SECRET     the block ids a server holds, as a JSON list
  check URL SECRET    read a JSON list of ids on stdin; the server re-reads and verifies each;
                      print {"checked", "missing": [...], "corrupt": [...]}; exit 1 if any
State: none. A crash half way leaves at most one file not yet printed (so not promised).
"""
import hashlib
import json
import os
import signal
import sys


def write(directory, count, size):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    os.makedirs(directory, exist_ok=True)
    for i in range(int(count)):
        if stop:
            break
        data = os.urandom(int(size) + i * 131)
        name = f"f{i:05d}"
        fd = os.open(os.path.join(directory, name), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(directory, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        print(name, hashlib.sha256(data).hexdigest(), flush=True)


def verify(directory):
    bad, checked = [], 0
    for line in sys.stdin:
        name, digest = line.split()
        checked += 1
        try:
            with open(os.path.join(directory, name), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    bad.append(f"{name}: wrong contents")
        except OSError as e:
            bad.append(f"{name}: {e}")
    print(json.dumps({"checked": checked, "bad": bad}))
    return 1 if bad or not checked else 0


def _transport(url, secret):
    from fusefs import admin, transport
    t = transport.Transport(transport.TransportConfig.from_key_file(secret))
    return t, admin.identify(t, url)


def list_ids(url, secret):
    t, member = _transport(url, secret)
    ids, after = [], ""
    while True:
        page, after = t.list_blocks(member, after)
        ids += [entry["id"] for entry in page]
        if not after:
            break
    print(json.dumps(ids))
    return 0


def check(url, secret):
    t, member = _transport(url, secret)
    ids = json.load(sys.stdin)
    missing, corrupt = [], []
    for start in range(0, len(ids), 500):
        for entry in t.batch_check(member, ids[start:start + 500], verify=True):
            if entry["status"] == 404:
                missing.append(entry["id"])
            elif entry["status"] != 200:
                corrupt.append(entry["id"])
    print(json.dumps({"checked": len(ids), "missing": missing, "corrupt": corrupt}))
    return 1 if missing or corrupt else 0


def main(argv):
    command, args = argv[0], argv[1:]
    handlers = {"write": write, "verify": verify, "list": list_ids, "check": check}
    return handlers[command](*args) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
