"""Other processes looking at, or writing to, a managed file see what a
synchronous run shows them (docs/DESIGN.md, 3.4 shared descriptions, 3.5
deferred renames, 3.6 exit and 3.7 markers).

Each case is a small program (shell, Python) run twice: without the shim and
under it with the helper slowed down (ACKPT_TEST_DELAY_MS), so that staged
data is still in flight when the second process acts.  The output trees must
be identical byte for byte, and so must what the program printed.
"""
import os

import pytest

from conftest import VENV_PY
from faultutil import differential, need_shim, py_argv


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


def _differential(tmp_path, argv_builder, extra=None, timeout=60, delay=True):
    """delay=False: the helper at full speed, with write-through on."""
    return differential(tmp_path, argv_builder, delay_ms=150 if delay else None, extra=extra,
                        timeout=timeout)


def _sh(shell, script):
    return lambda out: [shell, "-c", "cd %s && %s" % (out, script)]


_py = py_argv


# ---- shared offsets -----------------------------------------------------

SHELL_GROUP = "{ echo a; /bin/echo b; echo c; printf 'd\\n'; /bin/echo e; } > f; cat f"


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_shell_group_redirection(tmp_path, shell):
    """Builtins and exec'd commands share the shell's description of f."""
    _differential(tmp_path, _sh(shell, SHELL_GROUP))


def test_fork_child_writes_between(tmp_path):
    """AAAA, a forked child's BBBB through the inherited fd, then CCCC."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"A" * 70000)
        pid = os.fork()
        if pid == 0:
            os.write(fd, b"B" * 5000)
            print("child sees", os.lseek(fd, 0, os.SEEK_CUR), os.fstat(fd).st_size, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent sees", os.lseek(fd, 0, os.SEEK_CUR), os.fstat(fd).st_size)
        os.write(fd, b"C" * 3000)
        os.close(fd)
    """))


def test_subprocess_stdout_between_writes(tmp_path):
    """f.write, subprocess.run(stdout=f) (vfork + dup2 + exec), f.write."""
    _differential(tmp_path, _py("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        with open("log", "w") as f:
            f.write("first line\\n" * 5000)
            f.flush()
            subprocess.run(["echo", "from the child"], stdout=f, check=True)
            f.write("last line\\n")
    """))


def test_posix_spawn_dup2(tmp_path):
    """posix_spawn with a file action that dups a managed fd onto stdout."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.write(fd, b"x" * 100000)
        pid = os.posix_spawn("/bin/echo", ["echo", "spawned"], os.environ,
                             file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1)])
        os.waitpid(pid, 0)
        os.write(fd, b"tail\\n")
        os.close(fd)
    """))


def test_scm_rights_receiver_writes(tmp_path):
    """A descriptor passed over SCM_RIGHTS and written by the receiver."""
    _differential(tmp_path, _py("""
        import os, socket, sys
        os.chdir(sys.argv[1])
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            a.close()
            msg, fds, _, _ = socket.recv_fds(b, 16, 1)
            os.write(fds[0], b"R" * 4096)
            b.send(b"k")
            os._exit(0)
        b.close()
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"S" * 50000)
        socket.send_fds(a, [b"x"], [fd])
        a.recv(1)
        os.waitpid(pid, 0)
        os.write(fd, b"E" * 10)
        os.close(fd)
    """))


def test_append_child(tmp_path):
    """An O_APPEND description written by parent and child in turn."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for i in range(3):
            os.write(fd, b"P%d" % i * 20000)
            pid = os.fork()
            if pid == 0:
                os.write(fd, b"C%d\\n" % i)
                os._exit(0)
            os.waitpid(pid, 0)
        os.close(fd)
    """))


def test_two_opens_append_interleave(tmp_path):
    """Two processes, two O_APPEND opens, taking turns through pipes."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        pid = os.fork()
        if pid == 0:
            fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            for i in range(3):
                os.read(r1, 1)
                os.write(fd, b"C%d " % i)
                os.write(w2, b"k")
            os.close(fd)
            os._exit(0)
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for i in range(3):
            os.write(fd, b"P%d " % i + b"p" * 30000)
            os.write(w1, b"k")
            os.read(r2, 1)
        os.close(fd)
        os.waitpid(pid, 0)
    """))


def test_later_writer_wins(tmp_path):
    """B writes after A's write returned, and knows it (a pipe): B's bytes win,
    though A's are still staged, whether B is A's child or another program."""
    _differential(tmp_path, _py("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"A" * 300000)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.read(r, 1)
            g = os.open("f", os.O_WRONLY)
            os.pwrite(g, b"B" * 1000, 5000)
            os.close(g)
            os._exit(0)
        os.write(w, b"k")
        os.waitpid(pid, 0)
        subprocess.run(["dd", "of=f", "bs=1", "seek=9000", "conv=notrunc", "status=none"],
                       input=b"C" * 100, check=True)
        os.pwrite(fd, b"D" * 10, 9050)
        os.close(fd)
    """))


