/*
 * The session: one staging arena and one helper per process, started on the
 * first managed open.  Owns the op sequence, arena allocation with
 * back-pressure, the log of ops the helper has not yet confirmed (replayed
 * synchronously if the helper dies), waiting with progress, fork handling
 * and the drain at exit.
 */
#include <dlfcn.h>
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

#define LOGCAP 8192

struct logrec {
	uint64_t seq;
	uint32_t type;
	struct inode_state *ino;
	uint64_t off, len, arena_pos;
	char *paths;
};

/* Commits sent to the helper and not yet reported done, in request order:
 * if the helper dies they are finished (or aborted) here. */
struct pcommit {
	uint64_t id;
	char *tmp, *final;
	int own_temp;
	struct pcommit *next;
};
static struct pcommit *pc_head, *pc_tail;

struct session S = { .lock = PTHREAD_MUTEX_INITIALIZER, .memfd = -1, .sock = -1 };
__thread int tls_busy;
static struct logrec oplog[LOGCAP];
static uint64_t log_first = 1; /* lowest seq still in the log */
extern char **environ;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

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

/* The one way to wait with the lock held: drop it, wait until op seq is
 * done, retake it, and free what completed.  Pointers into the tables from
 * before are stale after this. */
DROPS void session_unlock_wait(uint64_t seq)
{
	session_unlock();
	session_wait(seq, 0, 0);
	pthread_mutex_lock(&S.lock);
	tls_busy = 1;
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

/* ---- helper start ---- */

static int move_high(int fd)
{
	int nfd = real.fcntl(fd, F_DUPFD_CLOEXEC, 1000);

	if (nfd < 0)
		return fd;
	real.close(fd);
	return nfd;
}

static int find_helper(char *out, size_t n)
{
	const char *env = getenv("ACKPT_HELPER");
	static const char *const rel[] = { "ackpt-helper", "../helper/ackpt-helper",
					   "../libexec/ackpt-helper", NULL };
	Dl_info info;
	int i;

	if (env && *env) {
		snprintf(out, n, "%s", env);
		return access(out, X_OK) == 0 ? 0 : -ENOENT;
	}
	if (dladdr((void *)find_helper, &info) && info.dli_fname) {
		char dir[PATH_MAX];
		char *slash;

		snprintf(dir, sizeof(dir), "%s", info.dli_fname);
		slash = strrchr(dir, '/');
		if (slash) {
			*slash = 0;
			for (i = 0; rel[i]; i++) {
				snprintf(out, n, "%s/%s", dir, rel[i]);
				if (access(out, X_OK) == 0)
					return 0;
			}
		}
	}
	snprintf(out, n, "%s/ackpt-helper", ACKPT_LIBEXECDIR);
	return access(out, X_OK) == 0 ? 0 : -ENOENT;
}

/*
 * The helper faults the arena in (and locks it where memlock allows): that
 * first touch is slow on some VMs and must not hold this process's mmap
 * lock or delay its exit.  This thread only maps the already-present pages
 * into our view, following the helper's progress, so staging later runs at
 * warm memcpy speed.
 */
static void *prefault_main(void *arg)
{
	const uint64_t step = 64ull << 20;
	uint64_t off = 0;
	struct ackpt_shm *shm = S.shm;
	char *arena = S.arena;
	uint64_t size = S.arena_size;

	while (off < size && S.shm == shm) {
		uint64_t ready = __atomic_load_n(&shm->prefault_done, __ATOMIC_ACQUIRE);
		uint64_t len = size - off < step ? size - off : step;

		if (ready < off + len) {
			struct timespec ts = { 0, 20000000 };

			if (S.state != SESS_ACTIVE)
				break;
			ts.tv_nsec = 50000000;
			nanosleep(&ts, NULL);
			continue;
		}
		madvise(arena + off, len, MADV_POPULATE_WRITE);
		off += len;
	}
	return NULL;
}

struct spawn_args {
	const char *path;
	char **argv, **envp;
	int sock, memfd;
	sigset_t mask;          /* the program's mask, restored before exec */
	char *stack2;           /* top of the second child's stack */
};

/*
 * The child of spawn_helper, in our memory until it execs (CLONE_VM |
 * CLONE_VFORK): raw system calls only, no wrapper, no lock, no allocation.
 * Its signal handlers are its own copy: reset the program's to default
 * first, so no handler of the program's ever runs in it.
 */
static int spawn_child(void *arg)
{
	struct spawn_args *a = arg;
	struct kernel_sigaction { void *handler; unsigned long flags; void *restorer;
				  uint64_t mask; } sa, dfl = { 0 };
	long sock, memfd;
	int sig;

	for (sig = 1; sig < 65; sig++) {
		if (sig == SIGKILL || sig == SIGSTOP)
			continue;
		if (real.syscall(SYS_rt_sigaction, sig, NULL, &sa, 8) == 0 &&
		    sa.handler != SIG_DFL && sa.handler != SIG_IGN)
			real.syscall(SYS_rt_sigaction, sig, &dfl, NULL, 8);
	}
	/* via fresh numbers, so neither can clobber the other */
	sock = real.syscall(SYS_fcntl, a->sock, F_DUPFD, 10);
	memfd = real.syscall(SYS_fcntl, a->memfd, F_DUPFD, 10);
	if (sock < 0 || memfd < 0 ||
	    real.syscall(SYS_dup2, sock, ACKPT_HELPER_SOCK_FD) < 0 ||
	    real.syscall(SYS_dup2, memfd, ACKPT_HELPER_SHM_FD) < 0)
		real.syscall(SYS_exit, 127);
	real.syscall(SYS_close, sock);
	real.syscall(SYS_close, memfd);
	real.syscall(SYS_rt_sigprocmask, SIG_SETMASK, &a->mask, NULL, 8);
	real.syscall(SYS_execve, a->path, a->argv, a->envp);
	real.syscall(SYS_exit, 127);
	return 127;
}

/*
 * Our direct child: starts the one that execs (an exec gives a process
 * SIGCHLD as its exit signal again, so that one must not be ours), and
 * exits with no exit signal.  Both share our memory until the exec, so the
 * program's page tables are never copied.
 */
static int spawn_middle(void *arg)
{
	struct spawn_args *a = arg;
	long pid = clone(spawn_child, a->stack2, CLONE_VM | CLONE_VFORK | SIGCHLD, a);
	int st = 0;

	if (pid < 0)
		real.syscall(SYS_exit, 126);
	/* it has exec'd or died: if it died, say how */
	if (real.syscall(SYS_wait4, pid, &st, WNOHANG, NULL) == pid)
		real.syscall(SYS_exit, WIFEXITED(st) ? WEXITSTATUS(st) : 125);
	real.syscall(SYS_exit, 0);
	return 0;
}

/*
 * Start the helper.  Our child has no exit signal (clone, not posix_spawn)
 * and exits at once, and the helper's process is its orphan: a program with
 * a SIGCHLD handler never sees either, and its waitpid(-1) cannot reap
 * them.  We reap our child here with __WCLONE.
 */
static int spawn_helper(int helper_sock)
{
	struct spawn_args a = { .sock = helper_sock, .memfd = S.memfd };
	const size_t stack_size = 128 * 1024;
	char path[PATH_MAX];
	char *argv[] = { path, NULL };
	sigset_t all;
	char **envp, *stack;
	size_t n = 0, i, j = 0;
	pid_t pid;
	int ret, st, saved;

	ret = find_helper(path, sizeof(path));
	if (ret < 0) {
		alog(L_WARN, "ackpt-helper not found (set ACKPT_HELPER); writes stay synchronous");
		return ret;
	}
	while (environ && environ[n])
		n++;
	envp = calloc(n + 2, sizeof(*envp));
	stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK,
		     -1, 0);
	if (!envp || stack == MAP_FAILED) {
		free(envp);
		if (stack != MAP_FAILED)
			munmap(stack, stack_size);
		return -ENOMEM;
	}
	for (i = 0; i < n; i++)
		if (strncmp(environ[i], "LD_PRELOAD=", 11) && strncmp(environ[i], "ACKPT_COORD_HOST=", 17))
			envp[j++] = environ[i];
	if (C.coord_host)
		envp[j++] = (char *)"ACKPT_COORD_HOST=1";
	a.path = path;
	a.argv = argv;
	a.envp = envp;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &a.mask);
	saved = errno;
	a.stack2 = stack + stack_size / 2;
	pid = clone(spawn_middle, stack + stack_size, CLONE_VM | CLONE_VFORK, &a);
	ret = pid < 0 ? errno : 0;
	errno = saved;
	pthread_sigmask(SIG_SETMASK, &a.mask, NULL);
	munmap(stack, stack_size);
	free(envp);
	if (ret) {
		alog(L_WARN, "cannot start %s: %s; writes stay synchronous", path, strerror(ret));
		return -ret;
	}
	while (waitpid(pid, &st, __WCLONE) < 0 && errno == EINTR)
		;
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		alog(L_WARN, "cannot start %s (status %d); writes stay synchronous", path, st);
		return -ECHILD;
	}
	return 0;
}

