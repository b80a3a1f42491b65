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
loser's value on a minority; a winner that sees the conflict writes once more at the next
generation. An update returns once a majority accepted it, without waiting for a hung
server, so a loser's value may stay at the winner's generation on a server it did not
wait for (it did not answer within a second): readers then take the value most servers
hold (`_newest`), and the next change overwrites it.

An update is idempotent: a server that answers "conflict" because it already holds our
exact value at our generation (an earlier try of the same update whose answer was lost)
counts as accepting it, so retrying one's own write is never a conflict. Generations at
or above 2^63 are never written and never believed: a server holding one (a replayed or
forged register write) is treated as a server that did not answer, and has to have its
register cleared by its operator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import asdict, dataclass, replace

from . import errors
from .transport import Member, Transport, at_given_urls

log = logging.getLogger("fusefs.superblock")

REGISTER = "superblock"
FORMAT_VERSION = 2
GENERATION_LIMIT = 1 << 63  # generations at or above it are refused and never believed
RACED_RETRIES = 3  # rewrites over a racing loser's value before giving up with Conflict


@dataclass(frozen=True)
class Superblock:
    fs_id: str
    block_size: int
    replicas: int
    write_quorum: int
    members: tuple[Member, ...]
    # {"manifest", "checksum", "seq", "chain", "segment"}: see checkpoint.py
    checkpoint: dict | None = None
    # {"mount", "holder", "host", "boot", "pid", "expires", "seconds"} or None when free
    lease: dict | None = None
    generation: int = 0
    # Servers being drained (`fusefs servers remove`/`replace`): still read from, never a
    # home; they leave once they hold nothing (fusefs/membership.py).
    leaving: tuple[Member, ...] = ()

    @property
    def servers(self) -> tuple[Member, ...]:
        """Every server that may hold copies: the members, then those leaving."""
        return self.members + tuple(m for m in self.leaving if m not in self.members)

    def encode(self) -> bytes:
        body = asdict(self)
        body.pop("generation")
        body["members"] = [m.as_dict() for m in self.members]
        body.pop("leaving")
        if self.leaving:  # (absent otherwise: the encoding older versions wrote)
            body["leaving"] = [m.as_dict() for m in self.leaving]
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
                   tuple(Member.from_dict(m) for m in body["members"]),
                   body.get("checkpoint"), body.get("lease"), generation,
                   tuple(Member.from_dict(m) for m in body.get("leaving", ())))

    def with_changes(self, **changes) -> "Superblock":
        return replace(self, **changes)


def probe(transport: Transport, urls: list[str],
          majority: bool = False) -> dict[str, dict | errors.StorageError]:
    """url -> /v1/status JSON, or the error met asking for it; all asked in parallel.
    With `majority`, once more than half answered the others get STRAGGLER_GRACE more
    (a hung server is left out rather than waited for)."""
    members = [Member("", u) for u in urls]

    def ask(member):
        return transport.status(member, timeout=5.0)
    answers = ask_until(transport, members, ask, _most_answered(urls)) if majority else \
        ask_all(transport, members, ask)
    return {m.url: a for m, a in answers.items()}


def _most_answered(asked, found=lambda answer: True):
    """A `settled` test for `ask_until`: more than half of `asked` answered, and at least
    one answer is `found`."""
    def settled(answers):
        good = [a for a in answers.values() if not isinstance(a, errors.StorageError)]
        return len(good) > len(asked) // 2 and any(map(found, good))
    return settled


def ask_all(transport: Transport, members, fn):
    """member -> result or StorageError, asked in parallel."""
    def call(member):
        try:
            return fn(member)
        except errors.StorageError as e:
            return e

    members = list(members)
    with ThreadPoolExecutor(max(1, len(members))) as pool:
        return dict(zip(members, pool.map(call, members)))


STRAGGLER_GRACE = 1.0  # seconds a decided update still waits for the other answers


def ask_until(transport: Transport, members, fn, settled):
    """Like `ask_all`, but once `settled(answers so far)` is true the other answers are
    awaited for STRAGGLER_GRACE seconds only: a hung server is not waited for (its request
    ends by its own timeout, in the background), while a server that answers at once is
    heard (a racing loser's value there is then overwritten, see `update`)."""
    def call(member):
        try:
            return fn(member)
        except errors.StorageError as e:
            return e

    pool = ThreadPoolExecutor(max(1, len(members)))
    try:
        futures = {pool.submit(call, m): m for m in members}
        answers: dict = {}
        pending = set(futures)
        for future in as_completed(futures):
            answers[futures[future]] = future.result()
            pending.discard(future)
            if settled(answers):
                break
        done, _ = wait(pending, timeout=STRAGGLER_GRACE)
        for future in done:
            answers[futures[future]] = future.result()
        return answers
    finally:
        pool.shutdown(wait=False)


def _cas_settled(answers: dict, groups: list) -> bool:
    """A compare-and-swap round is decided once every group has a majority that
    accepted, without a conflict so far (a conflict waits for every answer, to tell a
    lost race from a raced loser's leftover)."""
    if any(isinstance(a, errors.Conflict) for a in answers.values()):
        return False
    return all(len([m for m in g if answers.get(m, 0) is None]) > len(g) // 2
               for g in groups)


