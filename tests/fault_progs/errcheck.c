/*
 * Write TOTAL_MIB of a known pattern to PATH with write() in CHUNK_KIB
 * pieces, then fsync(), then close(), and say what each call returned.
 *
 *   errcheck PATH TOTAL_MIB CHUNK_KIB MODE PAUSE_FSYNC_MS PAUSE_CLOSE_MS
 *
 * MODE check:  stop at the first failing call, print
 *              "FIRST_ERROR <call> <ERRNO-NAME>", close the file (printing
 *              what close said) and exit 3; print "NO_ERROR" and exit 0 when
 *              every call succeeded.
 * MODE ignore: make every call, ignore every result, exit 0.
 * The pauses (ms) come before fsync and before close: the "compute" a
 * training loop does between saving and the next call on the file.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void pause_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (ms > 0 && nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static const char *ename(int e)
{
	const char *n = strerrorname_np(e);

	return n ? n : "E?";
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: errcheck PATH TOTAL_MIB CHUNK_KIB check|ignore PAUSE_FSYNC_MS PAUSE_CLOSE_MS\n");
		return 2;
	}
	const char *path = argv[1];
	size_t total = (size_t)atol(argv[2]) << 20, chunk = (size_t)atol(argv[3]) << 10;
	int check = !strcmp(argv[4], "check");
	long pf = atol(argv[5]), pc = atol(argv[6]);
	unsigned char *buf = malloc(chunk);
	size_t done = 0;
	int fd, i = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) {
		printf("open ERR %s\n", ename(errno));
		return 2;
	}
	while (done < total) {
		size_t n = total - done < chunk ? total - done : chunk;
		for (size_t k = 0; k < n; k++)
			buf[k] = (unsigned char)((done + k) * 131 + ((done + k) >> 12));
		size_t put = 0;
		while (put < n) {
			ssize_t w = write(fd, buf + put, n - put);
			if (w < 0) {
				int e = errno;
				printf("write %d ERR %s\n", i, ename(e));
				if (check) {
					printf("FIRST_ERROR write %s\n", ename(e));
					int r = close(fd);
					printf("close %s %s\n", r ? "ERR" : "ok", r ? ename(errno) : "");
					return 3;
				}
				break;
			}
			put += (size_t)w;
		}
		done += n;
		i++;
	}
	printf("writes done %d\n", i);
	pause_ms(pf);
	if (fsync(fd) < 0) {
		int e = errno;
		printf("fsync ERR %s\n", ename(e));
		if (check) {
			printf("FIRST_ERROR fsync %s\n", ename(e));
			int r = close(fd);
			printf("close %s %s\n", r ? "ERR" : "ok", r ? ename(errno) : "");
			return 3;
		}
	} else {
		printf("fsync ok\n");
	}
	pause_ms(pc);
	if (close(fd) < 0) {
		int e = errno;
		printf("close ERR %s\n", ename(e));
		if (check) {
			printf("FIRST_ERROR close %s\n", ename(e));
			return 3;
		}
	} else {
		printf("close ok\n");
	}
	if (check)
		printf("NO_ERROR\n");
	return 0;
}
