"""The metadata journal without FUSE: records and their replay, journal segments, finding
blocks whose checksum is not known in advance, the superblock's compare-and-swap, and a
writer's journal (shipping, checkpoints, the lease, fencing) on real block-server processes.

Nothing here mounts anything: a "machine" is a directory with its own metadata database,
and a "mount" is a `journal.Journal` over a `ReplicatedStore`.
"""

from __future__ import annotations

import json
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from blockserver import protocol
from fusefs import cli, errors, journal, superblock
from fusefs.checkpoint import checkpoint_blocks, write_checkpoint
from fusefs.host import new_mount_id
from fusefs.lease import Lease, acquire, new_lease
from fusefs.loading import open_metadata, replay_chain
from fusefs.memstore import MemoryBlockStore
from fusefs.metadata import (ROOT_INO, BlockRef, JournalGap, Metadata, decode_record,
                             encode_record)
from fusefs.segments import (SEGMENT_MAGIC, decode_segment, encode_segment, read_segment,
                             segment_id)
from fusefs.transport import Member, Transport, TransportConfig

from .support import members_of, wait_until

# -- helpers ----------------------------------------------------------------------------------

TABLES = {"inodes": "ino", "dentries": "parent, name", "blocks": "ino, idx",
          "xattrs": "ino, name", "garbage": "block_id"}


def dump(md: Metadata) -> dict[str, list[tuple]]:
    """Every row of every table that a checkpoint or the journal carries, in key order."""
    return {table: md.query(f"SELECT * FROM {table} ORDER BY {key}")
            for table, key in TABLES.items()}


NAMES = [b"a", b"b", b"c", b"\xff\xfe", b"caf\xc3\xa9", b"line\nbreak", b"\x80\x81\x82", b" "]
XATTR_NAMES = [b"user.a", b"user.\xff\xfe", b"trusted.t"]


class Workload:
    """Random but reproducible metadata changes, each one a filesystem could make."""

    def __init__(self, md: Metadata, seed: int):
        self.md = md
        self.rng = random.Random(seed)
        self.removed: list[int] = []  # inode numbers removed, for uploads that finish late

    def run(self, count: int) -> None:
        made = 0
        while made < count:
            if self.change():
                made += 1

    def _ids(self, sql: str, args=()) -> list[int]:
        return [row[0] for row in self.md.query(sql, args)]

    def _remove(self, ino: int) -> None:
        self.md.remove_inode(ino)
        self.removed.append(ino)

    def change(self) -> bool:
        """Make one random change; False when the one picked does not apply right now."""
        md, rng = self.md, self.rng
        live = f"(mode & {0o170000}) = ? AND nlink > 0 ORDER BY ino"  # of a type, not orphaned
        dirs = self._ids(f"SELECT ino FROM inodes WHERE {live}", (stat.S_IFDIR,))
        files = self._ids(f"SELECT ino FROM inodes WHERE {live}", (stat.S_IFREG,))
        inodes = self._ids("SELECT ino FROM inodes ORDER BY ino")
        entries = md.query("SELECT d.parent, d.name, d.ino, i.mode FROM dentries d "
                           "JOIN inodes i ON i.ino = d.ino ORDER BY d.parent, d.name")
        t = rng.randrange(1, 1 << 62)
        op = rng.choice(["file", "file", "dir", "symlink", "link", "unlink", "unlink", "rename",
                         "rename", "rename", "attrs", "xattr", "rmxattr", "commit", "commit",
                         "truncate", "punch", "late_commit", "reap"])
        if op in ("file", "dir", "symlink"):
            parent, name = rng.choice(dirs), rng.choice(NAMES)
            if md.lookup(parent, name) is not None:
                return False
            mode = {"file": stat.S_IFREG | 0o644, "dir": stat.S_IFDIR | 0o755,
                    "symlink": stat.S_IFLNK | 0o777}[op]
            target = rng.randbytes(rng.randrange(1, 16)) if op == "symlink" else None
            md.create(parent, name, mode, rng.randrange(5000), rng.randrange(5000),
                      target=target)
        elif op == "link":
            parent, name = rng.choice(dirs), rng.choice(NAMES)
            if not files or md.lookup(parent, name) is not None:
                return False
            md.link(rng.choice(files), parent, name)
        elif op == "unlink":
            if not entries:
                return False
            parent, name, ino, mode = rng.choice(entries)
            is_dir = stat.S_ISDIR(mode)
            if is_dir and md.has_children(ino):
                return False
            if md.unlink(parent, name, ino, is_dir) <= 0 and rng.random() < 0.8:
                self._remove(ino)  # else it stays an orphan (open when its last name went)
        elif op == "rename":
            if not entries:
                return False
            parent, name, ino, mode = rng.choice(entries)
            is_dir = stat.S_ISDIR(mode)
            new_parent, new_name = rng.choice(dirs), rng.choice(NAMES)
            if is_dir and md.is_ancestor(ino, new_parent):
                return False
            replaced = md.lookup(new_parent, new_name)
            replaced_is_dir = False
            if replaced is not None:
                if replaced == ino:
                    return False
                replaced_is_dir = md.inode(replaced).is_dir
                if replaced_is_dir != is_dir or (replaced_is_dir and md.has_children(replaced)):
                    return False
            left = md.rename(parent, name, new_parent, new_name, ino, is_dir, replaced,
                             replaced_is_dir)
            if replaced is not None and left <= 0:
                self._remove(replaced)
        elif op == "attrs":
            ino = rng.choice(inodes)
            inode = md.inode(ino)
            fields = {}
            if rng.random() < 0.5:
                fields["mode"] = stat.S_IFMT(inode.mode) | rng.randrange(0o7777)
            for key in ("uid", "gid"):
                if rng.random() < 0.4:
                    fields[key] = rng.randrange(5000)
            for key in ("atime_ns", "mtime_ns", "ctime_ns"):
                if rng.random() < 0.4:
                    fields[key] = t
            if stat.S_ISREG(inode.mode) and rng.random() < 0.3:
                fields["size"] = rng.randrange(1 << 30)
            if not fields:
                return False
            md.set_attrs(ino, **fields)
        elif op == "xattr":
            md.set_xattr(rng.choice(inodes), rng.choice(XATTR_NAMES),
                         rng.randbytes(rng.randrange(0, 40)))
        elif op == "rmxattr":
            rows = md.query("SELECT ino, name FROM xattrs ORDER BY ino, name")
            if not rows:
                return False
            assert md.remove_xattr(*rng.choice(rows))
        elif op in ("commit", "late_commit"):
            if op == "commit" and files:
                ino = rng.choice(files)
            elif op == "late_commit" and self.removed:
                ino = rng.choice(self.removed)  # the upload finished after the file went
            else:
                return False
            refs = {i: BlockRef(rng.randbytes(16).hex(), rng.randbytes(16).hex(),
                                rng.randrange(1, 65537))
                    for i in rng.sample(range(8), rng.randrange(1, 4))}
            md.commit_blocks(ino, refs, rng.randrange(1 << 20), t, t)
        elif op == "truncate":
            if not files:
                return False
            keep = rng.randrange(0, 8)
            last = rng.choice([None, rng.randrange(1, 4096)]) if keep else None
            md.truncate_blocks(rng.choice(files), keep, rng.randrange(1 << 20), t, last)
        elif op == "punch":
            if not files:
                return False
            first = rng.randrange(0, 8)
            md.punch_blocks(rng.choice(files), first, first + rng.randrange(1, 4), t)
        elif op == "reap":
            orphans = md.orphans()
            if not orphans:
                return False
            self._remove(rng.choice(orphans))
        return True


