/*
 * The session: one staging arena and one helper per process, started on the
 * first managed open.  Here: the session lock, starting the session (its
 * memfd, socket and helper), waiting for progress with a progress line,
 * errors the helper reported, fork handling and the drain at exit.  The
 * rest of the session's jobs have their own files (shim.h lists them).
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>

#include "arena.h"
#include "config.h"
#include "shim.h"

struct session S = { .lock = PTHREAD_MUTEX_INITIALIZER, .started = PTHREAD_COND_INITIALIZER,
		     .memfd = -1, .sock = -1 };
__thread int tls_busy;
extern char **environ;

int session_is_owner(void)
{
	return S.owner == getpid();
}

int session_lock(void)
{
	if (tls_busy)
		return -EDEADLK; /* a signal handler re-entered us: pass through */
	if (!session_is_owner())
		return -ECHILD;  /* vfork child sharing our memory: hands off */
	pthread_mutex_lock(&S.lock);
	tls_busy = 1;
	return 0;
}

void session_unlock(void)
{
	tls_busy = 0;
	pthread_mutex_unlock(&S.lock);
}

/* Take the lock again after dropping it on purpose (tls_busy was cleared). */
static void relock(void)
{
	pthread_mutex_lock(&S.lock);
	tls_busy = 1;
}

/* The one way to wait with the lock held: drop it, wait until op seq is
 * done, retake it, and free what completed.  Pointers into the tables from
 * before are stale after this. */
DROPS void session_unlock_wait(uint64_t seq)
{
	session_unlock();
	session_wait(seq, 0, 0);
	relock();
	session_reap();
}

uint64_t session_durable(void)
{
	if (!S.shm)
		return S.seq;
	if (S.state == SESS_DEAD)
		return S.seq;
	return __atomic_load_n(&S.shm->durable_seq, __ATOMIC_ACQUIRE);
}

int helper_alive(void)
{
	struct pollfd p = { .fd = S.sock, .events = POLLIN };

	if (S.sock < 0)
		return 0;
	if (poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)))
		return 0; /* the helper never sends: readable means it hung up */
	return 1;
}

/* Every wait here is for the helper's progress: wake it first if it sleeps. */
int futex_wait_gen(uint32_t old, uint64_t timeout_ns)
{
	struct timespec ts = { (time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull) };

	session_bell();

	return syscall(SYS_futex, &S.shm->progress_gen, FUTEX_WAIT, old, &ts, NULL, 0);
}

/*
 * Wait for the helper to publish its pid (once it is up and, in a
 * multi-rank job, registered with the coordinator).  unlocked: an early
 * start (ACKPT_EARLY_START), which waits with the session lock dropped, so
 * that the program's other threads are not held up meanwhile (dup, fcntl,
 * close_range take the lock; a managed open waits for the start in
 * session_ensure).  The socket can move (a dup2 onto it) only under the
 * lock, so its liveness is checked with the lock taken again.
 */
static int helper_wait_up(uint64_t t0, uint64_t limit, int unlocked)
{
	int ret = 0;

	if (unlocked) {
		S.start_unlocked = 1;
		session_unlock();
	}
	while (!__atomic_load_n(&S.shm->helper_pid, __ATOMIC_ACQUIRE)) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);
		int alive;

		if (__atomic_load_n(&S.shm->helper_pid, __ATOMIC_ACQUIRE))
			break;
		if (unlocked)
			relock();
		alive = helper_alive();
		if (unlocked)
			session_unlock();
		if (!alive || now_ns() - t0 > limit) {
			alog(L_WARN, "ackpt-helper did not start; writes stay synchronous");
			ret = -ECHILD;
			break;
		}
		futex_wait_gen(gen, 50000000ull);
	}
	if (unlocked) {
		relock();
		S.start_unlocked = 0;
		pthread_cond_broadcast(&S.started);
	}
	return ret;
}

