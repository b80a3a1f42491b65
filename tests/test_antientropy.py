"""The anti-entropy survey's judgement, on made-up listings (no servers): which copies are
missing, which are hand-offs, what counts as under-replicated or lost, and what a drain
moves; and when the background repairer runs its passes."""

from __future__ import annotations

import threading
import time
import types

from fusefs import antientropy
from fusefs.antientropy import Holdings, Repairer, survey
from fusefs.placement import rank
from fusefs.transport import Member

SERVERS = [Member(f"s{i}", f"http://127.0.0.1:{7000 + i}") for i in range(5)]
MEMBERS = SERVERS[:4]


def _holdings(copies: dict[str, dict[str, str]], unlisted=()) -> Holdings:
    found = Holdings(copies=copies, sizes={b: 10 for b in copies},
                     unlisted={s: "down" for s in unlisted})
    return found


def _homes(block_id: str, members=MEMBERS) -> list[Member]:
    return rank(block_id, members)[:3]


def test_a_block_on_its_homes_is_healthy():
    homes = _homes("b1")
    found = survey({"b1": "c"}, _holdings({"b1": {m.id: "c" for m in homes}}), MEMBERS, [], 3)
    assert (found.under_replicated, found.handoffs, found.damage) == (0, 0, [])
    assert found.healthy
    assert sum(found.holds.values()) == 3 and sum(found.should_hold.values()) == 3


def test_a_missing_home_copy_is_damage_to_repair_from_a_holder():
    homes = _homes("b1")
    found = survey({"b1": "c"}, _holdings({"b1": {m.id: "c" for m in homes[:2]}}),
                   MEMBERS, [], 3)
    assert found.under_replicated == 1
    [damage] = found.damage
    assert damage.missing == [homes[2]] and damage.extra == []
    assert set(damage.sources) == set(homes[:2])


def test_a_copy_under_another_checksum_is_not_healthy():
    homes = _homes("b1")
    copies = {m.id: "c" for m in homes}
    copies[homes[0].id] = "other"
    found = survey({"b1": "c"}, _holdings({"b1": copies}), MEMBERS, [], 3)
    assert found.under_replicated == 1 and found.damage[0].missing == [homes[0]]


def test_a_copy_outside_the_homes_is_a_hand_off_to_move():
    homes = _homes("b1")
    outside = next(m for m in MEMBERS if m not in homes)
    found = survey({"b1": "c"},
                   _holdings({"b1": {**{m.id: "c" for m in homes}, outside.id: "c"}}),
                   MEMBERS, [], 3)
    assert found.under_replicated == 0 and found.handoffs == 1 and not found.healthy
    assert found.damage[0].extra == [outside] and found.damage[0].missing == []


def test_a_home_that_cannot_be_listed_is_under_replicated_but_not_repaired_now():
    homes = _homes("b1")
    found = survey({"b1": "c"}, _holdings({"b1": {m.id: "c" for m in homes[:2]}},
                                          unlisted=[homes[2].id]), MEMBERS, [], 3)
    assert found.under_replicated == 1 and found.damage == [] and not found.healthy


def test_a_block_with_no_copy_is_lost_only_when_every_server_was_listed():
    assert survey({"b1": "c"}, _holdings({}), MEMBERS, [], 3).lost == ["b1"]
    assert survey({"b1": "c"}, _holdings({}, unlisted=["s0"]), MEMBERS, [], 3).lost == []


def test_unknown_checksums_take_what_most_holders_list_and_unstored_ones_are_skipped():
    homes = _homes("seg")
    copies = {homes[0].id: "x", homes[1].id: "x", homes[2].id: "y"}
    found = survey({"seg": None, "never-stored": None}, _holdings({"seg": copies}),
                   MEMBERS, [], 3)
    assert found.blocks == 1 and found.damage[0].missing == [homes[2]]


