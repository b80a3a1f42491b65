"""Changing which servers a filesystem lives on: add, remove (drain), replace.

The membership is part of the superblock: `members` are where blocks live (their homes are
ranked among them), `leaving` are servers being drained (read from, never written to).
Each change is one compare-and-swap of the superblock that needs a majority of the old
and of the new members (`superblock.update(..., previous=)`), retried over the writer's
lease renewals, which change the superblock every few seconds; the writer in turn
rebases its renewal over the change (lease.py) and so picks the new membership up
without a remount.

- add: the new server becomes a member at once; the blocks whose homes now include it
  are copied there, and their copies on the servers that stopped being homes are deleted
  after (the repair pass moves them: fusefs/antientropy.py).
- remove: the server moves to `leaving`; repair passes copy everything it holds to the
  blocks' homes among the remaining members, deleting its copies only once every home has
  one; when it lists nothing, it leaves the superblock. No block ever has fewer copies
  than before.
- replace OLD NEW: NEW takes OLD's place as a member and in the ranking (it is ranked under
  OLD's slot, so exactly OLD's blocks are homed on it); OLD leaves through `leaving` like
  a removal: drained when it answers; when it is dead, dropped once every live block is
  healthy without it (its copies rebuilt from the others), never sooner.

A crash in the middle leaves a valid superblock: a server still `leaving` is drained
again by the next `fusefs repair` or `fusefs servers remove` of it, or by the mount.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from . import errors, superblock
from .superblock import Superblock
from .transport import Member

log = logging.getLogger("fusefs.membership")

CHANGE_RETRIES = 20


class MembershipError(Exception):
    """A change that makes no sense (an unknown server, too few left for R copies)."""


def change(transport, current: Superblock,
           edit: Callable[[Superblock], Superblock]) -> Superblock:
    """Apply `edit` to the newest superblock by compare-and-swap, retrying while other
    writes (lease renewals, checkpoints) come between; returns the superblock written."""
    for _ in range(CHANGE_RETRIES):
        sb = superblock.read_quorum(transport, current.members)
        wanted = edit(sb)
        try:
            return superblock.update(transport, wanted, previous=sb.members)
        except errors.Conflict:
            current = sb
            continue
    raise errors.Conflict("the superblock kept changing; try again")


def find(sb: Superblock, name: str) -> Member:
    """A server of the filesystem by id or URL."""
    name = name.rstrip("/")
    for member in sb.servers:
        if name in (member.id, member.url):
            return member
    known = ", ".join(f"{m.url} ({m.id})" for m in sb.servers)
    raise MembershipError(f"{name} is not a server of this filesystem; its servers: {known}")


def adding(new: Member) -> Callable[[Superblock], Superblock]:
    def edit(sb: Superblock) -> Superblock:
        if any(m.id == new.id for m in sb.servers):
            raise MembershipError(f"{new.url} (server {new.id}) is already a server of this "
                                  "filesystem")
        taken = [m for m in sb.members if m.key == new.id]
        if taken:  # (it was replaced once, and the server that replaced it ranks as it)
            raise MembershipError(
                f"{new.url} (server {new.id}) was replaced by {taken[0].url}, which took its "
                "place; start it on an empty data directory (a new server id) to add it")
        return sb.with_changes(members=sb.members + (new,))
    return edit


def removing(old: Member) -> Callable[[Superblock], Superblock]:
    def edit(sb: Superblock) -> Superblock:
        members = tuple(m for m in sb.members if m.id != old.id)
        if len(members) == len(sb.members):
            raise MembershipError(f"{old.url} is not a member (already leaving?)")
        if len(members) < sb.replicas:
            raise MembershipError(
                f"removing {old.url} would leave {len(members)} servers for {sb.replicas} "
                "copies of every block; add a server first (or use `fusefs servers replace`)")
        return sb.with_changes(members=members, leaving=sb.leaving + (old,))
    return edit


def replacing(old: Member, new: Member) -> Callable[[Superblock], Superblock]:
    def edit(sb: Superblock) -> Superblock:
        if not any(m.id == old.id for m in sb.members):
            raise MembershipError(f"{old.url} is not a member of this filesystem")
        if any(m.id == new.id for m in sb.servers):
            raise MembershipError(f"{new.url} (server {new.id}) is already a server of this "
                                  "filesystem")
        # The new server takes the old one's place in the ranking (its slot): the blocks
        # homed on the old server are homed on it, and no other block moves.
        heir = replace(new, slot=old.key)
        members = tuple(heir if m.id == old.id else m for m in sb.members)
        return sb.with_changes(members=members, leaving=sb.leaving + (old,))
    return edit


def departed(old: Member) -> Callable[[Superblock], Superblock]:
    """The drained server leaves the superblock for good."""
    def edit(sb: Superblock) -> Superblock:
        return sb.with_changes(leaving=tuple(m for m in sb.leaving if m.id != old.id))
    return edit
