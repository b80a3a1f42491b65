"""tests/vm/vagrant.py without VMs: refusals that say what to run, the provider's power-off
commands (never `vagrant halt`), and commands carried to the guest intact and out of sight of
`pkill -f` (run here through a local shell in place of ssh + sudo)."""
import json
import subprocess

import pytest

from tests.vm.vagrant import Unavailable, VagrantCluster, read_inventory


def inventory(provider="libvirt", servers=3, clients=1):
    machines = [{"name": f"bs{i}", "role": "server", "address": f"192.168.56.{10 + i}"}
                for i in range(1, servers + 1)]
    machines += [{"name": f"client{i}", "role": "client", "address": f"192.168.56.{100 + i}"}
                 for i in range(1, clients + 1)]
    return {"provider": provider, "machines": machines}


def cluster(tmp_path, **kw):
    state = tmp_path / "vagrant/.state"
    state.mkdir(parents=True)
    (state / "inventory.json").write_text(json.dumps(inventory(**kw)))
    made = VagrantCluster(tmp_path, read_inventory(tmp_path), lambda message: None)
    return made


def test_missing_inventory_says_to_run_vagrant_up(tmp_path):
    with pytest.raises(Unavailable, match="vagrant up"):
        read_inventory(tmp_path)


def test_too_few_machines_names_the_settings_to_use(tmp_path):
    c = cluster(tmp_path, servers=2, clients=1)
    try:
        with pytest.raises(Unavailable, match="FUSEFS_VM_SERVERS=3 FUSEFS_VM_CLIENTS=1"):
            c.check(["bs1", "bs2", "bs3", "client1"])
    finally:
        c.ssh_config.unlink()


def test_machines_never_created_are_reported_not_running(tmp_path):
    c = cluster(tmp_path)
    try:
        with pytest.raises(Unavailable, match=r"not running: bs1, bs2, bs3, client1; run "
                                              r"`vagrant up bs1 bs2 bs3 client1`"):
            c.check(["bs1", "bs2", "bs3", "client1"])
    finally:
        c.ssh_config.unlink()


@pytest.mark.parametrize("provider,cut,start", [
    ("libvirt", ["destroy", "ID-1"], ["start", "ID-1"]),
    ("virtualbox", ["VBoxManage", "controlvm", "ID-1", "poweroff"],
     ["VBoxManage", "startvm", "ID-1", "--type", "headless"]),
])
def test_power_cut_is_the_providers_hard_power_off(tmp_path, provider, cut, start):
    c = cluster(tmp_path, provider=provider)
    try:
        machine_dir = tmp_path / ".vagrant/machines/bs2" / provider
        machine_dir.mkdir(parents=True)
        (machine_dir / "id").write_text("ID-1\n")
        assert c.provider_command("cut", "bs2")[-len(cut):] == cut
        assert c.provider_command("start", "bs2")[-len(start):] == start
        assert "halt" not in c.provider_command("cut", "bs2")
    finally:
        c.ssh_config.unlink()


def test_unknown_provider_is_refused(tmp_path):
    with pytest.raises(Unavailable, match="libvirt or virtualbox"):
        cluster(tmp_path, provider="docker")


def test_a_command_reaches_the_guest_shell_intact_and_unseen(tmp_path):
    c = cluster(tmp_path)
    try:
        command = ("set -e; echo \"it's $((6 * 7))\" 'marker-5e1d'; "
                   "tr '\\0' ' ' < /proc/$$/cmdline; echo; printf '%s\\n' \"$(cat)\"")
        remote = c.ssh_argv(c.all["client1"], command)[-1]
        assert remote.startswith("sudo -n sh -c ")
        local = remote[len("sudo -n "):]   # what sudo runs, without sudo
        out = subprocess.run(["sh", "-c", local], input="from stdin", capture_output=True,
                             text=True, timeout=30, check=True).stdout.splitlines()
        assert out[0] == "it's 42 marker-5e1d"
        assert "marker-5e1d" not in out[1] and "eval" in out[1]   # the shell's own argv
        assert out[2] == "from stdin"
        assert "marker" not in " ".join(c.ssh_argv(c.all["client1"], command))
    finally:
        c.ssh_config.unlink()
