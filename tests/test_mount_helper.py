"""mount.fusefs, the helper mount(8) runs for fstab lines of type fusefs: how it reads
mount(8)'s options (the real mounts are in test_mount_smoke.py)."""

import pytest

from fusefs import mount_helper
from fusefs.mount_helper import HelperError, translate

URLS = "http://10.0.0.5:7001,http://10.0.0.6:7001"
FSNAME = "fsname=http://10.0.0.5:7001\\,http://10.0.0.6:7001"  # the source, commas escaped


def test_fusefs_options_fstab_only_options_and_fuse_options_each_go_their_way():
    command = translate(URLS, "/srv/data", [
        "defaults,noauto,nofail,_netdev,x-systemd.automount,comment=x,rw",
        "secret-file=/etc/fusefs/secret,cache_dir=/var/cache/fusefs,sync-on-close,ro",
        "allow_other,noatime,attr_timeout=5"])
    assert command == ["mount", "--servers", URLS, "--secret-file", "/etc/fusefs/secret",
                       "--cache-dir", "/var/cache/fusefs", "--sync-on-close", "--read-only",
                       "-o", f"{FSNAME},allow_other,noatime,attr_timeout=5,dev,suid",
                       "/srv/data"]


def test_mount_8_flags_libfuse_2_does_not_know_are_dropped_when_already_true():
    """libfuse 2 refuses these (`fuse: unknown option`); fusefs already behaves so."""
    assert translate(URLS, "/m", ["nodiratime,lazytime,silent,noatime"]) == \
        ["mount", "--servers", URLS, "-o", f"{FSNAME},noatime,dev,suid", "/m"]


def test_a_remount_changes_only_the_kernels_flags_through_mount_8():
    """`mount -o remount,ro` reaches the helper with fstab's options repeated: only the
    flags the kernel can change go on, to mount(8) itself (-i: no helper again)."""
    assert mount_helper.remount_command("/srv/data", [
        "remount,ro,secret-file=/etc/s,cache-dir=/c,allow_other,noexec,_netdev"]) == \
        ["mount", "-i", "-o", "remount,ro,noexec", "/srv/data"]


def test_no_options_is_a_plain_mount_with_mount_8s_defaults_dev_and_suid():
    """mount(8) drops its defaults before calling a helper; libfuse's would be nodev and
    nosuid, so the helper says dev,suid unless the line says otherwise."""
    assert translate(URLS, "/m", []) == ["mount", "--servers", URLS, "-o",
                                         f"{FSNAME},dev,suid", "/m"]
    assert translate(URLS, "/m", ["nodev,nosuid"])[-2] == f"{FSNAME},nodev,nosuid"
    assert translate(URLS, "/m", ["nosuid,fsname=data"])[-2] == "nosuid,fsname=data,dev"


def test_every_mount_option_of_the_command_line_can_be_written_in_fstab():
    """The helper reads `fusefs mount`'s own parser, so a new option needs no change
    here; those that cannot work from fstab are refused, not passed to FUSE."""
    known = mount_helper.fusefs_options()
    for name in ("secret-file", "tls-ca", "cache-dir", "cache-size", "memory-cache",
                 "cache-dir-reserve", "dirty-limit", "lease-seconds", "metrics",
                 "rehome-after", "repair-delay", "scrub-interval"):
        assert known[name] is True, name
    for flag in ("read-only", "sync-on-close"):
        assert known[flag] is False, flag
    assert not {"servers", "foreground", "unsafe-no-journal"} & set(known)


@pytest.mark.parametrize("options, said", [
    ("cache-dir", "needs a value"),
    ("cache-dir=", "needs a value"),
    ("sync-on-close=yes", "takes no value"),
    ("servers=http://a:1", "the servers are the source"),
    ("foreground", "cannot be used here"),
    ("relatime", "does not update access times"),
    ("strictatime", "does not update access times"),
    ("nosymfollow", "libfuse 2 cannot pass it"),
])
def test_an_option_it_cannot_use_is_refused_with_what_to_write(options, said):
    with pytest.raises(HelperError, match=said):
        translate(URLS, "/m", [options])


@pytest.mark.parametrize("source", ["", "-o"])
def test_a_source_that_is_not_the_servers_says_what_it_must_be(source):
    with pytest.raises(HelperError, match="block server URLs"):
        translate(source, "/m", [])


def test_wrong_invocations_exit_1_and_a_fake_mount_shows_the_command(capsys):
    assert mount_helper.main(["only-one-argument"]) == mount_helper.USAGE
    assert mount_helper.main([URLS, "/m", "-o", "cache-dir"]) == mount_helper.USAGE
    assert "needs a value" in capsys.readouterr().err
    assert mount_helper.main([URLS, "/m", "-N", "/proc/1/ns/mnt"]) == mount_helper.USAGE
    assert "-N is not supported" in capsys.readouterr().err
    assert mount_helper.main([URLS, "/m", "-f", "-s", "-n", "-t", "fusefs",
                              "-o", "ro,cache-dir=/c"]) == 0
    assert capsys.readouterr().err.strip() == (
        f"fusefs mount --servers {URLS} --read-only --cache-dir /c -o '{FSNAME},dev,suid' /m")


def test_mount_fuse_form_of_the_fusefs_command_reaches_the_helper(capsys):
    """For type fuse.fusefs, mount.fuse runs `fusefs SOURCE DIR -o OPTIONS`."""
    from fusefs.cli import main

    assert main([URLS, "/m", "-f", "-o", "dirty-limit=64MiB,dev,suid"]) == 0
    assert capsys.readouterr().err.strip() == (
        f"fusefs mount --servers {URLS} --dirty-limit 64MiB -o '{FSNAME},dev,suid' /m")


def test_fuse_options_keep_an_escaped_comma_inside_a_value():
    from fusefs.cli import _parse_options

    assert _parse_options(f"{FSNAME},allow_other,attr_timeout=5") == {
        "fsname": FSNAME.partition("=")[2], "allow_other": True, "attr_timeout": "5"}
