"""`fusefs` command line: mkfs, mount, umount, status, and the embedded default up/down."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import logging.handlers
import os
import re
import signal
import subprocess
import sys
import time

from blockserver import protocol
from blockserver.protocol import format_size, size_argument

from . import __version__, errors, superblock
from .transport import Member, Transport, TransportConfig, at_given_urls

DESCRIPTION = """\
fusefs mounts a directory whose files live on a set of block servers. Every block is
checksummed and stored on R servers (default 3), so a server can die without anyone
noticing. Start with `fusefs up` for a local three-server setup in one command."""

EPILOG = """\
commands, in the order you meet them:
  fusefs up [DIR]                       local servers + mkfs + mount at DIR/mnt, one command
  fusefs down [DIR]                     unmount (uploading everything) and stop the servers
  fusefs mkfs --servers URL,URL,URL     format a filesystem on running block servers
  fusefs mount --servers URL,... MNT    mount it (returns once mounted)
  fusefs status [MNT]                   servers, health, dirty bytes, upload backlog, errors
  fusefs umount MNT                     upload everything dirty, then unmount
  fusefs mount --read-only ... MNT      follow the writer from another machine
  fusefs fsck --servers URL [--repair]  check (and repair) metadata against the blocks
  fusefs scrub --servers URL [--rate R] verify every copy on every server, repair bad ones
  fusefs gc --servers URL [--delete]    find (and delete) blocks nothing references
  fusefs read-key --secret-file F OUT   a key for --read-only mounts that cannot write
  fusefs repair --servers URL           give every live block its R copies on its homes
  fusefs servers list|add|remove|replace  change the servers, online (drains first)
  fusefs status --servers URL           the whole cluster's health (exit 1 if not healthy)
  mount.fusefs URL,... DIR -o OPTS      mount(8)'s helper: /etc/fstab lines of type fusefs

environment: FUSEFS_SERVERS, FUSEFS_SECRET_FILE and FUSEFS_CACHE_DIR stand in for
--servers, --secret-file and --cache-dir. Sizes take units: 4KiB, 1MiB, 2GiB."""


class CliError(Exception):
    """A failure to report in one line, without a traceback (exit status 1)."""


def _servers(text: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"{url!r} is not a server URL "
                                             "(e.g. http://10.0.0.5:7001)")
    if not urls:
        raise argparse.ArgumentTypeError("give at least one server URL")
    return urls


MIN_LEASE_SECONDS = 2.0  # renewed every third of it: with less, a stall under a second lapses it


def _lease_seconds(text: str) -> float:
    """argparse type of --lease-seconds: renewed every third of it, so at least 2 s (a
    lease of 0 would be lapsed always, and every change of the mount would fail)."""
    value = _seconds(text)
    if value < MIN_LEASE_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r}: a lease lasts at least "
                                         f"{MIN_LEASE_SECONDS:g} seconds")
    return value


def _readable_file(text: str) -> str:
    """argparse type of a file read later (a CA bundle): there and readable now."""
    try:
        with open(text, "rb"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {e.strerror}") from None
    return text


def _seconds(text: str) -> float:
    """argparse type of a delay: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--servers", type=_servers, default=os.environ.get("FUSEFS_SERVERS"),
                   metavar="URL[,URL...]", help="block server URLs (env FUSEFS_SERVERS)")
    p.add_argument("--secret-file", default=os.environ.get("FUSEFS_SECRET_FILE"), metavar="F",
                   help="the cluster's shared secret (env FUSEFS_SECRET_FILE)")
    p.add_argument("--tls-ca", type=_readable_file, metavar="PEM",
                   help="CA bundle to verify https servers with")