static int session_start(int early)
{
	uint64_t hdr = ackpt_shm_hdr_size();
	uint64_t t0 = now_ns(), start_limit = 10000000000ull;
	int sv[2] = { -1, -1 };
	int ret;
	pthread_t t;
	sigset_t all, old;

	/* before any channel exists: close_range must spare them (posix.c) */
	__atomic_store_n(&S.starting, 1, __ATOMIC_SEQ_CST);
	S.arena_size = config_staging();
	/* a memfd's size counts against RLIMIT_FSIZE as a file's does: past
	 * it, the ftruncate below would raise SIGXFSZ in the program (ulimit
	 * -f).  Stage within the limit, or not at all */
	if (hdr + S.arena_size > rlimit_fsize()) {
		uint64_t lim = rlimit_fsize();
		uint64_t fit = lim > hdr ? (lim - hdr) & ~((2ull << 20) - 1) : 0;

		if (fit < (16ull << 20)) {
			alog(L_WARN, "RLIMIT_FSIZE (%llu bytes) leaves no room for staging; writes stay synchronous",
			     (unsigned long long)lim);
			ret = -EFBIG;
			goto err;
		}
		alog(L_INFO, "staging capped at %llu MiB by RLIMIT_FSIZE",
		     (unsigned long long)(fit >> 20));
		S.arena_size = fit;
	}
	/* the fault injector's nth write is the nth write call (or chunk):
	 * with it, a write never extends the record of the one before */
	C.extend = !getenv("ACKPT_FAULT");
	S.memfd = memfd_create("ackpt-staging", MFD_CLOEXEC);
	if (S.memfd < 0) {
		ret = -errno;
		__atomic_store_n(&S.starting, 0, __ATOMIC_RELEASE);
		return ret;
	}
	S.memfd = fd_move_high(S.memfd);
	if (ftruncate(S.memfd, hdr + S.arena_size) < 0) {
		ret = -errno;
		goto err;
	}
	S.shm = mmap(NULL, hdr + S.arena_size, PROT_READ | PROT_WRITE, MAP_SHARED, S.memfd, 0);
	if (S.shm == MAP_FAILED) {
		S.shm = NULL;
		ret = -errno;
		goto err;
	}
	/* 2 MiB pages where the node allows them for shared memory
	 * (shmem_enabled advise, within_size or always): first touch of the
	 * arena is several times faster.  The helper, which faults the arena
	 * in through its own mapping, says the same.  No effect under never */
	madvise(S.shm, hdr + S.arena_size, MADV_HUGEPAGE);
	S.arena = (char *)S.shm + hdr;
	S.shm->magic = ACKPT_PROTO_MAGIC;
	S.shm->version = ACKPT_PROTO_VERSION;
	S.shm->coord_part = -1;
	config_for_helper(&S.shm->cfg);
	S.shm->hdr_size = hdr;
	S.shm->arena_size = S.arena_size;
	S.max_chunk = S.arena_size / 4 < (16ull << 20) ? S.arena_size / 4 : (16ull << 20);
	S.max_chunk &= ~(uint64_t)(ACKPT_ARENA_ALIGN - 1);

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		ret = -errno;
		goto err;
	}
	S.sock = fd_move_high(sv[0]);
	fd_protect(S.memfd, 1);
	fd_protect(S.sock, 1);
	ret = spawn_helper(sv[1]);
	real.close(sv[1]);
	if (ret < 0)
		goto err;
	/* the open that started us returns only once the helper is up (and,
	 * in a multi-rank job, registered: it may wait for the coordinator;
	 * an early start waits with the lock dropped) */
	if (C.multi_rank && !C.coord_host) {
		double t = C.barrier_timeout < 120 ? C.barrier_timeout : 120;

		start_limit = (uint64_t)((t + 10) * 1e9);
	}
	ret = helper_wait_up(t0, start_limit, early);
	if (ret < 0)
		goto err;
	S.helper_pid = S.shm->helper_pid;
	S.head = 0;
	S.ext_at = UINT64_MAX;
	S.seq = 0;
	oplog_reset();
	__atomic_store_n(&S.state, SESS_ACTIVE, __ATOMIC_RELEASE); /* session_shm */
	efault_init(); /* from now on we copy from the program's buffers */
	sig_init();    /* ... and hold signals that arrive mid-write */

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	if (pthread_create(&t, NULL, arena_prefault_main, NULL) == 0)
		pthread_detach(t);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	alog(L_DEBUG, "session started: arena %llu MiB, helper %d (%s%s)",
	     (unsigned long long)(S.arena_size >> 20), (int)S.helper_pid,
	     S.shm->helper_flags & ACKPT_HF_URING ? "io_uring" : "pwrite pool",
	     S.shm->helper_flags & ACKPT_HF_DIRECT ? ", O_DIRECT" : "");
	__atomic_store_n(&S.starting, 0, __ATOMIC_RELEASE);
	return 0;