static int helper_alive(void)
{
	struct pollfd p = { .fd = S.sock, .events = POLLIN };

	if (S.sock < 0)
		return 0;
	if (poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)))
		return 0; /* the helper never sends: readable means it hung up */
	return 1;
}

static int futex_wait_gen(uint32_t old, uint64_t timeout_ns)
{
	struct timespec ts = { (time_t)(timeout_ns / 1000000000ull), (long)(timeout_ns % 1000000000ull) };

	return syscall(SYS_futex, &S.shm->progress_gen, FUTEX_WAIT, old, &ts, NULL, 0);
}

static int session_start(void)
{
	uint64_t hdr = ackpt_shm_hdr_size();
	uint64_t t0 = now_ns(), start_limit = 10000000000ull;
	int sv[2] = { -1, -1 };
	int ret, sndbuf = 4 << 20;
	pthread_t t;
	sigset_t all, old;

	S.arena_size = C.staging;
	S.memfd = memfd_create("ackpt-staging", MFD_CLOEXEC);
	if (S.memfd < 0)
		return -errno;
	S.memfd = move_high(S.memfd);
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
	S.arena = (char *)S.shm + hdr;
	S.shm->magic = ACKPT_PROTO_MAGIC;
	S.shm->version = ACKPT_PROTO_VERSION;
	S.shm->coord_part = -1;
	S.shm->hdr_size = hdr;
	S.shm->arena_size = S.arena_size;
	S.max_chunk = S.arena_size / 4 < (16ull << 20) ? S.arena_size / 4 : (16ull << 20);
	S.max_chunk &= ~(uint64_t)(ACKPT_ARENA_ALIGN - 1);

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		ret = -errno;
		goto err;
	}
	S.sock = move_high(sv[0]);
	setsockopt(S.sock, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	fd_protect(S.memfd, 1);
	fd_protect(S.sock, 1);
	ret = spawn_helper(sv[1]);
	real.close(sv[1]);
	if (ret < 0)
		goto err;
	/* the open that started us returns only once the helper is up (and,
	 * in a multi-rank job, registered: it may wait for the coordinator) */
	if (C.multi_rank && !C.coord_host) {
		double t = C.barrier_timeout < 120 ? C.barrier_timeout : 120;

		start_limit = (uint64_t)((t + 10) * 1e9);
	}
	while (!__atomic_load_n(&S.shm->helper_pid, __ATOMIC_ACQUIRE)) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);

		if (__atomic_load_n(&S.shm->helper_pid, __ATOMIC_ACQUIRE))
			break;
		if (!helper_alive() || now_ns() - t0 > start_limit) {
			alog(L_WARN, "ackpt-helper did not start; writes stay synchronous");
			ret = -ECHILD;
			goto err;
		}
		futex_wait_gen(gen, 50000000ull);
	}
	S.helper_pid = S.shm->helper_pid;
	S.head = 0;
	S.seq = 0;
	log_first = 1;
	S.state = SESS_ACTIVE;
	efault_init(); /* from now on we copy from the program's buffers */

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	if (pthread_create(&t, NULL, prefault_main, NULL) == 0)
		pthread_detach(t);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	alog(L_DEBUG, "session started: arena %llu MiB, helper %d (%s%s)",
	     (unsigned long long)(S.arena_size >> 20), (int)S.helper_pid,
	     S.shm->helper_flags & ACKPT_HF_URING ? "io_uring" : "pwrite pool",
	     S.shm->helper_flags & ACKPT_HF_DIRECT ? ", O_DIRECT" : "");
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
	return ret;
}

