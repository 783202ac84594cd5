"""Threads that write at once (docs/DESIGN.md 3.22): large copies into
staging run outside the session lock, and a program must still observe
what the kernel gives it.

One program runs without and under the shim; its output and every file it
leaves must match byte for byte:
- four threads writing their own files (write, pwrite, writev, lseek, large
  and small) while the main thread forks a child that writes too;
- four threads writing through one shared description: each write stays
  one whole block and the file's size is their sum (the kernel's position
  lock), checked by the program itself;
- threads pwriting disjoint ranges of one file;
- a close from another thread while a 48 MiB write is being copied: the
  write completes and all of it lands, as with the kernel's file reference;
- a bad page in the middle of one thread's large write while another
  thread writes: the bytes before it, then the next write goes on from
  there.
Under the shim the program also reads ackpt_get_stats: copies did overlap.
Two more tests: SIGKILL while threads copy (every write that returned
lands), and the last close during another thread's large write reports the
file's write error.
"""
import pytest

from faultutil import assert_same_trees, need_shim, run_plain_and_shim
from test_posix_corners import compile_c

PROG = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MiB (1u << 20)
#define NT 4

static char *src;          /* 64 MiB of pattern */
static size_t src_len = 64 * MiB;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static char results[NT][512];

static void fail(const char *what)
{
	perror(what);
	exit(2);
}

/* four threads, four files: every kind of write, large and small */
static void *own_file(void *arg)
{
	int id = (int)(intptr_t)arg, fd, k;
	char name[32], *r = results[id];
	struct iovec iov[3] = { { src + 11, 300 << 10 }, { src + 5, 1 }, { src + 99, 5 * MiB } };
	size_t n = 0;

	snprintf(name, sizeof(name), "own%d.bin", id);
	fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		fail("open own");
	n += snprintf(r + n, 512 - n, "%zd ", write(fd, src + id * 7, 3 * MiB + 1));
	n += snprintf(r + n, 512 - n, "%zd ", write(fd, src + id, 100));
	n += snprintf(r + n, 512 - n, "%zd ", pwrite(fd, src + 5 + id, 17 * MiB, MiB + 3));
	n += snprintf(r + n, 512 - n, "%zd ", writev(fd, iov, 3));
	for (k = 0; k < 20; k++)
		if (write(fd, src + k * 4099 + id, 300 << 10) != 300 << 10)
			fail("write 300K");
	n += snprintf(r + n, 512 - n, "%lld ", (long long)lseek(fd, 2 * MiB + 17, SEEK_SET));
	n += snprintf(r + n, 512 - n, "%zd ", write(fd, src + 1234 * id, 2 * MiB));
	n += snprintf(r + n, 512 - n, "%lld ", (long long)lseek(fd, 0, SEEK_CUR));
	n += snprintf(r + n, 512 - n, "%lld", (long long)lseek(fd, 0, SEEK_END));
	if (close(fd))
		fail("close own");
	return NULL;
}

/* one description, four threads: each write is one whole block */
static int shared_fd;
static void *shared_writer(void *arg)
{
	int id = (int)(intptr_t)arg, k;

	for (k = 0; k < 6; k++) {
		unsigned char tag = (unsigned char)(1 + id * 16 + k);
		size_t len = (512 << 10) + tag * 4096 + tag;
		char *b = malloc(len);

		memset(b, tag, len);
		if (write(shared_fd, b, len) != (ssize_t)len)
			fail("shared write");
		free(b);
	}
	return NULL;
}

