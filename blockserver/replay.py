"""Replay protection: which signed requests this server has already taken.

A signed request carries a date (client's unix seconds) and a random nonce. The server takes
a request only if its date is within `SIGNATURE_MAX_SKEW` of its clock, not before
`floor`, and its nonce is new. Three bounds make that hold with bounded memory and across
restarts:

- Nonces are kept only while their date is acceptable (date + skew), in buckets per
  date second, and at most `capacity` of them: when full, new requests are answered
  503 `busy` (retry) until old ones expire. Never unbounded.
- `floor`: the first whole second after this process started (the server waits for it
  before it serves). A request taken by an earlier process was dated at most at the time
  it arrived, so before this process started, so below `floor`: refused.
- A request dated *ahead* of the server's clock (the client's clock is fast) could be dated
  after the next start; its nonce is appended to `DATA/nonces-ahead` (a few bytes, and
  only for such requests) and read back at start. The file is written, not fsynced: a
  killed process loses nothing, a power cut may forget those nonces (docs/security.md).

Locks: `_lock` guards the buckets and the file; it is held for one small write at most.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

from .http11 import HttpError
from .protocol import SIGNATURE_MAX_SKEW

log = logging.getLogger("blockserver.replay")

DEFAULT_CAPACITY = 1_000_000  # about 80 MB at most
AHEAD_FILE_LINES = 100_000  # the nonces-ahead file is rewritten beyond this (about 3 MB)


class NonceBook:
    """The nonces taken within the signature window, so a signed request is taken once.
    Nonces dated ahead of the clock are also kept on disk (`nonces-ahead`), so a restart
    inside their window still refuses them."""

    def __init__(self, data_dir: str | None, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.floor = math.ceil(time.time())  # see wait_for_floor
        self._lock = threading.Lock()
        self._seen: set[bytes] = set()  # guarded by _lock
        self._by_date: dict[int, list[bytes]] = {}  # guarded by _lock
        self._path = None if data_dir is None else os.path.join(data_dir, "nonces-ahead")
        self._file = None
        self._ahead_lines = 0  # guarded by _lock
        if self._path is not None:
            self._load_ahead()

    def wait_for_floor(self) -> None:
        """Sleep until the clock reaches `floor` (under a second), so that a client with a
        good clock never signs a request dated below it."""
        delay = self.floor - time.time()
        if delay > 0:
            time.sleep(delay)

    def remember(self, nonce: str, date: int) -> None:
        """Take a nonce, or raise 401 `replayed` / 503 `busy`."""
        key = _compact(nonce)
        now = time.time()
        with self._lock:
            self._expire(now)
            if key in self._seen:
                raise HttpError(401, "replayed", "this signed request was already used")
            if len(self._seen) >= self.capacity:
                raise HttpError(503, "busy", "too many signed requests in the last "
                                f"{2 * SIGNATURE_MAX_SKEW}s to remember; retry shortly",
                                retry_after=1)
            self._seen.add(key)
            self._by_date.setdefault(date, []).append(key)
            if date > now and self._file is not None:
                self._note_ahead(date, key, now)

    def _note_ahead(self, date: int, key: bytes, now: float) -> None:
        """Append one nonce to the file; rewrite it with only the dates still ahead of the
        clock when it grows past a bound (so a fast client clock never fills the disk)."""
        self._ahead_lines += 1
        if self._ahead_lines > AHEAD_FILE_LINES:
            ahead = [(d, k) for d, keys in self._by_date.items() if d > now for k in keys]
            with open(self._path + ".tmp", "wb") as f:
                f.write("".join(f"{d} {k.hex()}\n" for d, k in ahead).encode())
            os.replace(self._path + ".tmp", self._path)
            self._file.close()
            self._file = open(self._path, "ab", buffering=0)  # noqa: SIM115
            self._ahead_lines = len(ahead)
            return
        self._file.write(f"{date} {key.hex()}\n".encode())

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def _expire(self, now: float) -> None:
        oldest = now - SIGNATURE_MAX_SKEW - 1
        for date in [d for d in self._by_date if d < oldest]:
            for key in self._by_date.pop(date):
                self._seen.discard(key)

    def _load_ahead(self) -> None:
        """Nonces of requests dated ahead of an earlier process's clock, still acceptable."""
        kept = []
        try:
            with open(self._path, "rb") as f:
                for line in f:
                    date, _, nonce = line.decode("ascii", "replace").strip().partition(" ")
                    if date.isdigit() and len(date) < 20 and int(date) >= self.floor:
                        kept.append((int(date), nonce))
        except FileNotFoundError:
            pass
        tmp = self._path + ".tmp"
        with open(tmp, "wb") as f:
            f.write("".join(f"{d} {n}\n" for d, n in kept).encode())
        os.replace(tmp, self._path)
        for date, nonce in kept:
            key = _compact(nonce)
            self._seen.add(key)
            self._by_date.setdefault(date, []).append(key)
        self._file = open(self._path, "ab", buffering=0)  # noqa: SIM115 - kept open
        if kept:
            log.info("remembering %d nonces of requests dated ahead of the clock", len(kept))


def _compact(nonce: str) -> bytes:
    """12 bytes for the usual 24-hex-digit nonce; any other text kept as its bytes."""
    try:
        return bytes.fromhex(nonce) if len(nonce) <= 64 else nonce.encode("latin-1")
    except ValueError:
        return nonce.encode("latin-1", "replace")
