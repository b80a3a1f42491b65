"""Which blocks on the servers are live, and listing what the servers hold.

One rule, used by the writer's leftover sweep (`Journal.sweep`), `fusefs fsck`, `fusefs gc`
(gc.py) and the anti-entropy repair (antientropy.py): a block is live when

- the metadata's block maps reference it;
- it is garbage whose dropping record may not be durable yet (the writer's flusher
  deletes it once it is; only a caller that knows every record is shipped may count
  garbage as dead);
- it is the named checkpoint's manifest or one of its chunks;
- it is the tombstone the checkpoint names as `fence` (the chain before it, fenced);
- it is a segment of the named chain that the caller still needs (`segments`).

Everything else listed on the servers is a leftover: an upload a killed writer never
recorded, a checkpoint or segments it never got to delete. Leftovers are never read;
deleting one is safe only once the caller has proven, after listing, that no other
writer came (the sweep's quorum read, fsck's renewal), which each caller does itself.
"""

from __future__ import annotations

from . import errors
from .checkpoint import checkpoint_blocks
from .metadata import Metadata
from .segments import segment_id


def live_blocks(metadata: Metadata, store, checkpoint: dict, fs_id: str, *, chain: str,
                segments: range, keep_garbage: bool) -> set[str]:
    """The ids of every block that must be kept (the rule above).

    `segments` is the range of segment numbers of `chain` to keep. Its two callers need
    different ranges: the running writer keeps its own chain from 1 to one past its next
    segment (older segments its checkpoints are still deleting, and the one being
    stored); fsck, with no writer running, keeps only what a mount would load, the
    checkpoint's chain from the checkpoint's segment to one past the end it replayed to
    (a writer mounted meanwhile may be storing it). `keep_garbage` is False only for
    fsck, whose loaded state is all shipped: its garbage is dead, and it deletes it."""
    live = metadata.referenced_blocks()
    if keep_garbage:
        live.update(metadata.garbage_ids())
    live.update(checkpoint_blocks(store, checkpoint))
    live.update(f for f in [checkpoint.get("fence")] if f)  # an old writer's chain, fenced
    live.update(segment_id(fs_id, chain, n) for n in segments)
    return live


def list_everything(transport, members) -> tuple[set[str], dict[str, errors.StorageError]]:
    """The ids of every block on every member; the servers that could not be listed."""
    listed: set[str] = set()
    failures = {}
    for member in members:
        after = ""
        try:
            while True:
                page, after = transport.list_blocks(member, after, 5000)
                listed.update(b["id"] for b in page)
                if not after:
                    break
        except errors.StorageError as e:
            failures[member.url] = e
    return listed, failures
