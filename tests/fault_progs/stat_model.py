"""Sizes, offsets and contents seen while data is in flight.

argv: OUTDIR
Writes two managed files through several descriptors (write, pwrite inside
and past EOF, a second O_WRONLY fd, an O_APPEND fd, ftruncate shrink/extend,
os.writev, a buffered file object with seek) and after each step compares
fstat / stat / os.path.getsize / lseek(SEEK_END) / the fd positions, then
the contents read back through a fresh fd and pread, with its own model.
Sizes are checked BEFORE the read-back (a read waits for the data; a stat
must not need to).  Observations go to OUTDIR/observed.json; on stdout:
"inflight=N checks=M" -- how many size checks ran while the shim reported
ops pending (0 without the shim).
"""
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "progs"))
from progutil import Observed, check, get_stats, report_stats  # noqa: E402

out = sys.argv[1]
obs = Observed(out)
rng = random.Random(5)
P = lambda n: os.path.join(out, n)  # noqa: E731
model = {"a.bin": bytearray()}  # files appear here once created
fds = {"a.bin": {}, "b.bin": {}}   # name -> {label: fd}
pos = {}                          # label -> expected position (non-append fds)
inflight = checks = 0


def put(name, off, data):
    m = model[name]
    if len(m) < off:
        m.extend(bytes(off - len(m)))
    m[off:off + len(data)] = data


def trunc(name, n):
    m = model[name]
    if n < len(m):
        del m[n:]
    else:
        m.extend(bytes(n - len(m)))


def step(tag):
    global inflight, checks
    st = get_stats()
    if st.get("present") and st.get("ops_pending", 0) > 0:
        inflight += 1
    checks += 1
    for name, m in model.items():
        want = len(m)
        obs.eq("%s %s stat" % (tag, name), os.stat(P(name)).st_size, want)
        obs.eq("%s %s getsize" % (tag, name), os.path.getsize(P(name)), want)
        for label, fd in sorted(fds[name].items()):
            obs.eq("%s %s fstat(%s)" % (tag, name, label), os.fstat(fd).st_size, want)
            cur = os.lseek(fd, 0, os.SEEK_CUR)
            if label in pos:
                obs.eq("%s %s pos(%s)" % (tag, name, label), cur, pos[label])
            obs.eq("%s %s SEEK_END(%s)" % (tag, name, label), os.lseek(fd, 0, os.SEEK_END), want)
            os.lseek(fd, cur, os.SEEK_SET)
    for name, m in model.items():
        rfd = os.open(P(name), os.O_RDONLY)
        got = b""
        while True:
            b = os.read(rfd, 1 << 20)
            if not b:
                break
            got += b
        os.close(rfd)
        check(got == bytes(m), "%s %s: read-back differs (len %d vs %d)" % (tag, name, len(got), len(m)))
    if "a1" in fds["a.bin"] and len(model["a.bin"]) > 4096:
        off = rng.randrange(0, len(model["a.bin"]) - 4096)
        check(os.pread(fds["a.bin"]["a1"], 4096, off) == bytes(model["a.bin"][off:off + 4096]),
              "%s: pread at %d differs" % (tag, off))


def wr(label, name, data):
    fd = fds[name][label]
    n = os.write(fd, data)
    check(n == len(data), "short write")
    put(name, pos[label], data)
    pos[label] += n


a1 = os.open(P("a.bin"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
fds["a.bin"]["a1"] = a1
pos["a1"] = 0
wr("a1", "a.bin", rng.randbytes(300_000))
step("1-write")

data = rng.randbytes(50_000)
os.pwrite(a1, data, (2 << 20) + 123)          # sparse, extends
put("a.bin", (2 << 20) + 123, data)
step("2-pwrite-past-eof")

a2 = os.open(P("a.bin"), os.O_WRONLY)
fds["a.bin"]["a2"] = a2
pos["a2"] = 0
data = rng.randbytes(10_000)
os.pwrite(a2, data, 100_000)                  # inside
put("a.bin", 100_000, data)
wr("a2", "a.bin", rng.randbytes(5000))        # at 0 through the second fd
step("3-second-fd")

a3 = os.open(P("a.bin"), os.O_WRONLY | os.O_APPEND)
fds["a.bin"]["a3"] = a3
data = rng.randbytes(70_000)
os.write(a3, data)
put("a.bin", len(model["a.bin"]), data)
step("4-append")

pos["a1"] = os.lseek(a1, 0, os.SEEK_END)
check(pos["a1"] == len(model["a.bin"]), "SEEK_END after append %d" % pos["a1"])
wr("a1", "a.bin", rng.randbytes((1 << 20) + 7))
step("5-extend-at-end")

os.ftruncate(a1, 1_500_000)
trunc("a.bin", 1_500_000)
step("6-shrink")
os.ftruncate(a2, 4 << 20)
trunc("a.bin", 4 << 20)
step("7-extend-by-truncate")

parts = [rng.randbytes(3000), b"|", rng.randbytes(200_000)]
os.lseek(a2, 3_000_000, os.SEEK_SET)
pos["a2"] = 3_000_000
n = os.writev(a2, parts)
check(n == sum(map(len, parts)), "writev short")
put("a.bin", 3_000_000, b"".join(parts))
pos["a2"] += n
step("8-writev")

f = open(P("b.bin"), "wb")
model["b.bin"] = bytearray()
fds["b.bin"]["bf"] = f.fileno()
for i in range(5):
    chunk = rng.randbytes(100_000 + i)
    f.write(chunk)
    put("b.bin", len(model["b.bin"]), chunk)
f.flush()
pos["bf"] = len(model["b.bin"])
step("9-buffered")
f.seek(10)
f.write(b"PATCHED")
f.flush()
put("b.bin", 10, b"PATCHED")
pos["bf"] = 17
step("10-buffered-seek")
data = rng.randbytes(4096)
os.pwrite(f.fileno(), data, (16 << 20) + 1)
put("b.bin", (16 << 20) + 1, data)
step("11-sparse-16M")

for name in fds:
    for label, fd in fds[name].items():
        if label != "bf":
            os.close(fd)
f.close()
fds = {"a.bin": {}, "b.bin": {}}
step("12-closed")
obs.write()
report_stats()
print("inflight=%d checks=%d" % (inflight, checks))
