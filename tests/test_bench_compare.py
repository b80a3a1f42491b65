"""benchmarks/compare.py without running it: its command line, the ratio maths on fake
samples, the table and the JSON report. (The peers themselves are never started here: a
run needs root, apt packages and minutes; see benchmarks/README.md.)"""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import compare  # noqa: E402
from fs_bench import Results, Sample  # noqa: E402

from fusefs.daemon import MountConfig  # noqa: E402

MiB = 1 << 20


def results_of(samples: dict) -> Results:
    """{(row, target): [values by round]} -> Results."""
    r = Results()
    for (row, target), values in samples.items():
        for v in values:
            r.add(row, target, Sample(v, 1.0))
    return r


def labels() -> dict:
    return compare.row_labels(compare.parse_args([]), entries=4284, tar_bytes=81_500_000)


def test_defaults_follow_the_fusefs_dirty_limit():
    args = compare.parse_args([])
    assert compare.DIRTY_LIMIT == MountConfig.dirty_limit
    assert args.large == 4 * MountConfig.dirty_limit
    assert args.small == MountConfig.dirty_limit // 2
    assert args.targets == list(compare.TARGETS)
    assert "floor" in args.targets  # it adds about 70 s to the full run
    assert args.groups == list(compare.GROUPS)
    assert (args.rounds, args.files, args.small_files) == (2, 10_000, 5000)
    assert args.small_rounds == args.rounds  # what fs_bench's metadata round reads


def test_quick_shrinks_counts_but_keeps_the_large_file_over_the_dirty_limit():
    args = compare.parse_args(["--quick", "--rounds", "5"])
    assert args.rounds == 1
    assert (args.files, args.small_files, args.ops) == (1000, 500, 500)
    assert args.large > MountConfig.dirty_limit


def test_targets_and_groups_accept_aliases_and_keep_matrix_order():
    args = compare.parse_args(["--targets", "gluster,fusefs,pt", "--only", "tree,meta"])
    assert args.targets == ["passthrough", "fusefs", "glusterfs"]
    assert args.groups == ["meta", "tree"]
    assert compare.parse_args(["--targets", "mfs"]).targets == ["moosefs"]
    assert compare.parse_args(["--targets", "fusefs,floor"]).targets == ["floor", "fusefs"]


