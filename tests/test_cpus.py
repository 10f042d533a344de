"""How many CPUs the worker pools and thread counts are sized for: the cores this process may run
on, capped by a cgroup's CPU quota (cgroup v2 and v1 files written here, on a 64-core host)."""

import os

import pytest

from model.pool import usable_cpus

HOST_CORES = 64


@pytest.fixture
def cgroups(tmp_path, monkeypatch):
    """(root of the cgroup mount, /proc/self/cgroup) for a process allowed on 64 cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(HOST_CORES)))
    root, own = tmp_path / "cgroup", tmp_path / "self-cgroup"
    root.mkdir()
    return root, own


def write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


def test_a_v2_quota_on_the_service_or_a_folder_above_it_caps_the_count(cgroups):
    root, own = cgroups
    own.write_text("0::/system.slice/gender-watcher.service\n")
    service = root / "system.slice" / "gender-watcher.service"
    write(service, "cpu.max", "max 100000\n")
    assert usable_cpus(root, own) == HOST_CORES
    write(service, "cpu.max", "150000 100000\n")  # CPUQuota=150%: two processes keep it busy
    assert usable_cpus(root, own) == 2
    write(root / "system.slice", "cpu.max", "100000 100000\n")
    assert usable_cpus(root, own) == 1


def test_inside_a_container_the_quota_of_the_mount_itself_counts(cgroups):
    root, own = cgroups
    own.write_text("0::/docker/3f2a9c\n")  # the host's path, absent from the container's mount
    write(root, "cpu.max", "300000 100000\n")  # docker --cpus=3
    assert usable_cpus(root, own) == 3


def test_a_v1_quota_counts_and_minus_one_means_none(cgroups):
    root, own = cgroups
    own.write_text("5:memory:/docker/3f2a9c\n4:cpu,cpuacct:/docker/3f2a9c\n3:cpuset:/docker/3f2a9c\n")
    folder = root / "cpu,cpuacct" / "docker" / "3f2a9c"
    write(folder, "cpu.cfs_period_us", "100000\n")
    write(folder, "cpu.cfs_quota_us", "-1\n")
    assert usable_cpus(root, own) == HOST_CORES
    write(folder, "cpu.cfs_quota_us", "400000\n")
    assert usable_cpus(root, own) == 4
    write(root / "memory" / "docker" / "3f2a9c", "cpu.max", "100000 100000\n")  # not the cpu hierarchy
    assert usable_cpus(root, own) == 4


@pytest.mark.parametrize("text", [None, "", "garbage\n", "0::/\n"])
def test_without_readable_cgroups_the_affinity_decides(cgroups, text):
    root, own = cgroups
    if text is not None:
        own.write_text(text)
    write(root, "cpu.max", "not numbers\n")
    assert usable_cpus(root, own) == HOST_CORES


def test_this_machine_gets_at_least_one_and_no_more_than_its_cores():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0)) <= os.cpu_count()
