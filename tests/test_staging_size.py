"""The staging arena's default size and what it costs (docs/DESIGN.md 3.19).

Without ACKPT_STAGING the arena is a quarter of the memory the process may
use (the machine's, or its memory cgroup's limit), divided by the job's
ranks on this node; it is only reserved, and staging restarts at the
ring's start between checkpoints, so the memory in use follows the
largest checkpoint rather than the arena's size.
"""
import os
import subprocess
import time

import pytest

from conftest import PROGS, VENV_PY
from faultutil import need_shim, run, shim_env

MiB = 1 << 20

PROG = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
import progutil
d, size, saves = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
blob = os.urandom(4 << 20)
for s in range(saves):
    with open(os.path.join(d, "c%d.bin" % s), "wb") as f:
        f.write(b"h" * 64)
        for i in range(size // len(blob)):
            f.write(blob)
    progutil.ackpt_wait()
st = progutil.get_stats()
rss = [l for l in open("/proc/self/status") if l.startswith("RssShmem:")][0].split()[1]
print(st["staging_bytes"], int(rss) * 1024, st["bytes_written"] + st["bytes_through"], flush=True)
"""


def _cgroup_limit(total):
    """The lowest memory cgroup limit above this process (v2 or v1), or total."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return total
    for line in lines:
        _, ctl, path = line.split(":", 2)
        if ctl == "":
            bases = [("/sys/fs/cgroup", "memory.max"), ("/sys/fs/cgroup/unified", "memory.max")]
        elif ctl == "memory":
            bases = [("/sys/fs/cgroup/memory", "memory.limit_in_bytes")]
        else:
            continue
        for base, name in bases:
            p = path.rstrip("/")
            while True:
                try:
                    v = open("%s%s/%s" % (base, p, name)).read().strip()
                    if v.isdigit() and 0 < int(v) < total:
                        total = int(v)
                except OSError:
                    pass
                if not p:
                    break
                p = p[:p.rfind("/")]
    return total


def _mem_total():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return _cgroup_limit(int(line.split()[1]) * 1024)
    raise AssertionError("no MemTotal")


def _expected(total, ranks):
    v = max(total // 4 // ranks, 64 * MiB)
    return (v + 2 * MiB - 1) & ~(2 * MiB - 1)


def _run(tmp_path, size_mib=4, saves=1, wrap=None, **extra):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    prog = tmp_path / "prog.py"
    prog.write_text(PROG)
    argv = [str(VENV_PY), str(prog), str(out), str(PROGS), str(size_mib * MiB), str(saves)]
    if wrap:
        argv = wrap + argv
    r = run(argv, shim_env(out, staging=None, **extra))
    assert r.returncode == 0, r.describe()
    staging, rss, written = (int(x) for x in r.stdout.split())
    return staging, rss, written


@pytest.mark.parametrize("var,ranks", [(None, 1), ("LOCAL_WORLD_SIZE", 4),
                                       ("SLURM_NTASKS_PER_NODE", 8)])
def test_default_is_a_quarter_of_memory_per_local_rank(tmp_path, var, ranks):
    need_shim()
    extra = {var: str(ranks)} if var else {}
    staging, _, _ = _run(tmp_path, **extra)
    assert staging == _expected(_mem_total(), ranks), (staging, _expected(_mem_total(), ranks))


def _memory_cgroup(limit):
    """A fresh memory cgroup limited to `limit` bytes: (dir, procs file), or skip."""
    name = "ackpt-test-%d-%d" % (os.getpid(), time.monotonic_ns())
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        d, lim = "/sys/fs/cgroup/" + name, "memory.max"
    elif os.path.isdir("/sys/fs/cgroup/memory"):
        d, lim = "/sys/fs/cgroup/memory/" + name, "memory.limit_in_bytes"
    else:
        pytest.skip("no memory cgroup controller mounted")
    try:
        os.mkdir(d)
        with open(os.path.join(d, lim), "w") as f:
            f.write(str(limit))
    except OSError as e:
        pytest.skip("cannot make a memory cgroup here (%s)" % e)
    return d, os.path.join(d, "cgroup.procs")


def test_default_follows_the_memory_cgroup_limit(tmp_path):
    need_shim()
    d, procs = _memory_cgroup(2 << 30)
    try:
        wrap = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs]
        staging, _, _ = _run(tmp_path, wrap=wrap)
    finally:
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.1)
    assert staging == _expected(min(2 << 30, _mem_total()), 1), staging


