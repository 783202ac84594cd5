"""Corners found by trying to break ackpt with small hostile programs.

Each program runs without the shim and under it, with the helper slowed
down (staged data still in flight) and at full speed (write-through on);
what it printed and the files it left must match byte for byte.
"""
import subprocess
import textwrap

import pytest

from conftest import VENV_PY, compile_c
from faultutil import (assert_same_trees, differential, need_shim, py_argv, run, run_plain_and_shim,
                       shim_env)


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


HELPER_SPEED = pytest.mark.parametrize("delay", [True, False], ids=["slow-helper", "fast-helper"])


def _differential(tmp_path, script, delay):
    return differential(tmp_path, py_argv(script), delay_ms=100 if delay else None)


@HELPER_SPEED
def test_zero_length_writes_past_the_end(tmp_path, delay):
    """A write of no bytes moves nothing: not the size, not the position,
    even past the end or on an O_APPEND description.  It used to grow the
    logical size, so the next append landed a megabyte out."""
    _differential(tmp_path, """
        import os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"0123456789")
        os.lseek(fd, 1000000, os.SEEK_SET)
        print("write", os.write(fd, b""), "writev", os.writev(fd, [b"", b""]),
              "pwrite", os.pwrite(fd, b"", 2000000), "pwritev", os.pwritev(fd, [b""], 3000000))
        print("size", os.fstat(fd).st_size, "end", os.lseek(fd, 0, os.SEEK_END))
        os.write(fd, b"END")
        a = os.open("f", os.O_WRONLY | os.O_APPEND)
        print("append of nothing", os.write(a, b""), "at", os.lseek(a, 0, os.SEEK_CUR))
        os.close(a)
        os.close(fd)
        print("stat", os.stat("f").st_size)
    """, delay)


@pytest.mark.parametrize("blocks", [1024, 32768], ids=["1MiB", "32MiB"])
def test_file_size_limit_below_the_arena(tmp_path, blocks):
    """ulimit -f: the staging memfd's size counts against RLIMIT_FSIZE, and
    sizing it raised SIGXFSZ, which killed the shell before it wrote a byte.
    The arena now fits within the limit (here 32 MiB against the test's
    64 MiB of staging), or (below 16 MiB) is not made and writes stay
    synchronous, with one line saying why."""
    script = ("ulimit -f %d; cd \"$1\" && echo hi > f; echo rc=$?; "
              "%s -c 'import os; fd = os.open(\"g\", os.O_WRONLY | os.O_CREAT, 0o644); "
              "print(os.write(fd, b\"x\" * 5000)); print(os.write(fd, b\"y\" * (2 << 20)))'; "
              "echo rc=$?") % (blocks, VENV_PY)
    plain, shimmed, _, _, diffs = run_plain_and_shim(
        lambda out: ["bash", "-c", script, "bash", str(out)], tmp_path)
    assert_same_trees(diffs, shimmed)
    assert shimmed.stdout == plain.stdout, "output differs:\nplain:\n%s\nshim:\n%s" % (
        plain.stdout, shimmed.describe())
    if blocks == 1024:
        assert "RLIMIT_FSIZE (1048576 bytes) leaves no room for staging" in shimmed.stderr, \
            shimmed.describe()


@HELPER_SPEED
def test_lock_taken_after_a_reopen_holds(tmp_path, delay):
    """Create and close a file, reopen it at once, lock it (fcntl and
    lockf), write: the lock holds.  The descriptor ackpt kept for the first
    state until its CLOSE was done released this process's locks when it
    was closed, later, and another process got the lock."""
    _differential(tmp_path, """
        import fcntl, os, subprocess, sys, time
        os.chdir(sys.argv[1])
        probe = ("import fcntl\\ntry:\\n    fcntl.lockf(open('%s', 'r+'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
                 "\\n    print('another process got the lock')\\nexcept OSError:\\n"
                 "    print('held')")
        for name, lock in (("a.bin", lambda fd: fcntl.lockf(fd, fcntl.LOCK_EX)),
                           ("b.bin", lambda fd: os.lockf(fd, os.F_LOCK, 0))):
            os.close(os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
            fd = os.open(name, os.O_RDWR)
            lock(fd)
            for i in range(3):
                os.write(fd, b"x" * 4096)
                time.sleep(0.1)
                subprocess.run(["env", "-u", "LD_PRELOAD", sys.executable, "-c", probe % name],
                               check=True)
            os.close(fd)
    """, delay)


