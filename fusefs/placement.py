"""Where a block lives: rendezvous (highest-random-weight) hashing over the cluster's members.

Every (block id, server id) pair gets a score from xxh3-64; sorting the members by score,
highest first, gives the block's ranking. Its first R members are its homes. Adding or
removing a member changes a block's ranking only where that member ranks, so only about
1/N of the copies move when an N-th server joins, and every client that agrees on the
member list agrees on every ranking without talking to anyone.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

from .transport import Member


def score(block_id: str, server_id: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{block_id}/{server_id}".encode())


def rank(block_id: str, members: Sequence[Member]) -> list[Member]:
    """All members, best home first. Deterministic for a given id and member list."""
    return sorted(members, key=lambda m: score(block_id, m.key), reverse=True)
