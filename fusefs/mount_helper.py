"""`mount.fusefs`: the helper mount(8) runs for a filesystem of type `fusefs`, so that an
/etc/fstab line (mounted at boot, or by `mount DIR`) and `mount -t fusefs` work.

mount(8) calls a helper as `mount.fusefs SOURCE DIR [-sfnv] [-N NS] [-o OPTIONS]`. For us
SOURCE is the block server URLs, comma-separated (what `--servers` takes), and OPTIONS
mixes three kinds, told apart here:
- fusefs's own mount options, spelled as the long option without its dashes
  (`secret-file=/etc/fusefs/secret`, `cache-dir=...`, `sync-on-close`), and `ro`, which is
  `--read-only`;
- options meant for mount(8) or systemd alone (`defaults`, `noauto`, `nofail`, `_netdev`,
  `x-systemd.*`, ...), dropped;
- everything else, handed to FUSE as `-o` (`allow_other`, `noatime`, `attr_timeout=5`).

Then it runs `fusefs mount`, which returns once the filesystem is mounted; its daemon
lives on detached. Exit status as mount(8) expects of a helper: 0 mounted, 1 a wrong
invocation, 32 the mount failed. `fusefs SOURCE DIR -o OPTIONS` (what mount.fuse runs for
type `fuse.fusefs`) comes here too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import subprocess
import sys

# mount(8)'s exit statuses for a helper
USAGE, FAILED = 1, 32

# Options that only mount(8), fstab or systemd read: a helper never passes them on.
MOUNT_ONLY = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group",
              "nofail", "_netdev", "netdev", "rw", "loop"}
MOUNT_ONLY_PREFIXES = ("x-", "X-", "comment=")
# mount(8)'s own flags that libfuse 2 does not know, and that change nothing here: fusefs
# never updates access times on reads (nodiratime), writes timestamps as it always does
# (lazytime), and the kernel's messages are not ours (silent, loud).
ALREADY_TRUE = {"nodiratime", "lazytime", "nolazytime", "silent", "loud"}
# Access-time policies that ask for updates on reads, which fusefs does not make.
ATIME_UPDATES = {"relatime", "norelatime", "strictatime", "nostrictatime", "diratime"}
# The flags a remount can change: the kernel's, of the mount and its superblock. The rest
# (fusefs's and FUSE's own) are fixed while mounted; mount(8) repeats them from fstab.
REMOUNT_FLAGS = {"ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "sync",
                 "async", "dirsync", "atime", "noatime", "nodiratime", "bind"}
# `fusefs mount` options that make no sense in fstab: the source names the servers, and
# mount(8) needs the helper to return once mounted.
NOT_IN_FSTAB = {"servers", "foreground", "help"}


class HelperError(Exception):
    """A wrong invocation, said in one line."""


def fusefs_options() -> dict[str, bool]:
    """`fusefs mount`'s long options, without dashes -> whether it takes a value."""
    from .cli import build_parser

    found = {}
    for action in build_parser().mount_parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and action.help != argparse.SUPPRESS:
                found[flag[2:]] = action.nargs != 0
    return {name: takes for name, takes in found.items() if name not in NOT_IN_FSTAB}


def translate(source: str, directory: str, options: list[str]) -> list[str]:
    """The `fusefs` arguments for `mount.fusefs SOURCE DIR -o OPTIONS` (`options` the
    -o values as given, each comma-separated). Raises HelperError."""
    known = fusefs_options()
    if not source or source.startswith("-"):
        raise HelperError("the source (fstab's first field) must be the block server URLs, "
                          "comma-separated, e.g. http://10.0.0.5:7001,http://10.0.0.6:7001")
    ours, fuse = [], []
    for option in (o.strip() for text in options for o in text.split(",")):
        name, eq, value = option.partition("=")
        if not option or option in MOUNT_ONLY or option in ALREADY_TRUE or \
                option.startswith(MOUNT_ONLY_PREFIXES):
            continue
        if option in ATIME_UPDATES:
            raise HelperError(f"option {option!r}: fusefs does not update access times on "
                              "reads (it behaves as with noatime); leave it out")
        if option == "nosymfollow":
            raise HelperError("option 'nosymfollow': libfuse 2 cannot pass it to the kernel; "
                              "leave it out")
        if option == "ro":
            ours.append("--read-only")
            continue
        key = name.replace("_", "-")
        if key in NOT_IN_FSTAB:
            raise HelperError(f"option {name!r} cannot be used here" + (
                ": the servers are the source (fstab's first field)" if key == "servers"
                else ""))
        if key not in known:
            fuse.append(option)  # FUSE's to accept or refuse
        elif known[key] and not (eq and value):
            raise HelperError(f"option {name!r} needs a value: {name}=...")
        elif not known[key] and eq:
            raise HelperError(f"option {name!r} takes no value")
        else:
            ours += [f"--{key}", value] if known[key] else [f"--{key}"]
    # mount(8) gives no `dev` or `suid` (they are its defaults) but libfuse's defaults are
    # nodev and nosuid: as for any other filesystem type, fstab says `nodev`/`nosuid` to
    # have them (FUSE's own mount.fuse does the same).
    fuse += [flag for flag in ("dev", "suid") if f"no{flag}" not in fuse and flag not in fuse]
    # The source shows as the mount's source (df, findmnt -S), as a network filesystem's
    # server does; libfuse reads an escaped comma as part of the value.
    if not any(o.startswith("fsname=") for o in fuse):
        fuse.insert(0, "fsname=" + source.replace(",", "\\,"))
    return ["mount", "--servers", source, *ours, "-o", ",".join(fuse), directory]


