"""`fusefs scrub` on real block servers beside a real mount: bad copies found and
repaired with exact per-server counts, reads that never return bad data while copies are
bad or being repaired, a block bad everywhere reported unrepairable, an interrupted
throttled scrub that resumes after its cursor, and the mount's background scrub.

Damage is done as disks do it: bytes flipped in the block files under a server's data
directory (`blocks/XX/<id>`: a 32-byte header of magic, xxh3-128 checksum and length,
then the block's bytes). The scrub runs as the real command; its --json report and its
state file are what is checked, and every copy is checked afterwards by reading the
files on the servers' disks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys

import pytest
import xxhash

from fusefs import superblock
from fusefs.transport import Transport, TransportConfig

from .support import REPO, check_files, members_of, wait_until

KiB = 1 << 10
BS = 64 * KiB  # the block size these filesystems are formatted with
MKFS = ["--block-size", "64KiB"]
HEADER = struct.Struct("<8s16sQ")  # a block file's header: magic, xxh3-128, length


# -- helpers ------------------------------------------------------------------------------------

def block_file(server, block_id: str) -> str:
    return os.path.join(server.data_dir, "blocks", block_id[:2], block_id)


def flip(server, block_id: str, offset: int = HEADER.size + 100) -> None:
    """Flip one bit of the server's copy at `offset` (default: in the block's bytes; 9 is
    inside the checksum of the header)."""
    with open(block_file(server, block_id), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x04]))
        f.flush()
        os.fsync(f.fileno())


def intact(server, block_id: str, checksum: str) -> bool:
    """True if the server's file of the block holds exactly the block with that checksum."""
    try:
        with open(block_file(server, block_id), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return False
    magic, digest, length = HEADER.unpack_from(raw)
    body = raw[HEADER.size:]
    return magic == b"FFSBLK1\n" and length == len(body) and digest.hex() == checksum and \
        xxhash.xxh3_128_hexdigest(body) == checksum


def write_files(root: str, files: int, blocks: int, seed: int) -> dict[str, str]:
    """`files` files of `blocks` full blocks each, fsynced: relative name -> sha256."""
    rng = random.Random(seed)
    expected = {}
    for i in range(files):
        data = rng.randbytes(blocks * BS)
        with open(os.path.join(root, f"f{i}"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        expected[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return expected


class Cluster:
    """A direct view of a mount's servers: in the scrub's order (the superblock's), with
    a transport to list them."""

    def __init__(self, m):
        self.transport = Transport(TransportConfig(connect_timeout=2.0, read_timeout=10.0))
        by_id = dict(zip((x.id for x in members_of(m.servers)), m.servers))
        sb = superblock.read(self.transport, [s.url for s in m.servers])
        self.members = list(sb.servers)
        self.servers = [by_id[x.id] for x in self.members]  # BlockServer, in scrub order

    def listing(self, index: int) -> dict[str, dict]:
        """id -> {id, size, checksum} of every block server `index` holds."""
        found, after = {}, ""
        while True:
            page, after = self.transport.list_blocks(self.members[index], after, 1000)
            found.update((e["id"], e) for e in page)
            if after is None:
                return found

    def file_blocks(self, count: int) -> dict[str, str]:
        """id -> checksum of the file blocks (those of a full block size), once every
        server holds all `count` of them (a write returns at two copies of three)."""
        def settled():
            views = [{i: e["checksum"] for i, e in self.listing(n).items() if e["size"] == BS}
                     for n in range(len(self.members))]
            return views[0] if all(v == views[0] and len(v) == count for v in views) else None
        return wait_until(settled, f"{count} file blocks on every server", timeout=60,
                          interval=0.2)


def scrub_cmd(m, state: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "fusefs", "scrub", *m.cluster_args(), "--state", state,
            "--json", *args]


def scrub(m, state: str, *args: str) -> tuple[int, dict]:
    result = subprocess.run(scrub_cmd(m, state, *args), capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode in (0, 1), f"scrub could not finish:\n{result.stderr}"
    return result.returncode, json.loads(result.stdout)


def by_url(report: dict) -> dict[str, dict]:
    return {s["url"]: s for s in report["servers"]}


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def remount_from_servers(m) -> None:
    """Unmount, drop the local block cache (keep the metadata), mount: reads then come
    from the servers."""
    m.umount()
    for entry in os.listdir(m.cache_dir):
        blocks = os.path.join(m.cache_dir, entry, "blocks")
        if os.path.isdir(blocks):
            shutil.rmtree(blocks)
    m.mount()


# -- tests --------------------------------------------------------------------------------------

def test_scrub_finds_and_repairs_every_bad_copy(fusefs_mount, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    expected = write_files(m.path, files=4, blocks=3, seed=1)
    c = Cluster(m)
    sums = c.file_blocks(12)
    a, b, e, x, d, f = sorted(sums)[:6]
    # Different blocks on each server, one block (e) bad on two servers, and one copy (d)
    # whose damage hit the checksum in its header rather than its bytes.
    damage = [[a, b, e], [x, d, e], [f]]
    for index, ids in enumerate(damage):
        for block_id in ids:
            flip(c.servers[index], block_id, offset=9 if block_id == d else HEADER.size + 100)
    listed = [len(c.listing(n)) for n in range(3)]
    state = str(tmp_path / "scrub.json")

    status, report = scrub(m, state)

    assert status == 0, report
    assert report["complete"] and report["totals"]["unrepairable"] == 0, report
    found = by_url(report)
    for index, ids in enumerate(damage):
        counts = found[c.servers[index].url]
        assert (counts["corrupt"], counts["repaired"], counts["unrepairable"]) == \
            (len(ids), len(ids), 0), (index, counts)
        assert counts["finished"] and counts["error"] is None, counts
    # e's copy on the second server was found bad (and repaired) while the first server's
    # copy was repaired from the others: that server's own walk then verified it intact.
    own_walk = [3, 2, 1]
    for index in range(3):
        assert found[c.servers[index].url]["checked"] == listed[index] - own_walk[index]
    for block_id, checksum in sums.items():
        for server in c.servers:
            assert intact(server, block_id, checksum), (server.url, block_id)
    last = load(state)["last"]
    assert (last["corrupt"], last["repaired"], last["unrepairable"]) == (7, 7, 0), last
    assert last["finished"] is not None and load(state)["pass"] is None

    status, report = scrub(m, state)  # a new pass: nothing left to find
    assert status == 0, report
    assert report["totals"]["corrupt"] == 0, report
    assert [s["resumed_from"] for s in report["servers"]] == ["", "", ""]
    assert report["totals"]["checked"] == sum(len(c.listing(n)) for n in range(3))

    remount_from_servers(m)
    check_files(m.path, expected)


def test_reads_return_good_data_while_copies_are_bad_and_while_scrub_repairs(fusefs_mount,
                                                                               tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    expected = write_files(m.path, files=3, blocks=4, seed=2)
    c = Cluster(m)
    sums = c.file_blocks(12)
    for n, block_id in enumerate(sorted(sums)):  # every block has a bad copy, some two
        flip(c.servers[n % 3], block_id)
        if n % 4 == 0:
            flip(c.servers[(n + 1) % 3], block_id)
    remount_from_servers(m)

    check_files(m.path, expected)  # read from the servers, past the bad copies

    state = str(tmp_path / "scrub.json")
    proc = subprocess.Popen(scrub_cmd(m, state, "--rate", "256KiB"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        rounds = 0
        while proc.poll() is None or rounds == 0:
            check_files(m.path, expected)
            rounds += 1
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out)["totals"]["unrepairable"] == 0

    status, report = scrub(m, state)
    assert status == 0 and report["totals"]["corrupt"] == 0, report
    for block_id, checksum in sums.items():
        for server in c.servers:
            assert intact(server, block_id, checksum), (server.url, block_id)
    remount_from_servers(m)
    check_files(m.path, expected)


def test_a_block_bad_on_every_server_is_reported_unrepairable(fusefs_mount, tmp_path):
    m = fusefs_mount(mkfs=MKFS)
    write_files(m.path, files=2, blocks=2, seed=3)
    c = Cluster(m)
    sums = c.file_blocks(4)
    lost, bad_once = sorted(sums)[:2]
    for server in c.servers:
        flip(server, lost)
    flip(c.servers[2], bad_once)
    state = str(tmp_path / "scrub.json")

    status, report = scrub(m, state)

    assert status == 1, report
    assert report["complete"], report
    for server in c.servers:  # each copy of it is bad and none can be repaired
        counts = by_url(report)[server.url]
        assert counts["unrepairable_ids"] == [lost], counts
        assert counts["unrepairable"] == 1, counts
    assert report["totals"]["unrepairable"] == 3
    assert report["totals"]["repaired"] == 1  # the other block, from its good copies
    assert intact(c.servers[2], bad_once, sums[bad_once])
    assert load(state)["last"]["unrepairable_ids"] == [lost]
    for server in c.servers:  # never "repaired" with other bytes
        assert not os.path.exists(block_file(server, lost))


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_an_interrupted_scrub_resumes_after_its_cursor(fusefs_mount, tmp_path, how):
    m = fusefs_mount(mkfs=MKFS)
    write_files(m.path, files=4, blocks=4, seed=4)
    c = Cluster(m)
    sums = c.file_blocks(16)
    first = c.members[0].id
    last_id = max(c.listing(0))  # walked last on the first server
    if last_id in sums:
        flip(c.servers[0], last_id)
    else:  # a metadata block: damage the last file block instead, also after the cursor
        last_id = max(sums)
        flip(c.servers[0], last_id)
    listed = sorted(c.listing(0))
    state = str(tmp_path / "scrub.json")

    # A suite started in the background by a shell (`cmd &`) ignores SIGINT, and Python
    # keeps an ignored SIGINT ignored: the scrub must get the disposition a terminal gives.
    proc = subprocess.Popen(scrub_cmd(m, state, "--rate", "64KiB"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        def progressed():
            try:
                return load(state)["pass"]["servers"][first]["cursor"]
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                return None
        wait_until(progressed, "the scrub to record progress", timeout=60)
        proc.send_signal(how)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (130 if how == signal.SIGINT else -signal.SIGKILL)
    stopped = load(state)["pass"]["servers"][first]
    cursor = stopped["cursor"]
    done_before = [i for i in listed if i <= cursor]
    assert done_before and cursor < last_id  # interrupted on the way
    assert stopped["checked"] == len(done_before) and not stopped["done"]

    status, report = scrub(m, state)

    assert status == 0, report
    counts = by_url(report)[c.servers[0].url]
    assert counts["resumed_from"] == cursor
    # Only the ids after the cursor were verified in this run, and the damage was found.
    assert counts["checked"] + counts["corrupt"] == len(listed) - len(done_before), counts
    assert (counts["corrupt"], counts["repaired"]) == (1, 1), counts
    last = load(state)["last"]
    assert last["checked"] == report["totals"]["checked"] + len(done_before)
    assert (last["corrupt"], last["repaired"]) == (1, 1)
    assert intact(c.servers[0], last_id, c.listing(1)[last_id]["checksum"])


def test_the_mount_scrubs_in_the_background(fusefs_mount):
    m = fusefs_mount(mkfs=MKFS)
    expected = write_files(m.path, files=2, blocks=3, seed=5)
    c = Cluster(m)
    sums = c.file_blocks(6)
    m.umount()
    bad = sorted(sums)[:3]
    for index, block_id in enumerate(bad):
        flip(c.servers[index], block_id)
    m.mount("--scrub-interval", "3600")
    fs_id = superblock.read(c.transport, [s.url for s in m.servers]).fs_id
    state = os.path.join(m.cache_dir, fs_id, "scrub.json")

    def finished():
        try:
            return load(state)["last"]
        except (FileNotFoundError, ValueError, KeyError):
            return None
    last = wait_until(finished, "the background scrub to finish a pass", timeout=120,
                      interval=0.2)

    assert (last["corrupt"], last["repaired"], last["unrepairable"]) == (3, 3, 0), last
    for block_id in bad:
        for server in c.servers:
            assert intact(server, block_id, sums[block_id]), (server.url, block_id)
    check_files(m.path, expected)

    def shown():  # `fusefs status` shows the pass once the mount's status file has it
        status = json.loads(m.cli("status", m.path, "--json", check=False).stdout)
        health = status[0].get("health") or {}
        assert isinstance(health.get("scrub_running"), bool), health  # the scrubber's own
        scrubbed = health.get("last_scrub") or {}
        return scrubbed if scrubbed.get("finished") else None
    scrubbed = wait_until(shown, "status to show the last scrub", timeout=60, interval=0.2)
    assert (scrubbed["found"], scrubbed["fixed"], scrubbed["unrepairable"]) == (3, 3, 0)
    assert "last scrub" in m.cli("status", m.path, check=False).stdout


def test_blocks_a_server_leaves_for_another_request_are_asked_again(blockservers, tmp_path):
    """Servers that verify at most ~160 KiB per request answer the rest 413: the scrubber
    asks again until every copy was verified (in-process, without a filesystem)."""
    from blockserver import protocol
    from fusefs.scrub import Scrubber, last_scrub

    servers = blockservers(3, args=["--max-batch-size", "160KiB"])
    members = members_of(servers)
    transport = Transport(TransportConfig(connect_timeout=2.0, read_timeout=10.0))
    rng = random.Random(6)
    blocks = {}
    for _ in range(10):
        data = rng.randbytes(BS)
        block_id, checksum = protocol.new_block_id(), protocol.checksum(data)
        blocks[block_id] = checksum
        for member in members:
            transport.put_block(member, block_id, data, checksum)
    bad = sorted(blocks)[3:5]
    for block_id in bad:
        flip(servers[0], block_id)
    answered = []
    ask = transport.batch_check

    def counted(member, ids, verify=False):
        found = ask(member, ids, verify)
        answered.extend(e["status"] for e in found)
        return found
    transport.batch_check = counted
    state = str(tmp_path / "scrub.json")
    scrubber = Scrubber(transport, lambda: members, state, "some-fs")

    report = scrubber.run_pass()

    assert report.complete and report.exit_status == 0
    assert protocol.TOO_LARGE in answered  # the servers did leave some for later
    counts = [(s.checked, s.corrupt, s.repaired) for s in report.servers]
    assert counts == [(8, 2, 2), (10, 0, 0), (10, 0, 0)], counts
    for block_id, checksum in blocks.items():
        for server in servers:
            assert intact(server, block_id, checksum), (server.url, block_id)
    stats = scrubber.stats()
    assert stats["running"] is False
    assert {k: v for k, v in stats["last_scrub"].items() if k != "finished"} == \
        {"checked": 28, "corrupt": 2, "repaired": 2, "unrepairable": 0, "found": 2, "fixed": 2}
    assert stats["last_scrub"]["finished"] is not None
    assert last_scrub(state, "some-fs") == stats["last_scrub"]
    assert last_scrub(state, "another-fs")["finished"] is None


def test_a_server_down_stops_the_pass_and_the_next_run_finishes_it(blockservers, tmp_path):
    """Exit 2 while a server cannot be reached (the others are scrubbed meanwhile); once
    it is back, the next run scrubs only it and ends the pass with exit 0."""
    servers = blockservers(3)
    urls = ",".join(s.url for s in servers)
    subprocess.run([sys.executable, "-m", "fusefs", "mkfs", "--servers", urls], check=True,
                   capture_output=True, cwd=REPO)
    transport = Transport(TransportConfig(connect_timeout=2.0, read_timeout=10.0))
    order = [x.id for x in superblock.read(transport, [s.url for s in servers]).servers]
    by_id = dict(zip((x.id for x in members_of(servers)), servers))
    down = by_id[order[1]]  # scrubbed second: the first before it, the third after it
    state = str(tmp_path / "scrub.json")
    command = [sys.executable, "-m", "fusefs", "scrub", "--servers", urls, "--state", state,
               "--json"]
    down.stop()

    first = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)

    assert first.returncode == 2, first.stderr
    report = json.loads(first.stdout)
    assert not report["complete"]
    assert [s["finished"] for s in report["servers"]] == [True, False, True]
    assert report["servers"][1]["error"] and "cannot reach" in report["servers"][1]["error"]
    assert report["servers"][0]["checked"] > 0 and report["servers"][2]["checked"] > 0

    down.start()
    second = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)

    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["complete"]
    checked = [s["checked"] for s in report["servers"]]
    assert checked[0] == 0 and checked[2] == 0 and checked[1] > 0, report  # only the one left
    assert load(state)["last"]["checked"] == sum(s["checked"] for s in json.loads(
        first.stdout)["servers"]) + checked[1]
