/*
 * The table of real libc functions.  Resolved in a constructor and, because
 * another library's constructor (jemalloc, tcmalloc) may call a wrapper
 * before ours runs, lazily on first use with a re-entry guard.
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>

#include "shim.h"

struct ackpt_real real;
atomic_int real_ready;
static atomic_int resolving;

static void *self_base;

static void *resolve_one(const char *name)
{
	void *p = dlsym(RTLD_NEXT, name);
	Dl_info info;

	if (p && dladdr(p, &info) && info.dli_fbase == self_base) {
		static const char msg[] = "ackpt: fatal: dlsym returned the wrapper itself\n";
		syscall(SYS_write, 2, msg, sizeof(msg) - 1);
		abort();
	}
	return p;
}

void real_resolve(void)
{
	int expected = 0;

	if (atomic_load(&real_ready))
		return;
	if (!atomic_compare_exchange_strong(&resolving, &expected, 1)) {
		/* Re-entered from dlsym's own allocations: callers fall back to raw
		 * syscalls for the handful of functions that matter then. */
		return;
	}
	{
		Dl_info info;

		if (dladdr((void *)real_resolve, &info))
			self_base = info.dli_fbase;
	}
#define X(ret, name, args) real.name = (ret(*) args)resolve_one(#name);
	ACKPT_REAL_FUNCS(X)
#undef X
	util_realpath = real.realpath;
	util_readlink = real.readlink;
	atomic_store_explicit(&real_ready, 1, memory_order_release);
}

__attribute__((constructor(101))) static void real_ctor(void)
{
	real_resolve();
	config_load();
	registry_init();
	session_init_once();
}