def test_child_stat_and_read(tmp_path):
    """A forked child and coreutils stat see the size a plain run shows."""
    _differential(tmp_path, _py("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        with open("big.bin", "wb") as f:
            f.write(b"z" * (1 << 20))
            f.flush()
            pid = os.fork()
            if pid == 0:
                print("child", os.stat("big.bin").st_size, flush=True)
                with open("big.bin", "rb") as g:
                    print("child read", len(g.read()), flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
            print(subprocess.run(["stat", "-c", "%s", "big.bin"], capture_output=True,
                                 text=True).stdout.strip())
    """))


def test_reader_opened_before_another_process_writes(tmp_path):
    """A descriptor opened for reading before another process staged its
    writes reads them once that process's write has returned and said so:
    after the writer closed the file, and while it still holds it open.
    Checked for read, pread, readinto, sendfile and copy_file_range
    (docs/DESIGN.md 3.3)."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        for name in ("closed.bin", "open.bin"):
            open(name, "wb").close()
        fds = {n: os.open(n, os.O_RDONLY) for n in ("closed.bin", "open.bin")}
        r, w = os.pipe()
        back_r, back_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            with open("closed.bin", "r+b") as f:
                f.write(b"c" * 300000)
            g = open("open.bin", "r+b")
            g.write(b"o" * 200000)
            g.flush()
            os.write(w, b"k")
            os.read(back_r, 1)   # hold it open until the parent has read
            g.close()
            os._exit(0)
        os.read(r, 1)
        for n, fd in fds.items():
            data = os.read(fd, 1 << 20)
            more = os.pread(fd, 1 << 20, 0)
            buf = bytearray(100)
            os.lseek(fd, 5, os.SEEK_SET)
            got = os.readv(fd, [buf])
            print(n, len(data), len(more), got, bytes(buf[:3]), os.fstat(fd).st_size)
            os.lseek(fd, 0, os.SEEK_SET)
            with open(n + ".copy", "wb") as out:
                print("copied", os.copy_file_range(fd, out.fileno(), 1 << 20))
            with open(n + ".sent", "wb") as out:
                print("sent", os.sendfile(out.fileno(), fd, 0, 1 << 20))
        os.write(back_w, b"k")
        os.waitpid(pid, 0)
    """))


# ---- the size after another process changed the file -------------------
#
# Once our writes are in the file, its size is the kernel's: another process
# may have grown or cut it since, through a descriptor we gave it or by name,
# even while our CLOSE is still pending.  An append, SEEK_END or stat that
# used the size we last knew put the parent's line over the child's.

SLOW = pytest.mark.parametrize("delay", [True, False], ids=["slow-helper", "fast-helper"])


@SLOW
def test_reopen_append_after_subprocess_wrote(tmp_path, delay):
    """A child writes the log through stdout=f; the parent closes it,
    reopens it in "a" mode at once and appends (the child's line was lost)."""
    _differential(tmp_path, _py("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        with open("log", "w") as f:
            subprocess.run(["echo", "output of the child"], stdout=f, check=True)
        print("size after close", os.stat("log").st_size)
        with open("log", "a") as f:
            print("tell after open('a')", f.tell())
            f.write("appended by the parent\\n")
        print(repr(open("log").read()))
    """), delay=delay)


@SLOW
def test_size_after_forked_child_grew_it(tmp_path, delay):
    """The parent writes 1 MiB; a forked child pwrites 4 MiB through the
    inherited descriptor; the parent closes, stats, reopens with O_APPEND
    and appends."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"A" * (1 << 20))
        pid = os.fork()
        if pid == 0:
            os.pwrite(fd, b"B" * (4 << 20), 0)
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(fd)
        print("stat", os.stat("f").st_size)
        fd = os.open("f", os.O_WRONLY | os.O_APPEND)
        print("fstat", os.fstat(fd).st_size, "end", os.lseek(fd, 0, os.SEEK_END))
        os.write(fd, b"Z")
        os.close(fd)
        print("final", os.stat("f").st_size)
    """), delay=delay)


@SLOW
@pytest.mark.parametrize("preload", [True, False], ids=["other-shimmed", "other-plain"])
def test_append_after_another_program_appended(tmp_path, delay, preload):
    """Two O_APPEND descriptors of the parent's; another program appends by
    name in between (under the shim, or without it), and the parent appends
    through one at once, then through the other after closing the first.
    The parent reads the file first, which waits for its own bytes: a
    program without the shim sees only what is in the file."""
    prefix = [] if preload else ["env", "-u", "LD_PRELOAD"]
    _differential(tmp_path, _py("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        a = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        b = os.open("f", os.O_WRONLY | os.O_APPEND)
        os.write(a, b"A" * 10)
        print("read", len(open("f", "rb").read()))
        subprocess.run(%r + ["sh", "-c", "printf '%%0100d' 0 >> f"], check=True)
        os.write(a, b"Y")
        os.close(a)
        os.write(b, b"Z")
        print("end", os.lseek(b, 0, os.SEEK_END), "size", os.fstat(b).st_size)
        os.close(b)
        print(repr(open("f", "rb").read()))
    """ % prefix), delay=delay)


@SLOW
@pytest.mark.parametrize("to", [0, 3])
def test_append_after_another_program_truncated(tmp_path, delay, to):
    """The parent writes 10 bytes and keeps the file open; truncate(1) cuts
    it; the parent closes and appends (a hole of zeros appeared)."""
    _differential(tmp_path, _py("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        fd = os.open("f", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"A" * 10)
        subprocess.run(["truncate", "-s", "%d", "f"], check=True)
        os.close(fd)
        with open("f", "ab") as f:
            print("tell", f.tell())
            f.write(b"Z")
        print(repr(open("f", "rb").read()))
    """ % to), delay=delay)


# ---- commit markers ------------------------------------------------------

MARKER_SCRIPTS = [
    "/bin/echo 7 > latest_checkpointed_iteration.txt",
    "printf 'step 3\\n' > x && cat x > latest",
    "date -u -d @0 > metadata.json",
    "exec 3> latest && /bin/echo 9 >&3",
    "exec > latest && exec /bin/echo 11",
    "exec > latest && echo 12 && exec /bin/echo 13",
]


@pytest.mark.parametrize("script", MARKER_SCRIPTS)
def test_marker_written_by_exec(tmp_path, script):
    """A marker written by an exec'd command (shell redirection) is committed,
    with the bytes the command wrote, and no temporary is left."""
    _differential(tmp_path, _sh("/bin/sh", script))


def test_marker_visible_to_the_next_command(tmp_path):
    """After a save, the next command lists the marker under its final name."""
    _differential(tmp_path, _py("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        with open("data.bin", "wb") as f:
            f.write(b"d" * (4 << 20))
        with open("latest", "w") as f:
            f.write("1\\n")
        print(subprocess.run(["ls", "-a"], capture_output=True, text=True).stdout)
        print(subprocess.run(["cat", "latest"], capture_output=True, text=True).stdout)
    """))


def test_rename_visible_to_other_processes(tmp_path):
    """After a deferred rename, a child, ls and stat see the new name only."""
    _differential(tmp_path, _py("""
        import os, subprocess, sys
        os.chdir(sys.argv[1])
        os.mkdir("tmp")
        with open("tmp/model.pt", "wb") as f:
            f.write(b"w" * (4 << 20))
        os.rename("tmp/model.pt", "model.pt")
        for cmd in (["ls", "-a", ".", "tmp"], ["stat", "-c", "%n %s", "model.pt"],
                    ["sh", "-c", "test -e tmp/model.pt && echo old-name-exists; "
                     "chmod 600 model.pt && echo chmod-ok; rmdir tmp && echo rmdir-ok"]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            print(r.returncode, r.stdout, r.stderr)
    """))


def test_marker_left_open_at_exit(tmp_path):
    """A marker descriptor still open at exit() is committed."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        with open("data.bin", "wb") as f:
            f.write(b"d" * 200000)
        fd = os.open("latest", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"12\\n")
        sys.exit(0)
    """))


def test_marker_killed_before_the_helper_saw_it(tmp_path):
    """SIGKILL after a marker's hidden temporary was created and before the
    op telling the helper of it went out (strace kills the program as it
    enters that sendmsg): the helper, which learned the name first, removes
    the temporary when it exits, so the directory holds what a plain run
    killed at that point would hold, plus nothing (docs/DESIGN.md 3.7)."""
    import shutil
    import subprocess
    from faultutil import shim_env, wait_helpers
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    d = tmp_path / "ckpt"
    d.mkdir()
    env = shim_env(d)
    lib = env.pop("LD_PRELOAD")
    trace = tmp_path / "strace.txt"
    argv = ["strace", "-o", str(trace), "-e", "trace=openat,sendmsg",
            "-e", "inject=sendmsg:signal=SIGKILL:when=1", "env", "LD_PRELOAD=" + lib, VENV_PY,
            "-c", "f = open('latest', 'w'); f.write('7'); f.close()"]
    r = subprocess.run(argv, cwd=str(d), env=env, capture_output=True, text=True, timeout=60)
    wait_helpers(env["ACKPT_TEST_MARK"])
    log = trace.read_text()
    assert r.returncode in (-9, 137), (r.returncode, r.stderr, log[-2000:])
    assert ".latest.ackpt." in log and "O_CREAT" in log, "the temporary was never created:\n" + log[-2000:]
    assert "killed by SIGKILL" in log, log[-2000:]
    left = sorted(os.listdir(d))
    assert left == [], "left behind: %s" % left


# ---- names after a deferred rename ---------------------------------------

@pytest.mark.parametrize("into", [False, True])
def test_rmdir_after_deferred_rename(tmp_path, into):
    """rmdir right after a file was renamed out of (succeeds) or into (ENOTEMPTY)
    the directory answers as in a plain run, and no data is left behind."""
    src, dst = ("model.tmp", "d/model.pt") if into else ("d/model.pt", "model.pt")
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        os.mkdir("d")
        with open(%r, "wb") as f:
            f.write(b"m" * 300000)
        os.rename(%r, %r)
        try:
            os.rmdir("d")
            print("rmdir ok")
        except OSError as e:
            print("rmdir", e.errno)
        print(sorted(os.listdir(".")), sorted(os.listdir("d")) if os.path.isdir("d") else None)
    """ % (src, src, dst)))


def test_move_then_chmod(tmp_path):
    """fsspec's local commit: move the temporary, then chmod the new name."""
    _differential(tmp_path, _py("""
        import os, shutil, sys
        os.chdir(sys.argv[1])
        with open("ck.tmp", "wb") as f:
            f.write(b"c" * 300000)
        shutil.move("ck.tmp", "ck.ckpt")
        os.chmod("ck.ckpt", 0o640)
        os.utime("ck.ckpt", (1000000, 1000000))
        st = os.stat("ck.ckpt")
        print(oct(st.st_mode), st.st_size, st.st_mtime, os.access("ck.ckpt", os.R_OK))
    """))


# ---- exec -------------------------------------------------------------

def test_exec_after_cloexec_writes(tmp_path):
    """Every managed fd was O_CLOEXEC; the exec'd image reads complete data."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        with open("big.bin", "wb") as f:          # Python's fds are O_CLOEXEC
            f.write(bytes(range(256)) * 8192)
        sys.stdout.flush()
        os.execv("/usr/bin/sha256sum", ["sha256sum", "big.bin"])
    """))