def records_of(md: Metadata) -> list[tuple[int, str, list]]:
    """The decoded journal records a database holds that were not shipped yet."""
    return [decode_record(raw) for _, raw in md.unshipped(0, 1_000_000)]


def new_transport() -> Transport:
    return Transport(TransportConfig(connect_timeout=2.0, read_timeout=10.0))


def unreachable(member: Member) -> Member:
    """The same server id at a loopback port where nothing listens (a server that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return Member(member.id, f"http://127.0.0.1:{port}")


def assert_on_every_server(transport: Transport, members, sb: superblock.Superblock) -> None:
    """Every server holds exactly `sb`, so a majority read finds it with any one down."""
    for member in members:
        assert transport.register_get(member, superblock.REGISTER) == (sb.generation,
                                                                       sb.encode())
    for down in range(len(members)):
        view = [unreachable(m) if i == down else m for i, m in enumerate(members)]
        assert superblock.read_quorum(transport, view) == sb


def formatted(transport: Transport, members) -> superblock.Superblock:
    """A superblock (no checkpoint, no lease) written as generation 1 on every member."""
    return superblock.write_all(transport, superblock.new(members, 1 << 20, 3, 2), 1)


def blocks_on(transport: Transport, member: Member) -> set[str]:
    ids, after = set(), ""
    while True:
        page, after = transport.list_blocks(member, after)
        ids.update(b["id"] for b in page)
        if not after:
            return ids


# -- 1. records -------------------------------------------------------------------------------

@pytest.mark.parametrize("op, args", [
    ("format", [0, 0, 0o755, (1 << 63) - 1]),
    ("create", [5, 1, b"\xff\xfe", stat.S_IFREG | 0o644, 1000, 1000, 0, None, 123]),
    ("create", [6, 1, b"line\nbreak", stat.S_IFLNK | 0o777, 0, 0, 0, b"\x00\xff/x\n", 7]),
    ("commit_blocks", [7, [[0, "ab" * 16, "cd" * 16, 4096], [3, "ef" * 16, "01" * 16, 1]],
                       12288, 1, 2]),
    ("set_attrs", [7, {"mode": stat.S_IFREG | 0o600, "uid": 5, "size": 0}]),
    ("set_xattr", [7, b"user.\x80", b"", 9]),
    ("rename", [1, b"a", 2, b"\xc3(", 7, False, None, False, 3]),
    ("truncate_blocks", [7, 0, 0, 5, None]),
    # records are decoded without knowing the op's arguments: any nesting round-trips
    ("remove_dentry", [[b"\xff", [None, b"", ["deep", [b"\x00", 1.5, True]]]], {"k": [b"v"]}]),
])
def test_a_record_round_trips_with_bytes_none_and_nesting(op, args):
    raw = encode_record(42, op, args)
    assert b"\n" not in raw  # one record is one line of a segment
    assert decode_record(raw) == (42, op, args)
    assert decode_record(raw.decode()) == (42, op, args)
    # bytes come back as bytes, not as text: b"" != "" and b"a" != "a" in Python
    assert _types(decode_record(raw)[2]) == _types(args)


def _types(value):
    """The shape of a value: its types, all the way down."""
    if isinstance(value, list):
        return [_types(v) for v in value]
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    return type(value).__name__


@pytest.mark.parametrize("raw", [
    b"", b"   ", b"not json", b"\xff\xfe", b"\x80abc", b"5", b"null", b'"text"', b"[]",
    b'[1, "format"]', b'[1, "format", [], 4]', b'{"seq": 1, "op": "format", "args": []}',
    b'[1, "no_such_op", []]', b'[1, "_op_format", []]', b'[1, "FORMAT", []]', b"[1, 2, []]",
    b'[1, null, []]', b'["1", "format", []]', b'[1.5, "format", []]', b'[null, "format", []]',
    b'[1, "format", {}]', b'[1, "format", "abc"]', b'[1, "format", null]',
    b'[1, "create", [{"b": "abc"}]]', b'[1, "create", [{"b": 5}]]',
    b'[1, "format", [0, 0, 493, 1]', "[1, \"format\", [0, 0, 493, 1]]x",
])
def test_a_malformed_record_or_unknown_op_raises_value_error(raw):
    with pytest.raises(ValueError):
        decode_record(raw)


@pytest.mark.parametrize("raw", [b'[1, ["format"], []]', b'[1, {"x": 1}, []]',
                                 b'[true, "format", [0, 0, 493, 1]]'])
def test_a_record_with_a_non_string_op_or_a_boolean_seq_raises_value_error(raw):
    with pytest.raises(ValueError):
        decode_record(raw)


# -- 2. replay --------------------------------------------------------------------------------

ALL_OPS = {"format", "create", "link", "unlink", "rename", "set_attrs", "set_xattr",
           "remove_xattr", "commit_blocks", "truncate_blocks", "punch_blocks",
           "remove_inode"}


def test_replaying_the_journal_rebuilds_the_same_database(tmp_path):
    a = Metadata(str(tmp_path / "a.db"))
    a.format(uid=1000, gid=100)
    a.snapshot(str(tmp_path / "b.db"))  # b: the formatted state, as a checkpoint has it
    b = Metadata(str(tmp_path / "b.db"))
    c = Metadata(str(tmp_path / "c.db"))  # c: empty, replays from the format record on
    try:
        Workload(a, seed=20240611).run(400)
        records = records_of(a)
        assert [r[0] for r in records] == list(range(1, a.seq + 1))
        ops = {op for _, op, _ in records}
        assert ops >= ALL_OPS, ALL_OPS - ops  # the workload exercised every kind of change
        assert any(op == "rename" and args[6] is not None for _, op, args in records), \
            "no rename over an existing name"
        assert any(op == "commit_blocks" and a.inode(args[0]) is None for _, op, args in records)
        assert dump(a)["garbage"] and dump(a)["xattrs"] and dump(a)["blocks"]

        assert b.seq == 1
        assert b.replay(records, {"chain": "c1", "segment": "7"}) == len(records) - 1
        assert dump(b) == dump(a)
        assert b.seq == a.seq
        assert (b.setting("seq"), b.setting("shipped")) == (str(a.seq), str(a.seq))
        assert (b.setting("chain"), b.setting("segment")) == ("c1", "7")

        # in several batches, as segments arrive
        cuts = sorted(random.Random(7).sample(range(1, len(records)), 6))
        applied = [c.replay(records[lo:hi], {}) for lo, hi in
                   zip([0, *cuts], [*cuts, len(records)])]
        assert applied == [hi - lo for lo, hi in zip([0, *cuts], [*cuts, len(records)])]
        assert dump(c) == dump(a)

        # a replica continues with inode numbers past every replayed one
        top = max(r[0] for r in c.query("SELECT ino FROM inodes"))
        assert c.create(ROOT_INO, b"after replay", stat.S_IFREG | 0o644, 0, 0).ino == top + 1
    finally:
        for md in (a, b, c):
            md.close()


def test_replay_skips_records_it_has_and_refuses_a_gap_whole(tmp_path):
    a = Metadata(str(tmp_path / "a.db"))
    b = Metadata(str(tmp_path / "b.db"))
    try:
        a.format(uid=0, gid=0)
        Workload(a, seed=99).run(60)
        records = records_of(a)
        assert len(records) > 40

        assert b.replay(records[:20], {"segment": "2"}) == 20
        state = dump(b)
        assert b.replay(records[:20], {"segment": "3"}) == 0  # all at or below seq 20
        assert b.replay(records[5:12], {"segment": "3"}) == 0
        assert dump(b) == state and b.seq == 20
        assert b.replay(records[10:30], {"segment": "4"}) == 10  # the overlap is skipped
        assert b.seq == 30

        state = dump(b)
        settings = b.query("SELECT * FROM settings ORDER BY key")
        with pytest.raises(JournalGap):
            b.replay(records[31:40], {"segment": "99"})  # 32 does not follow 30
        with pytest.raises(JournalGap):  # 31 applies, 33 does not follow: neither stays
            b.replay([records[30], records[32]], {"segment": "99"})
        assert dump(b) == state
        assert b.seq == 30
        assert b.query("SELECT * FROM settings ORDER BY key") == settings

        assert b.replay(records[30:], {"segment": "5"}) == len(records) - 30
        assert dump(b) == dump(a)
    finally:
        a.close()
        b.close()


# -- 3. segments ------------------------------------------------------------------------------

def sample_segment() -> tuple[bytes, list[bytes]]:
    records = [encode_record(seq, "set_xattr", [1, b"user.\xff", b"v\nw" * seq, seq])
               for seq in range(10, 16)]
    return encode_segment("fs-1", "chain-a", 3, records), records


def test_a_segment_round_trips():
    raw, records = sample_segment()
    assert decode_segment(raw, "fs-1", "chain-a", 3) == [decode_record(r)
                                                                 for r in records]
    empty = encode_segment("fs-1", "chain-a", 1, [])
    assert decode_segment(empty, "fs-1", "chain-a", 1) == []


@pytest.mark.parametrize("fs_id, chain, number", [
    ("fs-2", "chain-a", 3), ("fs-1", "chain-b", 3), ("fs-1", "chain-a", 4),
    ("fs-1", "chain-a", 2), ("fs-1", "", 3)])
def test_a_segment_of_another_filesystem_chain_or_number_is_refused(fs_id, chain, number):
    raw, _ = sample_segment()
    with pytest.raises(ValueError):
        decode_segment(raw, fs_id, chain, number)


def test_every_flipped_byte_and_every_truncation_of_a_segment_is_refused():
    raw, _ = sample_segment()
    for pos in range(len(raw)):
        flipped = raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1:]
        with pytest.raises(ValueError):
            decode_segment(flipped, "fs-1", "chain-a", 3)
    for length in range(len(raw)):
        with pytest.raises(ValueError):
            decode_segment(raw[:length], "fs-1", "chain-a", 3)


def test_a_segment_missing_records_its_header_counts_is_refused():
    _, records = sample_segment()
    body = b"\n".join(records[:-1])  # a consistent checksum, but one record short
    header = {"fs_id": "fs-1", "chain": "chain-a", "segment": 3, "count": len(records),
              "checksum": protocol.checksum(body)}
    raw = SEGMENT_MAGIC + json.dumps(header).encode() + b"\n" + body
    with pytest.raises(ValueError, match="truncated"):
        decode_segment(raw, "fs-1", "chain-a", 3)


@pytest.mark.parametrize("header", [b"[]", b"null", b"5", b'"fs-1"'])
def test_a_segment_whose_header_is_not_an_object_is_refused(header):
    with pytest.raises(ValueError):
        decode_segment(SEGMENT_MAGIC + header + b"\n", "fs-1", "chain-a", 3)


def test_segment_ids_are_deterministic_valid_block_ids_unique_per_position():
    keys = [(f, c, n) for f in ("fs-1", "fs-2") for c in ("chain-a", "chain-b", "mkfs")
            for n in range(1, 6)]
    ids = [segment_id(*k) for k in keys]
    assert ids == [segment_id(*k) for k in keys]
    assert len(set(ids)) == len(keys)
    assert all(protocol.is_block_id(i) for i in ids)


def test_replay_chain_reads_segments_until_one_is_missing(tmp_path):
    store = MemoryBlockStore()
    a = Metadata(str(tmp_path / "a.db"))
    b = Metadata(str(tmp_path / "b.db"))
    gap = Metadata(str(tmp_path / "gap.db"))
    try:
        a.format(uid=0, gid=0)
        Workload(a, seed=3).run(50)
        rows = a.unshipped(0)
        parts = [rows[:10], rows[10:11], rows[11:]]
        for number, part in enumerate(parts, 1):
            data = encode_segment("fs", "c", number, [r for _, r in part])
            store.put(segment_id("fs", "c", number), data, protocol.checksum(data))

        assert replay_chain(store, b, "fs", "c", 1) == (len(rows), 4)
        assert dump(b) == dump(a)
        assert (b.setting("chain"), b.setting("segment")) == ("c", "4")
        assert replay_chain(store, b, "fs", "c", 4) == (0, 4)
        assert read_segment(store, "other-fs", "c", 1) is None
        assert read_segment(store, "fs", "other-chain", 1) is None

        # a block at the next segment's id that is not that segment is never applied
        junk = encode_segment("fs", "c", 9, [encode_record(a.seq + 1, "format",
                                                                    [0, 0, 0o755, 1])])
        store.put(segment_id("fs", "c", 4), junk, protocol.checksum(junk))
        with pytest.raises(errors.BlockCorrupt):
            replay_chain(store, b, "fs", "c", 4)
        assert dump(b) == dump(a) and b.seq == a.seq

        # a chain that skips records stops at the gap; the segments before it stay applied
        store2 = MemoryBlockStore()
        for number, part in enumerate([parts[0], parts[2]], 1):
            data = encode_segment("fs", "c", number, [r for _, r in part])
            store2.put(segment_id("fs", "c", number), data, protocol.checksum(data))
        with pytest.raises(JournalGap):
            replay_chain(store2, gap, "fs", "c", 1)
        assert gap.seq == 10 and gap.setting("segment") == "2"
    finally:
        for md in (a, b, gap):
            md.close()


def test_open_metadata_loads_a_checkpoint_or_brings_a_current_local_copy_up_to_date(tmp_path):
    store = MemoryBlockStore()
    writer = Metadata(str(tmp_path / "writer.db"))
    opened: list[Metadata] = []

    def ship(number: int) -> None:
        rows = writer.unshipped(0)
        data = encode_segment("fs", "c", number, [r for _, r in rows])
        store.put(segment_id("fs", "c", number), data, protocol.checksum(data))
        writer.shipped(rows[-1][0], {})

    def open_at(path, sb=None):
        progress: list[str] = []
        md, applied, end = open_metadata(store, sb or good, path, progress.append)
        opened.append(md)
        return md, applied, end, progress

    def close(md):
        opened.remove(md)
        md.close()

    try:
        writer.format(uid=0, gid=0)
        Workload(writer, seed=11).run(20)
        cp = write_checkpoint(store, writer, "fs", "c", 1, str(tmp_path))
        writer.shipped(writer.seq, {})
        good = superblock.Superblock("fs", 1 << 20, 3, 2, (), checkpoint=cp)
        workload = Workload(writer, seed=12)
        workload.run(15)
        ship(1)
        workload.run(15)
        ship(2)

        local = str(tmp_path / "local.db")
        md, applied, end, progress = open_at(local)
        assert any("checkpoint" in m for m in progress)
        assert (applied, end) == (writer.seq - cp["seq"], 3)
        assert dump(md) == dump(writer)
        close(md)

        workload.run(10)
        ship(3)
        md, applied, end, progress = open_at(local)  # current local copy: replay only
        assert progress == []
        assert applied > 0 and end == 4
        assert dump(md) == dump(writer)
        md.set_settings({"chain": "another"})  # a local copy of another writer's chain
        close(md)

        md, applied, end, progress = open_at(local)
        assert any("checkpoint" in m for m in progress)
        assert (applied, end) == (writer.seq - cp["seq"], 4)
        assert dump(md) == dump(writer)
        close(md)

        with pytest.raises(errors.BlockCorrupt):  # the checkpoint is of another filesystem
            open_at(str(tmp_path / "other.db"),
                    superblock.Superblock("other-fs", 1 << 20, 3, 2, (), checkpoint=cp))
    finally:
        writer.close()
        for md in opened:
            md.close()


# -- 4. ReplicatedStore.find ------------------------------------------------------------------

def test_find_returns_a_verified_copy_none_when_absent_and_never_guesses(blockservers,
                                                                         make_cluster):
    servers = blockservers(3)
    store = make_cluster(servers)
    members, transport = store.members, store.transport
    good, bad = b"the bytes verify accepts", b"other bytes under the same id"

    # two servers hold a copy that fails verification, one holds the good one
    mixed = protocol.new_block_id()
    for member, data in zip(members, (bad, bad, good)):
        transport.put_block(member, mixed, data, protocol.checksum(data))
    for _ in range(5):
        seen = []
        assert store.find(mixed, lambda data: seen.append(data) or data == good) == good
        assert good in seen and set(seen) <= {good, bad}
    with pytest.raises(errors.Unavailable):  # copies exist, none is acceptable
        store.find(mixed, lambda data: False)

    stored = protocol.new_block_id()
    store.put(stored, good, protocol.checksum(good))
    def everywhere():
        try:
            return all(transport.get_block(m, stored) == good for m in members)
        except errors.BlockMissing:
            return False

    wait_until(everywhere, "the third copy")
    assert store.find(stored, lambda data: data == good) == good

    absent = protocol.new_block_id()
    asked = []
    assert store.find(absent, asked.append) is None
    assert asked == []  # nothing to verify

    servers[2].stop()
    assert store.find(absent, asked.append) is None  # two servers say absent: W=2 cannot be
    assert store.find(stored, lambda data: data == good) == good

    servers[1].stop()
    with pytest.raises(errors.Unavailable):  # one "absent" cannot rule out a W=2 block
        store.find(absent, asked.append)
    assert store.find(stored, lambda data: data == good) == good  # but a copy is a copy


# -- 5. the superblock ------------------------------------------------------------------------

def test_read_quorum_takes_the_newest_of_a_majority_and_update_catches_servers_up(
        blockservers):
    servers = blockservers(3)
    members = members_of(servers)
    transport = new_transport()
    sb1 = formatted(transport, members)

    servers[2].stop()  # misses the next update
    sb2 = superblock.update(transport, sb1.with_changes(lease={"mount": "m", "n": 2}))
    assert sb2.generation == 2
    servers[2].start()
    assert transport.register_get(members[2], superblock.REGISTER) == (1, sb1.encode())

    servers[0].stop()  # what is left: one server at generation 2, one at generation 1
    assert superblock.read_quorum(transport, members) == sb2
    servers[1].stop()
    with pytest.raises(errors.Unavailable):
        superblock.read_quorum(transport, members)
    servers[0].start()
    servers[1].start()

    sb3 = superblock.update(transport, sb2.with_changes(lease={"mount": "m", "n": 3}))
    assert sb3.generation == 3
    assert_on_every_server(transport, members, sb3)  # the one that missed 2 caught up


def test_update_is_a_compare_and_swap_with_exactly_one_winner(blockservers):
    servers = blockservers(3)
    members = members_of(servers)
    transport = new_transport()
    sb1 = formatted(transport, members)

    first = superblock.update(transport, sb1.with_changes(lease={"mount": "first"}))
    assert first.generation == 2
    with pytest.raises(errors.Conflict):
        superblock.update(transport, sb1.with_changes(lease={"mount": "second"}))
    assert superblock.read_quorum(transport, members) == first
    for member in members:
        assert transport.register_get(member, superblock.REGISTER) == (2, first.encode())

    base = first
    for round_ in range(6):  # two writers from the same generation at the same moment
        barrier = threading.Barrier(2, timeout=30)
        results: dict[str, object] = {}

        def race(name, base=base, barrier=barrier, results=results, round_=round_):
            barrier.wait()
            try:
                results[name] = superblock.update(
                    transport, base.with_changes(lease={"mount": f"{name}-{round_}"}))
            except errors.StorageError as e:
                results[name] = e

        threads = [threading.Thread(target=race, args=(n,)) for n in ("x", "y")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        winners = [r for r in results.values() if isinstance(r, superblock.Superblock)]
        losers = [r for r in results.values() if isinstance(r, errors.Conflict)]
        assert (len(winners), len(losers)) == (1, 1), results
        winner = winners[0]
        assert winner.generation > base.generation
        assert superblock.read_quorum(transport, members) == winner
        for member in members:  # the loser's value is left nowhere
            assert transport.register_get(member, superblock.REGISTER) == (
                winner.generation, winner.encode())
        base = winner


def test_a_losers_value_at_the_winning_generation_is_never_read(blockservers):
    servers = blockservers(3)
    members = members_of(servers)
    transport = new_transport()
    base = formatted(transport, members)

    # The servers as a race leaves them: the winner's value on two, the loser's on one, at
    # the same generation. Several rounds, so the loser sits on each server and neither
    # value can win by how it happens to hash.
    for generation in range(2, 10):
        winner = base.with_changes(lease={"mount": f"winner-{generation}"})
        loser = base.with_changes(lease={"mount": f"loser-{generation}"})
        loser_at = generation % 3
        for i, member in enumerate(members):
            value = loser if i == loser_at else winner
            transport.register_put(member, superblock.REGISTER, generation, value.encode(),
                                   expect=generation - 1)
        assert superblock.read_quorum(transport, members) == winner.with_changes(
            generation=generation)
        base = winner.with_changes(generation=generation)

    # The loser got to one server first; the winner's update finds it there, and writes
    # once more so that no majority of servers can show the loser's value.
    loser = base.with_changes(lease={"mount": "late loser"})
    transport.register_put(members[1], superblock.REGISTER, base.generation + 1,
                           loser.encode(), expect=base.generation)
    won = superblock.update(transport, base.with_changes(lease={"mount": "late winner"}))
    assert won.generation == base.generation + 2
    assert_on_every_server(transport, members, won)


def test_a_lone_writer_is_not_refused_during_a_rolling_restart(blockservers):
    servers = blockservers(3)
    members = members_of(servers)
    transport = new_transport()
    sb = formatted(transport, members)

    servers[2].stop()
    sb = superblock.update(transport, sb.with_changes(lease={"mount": "only", "n": 1}))
    servers[2].start()  # back, still at generation 1
    servers[1].stop()  # the next server of the rolling restart

    outcomes = []
    for n in range(2, 6):  # retry what cannot be known, as the journal's lease renewal does
        try:
            sb = superblock.update(transport, sb.with_changes(lease={"mount": "only", "n": n}))
        except errors.Conflict:
            outcomes.append("conflict")
            break
        except errors.Unavailable:
            outcomes.append("unavailable")
            continue
        outcomes.append("ok")
        break
    assert outcomes and outcomes[-1] == "ok", outcomes  # no one else ever wrote
    assert superblock.read_quorum(transport, members) == sb


# -- 6. a writer's journal end to end ---------------------------------------------------------

class Cluster:
    def __init__(self, servers, store):
        self.servers, self.store = servers, store
        self.members = store.members
        self.transport = new_transport()
        self.fs_id = self.superblock().fs_id

    def superblock(self) -> superblock.Superblock:
        return superblock.read_quorum(self.transport, self.members)

    def on_servers(self) -> set[str]:
        return set().union(*(blocks_on(self.transport, m) for m in self.members))

    def load_elsewhere(self, path) -> tuple[dict, int, int]:
        """What a new mount on another machine loads: (tables, records replayed, the
        next segment of the chain)."""
        os.makedirs(path)
        md, applied, end = open_metadata(self.store, self.superblock(),
                                                 os.path.join(path, "metadata.db"))
        try:
            return dump(md), applied, end
        finally:
            md.close()


class CutTransport(Transport):
    """A transport whose superblock writes can be cut off: a writer cut from the servers
    while its process keeps running. A write already under way when the cut comes still
    reaches every server (its generation was let through), so the cut never leaves the
    servers half-updated."""

    def __init__(self):
        super().__init__(TransportConfig(connect_timeout=2.0, read_timeout=10.0))
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._let_through: set[int] = set()

    def register_put(self, member, name, generation, value, expect=None):
        with self._lock:
            if not self.cut.is_set():
                self._let_through.add(generation)
            elif generation not in self._let_through:
                raise errors.Unavailable(f"{member.url}: cut off by the test",
                                         server=member.url)
        return super().register_put(member, name, generation, value, expect)


class Writer:
    """One read-write mount without FUSE: its lease, metadata database and journal."""

    def __init__(self, cluster: Cluster, work_dir, registry: list, *, lease=None,
                 transport=None, **options):
        registry.append(self)  # closed at teardown whatever happens below
        self.journal = self.metadata = None
        self.transport = transport or new_transport()
        self.lease = lease or new_lease(new_mount_id(), 30.0)
        self.db_path = os.path.join(work_dir, "metadata.db")
        os.makedirs(work_dir)
        # the gate a mount's filesystem asks before each change
        self.gate = Lease.take(self.transport, cluster.superblock(), self.lease)
        self.metadata, self.replayed, end = open_metadata(cluster.store, self.gate.superblock,
                                                          self.db_path)
        self.journal = journal.Journal(cluster.store, self.transport, self.gate, self.metadata,
                                       work_dir, ship_delay=0.05, **options)
        self.journal.start(self.replayed, end)

    def segments(self, cluster: Cluster, first: int = 1) -> list[str]:
        """The ids of this writer's shipped segments."""
        return [segment_id(cluster.fs_id, self.journal.chain, n)
                for n in range(first, self.journal.stats()["segment"])]

    def close(self, **options) -> None:
        if isinstance(self.transport, CutTransport):
            self.transport.cut.clear()
        if self.journal is not None:
            self.journal.close(**options)
        if self.metadata is not None:
            self.metadata.close()
            self.metadata = None