int session_ensure(void)
{
	switch (S.state) {
	case SESS_ACTIVE:
		return 0;
	case SESS_NONE:
		return session_start();
	default:
		return -ENOTCONN;
	}
}

/* ---- the unconfirmed-op log and helper death ---- */

static int fsync_path_dir(const char *path);

static void replay(void)
{
	uint64_t durable = __atomic_load_n(&S.shm->durable_seq, __ATOMIC_ACQUIRE);
	uint64_t s;

	for (s = durable + 1; s <= S.seq; s++) {
		struct logrec *r = &oplog[s % LOGCAP];
		struct inode_state *ino = r->ino;
		int ret = 0;

		if (r->seq != s)
			continue;
		switch (r->type) {
		case ACKPT_OP_WRITE: {
			const char *p = S.arena + r->arena_pos % S.arena_size;
			uint64_t done = 0;

			while (done < r->len) {
				ssize_t n = real.pwrite(ino->shadow_fd, p + done, r->len - done,
							(off_t)(r->off + done));
				if (n <= 0) {
					ret = n < 0 ? errno : EIO;
					break;
				}
				done += n;
			}
			break;
		}
		case ACKPT_OP_FSYNC:
		case ACKPT_OP_CLOSE:
			if (real.fsync(ino->shadow_fd) < 0)
				ret = errno;
			break;
		case ACKPT_OP_COMMIT:
			break; /* finished from the pending-commit list below */
		case ACKPT_OP_RENAME: {
			const char *newp = r->paths ? r->paths + strlen(r->paths) + 1 : NULL;

			if (!newp)
				break;
			if (ino && real.fsync(ino->shadow_fd) < 0)
				ret = errno;
			else if (real.rename(r->paths, newp) < 0)
				ret = errno;
			/* the helper renamed it and died before saying so */
			if (ret == ENOENT && real.access(r->paths, F_OK) < 0 &&
			    real.access(newp, F_OK) == 0)
				ret = fsync_path_dir(newp) < 0 ? EIO : 0;
			break;
		}
		default:
			break;
		}
		if (ret && ino) {
			/* surface it like a helper error: at the next call on the file */
			S.shm->files[ino->slot].err = ret;
			S.shm->files[ino->slot].err_seq++;
			S.shm->errors++;
			alog(L_ERROR, "synchronous rewrite of %s failed: %s",
			     ino->path ? ino->path : "?", strerror(ret));
		}
	}
	__atomic_store_n(&S.shm->durable_seq, S.seq, __ATOMIC_RELEASE);
}