def _poisoned(url: str, generation: int) -> errors.Rejected:
    return errors.Rejected(
        f"{url}: the superblock register holds generation {generation}, which no fusefs "
        "client ever writes (a replayed or forged request): this server's answer is "
        "ignored. Clear its register (stop it and delete its superblock register file) "
        "and the next superblock change brings it up to date", server=url)


def _answers(transport: Transport, members, settled=None) -> dict:
    """member -> (generation, value), None (no register) or StorageError; a generation
    past GENERATION_LIMIT counts as an error, never as the newest value. With `settled`,
    the answers once it holds (see `ask_until`), else every member's."""
    def ask(member):
        return transport.register_get(member, REGISTER)
    answers = ask_all(transport, members, ask) if settled is None else \
        ask_until(transport, members, ask, settled)
    for member, answer in answers.items():
        if isinstance(answer, tuple) and not 0 <= answer[0] < GENERATION_LIMIT:
            answers[member] = _poisoned(member.url, answer[0])
    return answers


def _newest(found: list[tuple[int, bytes]]) -> tuple[int, bytes]:
    """The highest generation; of equal ones (a lost race), the value most servers hold."""
    top = max(g for g, _ in found)
    values = [v for g, v in found if g == top]
    return top, max(values, key=lambda v: (values.count(v), hashlib.sha256(v).digest()))


def read(transport: Transport, urls: list[str], everyone: bool = False) -> Superblock | None:
    """The newest superblock held by any of `urls`; None if none holds one.

    Once more than half of them answered and one of those holds a superblock, the others
    get STRAGGLER_GRACE more: a hung server is left out rather than waited for (the reader
    then reads by quorum among the members this names). "None" waits for every answer, as
    does `everyone` (mkfs, which must not format over a filesystem on any of them).
    Raises the first error when no server could be asked at all.
    """
    holds = _most_answered(urls, lambda answer: isinstance(answer, tuple))
    answers = _answers(transport, [Member("", u) for u in urls], None if everyone else holds)
    failures = [a for a in answers.values() if isinstance(a, errors.StorageError)]
    found = [a for a in answers.values() if isinstance(a, tuple)]
    if not found and len(failures) == len(urls):
        raise failures[0]
    if not found:
        return None
    return Superblock.decode(*reversed(_newest(found)))


def locate(transport: Transport, urls: list[str]) -> Superblock:
    """The filesystem on the servers at `urls` (one reachable member is enough), read by
    quorum, its members and leaving servers at the URLs given for them where the user
    typed one (servers may have moved since the superblock recorded theirs). Raises
    BlockMissing when no filesystem is there, and what reading met otherwise."""
    found = read(transport, urls)
    if found is None:
        raise errors.BlockMissing("no filesystem on these servers (`fusefs mkfs` makes one)")
    given = {s["server_id"]: url for url, s in probe(transport, urls, majority=True).items()
             if isinstance(s, dict)}

    sb = read_quorum(transport, at_given_urls(found.members, given))
    for _ in range(3):  # (the URLs were of servers that left: follow the members named)
        if {m.id for m in sb.members} == {m.id for m in found.members}:
            break
        found, sb = sb, read_quorum(transport, at_given_urls(sb.members, given))
    return sb.with_changes(members=at_given_urls(sb.members, given),
                           leaving=at_given_urls(sb.leaving, given))


def read_quorum(transport: Transport, members) -> Superblock:
    """The newest superblock among the answers of a majority of `members`.

    Returns as soon as a majority answered (a stalled server is not waited for), unless
    those answers hold two values at their newest generation (a lost race): then every
    server's answer is awaited, and the value most of them hold wins."""
    members = list(members)
    answers = _first_majority(transport, members)
    failures = {m.url: a for m, a in answers.items() if isinstance(a, errors.StorageError)}
    if len(answers) - len(failures) <= len(members) // 2:
        raise errors.Unavailable(
            f"only {len(answers) - len(failures)} of {len(members)} servers answered for "
            f"the superblock; a majority is needed: " + "; ".join(map(str, failures.values())))
    found = [a for a in answers.values() if isinstance(a, tuple)]
    if not found:
        raise errors.BlockMissing("no filesystem on these servers")
    generation, raw = _newest(found)
    return Superblock.decode(raw, generation)


def _first_majority(transport: Transport, members: list) -> dict:
    """member -> answer (as `_answers`) of the first majority that answered, or of every
    member when that is needed to tell (too many failures, or a tie at the top)."""
    def ask(member):
        answer = transport.register_get(member, REGISTER)
        if answer is not None and not 0 <= answer[0] < GENERATION_LIMIT:
            raise _poisoned(member.url, answer[0])
        return answer

    pool = ThreadPoolExecutor(max(1, len(members)))
    try:
        futures = {pool.submit(ask, m): m for m in members}
        answers: dict = {}
        for future in as_completed(futures):
            try:
                answers[futures[future]] = future.result()
            except errors.StorageError as e:
                answers[futures[future]] = e
            if _decided(answers, len(members)):
                return answers
        return answers
    finally:
        pool.shutdown(wait=False)  # a stalled server's request ends by its own timeout


