"""Progress lines of long commands: rate and time left, one line per step off a terminal."""

from __future__ import annotations

import io

from fusefs.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_says_count_rate_and_time_left():
    progress = Progress("repair", stream=io.StringIO(), unit="copies")
    progress.started -= 10  # ten seconds in
    line = progress.line(25, 100, 25 << 20)
    assert line.startswith("repair: 25 of 100 copies, 25.0 MiB at 2.5 MiB/s")
    assert line.endswith("about 30s left")


def test_off_a_terminal_each_step_is_a_line_of_its_own_and_updates_are_spaced():
    out = io.StringIO()
    progress = Progress("scrub", stream=out, every=3600)
    progress.update(1, 10, final=True)
    progress.update(2, 10)  # within `every` of the last: not shown
    progress.say("server 2 of 3")
    progress.update(10, 10, final=True)
    progress.end()
    lines = out.getvalue().splitlines()
    assert [ln.split(" at ")[0] for ln in lines] == ["scrub: 1 of 10", "scrub: server 2 of 3",
                                                  "scrub: 10 of 10"]
    assert "\r" not in out.getvalue()


def test_on_a_terminal_updates_rewrite_one_line_and_quiet_prints_nothing():
    out = _Terminal()
    progress = Progress("repair", stream=out)
    progress.update(1, 2, final=True)
    progress.update(2, 2, final=True)
    progress.end()
    assert out.getvalue().count("\r") == 2 and out.getvalue().endswith("\n")
    quiet = io.StringIO()
    Progress("repair", stream=quiet, quiet=True).update(1, 2, final=True)
    assert quiet.getvalue() == ""
