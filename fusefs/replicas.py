"""How many healthy copies each block of a file has: the value of the read-only extended
attribute `user.fusefs.replicas` (docs/metrics.md, "Per-file health").

The value is one line of text, for people and scripts alike:

    replicas=3 blocks=5 pending=0 under=1 unreachable=0 healthy=3*3,2,3

`replicas` is R; `blocks` how many blocks the file has (uploaded or not); `pending` how many
of them are still only in this machine's memory (dirty: written, not uploaded yet, so they
have no copy to count); `under` how many uploaded blocks have fewer than R healthy copies;
`unreachable` how many servers could not be asked (copies there are not counted).
`healthy` lists the blocks in file order as runs: `3` is one block with 3 healthy copies,
`3*120` 120 blocks in a row with 3 each, `p` a pending block, `-` a hole (no block: reads
as zeros). The list is cut at `MAX_RUNS_TEXT` characters, ending in `,...`; the counts
before it always cover the whole file.

A copy is healthy when a server that is a member (or being drained) answers the batch
check with the block present under the checksum the metadata records. The check reads
each copy's header, not its bytes (`fusefs scrub` verifies bytes). Counted on demand:
one batch check per server per 1,000 blocks, the servers asked in parallel, with no lock
of the filesystem held. Nothing is stored or cached here (the adapter keeps an answer for
two seconds, fuse_ops.py): a crash loses nothing, and the next read asks again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from blockserver import protocol

from . import errors

NAME = b"user.fusefs.replicas"
MAX_RUNS_TEXT = 3072  # characters of the `healthy` list (xattr values may have 64 KiB)
CHUNK = 1000  # block ids per batch check

PENDING, HOLE = "p", "-"


def count_copies(store, blocks: Mapping[str, str]) -> tuple[dict[str, int], int, int]:
    """(block id -> healthy copies, R, servers that could not be asked) for `blocks`
    (block id -> checksum). A store without servers (in memory) holds one copy or none."""
    members = getattr(store, "members", None)
    if members is None:
        found = store.has_many(list(blocks)) if blocks else {}
        return {b: int(found.get(b, False)) for b in blocks}, 1, 0
    servers = getattr(store, "servers", members)
    replicas = store.config.replicas
    usable = [m for m in servers if store.health.usable(m.id)]
    counts = dict.fromkeys(blocks, 0)
    unreachable = len(servers) - len(usable)
    if not blocks or not usable:
        return counts, replicas, unreachable
    ids = list(blocks)
    with ThreadPoolExecutor(len(usable), thread_name_prefix="replicas") as pool:
        answers = list(pool.map(lambda m: _held(store.transport, m, ids, blocks), usable))
    for held in answers:
        if held is None:
            unreachable += 1
            continue
        for block_id in held:
            counts[block_id] += 1
    return counts, replicas, unreachable


def _held(transport, member, ids: list[str], blocks: Mapping[str, str]) -> set[str] | None:
    """The ids of `ids` that `member` holds under the expected checksum; None if it could
    not be asked."""
    held = set()
    try:
        for start in range(0, len(ids), CHUNK):
            for entry in transport.batch_check(member, ids[start:start + CHUNK]):
                block_id = entry.get("id")
                if entry.get("status") == protocol.OK and block_id in blocks \
                        and entry.get("checksum", blocks[block_id]) == blocks[block_id]:
                    held.add(block_id)
    except errors.StorageError:
        return None
    return held


def describe(entries: Mapping[int, object], replicas: int, unreachable: int) -> str:
    """The attribute's text for `entries`: block index -> healthy copies (int) or PENDING;
    indexes missing below the highest are holes."""
    counted = [c for c in entries.values() if isinstance(c, int)]
    pending = len(entries) - len(counted)
    summary = (f"replicas={replicas} blocks={len(entries)} pending={pending} "
               f"under={sum(1 for c in counted if c < replicas)} unreachable={unreachable}")
    return f"{summary} healthy={_text(_runs(entries))}"


def _runs(entries: Mapping[int, object]):
    """(entry, length) runs in index order, holes included, without one item per hole."""
    run, length, expected = None, 0, 0
    for index in sorted(entries):
        for entry, n in (((HOLE, index - expected),) if index > expected else ()) + \
                ((entries[index], 1),):
            if entry == run:
                length += n
                continue
            if length:
                yield run, length
            run, length = entry, n
        expected = index + 1
    if length:
        yield run, length


def _text(runs) -> str:
    parts, used = [], 0
    for entry, length in runs:
        part = f"{entry}*{length}" if length > 1 else f"{entry}"
        if used + len(part) + 1 > MAX_RUNS_TEXT:
            parts.append("...")
            break
        parts.append(part)
        used += len(part) + 1
    return ",".join(parts)


def report(store, refs: Mapping[int, object], pending: Iterable[int]) -> str:
    """The attribute's text for a file whose uploaded blocks are `refs` (index -> BlockRef)
    and whose blocks at the indexes `pending` are dirty."""
    entries: dict[int, object] = dict.fromkeys(pending, PENDING)
    uploaded = {i: r for i, r in refs.items() if i not in entries}
    counts, replicas, unreachable = count_copies(
        store, {r.block_id: r.checksum for r in uploaded.values()})
    entries.update({i: counts[r.block_id] for i, r in uploaded.items()})
    return describe(entries, replicas, unreachable)