@pytest.fixture
def cluster(blockservers, make_cluster, capsys) -> Cluster:
    """Three block servers, formatted by `fusefs mkfs`, and a ReplicatedStore over them."""
    servers = blockservers(3)
    assert cli.main(["mkfs", "--servers", ",".join(s.url for s in servers)]) == 0
    assert "formatted filesystem" in capsys.readouterr().out
    return Cluster(servers, make_cluster(servers))


@pytest.fixture
def writers(cluster, tmp_path):
    """Factory: `writers(name, **options)` -> a started Writer; all closed at teardown."""
    made: list[Writer] = []
    try:
        yield lambda name, **options: Writer(cluster, str(tmp_path / name), made, **options)
    finally:
        for writer in reversed(made):
            writer.close()


def test_shipped_changes_are_what_another_machine_loads(cluster, writers, tmp_path):
    sb = cluster.superblock()
    assert sb.checkpoint["chain"] == "mkfs" and sb.lease is None
    mkfs_blocks = checkpoint_blocks(cluster.store, sb.checkpoint)

    first = writers("machine1")
    md = first.metadata
    sb = cluster.superblock()
    assert sb.lease == first.lease
    assert (sb.checkpoint["chain"], sb.checkpoint["segment"]) == (first.journal.chain, 1)

    workload = Workload(md, seed=5)
    for _ in range(4):
        workload.run(25)
        first.journal.wait_durable(timeout=60)
    assert first.journal.stats()["shipped"] == md.seq
    assert md.unshipped(0) == []  # what is on the cluster is dropped locally
    segments = first.segments(cluster)
    assert len(segments) >= 4
    assert all(cluster.store.has_many(segments).values())

    state, applied, end = cluster.load_elsewhere(tmp_path / "machine2")
    assert state == dump(md)
    assert applied == md.seq - sb.checkpoint["seq"]
    assert end == len(segments) + 1
    shipped = applied
    final = dump(md)

    first.close()  # a clean unmount gives the lease up
    assert cluster.superblock().lease is None

    # the same machine mounting again brings its own database up to date: no download
    progress = []
    again, applied, _ = open_metadata(cluster.store, cluster.superblock(),
                                              first.db_path, progress.append)
    try:
        assert progress == [] and applied == 0
        assert dump(again) == final
    finally:
        again.close()

    # another machine becomes the writer: its own chain, and the old one is deleted
    second = writers("machine3")
    assert second.replayed == shipped > 0
    assert dump(second.metadata) == final
    sb = cluster.superblock()
    assert sb.lease == second.lease
    assert (sb.checkpoint["chain"], sb.checkpoint["segment"]) == (second.journal.chain, 1)
    assert not any(cluster.store.has_many(segments + mkfs_blocks).values())
    assert not (set(segments) | set(mkfs_blocks)) & cluster.on_servers()

    Workload(second.metadata, seed=6).run(30)
    second.journal.wait_durable(timeout=60)
    state, _, _ = cluster.load_elsewhere(tmp_path / "machine4")
    assert state == dump(second.metadata)


