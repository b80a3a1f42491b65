"""Self-healing with real servers and real mounts: the background anti-entropy repair,
`fusefs repair`, `fusefs servers replace/remove/add` online, and `fusefs status`.

Placement is checked independently of the repair code: every server is listed and each
live block's homes are ranked here with fusefs.placement.rank, so a repair that judged
itself wrongly would fail these tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


from fusefs import admin
from fusefs.placement import rank
from fusefs.progress import Progress
from fusefs.transport import Transport, TransportConfig
from tests.support import REPO, WriteLoad, members_of, sha256_of, wait_until

LEASE = ["--lease-seconds", "6"]  # a drain waits one lease time for the writer to see it
# Tests that wait for the mounted writer's first repair pass ask for it at once (the
# default waits 30 s, a mount's first seconds being its user's).
REPAIR_SOON = ["--repair-delay", "0"]


def _transport() -> Transport:
    return Transport(TransportConfig(connect_timeout=2.0, read_timeout=10.0))


def live_blocks(m) -> dict[str, str]:
    """{block id: checksum} of every file block the cluster's metadata names, and the
    membership: what a new mount would load."""
    with admin.cluster_for(_transport(), [s.url for s in m.servers if s.running]) as cluster:
        with tempfile.TemporaryDirectory() as work:
            wanted, _ = admin._wanted(cluster, work, Progress("test", quiet=True))
        return {b: c for b, c in wanted.items() if c is not None}, cluster.sb


def holdings(servers) -> dict[str, dict[str, str]]:
    """server id -> {block id: checksum} listed by each running server."""
    transport, found = _transport(), {}
    running = [s for s in servers if s.running]
    for member in members_of(running):
        blocks, after = {}, ""
        while True:
            page, after = transport.list_blocks(member, after, 5000)
            blocks.update((b["id"], b["checksum"]) for b in page)
            if not after:
                break
        found[member.id] = blocks
    return found


def misplaced(m, replicas: int = 3) -> list[str]:
    """Every way a live block is not exactly on its R homes, healthy (empty: all good)."""
    wanted, sb = live_blocks(m)
    held = holdings(m.servers)
    problems = []
    for block_id, checksum in wanted.items():
        homes = {h.id for h in rank(block_id, sb.members)[:replicas]}
        on = {s for s, blocks in held.items() if blocks.get(block_id) == checksum}
        if on != homes:
            problems.append(f"{block_id}: on {sorted(on)}, homes {sorted(homes)}")
    return problems


def copies(servers, block_ids) -> dict[str, int]:
    held = holdings(servers)
    return {b: sum(1 for blocks in held.values() if b in blocks) for b in block_ids}


def _write_files(root: str, n: int, size: int = 200_000) -> dict[str, str]:
    files = {}
    for i in range(n):
        path = os.path.join(root, f"f{i}.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(size + i))
            f.flush()
            os.fsync(f.fileno())
        files[path] = sha256_of(path)
    return files


def _check(files: dict[str, str]) -> None:
    for path, digest in files.items():
        assert sha256_of(path) == digest, path


def _status(m) -> tuple[int, dict]:
    result = m.cli("status", "--json", m.path, check=False)
    return result.returncode, json.loads(result.stdout)[0]


def test_the_reported_scenario_heals_without_any_command(fusefs_mount):
    """3 servers, R=3, W=2: a server hangs while 30 files are written and fsynced, is
    killed and restarted on its data, and the client is unmounted and mounted again in
    between. The copies it missed were only ever remembered in the client's memory; the
    mounted writer's background repair finds and restores every one."""
    m = fusefs_mount(mount=LEASE)
    m.servers[2].pause()
    files = _write_files(m.path, 30, 120_000)
    m.servers[2].kill()
    m.umount()  # the client restarts: whatever it remembered is gone
    m.servers[2].restart()
    assert misplaced(m), "the scenario should leave copies missing"
    m.mount(*LEASE, *REPAIR_SOON)
    wait_until(lambda: not misplaced(m), "every live block has its 3 copies", timeout=90)
    _check(files)
    wait_until(lambda: _status(m)[1]["under_replicated"] == 0, "status shows 0", timeout=30)


