"""Progress of a long command on stderr, for people and for logs.

On a terminal one line is rewritten in place with the count, the rate and the time left;
otherwise (a pipe, a log file, CI) each step prints a line of its own, at most one every
`every` seconds plus the final one, so a log stays readable.
"""

from __future__ import annotations

import sys
import time

from blockserver.protocol import format_size


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """`update(done, total, nbytes)` as work goes on; `say(text)` for a step; `end()`."""

    def __init__(self, what: str, stream=None, every: float = 2.0, quiet: bool = False,
                 unit: str = ""):
        self.what, self.every, self.quiet, self.unit = what, every, quiet, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.monotonic()
        self._shown = 0.0
        self._open_line = False

    def line(self, done: int, total: int | None, nbytes: int = 0) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        text = f"{self.what}: {done}" + (f" of {total}" if total is not None else "") + \
            (f" {self.unit}" if self.unit else "")
        if nbytes:
            text += f", {format_size(nbytes)} at {format_size(int(nbytes / elapsed))}/s"
        elif done:
            text += f" at {done / elapsed:.0f}/s"
        if total and 0 < done < total:
            text += f", about {_duration((total - done) * elapsed / done)} left"
        return text

    def update(self, done: int, total: int | None = None, nbytes: int = 0,
               final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not final and now - self._shown < (0.2 if self.tty else self.every):
            return
        self._shown = now
        self._write(self.line(done, total, nbytes))

    def say(self, text: str) -> None:
        if not self.quiet:
            self._write(f"{self.what}: {text}", keep=True)

    def end(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False

    def _write(self, text: str, keep: bool = False) -> None:
        if self.tty and not keep:
            self.stream.write("\r\033[K" + text)
            self._open_line = True
        else:
            self.end()
            self.stream.write(text + "\n")
        self.stream.flush()