static void session_helper_died(void)
{
	if (S.state != SESS_ACTIVE)
		return;
	alog(L_WARN, "ackpt-helper (pid %d) died; rewriting %llu unconfirmed ops synchronously and "
	     "continuing without it", (int)S.helper_pid,
	     (unsigned long long)(S.seq - __atomic_load_n(&S.shm->durable_seq, __ATOMIC_ACQUIRE)));
	replay();
	{
		/* commits the helper had not finished, in order */
		uint64_t done = __atomic_load_n(&S.shm->commits_done, __ATOMIC_ACQUIRE);

		while (pc_head) {
			struct pcommit *p = pc_head;

			pc_head = p->next;
			if (p->id > done && p->tmp && p->final)
				session_commit_now(p->tmp, p->final, p->own_temp);
			free(p->tmp);
			free(p->final);
			free(p);
		}
		pc_tail = NULL;
	}
	S.state = SESS_DEAD;
	session_reap();
}

static int log_wait_space(void)
{
	while (S.seq + 1 - session_durable() >= LOGCAP) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);

		if (S.seq + 1 - session_durable() < LOGCAP)
			break;
		if (!helper_alive()) {
			session_helper_died();
			return -EPIPE;
		}
		futex_wait_gen(gen, 100000000ull);
	}
	return 0;
}

