"""Journal segments: the blocks a writer's journal chain is made of, and fencing a chain.

Words: a *record* is one metadata change `[seq, op, args]` (metadata.py), numbered with
no gaps. A *chain* is the journal of one read-write mount, named by its mount id.
Segment n (1, 2, ...) of chain c is the block `segment_id(fs_id, c, n)` and holds
consecutive records. The ids are computed, not stored, so a chain is read by asking for
n, n+1, ... until a segment provably does not exist (`BlockStore.find`).

States of one segment number: *absent* → *stored* (on W servers, by its writer, who
stores n+1 only once n is stored) or *fenced* (a tombstone, `fence_block`, stored by the
next writer on N−W+1 servers or more, so that the old writer can never store that
segment on W servers: blocks are immutable). Either is final. A segment found absent
while a later one exists was lost (copies gone or out of reach): `chain_end` raises
JournalGap rather than take it for the end.

A crash while storing a segment leaves it on fewer than W servers: readers either find
it or take the chain's end before it, a prefix either way; the next writer's fence
makes that choice final.
"""

from __future__ import annotations

import contextlib
import json
import logging

import xxhash

from blockserver import protocol

from . import errors, superblock
from .metadata import Metadata, decode_record

log = logging.getLogger("fusefs.segments")

SEGMENT_MAGIC = b"fusefs-journal 1\n"
FENCE_MAGIC = b"fusefs-journal-fence 1\n"
GAP_PROBES = 2  # segments looked for past a missing one before calling it the chain's end
FENCED = "fenced"


def segment_id(fs_id: str, chain: str, number: int) -> str:
    return xxhash.xxh3_128_hexdigest(f"{fs_id}/journal/{chain}/{number}".encode())


def encode_segment(fs_id: str, chain: str, number: int, records: list[bytes]) -> bytes:
    body = b"\n".join(records)
    header = {"fs_id": fs_id, "chain": chain, "segment": number, "count": len(records),
              "checksum": protocol.checksum(body)}
    return SEGMENT_MAGIC + json.dumps(header).encode() + b"\n" + body


def decode_segment(raw: bytes, fs_id: str, chain: str, number: int) -> list:
    """The records of a segment; ValueError if it is not exactly that segment, intact."""
    if not raw.startswith(SEGMENT_MAGIC):
        raise ValueError("not a journal segment")
    head, _, body = raw[len(SEGMENT_MAGIC):].partition(b"\n")
    header = json.loads(head)
    if not isinstance(header, dict):
        raise ValueError("journal segment header is not an object")
    if (header.get("fs_id"), header.get("chain"), header.get("segment")) != (fs_id, chain,
                                                                           number):
        raise ValueError("a journal segment of another filesystem or chain")
    if protocol.checksum(body) != header.get("checksum"):
        raise ValueError("journal segment damaged (checksum mismatch)")
    records = [decode_record(line) for line in body.split(b"\n")] if body else []
    if len(records) != header.get("count"):
        raise ValueError("journal segment truncated")
    return records


def fence_block(fs_id: str, chain: str, number: int) -> bytes:
    """The tombstone a new writer stores under segment `number` of an old chain, so that
    the old writer can never store that segment on W servers (blocks are immutable). The
    same bytes whoever writes it, so a second fencing of the same place is a no-op."""
    return FENCE_MAGIC + json.dumps({"fs_id": fs_id, "chain": chain,
                                     "segment": number}).encode()


def _valid_segment(fs_id, chain, number):
    fence = fence_block(fs_id, chain, number)

    def verify(raw: bytes) -> bool:
        if raw == fence:
            return True
        try:
            decode_segment(raw, fs_id, chain, number)
        except ValueError:
            return False
        return True
    return verify



def lookup_segment(store, fs_id: str, chain: str, number: int):
    """The records of a segment, FENCED (the chain ends there for good), or None when it
    provably was never stored on W servers."""
    raw = store.find(segment_id(fs_id, chain, number), _valid_segment(fs_id, chain, number))
    if raw is None:
        return None
    if raw == fence_block(fs_id, chain, number):
        return FENCED
    return decode_segment(raw, fs_id, chain, number)


def read_segment(store, fs_id: str, chain: str, number: int) -> list | None:
    """The records of a segment; None if it does not exist or was fenced."""
    records = lookup_segment(store, fs_id, chain, number)
    return None if records is FENCED else records


def chain_end(store, fs_id: str, chain: str, number: int) -> None:
    """Segment `number` was not found: make sure that is the end of the chain, not a lost
    segment. A writer stores segment n+1 only once n is on W servers, so a later segment
    that exists means copies of `number` were lost (a replaced disk, a quarantined copy)
    while the servers holding the rest are out of reach. Raises JournalGap then: taking
    the end here would silently drop every later change, for good once a checkpoint is
    written."""
    for later in range(number + 1, number + 1 + GAP_PROBES):
        if read_segment(store, fs_id, chain, later) is not None:
            raise errors.JournalGap(
                f"journal segment {number} of chain {chain} is missing but segment {later} "
                "exists: copies of a shipped segment were lost or are on servers out of "
                "reach. Bring every block server back (or restore the lost disk) and mount "
                "again; mounting now would drop every change after it")


def _stored_instead(transport, answers: dict, fs_id: str, chain: str, number: int):
    """The records of the segment that a server refused our tombstone for (it holds the
    segment itself), or None."""
    for member, answer in answers.items():
        if isinstance(answer, errors.Conflict):
            with contextlib.suppress(errors.StorageError, ValueError):
                return decode_segment(transport.get_block(member, segment_id(
                    fs_id, chain, number)), fs_id, chain, number)
    return None


def fence_chain(store, transport, metadata: Metadata, fs_id: str, chain: str,
                number: int) -> tuple[int, int]:
    """Make `number` the end of `chain` for good: store its tombstone on so many servers
    that no W of them could take the segment any more. A segment found there instead (its
    writer stored it after we looked) is replayed, and the next number fenced.

    Returns (records replayed, the fenced segment number). Raises Unavailable when too
    few servers answered."""
    members = list(store.members)
    need = len(members) - store.config.write_quorum + 1
    applied = 0
    while True:
        block_id = segment_id(fs_id, chain, number)
        data = fence_block(fs_id, chain, number)
        checksum = protocol.checksum(data)
        answers = superblock.ask_until(  # enough tombstones: a hung server is not awaited
            transport, members,
            lambda m: transport.put_block(m, block_id, data, checksum, metadata=True),
            lambda found: sum(1 for a in found.values() if isinstance(a, bool)) >= need)
        if sum(1 for a in answers.values() if isinstance(a, bool)) >= need:
            return applied, number
        records = _stored_instead(transport, answers, fs_id, chain, number)
        if records is None:
            failures = "; ".join(str(a) for a in answers.values() if not isinstance(a, bool))
            raise errors.Unavailable(f"could not fence journal chain {chain} at segment "
                                     f"{number} on {need} servers: {failures}")
        log.warning("the previous writer stored segment %d of its chain while this mount "
                    "took over; it is replayed", number)
        applied += metadata.replay(records, {"chain": chain, "segment": str(number + 1)})
        number += 1
