/*
 * Device-pointer writes against the fake driver (fakecuda.c), for CPU CI.
 *
 *   fake_devwrite MODE OUTDIR
 *
 * The program loads "libcuda.so.1" itself with dlopen, as the CUDA runtime
 * does inside torch, and only in the modes that use CUDA; the library found
 * is whatever LD_LIBRARY_PATH offers (the test puts the fake there).
 *
 *   cpu      no CUDA at all: host writes, then report whether libcuda is
 *            mapped (/proc/self/maps); prints "LIBCUDA_MAPPED 0|1"
 *   loaded   libcuda loaded (the fake, or NVIDIA's stub library) but no
 *            context ever made current: host writes only
 *   basic    host write before CUDA is loaded, then device buffers (one
 *            larger than the staging arena, one managed) written with
 *            write, pwrite, writev (host and device pieces mixed) and an
 *            unbuffered stdio stream, right after their fill was queued
 *   fork     a CUDA process forks; the child writes a managed file and
 *            exits; the parent then writes device memory
 *   nocontext  a thread with no current context writes device memory
 *   early-fd a file opened before libcuda was loaded, written from device
 *            memory after it was
 *
 * Under the shim it calls ackpt_wait and reads every file back against the
 * device contents.  Prints "OK" and exits 0 when all match, 1 on a
 * mismatch, 2 when a call fails.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

typedef unsigned long long devptr;

static const char *outdir;
static void *(*ctx_create)(void);
static devptr (*mem_alloc)(size_t, int);
static int (*fill_async)(devptr, size_t, uint32_t);
static int (*dev_read)(void *, devptr, size_t);
static uint8_t (*pattern)(uint64_t, uint32_t);
static int failures;

static void die(const char *what)
{
	fprintf(stderr, "fake_devwrite[%d]: %s: %s\n", (int)getpid(), what, strerror(errno));
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

static void load_cuda(void)
{
	void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
	int (*init)(unsigned);

	if (!lib) {
		fprintf(stderr, "fake_devwrite: dlopen libcuda.so.1: %s\n", dlerror());
		exit(2);
	}
	init = (int (*)(unsigned))dlsym(lib, "cuInit");
	ctx_create = (void *(*)(void))dlsym(lib, "fake_ctx_create");
	mem_alloc = (devptr(*)(size_t, int))dlsym(lib, "fake_mem_alloc");
	fill_async = (int (*)(devptr, size_t, uint32_t))dlsym(lib, "fake_fill_async");
	dev_read = (int (*)(void *, devptr, size_t))dlsym(lib, "fake_read");
	pattern = (uint8_t(*)(uint64_t, uint32_t))dlsym(lib, "fake_pattern");
	if (!init || !ctx_create || !mem_alloc || !fill_async || !dev_read || !pattern) {
		fprintf(stderr, "fake_devwrite: libcuda.so.1 is not the fake driver\n");
		exit(2);
	}
	init(0);
}

static devptr dev_buffer(size_t n, int managed, uint32_t seed)
{
	devptr p = mem_alloc(n, managed);

	if (!p || fill_async(p, n, seed))
		die("fake_mem_alloc");
	return p;
}

static unsigned char *host_copy(devptr p, size_t n)
{
	unsigned char *h = malloc(n ? n : 1);

	if (!h || dev_read(h, p, n))
		die("fake_read");
	return h;
}

static void put(int fd, const void *b, size_t n)
{
	const char *p = b;

	while (n) {
		ssize_t r = write(fd, p, n);

		if (r <= 0)
			die("write");
		p += r;
		n -= (size_t)r;
	}
}

/* Wait for durability when running under the shim (the symbol is only there then). */
static void wait_durable(void)
{
	int (*wait)(double) = (int (*)(double))dlsym(RTLD_DEFAULT, "ackpt_wait");

	if (wait && wait(60) != 0) {
		fprintf(stderr, "fake_devwrite: ackpt_wait failed\n");
		exit(2);
	}
}

/* The file must hold exactly the n bytes of want. */
static void verify(const char *name, const unsigned char *want, size_t n)
{
	int fd = open(path(name), O_RDONLY | O_CLOEXEC);
	unsigned char *got = malloc(n + 1);
	size_t have = 0;
	ssize_t r;

	if (fd < 0 || !got)
		die(name);
	while ((r = read(fd, got + have, n + 1 - have)) > 0)
		have += (size_t)r;
	close(fd);
	if (have != n) {
		fprintf(stderr, "MISMATCH %s: %zu bytes, want %zu\n", name, have, n);
		failures++;
	} else {
		for (size_t i = 0; i < n; i++)
			if (got[i] != want[i]) {
				fprintf(stderr, "MISMATCH %s: first differing byte at %zu: %02x, want %02x\n",
					name, i, got[i], want[i]);
				failures++;
				break;
			}
	}
	free(got);
}

