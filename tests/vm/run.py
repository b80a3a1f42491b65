"""The VM suite's runner: image, share, boot, setup, scenarios, table, teardown.

Order: install host tools if missing -> build or reuse the guest image -> ``pip install
--target`` of this checkout into a temporary share (read-only to every VM) -> boot the VMs in
parallel -> start the block servers, mkfs, mount on client1 -> each scenario in turn -> print
``N passed, M failed`` and a table with durations -> tear down. Teardown (kill every QEMU by its
PID, remove the work directory and the share) runs from ``finally``; SIGTERM and SIGHUP are
turned into the same exception as Ctrl-C, so an interrupted run leaves nothing behind.

Exit status: 0 every scenario passed, 1 some scenario failed, 2 the suite could not run (image,
boot or setup failed).
"""
import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.vm import image
from tests.vm.cluster import Cluster
from tests.vm.e2e import Suite
from tests.vm.layout import machine

ROOT = Path(__file__).resolve().parent.parent.parent
SMOKE = {"servers": ["bs1", "bs2", "bs3"], "clients": ["client1"],
         "scenarios": [("1 real tools on the mount", "scenario_tools"),
                       ("3 server power loss during writes", "scenario_server_power_loss")]}
FULL = {"servers": ["bs1", "bs2", "bs3", "bs4"], "clients": ["client1", "client2"],
        "scenarios": SMOKE["scenarios"] + [
            ("6 second mount refused; ro follows", "scenario_second_mount"),
            ("5 partition and reconnect", "scenario_partition"),
            ("2 server power loss; back to R copies", "scenario_server_power_loss_repair"),
            ("4 client power loss; client2 takes over", "scenario_client_power_loss"),
            ("7 rolling restart under load", "scenario_rolling_restart")]}


def only(plan, numbers):
    """The plan with only the scenarios numbered in `numbers` ("4,7"), in the plan's order."""
    wanted = {n.strip() for n in numbers.split(",") if n.strip()}
    known = {title.split()[0] for title, _ in plan["scenarios"]}
    if not wanted or wanted - known:
        raise SystemExit(f"vm-e2e: --only takes scenario numbers among {','.join(sorted(known))}")
    return dict(plan, scenarios=[s for s in plan["scenarios"] if s[0].split()[0] in wanted])


def log(message):
    print(f"vm-e2e: {message}", file=sys.stderr, flush=True)


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def make_share():
    share = Path(tempfile.mkdtemp(prefix="fusefs-vm-share-"))
    venv = ROOT / ".venv/bin/python"
    python = str(venv) if venv.exists() else sys.executable
    subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--target", str(share / "site"), str(ROOT)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.copy(ROOT / "tests/vm/secret", share / "secret")
    shutil.copy(ROOT / "tests/vm/probe.py", share / "probe.py")
    share.chmod(0o755)
    return share


class Timer:
    def __init__(self):
        self.rows = []

    def step(self, name, work):
        started = time.monotonic()
        log(f"{name} ...")
        try:
            return work()
        finally:
            self.rows.append((name, time.monotonic() - started))


def run_scenarios(suite, plan):
    results = []
    for title, method in plan["scenarios"]:
        log(f"scenario {title} ...")
        started = time.monotonic()
        try:
            detail, ok = getattr(suite, method)(), True
        except Exception as e:  # a failed scenario is reported, and the next one still runs
            detail, ok = f"{type(e).__name__}: {e}", False
        results.append({"scenario": title, "passed": ok,
                        "seconds": round(time.monotonic() - started, 1), "detail": detail})
        log(f"  {'PASS' if ok else 'FAIL'} {title}: {detail}")
    return results


def print_report(results, steps, as_json):
    passed = sum(r["passed"] for r in results)
    if as_json:
        print(json.dumps({"passed": passed, "failed": len(results) - passed, "scenarios": results,
                          "steps": [{"step": n, "seconds": round(s, 1)} for n, s in steps]}))
        return
    print(f"{'scenario':40} {'result':6} {'seconds':>8}")
    for r in results:
        print(f"{r['scenario']:40} {'pass' if r['passed'] else 'FAIL':6} {r['seconds']:8.0f}")
    for name, seconds in steps:
        print(f"{'(' + name + ')':40} {'':6} {seconds:8.0f}")
    print(f"{passed} passed, {len(results) - passed} failed")