def test_a_checkpoint_is_named_by_the_superblock_and_replaces_old_blocks(cluster, writers,
                                                                         tmp_path):
    writer = writers("machine1")
    md = writer.metadata
    workload = Workload(md, seed=8)
    for _ in range(3):
        workload.run(20)
        writer.journal.wait_durable(timeout=60)

    old_cp = cluster.superblock().checkpoint
    old_blocks = checkpoint_blocks(cluster.store, old_cp)
    old_segments = writer.segments(cluster)
    assert old_segments and all(cluster.store.has_many(old_blocks + old_segments).values())
    next_segment = writer.journal.stats()["segment"]

    cp = writer.journal.checkpoint()
    assert cluster.superblock().checkpoint == cp
    assert (cp["chain"], cp["segment"], cp["seq"]) == (writer.journal.chain, next_segment,
                                                       md.seq)
    new_blocks = checkpoint_blocks(cluster.store, cp)
    assert all(cluster.store.has_many(new_blocks).values())
    assert not any(cluster.store.has_many(old_blocks + old_segments).values())
    assert not (set(old_blocks) | set(old_segments)) & cluster.on_servers()

    state, applied, end = cluster.load_elsewhere(tmp_path / "machine2")
    assert (state, applied, end) == (dump(md), 0, next_segment)

    workload.run(30)  # the chain goes on after the checkpoint
    writer.journal.wait_durable(timeout=60)
    state, applied, _ = cluster.load_elsewhere(tmp_path / "machine3")
    assert state == dump(md)
    assert applied == md.seq - cp["seq"] > 0
    later_segments = writer.segments(cluster, first=next_segment)
    assert later_segments

    final = dump(md)
    writer.close(checkpoint_after=1)  # a long enough chain is checkpointed at unmount
    sb = cluster.superblock()
    assert sb.lease is None
    assert sb.checkpoint["seq"] == cp["seq"] + applied
    assert not any(cluster.store.has_many(new_blocks + later_segments).values())
    state, applied, _ = cluster.load_elsewhere(tmp_path / "machine4")
    assert (state, applied) == (final, 0)


