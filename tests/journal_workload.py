"""A reproducible metadata workload and what tests compare databases by (helpers shared by
the journal, fencing and metadata tests; nothing here is a test or a fixture).

- `Workload(md, seed).run(n)`: random changes a filesystem could make, every kind of record;
- `dump(md)`: every row a checkpoint or the journal carries, in key order;
- `records_of(md)`: the decoded records a database has not shipped yet.
"""

from __future__ import annotations

import random
import stat

from fusefs.metadata import BlockRef, Metadata, Patch, decode_record

TABLES = {"inodes": "ino", "dentries": "parent, name", "blocks": "ino, idx",
          "patches": "ino, idx, n", "xattrs": "ino, name", "garbage": "block_id"}


def dump(md: Metadata) -> dict[str, list[tuple]]:
    """Every row of every table that a checkpoint or the journal carries, in key order."""
    return {table: md._query(f"SELECT * FROM {table} ORDER BY {key}")
            for table, key in TABLES.items()}


NAMES = [b"a", b"b", b"c", b"\xff\xfe", b"caf\xc3\xa9", b"line\nbreak", b"\x80\x81\x82", b" "]
XATTR_NAMES = [b"user.a", b"user.\xff\xfe", b"trusted.t"]


class Workload:
    """Random but reproducible metadata changes, each one a filesystem could make."""

    def _ref(self) -> BlockRef:
        """A block-map entry, a third of them with patches (small blocks over ranges)."""
        rng = self.rng
        length = rng.randrange(1, 65537)
        small = rng.randbytes(16).hex()
        patches = tuple(Patch(start, rng.randrange(1, length - start + 1),
                              rng.choice([small, rng.randbytes(16).hex()]),
                              rng.randbytes(16).hex(), rng.randrange(0, 4096))
                        for start in sorted(rng.randrange(0, length)
                                            for _ in range(rng.choice([0, 0, 1, 3]))))
        return BlockRef(rng.randbytes(16).hex(), rng.randbytes(16).hex(), length, patches)

    def __init__(self, md: Metadata, seed: int):
        self.md = md
        self.rng = random.Random(seed)
        self.removed: list[int] = []  # inode numbers removed, for uploads that finish late

    def run(self, count: int) -> None:
        made = 0
        while made < count:
            if self.change():
                made += 1

    def _ids(self, sql: str, args=()) -> list[int]:
        return [row[0] for row in self.md._query(sql, args)]

    def _remove(self, ino: int) -> None:
        self.md.remove_inode(ino)
        self.removed.append(ino)

    def change(self) -> bool:
        """Make one random change; False when the one picked does not apply right now."""
        md, rng = self.md, self.rng
        live = f"(mode & {0o170000}) = ? AND nlink > 0 ORDER BY ino"  # of a type, not orphaned
        dirs = self._ids(f"SELECT ino FROM inodes WHERE {live}", (stat.S_IFDIR,))
        files = self._ids(f"SELECT ino FROM inodes WHERE {live}", (stat.S_IFREG,))
        inodes = self._ids("SELECT ino FROM inodes ORDER BY ino")
        entries = md._query("SELECT d.parent, d.name, d.ino, i.mode FROM dentries d "
                           "JOIN inodes i ON i.ino = d.ino ORDER BY d.parent, d.name")
        t = rng.randrange(1, 1 << 62)
        op = rng.choice(["file", "file", "dir", "symlink", "link", "unlink", "unlink", "rename",
                         "rename", "rename", "attrs", "xattr", "rmxattr", "commit", "commit",
                         "truncate", "punch", "late_commit", "reap"])
        if op in ("file", "dir", "symlink"):
            parent, name = rng.choice(dirs), rng.choice(NAMES)
            if md.lookup(parent, name) is not None:
                return False
            mode = {"file": stat.S_IFREG | 0o644, "dir": stat.S_IFDIR | 0o755,
                    "symlink": stat.S_IFLNK | 0o777}[op]
            target = rng.randbytes(rng.randrange(1, 16)) if op == "symlink" else None
            md.create(parent, name, mode, rng.randrange(5000), rng.randrange(5000),
                      target=target)
        elif op == "link":
            parent, name = rng.choice(dirs), rng.choice(NAMES)
            if not files or md.lookup(parent, name) is not None:
                return False
            md.link(rng.choice(files), parent, name)
        elif op == "unlink":
            if not entries:
                return False
            parent, name, ino, mode = rng.choice(entries)
            is_dir = stat.S_ISDIR(mode)
            if is_dir and md.has_children(ino):
                return False
            if md.unlink(parent, name, ino, is_dir) <= 0 and rng.random() < 0.8:
                self._remove(ino)  # else it stays an orphan (open when its last name went)
        elif op == "rename":
            if not entries:
                return False
            parent, name, ino, mode = rng.choice(entries)
            is_dir = stat.S_ISDIR(mode)
            new_parent, new_name = rng.choice(dirs), rng.choice(NAMES)
            if is_dir and md.is_ancestor(ino, new_parent):
                return False
            replaced = md.lookup(new_parent, new_name)
            replaced_is_dir = False
            if replaced is not None:
                if replaced == ino:
                    return False
                replaced_is_dir = md.inode(replaced).is_dir
                if replaced_is_dir != is_dir or (replaced_is_dir and md.has_children(replaced)):
                    return False
            left = md.rename(parent, name, new_parent, new_name, ino, is_dir, replaced,
                             replaced_is_dir)
            if replaced is not None and left <= 0:
                self._remove(replaced)
        elif op == "attrs":
            ino = rng.choice(inodes)
            inode = md.inode(ino)
            fields = {}
            if rng.random() < 0.5:
                fields["mode"] = stat.S_IFMT(inode.mode) | rng.randrange(0o7777)
            for key in ("uid", "gid"):
                if rng.random() < 0.4:
                    fields[key] = rng.randrange(5000)
            for key in ("atime_ns", "mtime_ns", "ctime_ns"):
                if rng.random() < 0.4:
                    fields[key] = t
            if stat.S_ISREG(inode.mode) and rng.random() < 0.3:
                fields["size"] = rng.randrange(1 << 30)
            if not fields:
                return False
            md.set_attrs(ino, **fields)
        elif op == "xattr":
            md.set_xattr(rng.choice(inodes), rng.choice(XATTR_NAMES),
                         rng.randbytes(rng.randrange(0, 40)))
        elif op == "rmxattr":
            rows = md._query("SELECT ino, name FROM xattrs ORDER BY ino, name")
            if not rows:
                return False
            assert md.remove_xattr(*rng.choice(rows))
        elif op in ("commit", "late_commit"):
            if op == "commit" and files:
                ino = rng.choice(files)
            elif op == "late_commit" and self.removed:
                ino = rng.choice(self.removed)  # the upload finished after the file went
            else:
                return False
            refs = {i: self._ref() for i in rng.sample(range(8), rng.randrange(1, 4))}
            md.commit_blocks(ino, refs, rng.randrange(1 << 20), t, t)
        elif op == "truncate":
            if not files:
                return False
            keep = rng.randrange(0, 8)
            last = rng.choice([None, rng.randrange(1, 4096)]) if keep else None
            md.truncate_blocks(rng.choice(files), keep, rng.randrange(1 << 20), t, last)
        elif op == "punch":
            if not files:
                return False
            first = rng.randrange(0, 8)
            md.punch_blocks(rng.choice(files), first, first + rng.randrange(1, 4), t)
        elif op == "reap":
            orphans = md.orphans()
            if not orphans:
                return False
            self._remove(rng.choice(orphans))
        return True


def records_of(md: Metadata) -> list[tuple[int, str, list]]:
    """The decoded journal records a database holds that were not shipped yet."""
    return [decode_record(raw) for _, raw in md.unshipped(0, 1_000_000)]
