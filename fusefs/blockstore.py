"""The block store interface the filesystem writes through.

Blocks are immutable and named by random ids; every call is idempotent: putting a block
that is already stored succeeds, deleting a missing block succeeds. Implementations:
`fusefs.cluster.ReplicatedStore` (block servers) and `fusefs.memstore.MemoryBlockStore`
(in memory, for tests of the layers above).
"""

from __future__ import annotations

import abc


class BlockStore(abc.ABC):
    """Where the filesystem's blocks live: immutable, checksummed, idempotent calls."""

    @abc.abstractmethod
    def put(self, block_id: str, data: bytes, checksum: str, metadata: bool = False) -> None:
        """Store a block durably (on W servers) or raise a StorageError; nothing in between.
        `metadata`: a journal segment, allowed into the space kept back from file data."""

    def put_many(self, items: list[tuple[str, bytes, str]]) -> None:
        """Store several (id, data, checksum) blocks; raises if any could not be stored."""
        for block_id, data, checksum in items:
            self.put(block_id, data, checksum)

    @abc.abstractmethod
    def get(self, block_id: str, checksum: str) -> bytes:
        """The block's bytes, verified against `checksum`, or a StorageError."""

    def get_many(self, items: list[tuple[str, str]]) -> dict[str, bytes]:
        """id -> bytes for (id, checksum) pairs; raises if any block cannot be read."""
        return {block_id: self.get(block_id, checksum) for block_id, checksum in items}

    @abc.abstractmethod
    def find(self, block_id: str, verify) -> bytes | None:
        """A block whose checksum is not known in advance: its bytes if a copy passes
        `verify(data)`, None if it provably does not exist; raises when it cannot tell."""

    def has(self, block_id: str) -> bool:
        """True if at least one copy of the block exists."""
        return self.has_many([block_id])[block_id]

    @abc.abstractmethod
    def has_many(self, block_ids: list[str]) -> dict[str, bool]:
        """id -> whether at least one copy exists."""

    def delete(self, block_id: str) -> None:
        """Remove every copy it can reach; a missing block is not an error."""
        self.delete_many([block_id])

    @abc.abstractmethod
    def delete_many(self, block_ids: list[str]) -> None:
        """Remove every copy it can reach of several blocks."""

    def local_copy(self, block_id: str) -> str | None:
        """The data directory of a usable server on this host holding the block, whose
        file there (protocol.block_file) this process may read as cheaply as the disk
        cache's own (the cache then keeps none); None when there is none."""
        return None

    def set_membership(self, members, leaving=()) -> bool:
        """Adopt the servers a superblock change names; True if anything changed. A store
        without servers has nothing to do."""
        return False

    def close(self) -> None:
        """Stop background work. The store is not used afterwards."""
