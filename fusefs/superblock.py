"""The superblock: a filesystem's root record, kept in a register on every block server.

It holds the filesystem id, its settings (block size, R, W) and the membership (server ids
and URLs). `mkfs` writes generation 1 to every server; readers take the highest generation
any server holds. (The metadata journal's head and the writer lease join it in the
metadata issue, with majority reads.)
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from . import errors
from .transport import Member, Transport

REGISTER = "superblock"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Superblock:
    fs_id: str
    block_size: int
    replicas: int
    write_quorum: int
    members: tuple[Member, ...]
    generation: int = 0

    def encode(self) -> bytes:
        body = asdict(self)
        body.pop("generation")
        body["members"] = [asdict(m) for m in self.members]
        body["format"] = FORMAT_VERSION
        return json.dumps(body, indent=1).encode()

    @classmethod
    def decode(cls, raw: bytes, generation: int) -> "Superblock":
        body = json.loads(raw)
        if body.get("format") != FORMAT_VERSION:
            raise errors.Rejected(f"superblock format {body.get('format')} is not one this "
                                  f"version of fusefs understands ({FORMAT_VERSION})")
        return cls(body["fs_id"], body["block_size"], body["replicas"], body["write_quorum"],
                   tuple(Member(m["id"], m["url"]) for m in body["members"]), generation)


def probe(transport: Transport, urls: list[str]) -> dict[str, dict | errors.StorageError]:
    """url -> /v1/status JSON, or the error met asking for it; all asked in parallel."""
    def ask(url):
        try:
            return transport.status(Member("", url), timeout=5.0)
        except errors.StorageError as e:
            return e

    with ThreadPoolExecutor(max(1, len(urls))) as pool:
        return dict(zip(urls, pool.map(ask, urls)))


def read(transport: Transport, urls: list[str]) -> Superblock | None:
    """The newest superblock held by any of `urls`; None if none holds one.

    Raises the first error when no server could be asked at all.
    """
    found: list[tuple[int, bytes]] = []
    failures = []
    for url in urls:
        try:
            got = transport.register_get(Member("", url), REGISTER)
        except errors.StorageError as e:
            failures.append(e)
            continue
        if got is not None:
            found.append(got)
    if not found and len(failures) == len(urls):
        raise failures[0]
    if not found:
        return None
    generation, raw = max(found, key=lambda g: g[0])
    return Superblock.decode(raw, generation)


def new(members: list[Member], block_size: int, replicas: int,
        write_quorum: int) -> Superblock:
    return Superblock(uuid.uuid4().hex, block_size, replicas, write_quorum, tuple(members))


def write(transport: Transport, sb: Superblock, generation: int) -> None:
    """Store `sb` as `generation` on every member; every one must accept it."""
    raw = sb.encode()
    for member in sb.members:
        transport.register_put(member, REGISTER, generation, raw)
