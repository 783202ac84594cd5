"""One process, the less common corners of the file API: signals during a
write and writes after the helper failed a file.  Each program runs without
and under the shim; files and output must match, or (for injected faults,
which a plain run cannot have) no byte reported as written may be missing.
"""
import os
import subprocess

import pytest

from faultutil import (assert_same_trees, need_shim, plain_env, run, run_plain_and_shim,
                       shim_env)
from conftest import VENV_PY


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


def compile_c(d, name, src, *flags):
    """Build a test program from its source text; returns its path."""
    (d / (name + ".c")).write_text(src)
    subprocess.run(["cc", "-O1", *flags, "-o", str(d / name), str(d / (name + ".c"))], check=True)
    return d / name


SIGNAL_PROG = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int fd;
static volatile sig_atomic_t got;

static void on_term(int s) { (void)s; exit(0); }
static void on_usr1(int s) { (void)s; write(fd, "H", 1); got = 1; }

int main(int argc, char **argv)
{
	size_t len = (size_t)64 << 20;
	char *buf = malloc(len);
	struct sigevent ev = { .sigev_notify = SIGEV_SIGNAL };
	struct itimerspec its = { .it_value = { 0, 20 * 1000 * 1000 } };
	timer_t t;

	memset(buf, 'x', len);
	fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	signal(SIGTERM, on_term);
	signal(SIGUSR1, on_usr1);
	ev.sigev_signo = strcmp(argv[2], "term") ? SIGUSR1 : SIGTERM;
	timer_create(CLOCK_MONOTONIC, &ev, &t);
	write(fd, "S", 1);
	timer_settime(t, 0, &its, NULL);
	if (write(fd, buf, len) != (ssize_t)len)
		return 3;
	if (!strcmp(argv[2], "term"))
		pause(); /* the handler exits, before or after the write */
	while (!got) {
		/* a plain run may finish the write before the timer fires:
		 * wait for the handler, so both runs write its byte */
		struct timespec ts = { 0, 1000000 };

		nanosleep(&ts, NULL);
	}
	write(fd, "E", 1);
	return close(fd) ? 4 : 0;
}
"""


@pytest.fixture(scope="module")
def signal_prog(tmp_path_factory):
    return compile_c(tmp_path_factory.mktemp("sigprog"), "sig", SIGNAL_PROG)


@pytest.mark.parametrize("kind", ["term", "usr1"])
def test_signal_sees_a_write_as_one_call(tmp_path, signal_prog, kind):
    """exit() from a SIGTERM handler during a 64 MiB write leaves all 64 MiB;
    a handler's own write() lands after the interrupted one (the program
    waits for the handler, so a plain run that finishes its write before the
    timer fires writes the handler's byte too).  The helper is
    slowed and staging is small, so the write waits for space while the
    signal arrives."""
    _, shimmed, _, _, diffs = run_plain_and_shim(
        lambda out: [signal_prog, out / "f.bin", kind], tmp_path, staging="16M",
        shim_extra={"ACKPT_TEST_DELAY_MS": 20})
    assert_same_trees(diffs, shimmed)


def test_no_write_succeeds_after_a_dropped_one(tmp_path):
    """The helper fails the file's first write (ACKPT_FAULT).  From then on it
    drops the file's data, so every later write, fsync and close must fail:
    no write may report success for bytes that never reach the file."""
    out = tmp_path / "ckpt"
    out.mkdir()
    prog = tmp_path / "after_error.py"
    prog.write_text(
        "import ctypes, errno, os, sys\n"
        "path = sys.argv[1]\n"
        "fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
        "os.write(fd, b'a' * (1 << 20))\n"
        "ctypes.CDLL(None).ackpt_wait(ctypes.c_double(30.0))\n"
        "ok = []\n"
        "for i in range(4):\n"
        "    off = os.lseek(fd, 0, os.SEEK_CUR)\n"
        "    try:\n"
        "        n = os.write(fd, bytes([ord('b') + i]) * 8192)\n"
        "        ok.append((off, n, i))\n"
        "    except OSError as e:\n"
        "        print('write', errno.errorcode[e.errno])\n"
        "try:\n"
        "    os.close(fd)\n"
        "    print('close ok')\n"
        "except OSError as e:\n"
        "    print('close', errno.errorcode[e.errno])\n"
        "print('OK', ok, flush=True)\n")
    res = run([VENV_PY, prog, out / "data.bin"],
              shim_env(out, ACKPT_FAULT="op=write,nth=1,err=EIO,mode=once"))
    assert res.returncode == 0, res.describe()
    lines = res.stdout.split("\n")
    ok = eval(next(ln for ln in lines if ln.startswith("OK "))[3:])
    data = (out / "data.bin").read_bytes()
    for off, n, i in ok:
        assert data[off:off + n] == bytes([ord('b') + i]) * n, (
            "write %d reported %d bytes at %d that are not in the file\n%s"
            % (i, n, off, res.describe()))
    assert lines.count("write EIO") == 4 and "close EIO" in lines, res.describe()


FORK_FLUSH_PROG = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static FILE *f;

static void *writer(void *arg)
{
	(void)arg;
	for (int i = 0; i < 3000; i++) {
		fprintf(f, "line %d\n", i);
		fflush(NULL);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t;

	f = fopen(argv[1], "w");
	pthread_create(&t, NULL, writer, NULL);
	for (int i = 0; i < 300; i++) {
		pid_t p = fork();

		if (p == 0)
			_exit(0);
		waitpid(p, NULL, 0);
	}
	pthread_join(t, NULL);
	return fclose(f) ? 1 : 0;
}
"""


