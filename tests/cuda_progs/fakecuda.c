/*
 * A fake libcuda.so.1 for CPU CI: just enough of the driver API for the
 * shim's device path (src/shim/cuda.c), with device memory that the CPU
 * cannot touch, so the shim's logic runs on a machine without a GPU.
 *
 *   cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o DIR/libcuda.so.1 fakecuda.c -lpthread
 *
 * "Device memory" is an address range reserved PROT_NONE (a CPU load from
 * it faults, as a real device pointer would) with a private backing buffer
 * that only cuMemcpyDtoHAsync and fake_read reach.  fake_fill_async queues
 * a "kernel" that lands only when the context is synchronized, so a copy
 * that is not ordered after the writer's queued work reads stale bytes.
 * The current context is per thread, as in the real driver.
 *
 * Every driver call is appended to $FAKECUDA_LOG ("pid tid call args"), so
 * a test can check which process called what, and in which order.
 * FAKECUDA_REGISTER_MS delays cuMemHostRegister; FAKECUDA_REGISTER_FAIL=1
 * makes it fail.  No cuda.h needed: the few types are spelled out here.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct fake_ctx *CUcontext;
typedef struct fake_stream *CUstream;

enum {
	OK = 0, ERR_INVALID_VALUE = 1, ERR_OUT_OF_MEMORY = 2, ERR_INVALID_CONTEXT = 201,
	ATTR_CONTEXT = 1, ATTR_MEMORY_TYPE = 2, MEM_HOST = 1, MEM_DEVICE = 2, MEM_UNIFIED = 4,
};

#define FAKE_API __attribute__((visibility("default")))
#define MAX_ALLOCS 64
#define MAX_PENDING 256

struct fake_ctx { int id; };
struct fake_stream { unsigned flags; };

struct alloc { uintptr_t dev; size_t len; unsigned char *backing; int managed; };
struct fill { uintptr_t dev; size_t len; uint32_t seed; };

static struct fake_ctx the_ctx = { 1 };
static __thread CUcontext cur;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct alloc allocs[MAX_ALLOCS];
static struct fill pending[MAX_PENDING];
static int npending;
static uintptr_t reg_base;
static size_t reg_len;
static int log_fd = -1;  /* -2: no $FAKECUDA_LOG (looked up once: bench/micro times calls) */

static void logf_(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	if (log_fd == -2)
		return;
	if (log_fd < 0) {
		const char *p = getenv("FAKECUDA_LOG");

		if (!p) {
			log_fd = -2;
			return;
		}
		/* raw syscalls: the preload must not see the fake's own I/O */
		log_fd = (int)syscall(SYS_openat, AT_FDCWD, p, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
				      0644);
		if (log_fd < 0)
			return;
	}
	n = snprintf(buf, sizeof(buf), "%d %ld ", (int)getpid(), (long)syscall(SYS_gettid));
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - n - 1, fmt, ap);
	va_end(ap);
	buf[n++] = '\n';
	syscall(SYS_write, log_fd, buf, (size_t)n);
}

/* The byte a filled buffer holds at offset i; tests compute the same. */
FAKE_API uint8_t fake_pattern(uint64_t i, uint32_t seed)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ (uint64_t)seed * 0xC2B2AE3D27D4EB4Full;

	x ^= x >> 29;
	return (uint8_t)(x >> 32);
}

static struct alloc *find(uintptr_t p, size_t n)
{
	for (int i = 0; i < MAX_ALLOCS; i++)
		if (allocs[i].len && p >= allocs[i].dev && p - allocs[i].dev <= allocs[i].len &&
		    n <= allocs[i].len - (p - allocs[i].dev))
			return &allocs[i];
	return NULL;
}