/* Assign the next seq, log the op and hand it to the helper. */
static int send_op(struct ackpt_op *op, const char *paths, size_t plen, int fd,
		   struct inode_state *ino)
{
	char buf[ACKPT_OP_MAX_MSG];
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { buf, sizeof(*op) + plen };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct logrec *r;
	ssize_t n;

	if (log_wait_space() < 0)
		return -EPIPE;
	op->seq = ++S.seq;
	__atomic_store_n(&S.shm->staged_seq, op->seq, __ATOMIC_RELEASE);
	r = &oplog[op->seq % LOGCAP];
	free(r->paths);
	*r = (struct logrec){ .seq = op->seq, .type = op->type, .ino = ino };
	if (op->type == ACKPT_OP_WRITE) {
		r->off = op->u.write.offset;
		r->len = op->u.write.len;
		r->arena_pos = op->u.write.arena_pos;
	}
	if (plen) {
		r->paths = malloc(plen);
		if (r->paths)
			memcpy(r->paths, paths, plen);
	}
	if (ino) {
		ino->last_seq = op->seq;
		registry_note_op(ino->reg_idx, op->seq);
	}
	memcpy(buf, op, sizeof(*op));
	if (plen)
		memcpy(buf + sizeof(*op), paths, plen);
	if (fd >= 0) {
		struct cmsghdr *c;

		m.msg_control = cbuf;
		m.msg_controllen = sizeof(cbuf);
		c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	do
		n = real.sendmsg(S.sock, &m, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		session_helper_died();
		return -EPIPE;
	}
	/* only now: reaping may free closed inodes, never the one in hand
	 * (callers pass no inode whose CLOSE was sent) */
	session_reap();
	return 0;
}

int session_send_open(struct inode_state *ino, int fd)
{
	struct ackpt_op op = { .type = ACKPT_OP_OPEN, .file = ino->slot,
			       .u.open = { .dev = ino->dev, .ino = ino->ino, .reg_idx = ino->reg_idx } };

	return send_op(&op, NULL, 0, fd, ino);
}

/* FSYNC, CLOSE, SYNC_ALL: no payload. */
int session_send_simple(uint32_t type, struct inode_state *ino)
{
	struct ackpt_op op = { .type = type, .file = ino ? ino->slot : ACKPT_NO_FILE };

	return send_op(&op, NULL, 0, -1, ino);
}

/* Not the inode's last op: readers need not wait for it, it only makes
 * the helper's next fsync of the file real. */
int session_send_dirty(struct inode_state *ino)
{
	struct ackpt_op op = { .type = ACKPT_OP_DIRTY, .file = ino->slot };

	return send_op(&op, NULL, 0, -1, NULL);
}

int session_send_rename(struct inode_state *ino, const char *oldp, const char *newp)
{
	struct ackpt_op op = { .type = ACKPT_OP_RENAME, .file = ino ? ino->slot : ACKPT_NO_FILE };
	char paths[2 * PATH_MAX + 2];
	size_t a = strlen(oldp) + 1, b = strlen(newp) + 1;

	if (a + b > sizeof(paths) || a + b > ACKPT_OP_MAX_MSG - sizeof(op))
		return -ENAMETOOLONG;
	memcpy(paths, oldp, a);
	memcpy(paths + a, newp, b);
	op.u.rename.path_len = (uint32_t)(a + b);
	return send_op(&op, paths, a + b, -1, ino);
}

int session_send_commit(struct inode_state *ino, const char *tmp, const char *final, int own_temp,
			uint64_t *commit_id)
{
	struct ackpt_op op = { .type = ACKPT_OP_COMMIT, .file = ino ? ino->slot : ACKPT_NO_FILE,
			       .u.commit.flags = own_temp ? ACKPT_COMMIT_OWN_TEMP : 0 };
	char paths[2 * PATH_MAX + 2];
	size_t a = strlen(tmp) + 1, b = strlen(final) + 1;
	int ret;

	if (a + b > sizeof(paths) || a + b > ACKPT_OP_MAX_MSG - sizeof(op))
		return -ENAMETOOLONG;
	memcpy(paths, tmp, a);
	memcpy(paths + a, final, b);
	op.u.commit.id = S.commits_requested + 1;
	op.u.commit.path_len = (uint32_t)(a + b);
	ret = send_op(&op, paths, a + b, -1, ino);
	if (ret < 0)
		return ret;
	*commit_id = ++S.commits_requested;
	{
		struct pcommit *p = calloc(1, sizeof(*p));

		if (p) {
			p->id = *commit_id;
			p->tmp = strdup(tmp);
			p->final = strdup(final);
			p->own_temp = own_temp;
			if (pc_tail)
				pc_tail->next = p;
			else
				pc_head = p;
			pc_tail = p;
		}
	}
	return 0;
}

static int fsync_path_dir(const char *path)
{
	char dir[PATH_MAX];
	int fd, ret = 0;

	if (path_dir(dir, sizeof(dir), path))
		return 0;
	fd = real.open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (real.fsync(fd) < 0)
		ret = -errno;
	real.close(fd);
	return ret;
}

/*
 * Without a helper: a single process's barrier is its own drain, which the
 * synchronous rewrite has just done, so commit here; a multi-rank job has
 * no barrier any more and must not commit.
 */
void session_commit_now(const char *tmp, const char *final, int own_temp)
{
	int fd, ret = 0;

	if (C.multi_rank && access(tmp, F_OK) == 0) {
		alog(L_ERROR, "commit of %s aborted: the helper died, no barrier is possible", final);
		ret = -ECONNRESET;
	} else {
		files_fsync_all();
		fd = real.open(tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
		if (fd < 0 && errno == ENOENT) {
			/* the helper renamed it and died before saying so: make
			 * what it did durable */
			fd = real.open(final, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
			if (fd < 0 || real.fsync(fd) < 0)
				ret = -errno;
			if (fd >= 0)
				real.close(fd);
			if (!ret)
				ret = fsync_path_dir(final);
			if (ret)
				alog(L_ERROR, "commit of %s failed: %s", final, strerror(-ret));
			goto out;
		}
		if (fd < 0 || real.fsync(fd) < 0)
			ret = -errno;
		if (fd >= 0)
			real.close(fd);
		if (!ret && real.rename(tmp, final) < 0)
			ret = -errno;
		if (!ret)
			ret = fsync_path_dir(final);
		if (ret)
			alog(L_ERROR, "commit of %s failed: %s", final, strerror(-ret));
	}
out:
	{
		/* the helper may have died holding the previous metadata's link */
		const char *base = strrchr(final, '/');
		char backup[PATH_MAX];

		base = base ? base + 1 : final;
		if (snprintf(backup, sizeof(backup), "%.*s.%s.ackpt.prev.%d", (int)(base - final), final,
			     base, (int)S.helper_pid) < (int)sizeof(backup))
			real.unlink(backup);
	}
	if (ret) {
		if (own_temp)
			real.unlink(tmp);
		S.dead_commit_failures++;
	}
}

uint64_t session_commits_done(void)
{
	if (!S.shm || S.state == SESS_DEAD)
		return S.commits_requested;
	return __atomic_load_n(&S.shm->commits_done, __ATOMIC_ACQUIRE);
}

uint64_t session_commit_failures(void)
{
	uint64_t n = S.dead_commit_failures;

	if (S.shm)
		n += __atomic_load_n(&S.shm->commit_failures, __ATOMIC_ACQUIRE);
	return n;
}

/* A failed commit is reported once, as EIO, at the next call on a managed file. */
int session_check_commit_error(void)
{
	uint64_t n = session_commit_failures();

	if (n == S.commit_failures_seen)
		return 0;
	S.commit_failures_seen = n;
	return -EIO;
}

/*
 * The helper has died while we wait for it: repair (the arena's unconfirmed
 * data rewritten synchronously) and say so. A vfork child shares our
 * memory, so only the owner repairs.
 */
static int helper_gone(void)
{
	if (helper_alive())
		return 0;
	if (session_is_owner()) {
		pthread_mutex_lock(&S.lock);
		session_helper_died();
		pthread_mutex_unlock(&S.lock);
	}
	return 1;
}

int session_wait_commit(uint64_t id, double timeout_s)
{
	uint64_t t0 = now_ns();
	uint64_t deadline = timeout_s > 0 ? t0 + (uint64_t)(timeout_s * 1e9) : UINT64_MAX;

	while (session_commits_done() < id) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);

		if (session_commits_done() >= id)
			break;
		if (now_ns() >= deadline)
			return -ETIMEDOUT;
		if (helper_gone())
			break;
		futex_wait_gen(gen, 100000000ull);
	}
	return 0;
}

/* Reserve arena space for len bytes, blocking while the arena is full. */
static int arena_reserve(uint64_t len, uint64_t *pos, uint64_t *end)
{
	uint64_t stall0 = 0;

	ackpt_arena_place(S.head, len, S.arena_size, pos, end);
	while (!ackpt_arena_fits(*end, __atomic_load_n(&S.shm->arena_tail, __ATOMIC_ACQUIRE),
				 S.arena_size)) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);

