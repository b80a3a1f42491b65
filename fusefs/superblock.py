"""The superblock: a filesystem's root record, kept in a register on every block server.

It holds the filesystem id, its settings (block size, R, W), the membership (server ids
and URLs), the latest checkpoint of the metadata (which also names the journal chain to
replay after it, and where that chain starts) and the writer's lease.

Every change is a compare-and-swap of the register's generation on every member, and
counts when a majority accepted it (`update`); a server that is merely behind takes the
new value without the comparison. Reading for a mount (`read_quorum`) needs
answers from a majority of the members and takes the highest generation among them: any
two majorities share a server, so the newest accepted change is always seen. Servers that
missed a change are brought up to date by the next one. `read` (any server, highest
generation) only discovers the membership from the URLs a user typed.

Two writers racing for the same generation (two mounts starting at once) can leave the
loser's value on a minority; the winner then writes once more at the next generation, so
the loser's value is never the newest anywhere.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

from . import errors
from .transport import Member, Transport

REGISTER = "superblock"
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Superblock:
    fs_id: str
    block_size: int
    replicas: int
    write_quorum: int
    members: tuple[Member, ...]
    # {"manifest", "checksum", "seq", "chain", "segment"}: see journal.py
    checkpoint: dict | None = None
    # {"mount", "holder", "host", "boot", "pid", "expires", "seconds"} or None when free
    lease: dict | None = None
    generation: int = 0

    def encode(self) -> bytes:
        body = asdict(self)
        body.pop("generation")
        body["members"] = [asdict(m) for m in self.members]
        body["format"] = FORMAT_VERSION
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, generation: int) -> "Superblock":
        try:
            body = json.loads(raw)
        except ValueError:
            raise errors.Rejected("the superblock register holds something that is not "
                                  "JSON; is this a fusefs cluster?") from None
        if body.get("format") != FORMAT_VERSION:
            raise errors.Rejected(
                f"superblock format {body.get('format')} is not one this version of fusefs "
                f"understands ({FORMAT_VERSION}); a filesystem made by an older fusefs has to "
                "be copied off and formatted again")
        return cls(body["fs_id"], body["block_size"], body["replicas"], body["write_quorum"],
                   tuple(Member(m["id"], m["url"]) for m in body["members"]),
                   body.get("checkpoint"), body.get("lease"), generation)

    def with_changes(self, **changes) -> "Superblock":
        return replace(self, **changes)


def probe(transport: Transport, urls: list[str]) -> dict[str, dict | errors.StorageError]:
    """url -> /v1/status JSON, or the error met asking for it; all asked in parallel."""
    def ask(url):
        try:
            return transport.status(Member("", url), timeout=5.0)
        except errors.StorageError as e:
            return e

    with ThreadPoolExecutor(max(1, len(urls))) as pool:
        return dict(zip(urls, pool.map(ask, urls)))


def _ask_all(transport: Transport, members, fn):
    """member -> result or StorageError, asked in parallel."""
    def call(member):
        try:
            return fn(member)
        except errors.StorageError as e:
            return e

    members = list(members)
    with ThreadPoolExecutor(max(1, len(members))) as pool:
        return dict(zip(members, pool.map(call, members)))


def _newest(found: list[tuple[int, bytes]]) -> tuple[int, bytes]:
    """The highest generation; of equal ones (a lost race), the value most servers hold."""
    top = max(g for g, _ in found)
    values = [v for g, v in found if g == top]
    return top, max(values, key=lambda v: (values.count(v), hashlib.sha256(v).digest()))


def read(transport: Transport, urls: list[str]) -> Superblock | None:
    """The newest superblock held by any of `urls`; None if none holds one.

    Raises the first error when no server could be asked at all.
    """
    answers = _ask_all(transport, [Member("", u) for u in urls],
                       lambda m: transport.register_get(m, REGISTER))
    failures = [a for a in answers.values() if isinstance(a, errors.StorageError)]
    found = [a for a in answers.values() if isinstance(a, tuple)]
    if not found and len(failures) == len(urls):
        raise failures[0]
    if not found:
        return None
    return Superblock.decode(*reversed(_newest(found)))


def read_quorum(transport: Transport, members) -> Superblock:
    """The newest superblock among the answers of a majority of `members`."""
    members = list(members)
    answers = _ask_all(transport, members, lambda m: transport.register_get(m, REGISTER))
    failures = {m.url: a for m, a in answers.items() if isinstance(a, errors.StorageError)}
    if len(members) - len(failures) <= len(members) // 2:
        raise errors.Unavailable(
            f"only {len(members) - len(failures)} of {len(members)} servers answered for the "
            f"superblock; a majority is needed: " + "; ".join(map(str, failures.values())))
    found = [a for a in answers.values() if isinstance(a, tuple)]
    if not found:
        raise errors.BlockMissing("no filesystem on these servers")
    generation, raw = _newest(found)
    return Superblock.decode(raw, generation)


def new(members: list[Member], block_size: int, replicas: int,
        write_quorum: int) -> Superblock:
    return Superblock(uuid.uuid4().hex, block_size, replicas, write_quorum, tuple(members))


def write_all(transport: Transport, sb: Superblock, generation: int) -> Superblock:
    """Store `sb` as `generation` on every member (mkfs); every one must accept it."""
    raw = sb.encode()
    for member in sb.members:
        transport.register_put(member, REGISTER, generation, raw)
    return replace(sb, generation=generation)


def update(transport: Transport, sb: Superblock) -> Superblock:
    """Compare-and-swap: replace generation `sb.generation` by `sb` at the next one.

    Succeeds when a majority of members accepted; returns `sb` with its new generation.
    Raises Conflict when the superblock changed meanwhile (someone else wrote it), and
    Unavailable when too few servers answered to know.
    """
    members = list(sb.members)
    majority = len(members) // 2 + 1
    expect, generation = sb.generation, sb.generation + 1
    raw = sb.encode()
    def cas(member):
        try:
            transport.register_put(member, REGISTER, generation, raw, expect=expect)
        except errors.Conflict as e:
            if getattr(e, "current", generation) >= expect:
                raise
            # Merely behind (it missed earlier changes): no value of this generation can
            # be there yet, and a server keeps one value per generation, so it may count.
            transport.register_put(member, REGISTER, generation, raw)

    answers = _ask_all(transport, members, cas)
    accepted = [m for m, a in answers.items() if a is None]
    conflicts = {m: a for m, a in answers.items() if isinstance(a, errors.Conflict)}
    if len(accepted) < majority:
        if len(conflicts) > len(members) - majority:  # no majority can accept any more
            raise errors.Conflict(f"the superblock changed since generation {expect} "
                                  "(another mount or command wrote it)")
        failures = "; ".join(str(a) for a in answers.values() if a is not None)
        raise errors.Unavailable(f"only {len(accepted)} of {len(members)} servers took the "
                                 f"superblock update: {failures}")
    raced = [m for m, c in conflicts.items() if getattr(c, "current", 0) >= generation]
    done = replace(sb, generation=generation)
    if raced:  # a loser's value sits at our generation on a minority: overwrite it
        return update(transport, done)
    return done
