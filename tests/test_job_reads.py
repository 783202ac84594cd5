"""Read-your-writes across the job: ranks of one torchrun job read, right
after a dist.barrier(), what another rank has just saved under ackpt.  The
output and the files must be those of a plain run (docs/DESIGN.md 3.7)."""
import re

import pytest

from barrierutil import (free_master_port, in_netns, job_env, run_job, shimmed, start_job,
                         torchrun_argv, two_nodes)
from conftest import compare_trees
from faultutil import need_shim


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


@pytest.mark.parametrize("mode", ["dcp", "torchsave"])
def test_every_rank_reads_what_the_job_saved(tmp_path, mode):
    outs, lines = {}, {}
    # DCP's .metadata records the checkpoint's path: equal-length names keep
    # the two runs' files byte-comparable
    for label in ("plain", "shim_"):
        out = tmp_path / label / "ckpt"
        out.mkdir(parents=True)
        argv = torchrun_argv(2, free_master_port(), "read_your_writes.py", [out, mode])
        if label != "plain":
            argv = shimmed(argv, out)
        job = run_job(label, argv, job_env(ACKPT_TEST_DELAY_MS=100 if label != "plain" else None),
                      tmp_path / label, timeout=240)
        assert job.returncode == 0, job.describe()
        outs[label] = out
        lines[label] = sorted(ln for ln in job.stdout().splitlines() if ln.startswith("rank "))
    assert lines["plain"] and lines["shim_"] == lines["plain"], (lines["plain"], lines["shim_"])
    uuid = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

    def same_but_path(a, b):
        """DCP's .metadata also holds a random save_id."""
        if uuid.sub(b"U", a.read_bytes().replace(b"plain", b"shim_")) != uuid.sub(b"U", b.read_bytes()):
            return "differs beyond the checkpoint path and save_id"
        return None

    diffs = compare_trees(outs["plain"], outs["shim_"], {"*.metadata": same_but_path})
    assert not diffs, diffs


def _private_shm(argv):
    """A mount namespace with its own /dev/shm: another node's node registry."""
    return ["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm && exec \"$@\"", "sh"] + \
        [str(a) for a in argv]


@pytest.mark.parametrize("mode", ["dcp", "torchsave"])
def _two_node_job(base, out, mode, shim, **env):
    """read_your_writes.py DIR mode as one torchrun per simulated node (its
    own network namespace and /dev/shm), rank 0 on node 0; returns the two
    finished jobs, each checked for exit status 0."""
    import shutil
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    with two_nodes() as ((ns_a, addr_a), (ns_b, _addr_b)):
        port = free_master_port()
        jobs = []
        try:
            for node, ns, dev in ((0, ns_a, "ackptvA"), (1, ns_b, "ackptvB")):
                argv = torchrun_argv(1, port, "read_your_writes.py", [out, mode], nnodes=2,
                                     node_rank=node, master_addr=addr_a)
                if shim:
                    argv = shimmed(argv, out)
                jobs.append(start_job("%s-node%d" % (base.name, node),
                                      in_netns(ns, _private_shm(argv)),
                                      job_env(GLOO_SOCKET_IFNAME=dev, TP_SOCKET_IFNAME=dev, **env),
                                      base))
            for j in jobs:
                j.wait(240)
        finally:
            for j in jobs:
                j.kill()
    for j in jobs:
        assert j.returncode == 0, j.describe()
    return jobs


@pytest.mark.parametrize("mode", ["dcp", "torchsave"])
def test_every_rank_reads_across_two_nodes(tmp_path, mode):
    """The same, with rank 0 and rank 1 on two simulated nodes: separate
    network namespaces and mount namespaces (each its own /dev/shm, so its own
    node registry), sharing the checkpoint directory."""
    lines = {}
    for label in ("plain", "shim_"):
        base = tmp_path / label
        out = base / "ckpt"
        out.mkdir(parents=True)
        jobs = _two_node_job(base, out, mode, label != "plain",
                             ACKPT_TEST_DELAY_MS=100 if label != "plain" else None)
        lines[label] = sorted(ln for j in jobs for ln in j.stdout().splitlines()
                              if ln.startswith("rank "))
    assert lines["plain"] and lines["shim_"] == lines["plain"], (lines["plain"], lines["shim_"])


def test_close_does_not_wait_for_storage_across_nodes(tmp_path):
    """Announcing a closed file to the coordinator costs a round trip, never
    the storage: with the writer's helper slowed (1.5 s per write), storage
    holds less than was written when close() returns on the writer's node,
    and the reader on the other node still reads all of it after the
    barrier (docs/BARRIER.md, "Other nodes' pending names")."""
    base = tmp_path / "shim_"
    out = base / "ckpt"
    out.mkdir(parents=True)
    jobs = _two_node_job(base, out, "remote", True, ACKPT_TEST_DELAY_MS=1500,
                         ACKPT_TEST_DELAY_RANK=1)
    lines = [ln for j in jobs for ln in j.stdout().splitlines()]
    wrote = [ln for ln in lines if ln.startswith("writer closed")]
    read = [ln for ln in lines if ln.startswith("rank 0 read")]
    assert wrote and read, lines
    held, total = re.match(r"writer closed; storage held (\d+) of (\d+)", wrote[0]).groups()
    assert int(held) < int(total), ("close() returned only once storage held the data: it "
                                    "waited for the slow helper\n%s" % wrote[0])
    assert read[0] == "rank 0 read %s bytes, same" % total, read


@pytest.mark.parametrize("master_addr", ["::1", "localhost"])
def test_coordinator_over_ipv6_and_a_hostname(tmp_path, master_addr):
    """torchrun's MASTER_ADDR given as an IPv6 address or a hostname: the
    coordinator listens there (every address the name resolves to on this
    host), the ranks reach it, DCP's .metadata is committed behind the
    barrier, and every rank reads the checkpoint back."""
    import socket
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as e:
        pytest.skip("no IPv6 loopback here: %s" % e)
    out = tmp_path / "ckpt"
    out.mkdir()
    argv = shimmed(torchrun_argv(2, free_master_port(), "read_your_writes.py", [out, "dcp"],
                                 master_addr=master_addr), out, log="debug")
    job = run_job("shim", argv, job_env(), tmp_path, timeout=240)
    assert job.returncode == 0, job.describe()
    lines = sorted(ln for ln in job.stdout().splitlines() if ln.startswith("rank "))
    assert len(lines) == 4, job.describe()
    for step in (0, 1):
        assert (out / ("step%d" % step) / ".metadata").exists(), job.describe()
    assert "coordinator listening on %s" % master_addr in job.stderr(), job.describe()
    assert "aborted" not in job.stderr(), job.describe()
