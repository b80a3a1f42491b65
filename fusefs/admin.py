"""The operator's commands: `fusefs repair`, `fusefs servers ...` and `fusefs status
--servers`. Each opens the cluster from any reachable member (`open_cluster`), works
through the same ReplicatedStore and Repairer the mounted writer uses, shows progress on
stderr and prints a report (`--json` for scripts).

Exit statuses: 0 done and healthy; 1 done, but something is still wrong (a block below R
copies, a server down); 2 could not do it (servers unreachable, bad arguments).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from blockserver.protocol import format_size

from . import errors, membership, superblock
from .antientropy import Repairer, list_holdings, survey, wanted_blocks
from .cluster import ClusterConfig, ReplicatedStore
from .loading import open_metadata
from .progress import Progress
from .transport import Member, at_given_urls

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_FAILED = 0, 1, 2
# Seconds between a membership change and deleting hand-offs by it, at least: another
# command judging by the old membership (a `fusefs repair`) checks it before every batch
# of deletes, so this covers one batch.
SETTLE_MIN = 5.0


class AdminError(Exception):
    """A failure to report in one line (exit status 2)."""


@dataclass
class Cluster:
    transport: object
    sb: superblock.Superblock
    store: ReplicatedStore

    def close(self) -> None:
        self.store.close()


def open_cluster(transport, urls: list[str]) -> Cluster:
    """The filesystem on the servers at `urls` (one reachable member is enough): its
    superblock read by quorum, and a started store over all its servers."""
    try:
        sb = superblock.locate(transport, urls)
    except errors.StorageError as e:
        raise AdminError(f"cannot read the superblock: {e}") from None
    store = ReplicatedStore(sb.members, transport, ClusterConfig(
        replicas=sb.replicas, write_quorum=sb.write_quorum, probe_max=5.0))
    store.set_membership(sb.members, sb.leaving)
    try:
        store.start()
    except errors.StorageError as e:
        store.close()
        raise AdminError(str(e)) from None
    return Cluster(transport, sb, store)


def _wanted(cluster: Cluster, work: str, progress: Progress):
    """Every live block the cluster's metadata names (what a new mount would load), and
    the loaded metadata's figures."""
    sb = superblock.read_quorum(cluster.transport, cluster.sb.members)
    cp = sb.checkpoint
    progress.say(f"loading the metadata (checkpoint of record {cp['seq']})")
    try:
        md, _, end = open_metadata(cluster.store, sb, os.path.join(work, "metadata.db"))
    except errors.JournalGap:  # a checkpoint moved the journal on meanwhile: once more
        sb = superblock.read_quorum(cluster.transport, cluster.sb.members)
        md, _, end = open_metadata(cluster.store, sb, os.path.join(work, "metadata.db"))
    try:
        cp = sb.checkpoint
        wanted = wanted_blocks(md, cluster.store, cp, sb.fs_id, chain=cp["chain"],
                               segments=range(cp["segment"], end + 1))
        figures = md.figures()
    finally:
        md.close()
    return wanted, figures


# -- repair -----------------------------------------------------------------------------------

def repair(cluster: Cluster, rate: float | None, check_only: bool, progress: Progress,
           passes: int = 3) -> dict:
    """Repair passes until every live block has R healthy copies on its homes (or
    `passes` ran); then a fresh survey says how it ended."""
    with tempfile.TemporaryDirectory(prefix="fusefs-repair-") as work:
        wanted, _ = _wanted(cluster, work, progress)
    progress.say(f"{len(wanted)} live blocks")
    repairer = Repairer(cluster.store, lambda: wanted, rate=rate,
                        membership=lambda: _view(cluster), progress=progress.say,
                        copying=lambda done, total, nbytes: progress.update(
                            done, total, nbytes, final=done == total))
    reports = []
    if not check_only:
        for _ in range(passes):
            report = repairer.run_pass()
            reports.append(report.as_dict())
            if not report.found:
                break
    final = repairer.check()
    return {"survey": final.summary(), "healthy": final.healthy and not final.lost,
            "lost": final.lost[:100], "passes": reports,
            "copied": sum(r["copied"] for r in reports),
            "moved": sum(r["moved"] for r in reports)}


