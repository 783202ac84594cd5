/*
 * Signals that arrive during a managed write wait until it is staged
 * (docs/DESIGN.md 3.8), without a system call per write.
 *
 * A write is one system call to a signal handler: the handler runs before
 * or after it, never in the middle (where it would find the session lock
 * held, or exit() with part of the write staged).  Blocking signals around
 * each write costs two rt_sigprocmask calls, as much as a whole small
 * write.  Instead, once a session starts, every handler the program
 * installs runs through on_signal.  While this thread is inside a write
 * (sig_hold), a signal is recorded and kept blocked through the
 * interrupted context's mask; sig_release re-queues it to this thread with
 * its siginfo and unblocks it, and the program's handler runs then, as
 * after a plain write().  Default and ignored dispositions stay the
 * kernel's: a fatal signal ends the process in the middle of a write, as
 * it can end a plain one, and what was already published still lands.
 *
 * The program sees its own dispositions through sigaction() and signal().
 * SIGSEGV and SIGBUS belong to efault.c; SIGFPE, SIGILL and SIGTRAP, which
 * a fault raises, are left alone.
 */
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>

#include "shim.h"

#define HELD_MAX 8

/* The program's handler and flags for each signal we run (on_signal is
 * installed in the kernel for it); read in signal context, so atomics. */
static _Atomic(void *) prog_fn[NSIG];
static atomic_int prog_flags[NSIG];
static struct sigaction prog_act[NSIG]; /* full disposition, under sig_lock */
static pthread_mutex_t sig_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int sig_on;

static __thread volatile int tls_hold;
static __thread volatile int tls_nheld;
static __thread struct { int sig; siginfo_t info; } tls_held[HELD_MAX];

static int ours_to_run(int sig)
{
	return sig > 0 && sig < NSIG && sig != SIGKILL && sig != SIGSTOP && sig != SIGSEGV &&
	       sig != SIGBUS && sig != SIGFPE && sig != SIGILL && sig != SIGTRAP;
}

static int is_handler(const struct sigaction *a)
{
	return a->sa_handler != SIG_DFL && a->sa_handler != SIG_IGN;
}

static void on_signal(int sig, siginfo_t *info, void *ucv)
{
	ucontext_t *uc = ucv;
	void *fn;
	int flags;

	if (tls_hold) {
		int n = tls_nheld;

		/* mid-write: keep it blocked until the write is staged */
		if (n < HELD_MAX) {
			tls_held[n].sig = sig;
			tls_held[n].info = *info;
			tls_nheld = n + 1;
			sigaddset(&uc->uc_sigmask, sig);
			return;
		}
		/* more kinds at once than we can hold: run it now */
	}
	fn = atomic_load(&prog_fn[sig]);
	flags = atomic_load(&prog_flags[sig]);
	if (fn == (void *)SIG_DFL || fn == (void *)SIG_IGN) {
		/* changed since it was queued: as the kernel would now */
		struct sigaction a = { .sa_handler = (sighandler_t)fn };
		int e = errno;

		if (fn == (void *)SIG_DFL) {
			real.sigaction(sig, &a, NULL);
			/* blocked until we return, then the default action */
			real.syscall(SYS_tgkill, getpid(), real.syscall(SYS_gettid), sig);
		}
		errno = e;
		return;
	}
	if (flags & SA_RESETHAND) {
		struct sigaction dfl = { .sa_handler = SIG_DFL };
		int e = errno;

		atomic_store(&prog_fn[sig], (void *)SIG_DFL);
		real.sigaction(sig, &dfl, NULL);
		errno = e;
	}
	if (flags & SA_SIGINFO)
		((void (*)(int, siginfo_t *, void *))fn)(sig, info, ucv);
	else
		((void (*)(int))fn)(sig);
}

/* Put the program's disposition for sig in the kernel: ours in front of a
 * handler, anything else as it is.  Under sig_lock. */
static int install(int sig, const struct sigaction *act)
{
	struct sigaction k = *act;

	atomic_store(&prog_flags[sig], act->sa_flags);
	atomic_store(&prog_fn[sig], (act->sa_flags & SA_SIGINFO) ? (void *)act->sa_sigaction
								 : (void *)act->sa_handler);
	if (is_handler(act)) {
		k.sa_sigaction = on_signal;
		k.sa_flags = (act->sa_flags & ~SA_RESETHAND) | SA_SIGINFO;
	}
	return real.sigaction(sig, &k, NULL);
}