def run(plan, as_json):
    timer = Timer()
    image.ensure_host_tools()
    directory = timer.step("image", image.ensure_image)
    share = timer.step("share (pip install --target)", make_share)
    cluster = Cluster(directory, share, log)
    try:
        machines = [machine(n) for n in plan["servers"] + plan["clients"]]
        cluster.create_disks(machines)
        for m in machines:
            cluster.start(m)
        timer.step(f"boot {len(machines)} VMs", lambda: cluster.wait_up(machines))
        suite = Suite(cluster, [machine(n) for n in plan["servers"]],
                      [machine(n) for n in plan["clients"]], log)
        timer.step("setup (servers, mkfs, mount)", suite.setup)
        results = run_scenarios(suite, plan)
    finally:
        log("teardown: killing every QEMU, removing the work directory")
        cluster.close()
        shutil.rmtree(share, ignore_errors=True)
    print_report(results, timer.rows, as_json)
    return 0 if all(r["passed"] for r in results) else 1


def run_vagrant(plan, as_json):
    """The scenarios on the machines of `vagrant up` (tests/vm/vagrant.py): nothing is booted or
    destroyed; their fusefs data is wiped first; power-cut machines are booted again."""
    from tests.vm.vagrant import VagrantCluster
    timer = Timer()
    cluster = timer.step("attach to the Vagrant machines, reset them", lambda: (
        VagrantCluster.attach(ROOT, plan["servers"], plan["clients"], log)))
    try:
        suite = Suite(cluster, cluster.machines(plan["servers"]), cluster.machines(plan["clients"]),
                      log)
        timer.step("setup (servers, mkfs, mount)", suite.setup)
        results = run_scenarios(suite, plan)
    finally:
        log("teardown: booting any machine left powered off; the VMs stay up")
        cluster.close()
    print_report(results, timer.rows, as_json)
    return 0 if all(r["passed"] for r in results) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="scripts/vm-e2e",
        description="Boot block-server and client VMs with QEMU (TCG unless real KVM is there), "
                    "run the end-to-end scenarios against them (real power loss: the VM's QEMU "
                    "is killed), print 'N passed, M failed' and a table, tear everything down. "
                    "Needs root (installs qemu-system-x86, qemu-utils, mmdebstrap when missing; "
                    "caches the guest image in /var/cache/fusefs-vm). See docs/vm-e2e.md.",
        epilog="A full run took about 17 minutes on a 2-core machine without KVM. "
               "exit status: 0 all passed, 1 a scenario failed, 2 the suite could not run. "
               "FUSEFS_VM_KEEP=1 keeps the VMs' work directory (consoles, overlays) for a look.")
    parser.add_argument("--smoke", action="store_true",
                        help="scenarios 1 and 3 on bs1..bs3 + client1 (4-5 minutes here)")
    parser.add_argument("--only", metavar="N[,N...]",
                        help="run only these scenarios, e.g. --only 4,7 (on the full set of VMs "
                             "unless --smoke)")
    parser.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    parser.add_argument("--vagrant", action="store_true",
                        help="run against the machines of `vagrant up` (vagrant/.state/"
                             "inventory.json) instead of booting QEMU: --smoke needs bs1..bs3 + "
                             "client1, the full set bs1..bs4 + client1, client2. DESTRUCTIVE for "
                             "fusefs data: every block server's data (/srv/fusefs/blocks) is "
                             "deleted and the clients' /mnt/fs unmounted and caches removed "
                             "before the run. Never creates, halts or destroys a VM; power-cut "
                             "ones are booted again. See docs/vagrant.md")
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    try:
        plan = SMOKE if args.smoke else FULL
        plan = only(plan, args.only) if args.only else plan
        return (run_vagrant if args.vagrant else run)(plan, args.json)
    except KeyboardInterrupt:
        log("interrupted; everything started was stopped")
        return 130
    except Exception as e:
        log(f"could not run: {type(e).__name__}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
