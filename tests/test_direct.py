"""Framework writes reach storage with O_DIRECT (docs/DESIGN.md, "Staging
at the file offset's place in a page").

Framework files are not written at page-aligned offsets: torch.save's zip
records are 64-byte aligned, DCP and safetensors start their data after a
header of any length.  The shim places each staged chunk in the arena at
the same offset within a page as its file offset, so the helper can write
the page-aligned middle of every write with O_DIRECT, and only the partial
first and last pages of each write through the page cache.  Writes that
share a page but no byte may then be in flight together.

Each program runs plainly and under the shim (with a slow helper, so many
writes of one file are pending at once) and the files are compared byte for
byte; struct ackpt_stats says how many bytes went with O_DIRECT, and strace
of the helper's pwrite pool shows what reached the kernel.
"""
import re

import pytest

from conftest import PROGS, VENV_PY
from faultutil import (assert_same_trees, helper_pid_set, need_shim, parse_strace,
                       run_plain_and_shim, strace_argv)

# Unaligned sequential records with small headers between them (the shape
# of a zip or safetensors file), then writes that share pages with earlier
# ones without sharing bytes, writes that overlap earlier ones by a few
# bytes across a page boundary, and a second description at odd offsets.
WRITER = r"""
import os, random, sys
sys.path.insert(0, sys.argv[2])
import progutil
d = sys.argv[1]
rnd = random.Random(7)
p = os.path.join(d, "records.bin")
fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
pos = 0
for i in range(40):
    hdr = b"H%05d" % i + bytes(rnd.randrange(1, 90))
    pos += os.write(fd, hdr)
    pad = (-pos) % 64
    pos += os.write(fd, b"\0" * pad)
    blob = rnd.randbytes(rnd.choice([70000, 1 << 20, 3 << 20, (5 << 20) + 123]))
    pos += os.write(fd, blob)
# neighbours within one page, written out of order
for k in range(64):
    os.pwrite(fd, bytes([k]) * 37, pos + 200 * 37 - 37 * (k + 1))
# overlaps across page boundaries with bytes staged just before
for k in range(32):
    at = rnd.randrange(0, pos - 9000)
    os.pwrite(fd, rnd.randbytes(8200), at)
    os.pwrite(fd, b"X" * 100, at + 8150)
os.close(fd)
fd = os.open(p, os.O_RDWR)
for k in range(16):
    os.pwrite(fd, rnd.randbytes(200000 + k), 4096 * k + 4095)
os.close(fd)
with open(os.path.join(d, "aligned.bin"), "wb") as f:  # page-aligned: all O_DIRECT but nothing
    f.write(rnd.randbytes(8 << 20))
progutil.ackpt_wait()
progutil.report_stats()
"""


def test_unaligned_records_match_plain_run_and_go_direct(tmp_path):
    need_shim()
    prog = tmp_path / "writer.py"
    prog.write_text(WRITER)
    plain, shim, _, st, diffs = run_plain_and_shim(
        lambda out: [VENV_PY, prog, out, PROGS], tmp_path, staging="64M",
        shim_extra={"ACKPT_TEST_DELAY_MS": "3", "ACKPT_WRITE_THROUGH": "off"})
    assert_same_trees(diffs, shim)
    assert st and st["present"] and st["errors"] == 0, st
    written = st["bytes_written"]
    assert written == st["bytes_staged"], st
    if not st["helper_flags"] & 4:
        pytest.skip("the helper runs without O_DIRECT on this filesystem (helper_flags %d)"
                    % st["helper_flags"])
    # buffered: the headers and padding, the small neighbours and overlaps,
    # and at most the two partial pages of each large write
    print("direct", st["bytes_direct"], "of", written)
    assert st["bytes_direct"] >= written - 2 * 1024 * 1024, st
    assert st["bytes_direct"] % 4096 == 0, st


