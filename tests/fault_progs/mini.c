/*
 * A small checkpoint writer: three managed files through write, pwrite
 * (inside, and past EOF leaving a hole), writev, O_APPEND, fsync and a
 * tmp -> final rename; sizes it observes go to OUT/observed.txt.  Writes
 * ackpt_get_stats as JSON to $ACKPT_TEST_STATS (present 0 without the shim).
 *
 *   mini OUTDIR
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

static char obs[8192];
static size_t obslen;

static void die(const char *what)
{
	fprintf(stderr, "mini: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void note(const char *what, long long v)
{
	obslen += (size_t)snprintf(obs + obslen, sizeof(obs) - obslen, "%s %lld\n", what, v);
}

static void report_stats(void)
{
	const char *path = getenv("ACKPT_TEST_STATS");
	struct {
		uint64_t bytes_staged, files, bytes_written, errors, ops_pending;
		double stall_seconds;
		int32_t active, helper_flags;
		double helper_cpu_seconds;
		uint64_t staging_bytes;
		char spare[256];
	} st;
	int (*get)(void *, size_t);
	FILE *f;

	if (!path)
		return;
	memset(&st, 0, sizeof st);
	get = (int (*)(void *, size_t))dlsym(RTLD_DEFAULT, "ackpt_get_stats");
	f = fopen(path, "w");
	if (!f)
		die("stats file");
	if (!get) {
		fprintf(f, "{\"present\": 0}\n");
	} else {
		int rc = get(&st, sizeof st);
		fprintf(f, "{\"present\": 1, \"rc\": %d, \"bytes_staged\": %llu, \"files\": %llu, "
			   "\"bytes_written\": %llu, \"errors\": %llu, \"ops_pending\": %llu, "
			   "\"active\": %d, \"helper_flags\": %d, \"staging_bytes\": %llu}\n",
			rc, (unsigned long long)st.bytes_staged, (unsigned long long)st.files,
			(unsigned long long)st.bytes_written, (unsigned long long)st.errors,
			(unsigned long long)st.ops_pending, st.active, st.helper_flags,
			(unsigned long long)st.staging_bytes);
	}
	fclose(f);
}

int main(int argc, char **argv)
{
	char p[4096], q[4096];
	size_t n = 3 << 20;
	unsigned char *buf;
	struct stat st;
	int fd;

	if (argc != 2) {
		fprintf(stderr, "usage: mini OUTDIR\n");
		return 2;
	}
	buf = malloc(n);
	for (size_t i = 0; i < n; i++)
		buf[i] = (unsigned char)(i * 7 + (i >> 10));

	snprintf(p, sizeof p, "%s/model.bin", argv[1]);
	fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die("open model.bin");
	for (size_t off = 0; off < n; off += 65536)
		if (write(fd, buf + off, 65536) != 65536)
			die("write");
	if (pwrite(fd, "HEADER", 6, 100) != 6)
		die("pwrite inside");
	if (pwrite(fd, buf, 5000, (off_t)n + 123456) != 5000)
		die("pwrite past EOF");
	struct iovec iov[2] = { { buf, 1000 }, { "|v|", 3 } };
	if (writev(fd, iov, 2) != 1003)
		die("writev");
	fstat(fd, &st);
	note("model.bin fstat", (long long)st.st_size);
	note("model.bin SEEK_CUR", (long long)lseek(fd, 0, SEEK_CUR));
	if (fsync(fd) < 0)
		die("fsync");
	if (close(fd) < 0)
		die("close");

	snprintf(p, sizeof p, "%s/opt.tmp", argv[1]);
	snprintf(q, sizeof q, "%s/opt.pt", argv[1]);
	fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		die("open opt.tmp");
	if (write(fd, buf, n) != (ssize_t)n || write(fd, buf, n / 3) != (ssize_t)(n / 3))
		die("write opt");
	if (fdatasync(fd) < 0 || close(fd) < 0)
		die("fdatasync/close opt");
	if (rename(p, q) < 0)
		die("rename");
	if (stat(q, &st) < 0)
		die("stat opt.pt");
	note("opt.pt stat", (long long)st.st_size);

	snprintf(p, sizeof p, "%s/log.txt", argv[1]);
	for (int k = 0; k < 3; k++) {
		fd = open(p, O_WRONLY | O_CREAT | O_APPEND, 0644);
		if (fd < 0)
			die("open log");
		for (int j = 0; j < 50; j++) {
			char line[64];
			int m = snprintf(line, sizeof line, "open %d line %d\n", k, j);
			if (write(fd, line, (size_t)m) != m)
				die("write log");
		}
		close(fd);
	}
	if (stat(p, &st) < 0)
		die("stat log");
	note("log.txt stat", (long long)st.st_size);

	snprintf(p, sizeof p, "%s/observed.txt", argv[1]);
	fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, obs, obslen) != (ssize_t)obslen || close(fd) < 0)
		die("observed.txt");
	report_stats();
	return 0;
}