def test_fork_while_another_thread_flushes(tmp_path):
    """fork() concurrent with fflush(NULL) on a managed stream never deadlocks
    (the atfork handler and glibc's stream-list lock in opposite orders)."""
    exe = compile_c(tmp_path, "forkflush", FORK_FLUSH_PROG, "-pthread")
    _, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [exe, out / "log.txt"], tmp_path,
                                                 timeout=60)
    assert_same_trees(diffs, shimmed)


MODES_PROG = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_APPEND
#define RWF_APPEND 0x10
#endif
#ifndef RWF_NOAPPEND
#define RWF_NOAPPEND 0x20
#endif

static void say(const char *what, long r)
{
	printf("%s: %ld%s%s\n", what, r, r < 0 ? " " : "", r < 0 ? strerror(errno) : "");
}

int main(int argc, char **argv)
{
	char buf[64];
	FILE *f;
	int fd;

	if (chdir(argv[1]))
		return 2;

	/* a fresh O_APPEND descriptor starts at 0; a write moves it to the end */
	fd = open("append.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	write(fd, "0123456789", 10);
	close(fd);
	fd = open("append.bin", O_WRONLY | O_APPEND);
	say("fresh O_APPEND offset", lseek(fd, 0, SEEK_CUR));
	say("append write", write(fd, "ab", 2));
	say("offset after", lseek(fd, 0, SEEK_CUR));
	say("pwrite on O_APPEND appends", pwrite(fd, "PW", 2, 0));
	close(fd);

	/* pwritev2 flags */
	fd = open("rwf.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	write(fd, "aaaaaaaaaa", 10);
	{
		struct iovec v = { "XY", 2 };

		say("RWF_APPEND", pwritev2(fd, &v, 1, 0, RWF_APPEND));
		say("offset after RWF_APPEND at 0", lseek(fd, 0, SEEK_CUR));
		say("RWF_APPEND at -1", pwritev2(fd, &v, 1, -1, RWF_APPEND));
		say("offset after RWF_APPEND at -1", lseek(fd, 0, SEEK_CUR));
		say("unknown flag", pwritev2(fd, &v, 1, 0, 0x40000000));
	}
	close(fd);
	fd = open("rwf.bin", O_WRONLY | O_APPEND);
	{
		struct iovec v = { "NA", 2 };
		long r = pwritev2(fd, &v, 1, 1, RWF_NOAPPEND);

		/* EOPNOTSUPP before Linux 6.9: either way, the same as plain */
		say("RWF_NOAPPEND", r);
	}
	close(fd);

	/* fdopen(fd, "a") sets O_APPEND on the description */
	fd = open("fdopen.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	write(fd, "123", 3);
	lseek(fd, 0, SEEK_SET);
	f = fdopen(fd, "a");
	say("fdopen a: O_APPEND set", !!(fcntl(fd, F_GETFL) & O_APPEND));
	say("fdopen a: ftell", ftell(f));
	fputs("45", f);
	fclose(f);

	/* "a+" does not seek; "a" does */
	f = fopen("aplus.bin", "w");
	fputs("hello", f);
	fclose(f);
	f = fopen("aplus.bin", "a+");
	say("a+ ftell", ftell(f));
	fputs("!", f);
	say("a+ ftell after write", ftell(f));
	fclose(f);
	f = fopen("aplus.bin", "a");
	say("a ftell", ftell(f));
	fclose(f);

	/* one write moves at most 0x7ffff000 bytes */
	{
		size_t big = 0x80000000ul;
		char *p = mmap(NULL, big, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

		fd = open("cap.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
		say("2 GiB write", write(fd, p, big));
		close(fd);
		truncate("cap.bin", 16); /* keep the output tree small */
		munmap(p, big);
	}

	/* RLIMIT_FSIZE: EFBIG at the call (SIGXFSZ ignored) */
	{
		struct rlimit rl = { 1 << 20, 1 << 20 };

		signal(SIGXFSZ, SIG_IGN);
		setrlimit(RLIMIT_FSIZE, &rl);
		fd = open("fsize.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
		say("write within the limit", write(fd, "x", 1));
		say("pwrite past RLIMIT_FSIZE", pwrite(fd, "y", 1, 2 << 20));
		say("pwrite straddling it", pwrite(fd, buf, 64, (1 << 20) - 16));
		say("pwrite at LLONG_MAX", pwrite(fd, "z", 1, LLONG_MAX));
		close(fd);
	}

	/* past the filesystem's largest file (ext4: 16 TiB): EFBIG at the call */
	{
		struct rlimit rl = { RLIM_INFINITY, RLIM_INFINITY };

		setrlimit(RLIMIT_FSIZE, &rl);
		fd = open("huge.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
		say("pwrite at 64 TiB", pwrite(fd, "z", 1, 64ll << 40));
		close(fd);
	}
	return 0;
}
"""


@pytest.fixture(scope="module")
def modes_prog(tmp_path_factory):
    return compile_c(tmp_path_factory.mktemp("modes"), "modes", MODES_PROG)


def test_flags_and_modes(tmp_path, modes_prog):
    """O_APPEND offsets, pwritev2 RWF_APPEND/RWF_NOAPPEND, fdopen "a", "a"
    and "a+" streams, the one-call write cap and EFBIG at the call."""
    plain, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [modes_prog, out], tmp_path,
                                                     shim_extra={"ACKPT_TEST_DELAY_MS": 50})
    assert_same_trees(diffs, shimmed)
    assert shimmed.stdout == plain.stdout, "plain:\n%s\nshim:\n%s" % (plain.stdout, shimmed.stdout)


STREAMS_PROG = r"""
#define _GNU_SOURCE
#include <aio.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	FILE *f;
	char *m;
	int fd;

	if (chdir(argv[1]))
		return 2;

	/* freopen of a stream opened on a managed path */
	f = fopen("first.txt", "w");
	fputs("to the first file\n", f);
	f = freopen("second.txt", "w", f);
	if (!f)
		return 3;
	fputs("to the second file\n", f);
	f = freopen(NULL, "a", f);
	fputs("appended\n", f);
	fclose(f);

	/* ftruncate that grows a mapped file, then a store into the new part */
	fd = open("grow.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
	write(fd, "0123456789", 10);
	m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED)
		return 4;
	ftruncate(fd, 8192);
	m[5000] = 'S';
	munmap(m, 8192);
	close(fd);

	/* a store through an existing shared map after a pwrite ends in program order */
	fd = open("order.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
	ftruncate(fd, 4096);
	m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	pwrite(fd, "written", 7, 100);
	memcpy(m + 100, "STORED", 6);
	munmap(m, 4096);
	close(fd);

	/* POSIX AIO after a write to the same range */
	fd = open("aio.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
	{
		static char big[1 << 20];
		struct aiocb cb = { 0 };
		const struct aiocb *list[1] = { &cb };

		memset(big, 'w', sizeof(big));
		write(fd, big, sizeof(big));
		cb.aio_fildes = fd;
		cb.aio_buf = "AIO";
		cb.aio_nbytes = 3;
		cb.aio_offset = 10;
		aio_write(&cb);
		aio_suspend(list, 1, NULL);
		printf("aio: %zd\n", aio_return(&cb));
	}
	close(fd);
	return 0;
}
"""


def test_streams_and_maps(tmp_path):
    """freopen of a managed stream; ftruncate growing a mapped file; a store
    through a shared map after a pwrite; aio_write after a write."""
    exe = compile_c(tmp_path, "streams", STREAMS_PROG)
    plain, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [exe, out], tmp_path,
                                                     shim_extra={"ACKPT_TEST_DELAY_MS": 50})
    assert_same_trees(diffs, shimmed)
    assert shimmed.stdout == plain.stdout


ATTRS_PROG = r"""
import os, shutil, sys, time
os.chdir(sys.argv[1])

# stat while the data is in flight: mtime moved by the write, blocks allocated
fd = os.open("f.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
time.sleep(0.05)
t0 = time.time()
time.sleep(0.05)
os.write(fd, b"x" * (1 << 20))
st = os.fstat(fd)
print("mtime moved", st.st_mtime >= t0, "ctime moved", st.st_ctime >= t0,
      "blocks cover size", st.st_blocks * 512 >= st.st_size)
os.close(fd)

# times set after the data survive (cp -p, shutil.copy2, tar, zip)
with open("g.bin", "wb") as g:
    g.write(b"y" * (1 << 20))
    g.flush()
    os.utime(g.fileno(), (1000000, 1000000))
os.utime("f.bin", ns=(2000000000, 2000000000))
shutil.copy2("f.bin", "copy.bin")
os.chmod("copy.bin", 0o600)
print("sizes", os.stat("copy.bin").st_size)

# a marker rewritten with O_TRUNC keeps owner, group, mode and xattrs
with open("latest", "w") as m:
    m.write("1\n")
os.chown("latest", 65534, 65534)
os.chmod("latest", 0o640)
try:
    os.setxattr("latest", "user.ackpt_test", b"kept")
except OSError:
    pass
with open("latest", "w") as m:
    m.write("2\n")
"""


def test_attributes_after_data(tmp_path):
    """stat's mtime, ctime and blocks while data is in flight; times and
    modes set after the data survive the helper's writes; a rewritten
    marker keeps owner, group, mode and xattrs."""
    prog = tmp_path / "attrs.py"
    prog.write_text(ATTRS_PROG)
    plain, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [VENV_PY, prog, out], tmp_path,
                                                     shim_extra={"ACKPT_TEST_DELAY_MS": 100})
    assert_same_trees(diffs, shimmed)
    assert shimmed.stdout == plain.stdout, (plain.stdout, shimmed.stdout)

    def attrs(out):
        res = {}
        for name in ("f.bin", "g.bin", "copy.bin", "latest"):
            st = os.stat(out / name)
            try:
                x = os.getxattr(out / name, "user.ackpt_test")
            except OSError:
                x = None
            res[name] = (st.st_mtime_ns, st.st_uid, st.st_gid, oct(st.st_mode), x)
        return res
    p, s = attrs(tmp_path / "plain" / "out"), attrs(tmp_path / "shim" / "out")
    # the marker's mtime is its own write time in both runs
    p["latest"], s["latest"] = p["latest"][1:], s["latest"][1:]
    assert p == s, (p, s)


def test_helper_dies_after_performing_a_rename(tmp_path):
    """The helper performs a deferred rename and is killed before it says so
    (strace kills it at its first fsync after the rename).  The program
    replays the rename synchronously: finding it done is success, not a
    spurious ENOENT that would fail the run."""
    import shutil
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    from conftest import HELPER
    prog = tmp_path / "rn.py"
    prog.write_text(
        "import os, sys\n"
        "os.chdir(sys.argv[1])\n"
        "with open('a.tmp', 'wb') as f:\n"
        "    f.write(b'a' * (4 << 20))\n"
        "    f.flush()\n"
        "    os.rename('a.tmp', 'model.pt')  # still open: the replay reports on it\n"
        "with open('c.bin', 'wb') as f:\n"
        "    f.write(b'c' * 4096)\n"
        "print(os.stat('model.pt').st_size)\n")

    def wrapper(name, inject):
        wrap, trace = tmp_path / (name + ".sh"), tmp_path / (name + ".strace")
        wrap.write_text("#!/bin/sh\nexec strace -D -f -qq -o %s -e trace=rename,fsync %s %s \"$@\"\n"
                        % (trace, inject, HELPER))
        wrap.chmod(0o755)
        return wrap, trace

    # the kill must land on the helper's first fsync after the rename.  strace
    # counts fsyncs, so a calibration run finds how many come before it; under
    # load that number can change between runs, so a kill that landed
    # elsewhere is tried again (each try must still match the plain run)
    for attempt in range(4):
        wrap, trace = wrapper("calibrate%d" % attempt, "")
        out = tmp_path / ("calibrate%d" % attempt)
        out.mkdir()
        r = run([VENV_PY, prog, out], shim_env(out, ACKPT_TEST_DELAY_MS=100, ACKPT_HELPER=wrap))
        assert r.returncode == 0, r.describe()
        lines = trace.read_text().splitlines()
        at = next(i for i, ln in enumerate(lines) if " rename(" in ln)
        k = sum(1 for ln in lines[:at] if " fsync(" in ln) + 1

        wrap, trace = wrapper("kill%d" % attempt, "-e inject=fsync:signal=SIGKILL:when=%d" % k)
        plain, shimmed, _, _, diffs = run_plain_and_shim(
            lambda out: [VENV_PY, prog, out], tmp_path / ("try%d" % attempt),
            shim_extra={"ACKPT_TEST_DELAY_MS": 100, "ACKPT_HELPER": wrap})
        assert_same_trees(diffs, shimmed)
        assert shimmed.stdout == plain.stdout
        lines = trace.read_text().splitlines()
        at = [i for i, ln in enumerate(lines) if " rename(" in ln]
        if at and "fsync(" in lines[at[0] + 1] and "= ?" in lines[at[0] + 1]:
            return
    pytest.fail("the helper was not killed right after its rename in 4 tries:\n" +
                "\n".join(lines))


BAD_BUFFER_PROG = r"""
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

static void on_segv(int s)
{
	static const char m[] = "the program's handler ran\\n";

	(void)s;
	write(1, m, sizeof(m) - 1);
	_exit(3);
}

static void say(const char *what, ssize_t r)
{
	printf("%s: %zd %s\\n", what, r, r < 0 ? strerror(errno) : "");
}

int main(int argc, char **argv)
{
	char *p = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	volatile long bad = 8;
	struct iovec v[2];
	int fd;

	if (chdir(argv[1]))
		return 2;
	memset(p, 'g', 3 * 4096);
	mprotect(p + 4096, 4096, PROT_NONE);
	fd = open("f.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	write(fd, "start", 5);
	say("unmapped", write(fd, (void *)bad, 100));
	say("PROT_NONE", write(fd, p + 4096, 10));
	say("straddling a bad page", write(fd, p, 3 * 4096));
	say("pwrite", pwrite(fd, p + 4096, 10, 0));
	v[0].iov_base = p;
	v[0].iov_len = 100;
	v[1].iov_base = p + 4096;
	v[1].iov_len = 100;
	say("writev, second bad", writev(fd, v, 2));
	printf("offset %ld\\n", (long)lseek(fd, 0, SEEK_CUR));
	fflush(stdout);
	close(fd);
	/* the program's own SIGSEGV handler still gets its own faults */
	signal(SIGSEGV, on_segv);
	printf("signal() returns the program's handler: %d\\n", signal(SIGSEGV, on_segv) == on_segv);
	fflush(stdout);
	*(volatile char *)(p + 4096) = 1;
	return 0;
}
"""

FAULTHANDLER_PROG = """
import ctypes, faulthandler, os, signal, sys
os.chdir(sys.argv[1])
with open("f.bin", "wb") as f:
    f.write(b"x" * 1000)
signal.signal(signal.SIGSEGV, signal.SIG_IGN)
os.kill(os.getpid(), signal.SIGSEGV)
print("an ignored SIGSEGV sent by kill is ignored", flush=True)
signal.signal(signal.SIGSEGV, signal.SIG_DFL)
faulthandler.enable()
print("faulthandler on", flush=True)
ctypes.string_at(0)
"""


def test_bad_buffers_give_efault(tmp_path):
    """write, pwrite and writev from a bad pointer return EFAULT (or the bytes
    before the bad page) as the kernel does, instead of SIGSEGV in the shim;
    the program's own SIGSEGV handler still sees its own faults."""
    exe = compile_c(tmp_path, "bad", BAD_BUFFER_PROG, "-w")
    outs = {}
    for label in ("plain", "shim"):
        out = tmp_path / label
        out.mkdir()
        env = plain_env() if label == "plain" else shim_env(out)
        r = run([exe, out], env)
        outs[label] = (r.returncode, r.stdout)
    assert outs["plain"][0] == 3 and outs["shim"] == outs["plain"], outs
    assert (tmp_path / "plain" / "f.bin").read_bytes() == (tmp_path / "shim" / "f.bin").read_bytes()


def test_signal_dispositions_are_the_programs(tmp_path):
    """Python's faulthandler and an ignored SIGSEGV behave as without ackpt,
    though ackpt handles SIGSEGV to turn bad buffers into EFAULT."""
    prog = tmp_path / "fh.py"
    prog.write_text(FAULTHANDLER_PROG)
    outs = {}
    for label in ("plain", "shim"):
        out = tmp_path / label
        out.mkdir()
        env = plain_env() if label == "plain" else shim_env(out)
        r = run([VENV_PY, prog, out], env)
        outs[label] = (r.returncode, r.stdout, "Fatal Python error: Segmentation fault" in r.stderr)
    assert outs["plain"][0] == -11 and outs["plain"][2], outs
    assert outs["shim"] == outs["plain"], outs


VFORK_SIGACTION_PROG = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void h(int sig) { (void)sig; }

/* what sigaction reads back for sig, as one letter: the program's handler,
 * the default, or something else */
static char look(int sig)
{
	struct sigaction a;

	if (sigaction(sig, NULL, &a) < 0)
		return 'E';
	return a.sa_handler == h ? 'h' : a.sa_handler == SIG_DFL ? 'D' : '?';
}

int main(int argc, char **argv)
{
	static char buf[1 << 20];
	static const int sigs[] = { SIGSEGV, SIGBUS, SIGUSR1, SIGTERM };
	/* the child writes them in memory it shares with us: not in registers */
	static volatile char seen[64];
	static volatile int n;
	char path[4096];
	int fd, i, st;
	pid_t pid;

	(void)argc;
	snprintf(path, sizeof(path), "%s/f.bin", argv[1]);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, buf, sizeof(buf)) != sizeof(buf))
		return 2; /* the session starts: ackpt now runs its own handlers */
	for (i = 0; i < 4; i++)
		signal(sigs[i], h);
	/* CPython's subprocess: the vfork child resets handlers before exec */
	pid = vfork();
	if (pid == 0) {
		for (i = 0; i < 4; i++) {
			seen[n++] = look(sigs[i]);
			signal(sigs[i], SIG_DFL);
			seen[n++] = look(sigs[i]);
		}
		_exit(0);
	}
	waitpid(pid, &st, 0);
	seen[n++] = '|';
	for (i = 0; i < 4; i++)
		seen[n++] = look(sigs[i]);
	seen[n++] = '\n';
	return write(fd, (const char *)seen, n) == n && close(fd) == 0 ? 0 : 3;
}
"""


def test_vfork_child_reads_back_its_own_dispositions(tmp_path):
    """In a vfork child, sigaction reads back what the child set (the
    kernel's), or the parent's handler where the child has not changed it,
    for the signals ackpt runs itself (SIGSEGV and SIGBUS for EFAULT, the
    others held during a write); the parent's stay its own."""
    exe = compile_c(tmp_path, "vfsig", VFORK_SIGACTION_PROG)
    plain, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [exe, out], tmp_path)
    assert_same_trees(diffs, shimmed)
    tail = (tmp_path / "shim" / "out" / "f.bin").read_bytes()[1 << 20:]
    assert tail == b"hDhDhDhD|hhhh\n", tail


APPEND_0444_PROG = """
import fcntl, os, sys, time
os.chdir(sys.argv[1])
fd = os.open("ro.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o444)
for i in range(5):
    os.write(fd, b"line %d\\n" % i * 3000)
os.pwrite(fd, b"pwrite appends\\n", 0)
time.sleep(0.5)  # the helper has had the file for a while
print("O_APPEND kept", bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND))
print("offset", os.lseek(fd, 0, os.SEEK_CUR))
pid = os.fork()
if pid == 0:
    os.pwrite(fd, b"the child's pwrite appends too\\n", 0)
    os._exit(0)
os.waitpid(pid, 0)
os.close(fd)
"""


def test_append_to_a_0444_file_unprivileged(tmp_path):
    """A non-root program's O_APPEND on a file it created 0444: the helper
    cannot open the file again, and must neither strip O_APPEND from the
    program's description nor lose append semantics."""
    import shutil
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    nobody = 65534
    prog = tmp_path / "ro.py"
    prog.write_text(APPEND_0444_PROG)
    os.chmod(tmp_path, 0o755)
    for p in tmp_path.parents:
        if str(p).startswith("/tmp/"):
            os.chmod(p, 0o755)
    setpriv = ["setpriv", "--reuid=%d" % nobody, "--regid=%d" % nobody, "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all"]

    def wrap(label, argv, base):
        for d in (base, base / "out"):
            os.chown(d, nobody, nobody)
        return setpriv + argv
    plain, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [VENV_PY, prog, out], tmp_path,
                                                     shim_extra={"ACKPT_TEST_DELAY_MS": 50},
                                                     wrap=wrap)
    assert_same_trees(diffs, shimmed)
    assert shimmed.stdout == plain.stdout, (plain.stdout, shimmed.stdout)
