/*
 * D2H copy bandwidth into the kinds of host memory the shim may copy into,
 * and the cost of the calls it makes per write and per chunk, side by side
 * in one run (tests/gpu/run.sh prints the ratios).
 *
 *   d2h_bench MIB
 *
 *   pageable        malloc'd, pre-touched
 *   memfd           a MAP_SHARED memfd mapping like the staging arena, not registered
 *   registered      the same mapping after cudaHostRegister(portable): the pinned arena
 *   mallochost      cudaMallocHost: the best the machine does
 *   register_gbps   how fast cudaHostRegister pins (why the shim does it off the critical path)
 *   attr_host_ns    cuPointerGetAttribute(MEMORY_TYPE) on a host pointer (every managed write)
 *   attr_dev_ns     the same on a device pointer
 *   ctxsync_idle_ns cuCtxSynchronize with nothing queued (once per device chunk)
 *
 * Prints "key value" lines; exits 0, or 2 when a call fails.
 */
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void check(cudaError_t e, const char *what)
{
	if (e != cudaSuccess) {
		fprintf(stderr, "d2h_bench: %s: %s\n", what, cudaGetErrorString(e));
		exit(2);
	}
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Best of three synchronous D2H copies, in GB/s. */
static double d2h_gbps(void *dst, const void *src, size_t n)
{
	double best = 1e30;

	for (int k = 0; k < 3; k++) {
		double t0 = now();

		check(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost), "cudaMemcpy");
		if (now() - t0 < best)
			best = now() - t0;
	}
	return n / best / 1e9;
}

int main(int argc, char **argv)
{
	size_t n = (size_t)(argc > 1 ? atof(argv[1]) : 1024) * (1ull << 20);
	CUresult (*get_attr)(void *, CUpointer_attribute, CUdeviceptr);
	CUresult (*ctx_sync)(void);
	void *dev, *pageable, *shared, *pinned, *lib;
	unsigned type;
	double t0, reg_s;
	int fd, iters = 200000;

	check(cudaSetDevice(0), "cudaSetDevice");
	check(cudaFree(0), "cudaFree(0)");  /* create the primary context */
	check(cudaMalloc(&dev, n), "cudaMalloc");
	check(cudaMemset(dev, 0x5a, n), "cudaMemset");
	check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");

	pageable = malloc(n);
	if (!pageable)
		return 2;
	memset(pageable, 1, n);
	printf("bytes %zu\n", n);
	printf("pageable_gbps %.2f\n", d2h_gbps(pageable, dev, n));

	fd = (int)syscall(SYS_memfd_create, "d2h_bench", 0);
	if (fd < 0 || ftruncate(fd, (off_t)n))
		return 2;
	shared = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (shared == MAP_FAILED)
		return 2;
	printf("memfd_gbps %.2f\n", d2h_gbps(shared, dev, n));
	t0 = now();
	check(cudaHostRegister(shared, n, cudaHostRegisterPortable), "cudaHostRegister");
	reg_s = now() - t0;
	printf("register_gbps %.2f\n", n / reg_s / 1e9);
	printf("registered_gbps %.2f\n", d2h_gbps(shared, dev, n));

	check(cudaMallocHost(&pinned, n), "cudaMallocHost");
	printf("mallochost_gbps %.2f\n", d2h_gbps(pinned, dev, n));

	/* the driver calls the shim makes, through the process's own libcuda */
	lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
	get_attr = lib ? (CUresult(*)(void *, CUpointer_attribute, CUdeviceptr))dlsym(lib, "cuPointerGetAttribute") : NULL;
	ctx_sync = lib ? (CUresult(*)(void))dlsym(lib, "cuCtxSynchronize") : NULL;
	if (get_attr && ctx_sync) {
		t0 = now();
		for (int i = 0; i < iters; i++)
			get_attr(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)pageable);
		printf("attr_host_ns %.0f\n", (now() - t0) / iters * 1e9);
		t0 = now();
		for (int i = 0; i < iters; i++)
			get_attr(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, (CUdeviceptr)(uintptr_t)dev);
		printf("attr_dev_ns %.0f\n", (now() - t0) / iters * 1e9);
		t0 = now();
		for (int i = 0; i < iters / 10; i++)
			ctx_sync();
		printf("ctxsync_idle_ns %.0f\n", (now() - t0) / (iters / 10) * 1e9);
	}
	check(cudaHostUnregister(shared), "cudaHostUnregister");
	return 0;
}