def test_posix_spawn_truncating_open(tmp_path):
    """A posix_spawn file action opens a file with staged data with O_TRUNC:
    the older staged bytes must not land on top of the child's output."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        with open("f", "wb") as f:
            f.write(b"old" * 300000)
        pid = os.posix_spawn("/bin/echo", ["echo", "new"], os.environ,
                             file_actions=[(os.POSIX_SPAWN_OPEN, 1, "f",
                                            os.O_WRONLY | os.O_TRUNC, 0o644)])
        os.waitpid(pid, 0)
        print(open("f").read())
    """))


# ---- the shim's own processes and descriptors ------------------------------

def test_no_sigchld_from_the_helper(tmp_path):
    """Starting the helper sends the program no SIGCHLD, and its wait() finds
    no child of ours."""
    _differential(tmp_path, _py("""
        import os, signal, sys, time
        os.chdir(sys.argv[1])
        got = []
        signal.signal(signal.SIGCHLD, lambda s, f: got.append(s))
        with open("f.bin", "wb") as f:
            f.write(b"x" * 100000)
        time.sleep(0.3)
        try:
            print("wait", os.waitpid(-1, os.WNOHANG))
        except ChildProcessError as e:
            print("wait", e.errno)
        print("sigchld", len(got))
    """))


def test_descriptor_count(tmp_path):
    """A program that lists /proc/self/fd sees what it opened, during and after writes."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        before = sorted(os.listdir("/proc/self/fd"))
        f = open("f.bin", "wb")
        f.write(b"x" * 100000)
        f.flush()
        during = sorted(os.listdir("/proc/self/fd"))
        f.close()
        after = sorted(os.listdir("/proc/self/fd"))
        print(len(during) - len(before), len(after) - len(before), before == after)
    """))


