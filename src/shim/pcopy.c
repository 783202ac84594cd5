/*
 * A large staging copy split across idle cores.  One thread's memcpy does
 * not reach a socket's memory bandwidth, and while the program's thread
 * copies a chunk into the arena the other cores are often idle (the
 * helper's O_DIRECT writes cost little CPU).  So a chunk of PCOPY_MIN or
 * more is cut into page-aligned parts: the calling thread copies the first,
 * ACKPT_COPY_THREADS worker threads (started on first use, again after a
 * fork) copy the rest, and the call returns when every part is copied.
 * Each part goes through efault_copy, so a bad source still stops at the
 * first bad page: the good prefix is the parts before the first part that
 * faulted, and that part's own good prefix.
 */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shim.h"

#define PCOPY_MIN  (4ull << 20)
#define PCOPY_MAX_THREADS 16

struct part {
	char *dst;
	const char *src;
	size_t len, done;
	int ret;
};

static struct {
	pthread_mutex_t lock;
	pthread_cond_t work, finished;
	pid_t pid;                    /* the process the workers run in */
	int nthreads;
	unsigned gen;                 /* bumped per copy; workers wait for a new one */
	int pending;                  /* parts not yet copied by workers */
	int busy;                     /* a copy owns the parts and workers */
	struct part parts[PCOPY_MAX_THREADS + 1];
} P = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER };

struct worker_arg {
	int idx;
	pid_t pid;
	unsigned gen; /* the generation when it was started: it waits for the next */
};

static void *worker_main(void *arg)
{
	struct worker_arg a = *(struct worker_arg *)arg;
	unsigned seen = a.gen;

	free(arg);
	pthread_mutex_lock(&P.lock);
	for (;;) {
		struct part *p;

		while (P.gen == seen && P.pid == a.pid)
			pthread_cond_wait(&P.work, &P.lock);
		if (P.pid != a.pid)
			break;
		seen = P.gen;
		p = &P.parts[a.idx + 1];
		pthread_mutex_unlock(&P.lock);
		p->ret = p->len ? efault_copy(p->dst, p->src, p->len, &p->done) : 0;
		if (!p->len)
			p->done = 0;
		pthread_mutex_lock(&P.lock);
		if (--P.pending == 0)
			pthread_cond_signal(&P.finished);
	}
	pthread_mutex_unlock(&P.lock);
	return NULL;
}

/* Workers for this process, started with the program's asynchronous
 * signals blocked (faults in the copy stay deliverable).  Under P.lock. */
static int ensure_workers(void)
{
	pid_t me = getpid();
	sigset_t all, old;
	int i;

	if (P.pid == me)
		return P.nthreads;
	/* after fork: the parent's workers are not here */
	P.pid = me;
	P.nthreads = 0;
	async_signals(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (i = 0; i < C.copy_threads && i < PCOPY_MAX_THREADS; i++) {
		struct worker_arg *a = malloc(sizeof(*a));
		pthread_t t;

		if (!a)
			break;
		a->idx = i;
		a->pid = me;
		a->gen = P.gen;
		if (pthread_create(&t, NULL, worker_main, a) != 0) {
			free(a);
			break;
		}
		pthread_detach(t);
		P.nthreads++;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return P.nthreads;
}

/* In a forked child: the workers and whoever held the lock stayed behind. */
void pcopy_atfork_child(void)
{
	pthread_mutex_init(&P.lock, NULL);
	pthread_cond_init(&P.work, NULL);
	pthread_cond_init(&P.finished, NULL);
	P.pid = 0;
	P.nthreads = 0;
	P.pending = 0;
	P.busy = 0;
}

int stage_copy(void *dst, const void *src, size_t n, size_t *done)
{
	size_t step, off = 0;
	int k, nparts, ret, cancel;

	if (n < PCOPY_MIN || C.copy_threads <= 0)
		return efault_copy(dst, src, n, done);
	pthread_mutex_lock(&P.lock);
	/* another thread's copy has the workers (copies run outside the
	 * session lock): the cores are busy anyway, copy alone */
	if (P.busy) {
		pthread_mutex_unlock(&P.lock);
		return efault_copy(dst, src, n, done);
	}
	nparts = ensure_workers() + 1;
	if (nparts < 2) {
		pthread_mutex_unlock(&P.lock);
		return efault_copy(dst, src, n, done);
	}
	P.busy = 1;
	step = ((n + nparts - 1) / nparts + 4095) & ~(size_t)4095;
	for (k = 0; k < nparts; k++) {
		struct part *p = &P.parts[k];
		/* the last part takes whatever is left */
		size_t len = k == nparts - 1 ? n - off : n - off < step ? n - off : step;

		p->dst = (char *)dst + off;
		p->src = (const char *)src + off;
		p->len = len;
		p->done = 0;
		p->ret = 0;
		off += len;
	}
	P.pending = nparts - 1;
	P.gen++;
	pthread_cond_broadcast(&P.work);
	pthread_mutex_unlock(&P.lock);
	/* the wait below is a cancellation point: a thread cancelled there
	 * would leave the workers owned and its staging record unfilled */
	pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);

	P.parts[0].ret = efault_copy(P.parts[0].dst, P.parts[0].src, P.parts[0].len,
				     &P.parts[0].done);

	pthread_mutex_lock(&P.lock);
	while (P.pending)
		pthread_cond_wait(&P.finished, &P.lock);
	*done = 0;
	ret = 0;
	for (k = 0; k < nparts; k++) {
		*done += P.parts[k].done;
		if (P.parts[k].ret < 0) {
			ret = P.parts[k].ret;
			break;
		}
	}
	P.busy = 0;
	pthread_mutex_unlock(&P.lock);
	pthread_setcancelstate(cancel, NULL);
	return ret;
}