static void host_fill(unsigned char *b, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		b[i] = (unsigned char)(i * (2 * seed + 1) + (i >> 9) + seed);
}

static int mode_cpu(void)
{
	unsigned char buf[65536];
	char line[4096];
	FILE *maps, *f;
	int fd, mapped = 0;

	host_fill(buf, sizeof(buf), 3);
	fd = open(path("cpu.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open cpu.bin");
	put(fd, buf, sizeof(buf));
	close(fd);
	f = fopen(path("cpu_stdio.bin"), "wb");
	if (!f || fwrite(buf, 1, sizeof(buf), f) != sizeof(buf) || fclose(f))
		die("cpu_stdio.bin");
	wait_durable();
	maps = fopen("/proc/self/maps", "r");
	if (!maps)
		die("/proc/self/maps");
	while (fgets(line, sizeof(line), maps))
		if (strstr(line, "libcuda"))
			mapped = 1;
	fclose(maps);
	verify("cpu.bin", buf, sizeof(buf));
	verify("cpu_stdio.bin", buf, sizeof(buf));
	printf("LIBCUDA_MAPPED %d\n", mapped);
	return failures ? 1 : 0;
}

static int mode_loaded(void)
{
	unsigned char buf[65536];
	void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
	int (*init)(unsigned);
	int fd;

	if (!lib) {
		fprintf(stderr, "fake_devwrite: dlopen libcuda.so.1: %s\n", dlerror());
		return 2;
	}
	init = (int (*)(unsigned))dlsym(lib, "cuInit");
	if (init)
		printf("CUINIT %d\n", init(0)); /* the stub library answers 34 */
	host_fill(buf, sizeof(buf), 5);
	fd = open(path("loaded.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open loaded.bin");
	put(fd, buf, sizeof(buf));
	close(fd);
	wait_durable();
	verify("loaded.bin", buf, sizeof(buf));
	return failures ? 1 : 0;
}

static int mode_basic(void)
{
	const size_t na = (1u << 20) + 123, nb = 3u << 20, nc = 40u << 20, nm = 2u << 20;
	unsigned char host[8192], *a, *b, *c, *m, *want;
	devptr da, db, dc, dm;
	struct iovec iov[3];
	FILE *f;
	int fd;

	/* before CUDA is loaded: the shim finds no driver */
	host_fill(host, sizeof(host), 7);
	fd = open(path("host0.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open host0.bin");
	put(fd, host, sizeof(host));
	close(fd);

	load_cuda();
	ctx_create();
	da = dev_buffer(na, 0, 11);
	db = dev_buffer(nb, 0, 22);
	dc = dev_buffer(nc, 0, 33);
	dm = dev_buffer(nm, 1, 44);

	/* written right after the fills were queued, with no synchronize in between */
	fd = open(path("dev_write.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open dev_write.bin");
	put(fd, (void *)(uintptr_t)da, na);
	put(fd, (void *)(uintptr_t)db, nb);
	put(fd, (void *)(uintptr_t)dc, nc);
	close(fd);

	fd = open(path("dev_pwrite.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open dev_pwrite.bin");
	if (pwrite(fd, (void *)(uintptr_t)dm, nm, 4096) != (ssize_t)nm ||
	    pwrite(fd, host, 4096, 0) != 4096)
		die("pwrite");
	close(fd);

	fd = open(path("dev_writev.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open dev_writev.bin");
	iov[0] = (struct iovec){ host, 100 };
	iov[1] = (struct iovec){ (void *)(uintptr_t)da, na };
	iov[2] = (struct iovec){ host + 100, 200 };
	if (writev(fd, iov, 3) != (ssize_t)(300 + na))
		die("writev");
	close(fd);

	/* glibc copies into a buffered stream's buffer itself: device data needs _IONBF */
	f = fopen(path("dev_fwrite.bin"), "wb");
	if (!f || setvbuf(f, NULL, _IONBF, 0))
		die("fopen dev_fwrite.bin");
	if (fwrite((void *)(uintptr_t)db, 1, nb, f) != nb ||
	    fwrite((void *)(uintptr_t)dc, 1, nc, f) != nc || fclose(f))
		die("fwrite");

	wait_durable();
	a = host_copy(da, na);
	b = host_copy(db, nb);
	c = host_copy(dc, nc);
	m = host_copy(dm, nm);
	for (size_t i = 0; i < 64; i++)
		if (a[i] != pattern(i, 11)) {
			fprintf(stderr, "fake driver: fill did not land\n");
			return 2;
		}
	verify("host0.bin", host, sizeof(host));

	want = malloc(na + nb + nc);
	memcpy(want, a, na);
	memcpy(want + na, b, nb);
	memcpy(want + na + nb, c, nc);
	verify("dev_write.bin", want, na + nb + nc);
	verify("dev_fwrite.bin", want + na, nb + nc);

	memcpy(want, host, 4096);
	memcpy(want + 4096, m, nm);
	verify("dev_pwrite.bin", want, 4096 + nm);

	memcpy(want, host, 100);
	memcpy(want + 100, a, na);
	memcpy(want + 100 + na, host + 100, 200);
	verify("dev_writev.bin", want, 300 + na);
	free(want);
	return failures ? 1 : 0;
}

static int mode_fork(void)
{
	const size_t n = 1u << 20;
	unsigned char host[65536];
	devptr d;
	pid_t pid;
	int fd, st;

	load_cuda();
	ctx_create();
	d = dev_buffer(n, 0, 55);
	host_fill(host, sizeof(host), 9);
	pid = fork();
	if (pid < 0)
		die("fork");
	if (pid == 0) {
		/* a DataLoader worker: host data only, and no CUDA through the shim */
		printf("CHILD %d\n", (int)getpid());
		fflush(stdout);
		fd = open(path("child.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (fd < 0)
			die("open child.bin");
		put(fd, host, sizeof(host));
		close(fd);
		exit(0);
	}
	if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st))
		die("child failed");
	fd = open(path("parent.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open parent.bin");
	put(fd, (void *)(uintptr_t)d, n);
	close(fd);
	wait_durable();
	verify("child.bin", host, sizeof(host));
	verify("parent.bin", host_copy(d, n), n);
	return failures ? 1 : 0;
}

struct job { devptr d; size_t n; int rc; };

static void *nocontext_thread(void *arg)
{
	struct job *j = arg;
	int fd = open(path("thread.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0)
		die("open thread.bin");
	/* this thread never made a context current */
	j->rc = write(fd, (void *)(uintptr_t)j->d, j->n) == (ssize_t)j->n ? 0 : -errno;
	close(fd);
	return NULL;
}

static int mode_nocontext(void)
{
	struct job j = { 0, 1u << 20, 0 };
	pthread_t t;

	load_cuda();
	ctx_create();
	j.d = dev_buffer(j.n, 0, 66);
	if (pthread_create(&t, NULL, nocontext_thread, &j) || pthread_join(t, NULL))
		die("pthread");
	if (j.rc) {
		printf("WRITE_ERRNO %d\n", -j.rc);
		return 3;
	}
	wait_durable();
	verify("thread.bin", host_copy(j.d, j.n), j.n);
	return failures ? 1 : 0;
}

static int mode_early_fd(void)
{
	const size_t n = 1u << 20;
	devptr d;
	int fd;

	fd = open(path("early.bin"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open early.bin");
	load_cuda();
	ctx_create();
	d = dev_buffer(n, 0, 77);
	put(fd, (void *)(uintptr_t)d, n);
	close(fd);
	wait_durable();
	verify("early.bin", host_copy(d, n), n);
	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	int rc;

	if (argc != 3) {
		fprintf(stderr, "usage: fake_devwrite cpu|loaded|basic|fork|nocontext|early-fd OUTDIR\n");
		return 2;
	}
	outdir = argv[2];
	if (!strcmp(argv[1], "cpu"))
		rc = mode_cpu();
	else if (!strcmp(argv[1], "loaded"))
		rc = mode_loaded();
	else if (!strcmp(argv[1], "basic"))
		rc = mode_basic();
	else if (!strcmp(argv[1], "fork"))
		rc = mode_fork();
	else if (!strcmp(argv[1], "nocontext"))
		rc = mode_nocontext();
	else if (!strcmp(argv[1], "early-fd"))
		rc = mode_early_fd();
	else
		return 2;
	if (!rc)
		printf("OK\n");
	return rc;
}
