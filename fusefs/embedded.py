"""The embedded default: three local block servers, formatted once, mounted at DIR/mnt.

Layout of DIR (all created on first use):

    secret            the cluster secret (random, mode 600)
    cluster.json      ports, URLs and process ids of the servers
    servers/sN/       data directory of server N, and servers/sN.log its log
    cache/            the mount's metadata, block cache and log
    mnt/              the mountpoint

`up` is idempotent: servers already running are kept, a formatted filesystem is reused,
a mounted one is left mounted, and a dead mount (its daemon killed) is mounted again. `down` unmounts first (which uploads everything dirty),
then stops the servers with SIGTERM, so nothing is lost.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time

from .host import process_alive as _alive
from .mounts import mount_state

SERVERS = 3
SCRUB_INTERVAL = 24 * 3600  # the mount verifies every copy in the background once a day


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fusefs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusefs", *args], text=True,
                          capture_output=True)


def _load(root: str) -> dict:
    try:
        with open(os.path.join(root, "cluster.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"servers": [{"port": _free_port()} for _ in range(SERVERS)]}


def _save(root: str, cluster: dict) -> None:
    with open(os.path.join(root, "cluster.json"), "w") as f:
        json.dump(cluster, f, indent=1)


def _secret(root: str) -> str:
    path = os.path.join(root, "secret")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def _start_server(root: str, index: int, server: dict, secret: str) -> None:
    data = os.path.join(root, "servers", f"s{index}")
    log = open(os.path.join(root, "servers", f"s{index}.log"), "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockserver", "serve", "--data", data,
         "--listen", f"127.0.0.1:{server['port']}", "--secret-file", secret],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("serving "):
        raise SystemExit(f"fusefs up: block server {index} did not start; see "
                         f"{log.name}")
    server.update(pid=proc.pid, url=line.split()[1])


def up(directory: str) -> int:
    root = os.path.abspath(directory)
    try:
        for sub in ("servers", "cache"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
    except OSError as e:
        print(f"fusefs up: cannot use {root}: {e.strerror} ({e.filename}); give a "
              "directory this user can write", file=sys.stderr)
        return 1
    secret = _secret(root)
    cluster = _load(root)
    for index, server in enumerate(cluster["servers"]):
        if not _alive(server.get("pid")):
            print(f"starting block server {index + 1}/{SERVERS} on port {server['port']}",
                  file=sys.stderr)
            _start_server(root, index, server, secret)
    _save(root, cluster)
    urls = ",".join(s["url"] for s in cluster["servers"])
    common = ["--servers", urls, "--secret-file", secret]
    mkfs = _fusefs("mkfs", *common)
    if mkfs.returncode == 0:
        print(mkfs.stdout.strip(), file=sys.stderr)
    elif "already hold" not in mkfs.stderr:
        sys.stderr.write(mkfs.stderr)
        return 1
    mnt = os.path.join(root, "mnt")
    if _mount(mnt, [*common, "--cache-dir", os.path.join(root, "cache"),
                    "--scrub-interval", str(SCRUB_INTERVAL)]) != 0:
        return 1
    print(f"""fusefs is up: a filesystem on {SERVERS} local block servers, mounted at
  {mnt}
Use it like any directory (cp, tar, git, sqlite...). Every block is stored on 3 servers.
  fusefs status {mnt}     what it is doing
  fusefs down {directory}   upload everything, unmount, stop the servers""")
    return 0


def _mount(mnt: str, args: list[str]) -> int:
    """Mount at `mnt` unless a live fusefs mount is there; a dead one (its daemon died) is
    detached and mounted again by `fusefs mount`."""
    state = mount_state(mnt)
    if state == "alive":
        return 0
    if state == "dead":
        print(f"the mount at {mnt} was dead (its fusefs daemon had died); mounting it again",
              file=sys.stderr)
    if state == "none":
        os.makedirs(mnt, exist_ok=True)
    mount = _fusefs("mount", *args, mnt)
    if mount.returncode != 0:
        sys.stderr.write(mount.stderr)
    return mount.returncode


def down(directory: str) -> int:
    root = os.path.abspath(directory)
    if not os.path.exists(os.path.join(root, "cluster.json")):
        print(f"nothing to take down: {root} holds no fusefs (`fusefs up {directory}` "
              "would make one there)")
        return 0
    mnt = os.path.join(root, "mnt")
    # umount's lines (the bytes left to upload, a stopped daemon) are this command's too
    umount = subprocess.Popen([sys.executable, "-m", "fusefs", "umount", mnt], text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    nothing_mounted = False
    for line in umount.stderr:
        if "nothing is mounted" in line:
            nothing_mounted = True
        else:
            sys.stderr.write(line)
    if umount.wait() != 0 and not nothing_mounted:
        return 1
    cluster = _load(root)
    for server in cluster["servers"]:
        if _alive(server.get("pid")):
            os.kill(server["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 60
    while any(_alive(s.get("pid")) for s in cluster["servers"]):
        if time.monotonic() > deadline:
            print("fusefs down: a block server did not stop within 60 s", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"fusefs is down; the data stays in {root} (`fusefs up {directory}` brings it back)")
    return 0