		if (!stall0)
			stall0 = now_ns();
		if (ackpt_arena_fits(*end, __atomic_load_n(&S.shm->arena_tail, __ATOMIC_ACQUIRE),
				     S.arena_size))
			break;
		if (!helper_alive()) {
			session_helper_died();
			return -EPIPE;
		}
		futex_wait_gen(gen, 100000000ull);
	}
	S.head = *end;
	return 0;
}

/*
 * Copy len bytes at buf into the arena, in chunks, and queue a WRITE for
 * each.  *staged: bytes queued.  A bad source pointer stops at the page it
 * faulted on, as the kernel's copy does: the chunk's good prefix is queued
 * and -EFAULT returned.
 */
int session_stage(struct inode_state *ino, const void *buf, size_t len, uint64_t off, int device,
		  size_t *staged)
{
	const char *src = buf;

	*staged = 0;
	while (len) {
		uint64_t chunk = len < S.max_chunk ? len : S.max_chunk;
		struct ackpt_op op = { .type = ACKPT_OP_WRITE, .file = ino->slot };
		uint64_t pos, end, head = S.head;
		int ret, bad = 0;

		ret = arena_reserve(chunk, &pos, &end);
		if (ret < 0)
			return ret;
		if (device) {
			/* chunked through the arena with back-pressure, like host data */
			ret = cuda_copy_to_host(S.arena + pos % S.arena_size, src, chunk);
			if (ret < 0)
				return ret;
		} else {
			size_t done;

			if (efault_copy(S.arena + pos % S.arena_size, src, chunk, &done) < 0) {
				bad = 1;
				chunk = done;
				if (!chunk) {
					S.head = head; /* nothing of it was used */
					return -EFAULT;
				}
			}
		}
		op.u.write.offset = off;
		op.u.write.len = chunk;
		op.u.write.arena_pos = pos;
		op.u.write.arena_end = end;
		ret = send_op(&op, NULL, 0, -1, ino);
		if (ret < 0)
			return ret;
		S.bytes_staged += chunk;
		*staged += chunk;
		if (bad)
			return -EFAULT;
		src += chunk;
		off += chunk;
		len -= chunk;
	}
	return 0;
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

	while (log_first <= durable && log_first <= S.seq) {
		struct logrec *r = &oplog[log_first % LOGCAP];

		if (r->seq == log_first) {
			if (r->type == ACKPT_OP_CLOSE && r->ino && r->ino->closing &&
			    r->ino->close_seq == r->seq)
				inode_free(r->ino);
			free(r->paths);
			memset(r, 0, sizeof(*r));
		}
		log_first++;
	}
	ns_prune(durable);
	{
		uint64_t done = session_commits_done();

		while (pc_head && pc_head->id <= done && S.state == SESS_ACTIVE) {
			struct pcommit *p = pc_head;

			pc_head = p->next;
			if (!pc_head)
				pc_tail = NULL;
			free(p->tmp);
			free(p->final);
			free(p);
		}
	}
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
	if (!tls_busy && session_is_owner())
		files_share(1);
}

