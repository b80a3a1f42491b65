"""Paths to inode numbers, for an adapter that names files by path (fusepy, over libfuse 2's
high-level API) in front of a core that works on inode numbers. No FUSE here.

`PathCache` keeps two maps, both keyed by path:
- path -> inode, filled by `resolve` (one core lookup per component not cached yet);
- path -> (inode, mtime, ctime, size) as the file was at its last open through that path
  (`opened`), which tells whether the kernel's page cache of that name is still right.

Invalidation rules (a stale entry would send a call to the wrong file):
- Every namespace change made through this mount calls `changed` with the paths it
  created, removed or moved: they are forgotten in both maps (another kernel inode, with
  its own page cache, may answer to such a name now). A change that moves a directory
  passes `subtree=True`: every path below it changed too, so both maps are emptied whole.
  Removing a directory does not: it was empty, and each name that left it was forgotten
  by its own change.
- Each change also moves a generation counter. A lookup remembers the generation it
  started in and stores its answer only if no change happened meanwhile: a lookup that
  raced a change could otherwise store the name's old inode after `changed` forgot it.
- A change made by another mount (a read-only mount following the writer's journal)
  calls `forget`: every path is forgotten. The open records stay: each holds the inode
  and its times and size, so a record of another file or of a changed file never
  matches.
- Each map holds at most `MAX_CACHED_PATHS` entries; when full it is emptied whole.

`_lock` protects both maps and the generation. It is a leaf: the core is never called
with it held.
"""

from __future__ import annotations

import threading

MAX_CACHED_PATHS = 200_000


class PathCache:
    """The adapter's path -> inode map and per-path open records, with the invalidation
    rules of this module's docstring.

    `lookup(parent inode, name)` returns the inode of a name in a directory (raising when
    there is none), `root` is the inode of "/", and `pinned(path)`, when given, is asked
    first for every path and may answer an inode the cache never holds (None: look it up
    as usual).
    """

    def __init__(self, lookup, root: int, pinned=None):
        self._lookup = lookup
        self._root = root
        self._pinned = pinned
        self._lock = threading.Lock()
        self._paths: dict[str, int] = {}
        self._generation = 0
        self._seen: dict[str, tuple[int, int, int, int]] = {}

    def resolve(self, path: str) -> int:
        """Takes _lock, released around core lookups: the inode at `path`. From the
        nearest ancestor known (cached, pinned or the root), one lookup per component
        below it; a loop, not a recursion, so any depth resolves."""
        if path == "/":
            return self._root
        ino = self._known(path)
        if ino is not None:
            return ino
        with self._lock:
            generation = self._generation
        below = []  # the names under the nearest known ancestor, deepest first
        at = path
        while ino is None:
            at, _, name = at.rpartition("/")
            below.append(name)
            ino = self._known(at) if at else self._root
        for name in reversed(below):
            at = f"{at}/{name}"
            ino = self._lookup(ino, name)
            with self._lock:
                if generation == self._generation:
                    if len(self._paths) >= MAX_CACHED_PATHS:
                        self._paths.clear()
                    self._paths[at] = ino
        return ino

    def _known(self, path: str) -> int | None:
        """Takes _lock: the inode at `path` if pinned or cached, else None."""
        if self._pinned is not None:
            ino = self._pinned(path)
            if ino is not None:
                return ino
        with self._lock:
            return self._paths.get(path)

    def changed(self, *paths: str, subtree: bool = False) -> None:
        """Takes _lock: a namespace change made through this mount touched `paths` (and,
        with `subtree`, everything below them)."""
        with self._lock:
            self._generation += 1
            if subtree:
                self._paths.clear()
                self._seen.clear()
            for p in paths:
                self._paths.pop(p, None)
                self._seen.pop(p, None)

    def forget(self) -> None:
        """Takes _lock: another mount changed the namespace; no cached path may be trusted."""
        with self._lock:
            self._paths.clear()
            self._generation += 1

    def opened(self, path: str, state: tuple[int, int, int, int]) -> bool:
        """Takes _lock: the file at `path` is being opened and is now `state` (inode, mtime,
        ctime, size); record it, and return whether its previous open through this same
        path saw the same."""
        with self._lock:
            same = self._seen.get(path) == state
            if len(self._seen) >= MAX_CACHED_PATHS:
                self._seen.clear()
            self._seen[path] = state
        return same
