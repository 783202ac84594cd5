/*
 * Device memory, as a run-time option: compiled against cuda.h only, never
 * linked.  The shim uses the process's own driver, and only when it is
 * already loaded (dlopen RTLD_NOLOAD of libcuda.so.1, looked for again at
 * each managed open, never per write) and a context exists; it never
 * creates a context, the helper never touches CUDA, and a forked child
 * (DataLoader workers) never calls CUDA through the shim.
 *
 * A write whose source is device or managed memory is copied into the
 * staging arena with cuMemcpyDtoHAsync on a private non-blocking stream.
 * Ordering rule: the context is synchronized first (cuCtxSynchronize), so
 * every kernel or copy already queued on any stream of the writer's context,
 * its current stream included, has finished before we read the buffer; a
 * host write() promises nothing weaker.  The arena is registered with
 * cuMemHostRegister (portable) once, off the critical path, so the copies
 * run at full PCIe bandwidth; until then they still work, more slowly.
 */
#include <dlfcn.h>
#include <link.h>
#include <stddef.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "shim.h"

#if ACKPT_HAVE_CUDA_HEADERS
#include <cuda.h>

static struct {
	atomic_int state;        /* 0 unknown/absent, 1 usable, -1 disabled (fork child) */
	void *lib;
	CUresult (*pointer_get_attribute)(void *, CUpointer_attribute, CUdeviceptr);
	CUresult (*ctx_get_current)(CUcontext *);
	CUresult (*ctx_set_current)(CUcontext);
	CUresult (*ctx_synchronize)(void);
	CUresult (*stream_create)(CUstream *, unsigned);
	CUresult (*stream_synchronize)(CUstream);
	CUresult (*memcpy_dtoh_async)(void *, CUdeviceptr, size_t, CUstream);
	CUresult (*mem_host_register)(void *, size_t, unsigned);
	CUresult (*mem_host_unregister)(void *);
	CUresult (*ctx_push)(CUcontext);
	CUresult (*ctx_pop)(CUcontext *);
	struct { CUcontext ctx; CUstream stream; } streams[8];
	atomic_int pin_state;    /* 0 not started, 1 in progress, 2 pinned, -1 failed */
	void *pinned_base;
	uint64_t copies, copy_bytes;
} G;

static void *sym(const char *name)
{
	return dlsym(G.lib, name);
}

/* Look for the process's own libcuda; cheap enough for each managed open. */
void cuda_probe(void)
{
	void *lib;

	if (atomic_load(&G.state) != 0)
		return;
	lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
	if (!lib)
		return;
	G.lib = lib;
	G.pointer_get_attribute = sym("cuPointerGetAttribute");
	G.ctx_get_current = sym("cuCtxGetCurrent");
	G.ctx_set_current = sym("cuCtxSetCurrent");
	G.ctx_synchronize = sym("cuCtxSynchronize");
	G.stream_create = sym("cuStreamCreate");
	G.stream_synchronize = sym("cuStreamSynchronize");
	G.memcpy_dtoh_async = sym("cuMemcpyDtoHAsync_v2");
	G.mem_host_register = sym("cuMemHostRegister_v2");
	G.mem_host_unregister = sym("cuMemHostUnregister");
	G.ctx_push = sym("cuCtxPushCurrent_v2");
	G.ctx_pop = sym("cuCtxPopCurrent_v2");
	if (!G.pointer_get_attribute || !G.ctx_get_current || !G.ctx_synchronize ||
	    !G.stream_create || !G.stream_synchronize || !G.memcpy_dtoh_async || !G.ctx_push ||
	    !G.ctx_pop) {
		alog(L_WARN, "libcuda.so.1 lacks the driver API we need; device writes unsupported");
		dlclose(lib);
		G.lib = NULL;
		return;
	}
	atomic_store(&G.state, 1);
	alog(L_DEBUG, "CUDA driver found in the process; device-pointer writes enabled");
}

void cuda_fork_child(void)
{
	atomic_store(&G.state, -1);
}

static void *pin_main(void *arg)
{
	CUcontext ctx = arg;
	CUresult r;

	if (G.ctx_set_current(ctx) != CUDA_SUCCESS) {
		atomic_store(&G.pin_state, -1);
		return NULL;
	}
	r = G.mem_host_register(S.arena, S.arena_size, CU_MEMHOSTREGISTER_PORTABLE);
	if (r != CUDA_SUCCESS) {
		alog(L_WARN, "cannot pin the staging arena for device copies (CUDA error %d); "
		     "device writes stay correct but slower", (int)r);
		atomic_store(&G.pin_state, -1);
		return NULL;
	}
	G.pinned_base = S.arena;
	atomic_store(&G.pin_state, 2);
	alog(L_DEBUG, "staging arena pinned for device copies");
	return NULL;
}

/* Register the arena once, in the background (or now, with ACKPT_PIN=eager). */
static void pin_arena(CUcontext ctx)
{
	const char *mode = getenv("ACKPT_PIN");
	int expected = 0;
	pthread_t t;

	if (!G.mem_host_register || !atomic_compare_exchange_strong(&G.pin_state, &expected, 1))
		return;
	if (mode && !strcmp(mode, "eager")) {
		pin_main(ctx);
		return;
	}
	if (pthread_create(&t, NULL, pin_main, ctx) == 0)
		pthread_detach(t);
	else
		atomic_store(&G.pin_state, 0);
}

