"""Checkpoints: the whole metadata database at one record, stored as blocks.

A checkpoint is a manifest block (CHECKPOINT_MAGIC, then JSON: fs_id, seq, size,
checksum, chunks) naming zlib-compressed chunks of the SQLite database, each an ordinary
block with R copies. The superblock names the newest one as {"manifest", "checksum",
"seq", "chain", "segment"} (and "fence", the tombstone of the chain before it, see
journal.py): load it, then replay chain `chain` from segment `segment` on.

Invariants: a checkpoint is complete before the superblock names it (chunks, then the
manifest, then the compare-and-swap), so a crash while writing one leaves only unnamed
blocks (leftovers) and the previous checkpoint still named; loading verifies the whole
database against the manifest's checksum before it replaces anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import zlib

from blockserver import protocol
from blockserver.protocol import new_block_id

from . import errors
from .metadata import Metadata

log = logging.getLogger("fusefs.checkpoint")

CHECKPOINT_MAGIC = b"fusefs-checkpoint 1\n"
CHUNK = 4 << 20  # checkpoint chunk size (uncompressed)


def write_checkpoint(store, metadata: Metadata, fs_id: str, chain: str, segment: int,
                     work_dir: str) -> dict:
    """Upload the whole database; returns the superblock's description of it."""
    fd, path = tempfile.mkstemp(prefix="checkpoint-", suffix=".db", dir=work_dir)
    os.close(fd)
    os.unlink(path)  # VACUUM INTO wants to create it
    try:
        seq = metadata.snapshot(path)
        with open(path, "rb") as f:
            raw = f.read()
    finally:  # VACUUM INTO that fails (a full disk) leaves its rollback journal too
        for leftover in (path, path + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    chunks = []
    for start in range(0, len(raw), CHUNK):
        data = zlib.compress(raw[start:start + CHUNK], 3)
        chunks.append((new_block_id(), data, protocol.checksum(data)))
    store.put_many(chunks)
    manifest = CHECKPOINT_MAGIC + json.dumps({
        "fs_id": fs_id, "seq": seq, "size": len(raw), "checksum": protocol.checksum(raw),
        "chunks": [[i, c, len(d)] for i, d, c in chunks]}).encode()
    manifest_id = new_block_id()
    manifest_checksum = protocol.checksum(manifest)
    store.put(manifest_id, manifest, manifest_checksum)
    log.info("checkpoint of %d bytes at record %d written (%d chunks)", len(raw), seq,
             len(chunks))
    return {"manifest": manifest_id, "checksum": manifest_checksum, "seq": seq,
            "chain": chain, "segment": segment}


def checkpoint_blocks(store, checkpoint: dict) -> list[str]:
    """The ids of a checkpoint's manifest and chunks."""
    manifest = _manifest(store, checkpoint)
    return [checkpoint["manifest"], *(c[0] for c in manifest["chunks"])]


def _manifest(store, checkpoint: dict) -> dict:
    raw = store.get(checkpoint["manifest"], checkpoint["checksum"])
    if not raw.startswith(CHECKPOINT_MAGIC):
        raise errors.BlockCorrupt(f"block {checkpoint['manifest']} is not a checkpoint")
    return json.loads(raw[len(CHECKPOINT_MAGIC):])


def load_checkpoint(store, checkpoint: dict, dest: str, fs_id: str) -> None:
    """Download the checkpoint into a new database file `dest`."""
    manifest = _manifest(store, checkpoint)
    if manifest["fs_id"] != fs_id or manifest["seq"] != checkpoint["seq"]:
        raise errors.BlockCorrupt("the checkpoint does not match the superblock")
    tmp = dest + ".partial"
    with open(tmp, "wb") as out:
        chunks = manifest["chunks"]
        for start in range(0, len(chunks), 8):
            batch = chunks[start:start + 8]
            found = store.get_many([(i, c) for i, c, _ in batch])
            for i, _, _ in batch:
                out.write(zlib.decompress(found[i]))
        out.flush()
        os.fsync(out.fileno())
    with open(tmp, "rb") as f:
        if protocol.checksum(f.read()) != manifest["checksum"]:
            os.unlink(tmp)
            raise errors.BlockCorrupt("the checkpoint's database does not match its checksum")
    os.replace(tmp, dest)
