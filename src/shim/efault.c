/*
 * Copying from the program's buffers the way the kernel does: a bad
 * pointer gives EFAULT (or a short count for the bytes before the bad
 * page), never a SIGSEGV inside our memcpy.
 *
 * The copy runs under a per-thread jump target; our SIGSEGV and SIGBUS
 * handler jumps back when the faulting thread is copying and the address
 * is in its source range.  Every other fault goes to the program's own
 * disposition, which sigaction() and signal() record instead of replacing
 * ours, and report back as if ours were not there.  The fast path costs two
 * thread-local stores.
 */
#include <setjmp.h>
#include <string.h>
#include <sys/syscall.h>

#include "shim.h"

struct guard {
	sigjmp_buf jmp;
	const char *lo, *hi;     /* the source being copied */
	const char *fault;       /* where it faulted */
};

/* volatile: memcpy is a builtin the compiler knows does not read it, and
 * would otherwise drop the store before the copy */
static __thread struct guard *volatile tls_guard;
static struct sigaction prog_act[2]; /* the program's SIGSEGV, SIGBUS; under guard_lock */
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int guard_on;

static int guard_idx(int sig)
{
	return sig == SIGSEGV ? 0 : sig == SIGBUS ? 1 : -1;
}

/* The program's disposition, as if we were not there. */
static void chain(int sig, siginfo_t *info, void *uc)
{
	struct sigaction a = prog_act[guard_idx(sig)];

	if (a.sa_flags & SA_SIGINFO) {
		if (a.sa_flags & SA_RESETHAND)
			prog_act[guard_idx(sig)].sa_handler = SIG_DFL;
		a.sa_sigaction(sig, info, uc);
		return;
	}
	if (a.sa_handler == SIG_IGN && info->si_code <= 0)
		return; /* sent, not raised by a fault: ignored */
	if (a.sa_handler == SIG_DFL || a.sa_handler == SIG_IGN) {
		/* default action: a fault re-executes and kills; a sent signal
		 * is sent again, blocked until we return */
		struct sigaction dfl = { .sa_handler = SIG_DFL };

		real.sigaction(sig, &dfl, NULL);
		if (info->si_code <= 0)
			real.syscall(SYS_tgkill, getpid(), real.syscall(SYS_gettid), sig);
		return;
	}
	if (a.sa_flags & SA_RESETHAND)
		prog_act[guard_idx(sig)].sa_handler = SIG_DFL;
	a.sa_handler(sig);
}

static void on_fault(int sig, siginfo_t *info, void *uc)
{
	struct guard *g = tls_guard;
	const char *addr = info->si_addr;

	if (g && info->si_code > 0 && addr >= g->lo && addr < g->hi) {
		g->fault = addr;
		siglongjmp(g->jmp, 1);
	}
	chain(sig, info, uc);
}

static void install(int sig)
{
	struct sigaction ours = { .sa_sigaction = on_fault };
	const struct sigaction *prog = &prog_act[sig == SIGSEGV ? 0 : 1];

	ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | (prog->sa_flags & SA_RESTART);
	ours.sa_mask = prog->sa_mask;
	real.sigaction(sig, &ours, NULL);
}

/* Take over SIGSEGV and SIGBUS, keeping what the program had. */
void efault_init(void)
{
	if (atomic_load(&guard_on) || !real.sigaction)
		return;
	pthread_mutex_lock(&guard_lock);
	if (!atomic_load(&guard_on)) {
		real.sigaction(SIGSEGV, NULL, &prog_act[0]);
		real.sigaction(SIGBUS, NULL, &prog_act[1]);
		install(SIGSEGV);
		install(SIGBUS);
		atomic_store(&guard_on, 1);
	}
	pthread_mutex_unlock(&guard_lock);
}

/* One guarded memcpy: 0, or -EFAULT with *fault where it faulted. */
static int guarded_copy(void *dst, const void *src, size_t n, const char **fault)
{
	struct guard g;

	g.lo = src;
	g.hi = (const char *)src + n;
	g.fault = NULL;
	if (sigsetjmp(g.jmp, 0)) {
		tls_guard = NULL;
		*fault = g.fault;
		return -EFAULT;
	}
	tls_guard = &g;
	__asm__ volatile("" ::: "memory");
	memcpy(dst, src, n);
	__asm__ volatile("" ::: "memory");
	tls_guard = NULL;
	return 0;
}

/*
 * memcpy that reports a bad source: 0, or -EFAULT with *done the bytes
 * before the first bad page, copied (what the kernel would have written).
 * memcpy does not copy in address order, so after a fault the prefix
 * before the faulting page is copied again, until a copy completes.
 */
void async_signals(sigset_t *set)
{
	sigfillset(set);
	sigdelset(set, SIGSEGV);
	sigdelset(set, SIGBUS);
	sigdelset(set, SIGFPE);
	sigdelset(set, SIGILL);
	sigdelset(set, SIGTRAP);
}

int efault_copy(void *dst, const void *src, size_t n, size_t *done)
{
	const char *fault;
	size_t len = n;

	*done = 0;
	if (UNLIKELY(!atomic_load_explicit(&guard_on, memory_order_relaxed))) {
		memcpy(dst, src, n);
		*done = n;
		return 0;
	}
	while (len && guarded_copy(dst, src, len, &fault) < 0) {
		uintptr_t page = (uintptr_t)fault & ~(uintptr_t)4095;

		len = page > (uintptr_t)src ? page - (uintptr_t)src : 0;
		if (len >= n)
			len = 0;
	}
	*done = len;
	return len == n ? 0 : -EFAULT;
}

/* ---- the program's view of SIGSEGV and SIGBUS ---- */

ACKPT_EXPORT int sigaction(int sig, const struct sigaction *actp, struct sigaction *old)
{
	int i = guard_idx(sig);
	struct sigaction nact, *act = actp ? &nact : NULL;

	if (actp)
		nact = *actp; /* act and old may be the same struct */
	ENSURE_REAL();
	if (i < 0)
		return sig_action(sig, act, old);
	if (!atomic_load(&guard_on))
		return real.sigaction(sig, act, old);
	if (!session_is_owner())
		return sig_action_vfork(sig, act, old, on_fault, &prog_act[i]);
	pthread_mutex_lock(&guard_lock);
	if (old)
		*old = prog_act[i];
	if (act) {
		prog_act[i] = *act;
		install(sig);
	}
	pthread_mutex_unlock(&guard_lock);
	return 0;
}

ACKPT_EXPORT sighandler_t signal(int sig, sighandler_t handler)
{
	struct sigaction act = { .sa_handler = handler, .sa_flags = SA_RESTART }, old;

	ENSURE_REAL();
	if (guard_idx(sig) < 0 ? !sig_holding() : !atomic_load(&guard_on))
		return real.signal(sig, handler);
	sigemptyset(&act.sa_mask);
	sigaddset(&act.sa_mask, sig);
	if (sigaction(sig, &act, &old) < 0)
		return SIG_ERR;
	return old.sa_handler;
}