def test_a_writer_whose_lease_was_taken_over_is_fenced(cluster, writers, tmp_path):
    cut = CutTransport()
    a = writers("a", transport=cut, lease=new_lease(new_mount_id(), 3.0,
                                                            "/mnt/a"))
    Workload(a.metadata, seed=13).run(30)
    a.journal.wait_durable(timeout=60)
    durable = dump(a.metadata)

    # while A's lease is live, nobody else gets it, and the refusal names the holder
    lease_b = new_lease(new_mount_id(), 30.0, "/mnt/b")
    with pytest.raises(errors.LeaseHeld) as held:
        acquire(new_transport(), cluster.superblock(), lease_b)
    assert "/mnt/a" in str(held.value) and f"pid {os.getpid()}" in str(held.value)
    assert cluster.superblock().lease["mount"] == a.lease["mount"]

    # A is cut off from the superblock: it cannot renew, and its lease runs out
    cut.cut.set()
    wait_until(lambda: cluster.superblock().lease["expires"] < time.time(),
               "A's lease to expire", timeout=60, interval=0.1)
    # nobody replaced A yet, but by its own clock its lease is over: it ships nothing more
    assert a.journal.lost is None
    a.metadata.create(ROOT_INO, b"after the lease ran out", stat.S_IFREG | 0o644, 0, 0)
    with pytest.raises(errors.Unavailable, match="lease"):
        a.journal.wait_durable(timeout=60)
    unshipped = a.journal.stats()["segment"]
    assert read_segment(cluster.store, cluster.fs_id, a.journal.chain,
                                unshipped) is None
    a_segments = a.segments(cluster)

    # B takes the expired lease over and becomes the writer
    b = writers("b", lease=lease_b)
    assert b.replayed > 0
    assert dump(b.metadata) == durable  # A's unshipped change is not on the cluster
    assert cluster.superblock().lease == lease_b
    assert not any(cluster.store.has_many(a_segments).values())

    # A reaches the servers again: its next renewal finds the superblock changed
    cut.cut.clear()
    wait_until(lambda: a.journal.lost, "A to notice it lost its lease", timeout=60)
    told = a.journal.lost
    with pytest.raises(errors.Fenced) as fenced:  # what A's filesystem hears: read-only
        a.gate.check_writable()
    assert str(fenced.value) == told
    assert "/mnt/b" in a.journal.lost
    with pytest.raises(errors.Fenced):
        a.journal.wait_durable(timeout=60)
    with pytest.raises(errors.Fenced):
        a.journal.checkpoint()
    a.close()  # a fenced writer does not give up a lease it no longer holds
    assert a.journal.lost == told  # lost once, for that reason
    sb = cluster.superblock()
    assert sb.lease == lease_b and sb.checkpoint["chain"] == b.journal.chain

    Workload(b.metadata, seed=14).run(20)
    b.journal.wait_durable(timeout=60)
    state, _, _ = cluster.load_elsewhere(tmp_path / "c")
    assert state == dump(b.metadata)
    assert b.metadata.lookup(ROOT_INO, b"after the lease ran out") is None
    b.close()
    assert cluster.superblock().lease is None