def format_repair(result: dict, check_only: bool) -> str:
    s = result["survey"]
    lines = [f"{s['blocks']} live blocks: {s['under_replicated']} with fewer than R healthy "
             f"copies on their homes, {s['handoffs']} copies outside their homes, "
             f"{s['lost']} with no copy anywhere"]
    if not check_only:
        lines.append(f"copied {result['copied']} copies, moved {result['moved']} hand-offs "
                     f"home in {len(result['passes'])} passes")
    for server, why in s["unlisted"].items():
        lines.append(f"server {server} could not be listed: {why}")
    for block_id in result["lost"]:
        lines.append(f"LOST: block {block_id} has no copy on any server")
    lines.append("healthy: every live block has R copies on its homes" if result["healthy"]
                 else "NOT healthy" + ("" if check_only else
                                       ": run again once the servers listed above answer"))
    return "\n".join(lines)


# -- membership -------------------------------------------------------------------------------

def server_table(cluster: Cluster) -> list[dict]:
    """Every server: member or leaving, up or down, latency, space, copies listed."""
    holdings = list_holdings(cluster.transport, cluster.store.servers)
    leaving = {m.id for m in cluster.sb.leaving}
    rows = []
    for member in cluster.store.servers:
        row = {"id": member.id, "url": member.url,
               "role": "leaving" if member.id in leaving else "member",
               "up": member.id not in holdings.unlisted,
               "copies": holdings.per_server.get(member.id)}
        started = time.monotonic()
        try:
            status = cluster.transport.status(member, timeout=3.0)
            row.update(latency_ms=round(1000 * (time.monotonic() - started), 1),
                       capacity_bytes=status.get("capacity_bytes"),
                       free_bytes=status.get("free_bytes"))
        except errors.StorageError as e:
            row.update(up=False, error=str(e))
        rows.append(row)
    return rows


