"""Loading a filesystem's metadata on any machine: the checkpoint the superblock names,
then the journal chain after it.

`open_metadata` keeps a local database that replay alone can bring up to date (same
filesystem, same chain, at or past the checkpoint; `_reusable`) and replaces anything
else by the checkpoint. `replay_chain` applies segments n, n+1, ... until one provably
does not exist or holds a tombstone; a missing segment followed by an existing one is a
JournalGap (errors.py), never taken for the end.

A crash while loading changes nothing on the cluster: a downloaded checkpoint is moved
into place only once complete and verified, and replay commits each record with its
position, so the next load goes on from where this one stopped (or starts over from
the checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os

from . import errors, superblock
from .checkpoint import load_checkpoint
from .segments import FENCED, chain_end, lookup_segment
from .metadata import RecordGap  # a record that does not follow the last one
from .metadata import Metadata

log = logging.getLogger("fusefs.loading")


def remove_database(path: str) -> None:
    """Delete a SQLite database and its journal files (rollback or WAL)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def _reusable(metadata: Metadata, sb: superblock.Superblock) -> bool:
    """A local database can be brought up to date by replay alone: same filesystem, same
    chain, at or past the checkpoint.

    It may hold records its writer never shipped (it was killed): no other writer came
    since (the chain is the same), every segment of the chain was made from this very
    database's records, and the blocks they reference are durable, so those records are
    a true continuation and are kept; the new writer's first checkpoint ships them."""
    cp = sb.checkpoint
    get = metadata.setting
    return (get("fs_id") == sb.fs_id and get("chain") == cp["chain"]
            and metadata.seq >= cp["seq"]
            and int(get("segment", "0")) >= cp["segment"])


def replay_chain(store, metadata: Metadata, fs_id: str, chain: str,
                 segment: int) -> tuple[int, int]:
    """Apply segments segment, segment+1, ... of `chain` until one does not exist.

    Returns (records applied, the first segment number that does not exist)."""
    applied = 0
    while True:
        records = lookup_segment(store, fs_id, chain, segment)
        if records is FENCED:
            return applied, segment
        if records is None:
            chain_end(store, fs_id, chain, segment)
            return applied, segment
        applied += metadata.replay(records, {"chain": chain, "segment": str(segment + 1)})
        segment += 1


def open_metadata(store, sb: superblock.Superblock, db_path: str,
                  progress=lambda message: None) -> tuple[Metadata, int, int]:
    """The filesystem's metadata as the cluster has it, in the database at `db_path`.

    A local database that is current (or behind on the same chain) is used as is and
    brought up to date; anything else is replaced by the latest checkpoint. Returns
    (metadata, records replayed, the next segment number of the checkpoint's chain).
    """
    cp = sb.checkpoint
    if cp is None:
        raise errors.Rejected("the superblock names no checkpoint; format with fusefs mkfs")
    if os.path.exists(db_path):
        metadata = Metadata(db_path)
        if _reusable(metadata, sb):
            try:
                applied, segment = replay_chain(store, metadata, sb.fs_id, cp["chain"],
                                                int(metadata.setting("segment")))
                log.info("local metadata is current after %d journal records", applied)
                return metadata, applied, segment
            except RecordGap as e:
                log.warning("local metadata cannot be brought up to date (%s); "
                            "loading the checkpoint instead", e)
        else:
            log.info("local metadata is not current; loading the checkpoint")
        metadata.close()
        remove_database(db_path)
    progress(f"loading checkpoint of record {cp['seq']}")
    load_checkpoint(store, cp, db_path, sb.fs_id)
    metadata = Metadata(db_path)
    metadata.set_settings({"fs_id": sb.fs_id, "chain": cp["chain"],
                           "segment": str(cp["segment"]), "shipped": str(cp["seq"])})
    progress("replaying the journal")
    applied, segment = replay_chain(store, metadata, sb.fs_id, cp["chain"], cp["segment"])
    log.info("metadata loaded: checkpoint at record %d, then %d journal records", cp["seq"],
             applied)
    return metadata, applied, segment
