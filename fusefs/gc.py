"""`fusefs gc`: find, and with --delete remove, blocks that no metadata can ever reference.

Leftovers are blocks on the servers that nothing will read again: uploads a killed client
never recorded, uploads of a writer that lost its lease, checkpoints and journal segments
nobody got to delete, copies of retried uploads. gc judges every listed block by the one
rule of leftovers.py (`live_blocks`) and works beside a mounted writer without taking its
lease. It never writes the superblock or any block; its only change is the deletion.

The steps, and why each makes a deletion safe:

1. Read the superblock by quorum and note who may be writing (`_writer_of`): the lease's
   mount id, or, with no lease, the chain the last writer left. A writer whose lease is
   held but whose chain is not named yet is still starting (it may be carrying records
   of a crashed process over from its local database, whose blocks carry that process's
   tag): gc refuses (`Refused`). A live lease's tag (`lease["tag"]`, the first digits of
   every block id its process creates) is kept out of the judgement: that writer's
   uploads not yet recorded or shipped carry it. A holder proven gone (`holder_gone`:
   same machine, its process ended) whose local database is found on this machine is
   judged instead: what that database references is kept, since a mount from the same
   cache directory carries its records over; its unrecorded uploads are collected.
   Without that database, the tag stays out.
2. List every server, the members and those being drained.
3. After listing, read the superblock again and load the metadata it names into a
   private database; a checkpoint written meanwhile (a journal gap, a checkpoint
   deleted under the load) means read it again and load again. Live: `live_blocks` of
   that state, garbage counted dead (every loaded record is shipped, so the records
   that dropped it are durable), the chain's segments from the checkpoint's to two
   past the end replayed. Listing first is what makes this complete: any block listed
   existed before the load. A data or checkpoint block the writer recorded after the
   load carries its tag; a segment it stored before the listing was replayed by the load
   (or is the partial one at the end, which the range keeps); one stored after the
   listing is not in the listing. So every listed block is either in the loaded state,
   the writer's, or dead.
4. Leftovers = listed - live - the writer's tag.
5. Just before deleting, read the superblock by quorum again: if the writer changed (a
   mount came, went or took over, fsck --repair ran, mkfs --force), nothing is deleted
   (`WriterChanged`). Each server is then asked to delete what it listed, and nothing
   else.

A crash of gc at any step leaves the cluster as before, or with some leftovers deleted:
run it again. A server that cannot be listed or answer the deletion keeps its leftovers;
the run says so and is not complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field

from blockserver.protocol import format_size

from . import errors, superblock
from .lease import describe_lease, holder_gone
from .leftovers import live_blocks
from .loading import open_metadata, remove_database
from .metadata import Metadata
from .mounts import runtime_dir
from .transport import at_given_urls

log = logging.getLogger("fusefs.gc")

LOAD_TRIES = 5  # loads retried when a checkpoint moved the journal on meanwhile
DELETE_BATCH = 1000  # ids per batch delete request
LIST_PAGE = 5000


class Refused(Exception):
    """gc cannot tell safely which blocks are leftovers now (say why; run it later)."""


class WriterChanged(Refused):
    """The writer of the filesystem changed while gc ran: nothing was deleted."""


@dataclass
class ServerReport:
    url: str
    listed: int = 0
    leftovers: dict[str, int] = field(default_factory=dict)  # id -> bytes
    deleted: int = 0
    error: str | None = None  # why it could not be listed or could not delete

    def as_dict(self) -> dict:
        return {"listed": self.listed, "leftover_blocks": len(self.leftovers),
                "leftover_bytes": sum(self.leftovers.values()), "deleted": self.deleted,
                "error": self.error}


@dataclass
class Plan:
    """What one survey found: per server, the leftovers it holds."""

    writer: tuple  # `_writer_of` the superblock at step 1
    holder: str | None  # who holds the writer lease, in words
    servers: list[ServerReport]
    kept_for_writer: int = 0  # listed blocks with the running writer's tag (not judged)
    deleted: bool = False

    @property
    def ids(self) -> set[str]:
        return {b for s in self.servers for b in s.leftovers}

    @property
    def leftover_bytes(self) -> int:
        return sum(sum(s.leftovers.values()) for s in self.servers)

    @property
    def complete(self) -> bool:
        """Every server listed (and, after a deletion, every one deleted its leftovers)."""
        return all(s.error is None for s in self.servers)

    @property
    def exit_status(self) -> int:
        """0 nothing left to collect (none found, or all deleted), 1 a dry run found
        leftovers, 2 incomplete (a server could not be listed or could not delete)."""
        if not self.complete:
            return 2
        return 1 if self.ids and not self.deleted else 0

    def as_dict(self) -> dict:
        return {"leftover_blocks": len(self.ids), "leftover_bytes": self.leftover_bytes,
                "deleted": self.deleted, "complete": self.complete,
                "exit_status": self.exit_status,
                "writer": self.holder, "kept_for_writer": self.kept_for_writer,
                "servers": {s.url: s.as_dict() for s in self.servers}}


def _writer_of(sb: superblock.Superblock) -> tuple:
    """Who may be writing: (filesystem, lease mount id or None, chain the superblock
    names). A writer coming, going or taking over changes it; lease renewals and the
    running writer's checkpoints (same chain) do not."""
    lease = sb.lease or {}
    return sb.fs_id, lease.get("mount"), sb.checkpoint["chain"]