def test_replace_a_dead_server_while_a_writer_writes(fusefs_mount, blockservers):
    """4 servers, R=3: one dies for good while a writer keeps writing; an empty server
    replaces it online; afterwards every live block is on exactly its 3 homes, every file
    reads back, and the writer never saw an error."""
    m = fusefs_mount(servers=4, mount=LEASE)
    before = _write_files(m.path, 10)
    dead = m.servers[1]
    with WriteLoad(os.path.join(m.path, "w")) as writer:
        wait_until(lambda: len(writer.written) >= 3, "the writer writes")
        dead.kill()
        wait_until(lambda: len(writer.written) >= 8, "the writer goes on without it")
        new = blockservers(1)[0]
        old_url = dead.url
        m.servers.append(new)
        result = m.cli("servers", "replace", old_url, new.url, "--servers",
                       ",".join(s.url for s in m.servers if s.running), check=False,
                       timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: len(writer.written) >= 14, "the writer goes on after it")
    assert writer.errors == []
    m.servers.remove(dead)
    listed = json.loads(m.cli("servers", "list", "--servers", m.urls, "--json").stdout)
    assert old_url not in [r["url"] for r in listed["servers"]]  # dropped once healthy
    m.cli("repair", "--servers", m.urls)  # (what the mount writes meanwhile, too)
    assert misplaced(m) == []
    _check(before)
    _check(writer.written)
    m.umount()
    m.mount(*LEASE)
    _check(writer.written)


