"""Unusual but legal write patterns; run once plainly and once under the shim,
the two output trees must be identical.   argv: CASE OUTDIR"""
import os
import random
import sys

case, out = sys.argv[1], sys.argv[2]
R = random.Random(case)


def blob(n):
    return R.randbytes(n)


def p(*names):
    return os.path.join(out, *names)


W = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
if case == "append":
    fd = os.open(p("log.pt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for i in range(50):
        os.write(fd, blob(R.randrange(1, 70000)))
        os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the offset
    os.close(fd)
elif case == "overlap-sparse":
    fd = os.open(p("ov.pt"), W, 0o644)
    os.pwrite(fd, blob(1 << 20), 0)
    for i in range(200):
        os.pwrite(fd, blob(R.randrange(1, 40000)), R.randrange(0, 1 << 20))
    os.pwrite(fd, blob(4096), 64 << 20)        # sparse: a hole of ~63 MiB
    os.pwrite(fd, b"x", (64 << 20) + 1000000)
    os.ftruncate(fd, (64 << 20) + 500000)       # shrink back into the tail
    os.close(fd)
elif case == "zero-byte":
    fd = os.open(p("z.pt"), W, 0o644)
    for i in range(100):
        os.write(fd, b"")
        os.pwrite(fd, b"", 1 << 30)
        os.write(fd, blob(i))
    os.close(fd)
    open(p("empty.pt"), "wb").close()
elif case == "opened-twice":
    a = os.open(p("two.pt"), W, 0o644)
    b = os.open(p("two.pt"), os.O_WRONLY)
    for i in range(100):
        os.write(a if i % 2 else b, blob(R.randrange(1, 30000)))
    os.close(a)
    os.close(b)
elif case == "dup":
    a = os.open(p("dup.pt"), W, 0o644)
    b = os.dup(a)
    c = os.dup2(a, 100)
    for i in range(90):
        os.write((a, b, c)[i % 3], blob(R.randrange(1, 30000)))
    os.close(a)
    os.write(b, b"after close of the first fd")
    os.close(b)
    os.close(c)
elif case == "unlink-inflight":
    fd = os.open(p("gone.pt"), W, 0o644)
    for i in range(32):
        os.write(fd, blob(1 << 20))
    os.unlink(p("gone.pt"))
    os.write(fd, blob(1000))
    os.close(fd)
    with open(p("gone.pt"), "wb") as f:  # a new file under the old name
        f.write(blob(5000))
elif case == "rename-inflight":
    fd = os.open(p("a.pt"), W, 0o644)
    for i in range(16):
        os.write(fd, blob(1 << 20))
    os.rename(p("a.pt"), p("b.pt"))
    os.write(fd, blob(12345))
    os.rename(p("b.pt"), p("c d.pt"))
    os.close(fd)
elif case == "odd-names":
    os.makedirs(p("dir with spaces", "iter 1"), exist_ok=True)
    for name in ("model weights.pt", b"\xff\xfe-not-utf8.pt".decode("utf-8", "surrogateescape"),
                 "caf\u00e9 \u2603.pt", " leading-space.pt", "-dash.pt"):
        with open(p("dir with spaces", "iter 1", name), "wb") as f:
            f.write(blob(300000))
    with open(p("dir with spaces", "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
elif case == "symlinked-metadata":
    # the tracker name is a symlink: a plain open('w') writes through it
    os.makedirs(p("real"), exist_ok=True)
    with open(p("real", "tracker-target.txt"), "w") as f:
        f.write("0")
    os.symlink("real/tracker-target.txt", p("latest_checkpointed_iteration.txt"))
    with open(p("latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
elif case == "nofollow":
    os.makedirs(p("real"), exist_ok=True)
    with open(p("real", "t.pt"), "wb") as f:
        f.write(b"target")
    os.symlink("real/t.pt", p("link.pt"))
    os.symlink("real/t.pt", p("latest"))
    res = []
    for name in ("link.pt", "latest"):
        try:
            os.open(p(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            res.append("%s opened" % name)
        except OSError as e:
            res.append("%s %s" % (name, e.errno))
    with open(p("result.txt"), "w") as f:
        f.write("\n".join(res) + "\n")
elif case == "plain-write":
    # used for the malformed-variable and symlinked-root runs
    os.makedirs(p("iter_0000001"), exist_ok=True)
    with open(p("iter_0000001", "model.pt"), "wb") as f:
        f.write(blob(3 << 20))
    with open(p("latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1")
elif case == "huge-write":
    # one write() of 4 GiB + 1 MiB: a repeating 1 MiB pattern
    n = (4 << 30) + (1 << 20)
    pat = blob(1 << 20)
    buf = bytearray(n)
    mv = memoryview(buf)
    for off in range(0, n, 1 << 20):
        mv[off:off + (1 << 20)] = pat
    fd = os.open(p("huge.pt"), W, 0o644)
    done = 0
    while done < n:
        done += os.write(fd, mv[done:])
    os.close(fd)
else:
    sys.exit("unknown case " + case)