err:
	if (S.sock >= 0) {
		fd_protect(S.sock, 0);
		real.close(S.sock);
	}
	if (S.shm)
		munmap(S.shm, hdr + S.arena_size);
	if (S.memfd >= 0) {
		fd_protect(S.memfd, 0);
		real.close(S.memfd);
	}
	S.sock = S.memfd = -1;
	S.shm = NULL;
	S.arena = NULL;
	S.state = SESS_FAILED;
	__atomic_store_n(&S.starting, 0, __ATOMIC_RELEASE);
	return ret;
}

/* Start the session if it is not up.  Called with the lock held; another
 * thread's early start that waits for its helper is waited for. */
int session_ensure(void)
{
	while (S.start_unlocked)
		pthread_cond_wait(&S.started, &S.lock);
	switch (S.state) {
	case SESS_ACTIVE:
		return 0;
	case SESS_NONE:
		return session_start(0);
	default:
		return -ENOTCONN;
	}
}

/*
 * The helper has died while we wait for it: repair (the arena's unconfirmed
 * data rewritten synchronously) and say so. A vfork child shares our
 * memory, so only the owner repairs.
 */
int helper_gone(void)
{
	if (helper_alive())
		return 0;
	/* through session_lock, so that what the repair calls sees the lock
	 * as held (a wrapper reached from it must not take it again); a
	 * thread that already holds it (a signal handler re-entering us) does
	 * not repair in the middle of its own update */
	if (session_lock() == 0) {
		session_helper_died();
		session_unlock();
	}
	return 1;
}

int session_check_error(struct inode_state *ino)
{
	uint32_t seq;
	int r = session_check_commit_error();

	if (r)
		return r;
	if (!S.shm || !ino)
		return 0;
	seq = __atomic_load_n(&S.shm->files[ino->slot].err_seq, __ATOMIC_ACQUIRE);
	if (seq == ino->reported_err_seq)
		return 0;
	ino->reported_err_seq = seq;
	ino->err_told = 1;
	return -__atomic_load_n(&S.shm->files[ino->slot].err, __ATOMIC_ACQUIRE);
}

/*
 * For fsync and friends: the file's error is reported at every call, not
 * once. The helper writes nothing more to a file whose write or fsync
 * failed, so a retried fsync that returned 0 would claim durability for
 * data that was dropped (PostgreSQL's "fsyncgate": never retry a failed
 * fsync and trust it).
 */
int session_check_error_sticky(struct inode_state *ino)
{
	int r = session_check_error(ino);

	if (r || !S.shm || !ino)
		return r;
	return -__atomic_load_n(&S.shm->files[ino->slot].err, __ATOMIC_ACQUIRE);
}