TORCH = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
import progutil
g = torch.Generator().manual_seed(3)
sd = {"layer%d.weight" % i: torch.randn(1000 + 37 * i, 257, generator=g) for i in range(24)}
sd["step"] = torch.tensor(5)
torch.save(sd, sys.argv[1] + "/model.pt")
back = torch.load(sys.argv[1] + "/model.pt")
assert all(torch.equal(sd[k], back[k]) for k in sd)
progutil.ackpt_wait()
progutil.report_stats()
"""


def _same_size(a, b):
    # torch.save writes a random serialization id into the archive; the
    # tensors (compared in the program after the load) are the content
    sa, sb = a.stat().st_size, b.stat().st_size
    return None if sa == sb else "size %d (plain) vs %d (shim)" % (sa, sb)


def test_torch_save_goes_direct(tmp_path):
    need_shim()
    pytest.importorskip("torch")
    prog = tmp_path / "save.py"
    prog.write_text(TORCH)
    plain, shim, _, st, diffs = run_plain_and_shim(
        lambda out: [VENV_PY, prog, out, PROGS], tmp_path, staging="64M", timeout=300,
        shim_extra={"ACKPT_WRITE_THROUGH": "off"}, special={"*.pt": _same_size})
    assert_same_trees(diffs, shim)
    pa = (tmp_path / "plain" / "out" / "model.pt").stat().st_size
    sa = (tmp_path / "shim" / "out" / "model.pt").stat().st_size
    assert pa == sa
    assert st["errors"] == 0 and st["bytes_written"] == st["bytes_staged"] == sa, st
    if not st["helper_flags"] & 4:
        pytest.skip("the helper runs without O_DIRECT here (helper_flags %d)" % st["helper_flags"])
    # torch.save's tensor records start 64-byte aligned: before, none of
    # this file went direct; now all but a few pages per tensor does
    assert st["bytes_direct"] >= sa - 25 * 2 * 4096 - 64 * 1024, st


def test_what_reaches_the_kernel(tmp_path):
    """The helper's pwrite pool makes its writes visible to strace: every
    write through the descriptor it opened with O_DIRECT is page-aligned in
    offset and length, and the buffered ones are the partial pages."""
    need_shim()
    prog = tmp_path / "writer.py"
    prog.write_text(WRITER)
    traces = {}

    def wrap(label, argv, base):
        if label != "shim":
            return argv
        traces[label] = base / "trace"
        return strace_argv(base / "trace", argv,
                           "openat,close,pwrite64,pwritev,execve,clone,clone3,fork,vfork")

    plain, shim, _, st, diffs = run_plain_and_shim(
        lambda out: [VENV_PY, prog, out, PROGS], tmp_path, staging="64M",
        shim_extra={"ACKPT_IO": "pool", "ACKPT_WRITE_THROUGH": "off"}, wrap=wrap)
    assert_same_trees(diffs, shim)
    calls = parse_strace(traces["shim"])
    helpers = helper_pid_set(calls)
    assert helpers, "no helper in the trace"
    # descriptor numbers are reused: follow opens and closes in trace order
    direct_fds, opened = set(), 0
    direct = buffered = 0
    for c in calls:
        if c.pid not in helpers:
            continue
        if c.name == "openat" and c.ret_int() >= 0:
            if "O_DIRECT" in c.args:
                direct_fds.add(c.ret_int())
                opened += 1
            else:
                direct_fds.discard(c.ret_int())
            continue
        if c.name == "close":
            m = re.match(r"\s*(\d+)", c.args)
            if m:
                direct_fds.discard(int(m.group(1)))
            continue
        if c.name != "pwrite64":
            continue
        m = re.match(r"\s*(\d+)<([^>]*)>, .*, (\d+), (\d+)\s*$", c.args)
        assert m, c
        fd, path, length, off = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        if not path.endswith("records.bin"):
            continue
        n = c.ret_int()
        assert n == length, c
        if fd in direct_fds:
            assert off % 4096 == 0 and length % 4096 == 0 and length >= 65536, c
            direct += n
        else:
            buffered += n
    if not opened:
        pytest.skip("the helper opened nothing with O_DIRECT (filesystem without it)")
    assert direct > 0 and buffered > 0
    print("kernel: direct", direct, "buffered", buffered)
    assert direct >= 10 * buffered, (direct, buffered)