def metrics_address(text: str) -> str:
    """argparse type of --metrics: "ADDR:PORT", checked here, parsed by the daemon."""
    from .metrics import parse_address

    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusefs", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fusefs {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("mkfs", help="format a filesystem on a set of block servers")
    _add_cluster_args(p)
    p.add_argument("--replicas", type=int, default=3, metavar="R",
                   help="copies of every block (default 3)")
    p.add_argument("--write-quorum", type=int, default=2, metavar="W",
                   help="copies a write waits for (default 2)")
    p.add_argument("--block-size", type=size_argument, default="1MiB", metavar="SIZE",
                   help="size of the blocks files are cut into (default 1MiB)")
    p.add_argument("--force", action="store_true",
                   help="format even where a filesystem exists (its data becomes unreachable)")

    p = sub.add_parser("mount", help="mount a filesystem (returns once it is mounted)",
                       description="Mount the filesystem on these block servers at "
                       "MOUNTPOINT; returns once it is mounted. A dead fusefs mount left "
                       "there by a daemon that died (kill -9, out of memory: 'Transport "
                       "endpoint is not connected') is detached first, then mounted again.")
    parser.mount_parser = p  # the fstab helper reads its options (mount_helper)
    _add_cluster_args(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("--cache-dir", default=os.environ.get("FUSEFS_CACHE_DIR"), metavar="DIR",
                   help="metadata, block cache and log (default ~/.cache/fusefs)")
    p.add_argument("--cache-size", type=size_argument, default="2GiB", metavar="SIZE",
                   help="disk block cache bound (default 2GiB)")
    p.add_argument("--memory-cache", type=size_argument, default="256MiB", metavar="SIZE",
                   help="memory block cache bound (default 256MiB)")
    p.add_argument("--cache-dir-reserve", type=size_argument, default="64MiB",
                   metavar="SIZE",
                   help="free space kept on the disk of --cache-dir for the metadata "
                        "(default 64MiB): below it the disk block cache shrinks, then new "
                        "files, directories and attributes fail with ENOSPC until there "
                        "is room again; removals, writes and fsync go on (a read-only "
                        "mount stops following the writer meanwhile)")
    p.add_argument("--dirty-limit", type=size_argument, default="256MiB", metavar="SIZE",
                   help="unsaved data held in memory before writers wait (default 256MiB)")
    p.add_argument("--read-only", action="store_true",
                   help="mount read-only, beside the writer if there is one: shows its "
                        "changes within a few seconds")
    p.add_argument("--lease-seconds", type=_lease_seconds, default=30.0, metavar="S",
                   help="how long the writer lease lasts unless renewed (default 30, at "
                        "least 2). If "
                        "this machine dies, another can mount read-write after this long")
    p.add_argument("--sync-on-close", action="store_true",
                   help="close() of a file opened for writing returns only once the file "
                        "is durable, as after fsync (slower; for programs that never fsync)")
    p.add_argument("--no-local-reads", action="store_true",
                   help="read every block over HTTP, also from block servers on this host "
                        "(by default their block files are read directly: much less CPU)")
    p.add_argument("--metrics", type=metrics_address, default=None, metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics: operation "
                        "counts and latencies, block requests, cache, upload backlog, "
                        "servers and repair state (docs/metrics.md). Off by default. Binds "
                        "exactly ADDR and has no authentication: use 127.0.0.1 unless the "
                        "network is trusted")
    p.add_argument("--unsafe-no-journal", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rehome-after", type=_seconds, default=600.0, metavar="SECONDS",
                   help="when a block server has been down this long, the writer gives its "
                        "blocks their R copies on other servers (moved back when it returns; "
                        "default 600, 0: at once)")
    p.add_argument("--repair-delay", type=_seconds, default=30.0, metavar="SECONDS",
                   help="the writer's background repair makes its first pass this long after "
                        "mounting (default 30: the mount's first seconds are its user's), or "
                        "sooner when a server's state calls for one. 0: at once, e.g. after "
                        "servers came back from a failure this mount did not see")
    p.add_argument("--scrub-interval", type=_seconds, default=0.0, metavar="SECONDS",
                   help="scrub in the background: verify every copy on every server slowly "
                        "(a few MiB/s) and repair bad ones, one pass every SECONDS (default "
                        "0: off; `fusefs up` uses a day). Read-write mounts only")
    p.add_argument("-o", dest="options", default="", metavar="OPT[,OPT...]",
                   help="extra FUSE mount options, e.g. -o allow_other. A writer lets the "
                        "kernel cache attributes and names for 60 s (hard links stay right); "
                        "-o attr_timeout=N,entry_timeout=N changes that")

    p = sub.add_parser("fsck", help="check the filesystem's metadata against the blocks",
                       description="Check the metadata the cluster holds (what a new mount "
                       "would load): names, that the root reaches every inode, link counts, "
                       "that every block has R intact copies, and blocks nothing "
                       "references. Works while the filesystem is mounted. "
                       "Exit status: 0 consistent, 1 problems found, 2 could not check.")
    _add_cluster_args(p)
    p.add_argument("--repair", action="store_true",
                   help="fix what can be fixed safely (needs the filesystem unmounted: "
                        "fsck takes the writer lease while it repairs)")
    p.add_argument("--json", action="store_true", help="machine-readable report")

    p = sub.add_parser("scrub", help="verify every copy on every server; repair bad ones",
                       description="Read and verify every copy of every block on every "
                       "server of the filesystem (each server re-reads its files and checks "
                       "their checksums; a bad copy is quarantined there), and put a copy "
                       "verified on another server back where one was bad. Needs no "
                       "metadata and is safe while the filesystem is mounted. Resumable: "
                       "where each server's scrub stands is saved as it goes, so a scrub "
                       "stopped by Ctrl-C or a failure continues there at its next run. "
                       "Exit status: 0 every copy good or repaired, 1 some block has no "
                       "intact copy anywhere (listed by id), 2 could not finish (a server "
                       "unreachable): run it again.")
    _add_cluster_args(p)
    p.add_argument("--rate", type=size_argument, default=None, metavar="BYTES/S",
                   help="read at most this much per second from the servers, e.g. 50MiB "
                        "(default: as fast as they answer)")
    p.add_argument("--state", metavar="FILE",
                   help="where the scrub's progress is kept (default "
                        "CACHE_DIR/<filesystem id>/scrub.json, shared with a mount's "
                        "background scrub)")
    p.add_argument("--cache-dir", default=os.environ.get("FUSEFS_CACHE_DIR"), metavar="DIR",
                   help="the mount's cache directory, where the state lives (default "
                        "~/.cache/fusefs)")
    p.add_argument("--restart", action="store_true",
                   help="start a new pass from the beginning instead of continuing an "
                        "interrupted one")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")

    p = sub.add_parser("gc", help="delete blocks that no metadata can reference",
                       description="Find the blocks on the servers that nothing can read "
                       "again (uploads of a client that crashed or lost its lease, "
                       "checkpoints and journal segments nobody deleted) and, with "
                       "--delete, delete them. A dry run by default: it shows per server "
                       "how many blocks and bytes would go. Safe while the filesystem is "
                       "mounted: the running writer's blocks (their ids carry its tag) are "
                       "left alone, and nothing is deleted if another writer came meanwhile. "
                       "Exit status: 0 nothing left to collect (none found, or --delete "
                       "deleted them all), 1 a dry run found leftovers, 2 could not finish "
                       "(a server unreachable, a writer starting or changing): run it again.")
    _add_cluster_args(p)
    p.add_argument("--delete", action="store_true",
                   help="delete the leftovers found (default: only report them)")
    p.add_argument("--cache-dir", default=os.environ.get("FUSEFS_CACHE_DIR"), metavar="DIR",
                   help="the cache directory of a mount whose daemon died on this machine "
                        "(default ~/.cache/fusefs): what its local metadata still names is "
                        "kept, so its other uploads can be collected")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")

    p = sub.add_parser("repair", help="give every live block R healthy copies on its homes",
                       description="Compare what the metadata names with what every server "
                       "lists, copy every missing copy from a healthy one, and move copies "
                       "that sit outside their homes (written while a server was down, or "
                       "before a membership change) home. The mounted writer does the same "
                       "continuously in the background; this runs it now. Safe while "
                       "mounted. Exit status: 0 every live block has R healthy copies on "
                       "its homes, 1 not (a server down, a block lost: the report says), "
                       "2 could not run.")
    _add_cluster_args(p)
    p.add_argument("--rate", type=size_argument, default=None, metavar="BYTES/S",
                   help="copy at most this much per second (default: no limit)")
    p.add_argument("--check", action="store_true", help="only report, change nothing")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")

    p = sub.add_parser("servers", help="list, add, remove or replace block servers",
                       description="Change the servers the filesystem lives on, online: "
                       "mounts pick the change up within seconds, without a remount. "
                       "`add URL` moves to the new server only the blocks whose homes "
                       "changed; `remove SERVER` drains it first (every block it holds gets "
                       "its copies elsewhere, so no block ever has fewer than R) and then "
                       "drops it; `replace OLD NEW` puts an empty server in place of OLD, "
                       "draining OLD if it still answers, rebuilding its copies from the "
                       "others if it is dead. SERVER is a URL or a server id. Exit status: "
                       "0 done (list: every server up), 1 not finished or a server down, "
                       "2 refused or failed.")
    p.add_argument("action", choices=("list", "add", "remove", "replace"))
    p.add_argument("names", nargs="*", metavar="SERVER",
                   help="add: URL; remove: SERVER; replace: OLD NEW")
    _add_cluster_args(p)
    p.add_argument("--rate", type=size_argument, default=None, metavar="BYTES/S",
                   help="copy at most this much per second (default: no limit)")
    p.add_argument("--no-wait", action="store_true",
                   help="add: change the membership and return; the mounted writer moves "
                        "the blocks in the background")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")

    p = sub.add_parser("read-key", help="write a read-only key file for --read-only mounts",
                       description="Derive the cluster's read-only key from its secret and "
                       "write it to OUT (mode 0600). A mount given that file "
                       "(`fusefs mount --read-only --secret-file OUT`) can read and follow "
                       "the filesystem, but the block servers refuse its writes and "
                       "deletes, so a reader machine never holds the power to change data.")
    p.add_argument("--secret-file", default=os.environ.get("FUSEFS_SECRET_FILE"), metavar="F",
                   help="the cluster's shared secret (env FUSEFS_SECRET_FILE)")
    p.add_argument("out", metavar="OUT", help="the key file to write")

    p = sub.add_parser("umount", help="upload everything dirty, then unmount",
                       description="Upload everything dirty, then unmount. A dead fusefs "
                       "mount (its daemon died) is only detached: files fsynced before the "
                       "crash come back at the next mount.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")

    p = sub.add_parser("status", help="show what a mount is doing",
                       description="Show what each fusefs mount (or MOUNTPOINT) is doing. "
                       "Exit status 1 if a mount is dead (its daemon died and the "
                       "mountpoint answers 'Transport endpoint is not connected'); "
                       "`fusefs mount` or `fusefs up` mounts it again.")
    p.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_cluster_args(p)

    p = sub.add_parser("up", help="the embedded default: local servers, mkfs, mount DIR/mnt",
                       description="Start three block servers on this machine (data under "
                       "DIR/servers), format a filesystem on them the first time, and mount "
                       "it at DIR/mnt, every block stored 3 times. Running it again keeps "
                       "what is already running and mounted, and starts what died: a "
                       "server, or the mount's daemon (its dead mount is detached and "
                       "mounted again). `fusefs down DIR` stops it.")
    p.add_argument("dir", nargs="?", default="fusefs-data", metavar="DIR",
                   help="where the servers' data, the secret, the cache and the mountpoint "
                        "live (default ./fusefs-data)")
    p = sub.add_parser("down", help="unmount and stop what `fusefs up DIR` started",
                       description="Unmount DIR/mnt (which first uploads everything not yet "
                       "on the servers), then stop the three block servers. Nothing is "
                       "deleted: `fusefs up DIR` brings it all back.")
    p.add_argument("dir", nargs="?", default="fusefs-data", metavar="DIR",
                   help="the directory given to `fusefs up` (default ./fusefs-data)")
    return parser


# -- shared helpers ---------------------------------------------------------------------------

def _transport(args, writes: bool = False) -> Transport:
    """The transport a command talks through, signing with the key in --secret-file (the
    cluster secret, or a read-only key from `fusefs read-key`). A command that `writes`
    refuses a read-only key up front instead of failing request by request."""
    fields = dict(tls_verify=args.tls_ca or True, connect_timeout=3.0, read_timeout=15.0)
    if not args.secret_file:
        return Transport(TransportConfig(**fields))
    try:
        config = TransportConfig.from_key_file(args.secret_file, **fields)
    except protocol.SecretError as e:
        raise CliError(str(e)) from None
    if writes and config.role != protocol.ROLE_WRITE:
        raise CliError(f"{args.secret_file} holds a read-only key: this needs the cluster "
                       "secret (or mount with --read-only)")
    return Transport(config)


def _need_servers(args) -> list[str]:
    if not args.servers:
        raise CliError("say which block servers to use: --servers URL[,URL...] "
                       "(or set FUSEFS_SERVERS)")
    return args.servers


def _explain(e: errors.StorageError) -> str:
    if isinstance(e, errors.AuthenticationFailed):
        return f"{e}"
    if isinstance(e, errors.Unavailable):
        return f"{e}; is the block server running there?"
    return str(e)


# -- mkfs -------------------------------------------------------------------------------------

def cmd_mkfs(args) -> int:
    urls = _need_servers(args)
    if not 1 <= args.write_quorum <= args.replicas:
        raise CliError("--write-quorum must be between 1 and --replicas")
    if args.replicas > len(urls):
        raise CliError(f"{args.replicas} replicas need at least {args.replicas} servers; "
                       f"{len(urls)} given (or pass --replicas {len(urls)})")
    if args.block_size < 4096 or args.block_size > (16 << 20):
        raise CliError("--block-size must be between 4KiB and 16MiB")
    transport = _transport(args, writes=True)
    members = []
    for url, status in superblock.probe(transport, urls).items():
        if isinstance(status, errors.StorageError):
            raise CliError(f"cannot format: {_explain(status)}")
        members.append(Member(status["server_id"], url))
    if len({m.id for m in members}) != len(members):
        raise CliError("two of the URLs reach the same server; list each server once")
    existing = superblock.read(transport, urls, everyone=True)
    if existing is not None and not args.force:
        raise CliError(f"these servers already hold filesystem {existing.fs_id}; "
                       "refusing to format over it (add --force to destroy it)")
    sb = superblock.new(members, args.block_size, args.replicas, args.write_quorum)
    generation = (existing.generation + 1) if existing else 1
    try:
        sb = sb.with_changes(checkpoint=_first_checkpoint(transport, sb))
        superblock.write_all(transport, sb, generation)
    except errors.StorageError as e:
        raise CliError(f"formatting failed: {_explain(e)}") from None
    print(f"formatted filesystem {sb.fs_id} on {len(members)} servers "
          f"(R={args.replicas}, W={args.write_quorum}, blocks of "
          f"{format_size(args.block_size)})")
    return 0


def _first_checkpoint(transport, sb) -> dict:
    """An empty filesystem (a root directory owned by the caller), stored as checkpoint 1."""
    import tempfile

    from .checkpoint import write_checkpoint
    from .cluster import ClusterConfig, ReplicatedStore
    from .metadata import Metadata

    store = ReplicatedStore(sb.members, transport,
                            ClusterConfig(replicas=sb.replicas, write_quorum=sb.write_quorum))
    try:
        store.start()
        with tempfile.TemporaryDirectory(prefix="fusefs-mkfs-") as tmp:
            metadata = Metadata(os.path.join(tmp, "metadata.db"))
            try:
                metadata.format(uid=os.getuid(), gid=os.getgid())
                return write_checkpoint(store, metadata, sb.fs_id, "mkfs", 1, tmp)
            finally:
                metadata.close()
    finally:
        store.close()


# -- mount ------------------------------------------------------------------------------------

def _is_mounted(path: str) -> bool:
    from .mounts import is_mounted

    return is_mounted(path)


def _parse_options(text: str) -> dict:
    """-o's FUSE options; a comma escaped as `\\,` stays in its value (and reaches
    libfuse escaped, which reads it so): `fsname=http://a:1\\,http://b:1`."""
    options = {}
    for item in filter(None, (o.strip() for o in re.split(r"(?<!\\),", text))):
        key, sep, value = item.partition("=")
        options[key] = value if sep else True
    return options


def _mount_config(args):
    from .daemon import MountConfig

    urls = _need_servers(args)
    transport = _transport(args, writes=not args.read_only)
    try:
        sb = superblock.read(transport, urls)
    except errors.StorageError as e:
        raise CliError(f"cannot mount: {_explain(e)}") from None
    if sb is None:
        raise CliError("no filesystem on these servers; create one with "
                       "`fusefs mkfs --servers ...`")
    # URLs given now win over the recorded ones for the same server id (servers may move).
    given = {s["server_id"]: url for url, s in
             superblock.probe(transport, urls, majority=True).items() if isinstance(s, dict)}
    members = at_given_urls(sb.members, given)
    if not args.read_only:
        from .lease import refusal

        why = refusal(sb)
        if why:
            raise CliError(why)
    cache_root = args.cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusefs")
    state = sb.fs_id
    if args.read_only:  # its own metadata copy: a writer may use the same cache directory
        state += "-ro-" + hashlib.sha256(os.path.abspath(args.mountpoint).encode()).hexdigest()[:8]
    return MountConfig(
        mountpoint=os.path.abspath(args.mountpoint), superblock=sb, members=members,
        state_dir=os.path.join(os.path.abspath(cache_root), state),
        lease_seconds=args.lease_seconds, journal=not args.unsafe_no_journal,
        secret=transport.config.secret, role=transport.config.role,
        tls_verify=transport.config.tls_verify,
        memory_cache=args.memory_cache, disk_cache=args.cache_size,
        local_reserve=args.cache_dir_reserve,
        dirty_limit=args.dirty_limit, read_only=args.read_only, metrics=args.metrics,
        sync_on_close=args.sync_on_close, fuse_options=_parse_options(args.options),
        local_reads=not args.no_local_reads,
        scrub_interval=0.0 if args.read_only else args.scrub_interval,
        rehome_after=args.rehome_after, repair_delay=args.repair_delay)


def _mount_state(path: str) -> str:
    from .mounts import mount_state

    return mount_state(path)


def _foreign_dead(path: str) -> CliError:
    return CliError(f"{path} is a dead FUSE mount that fusefs did not make (the program "
                    "serving it died); fusefs leaves it alone. Detach it with "
                    f"`fusermount -u -z {path}` (or, as root, `umount -l {path}`) and "
                    "try again")


def _detach_dead(path: str) -> None:
    """Lazily detach the dead fusefs mount at `path` (its daemon died)."""
    from .mounts import forget_stale, unmount

    if not unmount(path, lazy=True):
        raise CliError(f"could not detach the dead fusefs mount at {path}; try "
                       f"`fusermount -u -z {path}` (or, as root, `umount -l {path}`)")
    forget_stale(path)


def _check_mountpoint(path: str) -> None:
    if not os.path.exists("/dev/fuse"):
        raise CliError("no /dev/fuse on this machine: load the module (`modprobe fuse`) "
                       "or give the container the device (--device /dev/fuse)")
    state = _mount_state(path)
    if state == "dead":
        print(f"fusefs mount: {path} was a dead fusefs mount (its daemon had died); "
              "detaching it and mounting again", file=sys.stderr)
        _detach_dead(path)
        state = _mount_state(path)
    if state == "foreign-dead":
        raise _foreign_dead(path)
    if state != "none":
        raise CliError(f"mountpoint {path} is busy: something is mounted there already "
                       f"(`fusefs umount {path}`)")
    if not os.path.isdir(path):
        raise CliError(f"mountpoint {path} is not a directory; create it first")


MOUNT_PROGRESS_SECONDS = 10  # a mount taking longer says what its daemon does, this often


def cmd_mount(args) -> int:
    from . import mounts
    from .daemon import private_dir

    _check_mountpoint(args.mountpoint)
    config = _mount_config(args)
    try:
        private_dir(config.state_dir)
    except OSError as e:
        raise CliError(f"cannot use the cache directory {os.path.dirname(config.state_dir)}: "
                       f"{e.strerror} ({e.filename}); give --cache-dir a directory this user "
                       "can write") from None
    if args.foreground:
        from .daemon import run

        _log_to(os.path.join(config.state_dir, "fusefs.log"), args.verbose, also_stderr=True)
        try:
            run(config)
        except errors.MountRefused as e:
            raise CliError(str(e)) from None
        return 0
    log_path = os.path.join(config.state_dir, "fusefs.log")
    given = _INVOCATION or sys.argv[1:]
    argv = [sys.executable, "-m", "fusefs", *(["-v"] if args.verbose else []),
            "mount", "--foreground", *given[given.index("mount") + 1:]]
    # The daemon marks its record serving once FUSE's init reached it. The mount table is
    # not enough: libfuse 2 mounts before it parses its options, then unmounts again.
    record_path = mounts.registry_path(args.mountpoint)
    with open(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log_file:
        os.fchmod(log_file.fileno(), 0o600)
        began = log_file.seek(0, os.SEEK_END)  # this attempt's lines start here
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    said = time.monotonic()
    while not mounts.serving(record_path, child.pid):
        if child.poll() is not None:
            raise CliError(f"mount failed:\n{_tail(log_path, since=began)}\n"
                           f"(full log: {log_path})")
        if time.monotonic() - said >= MOUNT_PROGRESS_SECONDS:  # (a journal to replay...)
            print(f"still mounting (daemon pid {child.pid}); its last line: "
                  f"{_tail(log_path, lines=1, since=began)}", file=sys.stderr)
            said = time.monotonic()
        time.sleep(0.05)
    print(f"mounted at {config.mountpoint} (log: {log_path})")
    return 0


def _tail(path: str, lines: int = 15, since: int = 0) -> str:
    """The last `lines` lines of the log at `path`, of those from byte `since` on."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return "".join(text.splitlines(keepends=True)[-lines:]).rstrip() or "(nothing logged)"
    except FileNotFoundError:
        return "(no log)"


# The daemon's log is kept to LOG_BYTES, then moved to fusefs.log.1 (and .1 to .2 ...),
# LOG_BACKUPS of them: at most 32 MiB for years of running, whatever a failing loop says.
LOG_BYTES = 8 << 20
LOG_BACKUPS = 3


class DaemonLog(logging.handlers.RotatingFileHandler):
    """The daemon's log file, rotated by size. The background daemon's stdout and stderr
    are the log file too (libfuse's messages, a crash's traceback): after a rotation they
    follow to the new file, instead of writing on into the moved one.

    A line the file cannot take (its disk is full: a read-only mount with no
    --cache-dir-reserve left) goes to the system log at `syslog` if the machine has one,
    instead of Python's report of the failure to stderr, which is that same file."""

    def __init__(self, path: str, max_bytes: int = LOG_BYTES, backups: int = LOG_BACKUPS,
                 syslog: str = "/dev/log"):
        super().__init__(path, maxBytes=max_bytes, backupCount=backups)
        self._std = [fd for fd in (1, 2) if _same_file(fd, self.stream.fileno())]
        self._syslog_address = syslog
        self._syslog: logging.Handler | None | bool = None  # False: there is none

    def handleError(self, record: logging.LogRecord) -> None:
        if self._syslog is None:
            try:
                self._syslog = _Syslog(self._syslog_address)
            except OSError:
                self._syslog = False
        if self._syslog:
            self._syslog.handle(record)

    def doRollover(self) -> None:
        super().doRollover()
        for fd in self._std:
            os.dup2(self.stream.fileno(), fd)
        os.chmod(self.baseFilename, 0o600)


class _Syslog(logging.handlers.SysLogHandler):
    """Where the daemon's log lines go when its file cannot take them."""

    def __init__(self, address: str):
        super().__init__(address=address)
        self.setFormatter(logging.Formatter(
            f"fusefs[{os.getpid()}]: %(levelname)s %(name)s: %(message)s"))

    def handleError(self, record: logging.LogRecord) -> None:
        pass  # nowhere left to say it


def _same_file(fd: int, other: int) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.fstat(other))
    except OSError:
        return False


def _log_to(path: str, verbose: bool, also_stderr: bool = False) -> None:
    from .daemon import private_dir

    private_dir(os.path.dirname(path))
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    handlers = [DaemonLog(path)]
    if also_stderr and sys.stderr.isatty():
        handlers.append(logging.StreamHandler())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


# -- fsck -------------------------------------------------------------------------------------

def cmd_fsck(args) -> int:
    from .cluster import ClusterConfig, ReplicatedStore
    from .fsck import Fsck, format_report

    urls = _need_servers(args)
    transport = _transport(args, writes=args.repair)
    try:
        sb = superblock.locate(transport, urls)
    except errors.StorageError as e:
        print(f"fusefs fsck: cannot read the superblock: {_explain(e)}", file=sys.stderr)
        return 2
    members = list(sb.members)
    store = ReplicatedStore(members, transport, ClusterConfig(replicas=sb.replicas,
                                                              write_quorum=sb.write_quorum))
    try:
        store.start()
        report = Fsck(store, transport, sb, repair=args.repair,
                      progress=lambda m: print(f"fsck: {m}", file=sys.stderr)).run()
    except errors.LeaseHeld as e:
        print(f"fusefs fsck: cannot repair: {e}. Unmount it first; a check without "
              "--repair works while it is mounted", file=sys.stderr)
        return 2
    except errors.StorageError as e:
        print(f"fusefs fsck: could not finish: {_explain(e)}", file=sys.stderr)
        return 2
    finally:
        store.close()
    print(json.dumps(report.as_dict(), indent=1) if args.json
          else format_report(report, args.repair))
    return 0 if report.clean else 1


# -- scrub ------------------------------------------------------------------------------------

def cmd_scrub(args) -> int:
    from .progress import Progress
    from .scrub import ScrubBusy, Scrubber, format_report

    urls = _need_servers(args)
    transport = _transport(args, writes=True)
    try:
        sb = superblock.locate(transport, urls)
    except errors.StorageError as e:
        print(f"fusefs scrub: cannot read the superblock: {_explain(e)}", file=sys.stderr)
        return 2
    servers = list(sb.servers)
    cache_root = args.cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fusefs")
    state = args.state or os.path.join(os.path.abspath(cache_root), sb.fs_id, "scrub.json")
    if not args.verbose:  # the progress lines say it all
        logging.getLogger("fusefs.scrub").setLevel(logging.CRITICAL)
    shown = Progress("scrub")

    def progress(done: int, total: int, nbytes: int, line: str | None) -> None:
        if line is None:
            shown.update(done, max(total, done), nbytes)
        else:
            shown.say(line)

    scrubber = Scrubber(transport, lambda: servers, state, sb.fs_id, rate=args.rate,
                        progress=progress)
    try:
        report = scrubber.run_pass(restart=args.restart)
    except ScrubBusy as e:
        print(f"fusefs scrub: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"fusefs scrub: cannot keep the scrub's state in {state}: {e}; give a "
              "writable place with --state FILE", file=sys.stderr)
        return 2
    finally:
        shown.end()
    print(json.dumps(report.as_dict(), indent=1) if args.json else format_report(report))
    return report.exit_status


# -- gc ---------------------------------------------------------------------------------------

def cmd_gc(args) -> int:
    try:
        return _run_gc(args)
    except CliError as e:  # exit 2, not 1: 1 means leftovers found
        return _gc_failed(args, str(e))


def _run_gc(args) -> int:
    import tempfile

    from .cluster import ClusterConfig, ReplicatedStore
    from .gc import Collector, Refused, format_plan
    from .progress import Progress

    urls = _need_servers(args)
    transport = _transport(args, writes=args.delete)
    try:
        sb = superblock.locate(transport, urls)
    except errors.StorageError as e:
        return _gc_failed(args, f"cannot read the superblock: {_explain(e)}")
    members = list(sb.members)
    store = ReplicatedStore(members, transport, ClusterConfig(replicas=sb.replicas,
                                                              write_quorum=sb.write_quorum))
    if sb.leaving:  # servers being drained still hold copies the metadata load may need
        store.set_membership(members, sb.leaving)
    shown = Progress("gc")
    try:
        store.start()
        with tempfile.TemporaryDirectory(prefix="fusefs-gc-") as work:
            collector = Collector(store, transport, members, work_dir=work,
                                  progress=shown.say, listed=shown.update,
                                  cache_dirs=[args.cache_dir] if args.cache_dir else [])
            plan = collector.survey()
            if args.delete and plan.ids:
                collector.delete(plan)
    except Refused as e:
        return _gc_failed(args, str(e))
    except errors.StorageError as e:
        return _gc_failed(args, f"could not finish: {_explain(e)}; run it again")
    finally:
        shown.end()
        store.close()
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan))
    return plan.exit_status