/* Wait (without the session lock) until every op up to seq is complete. */
int session_wait(uint64_t seq, double timeout_s, int progress)
{
	uint64_t t0 = now_ns(), last_print = 0, last_bytes = 0, last_t = t0;
	uint64_t deadline = timeout_s > 0 ? t0 + (uint64_t)(timeout_s * 1e9) : UINT64_MAX;
	int printed = 0, tty = isatty(2);

	if (!S.shm)
		return 0;
	while (session_durable() < seq) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);
		uint64_t t;

		if (session_durable() >= seq)
			break;
		t = now_ns();
		if (t >= deadline)
			return -ETIMEDOUT;
		if (helper_gone())
			break;
		if (progress && t - t0 > 1000000000ull && t - last_print >= 1000000000ull) {
			uint64_t written = __atomic_load_n(&S.shm->bytes_written, __ATOMIC_RELAXED);
			uint64_t left = S.head - __atomic_load_n(&S.shm->arena_tail, __ATOMIC_RELAXED);
			double rate = last_print ? (written - last_bytes) / ((t - last_t) / 1e9) : 0;

			if (tty)
				dprintf(2, "\rackpt: waiting for %.1f MiB to reach storage (%.0f MiB/s)   ",
					left / 1048576.0, rate / 1048576.0);
			else
				dprintf(2, "ackpt: waiting for %.1f MiB to reach storage (%.0f MiB/s)\n",
					left / 1048576.0, rate / 1048576.0);
			printed = 1;
			last_print = t;
			last_bytes = written;
			last_t = t;
		}
		futex_wait_gen(gen, 100000000ull);
	}
	if (printed && tty)
		dprintf(2, "\rackpt: staged data is durable%40s\n", "");
	return 0;
}

int session_wait_uploads(uint64_t seq, double timeout_s, int progress)
{
	uint64_t t0 = now_ns(), next = t0 + 1000000000ull;
	uint64_t deadline = timeout_s > 0 ? t0 + (uint64_t)(timeout_s * 1e9) : UINT64_MAX;

	if (!S.shm || !C.upload_url)
		return 0;
	for (;;) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);
		uint64_t t;

		if (__atomic_load_n(&S.shm->upload_state, __ATOMIC_ACQUIRE) != 1 ||
		    __atomic_load_n(&S.shm->upload_seq, __ATOMIC_ACQUIRE) >= seq || helper_gone())
			return 0;
		t = now_ns();
		if (t >= deadline)
			return -ETIMEDOUT;
		if (progress && t >= next) {
			dprintf(2, "ackpt: waiting for %llu upload(s) to %s (%.1f MiB sent so far)\n",
				(unsigned long long)__atomic_load_n(&S.shm->uploads_pending, __ATOMIC_RELAXED),
				C.upload_url,
				__atomic_load_n(&S.shm->uploaded_bytes, __ATOMIC_RELAXED) / 1048576.0);
			next = t + 5000000000ull;
		}
		futex_wait_gen(gen, 100000000ull);
	}
}

int session_sync_all(double timeout_s, int progress)
{
	uint64_t seq, commits;
	int ret;

	if (session_lock() < 0)
		return 0;
	if (S.state != SESS_ACTIVE) {
		session_unlock();
		return 0;
	}
	ret = session_send_simple(ACKPT_OP_SYNC_ALL, NULL);
	seq = S.seq;
	commits = S.commits_requested;
	session_unlock();
	if (ret < 0)
		return 0; /* helper gone: everything was rewritten synchronously */
	ret = session_wait(seq, timeout_s, progress);
	if (ret == 0)
		ret = session_wait_commit(commits, timeout_s);
	return ret;
}

/* Drop log records and inode states the helper has confirmed. */
void session_reap(void)
{
	uint64_t durable = session_durable();

	oplog_prune(durable);
	ns_prune(durable);
	oplog_prune_commits(session_commits_done());
}

/* ---- fork and exit ---- */

/*
 * The lock is not held across fork: glibc's fork takes the stdio list lock
 * after the prepare handlers, and a thread in fflush(NULL) holds that lock
 * while it flushes one of our streams, which takes ours.  The child throws
 * all our state away instead of reading it (atfork_child), so it needs no
 * consistent snapshot.
 */
