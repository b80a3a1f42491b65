"""P5 at the FUSE adapter: nothing escapes a callback; unknown failures become a logged EIO.

A unit test of one layer: the filesystem core is replaced by a stub that raises.
"""

import errno
import inspect
import logging

import pytest
from fuse import FuseOSError, Operations

from fusefs import errors
from fusefs.fuse_ops import FuseOps


class Raising:
    """A core whose every call raises the exception it was given."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise self.exc
        return call


CASES = [
    (errors.FsError(errno.ENOTEMPTY), errno.ENOTEMPTY),
    (errors.Unavailable("no server answered"), errno.EIO),
    (errors.StorageFull("cluster full"), errno.ENOSPC),
    (errors.AuthenticationFailed("bad secret"), errno.EACCES),
    (RuntimeError("a bug"), errno.EIO),
    (OSError("what requests raises: no errno"), errno.EIO),  # fusepy would abort the mount
    (KeyError("x"), errno.EIO),
]


@pytest.mark.parametrize("exc, code", CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_failures_become_the_right_errno(exc, code, caplog):
    ops = FuseOps(Raising(exc))
    with caplog.at_level(logging.WARNING, logger="fusefs.fuse"):
        with pytest.raises(FuseOSError) as raised:
            ops.mkdir("/new", 0o755)
    assert raised.value.errno == code
    unexpected = not isinstance(exc, errors.FusefsError)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert bool(logged) == unexpected  # a bug is logged as an error, with its traceback
    if unexpected:
        assert logged[0].exc_info is not None


CALLBACKS = [name for name, _ in inspect.getmembers(Operations, inspect.isfunction)
             if name in vars(FuseOps) and name not in ("destroy", "init", "__call__",
                                                       "__init__")]


def test_every_callback_goes_through_the_error_wrapper():
    assert len(CALLBACKS) > 20
    unwrapped = [n for n in CALLBACKS
                 if not getattr(getattr(FuseOps, n), "errno_wrapper", False)]
    assert unwrapped == []


class Info:
    """Stands in for fusepy's fuse_file_info: whatever a callback reads from it."""
    fh = 7
    flags = 0
    direct_io = keep_cache = 0


def placeholder(name: str):
    if name in ("fi", "fip"):
        return Info()
    if name in ("path", "old", "new", "target", "source", "name"):
        return "/x"
    if name in ("buf", "data", "value"):
        return b"v"
    if name == "times":
        return (1, 2)
    return 0


# Callbacks that never reach the core: closing a directory only forgets its listing.
CORELESS = {"releasedir"}


def test_releasedir_forgets_the_listing_and_never_fails():
    ops = FuseOps(Raising(RuntimeError("a bug")))
    ops._listings[7] = [(b"a", 2, 0)]
    assert ops.releasedir("/x", 7) == 0 and ops._listings == {}
    assert ops.releasedir("/x", 7) == 0  # twice, or a handle it never had: still 0


@pytest.mark.parametrize("name", [n for n in CALLBACKS if n not in CORELESS])
def test_a_bug_under_any_callback_is_a_logged_eio(name, caplog):
    """Whatever the core raises under any callback, the kernel gets EIO and the log a
    traceback (fusepy itself would answer EINVAL, or abort the mount)."""
    core = Raising(RuntimeError("a bug"))
    ops = FuseOps(core)
    method = getattr(ops, name)
    args = [placeholder(p) for p in inspect.signature(method).parameters]
    with caplog.at_level(logging.ERROR, logger="fusefs.fuse"):
        with pytest.raises(FuseOSError) as raised:
            method(*args)
    assert raised.value.errno == errno.EIO
    assert [r for r in caplog.records if r.exc_info is not None]


def test_destroy_never_raises(caplog):
    def broken():
        raise RuntimeError("upload machinery broke")

    ops = FuseOps(Raising(RuntimeError()), on_destroy=broken)
    with caplog.at_level(logging.ERROR, logger="fusefs.fuse"):
        ops.destroy("/")
    assert any("unmount" in r.getMessage() for r in caplog.records)


class RecordingRefresher:
    """Stands in for kernel_attrs.AttrRefresher: records which names it was asked for."""

    def __init__(self):
        self.asked: list[list[bytes]] = []
        self.busy = None

    def refresh(self, paths, skip=(), key=None, count=0):
        self.asked.append(sorted(p for p in paths() if p not in skip))


def test_changes_refresh_exactly_the_other_names(tmp_path):
    from .test_filesystem_core import Core

    core = Core(tmp_path / "metadata.db")
    refresher = RecordingRefresher()
    ops = FuseOps(core.fs, refresher=refresher)
    try:
        ops.mkdir("/d", 0o755)
        ops.mknod("/a", 0o100644, 0)
        ops.chmod("/a", 0o600)
        ops.rename("/a", "/a2")
        ops.rename("/a2", "/a")
        assert refresher.asked == []  # a file with one name: nothing to refresh
        ops.link("/d/b", "/a")
        assert refresher.asked.pop() == [b"/a"]  # the new name came with its attributes
        ops.chmod("/d/b", 0o640)
        assert refresher.asked.pop() == [b"/a"]
        ops.utimens("/a", (1, 2))
        assert refresher.asked.pop() == [b"/d/b"]
        ops.setxattr("/a", "user.k", b"v", 0)
        assert refresher.asked.pop() == [b"/d/b"]
        ops.rename("/a", "/c")
        assert refresher.asked.pop() == [b"/d/b"]
        ops.unlink("/c")
        assert refresher.asked.pop() == [b"/d/b"]
        ops.chmod("/d/b", 0o644)
        assert refresher.asked == []  # one name again
    finally:
        core.close()


def test_the_path_cache_forgets_what_changed_and_stores_no_raced_lookup():
    """PathCache's invalidation rules (fusefs/paths.py): a changed path is looked up again,
    a lookup that raced a change is not kept, forget() drops every path."""
    from fusefs.paths import PathCache

    names = {(1, "d"): 2, (2, "f"): 3}
    calls = []

    def lookup(parent, name):
        calls.append((parent, name))
        return names[(parent, name)]

    paths = PathCache(lookup, 1)
    assert paths.resolve("/d/f") == 3 and len(calls) == 2
    assert paths.resolve("/d/f") == 3 and len(calls) == 2  # cached
    names[(2, "f")] = 4
    paths.changed("/d/f")
    assert paths.resolve("/d/f") == 4 and len(calls) == 3  # the parent stays cached
    names[(1, "d")] = 5
    names[(5, "f")] = 6
    paths.changed("/d", subtree=True)
    assert paths.resolve("/d/f") == 6
    raced = PathCache(lambda parent, name: (raced.changed(), 7)[1], 1)
    assert raced.resolve("/x") == 7
    assert raced._paths == {}  # the answer raced a change: not kept
    paths.forget()
    assert paths._paths == {}
    assert paths.opened("/d/f", (6, 1, 1, 0)) is False
    assert paths.opened("/d/f", (6, 1, 1, 0)) is True
    paths.changed("/d/f")
    assert paths.opened("/d/f", (6, 1, 1, 0)) is False  # a changed name starts afresh