@pytest.mark.parametrize("argv", [["--targets", "ceph"], ["--only", "seq,nothing"],
                                  ["--large", "3000KiB"], ["--rounds", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse_args(argv)
    assert e.value.code == 2
    assert "compare.py" in capsys.readouterr().err


def test_ratios_are_medians_of_per_round_pairs():
    r = results_of({("seq_write", "fusefs"): [100, 300, 90],
                    ("seq_write", "moosefs"): [200, 100, 90],
                    ("seq_write", "glusterfs"): [50, 50, 50]})
    # per round 0.5, 3.0, 1.0 -> median 1.0 (the ratio of the medians would be 100/100 too,
    # so check a case where they differ below)
    assert r.ratio("seq_write", "fusefs", "moosefs") == pytest.approx(1.0)
    assert r.ratio("seq_write", "fusefs", "glusterfs") == pytest.approx(2.0)
    r = results_of({("meta_list", "fusefs"): [10, 40], ("meta_list", "moosefs"): [40, 10]})
    assert r.ratio("meta_list", "fusefs", "moosefs") == pytest.approx((0.25 + 4) / 2)


def test_table_has_one_column_per_target_and_fusefs_over_each_peer():
    r = results_of({("seq_write", t): [v] for t, v in
                    (("passthrough", 800), ("fusefs", 250), ("moosefs", 125),
                     ("glusterfs", 500))})
    text = compare.render(r, ["passthrough", "fusefs", "moosefs", "glusterfs"], labels())
    header, rule, row = text.splitlines()
    assert header.split() == ["workload", "unit", "passthru", "fusefs", "MooseFS",
                              "GlusterFS", "fs/pass", "fs/Moos", "fs/Glus"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert row.startswith("seq write 1 GiB + fsync")
    assert row.split()[-7:] == ["800", "250", "125", "500", "0.31", "2.00", "0.50"]


def test_floor_gets_a_column_and_a_fusefs_over_floor_ratio():
    r = results_of({("meta_list", t): [v] for t, v in
                    (("floor", 1000), ("fusefs", 500), ("moosefs", 2000))})
    header, _, row = compare.render(r, ["floor", "fusefs", "moosefs"], labels()).splitlines()
    assert header.split()[2:] == ["floor", "fusefs", "MooseFS", "fs/floor", "fs/Moos"]
    assert row.split()[-5:] == ["1,000", "500", "2,000", "0.50", "0.25"]
    args = compare.parse_args(["--targets", "floor,pt"])
    args.work = "/nowhere/work"  # (what prepare_run makes; nothing is created here)
    floor_target, _ = compare.make_targets(args)
    assert type(floor_target).__name__ == "Floor"
    argv = floor_target._argv()
    assert argv[1].endswith("benchmarks/floor.py")
    assert argv[2:] == ["/nowhere/work/floor.pickle", "/nowhere/work/floor-mnt"]


class FakeFi:
    def __init__(self):
        self.fh, self.keep_cache, self.flags = 0, 0, 0


def test_floor_filesystem_in_memory_and_saved_at_unmount(tmp_path, monkeypatch):
    """floor.py's operations called directly (no mount): the namespace, data, errors,
    and the tree found again by the next mount after destroy() saved it."""
    import errno as e
    import stat

    import floor
    from fuse import FuseOSError

    monkeypatch.setattr(floor, "fuse_get_context", lambda: (1000, 1000, 1))
    state = str(tmp_path / "tree.pickle")
    fs, fi = floor.Floor(state), FakeFi()
    fs.mkdir("/d", 0o755)
    fs.create("/d/f", 0o644, fi)
    assert fs.write("/d/f", b"hello", 3, fi) == 5
    assert fs.read("/d/f", 100, 0, fi) == b"\0\0\0hello"
    fs.release("/d/f", fi)
    fs.symlink("/d/l", "f")
    fs.rename("/d", "/e")
    assert [n for n, _ in fs.entries("/e")] == [b".", b"..", b"f", b"l"]
    assert [stat.S_IFMT(st.st_mode) for _, st in fs.entries("/e")[2:]] == [
        stat.S_IFREG, stat.S_IFLNK]
    assert fs.readlink("/e/l") == "f"
    ino, mode, nlink, uid, gid, _, size = fs.attributes("/e/f")[:7]
    assert (stat.S_IMODE(mode), nlink, uid, gid, size) == (0o644, 1, 1000, 1000, 8)
    assert fs.attributes("/e")[2] == 2 and fs.attributes("/")[2] == 3  # nlink of dirs
    for call, code in ((lambda: fs.rmdir("/e"), e.ENOTEMPTY), (lambda: fs.mkdir("/e", 0o755),
                       e.EEXIST), (lambda: fs.attributes("/d/f"), e.ENOENT),
                       (lambda: fs.rename("/", "/e/x"), e.EINVAL)):
        with pytest.raises(FuseOSError) as raised:
            call()
        assert raised.value.errno == code
    fs.truncate("/e/f", 4)
    fs.destroy("/")
    assert fs.saved
    again = floor.Floor(state)
    assert again.attributes("/e/f")[:7] == (ino, mode, 1, 1000, 1000, 0, 4)
    again.open("/e/f", fi)
    assert again.read("/e/f", 10, 0, fi) == b"\0\0\0h" and fi.keep_cache == 1
    assert [n for n, _ in again.entries("/e")] == [b".", b"..", b"f", b"l"]


def test_table_skips_unmeasured_rows_and_shows_kept_only_when_measured():
    r = results_of({("tree_tar", "fusefs"): [100], ("tree_tar", "moosefs"): [50]})
    text = compare.render(r, ["fusefs", "moosefs"], labels())
    assert "kept" not in text
    assert len(text.splitlines()) == 3
    assert "tar c, cold *" in text
    r.add("tree_tar", compare.KEPT, Sample(400, 1.0))
    header = compare.render(r, ["fusefs", "moosefs"], labels()).splitlines()[0]
    assert header.split()[2:6] == ["fusefs", "fusefs", "kept", "MooseFS"]


def test_no_ratio_columns_without_fusefs():
    r = results_of({("meta_create", "moosefs"): [10], ("meta_create", "glusterfs"): [5]})
    header = compare.render(r, ["moosefs", "glusterfs"], labels()).splitlines()[0]
    assert "fs/" not in header


def test_json_report_carries_samples_medians_and_ratios():
    r = results_of({("small_read", "fusefs"): [10, 30], ("small_read", "moosefs"): [20, 20],
                    ("small_read", compare.KEPT): [40, 40]})
    out = json.loads(json.dumps(compare.report(r, ["fusefs", "moosefs"], labels())))
    (row,) = out["rows"]
    assert row["key"] == "small_read" and row["cold"] is True
    assert row["samples"]["fusefs"] == [10, 30]
    assert row["median"] == {"fusefs": 20, compare.KEPT: 40, "moosefs": 20}
    assert row["fusefs_over"] == {"moosefs": pytest.approx(1.0)}


def test_every_row_names_a_known_group_and_unit():
    keys = [k for k, *_ in compare.ROWS]
    assert len(keys) == len(set(keys))
    for key, group, label, unit, cold in compare.ROWS:
        assert group in compare.GROUPS, key
        assert label.format(**labels())
        assert compare.UNITS[key] == unit


def test_glusterfs_needs_a_host_name_on_loopback(monkeypatch):
    import peers
    from fs_bench import BenchError

    monkeypatch.setattr(peers.socket, "gethostname", lambda: "box")
    monkeypatch.setattr(peers.socket, "gethostbyname", lambda h: "127.0.1.1")
    assert peers.loopback_hostname() == "box"
    monkeypatch.setattr(peers.socket, "gethostbyname", lambda h: "192.0.2.7")
    with pytest.raises(BenchError, match="/etc/hosts"):
        peers.loopback_hostname()


def test_seq_write_is_shown_as_a_share_of_the_replicated_write_ceiling():
    """Each target's seq write over the ceiling of its own round, median over rounds."""
    r = results_of({("seq_write", "fusefs"): [120, 100, 140],
                    ("seq_write", "moosefs"): [150, 150, 150]})
    line = compare.ceiling_line(r, ["fusefs", "moosefs"], [150.0, 100.0, 200.0])
    # fusefs: 0.8, 1.0, 0.7 -> 80%; MooseFS: 1.0, 1.5, 0.75 -> 100%; ceiling median 150
    assert line.endswith("150 MB/s; seq write as a share of it: fusefs 80%, moosefs 100%.")
    assert compare.ceiling_line(r, ["fusefs"], []) == ""