static void check_shared(void)
{
	int fd = open("shared.bin", O_RDONLY), seen[256] = { 0 }, blocks = 0, i;
	off_t size = lseek(fd, 0, SEEK_END), at = 0;
	char *m = size > 0 ? mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;

	if (m == MAP_FAILED)
		fail("map shared");
	while (at < size) {
		unsigned char tag = (unsigned char)m[at];
		size_t len = (512 << 10) + tag * 4096 + tag, j;

		if (!tag || seen[tag] || at + (off_t)len > size) {
			printf("shared: bad block %u at %lld\n", tag, (long long)at);
			exit(3);
		}
		for (j = 0; j < len; j++)
			if ((unsigned char)m[at + j] != tag) {
				printf("shared: block %u torn at %lld\n", tag, (long long)(at + j));
				exit(3);
			}
		seen[tag] = 1;
		blocks++;
		at += len;
	}
	printf("shared: %d whole blocks, %lld bytes:", blocks, (long long)size);
	for (i = 0; i < 256; i++)
		if (seen[i])
			printf(" %d", i);
	printf("\n");
	munmap(m, size);
	close(fd);
	unlink("shared.bin"); /* its order is the scheduler's */
}

/* disjoint ranges of one file */
static int pw_fd;
static void *pwriter(void *arg)
{
	int id = (int)(intptr_t)arg, k;

	for (k = 0; k < 8; k++) {
		off_t off = (off_t)(k * NT + id) * MiB + id * 13;

		if (pwrite(pw_fd, src + k * 8191 + id, MiB - 100, off) != MiB - 100)
			fail("pwrite");
	}
	return NULL;
}

/* a write that another thread's close overtakes */
static int close_fd;
static volatile int started;
static ssize_t close_ret;
static void *long_writer(void *arg)
{
	(void)arg;
	started = 1;
	close_ret = write(close_fd, src + 3, 48 * MiB);
	return NULL;
}

