/*
 * Device-pointer writes on a real GPU, for tests/gpu/run.sh.
 *
 *   devwrite files OUTDIR      cudaMalloc 1, 64 and 256 MiB, queue a fill of
 *                              each and, without synchronizing, write them with
 *                              write(), an unbuffered stdio stream and writev
 *                              (host and device pieces mixed); then ackpt_wait
 *                              and compare every file with the device contents
 *   devwrite stall OUTDIR GIB  one write() of GIB GiB of device memory under the
 *                              shim, against cudaMemcpy of the same bytes into
 *                              cudaMallocHost memory; sampled check of the file
 *
 * Needs the shim (ackpt_wait is looked up with dlsym): exits 2 without it.
 * Prints "key value" lines for run.sh and exits 0 (pass), 1 (mismatch) or
 * 2 (a call failed).
 *
 * Builds with nvcc (the fill is a kernel, queued behind a ~50 ms spin kernel)
 * or, where the machine has no nvcc, as C++ against cuda_runtime_api.h and
 * libcudart (the fill is a cudaMemcpyAsync from pinned memory, queued largest
 * first): either way the write is issued while the fill is still queued, so
 * it passes only if the shim orders its copy after the writer's work.
 */
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "ackpt.h"

#ifdef __CUDACC__
#define HOSTDEV __host__ __device__
#else
#define HOSTDEV
#endif

static const char *outdir;

/* The byte a filled buffer holds at offset i. */
static HOSTDEV inline uint8_t pattern(uint64_t i, uint32_t seed)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)seed * 0xC2B2AE3D27D4EB4Full;

	x ^= x >> 29;
	return (uint8_t)(x >> 32);
}

#ifdef __CUDACC__
__global__ void fill_kernel(uint8_t *p, size_t n, uint32_t seed)
{
	for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
	     i += (size_t)gridDim.x * blockDim.x)
		p[i] = pattern(i, seed);
}

__global__ void spin_kernel(long long cycles)
{
	long long t0 = clock64();

	while (clock64() - t0 < cycles)
		;
}
#endif

