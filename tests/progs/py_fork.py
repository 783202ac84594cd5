"""Corpus program: os.fork() with managed files in both processes.

argv[1]: output directory (must exist).

The parent opens a managed file before forking and keeps writing to it
after; the child writes its own managed file, closes it and leaves with
os._exit(0) (no atexit, no interpreter teardown).  The parent waits for the
child, then reads the child's file back (under ackpt that open must wait for
the child's staged data) and checks it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progutil import Observed, check, prng_bytes, report_stats  # noqa: E402

out = sys.argv[1]
obs = Observed(out)
P = lambda name: os.path.join(out, name)  # noqa: E731

child_data = prng_bytes(8 << 20, 11)
parent_data = prng_bytes(6 << 20, 12)

pf = open(P("parent.bin"), "wb")
pf.write(b"written before fork\n")
pf.flush()

pid = os.fork()
if pid == 0:
    try:
        with open(P("child.bin"), "wb") as f:
            f.write(b"child header\n")
            f.write(child_data)
            f.flush()
            os.fsync(f.fileno())
        code = 0
    except BaseException as e:  # noqa: BLE001
        sys.stderr.write("child failed: %r\n" % (e,))
        code = 3
    os._exit(code)

pf.write(parent_data)
pf.write(b"written after fork\n")
obs.eq("parent.tell", pf.tell(), 20 + len(parent_data) + 19)
pf.close()

_, status = os.waitpid(pid, 0)
check(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "child status %r" % status)

with open(P("child.bin"), "rb") as f:
    got = f.read()
check(got == b"child header\n" + child_data, "child.bin read-back mismatch (len %d)" % len(got))
with open(P("parent.bin"), "rb") as f:
    got = f.read()
check(got == b"written before fork\n" + parent_data + b"written after fork\n",
      "parent.bin read-back mismatch")

obs.write()
report_stats()
