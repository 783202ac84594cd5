"""One process, the less common corners of the file API: signals during a
write and writes after the helper failed a file.  Each program runs without
and under the shim; files and output must match, or (for injected faults,
which a plain run cannot have) no byte reported as written may be missing.
"""
import subprocess

import pytest

from faultutil import (assert_same_trees, need_shim, run, run_plain_and_shim, shim_env)
from conftest import VENV_PY


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


SIGNAL_PROG = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int fd;

static void on_term(int s) { (void)s; exit(0); }
static void on_usr1(int s) { (void)s; write(fd, "H", 1); }

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
	write(fd, "E", 1);
	return close(fd) ? 4 : 0;
}
"""


@pytest.fixture(scope="module")
def signal_prog(tmp_path_factory):
    d = tmp_path_factory.mktemp("sigprog")
    (d / "sig.c").write_text(SIGNAL_PROG)
    subprocess.run(["cc", "-O1", "-o", str(d / "sig"), str(d / "sig.c")], check=True)
    return d / "sig"


@pytest.mark.parametrize("kind", ["term", "usr1"])
def test_signal_sees_a_write_as_one_call(tmp_path, signal_prog, kind):
    """exit() from a SIGTERM handler during a 64 MiB write leaves all 64 MiB;
    a handler's own write() lands after the interrupted one.  The helper is
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
    src = tmp_path / "forkflush.c"
    src.write_text(FORK_FLUSH_PROG)
    exe = tmp_path / "forkflush"
    subprocess.run(["cc", "-O1", "-pthread", "-o", str(exe), str(src)], check=True)
    _, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [exe, out / "log.txt"], tmp_path,
                                                 timeout=60)
    assert_same_trees(diffs, shimmed)