def test_a_lease_is_refused_while_its_holder_lives_and_taken_when_it_is_gone(cluster):
    transport = new_transport()
    stale = cluster.superblock()
    mine = new_lease(new_mount_id(), 30.0, "/mnt/mine")

    remote = new_lease("remote-mount", 600.0, "/mnt/remote")
    remote["host"] = "another-machine.invalid"
    sb = superblock.update(transport, stale.with_changes(lease=remote))
    with pytest.raises(errors.LeaseHeld, match="/mnt/remote"):
        acquire(transport, sb, mine)
    # a superblock read before someone else wrote cannot take the lease either
    with pytest.raises(errors.LeaseHeld):
        acquire(transport, stale, mine)
    assert cluster.superblock().lease == remote

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    gone = new_lease("gone-mount", 600.0, "/mnt/gone")
    gone["pid"] = ended.pid  # this machine, this boot, a process that has exited
    sb = superblock.update(transport, sb.with_changes(lease=gone))
    sb = acquire(transport, sb, mine)
    assert cluster.superblock().lease == mine == sb.lease

    renewed = {**mine, "expires": time.time() + 60}  # the holder itself is never refused
    assert acquire(transport, sb, renewed).lease == renewed


# -- 7. a server dies while the journal ships -------------------------------------------------

def test_the_journal_ships_on_when_a_server_is_killed(cluster, writers, tmp_path):
    writer = writers("machine1")
    md = writer.metadata
    victim = cluster.servers[1]
    kill_now, killed = threading.Event(), threading.Event()

    def killer():
        if kill_now.wait(60):
            victim.kill()
            killed.set()

    thread = threading.Thread(target=killer, name="killer")
    thread.start()
    try:
        workload = Workload(md, seed=21)
        for i in range(40):
            workload.run(5)
            if i == 10:
                kill_now.set()  # killed at some point while the shipping goes on
            if i % 3 == 0:
                writer.journal.wait_durable(timeout=60)
        assert killed.wait(60)
    finally:
        kill_now.set()
        thread.join(60)
    assert not victim.running

    shipped_before = writer.journal.stats()["segment"]
    workload.run(40)  # every one of these ships with the server dead
    writer.journal.wait_durable(timeout=60)
    assert writer.journal.stats()["segment"] > shipped_before
    assert writer.journal.lost is None

    state, _, end = cluster.load_elsewhere(tmp_path / "machine2")
    assert not victim.running
    assert state == dump(md)
    assert end == writer.journal.stats()["segment"]