static void run_pending(void)
{
	for (int k = 0; k < npending; k++) {
		struct alloc *a = find(pending[k].dev, pending[k].len);
		size_t off = pending[k].dev - a->dev;

		for (size_t i = 0; i < pending[k].len; i++)
			a->backing[off + i] = fake_pattern(i, pending[k].seed);
	}
	npending = 0;
}

FAKE_API CUresult cuInit(unsigned flags)
{
	logf_("cuInit %u", flags);
	return OK;
}

/* Make a context current on the calling thread (the runtime's primary context). */
FAKE_API CUcontext fake_ctx_create(void)
{
	cur = &the_ctx;
	logf_("fake_ctx_create");
	return cur;
}

FAKE_API CUresult cuCtxGetCurrent(CUcontext *out)
{
	*out = cur;
	return OK;
}

FAKE_API CUresult cuCtxSetCurrent(CUcontext c)
{
	cur = c;
	logf_("cuCtxSetCurrent %p", (void *)c);
	return OK;
}

static __thread CUcontext stack[8];
static __thread int depth;

FAKE_API CUresult cuCtxPushCurrent_v2(CUcontext c)
{
	if (depth == 8)
		return ERR_INVALID_VALUE;
	stack[depth++] = cur;
	cur = c;
	logf_("cuCtxPushCurrent %p", (void *)c);
	return OK;
}

FAKE_API CUresult cuCtxPopCurrent_v2(CUcontext *out)
{
	if (!depth)
		return ERR_INVALID_CONTEXT;
	if (out)
		*out = cur;
	cur = stack[--depth];
	logf_("cuCtxPopCurrent");
	return OK;
}

FAKE_API CUresult cuCtxSynchronize(void)
{
	if (!cur)
		return ERR_INVALID_CONTEXT;
	pthread_mutex_lock(&lock);
	run_pending();
	pthread_mutex_unlock(&lock);
	logf_("cuCtxSynchronize");
	return OK;
}

FAKE_API CUresult cuStreamCreate(CUstream *s, unsigned flags)
{
	if (!cur)
		return ERR_INVALID_CONTEXT;
	*s = calloc(1, sizeof(**s));
	(*s)->flags = flags;
	logf_("cuStreamCreate %u", flags);
	return OK;
}

FAKE_API CUresult cuStreamSynchronize(CUstream s)
{
	if (!cur)
		return ERR_INVALID_CONTEXT;
	logf_("cuStreamSynchronize %u", s ? s->flags : 0u);
	return OK;
}

/* A private non-blocking stream does not wait for queued work: pending fills stay pending. */
FAKE_API CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s)
{
	struct alloc *a;
	int pinned;

	if (!cur)
		return ERR_INVALID_CONTEXT;
	pthread_mutex_lock(&lock);
	a = find((uintptr_t)src, n);
	if (!a) {
		pthread_mutex_unlock(&lock);
		logf_("cuMemcpyDtoHAsync BAD %llx %zu", src, n);
		return ERR_INVALID_VALUE;
	}
	memcpy(dst, a->backing + ((uintptr_t)src - a->dev), n);
	pinned = reg_len && (uintptr_t)dst >= reg_base && (uintptr_t)dst + n <= reg_base + reg_len;
	pthread_mutex_unlock(&lock);
	logf_("cuMemcpyDtoHAsync %p %zu stream_flags=%u pinned=%d", dst, n, s ? s->flags : 0u, pinned);
	return OK;
}