/* At session start: run every handler the program has, from now on. */
void sig_init(void)
{
	sigset_t all, old;
	int sig;

	if (atomic_load(&sig_on) || !real.sigaction)
		return;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	pthread_mutex_lock(&sig_lock);
	if (!atomic_load(&sig_on)) {
		for (sig = 1; sig < NSIG; sig++) {
			struct sigaction cur;

			if (!ours_to_run(sig) || real.sigaction(sig, NULL, &cur) < 0)
				continue;
			prog_act[sig] = cur;
			if (is_handler(&cur))
				install(sig, &cur);
			else
				atomic_store(&prog_fn[sig], (void *)cur.sa_handler);
		}
		atomic_store(&sig_on, 1);
	}
	pthread_mutex_unlock(&sig_lock);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/*
 * A vfork child (CPython's subprocess resets every handler there before
 * exec): its dispositions are its own, but our memory is the parent's, so
 * only the kernel's change.  What it reads back is the kernel's, or the
 * parent's program disposition where the kernel still runs our handler.
 */
int sig_action_vfork(int sig, const struct sigaction *act, struct sigaction *old,
		     void (*handler)(int, siginfo_t *, void *), const struct sigaction *prog)
{
	if (old) {
		if (real.sigaction(sig, NULL, old) < 0)
			return -1;
		if (old->sa_sigaction == handler)
			*old = *prog;
	}
	return act ? real.sigaction(sig, act, NULL) : 0;
}

/* The program's sigaction for the signals we run. */
int sig_action(int sig, const struct sigaction *actp, struct sigaction *old)
{
	sigset_t all, omask;
	struct sigaction cur, nact, *act = actp ? &nact : NULL;
	int ret = 0;

	if (actp)
		nact = *actp; /* act and old may be the same struct */
	if (!atomic_load(&sig_on) || !ours_to_run(sig))
		return real.sigaction(sig, act, old);
	if (!session_is_owner())
		return sig_action_vfork(sig, act, old, on_signal, &prog_act[sig]);
	/* a handler may call sigaction: none runs while we hold the lock */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &omask);
	pthread_mutex_lock(&sig_lock);
	if (real.sigaction(sig, NULL, &cur) < 0) {
		ret = -1;
		goto out;
	}
	/* set behind our back (sigset() inside glibc, a raw system call):
	 * the kernel's is the program's */
	if (cur.sa_sigaction != on_signal)
		prog_act[sig] = cur;
	if (old)
		*old = prog_act[sig];
	if (act) {
		ret = install(sig, act);
		if (ret == 0)
			prog_act[sig] = *act;
	}
out:
	pthread_mutex_unlock(&sig_lock);
	{
		int e = errno;

		pthread_sigmask(SIG_SETMASK, &omask, NULL);
		errno = e;
	}
	return ret;
}

/*
 * A write hands held signals back: each is queued again to this thread
 * with its siginfo, then unblocked, so the program's handler runs now.
 */
void sig_release_held(void)
{
	sigset_t set;
	int i, n = tls_nheld;

	sigemptyset(&set);
	for (i = 0; i < n; i++) {
		siginfo_t info = tls_held[i].info;

		real.syscall(SYS_rt_tgsigqueueinfo, getpid(), real.syscall(SYS_gettid),
			     tls_held[i].sig, &info);
		sigaddset(&set, tls_held[i].sig);
	}
	tls_nheld = 0;
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

/* Whether held signals work yet (a session started); before, a write
 * blocks them with the mask. */
int sig_holding(void)
{
	return atomic_load_explicit(&sig_on, memory_order_relaxed);
}

void sig_hold(void)
{
	tls_hold++;
	atomic_signal_fence(memory_order_seq_cst);
}

void sig_release(void)
{
	atomic_signal_fence(memory_order_seq_cst);
	if (--tls_hold == 0 && UNLIKELY(tls_nheld)) {
		int e = errno;

		sig_release_held();
		errno = e;
	}
}