@HELPER_SPEED
def test_lockf_range_starts_at_the_offset(tmp_path, delay):
    """lockf locks from the description's offset, which staged writes move
    only in ackpt's table: glibc's lockf asks the kernel directly."""
    _differential(tmp_path, """
        import fcntl, os, subprocess, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x" * 100)
        os.lockf(fd, os.F_LOCK, 10)  # bytes 100..109
        probe = ("import fcntl, os\\nf = os.open('f', os.O_RDWR)\\n"
                 "for start in (0, 100):\\n    try:\\n"
                 "        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, start)\\n"
                 "        print(start, 'free'); fcntl.lockf(f, fcntl.LOCK_UN, 10, start)\\n"
                 "    except OSError:\\n        print(start, 'locked')")
        subprocess.run(["env", "-u", "LD_PRELOAD", sys.executable, "-c", probe], check=True)
        os.close(fd)
    """, delay)


@HELPER_SPEED
def test_run_a_script_just_written(tmp_path, delay):
    """Write a script, close it, make it executable, run it: from a shell
    (another program's chmod, the shell's fork and exec) and from Python
    (created executable; chmod after the close), with subprocess.  ackpt's
    descriptor of the closed file made the exec fail with ETXTBSY."""
    _differential(tmp_path, """
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        subprocess.run(["bash", "-c", "printf '#!/bin/sh\\\\necho shell script ran\\\\n' > s.sh; "
                        "chmod +x s.sh; ./s.sh; echo rc=$?"], check=True)
        fd = os.open("a.sh", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
        os.write(fd, b"#!/bin/sh\\necho created executable\\n")
        os.close(fd)
        print(subprocess.run(["./a.sh"]).returncode, flush=True)
        with open("b.sh", "w") as f:
            f.write("#!/bin/sh\\necho chmod after the close\\n")
        os.chmod("b.sh", 0o755)
        print(subprocess.run(["./b.sh"]).returncode, flush=True)
    """, delay)


@HELPER_SPEED
@pytest.mark.parametrize("through", ["reader", "writer"])
def test_private_map_shows_later_writes(tmp_path, delay, through):
    """A private read-only map shows later writes to the pages it has not
    copied, as a shared one does: after it, the file's writes go through
    the kernel.  It showed the old bytes until the helper wrote."""
    _differential(tmp_path, """
        import mmap, os, sys
        os.chdir(sys.argv[1])
        w = os.open("p.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(w, b"A" * 8192)
        fd = os.open("p.bin", os.O_RDONLY) if sys.argv[0] == "reader" else w
        m = mmap.mmap(fd, 8192, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        print("before", m[:8])
        os.pwrite(w, b"B" * 8, 0)
        os.write(w, b"C" * 8)
        print("after", m[:8], m[8192 - 8:] if len(m) >= 8192 else None)
        os.close(w)
    """.replace('sys.argv[0] == "reader"', repr(through) + ' == "reader"'), delay)


@HELPER_SPEED
def test_pwritev2_flags_the_kernel_judges(tmp_path, delay):
    """pwritev2 flags ackpt does not emulate get the kernel's answer:
    RWF_NOWAIT, RWF_ATOMIC and RWF_DONTCACHE depend on the filesystem, a
    flag newer than ackpt (RWF_NOSIGNAL) is the kernel's to know, and
    RWF_APPEND with RWF_NOAPPEND is EINVAL.  ackpt used to accept the first
    three, refuse the fourth and take the contradictory pair."""
    _differential(tmp_path, """
        import errno, os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"a" * 100)
        flags = (("HIPRI", 0x1), ("DSYNC", 0x2), ("SYNC", 0x4), ("NOWAIT", 0x8),
                 ("APPEND", 0x10), ("NOAPPEND", 0x20), ("APPEND|NOAPPEND", 0x30),
                 ("ATOMIC", 0x40), ("DONTCACHE", 0x80), ("NOSIGNAL", 0x100),
                 ("unknown", 0x10000), ("unknown|APPEND|NOAPPEND", 0x10030))
        for name, flag in flags:
            for off in (-1, 7):
                try:
                    r = os.pwritev(fd, [name.encode(), b"."], off, flag)
                except OSError as e:
                    r = errno.errorcode[e.errno]
                print(name, off, r, "at", os.lseek(fd, 0, os.SEEK_CUR),
                      "size", os.fstat(fd).st_size)
        os.close(fd)
    """, delay)


