/*
 * Corpus program: raw POSIX I/O on managed files.
 *   argv[1]: output directory (must exist)
 *
 * Every write is mirrored into an in-memory model of the file so the program
 * can check, in the same process, that reads / fstat / lseek see exactly what
 * a synchronous run would see (exit 1 on mismatch, 2 on an unexpected syscall
 * failure).  Observed offsets and sizes are also written to observed.txt in
 * the output directory, so the plain and the shim run are compared on them.
 *
 * Built twice by the tests: plain, and with -O2 -D_FORTIFY_SOURCE=2
 * -D_FILE_OFFSET_BITS=64 (open64/lseek64/pwrite64 and __open64_2/__read_chk
 * symbol names).
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
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static const char *outdir;
static char obsbuf[1 << 16];
static size_t obslen;

static void die(int code, const char *fmt, ...)
{
	va_list ap;
	int e = errno;
	fprintf(stderr, "c_basic: ");
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

static uint64_t rng_state;
static void rng_seed(uint64_t s) { rng_state = s * 0x9E3779B97F4A7C15ull + 1; }
static uint64_t rng_next(void)
{
	uint64_t x = rng_state;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return rng_state = x;
}
static void rng_fill(unsigned char *p, size_t n)
{
	size_t i = 0;
	for (; i + 8 <= n; i += 8) {
		uint64_t v = rng_next();
		memcpy(p + i, &v, 8);
	}
	if (i < n) {
		uint64_t v = rng_next();
		memcpy(p + i, &v, n - i);
	}
}

/* ---- model of one file ---- */
struct model {
	const char *name;
	unsigned char *data;
	size_t cap, size;
	off_t pos; /* only meaningful for non-append fds we track */
};

static void model_init(struct model *m, const char *name, size_t cap)
{
	m->name = name;
	m->data = calloc(1, cap);
	if (!m->data)
		die(2, "calloc");
	m->cap = cap;
	m->size = 0;
	m->pos = 0;
}

static void model_put(struct model *m, off_t off, const void *p, size_t n)
{
	if ((size_t)off + n > m->cap)
		die(1, "model %s overflow", m->name);
	memcpy(m->data + off, p, n);
	if ((size_t)off + n > m->size)
		m->size = (size_t)off + n;
}

static void model_truncate(struct model *m, size_t len)
{
	if (len > m->cap)
		die(1, "model %s overflow", m->name);
	if (len < m->size)
		memset(m->data + len, 0, m->size - len);
	m->size = len;
}

static void write_all(int fd, const void *p, size_t n)
{
	const char *c = p;
	while (n) {
		ssize_t w = write(fd, c, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			die(2, "write");
		}
		c += w;
		n -= (size_t)w;
	}
}

static void mwrite(int fd, struct model *m, const void *p, size_t n)
{
	write_all(fd, p, n);
	model_put(m, m->pos, p, n);
	m->pos += (off_t)n;
}

static void mpwrite(int fd, struct model *m, const void *p, size_t n, off_t off)
{
	ssize_t w = pwrite(fd, p, n, off);
	if (w != (ssize_t)n)
		die(2, "pwrite");
	model_put(m, off, p, n);
}

static void check_pos(int fd, struct model *m, const char *what)
{
	off_t cur = lseek(fd, 0, SEEK_CUR);
	obs("%s %s SEEK_CUR %lld\n", m->name, what, (long long)cur);
	if (cur != m->pos)
		die(1, "%s %s: lseek(SEEK_CUR)=%lld expected %lld", m->name, what,
		    (long long)cur, (long long)m->pos);
}

static void check_size(int fd, struct model *m, const char *what)
{
	struct stat st;
	if (fstat(fd, &st) != 0)
		die(2, "fstat");
	obs("%s %s st_size %lld\n", m->name, what, (long long)st.st_size);
	if ((size_t)st.st_size != m->size)
		die(1, "%s %s: fstat st_size=%lld expected %zu", m->name, what,
		    (long long)st.st_size, m->size);
	off_t save = lseek(fd, 0, SEEK_CUR);
	off_t end = lseek(fd, 0, SEEK_END);
	obs("%s %s SEEK_END %lld\n", m->name, what, (long long)end);
	if ((size_t)end != m->size)
		die(1, "%s %s: lseek(SEEK_END)=%lld expected %zu", m->name, what,
		    (long long)end, m->size);
	if (lseek(fd, save, SEEK_SET) != save)
		die(2, "lseek back");
}

