/*
 * Corpus program: glibc stdio on managed files.
 *   argv[1]: output directory (must exist)
 *
 * fopen/fwrite/fprintf/fputs/fputc, fseek/ftell header patch, "w+" read-back,
 * "a" mode, an unbuffered stream, the numpy tofile pattern (dup + fdopen +
 * fseeko/fwrite/ftello + fclose, then lseek/write on the original fd) and one
 * FILE* that is never fclose'd (exit() must flush it).  Exit 1 on a failed
 * self-check, 2 on an unexpected library failure.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *outdir;
static char obsbuf[1 << 14];
static size_t obslen;

static void die(int code, const char *fmt, ...)
{
	va_list ap;
	int e = errno;
	fprintf(stderr, "c_stdio: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (code == 2)
		fprintf(stderr, " (errno %d: %s)", e, strerror(e));
	fprintf(stderr, "\n");
	exit(code);
}

static void obs(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(obsbuf + obslen, sizeof(obsbuf) - obslen, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(obsbuf) - obslen)
		die(1, "observation buffer full");
	obslen += (size_t)n;
}

static char *opath(const char *name)
{
	static char buf[8][4096];
	static int k;
	char *p = buf[k++ & 7];
	snprintf(p, 4096, "%s/%s", outdir, name);
	return p;
}

static void fill(unsigned char *p, size_t n, uint32_t seed)
{
	uint32_t x = seed * 2654435761u + 12345;
	for (size_t i = 0; i < n; i++) {
		x = x * 1664525u + 1013904223u;
		p[i] = (unsigned char)(x >> 24);
	}
}

static void expect_tell(FILE *f, long want, const char *what)
{
	long t = ftell(f);
	obs("%s ftell %ld\n", what, t);
	if (t != want)
		die(1, "%s: ftell=%ld expected %ld", what, t, want);
}

static void check_path_size(const char *name, long long expect)
{
	struct stat st;
	if (stat(opath(name), &st) != 0)
		die(2, "stat %s", name);
	obs("%s stat st_size %lld\n", name, (long long)st.st_size);
	if (st.st_size != expect)
		die(1, "%s: st_size=%lld expected %lld", name, (long long)st.st_size, expect);
}

static void report_stats(void)
{
	const char *path = getenv("ACKPT_TEST_STATS");
	if (!path)
		return;
	/* struct ackpt_stats (include/ackpt.h) plus room to grow: the library
	 * rejects a size smaller than its own struct. */
	struct {
		uint64_t bytes_staged, files, bytes_written, errors, ops_pending;
		double stall_seconds;
		int32_t active, helper_flags;
		double helper_cpu_seconds;
		uint64_t staging_bytes;
		char spare[256];
	} st;
	memset(&st, 0, sizeof st);
	int (*get)(void *, size_t) = (int (*)(void *, size_t))dlsym(RTLD_DEFAULT, "ackpt_get_stats");
	FILE *f = fopen(path, "w");
	if (!f)
		die(2, "open stats file");
	if (!get) {
		fprintf(f, "{\"present\": 0}\n");
	} else {
		int rc = get(&st, sizeof st);
		fprintf(f, "{\"present\": 1, \"rc\": %d, \"bytes_staged\": %llu, \"files\": %llu, "
			   "\"bytes_written\": %llu, \"errors\": %llu, \"ops_pending\": %llu, "
			   "\"stall_seconds\": %f, \"active\": %d, \"helper_flags\": %d, "
			   "\"staging_bytes\": %llu}\n",
			rc, (unsigned long long)st.bytes_staged, (unsigned long long)st.files,
			(unsigned long long)st.bytes_written, (unsigned long long)st.errors,
			(unsigned long long)st.ops_pending, st.stall_seconds, st.active,
			st.helper_flags, (unsigned long long)st.staging_bytes);
	}
	fclose(f);
}

/* fwrite/fprintf body, then fseek(0) to patch the header, then SEEK_END. */
static void stdio_patched(void)
{
	const size_t big = 3u << 20;
	unsigned char *buf = malloc(big);
	fill(buf, big, 1);
	FILE *f = fopen(opath("stdio.bin"), "wb");
	if (!f)
		die(2, "fopen stdio.bin");
	char hdr[32];
	memset(hdr, 0, sizeof hdr);
	if (fwrite(hdr, 1, sizeof hdr, f) != sizeof hdr)
		die(2, "fwrite hdr");
	expect_tell(f, 32, "stdio.bin after-placeholder");
	long pos = 32;
	for (int i = 0; i < 500; i++)
		pos += fprintf(f, "record %d value %08x\n", i, (unsigned)(i * 2654435761u));
	expect_tell(f, pos, "stdio.bin after-fprintf");
	for (int i = 0; i < 300; i++) {
		fputs("fputs-line;", f);
		fputc('\n', f);
		pos += 12;
	}
	if (fwrite(buf, 1, big, f) != big) /* larger than the stdio buffer */
		die(2, "fwrite big");
	pos += (long)big;
	expect_tell(f, pos, "stdio.bin after-big");
	if (fseek(f, 0, SEEK_SET) != 0)
		die(2, "fseek 0");
	char tmp[64];
	snprintf(tmp, sizeof tmp, "STDIOHDR len=%ld", pos);
	memcpy(hdr, tmp, sizeof hdr);
	fwrite(hdr, 1, sizeof hdr, f);
	expect_tell(f, 32, "stdio.bin after-header-patch");
	if (fseek(f, 0, SEEK_END) != 0)
		die(2, "fseek end");
	expect_tell(f, pos, "stdio.bin after-seek-end");
	fprintf(f, "TAIL\n");
	pos += 5;
	if (fflush(f) != 0)
		die(2, "fflush");
	if (fsync(fileno(f)) != 0)
		die(2, "fsync(fileno)");
	struct stat st;
	fstat(fileno(f), &st);
	obs("stdio.bin fstat(fileno) st_size %lld\n", (long long)st.st_size);
	if (st.st_size != pos)
		die(1, "stdio.bin fstat size %lld expected %ld", (long long)st.st_size, pos);
	if (fclose(f) != 0)
		die(2, "fclose");
	check_path_size("stdio.bin", pos);
	free(buf);
}