@HELPER_SPEED
def test_lseek_past_the_largest_offset(tmp_path, delay):
    """An lseek the filesystem cannot take fails with EINVAL, as without
    ackpt, and leaves the offset where it was; one it can take moves it.
    ackpt used to accept any offset below 2^63, so the next write failed
    with EFBIG instead."""
    _differential(tmp_path, """
        import errno, os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"0123456789")
        seeks = ((1 << 40, os.SEEK_SET), ((1 << 40) + 5, os.SEEK_SET), (1 << 50, os.SEEK_SET),
                 ((1 << 63) - 1, os.SEEK_SET), (1 << 44, os.SEEK_SET), ((1 << 44) - 1, os.SEEK_SET),
                 (1 << 45, os.SEEK_END), (-(1 << 45), os.SEEK_CUR), (1 << 42, os.SEEK_CUR),
                 (20, os.SEEK_SET), ((1 << 43), os.SEEK_END))
        for off, whence in seeks:
            try:
                r = os.lseek(fd, off, whence)
            except OSError as e:
                r = errno.errorcode[e.errno]
            print(off, whence, r, "cur", os.lseek(fd, 0, os.SEEK_CUR))
            try:
                print("write", os.write(fd, b"x"))
            except OSError as e:
                print("write", errno.errorcode[e.errno])
            os.lseek(fd, 20, os.SEEK_SET)
        print("size", os.fstat(fd).st_size)
        os.ftruncate(fd, 30)
        os.close(fd)
    """, delay)


def test_blocks_of_a_sparse_file_with_staged_data(tmp_path):
    """stat's st_blocks while writes are staged: the kernel's blocks and
    the staged bytes', not the whole size's.  A 1 GiB sparse file with one
    byte pwritten at its end showed 2097152 blocks against 8.  The helper
    is slowed, so every write is still staged when stat asks; the
    estimate counts staged bytes as if none were in the file yet, so with
    some of them in it reads high, never above the whole size."""
    _differential(tmp_path, """
        import os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x" * 100000)
        os.pwrite(fd, b"y", 1 << 30)
        print("fstat", os.fstat(fd).st_blocks, "stat", os.stat("f").st_blocks)
        g = os.open("g", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(g, 1 << 30)
        os.pwrite(g, b"z" * 8192, 1 << 20)
        print("truncated then written", os.fstat(g).st_blocks)
        h = os.open("h", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for i in range(1000):
            os.write(h, b"%063d\\n" % i)
        print("appended", os.fstat(h).st_blocks)
        os.close(h)
        for f in (fd, g):  # keep the trees' comparison small
            os.ftruncate(f, 4096)
            os.close(f)
    """, True)


@HELPER_SPEED
def test_numpy_fromfile_of_a_file_just_written(tmp_path, delay):
    """np.fromfile reads through a stdio stream that numpy fdopens over a
    dup of a read-only descriptor: glibc reads inside itself, where no
    wrapper waits.  The stream now opens after the file's staged data is
    in; it read 0 or 8388607 of 10000000 values before, with no error."""
    _differential(tmp_path, """
        import os, sys
        import numpy as np
        os.chdir(sys.argv[1])
        a = np.arange(2_000_000, dtype=np.float64)
        with open("closed.bin", "wb") as f:
            a.tofile(f)
        b = np.fromfile("closed.bin")
        print("closed", b.size, b[-1] if b.size else None)
        w = open("open.bin", "wb")
        a[:1000].tofile(w)
        w.flush()
        with open("open.bin", "rb") as r:
            b = np.fromfile(r, dtype=np.float64)
        print("still open", b.size, b[-1] if b.size else None)
        w.close()
    """, delay)


