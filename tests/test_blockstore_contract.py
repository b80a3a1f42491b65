"""The BlockStore contract, checked on every implementation the layers above may be given."""

import pytest

from blockserver import protocol
from fusefs import errors
from fusefs.memstore import MemoryBlockStore


@pytest.fixture(params=["memory", "replicated"])
def store(request):
    if request.param == "memory":
        return MemoryBlockStore()
    servers = request.getfixturevalue("blockservers")(3)
    return request.getfixturevalue("make_cluster")(servers)


def block(data: bytes):
    return protocol.new_block_id(), data, protocol.checksum(data)


def test_put_get_roundtrip_and_idempotence(store):
    block_id, data, checksum = block(b"hello" * 1000)
    store.put(block_id, data, checksum)
    store.put(block_id, data, checksum)  # a repeat is harmless
    assert store.get(block_id, checksum) == data
    assert store.has(block_id)


def test_immutability_conflict(store):
    block_id, data, checksum = block(b"one")
    store.put(block_id, data, checksum)
    with pytest.raises(errors.StorageError):
        store.put(block_id, b"two", protocol.checksum(b"two"))
    assert store.get(block_id, checksum) == b"one"


def test_wrong_checksum_is_refused_and_nothing_is_stored(store):
    block_id, data, _ = block(b"payload")
    with pytest.raises(errors.StorageError):
        store.put(block_id, data, protocol.checksum(b"something else"))
    assert not store.has(block_id)


def test_get_of_missing_block(store):
    with pytest.raises(errors.BlockMissing):
        store.get("ab" * 16, protocol.checksum(b""))


def test_delete_is_idempotent(store):
    block_id, data, checksum = block(b"x")
    store.put(block_id, data, checksum)
    store.delete(block_id)
    store.delete(block_id)
    assert not store.has(block_id)


def test_batched_forms(store):
    blocks = [block(bytes([i]) * (i * 100)) for i in range(30)]
    store.put_many(blocks)
    assert store.get_many([(b, c) for b, _, c in blocks]) == {b: d for b, d, _ in blocks}
    assert all(store.has_many([b for b, _, _ in blocks]).values())
    store.delete_many([b for b, _, _ in blocks])
    assert not any(store.has_many([b for b, _, _ in blocks]).values())