def test_memory_follows_the_checkpoint_not_the_arena(tmp_path):
    """Five saves of 96 MiB with the default (GiB-sized) arena: the
    program's mapped shmem stays near one checkpoint, because staging
    restarts at the ring's start between saves.  Without the restart the
    saves would walk through 480 MiB of the ring and the helper would fault
    in twice the furthest position: 480 MiB or more."""
    need_shim()
    staging, rss, written = _run(tmp_path, size_mib=96, saves=5)
    assert staging >= 1 << 30, "this machine's default arena is too small to show it"
    assert written == 5 * (96 * MiB + 64)  # by the helper, or through the kernel
    print("arena %d MiB; mapped shmem after 5 saves of 96 MiB: %d MiB"
          % (staging >> 20, rss >> 20))
    assert rss <= 2 * 96 * MiB + 64 * MiB, rss >> 20


HUGE_PROG = r"""
import os, sys, time
sys.path.insert(0, sys.argv[2])
import progutil
d = sys.argv[1]
blob = os.urandom(4 << 20)
for n in range(2):  # the second save stages into pages the first faulted in
    with open(os.path.join(d, "c%d.bin" % n), "wb") as f:
        for i in range(16):
            f.write(blob)
    progutil.ackpt_wait()
# the helper faults the arena in ahead of staging, through its own mapping;
# what this process mapped of the memfd, in 2 MiB pages, and whether every
# mapping of it carries the request (VmFlags "hg": MADV_HUGEPAGE)
pmd, inside, asked = 0, False, []
for line in open("/proc/self/smaps"):
    if "-" in line.split()[0]:  # a mapping's first line: address range
        inside = "ackpt-staging" in line
    elif inside and line.startswith("ShmemPmdMapped:"):
        pmd += int(line.split()[1]) * 1024
    elif inside and line.startswith("VmFlags:"):
        asked.append("hg" in line.split()[1:])
print(pmd, progutil.get_stats()["staging_bytes"], int(bool(asked) and all(asked)),
      flush=True)
"""

SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def _shmem_thp(value=None):
    """The node's shared-memory THP setting; set it to value if given."""
    cur = open(SHMEM_THP).read().split("[")[1].split("]")[0]
    if value is not None:
        with open(SHMEM_THP, "w") as f:
            f.write(value)
    return cur


@pytest.mark.parametrize("setting", ["advise", "never"])
def test_arena_takes_huge_pages_where_the_node_allows(tmp_path, setting):
    """With shmem_enabled at advise, the arena is mapped in 2 MiB pages
    (the shim and the helper madvise it); under never it stays in 4 KiB
    pages. First touch of the arena is several times faster in 2 MiB
    pages (docs/DESIGN.md 3.19). The file is the same either way."""
    need_shim()
    if not os.path.exists(SHMEM_THP):
        pytest.skip("kernel without transparent huge pages for shared memory")
    if os.geteuid() != 0:
        pytest.skip("setting %s needs root" % SHMEM_THP)
    out = tmp_path / "out"
    out.mkdir()
    prog = tmp_path / "prog.py"
    prog.write_text(HUGE_PROG)
    old = _shmem_thp(setting)
    try:
        r = run([str(VENV_PY), str(prog), str(out), str(PROGS)],
                shim_env(out, staging="256M"))
    finally:
        _shmem_thp(old)
    assert r.returncode == 0, r.describe()
    pmd, staging, asked = (int(x) for x in r.stdout.split())
    assert staging == 256 * MiB
    assert asked == 1, "the arena's mapping lacks MADV_HUGEPAGE"
    for n in range(2):
        data = (out / ("c%d.bin" % n)).read_bytes()
        assert len(data) == 64 * MiB and data == data[:4 * MiB] * 16
    print("shmem_enabled=%s: %d MiB of the arena mapped in 2 MiB pages" % (setting, pmd >> 20))
    if setting == "never":
        assert pmd == 0
    else:
        # The kernel backs a 2 MiB range with 4 KiB pages whenever it finds
        # no free 2 MiB page, even after compaction: after twenty minutes of
        # other tests, CI once got 56 of the 64 MiB.  How much is a property
        # of the node's fragmentation; that it takes huge pages at all once
        # asked is the arena's.
        assert pmd > 0, pmd
