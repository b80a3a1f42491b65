"""Membership edits and the operator commands' exit statuses, without servers; and the
repair's guard against deleting hand-offs by a membership that changed under it."""

from __future__ import annotations

import pytest

from fusefs import cli, membership
from fusefs.antientropy import Repairer
from fusefs.health import Health
from fusefs.placement import rank
from fusefs.superblock import Superblock
from fusefs.transport import Member

A, B, C, D, E = (Member(f"s{i}", f"http://127.0.0.1:{7000 + i}") for i in range(5))


def _sb(members, leaving=()) -> Superblock:
    return Superblock("fs", 1 << 20, 3, 2, tuple(members), leaving=tuple(leaving))


def test_remove_moves_a_member_to_leaving_and_refuses_to_go_below_r():
    sb = membership.removing(D)(_sb([A, B, C, D]))
    assert (sb.members, sb.leaving) == ((A, B, C), (D,))
    assert sb.servers == (A, B, C, D)
    with pytest.raises(membership.MembershipError, match="3 copies"):
        membership.removing(C)(sb)


def test_replace_puts_the_new_server_in_place_and_drains_the_old_one():
    sb = membership.replacing(B, E)(_sb([A, B, C, D]))
    heir = sb.members[1]
    assert (heir.id, heir.url, heir.key) == (E.id, E.url, B.id)  # ranked in B's place
    assert (sb.members, sb.leaving) == ((A, heir, C, D), (B,))
    for n in range(200):  # exactly B's blocks are homed on E
        block = f"{n:032x}"
        homes = [m.id for m in rank(block, sb.members)[:3]]
        before = [m.id for m in rank(block, [A, B, C, D])[:3]]
        assert homes == [E.id if m == B.id else m for m in before]
    assert membership.departed(B)(sb).leaving == ()
    with pytest.raises(membership.MembershipError, match="already"):
        membership.replacing(A, C)(sb)
    with pytest.raises(membership.MembershipError, match="took its place"):
        membership.adding(B)(membership.departed(B)(sb))  # its slot belongs to E now
    again = Superblock.decode(sb.encode(), 2)  # the slot survives the superblock
    assert again.members == sb.members and again.members[1].key == B.id
    assert b'"slot"' not in _sb([A, B, C]).encode()  # (absent where it is the id)


def test_add_refuses_a_server_already_there_even_while_it_leaves():
    sb = _sb([A, B, C], leaving=[D])
    with pytest.raises(membership.MembershipError, match="already"):
        membership.adding(D)(sb)
    assert membership.adding(E)(sb).members == (A, B, C, E)
    assert membership.find(sb, D.url) == D and membership.find(sb, "s1") == B
    with pytest.raises(membership.MembershipError, match="not a server"):
        membership.find(sb, "http://elsewhere:1")


@pytest.mark.parametrize("argv", [["repair"], ["servers", "list"], ["servers", "add"],
                                  ["scrub"], ["gc"]])
def test_a_command_that_cannot_run_exits_2_not_its_result_status(argv, monkeypatch, capsys):
    monkeypatch.delenv("FUSEFS_SERVERS", raising=False)
    assert cli.main(argv) == 2
    assert "fusefs" in capsys.readouterr().err


class _Store:
    """Just what a Repairer reads of its store, for the membership guard."""

    def __init__(self, members):
        self.members, self.leaving = list(members), []
        self.servers = self.members
        self.transport = None
        self.health = Health([m.id for m in members])
        self.adopted = []

    def on_damage(self, listener) -> None:
        pass

    def set_membership(self, members, leaving=()) -> bool:
        changed = (list(members), list(leaving)) != (self.members, self.leaving)
        self.members, self.leaving = list(members), list(leaving)
        self.adopted.append((self.members, self.leaving))
        return changed


def test_hand_offs_judged_by_an_old_membership_are_not_deleted():
    """The writer's store may adopt a new membership (at a lease renewal) between a
    survey and its deletes: the deletes compare with what the survey judged by."""
    store = _Store([A, B, C, D])
    view = {"now": ([A, B, C, D], [])}
    repairer = Repairer(store, dict, membership=lambda: view["now"])
    assert repairer._view_current()
    store.set_membership([A, B, C], [D])  # a renewal adopted the drain of D
    view["now"] = ([A, B, C], [D])
    assert not repairer._view_current()


def test_the_daemon_log_is_rotated_by_size_and_stderr_follows_it(tmp_path):
    """Years of running (or a loop that fails and says so every minute) keep the log
    directory bounded: fusefs.log plus LOG_BACKUPS moved files of at most LOG_BYTES. The
    background daemon's stderr is the log file; after a rotation what it writes (libfuse's
    messages, a crash's traceback) lands in the new fusefs.log, not the moved one. Run in
    a child process, whose stderr is the log as the daemon's is."""
    import subprocess
    import sys

    log = tmp_path / "fusefs.log"
    program = f"""
import logging, os, sys
from fusefs.cli import DaemonLog
handler = DaemonLog({str(log)!r}, max_bytes=20_000, backups=2)
logging.basicConfig(level=logging.INFO, handlers=[handler], format="%(message)s")
for i in range(2000):
    logging.getLogger("x").info("line %05d %s", i, "." * 40)
os.write(2, b"from stderr after the rotations\\n")
"""
    with open(log, "ab") as out:
        done = subprocess.run([sys.executable, "-c", program], stdout=out, stderr=out,
                              cwd=cli.__file__.rsplit("/fusefs/", 1)[0], timeout=60)
    assert done.returncode == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fusefs.log", "fusefs.log.1", "fusefs.log.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 20_000 + 200, p
        assert p.stat().st_mode & 0o077 == 0, p
    text = log.read_text()
    assert "line 01999" in text and text.rstrip().endswith("from stderr after the rotations")


def test_lines_the_log_file_cannot_take_go_to_the_system_log(tmp_path, capsys):
    """On a disk too full for the log file (/dev/full here), a line goes to the system
    log socket if there is one; if there is none it is dropped without a report on
    stderr (which is that same file for the daemon)."""
    import logging
    import socket

    address = str(tmp_path / "log.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(10)
    logger = logging.getLogger("fusefs.test-full-disk")
    logger.propagate = False
    handlers = [cli.DaemonLog("/dev/full", syslog=address),
                cli.DaemonLog("/dev/full", syslog=str(tmp_path / "no-such-socket"))]
    try:
        logger.addHandler(handlers[0])
        logger.warning("the disk under the cache is full")
        got = listener.recv(4096)
        logger.removeHandler(handlers[0])
        logger.addHandler(handlers[1])
        logger.warning("said to no one")
    finally:
        listener.close()
        for handler in handlers:
            logger.removeHandler(handler)
            try:
                handler.close()
            except OSError:
                pass  # /dev/full refuses the last flush too
    assert b"fusefs[" in got and \
        b"WARNING fusefs.test-full-disk: the disk under the cache is full" in got
    assert "Logging error" not in capsys.readouterr().err
