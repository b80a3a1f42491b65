"""A block server's files, as a client on the same host may read them (docs/blockserver-api.md,
"Reading a server's files directly").

A server says in its status where its data directory is (`local.root`) and a token that it
wrote, at its start, into `TOKEN_FILE` there (`local.token`). A client that finds that file
under that path with that token is on the server's host and sees its files: it may then read
a block's file itself instead of asking for it over HTTP, which costs both processes far
more CPU than the bytes themselves. A block file never changes once it has its name, and
the reader checks the bytes against the checksum it expects, so the worst a race (a delete,
a recycled inode) or a damaged file can do is make the read fail; the client then asks the
server, which checks its copy as it always does.

A block file is BLOCK_HEADER (BLOCK_MAGIC, the xxh3-128 checksum as 16 raw bytes, the length as
a little-endian u64) followed by the block's bytes.
"""

from __future__ import annotations

import errno
import os
import struct

import xxhash

TOKEN_FILE = "local-token"
BLOCK_MAGIC = b"FFSBLK1\n"
BLOCK_HEADER = struct.Struct("<8s16sQ")


def block_file(root: str, block_id: str) -> str:
    """The file of block `block_id` (validated: 32 lowercase hex) in data directory `root`."""
    return os.path.join(root, "blocks", block_id[:2], block_id)


def read_token(root: str) -> str | None:
    """The token in `root`'s token file, or None when there is none to read."""
    try:
        with open(os.path.join(root, TOKEN_FILE), encoding="ascii") as f:
            return f.read(256).strip()
    except (OSError, ValueError):
        return None


def open_block_file(root: str, block_id: str, checksum: str) -> tuple[int, int] | None:
    """(an open descriptor, the block's length) when the block's file under `root` has a
    header naming `checksum`, else None (absent, or another block's). The bytes start at
    BLOCK_HEADER.size and are not checked here. The caller closes the descriptor. Other
    OS errors (permission, I/O) raise."""
    try:
        fd = os.open(block_file(root, block_id), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    try:
        header = os.pread(fd, BLOCK_HEADER.size, 0)
        if len(header) == BLOCK_HEADER.size:
            magic, digest, length = BLOCK_HEADER.unpack(header)
            if magic == BLOCK_MAGIC and digest.hex() == checksum:
                return fd, length
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def read_block_file(root: str, block_id: str, checksum: str) -> bytes | None:
    """The bytes of the block if its file under `root` holds exactly the bytes of checksum
    `checksum`; None when the file is absent or holds anything else. Other OS errors
    (permission, I/O) raise."""
    opened = open_block_file(root, block_id, checksum)
    if opened is None:
        return None
    fd, length = opened
    try:
        data = os.pread(fd, length, BLOCK_HEADER.size) if length else b""
    finally:
        os.close(fd)
    if len(data) != length or xxhash.xxh3_128_hexdigest(data) != checksum:
        return None
    return data
