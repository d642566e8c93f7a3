"""How many CPUs the work may use: the affinity mask lowered to a cgroup CPU quota (a container's
``--cpus``), which ``os.cpu_count()`` and torch's default ignore; torch's threads follow it."""

import os
import subprocess
import sys

import pytest
import torch

import helpers.core.parallel as par


def _tree(tmp_path, proc_lines, files):
    """A fake cgroup mount under ``tmp_path/cg`` and a fake /proc/self/cgroup."""
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    return str(root), str(proc)


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


def test_cgroup_v2_quota_rounds_up_and_a_parent_limit_counts(tmp_path, eight_cpus):
    root, proc = _tree(
        tmp_path,
        ["0::/ci/job"],
        {"ci/job/cpu.max": "max 100000", "ci/cpu.max": "150000 100000", "cpu.max": "max 100000"},
    )
    assert par.usable_cpus(root, proc) == 2  # 1.5 CPUs of quota: two threads can keep it busy


def test_cgroup_v1_quota_and_no_quota(tmp_path, eight_cpus):
    root, proc = _tree(
        tmp_path,
        ["4:memory:/x", "3:cpu,cpuacct:/docker/abc"],
        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
    )
    assert par.usable_cpus(root, proc) == 2
    root, proc = _tree(
        tmp_path / "none",
        ["1:cpu:/"],
        {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
    )
    assert par.usable_cpus(root, proc) == 8


def test_container_whose_proc_path_names_the_host_hierarchy(tmp_path, eight_cpus):
    # inside a container /proc/self/cgroup may say /kubepods/pod1/c1 while the mount's root is the container's
    root, proc = _tree(tmp_path, ["0::/kubepods/pod1/c1"], {"cpu.max": "300000 100000"})
    assert par.usable_cpus(root, proc) == 3


def test_affinity_wins_when_smaller_and_unreadable_files_are_no_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    root, proc = _tree(tmp_path, ["0::/a"], {"a/cpu.max": "400000 100000"})
    assert par.usable_cpus(root, proc) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    root, proc = _tree(tmp_path / "bad", ["0::/a"], {"a/cpu.max": "garbage"})
    assert par.usable_cpus(root, proc) == 3
    assert par.usable_cpus(root, str(tmp_path / "missing")) == 3


def test_torch_threads_are_lowered_to_the_quota_never_raised(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(par, "usable_cpus", lambda: 1)
        assert par.cap_torch_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(par, "usable_cpus", lambda: 4)
        assert par.cap_torch_threads() == 1  # a lower count (the user's) stands
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")
def test_a_process_pinned_to_one_cpu_counts_one():
    code = "import os; os.sched_setaffinity(0, {0}); import helpers.core.parallel as p; print(p.usable_cpus())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
