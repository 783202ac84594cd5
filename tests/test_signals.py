"""Signals that arrive during a managed write are held until it is staged,
without a system call per write (docs/DESIGN.md 3.8, src/shim/signals.c).

Programs run without and under the shim; what they print and the files they
write must match byte for byte.  They check what a handler receives
(si_code, si_value, si_pid), that the program sees its own dispositions
(sigaction, signal, SA_RESETHAND), that queued real-time signals are all
delivered, and strace shows that small writes make no rt_sigprocmask call.
"""
import subprocess

import pytest

from faultutil import assert_same_trees, need_shim, run_plain_and_shim, traced_plain_and_shim


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


HOLD_PROG = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int fd;
static volatile sig_atomic_t usr1, rt, usr2;
static int code_ok = 1, value_sum, pid_ok = 1;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
	char rec[32];
	int n = snprintf(rec, sizeof(rec), "[H%d]", si->si_value.sival_int);

	(void)sig; (void)uc;
	if (si->si_code != SI_QUEUE)
		code_ok = 0;
	if (si->si_pid != getpid())
		pid_ok = 0;
	write(fd, rec, n); /* lands after the write it interrupted */
	usr1++;
}

static void on_rt(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	value_sum += si->si_value.sival_int;
	rt++;
}

static void on_usr2(int sig) { (void)sig; usr2++; }

