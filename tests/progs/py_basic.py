"""Corpus program: plain CPython file I/O on managed files.

argv[1]: output directory (must exist).

open('wb') with small (buffered) and large (direct write) writes, tell()
checks, flush + os.fsync, write-to-temp + os.replace, read-back in the same
process; text mode; 'r+b' patching; 'ab'; os.open/os.write/os.pwrite/os.lseek;
os.truncate by path; pathlib.write_bytes; ackpt_wait() when the shim is loaded.
"""
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from progutil import Observed, check, prng_bytes, ackpt_wait, report_stats  # noqa: E402

out = sys.argv[1]
obs = Observed(out)
P = lambda name: os.path.join(out, name)  # noqa: E731


def size_of(name):
    return os.stat(P(name)).st_size


# 1. temp + fsync + os.replace, like most "safe" savers.
big = prng_bytes(24 << 20, 1)
expect = bytearray()
tmp = P("model.bin.tmp")
with open(tmp, "wb") as f:
    obs.eq("model.tell0", f.tell(), 0)
    for i in range(3000):  # small writes stay in BufferedWriter
        rec = b"rec%05d;" % i
        f.write(rec)
        expect += rec
    obs.eq("model.tell-small", f.tell(), len(expect))
    f.write(big)  # larger than the buffer: flush + direct write(2)
    expect += big
    obs.eq("model.tell-big", f.tell(), len(expect))
    f.write(memoryview(big)[: 1 << 20])
    expect += big[: 1 << 20]
    f.flush()
    obs.eq("model.fstat-after-flush", os.fstat(f.fileno()).st_size, len(expect))
    os.fsync(f.fileno())
os.replace(tmp, P("model.bin"))
check(not os.path.exists(tmp), "temp name still exists after os.replace")
obs.eq("model.stat", size_of("model.bin"), len(expect))
with open(P("model.bin"), "rb") as f:
    got = f.read()
check(got == bytes(expect), "model.bin read-back mismatch")
del got

# 2. Text mode, many lines, seek/tell on a text file.
lines = ["line %d: %s\n" % (i, "x" * (i % 50)) for i in range(20000)]
with open(P("log.txt"), "w") as f:
    f.writelines(lines)
    obs.add("log.tell", f.tell())
with open(P("log.txt")) as f:
    check(f.readlines() == lines, "log.txt read-back mismatch")

# 3. 'r+b': patch bytes in the middle of an existing file, and extend it.
with open(P("model.bin"), "r+b") as f:
    f.seek(100)
    f.write(b"PATCHED-IN-PLACE")
    expect[100:116] = b"PATCHED-IN-PLACE"
    f.seek(0, os.SEEK_END)
    obs.eq("model.r+b.seek-end", f.tell(), len(expect))
    f.write(b"EXTENDED")
    expect += b"EXTENDED"
with open(P("model.bin"), "rb") as f:
    f.seek(90)
    check(f.read(40) == bytes(expect[90:130]), "model.bin patch read-back mismatch")
    f.seek(-8, os.SEEK_END)
    check(f.read() == b"EXTENDED", "model.bin extension read-back mismatch")
obs.eq("model.stat-after-patch", size_of("model.bin"), len(expect))
del expect

# 4. 'ab' across two opens.
with open(P("append.bin"), "ab") as f:
    f.write(b"A" * 1000)
with open(P("append.bin"), "ab") as f:
    obs.eq("append.tell-on-open", f.tell(), 1000)
    f.write(b"B" * 70000)
    obs.eq("append.tell", f.tell(), 71000)

# 5. os-level calls.
fd = os.open(P("oslevel.bin"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
chunk = prng_bytes(1 << 20, 2)
check(os.write(fd, chunk) == len(chunk), "os.write short")
check(os.pwrite(fd, b"PWRITE", 10) == 6, "os.pwrite short")
obs.eq("oslevel.lseek-cur", os.lseek(fd, 0, os.SEEK_CUR), 1 << 20)
os.lseek(fd, 3 << 20, os.SEEK_SET)  # leave a hole
os.write(fd, b"after-hole")
obs.eq("oslevel.fstat", os.fstat(fd).st_size, (3 << 20) + 10)
check(os.pread(fd, 6, 10) == b"PWRITE", "os.pread mismatch")
os.ftruncate(fd, 2 << 20)
obs.eq("oslevel.fstat-after-ftruncate", os.fstat(fd).st_size, 2 << 20)
os.fsync(fd)
os.close(fd)
os.truncate(P("oslevel.bin"), (2 << 20) + 4096)
obs.eq("oslevel.stat-after-truncate", size_of("oslevel.bin"), (2 << 20) + 4096)

# 6. pathlib.
pathlib.Path(P("pathlib.bin")).write_bytes(chunk[: 300000])
check(pathlib.Path(P("pathlib.bin")).read_bytes() == chunk[:300000], "pathlib read-back mismatch")
pathlib.Path(P("pathlib.txt")).write_text("hello from pathlib\n" * 100)

# 7. The public API, when the shim is loaded.
rc = ackpt_wait(120.0)
check(rc in (None, 0), "ackpt_wait returned %r" % rc)

obs.write()
report_stats()
