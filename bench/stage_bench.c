/*
 * Raw write() microbenchmark, run once plainly and once under ackpt-run by
 * bench/micro.  Prints one JSON object:
 *  - memcpy_s: warm memcpy of SIZE bytes into pre-faulted memory (best of 3);
 *  - write_s[]: time inside write(fd, buf, SIZE) per round (round 0 is the
 *    cold first save);
 *  - fsync_s[]: time inside fsync after it; durable_s[]: from the start of
 *    the write until everything is durable (ackpt_wait under the shim,
 *    fsync returning without it);
 *  - fastpath_ns: cost per 4 KiB write() to an unmanaged file;
 *  - managed_small_ns, managed_tiny_ns: cost per 4 KiB and per 64-byte
 *    write() to a managed file (staged under the shim), per batch.
 * STAGE_BENCH_DLOPEN=LIB dlopens LIB first (a CUDA driver, so the shim
 * classifies every written buffer); STAGE_BENCH_SMALL_ONLY=1 measures only
 * managed_small_ns and managed_tiny_ns.  STAGE_BENCH_THREADS=N measures
 * writer threads instead (threads_main).
 */
#include <dlfcn.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *faulted(size_t n)
{
	char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	memset(p, 1, n);
	return p;
}

/* len-byte writes to a file in dir, timed per batch (ns per call), as
 * "key": [...] */
static int managed_small(const char *dir, const char *src, size_t len, const char *key)
{
	enum { BATCHES = 20, PER = 2000 };
	char path[4096];
	int b, i, fd;

	snprintf(path, sizeof(path), "%s/stage_small.bin", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) {
		perror(path);
		return 1;
	}
	printf("\"%s\": [", key);
	for (b = 0; b < BATCHES; b++) {
		double t0 = now();

		for (i = 0; i < PER; i++)
			if (write(fd, src + (size_t)i * len % (1u << 20), len) != (ssize_t)len) {
				perror("write");
				return 1;
			}
		printf("%s%.1f", b ? ", " : "", (now() - t0) / PER * 1e9);
	}
	printf("]");
	close(fd);
	unlink(path);
	return 0;
}

static int managed_smalls(const char *dir, const char *src)
{
	if (managed_small(dir, src, 4096, "managed_small_ns"))
		return 1;
	printf(", ");
	return managed_small(dir, src, 64, "managed_tiny_ns");
}

/*
 * STAGE_BENCH_THREADS=N: N threads write SIZE bytes in all, each its own
 * file in 8 MiB write() calls, as DCP's writer threads do.  Prints the
 * machine's limit (a warm memcpy of SIZE by 1 and by N threads at once) and,
 * per round, the wall time until every thread's writes returned and until
 * all is durable.
 */
#define TB_MAX 16

struct tb {
	const char *dir;
	char *src, *dst;
	size_t len;
	int id, round;
	pthread_barrier_t *go;
};

static void *tb_copy(void *arg)
{
	struct tb *a = arg;

	pthread_barrier_wait(a->go);
	memcpy(a->dst, a->src, a->len);
	return NULL;
}

static void *tb_write(void *arg)
{
	struct tb *a = arg;
	char path[4096];
	size_t off, step = 8u << 20;
	int fd;

	snprintf(path, sizeof(path), "%s/stage_t%d_%d.bin", a->dir, a->id, a->round);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0) {
		perror(path);
		exit(1);
	}
	pthread_barrier_wait(a->go);
	for (off = 0; off < a->len; off += step) {
		size_t n = a->len - off < step ? a->len - off : step;

		if (write(fd, a->src + off, n) != (ssize_t)n) {
			perror("write");
			exit(1);
		}
	}
	close(fd);
	return NULL;
}

/* Run fn on n threads over len bytes of src (and dst); seconds from the
 * start barrier until the last thread is done. */
static double tb_run(void *(*fn)(void *), int n, const char *dir, char *src, char *dst, size_t len,
		     int round)
{
	pthread_t t[TB_MAX];
	struct tb a[TB_MAX];
	pthread_barrier_t go;
	size_t each = len / n / 4096 * 4096;
	double t0;
	int k;

	pthread_barrier_init(&go, NULL, n + 1);
	for (k = 0; k < n; k++) {
		a[k] = (struct tb){ dir, src + k * each, dst ? dst + k * each : NULL, each, k, round,
				    &go };
		pthread_create(&t[k], NULL, fn, &a[k]);
	}
	pthread_barrier_wait(&go);
	t0 = now();
	for (k = 0; k < n; k++)
		pthread_join(t[k], NULL);
	t0 = now() - t0;
	pthread_barrier_destroy(&go);
	return t0;
}