static void atfork_prepare(void)
{
	/* the child inherits every descriptor: they all become shared */
	if (!tls_busy && session_is_owner()) {
		files_share(1);
		settle_closed_executables();
	}
}

static void atfork_child(void)
{
	pthread_mutex_init(&S.lock, NULL);
	pthread_cond_init(&S.started, NULL);
	S.start_unlocked = 0; /* the parent's starting thread is not here */
	pcopy_atfork_child();
	tls_busy = 0;
	S.owner = getpid();
	C.coord_host = 0; /* the parent's helper hosts the coordinator */
	cuda_fork_child(); /* a CUDA context does not survive fork */
	job_fork_child();
	if (S.state == SESS_NONE || S.state == SESS_FAILED) {
		/* another thread of the parent was starting the session (at
		 * program start: ACKPT_EARLY_START): its channels are the
		 * parent's, and a copy of the socket here would keep its helper
		 * from seeing the parent hang up */
		if (S.sock >= 0) {
			fd_protect(S.sock, 0);
			real.close(S.sock);
		}
		if (S.memfd >= 0) {
			fd_protect(S.memfd, 0);
			real.close(S.memfd);
		}
		if (S.shm)
			munmap(S.shm, ackpt_shm_hdr_size() + S.arena_size);
		S.sock = S.memfd = -1;
		S.shm = NULL;
		S.arena = NULL;
		S.starting = 0;
		return;
	}
	/* The parent's helper and arena stay the parent's; this child starts
	 * its own session on its first managed open. */
	oplog_fork_child();
	files_fork_child();
	ns_reset();
	if (S.sock >= 0)
		real.close(S.sock);
	if (S.memfd >= 0)
		real.close(S.memfd);
	if (S.shm)
		munmap(S.shm, ackpt_shm_hdr_size() + S.arena_size);
	fd_protect(S.sock, 0);
	fd_protect(S.memfd, 0);
	S.sock = S.memfd = -1;
	S.shm = NULL;
	S.arena = NULL;
	S.state = SESS_NONE;
	S.seq = 0;
	S.head = 0;
	S.ninodes = 0;
	S.bytes_staged = S.files = S.stall_ns = S.bytes_through = 0;
	S.copying = 0; /* a parent's thread mid-copy is not here */
	S.copies_overlapped = 0;
	S.through_bytes = S.through_ns = S.waited_bytes = S.waited_ns = 0;
	S.commits_requested = S.commit_failures_seen = S.dead_commit_failures = 0;
}

/* ---- starting early ---- */

/* s, or the part of it after its last '/', is one of names[0..n) */
static int names_one_of(const char *s, const char *const *names, size_t n)
{
	const char *base = strrchr(s, '/');
	size_t i;

	for (i = 0; i < n; i++)
		if (!strcmp(base ? base + 1 : s, names[i]))
			return 1;
	return 0;
}

/*
 * A Python program that is not a launcher: its executable is a Python
 * interpreter, and neither its name (a console script: torchrun,
 * deepspeed, accelerate) nor an argument of its command line (python
 * .../torchrun, python -m torch.distributed.run) names one.  A launcher
 * never checkpoints.
 */
static int looks_like_trainer(void)
{
	static const char *const launchers[] = { "torchrun", "deepspeed", "accelerate",
						 "torch.distributed.run", "torch.distributed.launch" };
	const size_t nl = sizeof(launchers) / sizeof(launchers[0]);
	char buf[4096];
	const char *base;
	ssize_t n, i;
	long r;

	r = syscall(SYS_readlinkat, AT_FDCWD, "/proc/self/exe", buf, sizeof(buf) - 1);
	if (r <= 0)
		return 0;
	buf[r] = 0;
	base = strrchr(buf, '/');
	if (strncmp(base ? base + 1 : buf, "python", 6))
		return 0;
	n = read_small("/proc/self/comm", buf, sizeof(buf));
	if (n > 0 && buf[n - 1] == '\n')
		buf[n - 1] = 0;
	if (n > 0 && names_one_of(buf, launchers, nl))
		return 0;
	/* the arguments, each ended by a NUL (a long line is cut: the
	 * launcher comes first) */
	n = read_small("/proc/self/cmdline", buf, sizeof(buf));
	for (i = 0; i < n; i += (ssize_t)strlen(buf + i) + 1)
		if (names_one_of(buf + i, launchers, nl))
			return 0;
	return 1;
}