@HELPER_SPEED
def test_native_stdout_into_a_managed_log(tmp_path, delay):
    """A program sends its standard output to a log (dup2 onto 1, or an
    open into a closed 1) and native code prints through glibc's stdout,
    which writes inside glibc at the kernel's offset.  Python's own lines
    were staged at ackpt's offset, so the native line overwrote the first
    one and the log lost it."""
    _differential(tmp_path, """
        import ctypes, os, sys
        os.chdir(sys.argv[1])
        libc = ctypes.CDLL(None)
        stderr = ctypes.c_void_p.in_dll(libc, "stderr")
        saved = os.dup(1), os.dup(2)
        fd = os.open("train.log", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        os.write(fd, b"before the redirection\\n")
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.write(1, b"python: step 1\\n")
        libc.puts(b"native: a warning")
        libc.fflush(None)
        os.write(2, b"python: step 2\\n")
        libc.fputs(b"native: to stderr\\n", stderr)
        os.write(1, b"python: step 3\\n")
        libc.fflush(None)
        os.close(1)
        fd = os.open("second.log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        assert fd == 1
        os.write(1, b"python: into a closed 1\\n")
        libc.puts(b"native: after it")
        libc.fflush(None)
        os.write(1, b"python: last\\n")
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        print(open("train.log").read() + open("second.log").read())
    """, delay)


@HELPER_SPEED
def test_names_made_and_listed_after_a_deferred_rename(tmp_path, delay):
    """A rename of a file with staged data is deferred until the data is
    durable.  mkdir, symlink, mkfifo, readlink, statvfs, chdir and glibc's
    own listings (scandir, glob) must see it done: mkdir of the final name
    succeeded, the helper's rename then failed, and scandir and glob still
    listed the temporary name."""
    _differential(tmp_path, """
        import ctypes, errno, os, sys
        os.chdir(sys.argv[1])
        libc = ctypes.CDLL(None, use_errno=True)
        def staged(name):
            with open(name, "wb") as f:
                f.write(b"x" * 3_000_000)
        def attempt(what, fn, *args):
            try:
                r = fn(*args)
            except OSError as e:
                r = errno.errorcode[e.errno]
            print(what, r)
        for i, (what, fn) in enumerate((("mkdir", os.mkdir), ("mkfifo", os.mkfifo),
                                        ("symlink", lambda p: os.symlink("elsewhere", p)))):
            staged("a%d.tmp" % i)
            os.rename("a%d.tmp" % i, "a%d" % i)
            attempt(what + " of the new name", fn, "a%d" % i)
            staged("b%d.tmp" % i)
            os.rename("b%d.tmp" % i, "b%d" % i)
            attempt(what + " of the old name", fn, "b%d.tmp" % i)
        os.symlink("target", "link.tmp")
        staged("c.tmp")
        os.rename("c.tmp", "c")
        os.mkdir("d.tmp")
        staged("d.tmp/f")
        os.rename("d.tmp", "d")
        attempt("chdir into the new name", os.chdir, "d")
        os.chdir("..")
        attempt("statvfs of the new name", lambda p: os.statvfs(p).f_bsize > 0, "c")
        staged("e.tmp")
        os.rename("e.tmp", "e")
        os.rename("link.tmp", "link")
        attempt("readlink", os.readlink, "link")
        staged("g.tmp")
        os.rename("g.tmp", "g")
        names = ctypes.POINTER(ctypes.c_void_p)()
        print("scandir", libc.scandir(b".", ctypes.byref(names), None, None))
        staged("h.tmp")
        os.rename("h.tmp", "h")
        buf = ctypes.create_string_buffer(256)
        print("glob", libc.glob(b"./*.tmp", 0, None, buf),
              ctypes.c_size_t.from_buffer(buf).value)
        libc.globfree(buf)
        print(sorted(os.listdir(".")))
    """, delay)