class Collector:
    """One gc run: `survey()` (steps 1-4) then, to act, `delete(plan)` (step 5).

    `store` loads the metadata (reads only); `transport` lists and deletes; `members` are
    the servers the superblock is read from by quorum (their URLs as given)."""

    def __init__(self, store, transport, members, *, work_dir: str,
                 progress=lambda message: None, listed=lambda count: None, cache_dirs=()):
        self.store, self.transport = store, transport
        self.members = list(members)
        self.work_dir = work_dir
        self.progress = progress  # a step, in words
        self.listed = listed  # blocks listed so far on the server being listed
        self.cache_dirs = list(cache_dirs)  # where to look for a dead writer's database

    def read_superblock(self) -> superblock.Superblock:
        sb = superblock.read_quorum(self.transport, self.members)
        given = {m.id: m.url for m in self.members}  # URLs as given win over recorded ones
        return sb.with_changes(members=at_given_urls(sb.members, given),
                               leaving=at_given_urls(sb.leaving, given))

    # -- steps 1 to 4 -------------------------------------------------------------------------

    def survey(self) -> Plan:
        self.progress("reading the superblock")
        sb = self.read_superblock()
        writer = _writer_of(sb)
        tag, kept = self._writer_tag(sb)
        reports = [ServerReport(m.url) for m in sb.servers]
        listings = self._list(sb.servers, reports)
        live = self._live(writer) | kept
        plan = Plan(writer, describe_lease(sb.lease) if sb.lease else None, reports)
        for report, listing in zip(reports, listings):
            for block_id, size in listing.items():
                if tag and block_id.startswith(tag):
                    plan.kept_for_writer += 1
                elif block_id not in live:
                    report.leftovers[block_id] = size
        self.progress(f"{len(plan.ids)} leftover blocks ({plan.leftover_bytes} bytes) found")
        return plan

    def _writer_tag(self, sb: superblock.Superblock) -> tuple[str | None, set[str]]:
        """(the tag whose blocks are not judged, block ids a dead writer's database still
        references). See step 1 of the module docstring."""
        lease = sb.lease
        if lease is None:
            return None, set()
        if sb.checkpoint["chain"] != lease["mount"]:
            raise Refused(f"the writer {describe_lease(lease)} has not started its journal "
                          "yet (it is mounting, fsck --repair is running, or it was mounted "
                          "with --unsafe-no-journal); run gc again once it runs or is "
                          "unmounted")
        if not lease.get("tag"):
            raise Refused(f"the writer {describe_lease(lease)} is an older fusefs that does "
                          "not say which blocks are its own; run gc after it is unmounted")
        if holder_gone(lease):
            kept = self._dead_writer_blocks(sb)
            if kept is not None:
                self.progress("the writer holding the lease has ended; keeping what its "
                              f"local metadata references ({len(kept)} blocks)")
                return None, kept
            self.progress("the writer holding the lease has ended, but its local metadata "
                          "is not found here (--cache-dir): its blocks are left alone; the "
                          "next mount sweeps them")
        else:
            self.progress(f"a writer holds the lease, {describe_lease(lease)}: its blocks "
                          f"(ids starting {lease['tag']}) are left alone")
        return lease["tag"], set()

    def _list(self, servers, reports: list[ServerReport]) -> list[dict[str, int]]:
        listings = []
        for member, report in zip(servers, reports):
            self.progress(f"listing {member.url}")
            listing: dict[str, int] = {}
            try:
                after = ""
                while True:
                    page, after = self.transport.list_blocks(member, after, LIST_PAGE)
                    listing.update((b["id"], int(b.get("size", 0))) for b in page)
                    self.listed(len(listing))
                    if not after:
                        break
            except errors.StorageError as e:
                report.error = f"could not be listed: {e}"
                listing = {}
            report.listed = len(listing)
            listings.append(listing)
        return listings

    def _live(self, writer: tuple) -> set[str]:
        """Load the metadata the superblock names now (after the listing) and apply the
        live-blocks rule to it; load again when a checkpoint moved the journal on."""
        path = os.path.join(self.work_dir, "metadata.db")
        for attempt in range(LOAD_TRIES):
            sb = self.read_superblock()
            if _writer_of(sb) != writer:
                raise WriterChanged("the filesystem changed writer while gc ran; run it again")
            self.progress(f"loading metadata (checkpoint of record {sb.checkpoint['seq']})")
            remove_database(path)
            try:
                return _live_in(self.store, sb, path)
            except (errors.JournalGap, errors.BlockMissing) as e:
                log.info("the journal moved on while loading (%s); loading again", e)
                last = e
        raise Refused(f"the writer's checkpoints kept moving the journal on while gc loaded "
                      f"it ({last}); run gc again")

    def _dead_writer_blocks(self, sb: superblock.Superblock) -> set[str] | None:
        """What the local database of the ended lease holder references (it is on this
        machine, or holder_gone could not have proven it ended), or None if not found."""
        for state_dir in _state_dirs(sb, self.cache_dirs):
            found = _blocks_of_database(state_dir, sb, self.work_dir)
            if found is not None:
                return found
        return None

    # -- step 5 -----------------------------------------------------------------------------

    def delete(self, plan: Plan) -> None:
        """Delete each server's leftovers on it, once a quorum read shows the same writer
        as the survey. WriterChanged (and nothing deleted) otherwise."""
        self.progress("checking that the writer did not change")
        sb = self.read_superblock()
        if _writer_of(sb) != plan.writer:
            raise WriterChanged("the filesystem changed writer while gc ran; nothing was "
                                "deleted; run it again")
        by_url = {m.url: m for m in sb.servers}
        for report in plan.servers:
            if report.leftovers and report.url in by_url:
                self._delete_on(by_url[report.url], report)
        plan.deleted = True

    def _delete_on(self, member, report: ServerReport) -> None:
        ids = sorted(report.leftovers)
        self.progress(f"deleting {len(ids)} blocks on {member.url}")
        try:
            for start in range(0, len(ids), DELETE_BATCH):
                self.transport.batch_delete(member, ids[start:start + DELETE_BATCH])
                report.deleted += len(ids[start:start + DELETE_BATCH])
        except errors.StorageError as e:
            report.error = f"could not delete: {e}"


