"""Read-your-writes across the job: ranks of one torchrun job read, right
after a dist.barrier(), what another rank has just saved under ackpt.  The
output and the files must be those of a plain run (docs/DESIGN.md 3.7)."""
import re

import pytest

from barrierutil import free_master_port, job_env, run_job, shimmed, torchrun_argv
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