/* a bad page in one thread's large write */
static char *holey;
static ssize_t bad_ret[2];
static void *bad_writer(void *arg)
{
	int fd = open("holey.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);

	(void)arg;
	bad_ret[0] = write(fd, holey, 12 * MiB);
	bad_ret[1] = write(fd, src, 3 * MiB);
	close(fd);
	return NULL;
}
static void *good_writer(void *arg)
{
	int fd = open("beside.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644), k;

	(void)arg;
	for (k = 0; k < 4; k++)
		write(fd, src + k, 6 * MiB);
	close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t[NT];
	struct timespec ms3 = { 0, 3000000 };
	size_t i;
	int k, st;
	pid_t c;

	if (chdir(argv[1]))
		fail("chdir");
	src = malloc(src_len);
	for (i = 0; i < src_len; i++)
		src[i] = (char)(i * 131 + (i >> 12) + (i >> 20));

	for (k = 0; k < NT; k++)
		pthread_create(&t[k], NULL, own_file, (void *)(intptr_t)k);
	c = fork();
	if (c == 0) {
		int fd = open("child.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);

		write(fd, src + 77, 5 * MiB);
		close(fd);
		_exit(0);
	}
	waitpid(c, &st, 0);
	for (k = 0; k < NT; k++)
		pthread_join(t[k], NULL);
	for (k = 0; k < NT; k++)
		printf("own%d: %s\n", k, results[k]);
	printf("child: %d\n", st);

	shared_fd = open("shared.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	for (k = 0; k < NT; k++)
		pthread_create(&t[k], NULL, shared_writer, (void *)(intptr_t)k);
	for (k = 0; k < NT; k++)
		pthread_join(t[k], NULL);
	printf("shared offset: %lld\n", (long long)lseek(shared_fd, 0, SEEK_CUR));
	close(shared_fd);
	check_shared();

	pw_fd = open("pw.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	for (k = 0; k < NT; k++)
		pthread_create(&t[k], NULL, pwriter, (void *)(intptr_t)k);
	for (k = 0; k < NT; k++)
		pthread_join(t[k], NULL);
	printf("pw offset: %lld\n", (long long)lseek(pw_fd, 0, SEEK_CUR));
	close(pw_fd);

	close_fd = open("closed.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	pthread_create(&t[0], NULL, long_writer, NULL);
	while (!started)
		;
	nanosleep(&ms3, NULL);
	printf("close meanwhile: %d\n", close(close_fd));
	pthread_join(t[0], NULL);
	printf("long write: %zd\n", close_ret);

	holey = mmap(NULL, 12 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memcpy(holey, src, 12 * MiB);
	mprotect(holey + 5 * MiB + 8192, 4096, PROT_NONE);
	pthread_create(&t[0], NULL, bad_writer, NULL);
	pthread_create(&t[1], NULL, good_writer, NULL);
	pthread_join(t[0], NULL);
	pthread_join(t[1], NULL);
	printf("bad page: %zd, then %zd\n", bad_ret[0], bad_ret[1]);

	if (argc > 2) {
		/* the shim's figure, when it is there: did copies overlap? */
		int (*get)(void *, size_t) = (int (*)(void *, size_t))dlsym(RTLD_DEFAULT, "ackpt_get_stats");
		uint64_t s[32] = { 0 };
		FILE *f = fopen(argv[2], "w");

		if (get && get(s, sizeof(s)) == 0)
			fprintf(f, "%llu\n", (unsigned long long)s[15]);
		fclose(f);
	}
	return 0;
}
"""


@pytest.mark.parametrize("copy_threads", ["0", "1"])
def test_threads_writing_at_once(tmp_path, copy_threads):
    need_shim()
    exe = compile_c(tmp_path, "threads", PROG, "-pthread", "-ldl")
    figure = tmp_path / "overlapped.txt"
    plain, shim, _, _, diffs = run_plain_and_shim(
        lambda out: [exe, out, figure], tmp_path, staging="512M",
        shim_extra={"ACKPT_WRITE_THROUGH": "off", "ACKPT_COPY_THREADS": copy_threads})
    assert_same_trees(diffs, shim)
    assert shim.stdout == plain.stdout, (plain.stdout, shim.stdout)
    assert "close meanwhile: 0" in plain.stdout and "long write: %d" % (48 << 20) in plain.stdout
    overlapped = int(figure.read_text())
    assert overlapped > 0, "no two staging copies overlapped: they still take turns"


KILL_PROG = r"""
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NT 4
static char *src;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* each thread appends to its own file; after each write returns, one line
 * "thread bytes" on stdout (a pipe: not a managed file) says what it has */
static void *writer(void *arg)
{
	int id = (int)(intptr_t)arg, fd;
	char name[32];
	size_t at = 0, k;

	snprintf(name, sizeof(name), "k%d.bin", id);
	fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	for (k = 0;; k++) {
		/* 300 KiB to 5 MiB, and now and then a small one */
		size_t len = k % 5 == 4 ? 100 + k : (300u << 10) + (k * 977 % 5) * (1u << 20);

		if (at + len > (64u << 20))
			break;
		if (write(fd, src + at, len) != (ssize_t)len)
			exit(3);
		at += len;
		pthread_mutex_lock(&lock);
		printf("%d %zu\n", id, at);
		fflush(stdout);
		pthread_mutex_unlock(&lock);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t[NT];
	size_t i;
	int k;

	if (chdir(argv[1]))
		return 2;
	src = malloc(64u << 20);
	for (i = 0; i < (64u << 20); i++)
		src[i] = (char)(i * 7 + (i >> 11));
	for (k = 0; k < NT; k++)
		pthread_create(&t[k], NULL, writer, (void *)(intptr_t)k);
	for (k = 0; k < NT; k++)
		pthread_join(t[k], NULL);
	pause(); /* the test kills us */
	return 0;
}
"""


@pytest.mark.parametrize("after", [0.0, 0.01, 0.03])
def test_kill_while_threads_copy(tmp_path, after):
    """SIGKILL while four threads copy large writes outside the lock: every
    write that returned is in its file once the helper is done (the helper
    drops only the record of a copy the kill cut short, whose write never
    returned).  The kill comes 0 to 30 ms after the first write returned."""
    import os
    import signal
    import subprocess
    import time

    from faultutil import new_mark, shim_env, wait_helpers

    need_shim()
    exe = compile_c(tmp_path, "killthreads", KILL_PROG, "-pthread")
    out = tmp_path / "out"
    out.mkdir()
    mark = new_mark()
    env = shim_env(out, mark=mark, staging="256M", ACKPT_WRITE_THROUGH="off")
    p = subprocess.Popen([str(exe), str(out)], env=env, stdout=subprocess.PIPE, text=True)
    first = p.stdout.readline()  # the first write has returned: the threads are at it
    time.sleep(after)
    p.send_signal(signal.SIGKILL)
    lines, _ = p.communicate(timeout=60)
    lines = first + lines
    wait_helpers(mark, timeout=60)
    acked = {}
    for line in lines.splitlines():
        k, n = line.split()
        acked[int(k)] = int(n)
    assert acked, "no write returned before the kill; nothing was tested"
    print("acknowledged before the kill:", acked)
    src = bytes((i * 7 + (i >> 11)) & 0xff for i in range(max(acked.values())))
    for k, n in sorted(acked.items()):
        got = (out / ("k%d.bin" % k)).read_bytes()
        assert len(got) >= n, "k%d.bin: %d bytes, but writes of %d returned" % (k, len(got), n)
        assert got[:n] == src[:n], "k%d.bin differs within the %d bytes acknowledged" % (k, n)


CLOSE_ERR_PROG = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BIG (48u << 20)

struct stats { uint64_t bytes_staged, files, bytes_written, errors; char rest[256]; };

static int fd;
static char *buf;
static ssize_t big;

static void *writer(void *a)
{
	(void)a;
	big = write(fd, buf, BIG);
	return NULL;
}

int main(int argc, char **argv)
{
	int (*get)(struct stats *, size_t) = (int (*)(struct stats *, size_t))dlsym(RTLD_DEFAULT,
										  "ackpt_get_stats");
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	struct uffdio_zeropage zp;
	struct stats s;
	char path[4096], small[4096];
	pthread_t t;
	int uffd, i, r, e;

	if (!get)
		return 10;
	snprintf(path, sizeof(path), "%s/f.bin", argv[1]);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	/* the large write's second half faults on pages nobody fills until
	 * we say: it stays mid-copy, holding the description */
	buf = mmap(NULL, BIG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(buf, 'b', BIG / 2);
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
	if (fd < 0 || buf == MAP_FAILED || uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0)
		return 11;
	reg.range.start = (uintptr_t)buf + BIG / 2;
	reg.range.len = BIG / 2;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		return 12;
	memset(small, 'a', sizeof(small));
	if (write(fd, small, sizeof(small)) != sizeof(small)) /* the helper fails this one */
		return 13;
	pthread_create(&t, NULL, writer, NULL);
	for (i = 0; i < 3000; i++) { /* until the helper has failed the small write */
		struct timespec ts = { 0, 10000000 };

		if (get(&s, sizeof(s)) == 0 && s.errors)
			break;
		nanosleep(&ts, NULL);
	}
	r = close(fd);
	e = errno;
	printf("errors seen %d\nclose %d %s\n", (int)s.errors, r, r ? strerror(e) : "ok");
	zp.range = reg.range;
	zp.mode = 0;
	ioctl(uffd, UFFDIO_ZEROPAGE, &zp);
	pthread_join(t, NULL);
	printf("large write returned %s\n", big == (ssize_t)BIG ? "all" : "not all");
	return 0;
}
"""


def test_close_during_a_large_write_reports_the_files_error(tmp_path):
    """The last close of a file whose data the helper failed to write returns
    the error, also while another thread's large write still holds the
    description (it is mid-copy, waiting on a userfaultfd page, with the
    lock dropped)."""
    from faultutil import run, shim_env

    need_shim()
    exe = compile_c(tmp_path, "closeerr", CLOSE_ERR_PROG, "-pthread", "-ldl")
    out = tmp_path / "out"
    out.mkdir()
    r = run([exe, out], shim_env(out, staging="256M", ACKPT_WRITE_THROUGH="off",
                                 ACKPT_TEST_DELAY_MS=200,
                                 ACKPT_FAULT="op=write,nth=1,err=EIO,mode=once"))
    if r.returncode in (11, 12):
        pytest.skip("userfaultfd is not available here (exit %d)" % r.returncode)
    assert r.returncode in (0, 1), r.describe()
    assert "errors seen 1" in r.stdout, r.describe()
    assert "close -1 Input/output error" in r.stdout, r.describe()