def _gc_failed(args, why: str) -> int:
    print(f"fusefs gc: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps({"complete": False, "deleted": False, "exit_status": 2,
                          "error": why}, indent=1))
    return 2


# -- read-key ---------------------------------------------------------------------------------

def cmd_read_key(args) -> int:
    if not args.secret_file:
        raise CliError("say which cluster secret to derive it from: --secret-file F")
    try:
        protocol.write_read_key_file(protocol.load_secret(args.secret_file), args.out)
    except protocol.SecretError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write {args.out}: {e.strerror}") from None
    print(f"wrote the read-only key to {args.out}; mount readers with "
          f"`fusefs mount --read-only --secret-file {args.out} ...`")
    return 0


# -- umount and status ------------------------------------------------------------------------

def cmd_umount(args) -> int:
    from .host import process_state
    from .mounts import read_registry

    path = os.path.abspath(args.mountpoint)
    state = _mount_state(path)
    if state == "dead":
        _detach_dead(path)
        print(f"detached the dead fusefs mount at {path} (its daemon had died). Files "
              "fsynced before that are safe: mount again to use them")
        return 0
    if state == "foreign-dead":
        raise _foreign_dead(path)
    record = read_registry(path)
    if record is None or not _alive(record["pid"]):
        if not _is_mounted(path):
            raise CliError(f"nothing is mounted at {path}")
        _run_unmount(path)
        print(f"unmounted {path} (no fusefs daemon was running for it)")
        return 0
    os.kill(record["pid"], signal.SIGTERM)  # the daemon uploads everything, then unmounts
    shown, said_stopped = 0.0, False
    while _alive(record["pid"]) and not (read_registry(path) or {}).get("detached"):
        if not said_stopped and process_state(record["pid"]) == "T":
            print(f"the daemon (pid {record['pid']}) is stopped; it unmounts once it goes "
                  f"on (`kill -CONT {record['pid']}`)", file=sys.stderr)
            said_stopped = True
        if time.monotonic() - shown > 2:
            status = _read_status(record)
            if status and status.get("dirty_bytes"):
                print(f"uploading {format_size(status['dirty_bytes'])} before unmounting...",
                      file=sys.stderr)
            shown = time.monotonic()
        time.sleep(0.02)
    if _is_mounted(path):
        _run_unmount(path)
    print(f"unmounted {path}")
    return 0