static int threads_main(const char *dir, size_t size, int rounds, int n, int (*wait_fn)(double))
{
	char *src = faulted(size), *dst = faulted(size), path[4096];
	double best1 = 1e9, bestn = 1e9, t;
	int r, k;

	if (n < 1 || n > TB_MAX)
		return 1;
	for (r = 0; r < 3; r++) {
		t = tb_run(tb_copy, 1, dir, src, dst, size, 0);
		best1 = t < best1 ? t : best1;
		t = tb_run(tb_copy, n, dir, src, dst, size, 0);
		bestn = t < bestn ? t : bestn;
	}
	munmap(dst, size);
	printf("{\"size\": %zu, \"threads\": %d, \"shim\": %s, \"memcpy1_s\": %.6f, "
	       "\"memcpyn_s\": %.6f, \"rounds\": [", size, n, wait_fn ? "true" : "false", best1, bestn);
	for (r = 0; r < rounds; r++) {
		double tw = tb_run(tb_write, n, dir, src, NULL, size, r), td;

		t = now();
		if (wait_fn && wait_fn(0) != 0) {
			fprintf(stderr, "ackpt_wait failed\n");
			return 1;
		}
		td = tw + now() - t;
		printf("%s{\"write_s\": %.6f, \"durable_s\": %.6f}", r ? ", " : "", tw, td);
		fflush(stdout);
		for (k = 0; k < n; k++) {
			snprintf(path, sizeof(path), "%s/stage_t%d_%d.bin", dir, k, r);
			unlink(path);
		}
	}
	printf("]}\n");
	return 0;
}

int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : ".";
	size_t size = (argc > 2 ? strtoull(argv[2], NULL, 10) : 1024) << 20;
	int rounds = argc > 3 ? atoi(argv[3]) : 4;
	const char *scratch = argc > 4 ? argv[4] : "/tmp";
	int (*wait_fn)(double) = (int (*)(double))dlsym(RTLD_DEFAULT, "ackpt_wait");
	const char *lib = getenv("STAGE_BENCH_DLOPEN");
	char *src, *dst;
	double best = 1e9, t;
	char path[4096];
	size_t i;
	int r, fd;

	if (lib && *lib && !dlopen(lib, RTLD_NOW | RTLD_GLOBAL)) {
		fprintf(stderr, "stage_bench: %s\n", dlerror());
		return 1;
	}
	if (getenv("STAGE_BENCH_THREADS"))
		return threads_main(dir, size, rounds, atoi(getenv("STAGE_BENCH_THREADS")), wait_fn);
	if (getenv("STAGE_BENCH_SMALL_ONLY")) {
		src = faulted(1u << 21);
		printf("{\"shim\": %s, ", wait_fn ? "true" : "false");
		if (managed_smalls(dir, src))
			return 1;
		printf("}\n");
		return 0;
	}
	src = faulted(size);
	dst = faulted(size);
	for (i = 0; i < size; i += 4096)
		src[i] = (char)(i >> 12);
	for (r = 0; r < 3; r++) {
		t = now();
		memcpy(dst, src, size);
		t = now() - t;
		if (t < best)
			best = t;
	}
	munmap(dst, size);
	printf("{\"size\": %zu, \"memcpy_s\": %.6f, \"shim\": %s, \"rounds\": [", size, best,
	       wait_fn ? "true" : "false");
	for (r = 0; r < rounds; r++) {
		double t0, tw, tf, td;

		snprintf(path, sizeof(path), "%s/stage_%d.bin", dir, r);
		fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd < 0) {
			perror(path);
			return 1;
		}
		t0 = now();
		if (write(fd, src, size) != (ssize_t)size) {
			perror("write");
			return 1;
		}
		tw = now();
		if (fsync(fd) < 0) {
			perror("fsync");
			return 1;
		}
		tf = now();
		close(fd);
		if (wait_fn && wait_fn(0) != 0) {
			fprintf(stderr, "ackpt_wait failed\n");
			return 1;
		}
		td = now();
		printf("%s{\"write_s\": %.6f, \"fsync_s\": %.6f, \"durable_s\": %.6f}", r ? ", " : "",
		       tw - t0, tf - tw, td - t0);
		fflush(stdout);
		unlink(path);
	}
	/*
	 * The untracked fast path: 4 KiB writes to a file nobody manages,
	 * through write() (the wrapper, when preloaded) and through libc's
	 * write directly, in alternating batches so both see the same noise.
	 */
	snprintf(path, sizeof(path), "%s/ackpt-fastpath.%d", scratch, (int)getpid());
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	{
		void *libc = dlopen("libc.so.6", RTLD_NOLOAD | RTLD_NOW);
		ssize_t (*libc_write)(int, const void *, size_t) =
			libc ? (ssize_t (*)(int, const void *, size_t))dlsym(libc, "write") : NULL;
		const int batches = 40, per = 5000;
		double via[40], direct[40];
		int b;

		if (!libc_write)
			return 1;
		for (b = 0; b < batches; b++) {
			double t0;

			lseek(fd, 0, SEEK_SET);
			t0 = now();
			for (i = 0; i < (size_t)per; i++)
				if (write(fd, src, 4096) != 4096)
					return 1;
			via[b] = (now() - t0) / per * 1e9;
			lseek(fd, 0, SEEK_SET);
			t0 = now();
			for (i = 0; i < (size_t)per; i++)
				if (libc_write(fd, src, 4096) != 4096)
					return 1;
			direct[b] = (now() - t0) / per * 1e9;
		}
		printf("], ");
		if (managed_smalls(dir, src))
			return 1;
		printf(", \"fastpath_ns\": [");
		for (b = 0; b < batches; b++)
			printf("%s[%.1f, %.1f]", b ? ", " : "", via[b], direct[b]);
		printf("]}\n");
	}
	close(fd);
	unlink(path);
	return 0;
}