/* 1 if p is device (or managed) memory; never initialises CUDA (an
 * uninitialised driver answers CUDA_ERROR_NOT_INITIALIZED: host memory). */
int cuda_is_device(const void *p)
{
	unsigned type = 0;

	if (LIKELY(atomic_load_explicit(&G.state, memory_order_relaxed) != 1))
		return 0;
	if (G.pointer_get_attribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
				    (CUdeviceptr)(uintptr_t)p) != CUDA_SUCCESS)
		return 0;
	return type == CU_MEMORYTYPE_DEVICE || type == CU_MEMORYTYPE_UNIFIED;
}

static CUstream stream_for(CUcontext ctx)
{
	unsigned i;

	for (i = 0; i < 8; i++)
		if (G.streams[i].ctx == ctx)
			return G.streams[i].stream;
	for (i = 0; i < 8; i++)
		if (!G.streams[i].ctx) {
			if (G.stream_create(&G.streams[i].stream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS)
				return NULL;
			G.streams[i].ctx = ctx;
			return G.streams[i].stream;
		}
	return NULL;
}

/*
 * Copy n bytes of device memory at src into dst (inside the arena), in the
 * context that owns src (made current for the copy, whatever the calling
 * thread has current): synchronize that context, then copy on our stream.
 */
int cuda_copy_to_host(void *dst, const void *src, size_t n)
{
	CUcontext ctx = NULL, popped;
	CUstream st;
	int ret = 0;

	if (G.pointer_get_attribute(&ctx, CU_POINTER_ATTRIBUTE_CONTEXT,
				    (CUdeviceptr)(uintptr_t)src) != CUDA_SUCCESS || !ctx)
		return -EFAULT;
	if (G.ctx_push(ctx) != CUDA_SUCCESS)
		return -EFAULT;
	st = stream_for(ctx);
	if (!atomic_load(&G.pin_state))
		pin_arena(ctx);
	if (!st || G.ctx_synchronize() != CUDA_SUCCESS ||
	    G.memcpy_dtoh_async(dst, (CUdeviceptr)(uintptr_t)src, n, st) != CUDA_SUCCESS ||
	    G.stream_synchronize(st) != CUDA_SUCCESS)
		ret = -EIO;
	G.ctx_pop(&popped);
	if (!ret) {
		G.copies++;
		G.copy_bytes += n;
	}
	return ret;
}

/* A managed file was opened and the arena exists: pin it now if CUDA is
 * live in this thread, so the first checkpoint's copies are already fast. */
void cuda_session_ready(void)
{
	CUcontext ctx = NULL;

	if (atomic_load(&G.state) != 1 || atomic_load(&G.pin_state) || !S.arena)
		return;
	if (G.ctx_get_current(&ctx) == CUDA_SUCCESS && ctx)
		pin_arena(ctx);
}

/* The loader's count of objects ever loaded (0 if this glibc lacks it):
 * the first object's dlpi_adds is enough. */
static int adds_cb(struct dl_phdr_info *info, size_t size, void *data)
{
	if (size >= offsetof(struct dl_phdr_info, dlpi_adds) + sizeof(info->dlpi_adds))
		*(unsigned long long *)data = info->dlpi_adds;
	return 1;
}

/*
 * A write large enough to matter on an fd opened before the driver was
 * loaded: look again, but only if some library was loaded since the last
 * look.  A dlopen with RTLD_NOLOAD of a library that is not there opens and
 * maps the loader's cache each time (five system calls under the loader's
 * lock), which every 64 KiB write of a process without CUDA paid; asking
 * the loader how many objects it has loaded so far costs none.
 */
void cuda_probe_late(size_t len)
{
	static _Atomic unsigned long long seen = ~0ull;
	unsigned long long adds = 0;

	if (len < (64u << 10) || atomic_load_explicit(&G.state, memory_order_relaxed) != 0)
		return;
	dl_iterate_phdr(adds_cb, &adds);
	if (adds && atomic_exchange(&seen, adds) == adds)
		return;
	cuda_probe();
}

/* At exit, after the last copy: give the pinned pages back. */
void cuda_exit(void)
{
	int i;

	/* a registration still running in the background finishes first */
	for (i = 0; i < 3000 && atomic_load(&G.pin_state) == 1; i++)
		usleep(10000);
	if (atomic_load(&G.state) == 1 && atomic_load(&G.pin_state) == 2 && G.mem_host_unregister &&
	    session_is_owner()) {
		G.mem_host_unregister(G.pinned_base);
		atomic_store(&G.pin_state, 0);
	}
}

int cuda_state(void)
{
	return atomic_load(&G.state) == 1 ? 1 + (atomic_load(&G.pin_state) == 2) : 0;
}

#else /* built without CUDA headers */

void cuda_probe(void) {}
void cuda_session_ready(void) {}
void cuda_probe_late(size_t len) { (void)len; }
void cuda_fork_child(void) {}
int cuda_is_device(const void *p) { (void)p; return 0; }
int cuda_copy_to_host(void *dst, const void *src, size_t n) { (void)dst; (void)src; (void)n; return -EFAULT; }
void cuda_exit(void) {}
int cuda_state(void) { return 0; }

#endif
