"""Journal records, their replay and journal segments, without a server: encoding and
decoding of records, a database rebuilt from another's records (in batches, skipping what
it has, refusing a gap), segments and what they refuse, a chain of segments replayed from
an in-memory block store, and loading a checkpoint or a current local copy.

The parts of the journal that need block servers (finding blocks, the superblock, a
writer's journal end to end) are in test_journal.py.
"""

from __future__ import annotations

import json
import random
import stat

import pytest

from blockserver import protocol
from fusefs import errors, superblock
from fusefs.checkpoint import write_checkpoint
from fusefs.loading import open_metadata, replay_chain
from fusefs.memstore import MemoryBlockStore
from fusefs.metadata import ROOT_INO, Metadata, RecordGap, decode_record, encode_record
from fusefs.segments import (SEGMENT_MAGIC, decode_segment, encode_segment, read_segment,
                             segment_id)

from .journal_workload import Workload, dump, records_of


# -- 1. records -------------------------------------------------------------------------------

@pytest.mark.parametrize("op, args", [
    ("format", [0, 0, 0o755, (1 << 63) - 1]),
    ("create", [5, 1, b"\xff\xfe", stat.S_IFREG | 0o644, 1000, 1000, 0, None, 123]),
    ("create", [6, 1, b"line\nbreak", stat.S_IFLNK | 0o777, 0, 0, 0, b"\x00\xff/x\n", 7]),
    ("commit_blocks", [7, [[0, "ab" * 16, "cd" * 16, 4096], [3, "ef" * 16, "01" * 16, 1]],
                       12288, 1, 2]),
    ("commit_blocks", [7, [[1, "ab" * 16, "cd" * 16, 4096, [[100, 5, "23" * 16, "45" * 16, 0],
                                                            [900, 9, "23" * 16, "45" * 16, 5]]]],
                       12288, 3, 4]),
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
        top = max(r[0] for r in c._query("SELECT ino FROM inodes"))
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
        settings = b._query("SELECT * FROM settings ORDER BY key")
        with pytest.raises(RecordGap):
            b.replay(records[31:40], {"segment": "99"})  # 32 does not follow 30
        with pytest.raises(RecordGap):  # 31 applies, 33 does not follow: neither stays
            b.replay([records[30], records[32]], {"segment": "99"})
        assert dump(b) == state
        assert b.seq == 30
        assert b._query("SELECT * FROM settings ORDER BY key") == settings

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
        with pytest.raises(RecordGap):
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