def _decided(answers: dict, total: int) -> bool:
    good = [a for a in answers.values() if not isinstance(a, errors.StorageError)]
    if len(good) <= total // 2:
        return False
    found = [a for a in good if a is not None]
    if not found:
        return True
    top = max(g for g, _ in found)
    return len({v for g, v in found if g == top}) == 1


def new(members: list[Member], block_size: int, replicas: int,
        write_quorum: int) -> Superblock:
    return Superblock(uuid.uuid4().hex, block_size, replicas, write_quorum, tuple(members))


def write_all(transport: Transport, sb: Superblock, generation: int) -> Superblock:
    """Store `sb` as `generation` on every member (mkfs); every one must accept it, except
    one whose register is poisoned (see `_poisoned`), as long as a majority took it."""
    if not 0 < generation < GENERATION_LIMIT:
        raise errors.Rejected(f"superblock generation {generation} is out of range")
    raw = sb.encode()
    poisoned = []
    for member in sb.members:
        try:
            transport.register_put(member, REGISTER, generation, raw)
        except errors.Conflict as e:
            if getattr(e, "current", 0) < GENERATION_LIMIT:
                raise
            poisoned.append(_poisoned(member.url, e.current))
    if poisoned and len(sb.members) - len(poisoned) <= len(sb.members) // 2:
        raise poisoned[0]
    for e in poisoned:
        log.warning("%s", e)
    return replace(sb, generation=generation)


def update(transport: Transport, sb: Superblock, previous=()) -> Superblock:
    """Compare-and-swap: replace generation `sb.generation` by `sb` at the next one.

    Succeeds when a majority of members accepted; returns `sb` with its new generation.
    Raises Conflict when the superblock changed meanwhile (someone else wrote it), and
    Unavailable when too few servers answered to know. Calling it again with the same
    `sb` after Unavailable is safe: servers that took the first try count as accepting.

    `previous`: the members before a membership change. The value then goes to both sets
    and needs a majority of each, so a reader that still knows only the old members (a
    mount that has not picked the change up) sees it as surely as one that knows the new.
    """
    for _ in range(RACED_RETRIES + 1):
        done, raced = _update_once(transport, sb, tuple(previous))
        if not raced:
            return done
        sb = done  # a loser's value sits at our generation on a minority: overwrite it
    raise errors.Conflict(f"the superblock kept changing under generation {sb.generation} "
                          "(another mount or command keeps writing it)")


def _update_once(transport: Transport, sb: Superblock,
                 previous: tuple = ()) -> tuple[Superblock, bool]:
    """One compare-and-swap round: (sb at its new generation, whether a racing loser's
    value sits at that generation on some server)."""
    members = list(sb.members) + [m for m in previous if m not in sb.members]
    groups = [list(sb.members)] + ([list(previous)] if previous else [])
    expect, generation = sb.generation, sb.generation + 1
    if generation >= GENERATION_LIMIT:
        raise errors.Rejected(f"superblock generation {generation} is out of range")
    raw = sb.encode()
    answers = ask_until(transport, members,
                         lambda m: _cas(transport, m, expect, generation, raw),
                         lambda got: _cas_settled(got, groups))
    accepted = [m for m, a in answers.items() if a is None]
    conflicts = {m: a for m, a in answers.items() if isinstance(a, errors.Conflict)}
    for group in groups:
        majority = len(group) // 2 + 1
        if len([m for m in group if m in accepted]) >= majority:
            continue
        if len([m for m in group if m in conflicts]) > len(group) - majority:
            raise errors.Conflict(f"the superblock changed since generation {expect} "
                                  "(another mount or command wrote it)")
        failures = "; ".join(str(a) for a in answers.values() if a is not None)
        raise errors.Unavailable(f"only {len(accepted)} of {len(members)} servers took the "
                                 f"superblock update: {failures}")
    raced = any(getattr(c, "current", 0) >= generation for c in conflicts.values())
    return replace(sb, generation=generation), raced


def _cas(transport: Transport, member: Member, expect: int, generation: int,
         raw: bytes) -> None:
    """Write `raw` as `generation` on one member if it holds `expect` (or is merely
    behind). Returns when the member holds exactly our value at our generation."""
    try:
        transport.register_put(member, REGISTER, generation, raw, expect=expect)
        return
    except errors.Conflict as e:
        current = getattr(e, "current", generation)
        if current >= GENERATION_LIMIT:
            raise _poisoned(member.url, current) from None
        if current == generation and \
                transport.register_get(member, REGISTER) == (generation, raw):
            return  # our own earlier try of this very update reached it
        if current >= expect:
            raise
    # Merely behind (it missed earlier changes): no value of this generation can be there
    # yet, and a server keeps one value per generation, so it may count.
    transport.register_put(member, REGISTER, generation, raw)