def _run_unmount(path: str) -> None:
    from .mounts import unmount

    if not unmount(path):
        raise CliError(f"could not unmount {path}; is it busy? (`lsof +D {path}`)")


def _alive(pid: int) -> bool:
    from .host import process_alive

    return process_alive(pid)


def _read_status(record: dict) -> dict | None:
    try:
        with open(record["status"]) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError, KeyError):
        return None


def cmd_repair(args) -> int:
    from .admin import run_repair

    return run_repair(args, _transport(args, writes=not args.check), _need_servers(args))


_SERVERS_ARITY = {"list": (), "add": ("url",), "remove": ("server",), "replace": ("old", "new")}


def cmd_servers(args) -> int:
    from .admin import run_servers

    wanted = _SERVERS_ARITY[args.action]
    if len(args.names) != len(wanted):
        raise CliError(f"`servers {args.action}` takes {len(wanted)} argument(s): "
                       + (" ".join(w.upper() for w in wanted) or "none"))
    for field_name, value in zip(wanted, args.names):
        setattr(args, field_name, value)
    return run_servers(args, _transport(args, writes=args.action != "list"),
                       _need_servers(args))


def cmd_status(args) -> int:
    if args.servers and not args.mountpoint:
        from .admin import run_cluster_status

        return run_cluster_status(args, _transport(args), args.servers)
    if args.mountpoint:
        records, dead = _status_of(os.path.abspath(args.mountpoint))
    else:
        records, dead = _status_of_all()
    states = [_with_health(s) for s in (_read_status(r) for r in records
                                        if _alive(r["pid"])) if s]
    unhealthy = bool(dead) or any(not s["healthy"] for s in states)
    if args.json:
        print(json.dumps([{**s, "state": "alive"} for s in states] + dead, indent=1))
        return 1 if unhealthy else 0
    if not states and not dead:
        print("no fusefs mounts are running")
    for d in dead:
        _print_dead(d)
    for s in states:
        _print_alive(s)
    return 1 if unhealthy else 0