def test_dup2_onto_high_numbers(tmp_path):
    """dup2 onto the numbers the shim uses for itself (1000 and up): the
    program's writes go where it says, the managed file keeps its data."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        fd = os.open("managed.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"m" * 200000)
        other = os.open("other.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for n in range(1000, 1006):
            os.dup2(other, n)
            os.write(n, b"%d\\n" % n)
            os.close(n)
        os.write(fd, b"M" * 1000)
        os.close(fd)
        os.close(other)
    """), extra={"ACKPT_TEST_DELAY_MS": 20})  # each small write is one delayed chunk


def test_failed_dup2_keeps_the_target(tmp_path):
    """A dup2 that fails (EBADF) leaves the managed target descriptor as it was."""
    _differential(tmp_path, _py("""
        import os, sys
        os.chdir(sys.argv[1])
        fd = os.open("f.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"a" * 100000)
        try:
            os.dup2(987, fd)
        except OSError as e:
            print("dup2", e.errno)
        os.write(fd, b"b" * 1000)
        os.close(fd)
    """))


def test_raw_close_then_reuse(tmp_path):
    """syscall(SYS_close) on a managed fd, then a pipe gets that number: the
    pipe's writes must reach the pipe, not the old file's staging."""
    _differential(tmp_path, _py("""
        import ctypes, os, sys
        os.chdir(sys.argv[1])
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open("old.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, b"o" * 100000)
        r, w0 = os.pipe()
        print("close", libc.syscall(3, fd))
        w = os.dup(w0)                        # takes the number back
        print("same number", w == fd)
        os.write(w, b"through the pipe")
        print(os.read(r, 100))
        os.close(r)
        os.close(w)
    """), timeout=30)