def test_drain_while_writing_never_leaves_a_block_below_r(fusefs_mount):
    """Removing a server drains it first: it ends empty, and no block (sampled all along)
    ever had fewer than 3 copies."""
    m = fusefs_mount(servers=4, mount=LEASE)
    files = _write_files(m.path, 12)
    wanted, _ = live_blocks(m)
    leaving = m.servers[0]
    low = []
    with WriteLoad(os.path.join(m.path, "w")) as writer:
        wait_until(lambda: len(writer.written) >= 2, "the writer writes")
        drain = subprocess.Popen([sys.executable, "-m", "fusefs", "servers", "remove",
                                  leaving.url, "--servers", m.urls], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while drain.poll() is None:
                low += [b for b, n in copies(m.servers, wanted).items() if n < 3]
                time.sleep(0.3)
        finally:
            if drain.poll() is None:
                drain.kill()
        out, err = drain.communicate()
        assert drain.returncode == 0, out + err
    assert low == []
    assert writer.errors == []
    assert holdings([leaving])[members_of([leaving])[0].id] == {}
    m.servers.remove(leaving)
    m.cli("repair", "--servers", m.urls)
    assert misplaced(m) == []
    _check(files)
    _check(writer.written)
    result = m.cli("servers", "list", "--servers", m.urls, "--json")
    assert leaving.url not in result.stdout


def test_adding_a_server_moves_only_blocks_whose_homes_changed(fusefs_mount, blockservers):
    m = fusefs_mount(servers=3, mount=LEASE)
    files = _write_files(m.path, 20)
    new = blockservers(1)[0]
    m.servers.append(new)
    result = m.cli("servers", "add", new.url, "--servers", m.urls, "--json")
    report = json.loads(result.stdout)
    wanted, sb = live_blocks(m)
    homed_on_new = [b for b in wanted if members_of([new])[0] in rank(b, sb.members)[:3]]
    assert homed_on_new and len(homed_on_new) < len(wanted)
    assert report["copied"] <= len(homed_on_new) + 10  # (+ journal and checkpoint blocks)
    assert misplaced(m) == []
    _check(files)


def test_status_shows_a_stopped_server_and_under_replication(fusefs_mount):
    m = fusefs_mount(mount=[*LEASE, *REPAIR_SOON])
    _write_files(m.path, 5)
    wait_until(lambda: _status(m)[1]["under_replicated"] == 0, "a first survey")
    code, status = _status(m)
    assert code == 0 and status["healthy"] and status["errors"] == []
    assert {"servers", "dirty_bytes", "under_replicated", "errors"} <= set(status)
    stopped = m.servers[1]
    stopped.stop()
    wait_until(lambda: _status(m)[0] == 1, "status fails", timeout=20)
    code, status = _status(m)
    down = [s for s in status["servers"] if not s["up"]]
    assert [s["url"] for s in down] == [stopped.url]
    wait_until(lambda: (_status(m)[1]["under_replicated"] or 0) > 0, "under-replicated rises",
               timeout=20)
    stopped.restart()
    wait_until(lambda: _status(m)[0] == 0, "status healthy again", timeout=60)
    assert _status(m)[1]["under_replicated"] == 0
    shown = m.cli("status", m.path).stdout
    assert "under-replicated blocks: 0 of" in shown and "copies it should" in shown, shown
    assert shown.count(" used of ") == 3, shown
    cluster = m.cli("status", "--servers", m.urls, "--json")
    assert json.loads(cluster.stdout)["under_replicated"] == 0


def test_repair_command_restores_lost_copies_and_its_exit_status_says_so(fusefs_mount):
    """Copies deleted behind the servers' backs (a disk replaced, files lost) are found
    by `fusefs repair --check` (exit 1) and restored by `fusefs repair` (exit 0)."""
    m = fusefs_mount()
    files = _write_files(m.path, 6)
    m.umount()  # no background repair: only the command
    victim = m.servers[0]
    victim.stop()
    blocks = os.path.join(victim.data_dir, "blocks")
    removed = 0
    for prefix in os.listdir(blocks):
        for name in os.listdir(os.path.join(blocks, prefix)):
            os.unlink(os.path.join(blocks, prefix, name))
            removed += 1
    assert removed
    victim.start()
    check = m.cli("repair", "--servers", m.urls, "--check", "--json", check=False)
    assert check.returncode == 1, check.stderr
    assert json.loads(check.stdout)["survey"]["under_replicated"] > 0
    result = m.cli("repair", "--servers", m.urls, "--json", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["copied"] >= 6
    assert misplaced(m) == []
    assert m.cli("repair", "--servers", m.urls, "--check", check=False).returncode == 0
    m.mount()
    _check(files)


def test_a_server_down_for_long_has_its_copies_rebuilt_elsewhere_and_moved_back(fusefs_mount):
    """4 servers, R=3, `--rehome-after 2`: once a server has been down that long, every
    block gets 3 copies on the servers still up; when it returns, copies go back home and
    the extra ones are deleted."""
    m = fusefs_mount(servers=4, mount=[*LEASE, *REPAIR_SOON, "--rehome-after", "2"])
    files = _write_files(m.path, 12)
    wait_until(lambda: _status(m)[1]["under_replicated"] == 0, "a first survey")
    down = m.servers[3]
    down.stop()
    wanted, _ = live_blocks(m)

    def three_copies_up() -> bool:
        return all(n >= 3 for n in copies(m.servers, wanted).values())

    wait_until(three_copies_up, "3 copies of every block on the servers still up", timeout=60)
    wait_until(lambda: _status(m)[1]["under_replicated"] == 0, "status agrees", timeout=30)
    assert _status(m)[0] == 1  # a server is still down: not healthy
    down.start()
    wait_until(lambda: not misplaced(m), "copies back on their homes only", timeout=90)
    _check(files)


def test_a_membership_change_with_another_server_down_does_not_claim_success(
        fusefs_mount, blockservers):
    """`servers add` while another member is down cannot give every block its copies on
    its homes: it says so and exits 1 (the change itself stands; run it again later)."""
    m = fusefs_mount(servers=4)
    _write_files(m.path, 4)
    m.umount()
    m.servers[0].stop()
    new = blockservers(1)[0]
    result = m.cli("servers", "add", new.url, "--servers",
                   ",".join(s.url for s in m.servers if s.running), check=False, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "could not be listed" in result.stderr
    m.servers[0].start()
    m.servers.append(new)
    assert m.cli("repair", "--servers", m.urls, check=False).returncode == 0
    assert misplaced(m) == []