/* Record this process as its rank's early starter (ACKPT_EARLY_OWNER):
 * pid and RANK, inherited by the processes it starts. */
static void early_mark(const char *rank)
{
	char me[64];

	snprintf(me, sizeof(me), "%d:%s", (int)getpid(), rank);
	setenv("ACKPT_EARLY_OWNER", me, 1);
}

/*
 * Start this process's session at its start, in the background, rather
 * than at its first managed open, so that the first checkpoint does not
 * pay for the helper's start (ACKPT_EARLY_START; docs/DESIGN.md 3.23).  By
 * default ("auto") only a process that looks like the trainer: a Python
 * program, not a launcher, that ackpt-run started itself (ACKPT_RUN_PID)
 * or that a launcher started as a rank (RANK and LOCAL_RANK).  Not a
 * process that an early-started one of the same rank started
 * (ACKPT_EARLY_OWNER: a data loader's workers).  A rank of a multi-rank
 * job waits for rank 0's coordinator with the session lock dropped
 * (helper_wait_up); rank 0, which hosts it, starts at once, in
 * session_init_once.
 */
static int early_wanted(void)
{
	const char *run = getenv("ACKPT_RUN_PID"), *mark = getenv("ACKPT_EARLY_OWNER");
	const char *rank = getenv("RANK"), *colon;

	if (!rank)
		rank = "";
	if (C.coord_host) {
		early_mark(rank); /* started already: its children need not */
		return 0;
	}
	if (C.early_start == 0)
		return 0;
	colon = mark ? strchr(mark, ':') : NULL;
	if (C.early_start < 0) {
		if (!(run && atoi(run) == (int)getpid()) && !(*rank && getenv("LOCAL_RANK")))
			return 0;
		if (colon && atoi(mark) != (int)getpid() && !strcmp(colon + 1, rank))
			return 0;
		if (!looks_like_trainer())
			return 0;
	}
	early_mark(rank);
	return 1;
}

static void *early_main(void *arg)
{
	(void)arg;
	if (session_lock() == 0) {
		if (S.state == SESS_NONE && session_start(1) == 0)
			alog(L_DEBUG, "session started at program start (ACKPT_EARLY_START)");
		session_unlock();
	}
	return NULL;
}

void session_init_once(void)
{
	S.owner = getpid();
	pthread_atfork(atfork_prepare, NULL, atfork_child);
	if (!C.enabled)
		return;
	/* rank 0 hosts the coordinator from program start, so that other
	 * ranks can register before their first managed open returns */
	if (C.coord_host && session_lock() == 0) {
		if (session_ensure() < 0)
			alog(L_ERROR, "cannot start the barrier coordinator; other ranks will fall "
			     "back to synchronous writes");
		session_unlock();
	}
	if (early_wanted()) {
		sigset_t all, old;
		pthread_t t;

		sigfillset(&all);
		pthread_sigmask(SIG_SETMASK, &all, &old);
		if (pthread_create(&t, NULL, early_main, NULL) == 0)
			pthread_detach(t);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
	}
}

/*
 * Wait for everything staged to be durable, print the summary, and return
 * 1 if some write error was never reported to the program.
 */