static void die(const char *what)
{
	fprintf(stderr, "devwrite: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void check(cudaError_t e, const char *what)
{
	if (e != cudaSuccess) {
		fprintf(stderr, "devwrite: %s: %s\n", what, cudaGetErrorString(e));
		exit(2);
	}
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char *path(const char *name)
{
	static char buf[4][4096];
	static int k;
	char *p = buf[k++ & 3];

	snprintf(p, 4096, "%s/%s", outdir, name);
	return p;
}

static int (*ackpt_wait_fn)(double);
static int (*ackpt_stats_fn)(struct ackpt_stats *, size_t);

static void need_shim(void)
{
	ackpt_wait_fn = (int (*)(double))dlsym(RTLD_DEFAULT, "ackpt_wait");
	ackpt_stats_fn = (int (*)(struct ackpt_stats *, size_t))dlsym(RTLD_DEFAULT, "ackpt_get_stats");
	if (!ackpt_wait_fn || !ackpt_stats_fn) {
		fprintf(stderr, "devwrite: not running under libackpt.so (no ackpt_wait)\n");
		exit(2);
	}
}

static void wait_durable(void)
{
	int r = ackpt_wait_fn(120);

	if (r) {
		fprintf(stderr, "devwrite: ackpt_wait: %d\n", r);
		exit(2);
	}
}

static int open_out(const char *name)
{
	int fd = open(path(name), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0)
		die(name);
	return fd;
}

static void put(int fd, const void *b, size_t n)
{
	const char *p = (const char *)b;

	while (n) {
		ssize_t r = write(fd, p, n);

		if (r <= 0)
			die("write");
		p += r;
		n -= (size_t)r;
	}
}

/* Compare the file's bytes [off, off+n) with want; 0 when equal. */
static int compare_file(int fd, const char *name, uint64_t off, const uint8_t *want, size_t n,
			uint8_t *scratch)
{
	size_t have = 0;

	while (have < n) {
		ssize_t r = pread(fd, scratch + have, n - have, (off_t)(off + have));

		if (r < 0)
			die("pread");
		if (r == 0)
			break;
		have += (size_t)r;
	}
	if (have != n) {
		printf("MISMATCH %s: short file at %llu (%zu of %zu bytes)\n", name,
		       (unsigned long long)off, have, n);
		return 1;
	}
	for (size_t i = 0; i < n; i++)
		if (scratch[i] != want[i]) {
			printf("MISMATCH %s: byte %llu is %02x, device has %02x\n", name,
			       (unsigned long long)(off + i), scratch[i], want[i]);
			return 1;
		}
	return 0;
}

static int verify(const char *name, const uint8_t *want, size_t n, uint8_t *scratch)
{
	int fd = open(path(name), O_RDONLY | O_CLOEXEC);
	off_t size;
	int bad;

	if (fd < 0)
		die(name);
	size = lseek(fd, 0, SEEK_END);
	bad = compare_file(fd, name, 0, want, n, scratch);
	if (!bad && size != (off_t)n) {
		printf("MISMATCH %s: size %lld, want %zu\n", name, (long long)size, n);
		bad = 1;
	}
	close(fd);
	return bad;
}

/* Queue fills of the buffers, last buffer first, without waiting for them. */
static void queue_fills(uint8_t **dev, const size_t *len, const uint32_t *seed, int n,
			uint8_t **staging)
{
#ifdef __CUDACC__
	int clock_khz = 0;

	(void)staging;
	check(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0), "clock rate");
	/* ~50 ms of queued work in front of the fills */
	spin_kernel<<<1, 1>>>((long long)clock_khz * 50);
	for (int i = n - 1; i >= 0; i--)
		fill_kernel<<<1024, 256>>>(dev[i], len[i], seed[i]);
	check(cudaGetLastError(), "fill kernel");
	printf("fill kernel\n");
#else
	for (int i = n - 1; i >= 0; i--) {
		for (size_t k = 0; k < len[i]; k++)
			staging[i][k] = pattern(k, seed[i]);
		check(cudaMemcpyAsync(dev[i], staging[i], len[i], cudaMemcpyHostToDevice, 0),
		      "cudaMemcpyAsync H2D");
	}
	printf("fill cudaMemcpyAsync\n");
#endif
}

static int mode_files(void)
{
	enum { N = 3 };
	const size_t len[N] = { 1ull << 20, 64ull << 20, 256ull << 20 };
	const uint32_t seed[N] = { 101, 202, 303 };
	uint8_t *dev[N], *host[N], *staging[N] = { 0 }, *scratch, head[4096];
	struct ackpt_stats st;
	char name[64];
	int bad = 0;
	double t0, tw;
	size_t total = 0;

	need_shim();
	for (int i = 0; i < N; i++) {
		check(cudaMalloc((void **)&dev[i], len[i]), "cudaMalloc");
		check(cudaMemset(dev[i], 0, len[i]), "cudaMemset");
		host[i] = (uint8_t *)malloc(len[i]);
		if (!host[i])
			die("malloc");
#ifndef __CUDACC__
		check(cudaMallocHost((void **)&staging[i], len[i]), "cudaMallocHost");
#endif
		total += len[i];
	}
	check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
	for (size_t k = 0; k < sizeof(head); k++)
		head[k] = (uint8_t)(k * 7 + 1);

	queue_fills(dev, len, seed, N, staging);
	t0 = now();
	for (int i = 0; i < N; i++) {
		int fd;

		snprintf(name, sizeof(name), "write_%d.bin", i);
		fd = open_out(name);
		put(fd, dev[i], len[i]);
		if (close(fd))
			die("close");
	}
	for (int i = 0; i < N; i++) {
		FILE *f;

		snprintf(name, sizeof(name), "fwrite_%d.bin", i);
		f = fopen(path(name), "wb");
		/* a buffered stream would memcpy part of the device buffer itself */
		if (!f || setvbuf(f, NULL, _IONBF, 0))
			die("fopen");
		if (fwrite(dev[i], 1, len[i], f) != len[i] || fclose(f))
			die("fwrite");
	}
	{
		struct iovec iov[3] = { { head, 100 }, { dev[1], len[1] }, { head + 100, 200 } };
		int fd = open_out("writev.bin");

		if (writev(fd, iov, 3) != (ssize_t)(len[1] + 300))
			die("writev");
		close(fd);
	}
	tw = now() - t0;
	check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
	wait_durable();

	scratch = (uint8_t *)malloc(len[N - 1] + 300);
	if (!scratch)
		die("malloc");
	for (int i = 0; i < N; i++) {
		check(cudaMemcpy(host[i], dev[i], len[i], cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
		if (host[i][len[i] - 1] != pattern(len[i] - 1, seed[i])) {
			printf("MISMATCH fill did not produce the pattern (test program bug)\n");
			return 2;
		}
		snprintf(name, sizeof(name), "write_%d.bin", i);
		bad |= verify(name, host[i], len[i], scratch);
		snprintf(name, sizeof(name), "fwrite_%d.bin", i);
		bad |= verify(name, host[i], len[i], scratch);
	}
	{
		uint8_t *want = (uint8_t *)malloc(len[1] + 300);

		memcpy(want, head, 100);
		memcpy(want + 100, host[1], len[1]);
		memcpy(want + 100 + len[1], head + 100, 200);
		bad |= verify("writev.bin", want, len[1] + 300, scratch);
		free(want);
	}
	memset(&st, 0, sizeof(st));
	ackpt_stats_fn(&st, sizeof(st));
	printf("files 7\nbytes %zu\nwrite_seconds %.4f\nstall_seconds %.4f\nbytes_staged %llu\n",
	       2 * total + len[1] + 300, tw, st.stall_seconds, (unsigned long long)st.bytes_staged);
	printf(bad ? "RESULT mismatch\n" : "RESULT ok\n");
	return bad;
}

static int mode_stall(double gib)
{
	const size_t n = (size_t)(gib * (1ull << 30)), mib = 1ull << 20;
	uint8_t *dev, *pinned, *scratch;
	double t0, t_open, t_first, t_shim, t_alloc, t_copy;
	int fd, bad = 0;
	struct ackpt_stats st;

	need_shim();
	check(cudaMalloc((void **)&dev, n), "cudaMalloc");
	/* a distinct byte per MiB: misplaced chunks show */
	for (size_t off = 0; off < n; off += mib)
		check(cudaMemsetAsync(dev + off, (int)((off / mib) * 37 + 11) & 0xff,
				      n - off < mib ? n - off : mib, 0), "cudaMemsetAsync");
	check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");

	/* the reference first, before the helper competes for memory bandwidth */
	t0 = now();
	check(cudaMallocHost((void **)&pinned, n), "cudaMallocHost");
	t_alloc = now() - t0;
	t0 = now();
	check(cudaMemcpy(pinned, dev, n, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
	t_copy = now() - t0;

	t0 = now();
	fd = open_out("warm.bin");  /* starts the session: helper, arena */
	t_open = now() - t0;
	t0 = now();
	put(fd, dev, mib);          /* first device copy: pins the arena with ACKPT_PIN=eager */
	t_first = now() - t0;
	close(fd);

	fd = open_out("big.bin");
	t0 = now();
	put(fd, dev, n);
	t_shim = now() - t0;
	close(fd);

	memset(&st, 0, sizeof(st));
	ackpt_stats_fn(&st, sizeof(st));
	wait_durable();
	scratch = (uint8_t *)malloc(mib);
	fd = open(path("big.bin"), O_RDONLY | O_CLOEXEC);
	if (fd < 0 || !scratch)
		die("big.bin");
	if (lseek(fd, 0, SEEK_END) != (off_t)n) {
		printf("MISMATCH big.bin: wrong size\n");
		bad = 1;
	}
	for (int k = 0; k < 64 && !bad; k++) {
		size_t off = (size_t)k * (n / 64) / mib * mib;
		size_t len = n - off < mib ? n - off : mib;

		bad |= compare_file(fd, "big.bin", off, pinned + off, len, scratch);
	}
	close(fd);
	printf("bytes %zu\nopen_seconds %.4f\nfirst_write_seconds %.4f\nshim_write_seconds %.4f\n"
	       "mallochost_seconds %.4f\nmemcpy_pinned_seconds %.4f\nstall_seconds %.4f\n"
	       "staging_bytes %llu\n", n, t_open, t_first, t_shim, t_alloc, t_copy, st.stall_seconds,
	       (unsigned long long)st.staging_bytes);
	printf(bad ? "RESULT mismatch\n" : "RESULT ok\n");
	return bad;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "files")) {
		outdir = argv[2];
		return mode_files();
	}
	if (argc >= 4 && !strcmp(argv[1], "stall")) {
		outdir = argv[2];
		return mode_stall(atof(argv[3]));
	}
	fprintf(stderr, "usage: devwrite files OUTDIR | devwrite stall OUTDIR GIB\n");
	return 2;
}
