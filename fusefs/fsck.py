"""`fusefs fsck`: check the metadata the cluster holds against itself and against the blocks.

What is checked, on the state a new mount would load (the latest checkpoint plus the
journal after it):

- names: every directory entry names an existing inode inside an existing directory;
- link counts: a file's equals its names, a directory's is 2 plus its subdirectories;
- reachability: every inode is reached from the root, and a directory has one name
  (an open-but-unlinked file of a running writer is only noted: the writer removes it
  at the last close);
- blocks: every referenced block has R intact copies (copies are read and verified by
  the servers, which quarantine bad ones);
- leftovers: blocks on the servers that nothing references (uploads a crashed client
  never recorded, garbage not deleted yet). They are never read; `--repair` deletes them.

`--repair` takes the writer lease (so no mount may be writing), fixes what can be fixed
without guessing — link counts, names of missing inodes, second names of directories,
what the root cannot reach (moved into /lost+found, never deleted), missing or bad
copies of blocks that still have a good copy, leftovers — writes a checkpoint of the
repaired metadata, and gives the lease back. A block with no intact copy anywhere cannot
be repaired: the files that use it are listed. The lease is renewed from a background
thread for the whole run (a large filesystem takes far longer to check than the lease
lasts), and renewed once more, by compare-and-swap, after the servers were listed and
before anything is deleted: if that succeeds, nobody else wrote the filesystem since fsck
took it, so every block listed is one fsck's metadata can judge.

Without `--repair`, a mounted writer goes on during the check: a block found on no server
is looked up in the metadata loaded again (the writer may have dropped and deleted it),
and a new checkpoint that deleted what the check was reading starts the check over
(docs/journal.md, "Leftovers").
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from dataclasses import dataclass, field

from blockserver import protocol

from . import errors, superblock
from .checkpoint import checkpoint_blocks, write_checkpoint
from .host import new_mount_id
from .lease import Lease, new_lease
from .leftovers import list_everything, live_blocks
from .loading import open_metadata, remove_database
from .metadata import ROOT_INO, Metadata
from .segments import segment_id
from .transport import at_given_urls

log = logging.getLogger("fusefs.fsck")

LEASE_SECONDS = 60.0  # the lease --repair holds (renewed every third of it)
LOAD_TRIES = 3  # checks started over when a mounted writer's checkpoints move on meanwhile


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)  # inconsistencies
    warnings: list[str] = field(default_factory=list)  # worth knowing, not wrong
    repaired: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {"clean": self.clean, "errors": self.errors, "warnings": self.warnings,
                "repaired": self.repaired, "counts": self.counts}


class Fsck:
    """One check (and with `repair`, one repair) of the filesystem the superblock names.

    A repair holds a `Lease` (lease.py) for its whole run, as a writer does: renewed from
    a thread, renewed once more between listing the servers and deleting, and given
    back with the repaired checkpoint (or at the end)."""

    def __init__(self, store, transport, sb: superblock.Superblock, *, repair: bool = False,
                 progress=lambda message: None):
        self.store, self.transport = store, transport
        self._sb = sb
        self.lease: Lease | None = None  # held by a repair
        self.repair = repair
        self.progress = progress
        self.report = Report()

    @property
    def sb(self) -> superblock.Superblock:
        """The superblock as read, or as the repair's last change left it."""
        return self.lease.superblock if self.lease is not None else self._sb

    def run(self) -> Report:
        with tempfile.TemporaryDirectory(prefix="fusefs-fsck-") as work:
            if self.repair:
                self.lease = self._take_lease()
            try:
                for attempt in range(1, LOAD_TRIES + 1):
                    try:
                        self._check(work)
                        break
                    except (errors.JournalGap, errors.BlockMissing) as e:
                        if attempt == LOAD_TRIES or not self._moved_on(e):
                            raise
            finally:
                if self.lease is not None:
                    self.lease.stop()
                    if self.sb.lease is not None and self.lease.lost is None:
                        self.lease.release()  # (a lost lease: the first error tells why)
        return self.report

    def _check(self, work: str) -> None:
        sb = self.sb
        self.progress(f"loading metadata (checkpoint of record {sb.checkpoint['seq']})")
        path = os.path.join(work, "metadata.db")
        remove_database(path)
        metadata, _, end = open_metadata(self.store, sb, path)
        try:
            self._check_names(metadata)
            self._check_blocks(metadata, work)
            self._check_leftovers(metadata, end)
            if self.repair:
                self._write_back(metadata, end, work)
        finally:
            metadata.close()

    def _moved_on(self, error: errors.StorageError) -> bool:
        """Whether a mounted writer's new checkpoint deleted what the check was reading
        (the checkpoint it loaded, the journal after it). If so, the check starts over
        from the superblock as it is now. Never while repairing: fsck holds the lease."""
        if self.repair:
            return False
        fresh = self._read_superblock()
        if fresh.checkpoint == self._sb.checkpoint:
            return False
        self.progress(f"the mounted writer wrote a new checkpoint during the check ({error}); "
                      "checking again")
        self._sb, self.report = fresh, Report()
        return True

    def _read_superblock(self) -> superblock.Superblock:
        """The superblock by quorum now, its servers at the URLs this check uses."""
        given = {m.id: m.url for m in (*self._sb.members, *self._sb.leaving)}
        fresh = superblock.read_quorum(self.transport, self._sb.members)
        return fresh.with_changes(members=at_given_urls(fresh.members, given),
                                  leaving=at_given_urls(fresh.leaving, given))

    def _take_lease(self) -> Lease:
        """The writer lease, named for fsck, renewed until the run ends."""
        lease = new_lease(new_mount_id(), LEASE_SECONDS)
        lease["holder"] = f"fusefs fsck --repair ({lease['holder']})"
        taken = Lease.take(self.transport, self._sb, lease)
        taken.subscribe(_say_lost)
        taken.start()
        return taken

    def _problem(self, text: str, fix=None) -> None:
        """Report an inconsistency; with --repair, fix it and say so."""
        if self.repair and fix is not None:
            fix()
            self.report.repaired.append(text)
        else:
            self.report.errors.append(text)

    # -- the namespace ----------------------------------------------------------------------

    def _check_names(self, md: Metadata) -> None:
        """Names, reachability from the root, link counts. With --repair, whatever the
        root cannot reach is moved into /lost+found (never deleted, unless it was an
        unlinked file whose last close never came)."""
        self.progress("checking names and link counts")
        inodes = {ino: (mode, nlink) for ino, mode, nlink in md.inode_modes()}
        self.report.counts["inodes"] = len(inodes)
        for parent, name, ino in md.dentries():
            shown = name.decode(errors="replace")
            if ino not in inodes:
                self._problem(f"name {shown!r} in directory {parent} points to missing inode "
                              f"{ino}", lambda p=parent, n=name: md.remove_dentry(p, n))
            elif parent not in inodes or not stat.S_ISDIR(inodes[parent][0]):
                self._problem(f"name {shown!r} (inode {ino}) lives in {parent}, which is not "
                              "a directory", lambda p=parent, n=name: md.remove_dentry(p, n))
        reached, extra = _walk(md, inodes)
        for parent, name, ino in extra:
            self._problem(f"directory {ino} has a second name {name.decode(errors='replace')!r} "
                          f"in {parent}", lambda p=parent, n=name: md.remove_dentry(p, n))
        named = md.named_inodes()
        writer_running = self.sb.lease is not None and not self.repair
        lost = []
        for ino, (mode, nlink) in sorted(inodes.items()):
            if ino in reached:
                continue
            if nlink == 0 and ino not in named:
                if writer_running:
                    self.report.warnings.append(f"inode {ino} is unlinked but open on the "
                                                "writer; it goes at the last close")
                else:
                    self._problem(f"inode {ino} was unlinked and never removed",
                                  lambda i=ino: md.remove_inode(i))
            else:
                lost.append(ino)  # moved in bulk below: a whole lost tree moves as one
                self._problem(f"inode {ino} cannot be reached from the root", lambda: None)
        if lost and self.repair:
            moved = self._reattach(md, inodes)
            self.report.repaired.append(f"moved {moved} lost trees or files into "
                                        "/lost+found, named by inode number")
        self._check_link_counts(md)
        for ino in md.blocks_without_inode():
            self._problem(f"blocks recorded for missing inode {ino}",
                          lambda i=ino: md.remove_inode(i))

    def _reattach(self, md: Metadata, inodes: dict) -> int:
        """Link the tops of unreachable parts into /lost+found until the root reaches all:
        first inodes no name points to, then one directory of each remaining cycle."""
        found = md.lookup(ROOT_INO, b"lost+found")
        if found is None:
            found = md.create(ROOT_INO, b"lost+found", stat.S_IFDIR | 0o700, 0, 0).ino
        inodes[found] = (stat.S_IFDIR | 0o700, 2)
        moved = 0
        while True:
            reached, _ = _walk(md, inodes)
            unreached = sorted(i for i in inodes if i not in reached)
            if not unreached:
                return moved
            named = md.named_inodes()
            tops = [i for i in unreached if i not in named]
            if not tops:  # only cycles are left: cut one open
                top = next((i for i in unreached if stat.S_ISDIR(inodes[i][0])), unreached[0])
                for parent, name in md.names(top):
                    md.remove_dentry(parent, name)
                tops = [top]
            for ino in tops:
                md.link(ino, found, f"#{ino}".encode())
                moved += 1

    def _check_link_counts(self, md: Metadata) -> None:
        names = md.name_counts()
        subdirs = md.subdir_counts()
        self.report.counts["names"] = sum(names.values())
        for ino, mode, nlink in md.inode_modes():
            if ino != ROOT_INO and ino not in names:
                continue  # reported above
            want = 2 + subdirs.get(ino, 0) if stat.S_ISDIR(mode) else names.get(ino, 0)
            if nlink != want:
                self._problem(f"inode {ino} has link count {nlink}, should be {want}",
                              lambda i=ino, w=want: md.set_nlink(i, w))

    # -- blocks -----------------------------------------------------------------------------

    def _check_blocks(self, md: Metadata, work: str) -> None:
        rows = md.block_rows()
        wanted: dict[str, str] = {}
        users: dict[str, int] = {}
        for ino, block_id, checksum in rows:
            wanted[block_id] = checksum
            users[block_id] = ino
        self.report.counts["blocks"] = len(wanted)
        self.progress(f"verifying {len(wanted)} blocks on {len(self.sb.members)} servers")
        good: dict[str, list] = {b: [] for b in wanted}
        reachable = []
        ids = sorted(wanted)
        for member in self.sb.members:
            try:
                todo = ids
                while todo:
                    # A server reads a bounded number of bytes per request and answers the
                    # rest TOO_LARGE: those are asked again, not taken for missing copies.
                    chunk, again = todo[:500], []
                    for entry in self.transport.batch_check(member, chunk, verify=True):
                        if entry["status"] == protocol.TOO_LARGE:
                            again.append(entry["id"])
                        elif entry["status"] == protocol.OK and \
                                entry.get("checksum") == wanted[entry["id"]]:
                            good[entry["id"]].append(member)
                    if len(again) == len(chunk):
                        raise errors.Unavailable(f"{member.url} verified none of {len(chunk)} "
                                                 "blocks asked for (its batch limit is too "
                                                 "small)", server=member.url)
                    todo = again + todo[len(chunk):]
                reachable.append(member)
            except errors.StorageError as e:
                self.report.warnings.append(f"server {member.url} could not be checked: {e}")
        replicas = self.sb.replicas
        under = 0
        gone = [b for b, holders in good.items() if not holders]
        if gone and self.sb.lease is not None and not self.repair:
            dropped = set(gone) - self._still_referenced(gone, work)
            if dropped:
                log.info("%d blocks the check looked for were dropped by the mounted writer "
                         "meanwhile", len(dropped))
            good = {b: holders for b, holders in good.items() if b not in dropped}
            self.report.counts["dropped_meanwhile"] = len(dropped)
        for block_id, holders in good.items():
            if not holders:
                if len(reachable) == len(self.sb.members):
                    self.report.errors.append(
                        f"block {block_id} of inode {users[block_id]} has no intact copy "
                        "on any server: that file cannot be read in full")
                else:
                    self.report.warnings.append(f"block {block_id} of inode "
                                                f"{users[block_id]} found on no reachable "
                                                "server")
            elif len(holders) < replicas:
                under += 1
                if self.repair:
                    self._re_replicate(block_id, wanted[block_id], holders)
        if under:
            text = f"{under} blocks have fewer than {replicas} intact copies"
            (self.report.repaired if self.repair else self.report.warnings).append(
                text + (" (copied again)" if self.repair else
                        "; `fusefs fsck --repair` copies them again"))
        self.report.counts["under_replicated"] = under

    def _still_referenced(self, block_ids: list[str], work: str) -> set[str]:
        """Which of `block_ids` the metadata references now. A mounted writer may have
        dropped a block (rewritten or removed its file) after the check loaded its state,
        and deleted it once that change was on the servers: gone, but not lost."""
        self.progress(f"{len(block_ids)} blocks found on no server: loading the metadata "
                      "again to see whether the mounted writer dropped them meanwhile")
        path = os.path.join(work, "recheck.db")
        remove_database(path)
        fresh, _, _ = open_metadata(self.store, self._read_superblock(), path)
        try:
            referenced = {block_id for _, block_id, _ in fresh.block_rows()}
        finally:
            fresh.close()
        return referenced.intersection(block_ids)

    def _re_replicate(self, block_id: str, checksum: str, holders: list) -> None:
        data = self.store.get(block_id, checksum)
        ranking = self.store.ranking(block_id)
        for member in ranking:
            if len(holders) >= self.sb.replicas:
                return
            if member in holders:
                continue
            try:
                self.transport.put_block(member, block_id, data, checksum)
                holders.append(member)
            except errors.StorageError as e:
                self.report.warnings.append(f"could not copy block {block_id} to "
                                            f"{member.url}: {e}")

    def _check_leftovers(self, md: Metadata, end: int) -> None:
        """Blocks on the servers that nothing references (garbage included: every record
        of the loaded state is shipped, so the records that dropped it are durable)."""
        self.progress("listing the blocks on every server")
        cp = self.sb.checkpoint
        known = live_blocks(md, self.store, cp, self.sb.fs_id, chain=cp["chain"],
                            segments=range(cp["segment"], end + 1), keep_garbage=False)
        garbage = md.garbage_ids()
        listed, failures = list_everything(self.transport, self.sb.members)
        for url, e in failures.items():
            self.report.warnings.append(f"server {url} could not be listed: {e}")
        leftovers = listed - known
        self.report.counts["unreferenced"] = len(leftovers)
        if not leftovers:
            return
        if self.repair:
            ids = sorted(leftovers)
            # Every id listed existed before this renewal; if it succeeds, no writer came
            # since fsck took the lease, so none of them is a newer writer's block.
            self.lease.renew()
            self.store.delete_many(ids)
            self.report.repaired.append(f"deleted {len(ids)} unreferenced blocks")
            md.forget_garbage([b for b in ids if b in garbage])
        else:
            active = " (a writer is mounted: some may be uploads in progress)" \
                if self.sb.lease else ""
            self.report.warnings.append(
                f"{len(leftovers)} blocks on the servers are referenced by nothing{active}; "
                "they are never read, and `fusefs fsck --repair` deletes them")

    # -- repair -----------------------------------------------------------------------------

    def _write_back(self, md: Metadata, end: int, work: str) -> None:
        """Make the repaired metadata the filesystem's: a checkpoint on our own chain."""
        if not self.report.repaired and md.seq == self.sb.checkpoint["seq"]:
            return
        old = self.sb.checkpoint
        self.progress("writing the repaired metadata as a new checkpoint")
        cp = write_checkpoint(self.store, md, self.sb.fs_id, self.sb.lease["mount"], 1, work)
        if old.get("fence"):
            cp["fence"] = old["fence"]  # the fenced chain's writer may still be running
        self.lease.update(checkpoint=cp, lease=None)
        obsolete = checkpoint_blocks(self.store, old) + [
            segment_id(self.sb.fs_id, old["chain"], n)
            for n in range(old["segment"], end)]
        try:
            self.store.delete_many(obsolete)
        except errors.StorageError:
            pass  # the next fsck --repair finds them