def _live_in(store, sb: superblock.Superblock, path: str) -> set[str]:
    metadata, _, end = open_metadata(store, sb, path)
    try:
        cp = sb.checkpoint
        return live_blocks(metadata, store, cp, sb.fs_id, chain=cp["chain"],
                           segments=range(cp["segment"], end + 2), keep_garbage=False)
    finally:
        metadata.close()


def _state_dirs(sb: superblock.Superblock, cache_dirs) -> list[str]:
    """Where the ended lease holder's database may be: the state directory its mount
    registered (a daemon killed with -9 leaves its record), then `<cache dir>/<fs_id>` of
    each cache directory given, FUSEFS_CACHE_DIR and the default one."""
    found = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(runtime_dir())):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(runtime_dir(), name)) as f:
                    record = json.load(f)
                if record.get("pid") == sb.lease.get("pid") and record.get("state_dir"):
                    found.append(record["state_dir"])
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "fusefs")
    for root in [*cache_dirs, os.environ.get("FUSEFS_CACHE_DIR"), default]:
        if root:
            found.append(os.path.join(os.path.abspath(root), sb.fs_id))
    return list(dict.fromkeys(found))


def _blocks_of_database(state_dir: str, sb: superblock.Superblock,
                        work_dir: str) -> set[str] | None:
    """The blocks referenced by the database of `state_dir`, if it
    is the lease holder's (this filesystem, the lease's chain). It is copied under the
    state directory's lock, so a mount starting there meanwhile is not read half-way;
    None when it is not there, not the holder's, or in use."""
    source = os.path.join(state_dir, "metadata.db")
    if not os.path.exists(source):
        return None
    copy = os.path.join(tempfile.mkdtemp(dir=work_dir), "metadata.db")
    try:
        with open(os.path.join(state_dir, "lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for suffix in ("", "-wal"):
                if os.path.exists(source + suffix):
                    shutil.copyfile(source + suffix, copy + suffix)
        metadata = Metadata(copy)
    except (OSError, sqlite3.Error, errors.FusefsError) as e:  # unreadable: not used
        log.info("local metadata in %s not usable: %s", state_dir, e)
        return None
    try:
        get = metadata.setting
        if get("fs_id") != sb.fs_id or get("chain") != sb.lease["mount"]:
            return None
        # (its garbage needs no keeping: a block dropped by a record not shipped is
        # still referenced by the state gc loaded; one dropped by a shipped record is dead)
        return metadata.referenced_blocks()
    finally:
        metadata.close()


def format_plan(plan: Plan) -> str:
    """The summary for people: per server, what is (or was) to be collected."""
    total = f"{len(plan.ids)} leftover blocks ({format_size(plan.leftover_bytes)})"
    if not plan.ids:
        head = "no leftover blocks: nothing to collect"
    elif plan.deleted:
        head = f"{total}: deleted"
    else:
        head = f"{total} would be deleted; run again with --delete to delete them"
    lines = [head]
    for s in plan.servers:
        line = f"  {s.url}: {s.listed} blocks, {len(s.leftovers)} leftovers " \
               f"({format_size(sum(s.leftovers.values()))})"
        if plan.deleted and s.leftovers:
            line += f", {s.deleted} deleted"
        lines.append(line + (f"; {s.error}" if s.error else ""))
    if plan.kept_for_writer:
        lines.append(f"{plan.kept_for_writer} blocks of the running writer, {plan.holder}, "
                     "were not judged (its uploads in progress carry its tag); gc collects "
                     "those left over once it is unmounted")
    if not plan.complete:
        lines.append("incomplete: the servers above with an error keep their leftovers; "
                     "run gc again once they answer")
    return "\n".join(lines)