# The daemon writes its status every second; one this old is from a daemon that stopped.
STATUS_STALE_SECONDS = 15


def _with_health(s: dict) -> dict:
    """A mount's status with the figures scripts read first: `servers`,
    `under_replicated`, `handoffs`, `errors` and `healthy` (exit status 0)."""
    health = s.get("health") or {}
    servers = s["cluster"]["servers"]
    age = time.time() - s.get("time", 0)
    stale = _stale(s["pid"], age) if age > STATUS_STALE_SECONDS else None
    problems = [stale] if stale else []
    problems += [f"server {v['url']} is down: {v['last_error']}" for v in servers if not v["up"]]
    problems += [f"upload error: {e}" for e in s.get("upload_errors", [])]
    if s.get("local_room"):
        problems.append(f"local disk: {s['local_room']}")
    journal = s.get("journal") or {}
    problems += [f"journal: {journal[k]}" for k in ("lost", "error", "stalled")
                 if journal.get(k)]
    under, handoffs = health.get("under_replicated"), health.get("handoffs")
    # (None before the writer's first survey, a second or two after mounting: not known
    # to be unhealthy; a read-only mount leaves the survey to the writer)
    return {**s, "servers": servers, "under_replicated": under, "handoffs": handoffs,
            "stale": stale, "errors": problems,
            "healthy": not problems and not under and not handoffs}