def _say_lost(lost: str | None) -> None:
    if lost:
        log.error("fsck --repair lost its lease: another mount or command wrote the "
                  "superblock; nothing more is deleted")


def _walk(md: Metadata, inodes: dict) -> tuple[set[int], list]:
    """(inodes reachable from the root, names of directories reached a second time)."""
    reached = {ROOT_INO}
    extra = []
    todo = [ROOT_INO]
    while todo:
        parent = todo.pop()
        for name, ino, _ in md.child_entries(parent):
            if ino not in inodes:
                continue
            is_dir = stat.S_ISDIR(inodes[ino][0])
            if ino in reached:
                if is_dir:
                    extra.append((parent, name, ino))
                continue
            reached.add(ino)
            if is_dir:
                todo.append(ino)
    return reached, extra


def format_report(report: Report, repair: bool) -> str:
    lines = []
    counts = report.counts
    lines.append(f"{counts.get('inodes', 0)} inodes, {counts.get('names', 0)} names, "
                 f"{counts.get('blocks', 0)} blocks checked")
    for text in report.repaired:
        lines.append(f"repaired: {text}")
    for text in report.errors:
        lines.append(f"ERROR: {text}")
    for text in report.warnings:
        lines.append(f"note: {text}")
    if report.clean:
        lines.append("the filesystem is consistent" + (" (after repairs)" if report.repaired
                                                        else ""))
    else:
        lines.append(f"{len(report.errors)} problems found" +
                     ("" if repair else "; `fusefs fsck --repair` fixes what can be fixed"))
    return "\n".join(lines)