static void check_path_size(const char *name, size_t expect)
{
	struct stat st;
	if (stat(opath(name), &st) != 0)
		die(2, "stat %s", name);
	obs("%s stat st_size %lld\n", name, (long long)st.st_size);
	if ((size_t)st.st_size != expect)
		die(1, "%s: stat st_size=%lld expected %zu", name, (long long)st.st_size, expect);
}

static void cmp_buf(const char *what, const unsigned char *got, const unsigned char *exp, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (got[i] != exp[i])
			die(1, "%s: content mismatch at offset %zu (got 0x%02x expected 0x%02x)",
			    what, i, got[i], exp[i]);
}

/* Read a whole file through a fresh read-only fd and compare to the model. */
static void verify_by_read(const char *name, struct model *m)
{
	volatile int rdflags = O_RDONLY; /* non-constant: __open_2 under fortify */
	int fd = open(opath(name), rdflags);
	if (fd < 0)
		die(2, "open %s for reading", name);
	size_t chunk = 1 << 20, got = 0;
	unsigned char *buf = malloc(chunk);
	for (;;) {
		ssize_t r = read(fd, buf, chunk);
		if (r < 0)
			die(2, "read %s", name);
		if (r == 0)
			break;
		if (got + (size_t)r > m->size)
			die(1, "%s: read past expected size %zu", name, m->size);
		cmp_buf(name, buf, m->data + got, (size_t)r);
		got += (size_t)r;
	}
	if (got != m->size)
		die(1, "%s: read %zu bytes, expected %zu", name, got, m->size);
	free(buf);
	close(fd);
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

/* A: header patched at offset 0 after the body; pwrite inside and past EOF; writev. */
static void file_patched(void)
{
	struct model m;
	model_init(&m, "patched.bin", 1 << 20);
	int fd = open(opath(m.name), O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die(2, "open %s", m.name);
	unsigned char hdr[64] = {0};
	mwrite(fd, &m, hdr, sizeof hdr); /* placeholder */
	check_pos(fd, &m, "after-placeholder");

	unsigned char *buf = malloc(200000);
	rng_seed(1);
	rng_fill(buf, 200000);
	size_t done = 0;
	for (int i = 0; done < 100000; i++) {
		size_t n = 4096 + (size_t)(i * 37 % 1000);
		if (done + n > 100000)
			n = 100000 - done;
		mwrite(fd, &m, buf + done, n);
		done += n;
	}
	check_pos(fd, &m, "after-body");

	mpwrite(fd, &m, "PWRITE-OVERWRITE", 16, 64 + 10); /* inside the body */
	check_pos(fd, &m, "after-pwrite-inside");
	mpwrite(fd, &m, buf + 1000, 100, m.pos + 200000); /* past EOF: leaves a hole */
	check_pos(fd, &m, "after-pwrite-past-eof");
	check_size(fd, &m, "after-pwrite-past-eof");

	struct iovec iov[3];
	iov[0].iov_base = buf + 5000;
	iov[0].iov_len = 1000;
	iov[1].iov_base = "|";
	iov[1].iov_len = 1;
	iov[2].iov_base = buf + 100000;
	iov[2].iov_len = 70000;
	ssize_t w = writev(fd, iov, 3);
	if (w != 71001)
		die(2, "writev returned %zd", w);
	for (int i = 0; i < 3; i++) {
		model_put(&m, m.pos, iov[i].iov_base, iov[i].iov_len);
		m.pos += (off_t)iov[i].iov_len;
	}
	check_pos(fd, &m, "after-writev");

	off_t end = lseek(fd, 0, SEEK_END);
	if (end != (off_t)m.size)
		die(1, "SEEK_END %lld expected %zu", (long long)end, m.size);
	m.pos = end;
	mwrite(fd, &m, "TRAILER-TRAILER-TRAILER-TRAILER!", 32);

	/* Patch the header. */
	uint64_t sum = 0;
	for (size_t i = 64; i < m.size; i++)
		sum = sum * 31 + m.data[i];
	snprintf((char *)hdr, sizeof hdr, "ACKPTTEST v1 size=%zu sum=%016llx", m.size,
		 (unsigned long long)sum);
	if (lseek(fd, 0, SEEK_SET) != 0)
		die(2, "lseek 0");
	m.pos = 0;
	mwrite(fd, &m, hdr, sizeof hdr);
	check_pos(fd, &m, "after-header-patch");
	check_size(fd, &m, "after-header-patch");

	/* Patch the last 10 bytes relative to the end. */
	off_t p = lseek(fd, -10, SEEK_END);
	obs("%s SEEK_END-10 %lld\n", m.name, (long long)p);
	if (p != (off_t)m.size - 10)
		die(1, "lseek(-10, SEEK_END)=%lld", (long long)p);
	m.pos = p;
	mwrite(fd, &m, "ENDPATCHED", 10);
	check_pos(fd, &m, "after-end-patch");

	/* Read back through the same (still open) fd with pread. */
	unsigned char *rb = malloc(m.size);
	ssize_t r = pread(fd, rb, m.size, 0);
	if (r != (ssize_t)m.size)
		die(1, "pread whole file returned %zd expected %zu", r, m.size);
	cmp_buf("patched.bin pread", rb, m.data, m.size);
	/* read() at the current position (EOF) gives 0, then from a seek. */
	if (read(fd, rb, 16) != 0)
		die(1, "read at EOF not 0");
	lseek(fd, 64 + 10, SEEK_SET);
	if (read(fd, rb, 16) != 16 || memcmp(rb, "PWRITE-OVERWRITE", 16) != 0)
		die(1, "read after seek mismatch");
	free(rb);

	if (fsync(fd) != 0)
		die(2, "fsync");
	if (fdatasync(fd) != 0)
		die(2, "fdatasync");
	check_size(fd, &m, "after-fsync");
	if (close(fd) != 0)
		die(2, "close");

	/* Read back through mmap after close. */
	int rfd = open(opath(m.name), O_RDONLY);
	if (rfd < 0)
		die(2, "reopen");
	void *map = mmap(NULL, m.size, PROT_READ, MAP_SHARED, rfd, 0);
	if (map == MAP_FAILED)
		die(2, "mmap");
	cmp_buf("patched.bin mmap", map, m.data, m.size);
	munmap(map, m.size);
	close(rfd);
	check_path_size(m.name, m.size);
	free(buf);
	free(m.data);
}

/* B: many small writes then one 48 MiB write; read back in full. */
static void file_big(void)
{
	const size_t big = 48u << 20;
	struct model m;
	model_init(&m, "big.bin", big + (1 << 20));
	int fd = open(opath(m.name), O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die(2, "open %s", m.name);
	unsigned char small[128];
	rng_seed(2);
	for (int i = 0; i < 10000; i++) {
		size_t n = (size_t)(i * 7 % 97) + 1;
		rng_fill(small, n);
		mwrite(fd, &m, small, n);
	}
	check_pos(fd, &m, "after-small");
	unsigned char *bbuf = malloc(big);
	rng_seed(3);
	rng_fill(bbuf, big);
	ssize_t w = write(fd, bbuf, big); /* one call */
	if (w < 0)
		die(2, "big write");
	obs("big.bin big-write returned %zd\n", w);
	model_put(&m, m.pos, bbuf, (size_t)w);
	m.pos += w;
	if ((size_t)w < big)
		mwrite(fd, &m, bbuf + w, big - (size_t)w);
	check_pos(fd, &m, "after-big");
	check_size(fd, &m, "after-big");
	if (fsync(fd) != 0)
		die(2, "fsync");
	if (close(fd) != 0)
		die(2, "close");
	free(bbuf);
	verify_by_read(m.name, &m);
	check_path_size(m.name, m.size);
	free(m.data);
}

/* C: O_APPEND from two open file descriptions, plus pwrite on O_APPEND (appends on Linux). */
static void file_append(void)
{
	const char *name = "append.log";
	size_t expect = 0;
	char line[128];
	int fd1 = open(opath(name), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
	if (fd1 < 0)
		die(2, "open %s", name);
	for (int i = 0; i < 100; i++) {
		int n = snprintf(line, sizeof line, "fd1 line %d\n", i);
		write_all(fd1, line, (size_t)n);
		expect += (size_t)n;
	}
	obs("append fd1 SEEK_CUR %lld\n", (long long)lseek(fd1, 0, SEEK_CUR));
	int fd2 = open(opath(name), O_WRONLY | O_APPEND);
	if (fd2 < 0)
		die(2, "open %s again", name);
	for (int i = 0; i < 100; i++) {
		int n = snprintf(line, sizeof line, "fd%d interleaved %d\n", 1 + (i & 1), i);
		write_all((i & 1) ? fd2 : fd1, line, (size_t)n);
		expect += (size_t)n;
	}
	obs("append fd1 SEEK_CUR %lld fd2 SEEK_CUR %lld\n", (long long)lseek(fd1, 0, SEEK_CUR),
	    (long long)lseek(fd2, 0, SEEK_CUR));
	ssize_t w = pwrite(fd1, "PWRITE-ON-APPEND\n", 17, 0);
	if (w != 17)
		die(2, "pwrite on O_APPEND");
	expect += 17;
	obs("append after pwrite fd1 SEEK_CUR %lld\n", (long long)lseek(fd1, 0, SEEK_CUR));
	write_all(fd2, "last\n", 5);
	expect += 5;
	struct stat st;
	fstat(fd1, &st);
	obs("append st_size %lld SEEK_END %lld\n", (long long)st.st_size,
	    (long long)lseek(fd2, 0, SEEK_END));
	if ((size_t)st.st_size != expect)
		die(1, "append.log st_size %lld expected %zu", (long long)st.st_size, expect);
	if (fsync(fd1) != 0)
		die(2, "fsync");
	close(fd2);
	close(fd1);
	check_path_size(name, expect);
}

/* D/E: ftruncate shrink and extend; O_TRUNC reopen; truncate() by path. */
static void file_truncate(void)
{
	struct model m;
	model_init(&m, "trunc.bin", 3 << 20);
	int fd = open(opath(m.name), O_RDWR | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die(2, "open %s", m.name);
	unsigned char *buf = malloc(1 << 20);
	rng_seed(4);
	rng_fill(buf, 1 << 20);
	mwrite(fd, &m, buf, 1 << 20);
	if (ftruncate(fd, 300000) != 0)
		die(2, "ftruncate shrink");
	model_truncate(&m, 300000);
	check_pos(fd, &m, "after-shrink"); /* position stays at 1 MiB */
	check_size(fd, &m, "after-shrink");
	mwrite(fd, &m, buf, 1000); /* at 1 MiB: hole 300000..1MiB */
	check_size(fd, &m, "after-write-past-shrink");
	if (ftruncate(fd, 2 << 20) != 0)
		die(2, "ftruncate extend");
	model_truncate(&m, 2 << 20);
	check_size(fd, &m, "after-extend");
	close(fd);
	verify_by_read(m.name, &m);
	free(m.data);

	const char *name = "reopen.bin";
	fd = open(opath(name), O_WRONLY | O_CREAT | O_TRUNC, 0644);
	write_all(fd, buf, 200000);
	close(fd);
	fd = open(opath(name), O_WRONLY | O_TRUNC);
	if (fd < 0)
		die(2, "reopen O_TRUNC");
	write_all(fd, buf + 500000, 1234);
	struct stat st;
	fstat(fd, &st);
	obs("reopen.bin st_size after O_TRUNC+write %lld\n", (long long)st.st_size);
	if (st.st_size != 1234)
		die(1, "reopen.bin size %lld expected 1234", (long long)st.st_size);
	close(fd);
	if (truncate(opath(name), 5000) != 0)
		die(2, "truncate by path");
	check_path_size(name, 5000);
	free(buf);
}

/* F: other ways in: creat, openat, O_EXCL, dup/dup2 sharing one offset, mode 0600. */
static void file_misc(void)
{
	struct model m;
	model_init(&m, "dup.bin", 1 << 16);
	int dfd = open(outdir, O_RDONLY | O_DIRECTORY);
	if (dfd < 0)
		die(2, "open outdir");
	int fd = openat(dfd, m.name, O_WRONLY | O_CREAT | O_EXCL, 0600);
	if (fd < 0)
		die(2, "openat %s", m.name);
	mwrite(fd, &m, "first;", 6);
	int fd2 = dup(fd);
	mwrite(fd2, &m, "via-dup;", 8);
	int fd3 = dup2(fd, 77);
	if (fd3 != 77)
		die(2, "dup2");
	mwrite(fd3, &m, "via-dup2;", 9);
	close(fd);
	mwrite(fd2, &m, "after-close-of-original;", 24);
	check_pos(fd3, &m, "dup-shared-offset");
	check_size(fd2, &m, "dup");
	close(fd2);
	close(fd3);
	verify_by_read(m.name, &m);
	free(m.data);

	int cfd = creat(opath("creat.txt"), 0644);
	if (cfd < 0)
		die(2, "creat");
	write_all(cfd, "made by creat()\n", 16);
	close(cfd);

	if (openat(dfd, "dup.bin", O_WRONLY | O_CREAT | O_EXCL, 0644) >= 0 || errno != EEXIST)
		die(1, "O_EXCL on an existing file did not fail with EEXIST");
	close(dfd);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
		return 2;
	}
	outdir = argv[1];
	file_patched();
	file_big();
	file_append();
	file_truncate();
	file_misc();

	int fd = open(opath("observed.txt"), O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		die(2, "open observed.txt");
	write_all(fd, obsbuf, obslen);
	close(fd);
	report_stats();
	return 0;
}