def _stale(pid: int, age: float) -> str:
    """What a status `age` seconds old says of the daemon `pid`."""
    from .host import process_state

    why = (f"it is stopped: `kill -CONT {pid}` lets it go on"
           if process_state(pid) == "T" else
           "it is hung, or cannot write its cache directory (is that disk full?)")
    return (f"the daemon has reported nothing for {age:.0f} s, so these figures are old: "
            f"{why}")


def _status_of(path: str) -> tuple[list[dict], list[dict]]:
    """The registry record of the mount at `path` (if alive) or its dead-mount report."""
    from .mounts import read_registry

    state = _mount_state(path)
    if state == "dead":
        return [], [_dead_report(path)]
    if state == "foreign-dead":
        raise _foreign_dead(path)
    record = read_registry(path)
    if record is None:
        raise CliError(f"no fusefs mount is running at {path}")
    return [record], []


def _status_of_all() -> tuple[list[dict], list[dict]]:
    """Every registered mount, and a report for every dead fusefs mount (registered or
    only seen in the mount table)."""
    from .mounts import fusefs_mountpoints, read_record, runtime_dir

    found = (read_record(os.path.join(runtime_dir(), name))
             for name in sorted(os.listdir(runtime_dir())) if name.endswith(".json"))
    records = [r for r in found if r is not None]
    points = {r["mountpoint"] for r in records if r.get("mountpoint")} | set(fusefs_mountpoints())
    dead = [_dead_report(p) for p in sorted(points) if _mount_state(p) == "dead"]
    return records, dead