static void atfork_child(void)
{
	uint64_t s;

	pthread_mutex_init(&S.lock, NULL);
	tls_busy = 0;
	S.owner = getpid();
	C.coord_host = 0; /* the parent's helper hosts the coordinator */
	cuda_fork_child(); /* a CUDA context does not survive fork */
	job_fork_child();
	if (S.state == SESS_NONE || S.state == SESS_FAILED)
		return;
	/* The parent's helper and arena stay the parent's; this child starts
	 * its own session on its first managed open. */
	/* another thread may have been mid-update: forget, never free */
	for (s = log_first; s <= S.seq; s++)
		memset(&oplog[s % LOGCAP], 0, sizeof(oplog[0]));
	log_first = 1;
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
	S.bytes_staged = S.files = S.stall_ns = 0;
	S.commits_requested = S.commit_failures_seen = S.dead_commit_failures = 0;
}

void session_init_once(void)
{
	S.owner = getpid();
	pthread_atfork(atfork_prepare, NULL, atfork_child);
	/* rank 0 hosts the coordinator from program start, so that other
	 * ranks can register before their first managed open returns */
	if (C.enabled && C.coord_host && session_lock() == 0) {
		if (session_ensure() < 0)
			alog(L_ERROR, "cannot start the barrier coordinator; other ranks will fall "
			     "back to synchronous writes");
		session_unlock();
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
	if (C.log_level >= L_INFO) {
		double wait = (now_ns() - t0) / 1e9;
		double cpu = S.shm->helper_cpu_ns / 1e9;

		alog(L_INFO, "%llu files, %.1f MiB staged, stall %.3f s, exit wait %.3f s, "
		     "%.1f MiB written (helper CPU %.2f s)",
		     (unsigned long long)S.files, S.bytes_staged / 1048576.0, S.stall_ns / 1e9, wait,
		     S.shm->bytes_written / 1048576.0, cpu);
	}
	if (session_commit_failures()) {
		alog(L_ERROR, "%llu metadata commit(s) were aborted; exiting with status 1",
		     (unsigned long long)session_commit_failures());
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