/* "w+": write, rewind, read back through the same stream. */
static void stdio_wplus(void)
{
	unsigned char buf[100000], rb[100000];
	fill(buf, sizeof buf, 2);
	FILE *f = fopen(opath("wplus.bin"), "w+");
	if (!f)
		die(2, "fopen w+");
	fwrite(buf, 1, sizeof buf, f);
	rewind(f);
	size_t r = fread(rb, 1, sizeof rb, f);
	if (r != sizeof rb || memcmp(rb, buf, sizeof buf) != 0)
		die(1, "wplus.bin read-back mismatch (read %zu)", r);
	fseek(f, 1000, SEEK_SET);
	fwrite("OVERWRITTEN", 1, 11, f);
	fclose(f);
	/* Read it back through a new stream. */
	memcpy(buf + 1000, "OVERWRITTEN", 11);
	f = fopen(opath("wplus.bin"), "rb");
	if (!f)
		die(2, "fopen rb");
	r = fread(rb, 1, sizeof rb, f);
	if (r != sizeof rb || memcmp(rb, buf, sizeof buf) != 0)
		die(1, "wplus.bin re-read mismatch (read %zu)", r);
	fclose(f);
}

/* "a" mode, an unbuffered stream, and fopen with the 'x' and 'e' flags. */
static void stdio_modes(void)
{
	FILE *f = fopen(opath("amode.txt"), "w");
	fprintf(f, "first\n");
	fclose(f);
	f = fopen(opath("amode.txt"), "a");
	if (!f)
		die(2, "fopen a");
	expect_tell(f, 6, "amode.txt after-open-a");
	fprintf(f, "appended\n");
	fseek(f, 0, SEEK_SET); /* ignored for writes in append mode */
	fprintf(f, "appended-after-seek\n");
	fclose(f);
	check_path_size("amode.txt", 6 + 9 + 20);

	f = fopen(opath("unbuffered.txt"), "wxe");
	if (!f)
		die(2, "fopen wxe");
	setvbuf(f, NULL, _IONBF, 0);
	for (int i = 0; i < 200; i++)
		fprintf(f, "unbuffered %d\n", i);
	fclose(f);
	if (fopen(opath("unbuffered.txt"), "wx") != NULL || errno != EEXIST)
		die(1, "fopen 'x' on an existing file did not fail with EEXIST");
}

/* numpy ndarray.tofile pattern. */
static void stdio_tofile(void)
{
	const size_t n = 1u << 20;
	unsigned char *buf = malloc(n);
	fill(buf, n, 3);
	int fd = open(opath("tofile.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die(2, "open tofile.bin");
	if (write(fd, "HEADER-WRITTEN-BY-FD\n", 21) != 21)
		die(2, "write");
	off_t orig = lseek(fd, 0, SEEK_CUR);
	int fd2 = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (fd2 < 0)
		die(2, "dup");
	FILE *f = fdopen(fd2, "wb");
	if (!f)
		die(2, "fdopen");
	if (fseeko(f, orig, SEEK_SET) != 0)
		die(2, "fseeko");
	off_t t0 = ftello(f);
	obs("tofile.bin ftello-before %lld\n", (long long)t0);
	if (fwrite(buf, 1, n, f) != n)
		die(2, "fwrite");
	for (int i = 0; i < 1000; i++)
		fwrite(buf + i, 1, 7, f);
	off_t t1 = ftello(f);
	obs("tofile.bin ftello-after %lld\n", (long long)t1);
	if (t1 != 21 + (off_t)n + 7000)
		die(1, "ftello after fwrite %lld", (long long)t1);
	if (fclose(f) != 0)
		die(2, "fclose");
	if (lseek(fd, t1, SEEK_SET) != t1)
		die(2, "lseek original fd");
	off_t cur = lseek(fd, 0, SEEK_CUR);
	obs("tofile.bin original-fd SEEK_CUR %lld\n", (long long)cur);
	if (write(fd, "TRAILER\n", 8) != 8)
		die(2, "write trailer");
	close(fd);
	check_path_size("tofile.bin", 21 + (long long)n + 7000 + 8);
	free(buf);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
		return 2;
	}
	outdir = argv[1];
	stdio_patched();
	stdio_wplus();
	stdio_modes();
	stdio_tofile();

	FILE *o = fopen(opath("observed.txt"), "w");
	if (!o)
		die(2, "fopen observed.txt");
	fwrite(obsbuf, 1, obslen, o);
	fclose(o);
	report_stats();

	/* Never fclose'd: exit() flushes it. */
	FILE *u = fopen(opath("unclosed.txt"), "w");
	if (!u)
		die(2, "fopen unclosed.txt");
	for (int i = 0; i < 3000; i++)
		fprintf(u, "never closed, flushed at exit: line %d\n", i);
	return 0;
}
