"""The op ring and the lazy kernel offset (docs/DESIGN.md 3.21).

A staged write sends its op through shared memory and moves only the
shim's offset: no sendmsg and no lseek reach the kernel for it.  Every
place the kernel's offset can be seen must still show what a plain run
shows: a read through the same description, syscall(2), sendfile with no
offset, a lock relative to SEEK_CUR, /proc/self/fdinfo, a forked child, an
exec'd shell.  Each program runs without and under the shim (the helper
slowed down, so data is still staged); output and files must match byte for
byte.  strace shows what the program asked of the kernel.
"""
import subprocess

import pytest

from faultutil import (assert_same_trees, helper_pid_set, need_shim, run_plain_and_shim,
                       traced_plain_and_shim)


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


OFFSETS_PROG = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void say(const char *what, long v) { printf("%s %ld\n", what, v); fflush(stdout); }

static void fdinfo_pos(int fd)
{
	char p[64], line[256];
	FILE *f;

	snprintf(p, sizeof(p), "/proc/self/fdinfo/%d", fd);
	f = fopen(p, "r");
	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, "pos:", 4))
			printf("fdinfo %s", line + 4);
	if (f)
		fclose(f);
	fflush(stdout);
}

int main(int argc, char **argv)
{
	char path[4096], buf[64];
	struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_CUR, .l_start = 2, .l_len = 5 };
	int fd, other, i;
	pid_t pid;

	snprintf(path, sizeof(path), "%s/data.bin", argv[1]);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	for (i = 0; i < 200; i++)
		write(fd, "0123456789abcdef", 16);            /* at 3200 */
	say("lseek", lseek(fd, 0, SEEK_CUR));
	fdinfo_pos(fd);
	lseek(fd, 100, SEEK_SET);
	write(fd, "WXYZ", 4);                                 /* at 104 */
	say("read", read(fd, buf, 6));                        /* the kernel reads at 104 */
	printf("got %.6s\n", buf);
	write(fd, "++", 2);                                   /* at 112 */
	say("syscall read", syscall(SYS_read, fd, buf, 3));  /* at 115 */
	printf("got %.3s\n", buf);
	say("syscall lseek", syscall(SYS_lseek, fd, 0, SEEK_CUR));
	write(fd, "--", 2);                                   /* at 117 */
	fflush(stdout);
	say("sendfile", sendfile(1, fd, NULL, 5));            /* bytes 117..121 */
	printf("\n");
	write(fd, "!!", 2);                                   /* at 124 */
	fcntl(fd, F_OFD_SETLK, &fl);                          /* bytes 126..130 */
	other = open(path, O_RDWR);
	fl = (struct flock){ .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0 };
	fcntl(other, F_OFD_GETLK, &fl);
	say("lock at", (long)fl.l_start);
	close(other);
	write(fd, "<>", 2);                                   /* at 126 */
	pid = fork();
	if (pid == 0) {
		write(fd, "child", 5);                        /* at 128, through the kernel */
		_exit(0);
	}
	waitpid(pid, NULL, 0);
	write(fd, "parent", 6);                               /* at 133 */
	lseek(fd, 3000, SEEK_SET);
	write(fd, "end", 3);                                  /* at 3003 */
	dup2(fd, 3);
	system("printf 'shell' >&3");                         /* at 3003 */
	say("after shell", lseek(fd, 0, SEEK_CUR));
	fdinfo_pos(fd);
	return 0;
}
"""


@pytest.fixture(scope="module")
def offsets_prog(tmp_path_factory):
    d = tmp_path_factory.mktemp("offsets")
    (d / "offsets.c").write_text(OFFSETS_PROG)
    subprocess.run(["cc", "-O1", "-o", str(d / "offsets"), str(d / "offsets.c")], check=True)
    return d / "offsets"


def test_kernel_offset_where_it_shows(tmp_path, offsets_prog):
    """Reads, syscall(2), sendfile, SEEK_CUR locks, fdinfo, fork and exec
    all find the offset a plain run has, though staged writes never lseek."""
    plain, shimmed, _, _, diffs = run_plain_and_shim(
        lambda out: [offsets_prog, out], tmp_path, shim_extra={"ACKPT_TEST_DELAY_MS": 50})
    assert_same_trees(diffs, shimmed)
    assert shimmed.stdout == plain.stdout, "output differs:\nplain:\n%s\nshim:\n%s" % (
        plain.stdout, shimmed.describe())
    # the case must have reached every point it checks
    for what in ("lseek 3200", "fdinfo \t3200", "read 6", "syscall read 3", "sendfile 5",
                 "lock at 126", "after shell 3008"):
        assert what in plain.stdout, (what, plain.stdout)


SMALL_WRITES_PROG = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	char path[4096], rec[64];
	int fd, i;

	snprintf(path, sizeof(path), "%s/log.bin", argv[1]);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	for (i = 0; i < 3000; i++) {
		int n = snprintf(rec, sizeof(rec), "record %06d\n", i);

		if (write(fd, rec, n) != n)
			return 1;
	}
	return close(fd) ? 1 : 0;
}
"""


def test_small_writes_make_no_system_call(tmp_path):
    """3000 small writes: the same file as a plain run, and the program
    itself asks the kernel for no write, lseek or sendmsg per write (the
    ring, and the offset kept lazily); the helper merges them into a few
    writes."""
    # the pwrite pool, not io_uring, so that the helper's writes show too
    _, shimmed, diffs, traces, prog_pids = traced_plain_and_shim(
        tmp_path, "small", SMALL_WRITES_PROG, "write,pwrite64,lseek,sendmsg",
        shim_extra={"ACKPT_IO": "pool"})
    assert_same_trees(diffs, shimmed)
    calls = traces["shim"]
    mine = [c for c in calls if c.pid in prog_pids]
    to_file = [c for c in mine if c.name in ("write", "pwrite64") and "log.bin" in c.args]
    lseeks = [c for c in mine if c.name == "lseek"]
    sends = [c for c in mine if c.name == "sendmsg"]
    assert not to_file, "the program wrote the file itself: %s" % to_file[:3]
    assert len(lseeks) <= 2, "lseek per write: %d calls" % len(lseeks)
    # one for the OPEN's descriptor, and a bell now and then
    assert len(sends) < 100, "sendmsg per write: %d calls" % len(sends)
    helpers = helper_pid_set(calls)
    helper_writes = [c for c in calls if c.pid in helpers and
                     c.name in ("write", "pwrite64") and "log.bin" in c.args]
    plain_writes = [c for c in traces["plain"] if c.name == "write" and "log.bin" in c.args]
    assert len(plain_writes) == 3000
    # records that queue up behind one another go out together (how many
    # queue depends on the two processes' pace)
    assert 0 < len(helper_writes) < len(plain_writes)