def format_servers(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        state = "up" if r["up"] else f"DOWN ({r.get('error', 'not listed')})"
        space = ""
        if r.get("capacity_bytes"):
            used = r["capacity_bytes"] - r["free_bytes"]
            space = f", {format_size(used)} used of {format_size(r['capacity_bytes'])}"
        copies = f", {r['copies']} copies" if r["copies"] is not None else ""
        latency = f", {r['latency_ms']} ms" if r.get("latency_ms") is not None else ""
        lines.append(f"{r['url']} ({r['id']}): {r['role']}, {state}{latency}{space}{copies}")
    return "\n".join(lines)


def identify(transport, url: str) -> Member:
    """The server at `url`, by the id it answers with."""
    try:
        status = transport.status(Member("", url.rstrip("/")), timeout=5.0)
    except errors.StorageError as e:
        raise AdminError(f"cannot reach {url}: {e}; is the block server running, with "
                         "this cluster's --secret-file?") from None
    return Member(status["server_id"], url.rstrip("/"))


def answers(transport, member: Member, tries: int = 3) -> bool:
    """Whether the server answers its status, asked up to `tries` times a second apart
    (one slow answer does not make a server dead)."""
    for attempt in range(tries):
        try:
            transport.status(member, timeout=3.0)
            return True
        except errors.StorageError:
            if attempt + 1 < tries:
                time.sleep(1.0)
    return False


def change_membership(cluster: Cluster, edit, progress: Progress) -> superblock.Superblock:
    try:
        sb = membership.change(cluster.transport, cluster.sb, edit)
    except membership.MembershipError as e:
        raise AdminError(str(e)) from None
    except errors.StorageError as e:
        raise AdminError(f"could not change the superblock: {e}") from None
    cluster.sb = sb
    cluster.store.set_membership(sb.members, sb.leaving)
    progress.say("membership now: " + ", ".join(m.url for m in sb.members) +
                 ("; draining " + ", ".join(m.url for m in sb.leaving) if sb.leaving else ""))
    return sb


def settle_time(sb: superblock.Superblock) -> float:
    """How long a running writer may still act on the old membership: it picks a change
    up at its next lease renewal (every third of its lease time), and a request it sent
    before ends by its timeout; no lease held, no writer to wait for."""
    return max(SETTLE_MIN, float(sb.lease["seconds"]) if sb.lease else 0.0)


def rebalance(cluster: Cluster, rate: float | None, progress: Progress,
              drained: Member | None = None, max_passes: int = 200) -> dict:
    """After a membership change: repair passes until the live blocks are healthy and a
    drained server holds nothing; then the drained server leaves the superblock. Hand-off
    copies are deleted only once a running writer must have seen the change (before, it
    could still judge homes by the old membership)."""
    changed, wait = time.monotonic(), settle_time(cluster.sb)
    with tempfile.TemporaryDirectory(prefix="fusefs-servers-") as work:
        wanted, _ = _wanted(cluster, work, progress)
    repairer = Repairer(cluster.store, lambda: wanted, rate=rate,
                        membership=lambda: _view(cluster),
                        progress=progress.say,
                        copying=lambda done, total, nbytes: progress.update(
                            done, total, nbytes, final=done == total))
    copied = moved = stuck = 0
    done = False
    for _ in range(max_passes):
        settled = time.monotonic() - changed >= wait
        report = repairer.run_pass(move=settled)
        copied, moved = copied + report.copied, moved + report.moved
        left = _left_on(cluster, drained) if drained else 0
        summary, pending = report.survey, report.found
        if not settled:
            found = repairer.check()  # after the copies: is anything left to move?
            if found.damage or left:
                remaining = wait - (time.monotonic() - changed)
                progress.say(f"copies made; {remaining:.0f} s before moving hand-offs (a "
                             "running writer picks the change up meanwhile)")
                time.sleep(min(5.0, max(0.0, remaining)))
                continue
            summary, pending = found.summary(), 0  # nothing to move: no need to wait
        progressed = report.fixed or report.present or report.dropped
        stuck = stuck + 1 if pending and not progressed else 0
        if stuck >= 3:  # (a target that refuses every copy: full, or read-only)
            progress.say("copies keep failing: " + "; ".join(report.errors[-3:]))
            break
        if pending or left:
            time.sleep(1.0 if stuck or not pending else 0)
            continue
        done = _complete(summary, drained)
        if not done:
            progress.say("not every live block has its copies on its homes: "
                         + _why_not(summary))
        break
    result = {"copied": copied, "moved": moved, "finished": done}
    if drained and done:
        change_membership(cluster, membership.departed(drained), progress)
        result["drained"] = drained.url
    return result


def _view(cluster: Cluster):
    sb = superblock.read_quorum(cluster.transport, cluster.store.members)
    given = {m.id: m.url for m in cluster.store.servers}
    return list(at_given_urls(sb.members, given)), list(at_given_urls(sb.leaving, given))


def _left_on(cluster: Cluster, member: Member) -> int | None:
    """Whether a drained server still lists anything (1 or 0); None: it does not answer
    (dead: it is done once every live block is healthy without it)."""
    try:
        page, _ = cluster.transport.list_blocks(member, "", 1)
    except errors.StorageError:
        return None
    return len(page)


def _complete(summary: dict, drained: Member | None) -> bool:
    """Every live block on its homes, every member listed (a dead drained server may
    not be: nothing it holds is needed any more)."""
    unlisted = set(summary["unlisted"]) - ({drained.id} if drained else set())
    return not (summary["under_replicated"] or summary["lost"] or unlisted)


def _why_not(summary: dict) -> str:
    reasons = [f"server {s} could not be listed ({why})" for s, why in
               summary["unlisted"].items()]
    if summary["under_replicated"]:
        reasons.append(f"{summary['under_replicated']} blocks under-replicated")
    if summary["lost"]:
        reasons.append(f"{summary['lost']} blocks with no copy anywhere")
    return "; ".join(reasons) + "; run the command again once the servers answer"


# -- status of the cluster ------------------------------------------------------------------

def cluster_status(cluster: Cluster, progress: Progress) -> dict:
    """Servers, and the health of every live block, as the cluster has them now."""
    with tempfile.TemporaryDirectory(prefix="fusefs-status-") as work:
        wanted, figures = _wanted(cluster, work, progress)
    holdings = list_holdings(cluster.transport, cluster.store.servers)
    found = survey(wanted, holdings, cluster.store.members, cluster.store.leaving,
                   cluster.sb.replicas)
    rows = server_table(cluster)
    for row in rows:
        row["should_hold"] = found.should_hold.get(row["id"])
        row["holds"] = found.holds.get(row["id"])
    errs = [f"server {r['url']} is down: {r.get('error', 'not listed')}"
            for r in rows if not r["up"]]
    errs += [f"block {b} has no copy on any server" for b in found.lost[:20]]
    healthy = not errs and not found.under_replicated and not found.handoffs
    return {"fs_id": cluster.sb.fs_id, "servers": rows, "blocks": found.blocks,
            "under_replicated": found.under_replicated, "handoffs": found.handoffs,
            "lost": len(found.lost), "dirty_bytes": None, "errors": errs,
            "healthy": healthy, **figures}


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=1)
    sys.stdout.write("\n")


@contextlib.contextmanager
def cluster_for(transport, urls):
    cluster = open_cluster(transport, urls)
    try:
        yield cluster
    finally:
        cluster.close()


# -- the commands (cli.py parses; these run) ----------------------------------------------------