def _dead_report(path: str) -> dict:
    from .mounts import canonical, read_registry

    record = read_registry(path) or {}
    last = _read_status(record) if record else None
    return {"mountpoint": canonical(path), "state": "dead", "pid": record.get("pid"),
            "fs_id": (last or {}).get("fs_id"), "log": record.get("log"),
            "error": "its fusefs daemon died (kill -9, out of memory): the mount answers "
                     "'Transport endpoint is not connected'"}


def _print_dead(d: dict) -> None:
    pid = f" (pid {d['pid']})" if d["pid"] else ""
    print(f"{d['mountpoint']}: DEAD: its fusefs daemon{pid} died; the mount answers "
          "'Transport endpoint is not connected'")
    print(f"  `fusefs mount ... {d['mountpoint']}` (or `fusefs up DIR`) detaches it and "
          f"mounts again; `fusefs umount {d['mountpoint']}` only detaches it")
    if d["log"]:
        print(f"  why it died may be at the end of {d['log']}")


def _print_alive(s: dict) -> None:
    print(f"{s['mountpoint']}: filesystem {s['fs_id']}, pid {s['pid']}")
    if s["stale"]:
        print(f"  {s['stale']}")
    age = s.get("dirty_oldest_seconds")
    oldest = f" (oldest {age:.0f} s)" if s["dirty_bytes"] and age is not None else ""
    print(f"  dirty: {format_size(s['dirty_bytes'])}{oldest}, repair backlog: "
          f"{s['cluster']['repair_backlog']} copies, last copies still uploading: "
          f"{format_size(s['cluster'].get('copies_behind_bytes', 0))}")
    for server in s["cluster"]["servers"]:
        state = "up" if server["up"] else f"DOWN ({server['last_error']})"
        latency = f", {server['latency_ms']} ms" if server.get("latency_ms") is not None else ""
        role = " (leaving: being drained)" if server.get("leaving") else ""
        held = ((s.get("health") or {}).get("copies") or {}).get(server["id"])
        copies = f", holds {held['holds']} of the {held['should_hold']} copies it should" \
            if held else ""
        space = ""
        if server.get("capacity_bytes"):
            used = server["capacity_bytes"] - server["free_bytes"]
            space = f", {format_size(used)} used of {format_size(server['capacity_bytes'])}"
        direct = ", on this host: its block files are read directly" \
            if server.get("files_read_directly") else ""
        print(f"  server {server['url']}{role}: {state}{latency}{space}{copies}{direct}")
    print(f"  {_health_line(s.get('health'))}")
    if _scrub_line(s.get("health")):
        print(f"  {_scrub_line(s.get('health'))}")
    for line in s.get("upload_errors", []):
        print(f"  upload error: {line}")
    if s.get("local_room"):
        print(f"  local disk: {s['local_room']}")
    print(f"  {_journal_line(s.get('journal'))}")