FAKE_API CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr p)
{
	struct alloc *a;
	CUresult r = OK;

	if (attr == ATTR_CONTEXT) {
		/* like the driver: the owning context, whatever is current */
		pthread_mutex_lock(&lock);
		a = find((uintptr_t)p, 0);
		pthread_mutex_unlock(&lock);
		if (!a)
			return ERR_INVALID_VALUE;
		*(CUcontext *)data = &the_ctx;
		logf_("cuPointerGetAttribute context %llx", p);
		return OK;
	}
	if (attr != ATTR_MEMORY_TYPE)
		return ERR_INVALID_VALUE;
	pthread_mutex_lock(&lock);
	a = find((uintptr_t)p, 0);
	if (a)
		*(unsigned *)data = a->managed ? MEM_UNIFIED : MEM_DEVICE;
	else if (reg_len && (uintptr_t)p >= reg_base && (uintptr_t)p < reg_base + reg_len)
		*(unsigned *)data = MEM_HOST;
	else
		r = ERR_INVALID_VALUE; /* memory CUDA does not know */
	pthread_mutex_unlock(&lock);
	logf_("cuPointerGetAttribute %llx -> %d", p, r == OK ? (int)*(unsigned *)data : -r);
	return r;
}

FAKE_API CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned flags)
{
	const char *ms = getenv("FAKECUDA_REGISTER_MS");
	const char *fail = getenv("FAKECUDA_REGISTER_FAIL");

	if (!cur)
		return ERR_INVALID_CONTEXT;
	logf_("cuMemHostRegister begin %p %zu %u", p, n, flags);
	if (ms && atoi(ms) > 0) {
		struct timespec ts = { atoi(ms) / 1000, (atoi(ms) % 1000) * 1000000L };

		nanosleep(&ts, NULL);
	}
	if (fail && !strcmp(fail, "1")) {
		logf_("cuMemHostRegister fail");
		return ERR_OUT_OF_MEMORY;
	}
	pthread_mutex_lock(&lock);
	reg_base = (uintptr_t)p;
	reg_len = n;
	pthread_mutex_unlock(&lock);
	logf_("cuMemHostRegister done %p %zu %u", p, n, flags);
	return OK;
}

FAKE_API CUresult cuMemHostUnregister(void *p)
{
	CUresult r = OK;

	pthread_mutex_lock(&lock);
	if ((uintptr_t)p == reg_base && reg_len)
		reg_len = 0;
	else
		r = ERR_INVALID_VALUE;
	pthread_mutex_unlock(&lock);
	logf_("cuMemHostUnregister %p -> %d", p, r);
	return r;
}

/* Allocate "device" memory: a PROT_NONE address with a private backing. */
FAKE_API CUdeviceptr fake_mem_alloc(size_t n, int managed)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE), len = (n + pg - 1) / pg * pg;
	void *dev = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	unsigned char *backing = malloc(n ? n : 1);
	CUdeviceptr r = 0;

	if (dev == MAP_FAILED || !backing)
		return 0;
	memset(backing, 0xEE, n);
	pthread_mutex_lock(&lock);
	for (int i = 0; i < MAX_ALLOCS; i++)
		if (!allocs[i].len) {
			allocs[i] = (struct alloc){ (uintptr_t)dev, n, backing, managed };
			r = (uintptr_t)dev;
			break;
		}
	pthread_mutex_unlock(&lock);
	logf_("fake_mem_alloc %llx %zu managed=%d", r, n, managed);
	return r;
}

/* Queue a "kernel" that fills [p, p+n) with fake_pattern(i, seed) at the next synchronize. */
FAKE_API int fake_fill_async(CUdeviceptr p, size_t n, uint32_t seed)
{
	int r = -1;

	pthread_mutex_lock(&lock);
	if (find((uintptr_t)p, n) && npending < MAX_PENDING) {
		pending[npending++] = (struct fill){ (uintptr_t)p, n, seed };
		r = 0;
	}
	pthread_mutex_unlock(&lock);
	return r;
}

/* What a synchronous cudaMemcpy D2H would return: queued work first. */
FAKE_API int fake_read(void *dst, CUdeviceptr p, size_t n)
{
	struct alloc *a;

	pthread_mutex_lock(&lock);
	run_pending();
	a = find((uintptr_t)p, n);
	if (a)
		memcpy(dst, a->backing + ((uintptr_t)p - a->dev), n);
	pthread_mutex_unlock(&lock);
	return a ? 0 : -1;
}
