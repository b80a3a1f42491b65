"""Fixtures and hooks of the test suite (the helpers they use are in tests/support.py).

Tiers: every test module belongs to one tier in `TIERS` below, and its tests get that
tier's marker: `unit` (no server, no FUSE), `server` (block-server processes), `cluster`
(several servers and a client), `mount` (a real FUSE mount), `crash` (kill -9 and
power-loss style faults). Collection runs the tiers in that order (`-m unit` runs without
FUSE in seconds); a module missing from the table stops collection, and a unit-tier test
that starts a server or a mount fails.

Fixtures:
- `blockservers(n, secret=None, args=())`: real `blockserver serve` processes, each with
  its own data directory and log under the test's tmp_path; teardown stops every one;
- `fusefs_mount(servers=3, secret=None, mkfs=(), mount=())`: servers, mkfs and a real
  mount; `fusefs_mount.track(path, cache_dir)` hands the teardown a mount the test expects
  to be refused, so it is taken down if it happens anyway;
- `shared_mount`: a fresh directory on one mount that serves a whole module, for checks
  that do not need a fresh filesystem (`m, here = shared_mount`);
- `make_cluster(servers, ...)`: a started ReplicatedStore, closed at teardown.

Every teardown step runs even when an earlier one fails; the failures are reported
together at the end.

Log policy (one for block servers and fusefs daemons): after a test, a logged ERROR or
CRITICAL line or a traceback fails it unless the test declared it expected, with
`servers.allow(regex)` (servers and daemons), `mount.expect_log(regex)` (that mount's
daemon) or `@pytest.mark.expect_log(regex, ...)` (every log of the test). A failed test
gets the log tails of its servers and daemons attached to its report.

Leftovers: at session start, mounts and block-server or daemon processes left under the
directories of ended pytest sessions are taken down; after each test, anything still
running or mounted under its tmp_path is taken down and reported as a warning.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest

from . import support
from .support import MountSet, ServerSet, Workspace, cleanup_all


# -- tiers ---------------------------------------------------------------------------------

TIER_ORDER = ("unit", "server", "cluster", "mount", "crash")

# Test module -> tier. Within a tier, modules run in the order listed here (the quickest
# checks of the most basic parts first).
TIERS = {
    "test_layering": "unit",
    "test_bench_compare": "unit",
    "test_vm_vagrant": "unit",
    "test_fuse_ops": "unit",
    "test_cache": "unit",
    "test_siblings": "unit",
    "test_metadata": "unit",
    "test_journal_records": "unit",
    "test_antientropy": "unit",
    "test_progress": "unit",
    "test_localroom": "unit",
    "test_mount_helper": "unit",
    "test_admin": "unit",
    "test_filesystem_core": "unit",
    "test_blockserver_spares": "unit",
    "test_blockserver_api": "server",
    "test_blockserver_durability": "server",
    "test_blockserver_hostile": "server",
    "test_wire_security": "cluster",
    "test_blockstore_contract": "cluster",
    "test_cluster": "cluster",
    "test_journal": "cluster",
    "test_mount_smoke": "mount",
    "test_local_reads": "mount",
    "test_fuse_glue": "mount",
    "test_bench_mounts": "mount",
    "test_kernel_attrs": "mount",
    "test_mount_limits": "mount",
    "test_mount_space": "mount",
    "test_mount_posix": "mount",
    "test_mount_open_files": "mount",
    "test_mount_model": "mount",
    "test_mount_random": "mount",
    "test_mount_tools": "mount",
    "test_fsck": "mount",
    "test_selfheal": "crash",
    "test_scrub": "mount",
    "test_writer_lease": "mount",
    "test_embedded": "mount",
    "test_fencing": "mount",
    "test_metrics": "mount",
    "test_replicas_xattr": "mount",
    "test_mount_promises": "crash",
    "test_mount_failures": "crash",
    "test_mount_recovery": "crash",
    "test_crash_consistency": "crash",
    "test_gc": "crash",
    "test_netns": "crash",
}
_RANK = {module: (TIER_ORDER.index(tier), i) for i, (module, tier) in enumerate(TIERS.items())}


def _module_of(item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    missing = sorted({_module_of(i) for i in items if _module_of(i) not in TIERS})
    if missing:
        raise pytest.UsageError(f"test modules in no tier (add them to TIERS in "
                                f"tests/conftest.py): {', '.join(missing)}")
    for item in items:
        item.add_marker(getattr(pytest.mark, TIERS[_module_of(item)]))
    items.sort(key=lambda item: _RANK[_module_of(item)])  # stable: order within a module kept


# -- leftovers -----------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_sessions(tmp_path_factory):
    """Take down what ended pytest sessions left behind (never another live session's)."""
    found = support.sweep_stale(str(tmp_path_factory.getbasetemp()))
    if found:
        warnings.warn(pytest.PytestWarning(
            "took down what earlier test runs left behind:\n" + "\n".join(found[:20])))


@pytest.fixture(autouse=True)
def _tier_and_leftovers(request):
    """Tell the helpers the running test's tier; afterwards take down whatever is still
    running or mounted under the test's tmp_path (the fixtures should have)."""
    support.current_tier = TIERS.get(_module_of(request.node))
    try:
        yield
    finally:
        support.current_tier = None
    tmp = request.node.funcargs.get("tmp_path")
    found = support.leftovers_under(str(tmp)) if tmp is not None else []
    if found:
        warnings.warn(pytest.PytestWarning(
            "the test left these behind (taken down now):\n" + "\n".join(found[:20])))


# -- block servers -------------------------------------------------------------------------

_SERVERS = pytest.StashKey[ServerSet]()
_MOUNTS = pytest.StashKey[MountSet]()


def _expected_lines(request) -> list[re.Pattern]:
    """The patterns of the test's `@pytest.mark.expect_log(regex, ...)` markers."""
    return [re.compile(p) for mark in request.node.iter_markers("expect_log") for p in mark.args]


@pytest.fixture
def blockservers(tmp_path, request):
    """Factory: `blockservers(n, secret=None, args=[...])` -> list of running BlockServer.
    `blockservers.servers` is the ServerSet of every server the test started."""
    started = ServerSet(str(tmp_path))
    request.node.stash[_SERVERS] = started

    def start(n: int = 1, *, secret: bytes | None = None, args=()):
        return started.start(n, secret=secret, args=args)

    start.servers = started
    try:
        yield start
    finally:
        started.stop_all()
    problems = started.unexpected_problems(_expected_lines(request))
    if problems:
        pytest.fail("block server logged unexpected errors:\n" + "\n".join(problems[:20]))


@pytest.fixture
def server(blockservers):
    """One running block server without authentication."""
    return blockservers(1)[0]


@pytest.fixture
def make_cluster():
    """Factory: `make_cluster(servers, secret=None, **ClusterConfig fields)` -> a started
    ReplicatedStore over those servers (reading blocks over HTTP only, unless
    `local_reads=True`); every store made is closed at teardown."""
    from fusefs.cluster import ClusterConfig, ReplicatedStore
    from fusefs.transport import Transport, TransportConfig

    stores = []

    def make(servers, *, secret=None, members=None, read_timeout=10.0, **config):
        transport = Transport(TransportConfig(secret=secret, read_timeout=read_timeout,
                                              connect_timeout=2.0))
        config.setdefault("probe_min", 0.1)
        config.setdefault("probe_max", 0.5)
        # These servers are on this host, so by default the store would read their block
        # files itself: tests of the HTTP read paths (hedging, fail-over, repair) need it
        # off. tests/test_local_reads.py turns it on.
        config.setdefault("local_reads", False)
        store = ReplicatedStore(members or support.members_of(servers), transport,
                                ClusterConfig(**config))
        stores.append(store)
        store.start()
        return store

    try:
        yield make
    finally:
        cleanup_all([store.close for store in stores], "closing cluster stores")


# -- mounts --------------------------------------------------------------------------------

def _take_down(mounts: MountSet, servers: ServerSet, allowed) -> None:
    """Unmount every mount (each one even if another fails), then apply the log policy to
    their daemons; fail with everything that went wrong."""
    errors = []
    try:
        mounts.cleanup()
    except RuntimeError as e:
        errors.append(str(e))
    problems = mounts.unexpected_problems(servers.allowed + list(allowed))
    if problems:
        errors.append("fusefs daemon logged unexpected errors:\n" + "\n".join(problems[:20]))
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture
def fusefs_mount(blockservers, tmp_path, request):
    """Factory: `fusefs_mount(servers=3, secret=None, mkfs=[...], mount=[...])` -> Mount.

    Starts the block servers, formats, mounts at tmp_path/mnt<i> and returns once mounted.
    Teardown always unmounts every mount (umount, then SIGKILL and a lazy unmount), then
    applies the log policy to their daemons. `fusefs_mount.track(path, cache_dir)` returns
    a Mount the teardown also takes down (for a mount that should have been refused).
    """
    mounts = MountSet(blockservers.servers, str(tmp_path))
    request.node.stash[_MOUNTS] = mounts

    def make(servers: int = 3, *, secret: bytes | None = None, mkfs=(), mount=()):
        return mounts.make(servers, secret=secret, mkfs=mkfs, mount=mount)

    make.track = mounts.track
    try:
        yield make
    finally:
        _take_down(mounts, blockservers.servers, _expected_lines(request))


@pytest.fixture(scope="module")
def _module_mount(tmp_path_factory, request):
    """One mount (three new servers) that serves every test of a module."""
    directory = str(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    servers = ServerSet(directory)
    mounts = MountSet(servers, directory)
    try:
        mounts.make()
        yield mounts
    finally:
        try:
            _take_down(mounts, servers, ())
        finally:
            servers.stop_all()
    problems = servers.unexpected_problems()
    if problems:
        pytest.fail("block server logged unexpected errors:\n" + "\n".join(problems[:20]))


@pytest.fixture
def shared_mount(_module_mount, request):
    """`(mount, directory)`: a new directory of its own on the module's mount, for a check
    that needs no fresh filesystem. The log policy applies to what this test's part of
    the logs holds; expectations it declares end with it."""
    mounts, servers = _module_mount, _module_mount.servers
    m = mounts[0]
    request.node.stash[_SERVERS], request.node.stash[_MOUNTS] = servers, mounts
    if not m.mounted:  # an earlier test's remount may have failed
        m.mount()
    here = os.path.join(m.path, request.node.name.replace("/", "_")[:100])
    os.mkdir(here)
    m.mark_logs()
    servers.mark()
    yield Workspace(m, here)
    allowed = _expected_lines(request)
    problems = m.unexpected_problems(allowed) + servers.unexpected_problems(allowed)
    m.expected.clear()
    m.mark_logs()
    servers.mark()
    if problems:
        pytest.fail("unexpected errors logged during the test:\n" + "\n".join(problems[:20]))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        for server in item.stash.get(_SERVERS, None) or ():
            report.sections.append((f"log of block server {server.url}", server.log_tail(60)))
        for m in item.stash.get(_MOUNTS, None) or ():
            report.sections.append((f"log of the fusefs daemon of {m.path}", m.log_tail(60)))
    return report