def _health_line(h: dict | None) -> str:
    if not h:
        return "repair: not running here (read-only mounts leave it to the writer)"
    if h.get("under_replicated") is None:
        return "repair: first survey of the servers still running"
    line = (f"under-replicated blocks: {h['under_replicated']} of {h['surveyed_blocks']}, "
            f"copies outside their homes: {h['handoffs']}, lost: {h['lost']}")
    last = h.get("last_repair")
    if last and last.get("finished"):
        when = time.strftime("%H:%M:%S", time.localtime(last["finished"]))
        line += f"; last repair at {when}: found {last['found']}, fixed {last['fixed']}"
    return line


def _scrub_line(h: dict | None) -> str | None:
    """The last scrub pass (fusefs/scrub.py) a mount's status records, if one finished."""
    scrub = (h or {}).get("last_scrub")
    running = "; a scrub pass is running now" if (h or {}).get("scrub_running") else ""
    if not scrub or not scrub.get("finished"):
        return running[2:] or None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(scrub["finished"]))
    return (f"last scrub {when}: {scrub['checked']} copies verified, {scrub['found']} bad, "
            f"{scrub['fixed']} repaired, {scrub['unrepairable']} with no intact copy"
            f"{running}")


def _journal_line(j: dict | None) -> str:
    if j is None:
        return "journal: off (changes stay on this machine)"
    if "following" in j:
        line = f"read-only, following the writer: at record {j['seq']}"
        return line + (f"; STALLED: {j['stalled']}" if j.get("stalled") else "")
    if j.get("lost"):
        return f"READ-ONLY: {j['lost']}"
    behind = j["seq"] - j["shipped"]
    line = f"writer: journal at record {j['seq']}, {behind} not yet on the servers"
    if j.get("error"):
        line += f"; shipping error: {j['error']}"
    return line


def cmd_up(args) -> int:
    from .embedded import up

    return up(args.dir)


def cmd_down(args) -> int:
    from .embedded import down

    return down(args.dir)


COMMANDS = {"fsck": cmd_fsck, "mkfs": cmd_mkfs, "mount": cmd_mount, "umount": cmd_umount,
            "gc": cmd_gc, "read-key": cmd_read_key, "repair": cmd_repair,
            "servers": cmd_servers, "scrub": cmd_scrub,
            "status": cmd_status, "up": cmd_up, "down": cmd_down}


# Commands whose exit status 1 is a result ("problems found", "not healthy"): a failure to
# run them at all (bad arguments, no servers given) is 2, as their --help says.
RESULT_STATUSES = {"fsck", "gc", "repair", "scrub", "servers"}


# The arguments main() was given: `mount` starts its daemon with the same ones.
_INVOCATION: list[str] = []


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if len(given) >= 2 and "://" in given[0]:
        from .mount_helper import main as helper  # mount.fuse's form: fusefs SOURCE DIR -o ...

        return helper(given)
    _INVOCATION[:] = given
    args = build_parser().parse_args(given)
    if args.command != "mount" or not args.foreground:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except CliError as e:
        print(f"fusefs {args.command}: {e}", file=sys.stderr)
        return 2 if args.command in RESULT_STATUSES else 1
    except KeyboardInterrupt:
        return 130
