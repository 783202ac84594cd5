"""An aborted commit is reported as EIO at the program's next call on a
managed file (docs/DESIGN.md 3.9).  When that call is a write, its bytes
are dropped, so that file is incomplete, and a program that carries on
regardless must not get a checkpoint that includes it committed.

The case is real: in a 4-rank DCP job whose first checkpoint's commit was
aborted, rank 0's next `dcp.save` got the EIO in one of its writer threads.
DCP ends such a thread on the exception and the save goes on without that
thread's items, so the second checkpoint's `.metadata` lacked rank 0's
tensors and the commit made a checkpoint that did not load.

The program here does the same thing in one process: its first commit is
made to fail (the helper's rename fails, ACKPT_FAULT), then a "writer
thread" that stops at its first error, then the next checkpoint's metadata.
"""
import os
import re

from faultutil import need_shim, run, shim_env

PROG = r"""
import os, sys
d = sys.argv[1]
blob = os.urandom(1 << 20)
def save(step, swallow):
    c = os.path.join(d, "c%d" % step)
    os.mkdir(c)
    errors = []
    try:                                   # a DCP writer thread: ends at its first error
        with open(os.path.join(c, "__0_0.distcp"), "wb") as f:
            for i in range(8):
                f.write(blob)
    except OSError as e:
        if not swallow:
            raise
        errors.append(e.errno)
    with open(os.path.join(c, ".metadata"), "wb") as f:
        f.write(b"metadata %d" % step)
    return errors
import ctypes
lib = ctypes.CDLL(None)
lib.ackpt_wait.argtypes = [ctypes.c_double]
print("save1", save(1, True), flush=True)
lib.ackpt_wait(60.0)                       # its commit has been tried (and failed)
print("save2", save(2, True), flush=True)
lib.ackpt_wait(60.0)
print("save3", save(3, True), flush=True)
"""


def test_write_that_reports_an_aborted_commit_fails_its_file(tmp_path):
    need_shim()
    out = tmp_path / "out"
    out.mkdir()
    prog = tmp_path / "prog.py"
    prog.write_text(PROG)
    env = shim_env(out, ACKPT_FAULT="op=rename,nth=1,err=EIO,mode=once")
    r = run(["python3", str(prog), str(out)], env)
    lines = r.stdout.splitlines()
    assert lines[:3] == ["save1 []", "save2 [5]", "save3 []"], r.describe()
    # checkpoint 1: its commit failed; checkpoint 2: its data file is short
    # (the write that reported the failure, and all after it, never
    # happened), so its metadata must not be committed either
    assert not (out / "c1" / ".metadata").exists()
    assert (out / "c2" / "__0_0.distcp").stat().st_size == 0
    assert not (out / "c2" / ".metadata").exists(), "a checkpoint with an incomplete file was committed"
    # checkpoint 3 is whole and committed
    assert (out / "c3" / "__0_0.distcp").stat().st_size == 8 << 20
    assert (out / "c3" / ".metadata").read_bytes() == b"metadata 3"
    assert not [n for n in os.listdir(out / "c2") if ".ackpt" in n]
    assert "is incomplete: a write to it returned EIO" in r.stderr, r.stderr
    assert r.returncode == 1, r.describe()


JOB = r"""
import ctypes, os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
d = sys.argv[1]
blob = os.urandom(1 << 20)
lib = ctypes.CDLL(None)
lib.ackpt_wait.argtypes = [ctypes.c_double]
def save(step):
    c = os.path.join(d, "c%d" % step)
    os.makedirs(c, exist_ok=True)
    errors = []
    try:                                   # a DCP writer thread: ends at its first error
        with open(os.path.join(c, "__%d_0.distcp" % rank), "wb") as f:
            for i in range(8):
                f.write(blob)
    except OSError as e:
        errors.append(e.errno)
    dist.barrier()                         # DCP gathers the write results here
    if rank == 0:
        with open(os.path.join(c, ".metadata"), "wb") as f:
            f.write(b"metadata %d" % step)
    return errors
for step in (1, 2, 3):
    # one write(2) per line: the ranks share the pipe, and an unbuffered
    # print writes the text and its newline separately
    os.write(1, ("rank%d save%d %s\n" % (rank, step, save(step))).encode())
    lib.ackpt_wait(60.0)                   # the commit has been tried
    dist.barrier()
dist.destroy_process_group()
"""


def test_two_ranks_no_commit_over_a_write_that_reported_an_abort(tmp_path):
    """The same through the job-wide barrier: rank 0's first commit fails
    (its rename), the EIO that reports it reaches rank 0's next data
    write, the coordinator withholds checkpoint 2 for every rank, and
    checkpoint 3 commits."""
    need_shim()
    import subprocess

    from barrierutil import free_master_port, job_env, shimmed, torchrun_argv

    out = tmp_path / "out"
    out.mkdir()
    prog = tmp_path / "job.py"
    prog.write_text(JOB)
    argv = shimmed(torchrun_argv(2, free_master_port(), prog, [out]), out)
    env = job_env(ACKPT_FAULT="op=rename,nth=1,err=EIO,mode=once")
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    lines = sorted(re.findall(r"rank\d save\d \[[^\]]*\]", r.stdout))
    assert lines == ["rank0 save1 []", "rank0 save2 [5]", "rank0 save3 []",
                     "rank1 save1 []", "rank1 save2 []", "rank1 save3 []"], (r.stdout, r.stderr)
    assert not (out / "c1" / ".metadata").exists()
    assert not (out / "c2" / ".metadata").exists(), "a checkpoint with an incomplete file was committed"
    assert (out / "c3" / ".metadata").read_bytes() == b"metadata 3"
    assert (out / "c3" / "__0_0.distcp").stat().st_size == 8 << 20
    assert (out / "c3" / "__1_0.distcp").stat().st_size == 8 << 20
    assert "returned an error to the program" in r.stderr, r.stderr
    assert r.returncode != 0, r.stderr