/* sends signals to the main thread while it writes */
static void *sender(void *arg)
{
	pthread_t main_thread = *(pthread_t *)arg;
	int i;

	for (i = 0; i < 200; i++) {
		union sigval v = { .sival_int = i };

		pthread_sigqueue(main_thread, SIGUSR1, v);
		pthread_sigqueue(main_thread, SIGRTMIN, v);
		usleep(100);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction a = { .sa_sigaction = on_usr1, .sa_flags = SA_SIGINFO | SA_RESTART }, old;
	char path[4096], rec[64];
	pthread_t self = pthread_self(), t;
	int i, expect = 0;

	sigemptyset(&a.sa_mask);
	sigaction(SIGUSR1, &a, NULL);
	snprintf(path, sizeof(path), "%s/log.bin", argv[1]);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	/* installed after the session started (the open above) */
	a.sa_sigaction = on_rt;
	sigaction(SIGRTMIN, &a, NULL);
	/* the program's own view of its dispositions */
	sigaction(SIGUSR1, NULL, &old);
	printf("usr1 is mine %d, flags %s\n", old.sa_sigaction == on_usr1,
	       (old.sa_flags & (SA_SIGINFO | SA_RESTART)) == (SA_SIGINFO | SA_RESTART) ? "kept" : "lost");
	printf("signal() returned %s\n", signal(SIGUSR2, on_usr2) == SIG_DFL ? "SIG_DFL" : "?");
	printf("signal() returns mine %d\n", signal(SIGUSR2, on_usr2) == on_usr2);
	a.sa_handler = on_usr2;
	a.sa_flags = SA_RESETHAND;
	sigaction(SIGUSR2, &a, NULL);
	raise(SIGUSR2);
	sigaction(SIGUSR2, NULL, &old);
	printf("SA_RESETHAND: ran %d, now %s\n", (int)usr2,
	       old.sa_handler == SIG_DFL ? "SIG_DFL" : "still set");

	pthread_create(&t, NULL, sender, &self);
	for (i = 0; i < 200000; i++) {
		int n = snprintf(rec, sizeof(rec), "record %06d\n", i);

		if (write(fd, rec, n) != n)
			return 3;
	}
	pthread_join(t, NULL);
	for (i = 0; i < 200; i++)
		expect += i;
	while (rt < 200 || usr1 < 1)
		usleep(1000);
	printf("rt signals %d, values %s\n", (int)rt, value_sum == expect ? "all" : "missing");
	printf("usr1 si_code %s, si_pid %s\n", code_ok ? "SI_QUEUE" : "changed",
	       pid_ok ? "mine" : "changed");
	return close(fd) ? 4 : 0;
}
"""


@pytest.fixture(scope="module")
def hold_prog(tmp_path_factory):
    d = tmp_path_factory.mktemp("sigs")
    (d / "hold.c").write_text(HOLD_PROG)
    subprocess.run(["cc", "-O1", "-pthread", "-o", str(d / "hold"), str(d / "hold.c")],
                   check=True)
    return d / "hold"


def _records_intact(data):
    """Every record, in order, each whole; handlers' [H..] marks only
    between records (a mark inside a record would be a torn write)."""
    text = data.decode()
    import re
    marks = re.findall(r"\[H\d+\]", text)
    bare = re.sub(r"\[H\d+\]", "", text)
    want = "".join("record %06d\n" % i for i in range(200000))
    # marks before the last record: handlers that ran while the loop wrote
    inside = len(re.findall(r"\[H\d+\]", text[:text.rfind("record")]))
    return bare == want, inside


def test_signals_held_during_writes(tmp_path, hold_prog):
    """Handlers run between writes, never inside one, and get what the
    sender sent; the program sees its own dispositions."""
    plain, shimmed, _, _, diffs = run_plain_and_shim(lambda out: [hold_prog, out], tmp_path)
    assert shimmed.stdout == plain.stdout, "output differs:\nplain:\n%s\nshim:\n%s" % (
        plain.stdout, shimmed.describe())
    for want in ("usr1 is mine 1, flags kept", "signal() returned SIG_DFL",
                 "signal() returns mine 1", "SA_RESETHAND: ran 1, now SIG_DFL",
                 "rt signals 200, values all", "usr1 si_code SI_QUEUE, si_pid mine"):
        assert want in plain.stdout, (want, plain.stdout)
    # the file differs between runs only in where the handlers' marks fell
    for label in ("plain", "shim"):
        ok, inside = _records_intact((tmp_path / label / "out" / "log.bin").read_bytes())
        assert ok, "%s: a handler's write landed inside a record" % label
        assert inside >= 10, "%s: only %d handlers ran during the writes" % (label, inside)
    del diffs


SMALL_PROG = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static void on_usr1(int sig) { (void)sig; }

int main(int argc, char **argv)
{
	char path[4096];
	int fd, i;

	signal(SIGUSR1, on_usr1);
	snprintf(path, sizeof(path), "%s/small.bin", argv[1]);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	for (i = 0; i < 2000; i++)
		if (write(fd, "0123456789abcdef", 16) != 16)
			return 1;
	return close(fd) ? 1 : 0;
}
"""


def test_small_writes_touch_no_signal_mask(tmp_path):
    """2000 managed writes with a handler installed: no rt_sigprocmask per
    write (a plain run makes none either), and the same file."""
    _, shimmed, diffs, traces, pids = traced_plain_and_shim(tmp_path, "small", SMALL_PROG,
                                                            "rt_sigprocmask")
    assert_same_trees(diffs, shimmed)
    calls = traces["shim"]
    masks = [c for c in calls if c.pid in pids and c.name == "rt_sigprocmask"]
    assert len(masks) < 50, "%d rt_sigprocmask calls for 2000 writes" % len(masks)


CPYTHON = "/usr/bin/python3.11"
CPYTHON_SIGNAL = r"""
import signal, sys, unittest
# as in a foreground run: a harness started in the background ignores SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)
# a managed file first, so the session (and ackpt's handlers) is up
# before the first test installs anything
with open(sys.argv[1] + "/session.txt", "w") as f:
    f.write("x" * 4096)
    f.flush()
import test.test_signal as t
r = unittest.main(module=t, argv=["test_signal"], exit=False, verbosity=0).result
print("ran", r.testsRun, "failures", len(r.failures), "errors", len(r.errors),
      "skipped", len(r.skipped))
"""


def test_cpython_test_signal(tmp_path):
    """CPython's own test_signal, in a process whose session started first:
    the same outcome as without ackpt.  (Its subprocess tests run vfork
    children that reset every handler in our memory's view; the parent's
    must stay its own.)"""
    import os
    from conftest import _truthy
    r = subprocess.run([CPYTHON, "-c", "import test.test_signal"], capture_output=True)
    if r.returncode != 0:
        reason = "%s with its test package is needed (libpython3.11-testsuite)" % CPYTHON
        if _truthy(os.environ.get("CI")):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    plain, shimmed, _, _, _ = run_plain_and_shim(
        lambda out: [CPYTHON, "-c", CPYTHON_SIGNAL, out], tmp_path, timeout=300)
    # (the tests print timer resolutions, which differ run to run)
    summary = [[ln for ln in r.stdout.splitlines() if ln.startswith("ran ")] for r in (plain, shimmed)]
    assert summary[0] and summary[1] == summary[0], "plain:\n%s\nshim:\n%s" % (
        plain.stdout, shimmed.describe(6000))
    assert "failures 0 errors 0" in summary[0][0], plain.describe(6000)