def test_a_drain_moves_everything_on_the_leaving_server_even_unnamed_blocks():
    leaving = SERVERS[4]
    homes = _homes("upload")
    found = survey({}, _holdings({"upload": {leaving.id: "c", homes[0].id: "c"}}),
                   MEMBERS, [leaving], 3)
    [damage] = found.damage
    assert damage.extra == [leaving] and set(damage.missing) == set(homes[1:])


def test_garbage_on_members_is_left_alone():
    outside = SERVERS[0]
    found = survey({}, _holdings({"garbage": {outside.id: "c"}}), MEMBERS, [], 3)
    assert found.blocks == 0 and found.damage == []


class _QuietStore:
    """What a Repairer asks of its store, with every server up and nothing happening."""

    def __init__(self):
        self.transport = None
        self.members, self.leaving = MEMBERS, []
        self.config = types.SimpleNamespace(replicas=3)
        up = types.SimpleNamespace(up=True)
        self.health = types.SimpleNamespace(snapshot=lambda: {m.id: up for m in MEMBERS},
                                            on_up=lambda callback: None)

    def on_damage(self, callback):
        pass


def test_background_passes_wait_for_the_first_delay_then_the_duty_bound(monkeypatch):
    """With nothing reported and no server changing state, the first pass comes
    `first_pass` seconds after start (not at once: a mount's first seconds are its user's);
    a reported damage brings one at once; a periodic pass then waits at least DUTY times
    as long as the last pass took, even with a shorter interval."""
    monkeypatch.setattr(antientropy, "DUTY", 4)
    passes: list[float] = []
    ran = threading.Event()

    def run_pass():
        passes.append(time.monotonic())
        ran.set()
        time.sleep(0.5)  # a pass of 0.5 s: the next periodic one no sooner than 2 s after
        return types.SimpleNamespace(fixed=0)

    repairer = Repairer(_QuietStore(), dict, interval=0.1, first_pass=2.5)
    monkeypatch.setattr(repairer, "run_pass", run_pass)
    started = time.monotonic()
    repairer.start()
    try:
        assert ran.wait(10), "no first pass"
        assert passes[0] - started >= 2.5 - 0.05
        ran.clear()
        repairer.report_damage("a" * 32)
        assert ran.wait(5), "no pass after reported damage"
        time.sleep(5.5)
        assert len(passes) >= 3
        gaps = [b - a for a, b in zip(passes[1:], passes[2:])]
        assert all(gap >= 0.5 + 4 * 0.5 - 0.05 for gap in gaps), gaps
    finally:
        repairer.close()


class _VanishingStore:
    """Every copy of every block was deleted (by the garbage collector) after the survey."""

    def __init__(self):
        from fusefs.health import Health

        self.members, self.leaving = MEMBERS, []
        self.servers = MEMBERS
        self.health = Health([m.id for m in MEMBERS])
        self.transport = types.SimpleNamespace(
            batch_check=lambda member, ids: [{"id": i, "status": 404} for i in ids],
            batch_get=lambda member, ids: dict.fromkeys(ids, 404),
            batch_put=lambda member, items: [201 for _ in items])

    def on_damage(self, listener) -> None:
        pass

    def _call(self, member, fn, *args):
        return fn(member, *args)

    def get(self, block_id, checksum):
        from fusefs import errors

        raise errors.BlockMissing(f"{block_id}: no server holds it")


def test_copies_deleted_since_the_survey_are_dropped_not_failed():
    """A writer removing files while a pass runs: their blocks leave every server between
    the survey and the copy. Nothing is left to repair, and the pass must not say that
    copies failed (a person reading the log would look for a broken server)."""
    store = _VanishingStore()
    repairer = Repairer(store, dict)
    chunk = [antientropy.Damage(f"{i:032x}", "0" * 32, 10, [MEMBERS[0]], [], [MEMBERS[1]])
             for i in range(5)]
    report = antientropy.PassReport(started=time.time())
    repairer._copy_chunk(MEMBERS[0], chunk, report, antientropy._Throttle(None, threading.Event()))
    assert (report.dropped, report.failed, report.copied) == (5, 0, 0)
    assert report.as_dict()["dropped"] == 5
