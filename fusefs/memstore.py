"""An in-memory BlockStore for unit tests of the layers above the cluster.

Faults are injected by setting `fail_with` to an exception instance: every call raises it
until it is set back to None (a whole cluster being unreachable, say).
"""

from __future__ import annotations

import threading

from blockserver import protocol

from . import errors
from .blockstore import BlockStore


class MemoryBlockStore(BlockStore):
    def __init__(self):
        self._lock = threading.Lock()
        self._blocks: dict[str, tuple[bytes, str]] = {}  # guarded by _lock
        self.fail_with: Exception | None = None
        self.puts = 0  # how many put calls stored something, for tests

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def put(self, block_id: str, data: bytes, checksum: str, metadata: bool = False) -> None:
        self._maybe_fail()
        if protocol.checksum(data) != checksum:
            raise errors.BlockCorrupt(f"block {block_id}: data does not match its checksum")
        with self._lock:
            existing = self._blocks.get(block_id)
            if existing is not None and existing[1] != checksum:
                raise errors.Conflict(f"block {block_id} exists with other bytes")
            self._blocks[block_id] = (bytes(data), checksum)
            self.puts += 1

    def get(self, block_id: str, checksum: str) -> bytes:
        self._maybe_fail()
        with self._lock:
            found = self._blocks.get(block_id)
        if found is None:
            raise errors.BlockMissing(f"block {block_id} is not stored")
        if found[1] != checksum:
            raise errors.BlockCorrupt(f"block {block_id} has checksum {found[1]}, not {checksum}")
        return found[0]

    def find(self, block_id: str, verify) -> bytes | None:
        self._maybe_fail()
        with self._lock:
            found = self._blocks.get(block_id)
        if found is None:
            return None
        if not verify(found[0]):
            raise errors.BlockCorrupt(f"block {block_id} failed verification")
        return found[0]

    def has_many(self, block_ids: list[str]) -> dict[str, bool]:
        self._maybe_fail()
        with self._lock:
            return {b: b in self._blocks for b in block_ids}

    def delete_many(self, block_ids: list[str]) -> None:
        self._maybe_fail()
        with self._lock:
            for b in block_ids:
                self._blocks.pop(b, None)

    def block_ids(self) -> set[str]:
        with self._lock:
            return set(self._blocks)