def test_a_failed_rename_of_a_closed_file_fails_the_exit(tmp_path):
    """Another program, not under ackpt, makes a directory of the final
    name while the rename waits for the file's data: the helper's rename
    fails.  The program's rename had returned 0 and the file is closed, so
    only the exit can tell: one line naming both paths, and status 1."""
    out = tmp_path / "out"
    out.mkdir()
    prog = textwrap.dedent("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        with open("ckpt.tmp", "wb") as f:
            f.write(b"x" * 3_000_000)
        os.rename("ckpt.tmp", "ckpt")
        subprocess.run(["env", "-u", "LD_PRELOAD", "mkdir", "ckpt"], check=True)
        print("done")
    """)
    r = run([VENV_PY, "-c", prog, out], shim_env(out, ACKPT_TEST_DELAY_MS=300))
    assert r.returncode == 1, r.describe()
    assert r.stdout == "done\n", r.describe()
    assert "rename of %s/ckpt.tmp to %s/ckpt failed: Is a directory" % (out, out) in r.stderr, \
        r.describe()
    assert "1 deferred rename(s) of closed files failed" in r.stderr, r.describe()
    assert (out / "ckpt.tmp").stat().st_size == 3_000_000


@HELPER_SPEED
def test_stdio_stream_buffers_as_glibc_does(tmp_path, delay):
    """A stream ackpt opens (a cookie stream) buffers what glibc's would:
    st_blksize where that is below BUFSIZ.  It buffered 8192 bytes, so
    after fwrite of 4100 bytes the file was empty, where a plain run has
    4096 bytes in it."""
    _differential(tmp_path, """
        import ctypes, os, sys
        os.chdir(sys.argv[1])
        libc = ctypes.CDLL(None)
        libc.fopen.restype = ctypes.c_void_p
        libc.fwrite.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
        libc.fclose.argtypes = [ctypes.c_void_p]
        f = libc.fopen(b"s.txt", b"w")
        for n in (100, 4000, 5000, 9000):
            libc.fwrite(b"y" * n, 1, n, f)
            print("after", n, "the file holds", os.stat("s.txt").st_size)
        libc.fclose(f)
    """, delay)


@HELPER_SPEED
def test_dlopen_a_library_just_written(tmp_path, delay):
    """A library written (not executable: 0644) and closed, then loaded:
    ld.so opens, reads and maps it inside itself, where no wrapper waits,
    and failed with "file too short".  A file whose first bytes are an ELF
    header now settles at its last close, as an executable does."""
    src = tmp_path / "answer.c"
    src.write_text("int answer(void) { return 42; }\n")
    lib = tmp_path / "libanswer.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    _differential(tmp_path, """
        import ctypes, os, sys
        os.chdir(sys.argv[1])
        elf = open(%r, "rb").read()
        for i in range(3):
            name = os.path.abspath("lib%%d.so" %% i)
            with open(name, "wb") as f:
                f.write(elf)
            print("loaded", ctypes.CDLL(name).answer())
    """ % str(lib), delay)


@HELPER_SPEED
def test_stat_through_libc_syscall(tmp_path, delay):
    """syscall(SYS_fstat, ...) and its path forms through libc's syscall()
    report the size a plain run would, as fstat does; they reported the
    kernel's size while writes were staged.  (x86-64 numbers and layout.)"""
    import platform
    if platform.machine() != "x86_64":
        pytest.skip("the program uses x86-64 system call numbers")
    _differential(tmp_path, """
        import ctypes, os, sys
        os.chdir(sys.argv[1])
        libc = ctypes.CDLL(None)
        libc.syscall.restype = ctypes.c_long
        buf = ctypes.create_string_buffer(256)
        def size(nr, *args):
            r = libc.syscall(ctypes.c_long(nr), *args, buf, ctypes.c_long(0))
            return r, ctypes.c_int64.from_buffer(buf, 48).value
        fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"x" * 3_000_000)
        print("fstat", size(5, ctypes.c_long(fd)))
        print("stat", size(4, ctypes.c_char_p(b"f")))
        print("lstat", size(6, ctypes.c_char_p(b"f")))
        print("newfstatat", size(262, ctypes.c_long(-100), ctypes.c_char_p(b"f")))
        os.close(fd)
    """, delay)


@HELPER_SPEED
def test_tree_walks_report_staged_sizes(tmp_path, delay):
    """nftw, ftw and fts stat each file inside glibc: a file with staged
    data, closed or still open, showed size 0."""
    prog = compile_c("walk_sizes.c", tmp_path / "bin")
    differential(tmp_path, lambda out: ["bash", "-c", "%s %s | sort" % (prog, out)],
                 delay_ms=100 if delay else None)