def remount_command(directory: str, options: list[str]) -> list[str]:
    """`mount -o remount,...` of a mounted fusefs (`options` as mount(8) gives them): the
    kernel changes its flags (`ro` makes writes fail with EROFS, `rw` takes them back) and
    the daemon goes on, so mount(8) does it itself (`-i`: without calling this helper
    again). Options that cannot change while mounted are left out."""
    given = [o.strip() for text in options for o in text.split(",")]
    return ["mount", "-i", "-o", ",".join(["remount"] + [o for o in given
                                                         if o in REMOUNT_FLAGS]), directory]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mount.fusefs", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mount a fusefs filesystem the way mount(8) does for type fusefs: "
        "link this program as /sbin/mount.fusefs, and an /etc/fstab line mounts it at boot "
        "or with `mount DIR`.",
        epilog="example /etc/fstab line (one line):\n"
        "  http://10.0.0.5:7001,http://10.0.0.6:7001,http://10.0.0.7:7001  /srv/data  fusefs"
        "\n    secret-file=/etc/fusefs/secret,cache-dir=/var/cache/fusefs,_netdev,"
        "allow_other  0  0\n\n"
        "options: `fusefs mount`'s long options without their dashes (secret-file=F, "
        "cache-dir=DIR,\nsync-on-close, ...), `ro` for --read-only; mount(8)'s own "
        "(defaults, noauto, nofail,\n_netdev, x-systemd.*) are ignored; the rest go to "
        "FUSE (allow_other, noatime, ...).\n"
        "exit status: 0 mounted, 1 wrong invocation, 32 the mount failed.")
    p.add_argument("source", metavar="SERVERS", help="block server URLs, comma-separated")
    p.add_argument("directory", metavar="DIR", help="where to mount")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-f", dest="fake", action="store_true",
                   help="check and show what would run, mount nothing")
    p.add_argument("-v", dest="verbose", action="store_true", help="show what runs")
    p.add_argument("-s", dest="sloppy", action="store_true", help="accepted; no effect")
    p.add_argument("-n", dest="no_mtab", action="store_true", help="accepted; no effect")
    p.add_argument("-N", dest="namespace", metavar="NS",
                   help="not supported: mount from inside the namespace instead")
    p.add_argument("-t", dest="type", metavar="TYPE", help="accepted (fusefs)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else USAGE
    try:
        if args.namespace:
            raise HelperError("-N is not supported: run mount inside the namespace")
        remount = "remount" in ",".join(args.options).split(",")
        command = remount_command(args.directory, args.options) if remount else \
            translate(args.source, args.directory, args.options)
    except HelperError as e:
        print(f"mount.fusefs: {e}", file=sys.stderr)
        return USAGE
    if remount:
        if args.verbose or args.fake:
            print(shlex.join(command), file=sys.stderr)
        if args.fake:
            return 0
        return 0 if subprocess.run(command).returncode == 0 else FAILED
    if args.verbose or args.fake:
        print("fusefs " + shlex.join(command), file=sys.stderr)
    if args.fake:
        return 0
    from .cli import main as fusefs_main

    try:
        # Quiet when it works, as mount(8) helpers are (scripts compare mount's output);
        # the line saying where the log is shows with -v. Errors go to stderr either way.
        with contextlib.redirect_stdout(sys.stdout if args.verbose else io.StringIO()):
            status = fusefs_main(command)
    except SystemExit as e:  # argparse refused a value (it said why)
        return USAGE if e.code == 2 else FAILED
    return 0 if status == 0 else FAILED