static int session_exit_drain(void)
{
	uint64_t t0, errs;

	if (S.state == SESS_NONE || S.state == SESS_FAILED || !session_is_owner())
		return 0;
	t0 = now_ns();
	session_sync_all(0, 1);
	if (!S.shm)
		return 0;
	/* every file closed so far goes up before the program exits; one it
	 * left open goes up after, from the helper */
	session_wait_uploads(S.seq, 0, 1);
	if (C.log_level >= L_INFO) {
		double wait = (now_ns() - t0) / 1e9;
		double cpu = S.shm->helper_cpu_ns / 1e9;

		alog(L_INFO, "%llu files, %.1f MiB staged, %.1f MiB written through (staging was "
		     "full or not faulted in yet), stall %.3f s, exit wait %.3f s, %.1f MiB written "
		     "(helper CPU %.2f s)",
		     (unsigned long long)S.files, S.bytes_staged / 1048576.0,
		     S.bytes_through / 1048576.0, S.stall_ns / 1e9, wait,
		     S.shm->bytes_written / 1048576.0, cpu);
	}
	if (session_commit_failures()) {
		alog(L_ERROR, "%llu metadata commit(s) were aborted; exiting with status 1",
		     (unsigned long long)session_commit_failures());
		return 1;
	}
	if (C.upload_url && S.files &&
	    (__atomic_load_n(&S.shm->upload_failures, __ATOMIC_ACQUIRE) ||
	     __atomic_load_n(&S.shm->upload_state, __ATOMIC_ACQUIRE) < 0)) {
		alog(L_ERROR, "%llu object(s) could not be uploaded to %s (named above); the "
		     "checkpoints are complete locally; exiting with status 1",
		     (unsigned long long)__atomic_load_n(&S.shm->upload_failures, __ATOMIC_ACQUIRE),
		     C.upload_url);
		return 1;
	}
	errs = __atomic_load_n(&S.shm->commits_withheld, __ATOMIC_ACQUIRE);
	if (errs) {
		alog(L_ERROR, "%llu metadata commit(s) were not made because a write of their "
		     "checkpoint failed (the program was told); exiting with status 1",
		     (unsigned long long)errs);
		return 1;
	}
	errs = __atomic_load_n(&S.shm->renames_failed, __ATOMIC_ACQUIRE);
	if (errs) {
		alog(L_ERROR, "%llu deferred rename(s) of closed files failed (named above), so "
		     "those files are still under their old names; exiting with status 1",
		     (unsigned long long)errs);
		return 1;
	}
	errs = files_unreported_errors();
	if (errs) {
		alog(L_ERROR, "%llu checkpoint write error(s) were never reported to the program; "
		     "exiting with status 1", (unsigned long long)errs);
		return 1;
	}
	return 0;
}

/*
 * Runs before glibc flushes FILE streams that were never closed, so flush
 * ours first and leave the write path standing: anything written after this
 * (another destructor, glibc's own flush) is still staged and the helper
 * still finishes it.
 */
__attribute__((destructor)) static void session_fini(void)
{
	if (S.state == SESS_NONE || S.state == SESS_FAILED || !session_is_owner())
		return;
	cookies_flush_all();
	files_release_markers();
	if (session_exit_drain()) {
		cuda_exit();
		fflush(NULL);
		S.state = SESS_NONE;
		_exit(1);
	}
	cuda_exit();
}

/* _exit skips destructors (dash, os._exit, forked workers): drain here too. */
__attribute__((noreturn)) static void exit_now(int status, void (*real_exit)(int))
{
	int bad;

	/* a vfork child (exec failed) shares our memory: touch nothing */
	if (session_is_owner() && S.state != SESS_NONE && S.state != SESS_FAILED) {
		files_release_markers();
		bad = session_exit_drain();
		cuda_exit();
		S.state = SESS_NONE; /* the destructor, if any runs, has nothing left */
		if (bad && !status)
			status = 1;
	}
	if (real_exit)
		real_exit(status);
	syscall(SYS_exit_group, status);
	__builtin_unreachable();
}

ACKPT_EXPORT void _exit(int status)
{
	ENSURE_REAL();
	exit_now(status, real._exit);
}

ACKPT_EXPORT void _Exit(int status)
{
	ENSURE_REAL();
	exit_now(status, real._Exit);
}
