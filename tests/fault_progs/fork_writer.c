/*
 * Parent and children writing different managed files across fork().
 *
 *   fork_writer OUTDIR
 *
 * The parent opens parent.bin and writes to it before and after forking.
 * Child 1 opens child1.bin after the fork, writes, fsyncs, closes and
 * leaves with exit(0).  Child 2 opens child2.bin, writes and leaves with
 * _exit(0) (no atexit handlers, no destructors).  The parent waits for both
 * and reads both files back (under ackpt those opens must wait for the
 * children's staged data), then finishes its own file.  Exit 1 on a
 * mismatch, 2 on a failed call.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *outdir;

static void die(const char *what)
{
	fprintf(stderr, "fork_writer[%d]: %s: %s\n", (int)getpid(), what, strerror(errno));
	exit(2);
}

static char *path(const char *name)
{
	static char buf[4][4096];
	static int k;
	char *p = buf[k++ & 3];
	snprintf(p, 4096, "%s/%s", outdir, name);
	return p;
}

static void fill(unsigned char *b, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (unsigned char)(i * (2 * seed + 1) + (i >> 11) + seed);
}

static void put(int fd, const unsigned char *b, size_t n, size_t piece)
{
	for (size_t off = 0; off < n; off += piece) {
		size_t k = n - off < piece ? n - off : piece;
		if (write(fd, b + off, k) != (ssize_t)k)
			die("write");
	}
}

static void verify(const char *name, const unsigned char *want, size_t n)
{
	int fd = open(path(name), O_RDONLY);
	unsigned char *got = malloc(n + 1);
	size_t have = 0;
	ssize_t r;

	if (fd < 0)
		die("open for reading");
	while ((r = read(fd, got + have, n + 1 - have)) > 0)
		have += (size_t)r;
	if (r < 0)
		die("read");
	close(fd);
	if (have != n || memcmp(got, want, n)) {
		fprintf(stderr, "fork_writer: %s: read back %zu bytes, expected %zu%s\n", name, have, n,
			have == n ? " (contents differ)" : "");
		exit(1);
	}
	free(got);
}

int main(int argc, char **argv)
{
	const size_t np = 6 << 20, n1 = 6 << 20, n2 = 3 << 20;
	unsigned char *bp = malloc(np), *b1 = malloc(n1), *b2 = malloc(n2);
	pid_t c1, c2;
	int st, pfd;

	if (argc != 2)
		return 2;
	outdir = argv[1];
	fill(bp, np, 1);
	fill(b1, n1, 2);
	fill(b2, n2, 3);

	pfd = open(path("parent.bin"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (pfd < 0)
		die("open parent.bin");
	put(pfd, bp, np / 2, 1 << 20);

	c1 = fork();
	if (c1 < 0)
		die("fork");
	if (c1 == 0) {
		int fd = open(path("child1.bin"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd < 0)
			die("open child1.bin");
		put(fd, b1, n1, 1 << 20);
		if (pwrite(fd, "CHILD1", 6, 0) != 6)
			die("pwrite");
		memcpy(b1, "CHILD1", 6);
		if (fsync(fd) < 0 || close(fd) < 0)
			die("fsync/close child1");
		exit(0);
	}
	c2 = fork();
	if (c2 < 0)
		die("fork");
	if (c2 == 0) {
		int fd = open(path("child2.bin"), O_WRONLY | O_CREAT | O_TRUNC, 0600);
		if (fd < 0)
			die("open child2.bin");
		put(fd, b2, n2, 512 << 10);
		close(fd);
		_exit(0);
	}
	put(pfd, bp + np / 2, np - np / 2, 1 << 20);
	memcpy(b1, "CHILD1", 6);
	if (waitpid(c1, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
		die("child 1 failed");
	if (waitpid(c2, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st))
		die("child 2 failed");
	verify("child1.bin", b1, n1);
	verify("child2.bin", b2, n2);
	struct stat sb;
	if (fstat(pfd, &sb) < 0 || (size_t)sb.st_size != np) {
		fprintf(stderr, "fork_writer: parent.bin fstat size %lld, expected %zu\n",
			(long long)sb.st_size, np);
		return 1;
	}
	if (close(pfd) < 0)
		die("close parent.bin");
	verify("parent.bin", bp, np);
	return 0;
}
