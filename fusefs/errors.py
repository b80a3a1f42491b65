"""The exceptions of fusefs. Each carries the errno the FUSE adapter will answer with.

    FusefsError (EIO)
    ├── FsError (its own errno)           a POSIX failure of a filesystem call: ENOENT,
    │                                      EEXIST, ENOTEMPTY, EISDIR, ENOTDIR, ENAMETOOLONG...
    ├── MetadataFailed (EIO)               the local metadata database lost changes it had
    │                                      accepted; it refuses more until a new mount
    └── StorageError (EIO)                 talking to block servers went wrong
        ├── Unavailable (EIO)              connection refused, reset, or server 5xx
        │   ├── Timeout (EIO)              no answer within the configured timeout
        │   └── JournalGap (EIO)           a journal segment is missing although a later
        │                                  one exists: copies were lost or are out of reach
        ├── AuthenticationFailed (EACCES)  the server refused our signature (401)
        ├── WrongServer (EIO)              the server's stable id is not the expected one
        ├── BlockMissing (EIO)             the server has no such block (404)
        ├── BlockCorrupt (EIO)             a copy failed verification (410, or bad bytes)
        ├── Conflict (EIO)                 the id exists with other bytes (409)
        ├── Rejected (EIO)                 the server refused the request as malformed (4xx)
        ├── StorageFull (ENOSPC)           no space left on the server (507)
        ├── QuorumNotReached (EIO)         fewer than W servers stored a block, or no
        │                                  replica could return it
        ├── LeaseHeld (EIO)                another read-write mount holds the writer lease
        └── Fenced (EROFS)                 this mount lost its writer lease: it may change
                                           nothing any more

Library exceptions (requests, urllib3, OSError) are translated into these by a table in
`fusefs.transport` and nowhere else.
"""

from __future__ import annotations

import errno


class FusefsError(Exception):
    errno = errno.EIO


class FsError(FusefsError):
    """A filesystem call that fails with a specific errno, e.g. FsError(errno.ENOENT, ...)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message or errno.errorcode.get(code, str(code)))
        self.errno = code


class MountRefused(FusefsError):
    """libfuse did not mount (it printed its reason just before: an unknown -o option, a
    mountpoint it cannot use)."""


class MetadataFailed(FusefsError):
    """The local metadata database lost changes it had accepted (a failed group commit)."""


class StorageError(FusefsError):
    """Something went wrong between us and one or more block servers."""

    def __init__(self, message: str, *, server: str | None = None):
        super().__init__(message)
        self.server = server


class Unavailable(StorageError):
    pass


class Timeout(Unavailable):
    pass


class AuthenticationFailed(StorageError):
    errno = errno.EACCES


class WrongServer(StorageError):
    pass


class BlockMissing(StorageError):
    pass


class BlockCorrupt(StorageError):
    pass


class Conflict(StorageError):
    pass


class Rejected(StorageError):
    pass


class StorageFull(StorageError):
    errno = errno.ENOSPC


class QuorumNotReached(StorageError):
    pass


class LeaseHeld(StorageError):
    """Another read-write mount holds the filesystem."""


class Fenced(StorageError):
    """This mount lost its writer lease: it may not change the filesystem any more."""

    errno = errno.EROFS


class JournalGap(Unavailable):
    """A segment of a journal chain is missing although a later one exists: copies were
    lost (or are on servers out of reach), and taking the end there would drop changes."""