def _run(command: str, args, transport, urls, work, show, quiet: bool = False):
    """Open the cluster, `work(cluster, progress)`, print the result (`show(result)`, or
    JSON with --json); the result, or None once a failure was reported."""
    progress = Progress(command, quiet=quiet or args.json, unit="copies")
    try:
        with cluster_for(transport, urls) as cluster:
            result = work(cluster, progress)
    except (AdminError, errors.StorageError) as e:
        progress.end()
        print(f"fusefs {command}: {e}", file=sys.stderr)
        return None
    progress.end()
    if args.json:
        print_json(result)
    else:
        print(show(result))
    return result


def run_repair(args, transport, urls) -> int:
    result = _run("repair", args, transport, urls,
                  lambda cluster, progress: repair(cluster, args.rate, args.check, progress),
                  lambda result: format_repair(result, args.check))
    if result is None:
        return EXIT_FAILED
    return EXIT_HEALTHY if result["healthy"] else EXIT_UNHEALTHY


def run_servers(args, transport, urls) -> int:
    result = _run(f"servers {args.action}", args, transport, urls,
                  lambda cluster, progress: _servers_action(args, cluster, progress),
                  lambda result: "\n".join([format_servers(result["servers"])] +
                                           ([result["change"]] if "change" in result else [])))
    if result is None:
        return EXIT_FAILED
    if args.action == "list":
        return EXIT_HEALTHY if all(r["up"] for r in result["servers"]) else EXIT_UNHEALTHY
    return EXIT_HEALTHY if result.get("finished", True) else EXIT_UNHEALTHY


def _servers_action(args, cluster: Cluster, progress: Progress) -> dict:
    result: dict = {}
    if args.action == "add":
        new = identify(cluster.transport, args.url)
        change_membership(cluster, membership.adding(new), progress)
        moved = rebalance(cluster, args.rate, progress) if not args.no_wait else {}
        result.update(moved, change=f"added {new.url} ({new.id})" + _moved_text(moved))
    elif args.action == "remove":
        old = _find(cluster, args.server)
        if old not in cluster.sb.leaving and not answers(cluster.transport, old):
            raise AdminError(f"{old.url} does not answer, so it cannot be drained; replace "
                             f"it with an empty server (`fusefs servers replace {old.url} "
                             "NEW-URL`) and its copies are rebuilt from the others")
        if old not in cluster.sb.leaving:
            change_membership(cluster, membership.removing(old), progress)
        moved = rebalance(cluster, args.rate, progress, drained=old)
        result.update(moved, change=f"drained and removed {old.url}" if moved["finished"]
                      else f"{old.url} is still being drained: run the command again")
    elif args.action == "replace":
        old, new = _find(cluster, args.old), identify(cluster.transport, args.new)
        alive = answers(cluster.transport, old, tries=1)  # (only what the report says)
        # The old server leaves through `leaving` even when it seems dead: read from if it
        # answers after all, and dropped once every live block is healthy without it.
        change_membership(cluster, membership.replacing(old, new), progress)
        moved = rebalance(cluster, args.rate, progress, drained=old)
        result.update(moved, change=f"replaced {old.url} by {new.url}" + (
            ", the old server drained" if alive else " (the old server is down: its "
            "copies were rebuilt from the others)") + _moved_text(moved))
    result["servers"] = server_table(cluster)
    return result


def _find(cluster: Cluster, name: str) -> Member:
    try:
        return membership.find(cluster.sb, name)
    except membership.MembershipError as e:
        raise AdminError(str(e)) from None


def _moved_text(moved: dict) -> str:
    if not moved:
        return ""
    return f"; {moved['copied']} copies made, {moved['moved']} hand-offs moved home"


def run_cluster_status(args, transport, urls) -> int:
    result = _run("status", args, transport, urls, cluster_status, format_cluster_status,
                  quiet=True)
    if result is None:
        return EXIT_FAILED
    return EXIT_HEALTHY if result["healthy"] else EXIT_UNHEALTHY


def format_cluster_status(s: dict) -> str:
    lines = [f"filesystem {s['fs_id']}: {s.get('files', 0)} files, "
             f"{format_size(s.get('bytes', 0))}, {s['blocks']} live blocks"]
    for r in s["servers"]:
        state = "up" if r["up"] else "DOWN"
        extra = f", should hold {r['should_hold']}, holds {r['holds']}" \
            if r.get("should_hold") is not None else ""
        lines.append(f"  server {r['url']}: {r['role']}, {state}{extra}")
    lines.append(f"  under-replicated blocks: {s['under_replicated']}, copies outside their "
                 f"homes: {s['handoffs']}, lost: {s['lost']}")
    lines += [f"  error: {e}" for e in s["errors"]]
    lines.append("  healthy" if s["healthy"] else "  NOT healthy: `fusefs repair` fixes what "
                 "can be fixed; a server that is down needs to come back or be replaced")
    return "\n".join(lines)
