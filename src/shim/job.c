/*
 * Other nodes: what a process under ackpt must know of pending work on
 * nodes whose registry it cannot see (docs/DESIGN.md 3.17).
 *
 * In a job that may span nodes, the shim keeps one connection per process
 * to the barrier coordinator, as an observer (never part of a barrier):
 *  - before a close of a file with staged data, a deferred rename or a
 *    marker's commit returns, it announces the names involved and waits
 *    for the coordinator's answer, so anything that happens after the
 *    program's call (a dist.barrier(), a message) finds them there;
 *  - before a path lookup that waits for this node's pending names, it
 *    asks whether the name is pending on another node, and waits while it
 *    is.
 * The coordinator settles a name when the owning helper's progress passes
 * it.  One round trip each, straight to the coordinator: never behind the
 * helper's queue, so a close never waits for storage.
 *
 * If the coordinator cannot be reached (not started yet: then no rank has
 * anything staged, since every helper registers before its first open
 * returns; or it is gone: then the job's commits are aborted anyway), the
 * call goes on without waiting.
 */
#include <stdarg.h>
#include <time.h>

#include "shim.h"
#include "job.h"
#include "registry.h"

static struct {
	pthread_mutex_t lock;
	int fd;
	pid_t pid;             /* the process that owns fd */
	int discovered;
	struct ackpt_job job;
	struct ackpt_chan ch;  /* fd's session key and sequence numbers */
	uint64_t node;         /* this node's id */
	int warned;
	uint64_t retry_at;     /* no dialing before this after a failed dial */
} J = { .lock = PTHREAD_MUTEX_INITIALIZER, .fd = -1 };

/* A signal handler that looks up a path while this thread talks to the
 * coordinator must not wait for J.lock, which the thread holds. */
static __thread int tls_in_job;

#define ANSWER_WITHIN_MS 10000

/* The node: its boot and its /dev/shm (separate mount namespaces with their
 * own /dev/shm are separate nodes, as far as the registry goes). */
static uint64_t node_id(void)
{
	char id[64 + 2 * sizeof(uint64_t)];
	size_t len = 0;
	struct stat st;
	int fd = real.open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC, 0);

	if (fd >= 0) {
		ssize_t n = real.read(fd, id, 64);

		if (n > 0)
			len = (size_t)n;
		real.close(fd);
	}
	if (real.stat("/dev/shm", &st) == 0) {
		uint64_t dev = st.st_dev, ino = st.st_ino;

		memcpy(id + len, &dev, sizeof(dev));
		memcpy(id + len + sizeof(dev), &ino, sizeof(ino));
		len += 2 * sizeof(uint64_t);
	}
	return ackpt_name_hash(id, len);
}

int job_multi_node(void)
{
	return C.multi_node;
}

/* Called with J.lock held. */
static void hang_up(void)
{
	if (J.fd >= 0) {
		fd_protect(J.fd, 0);
		real.close(J.fd);
	}
	J.fd = -1;
	memset(&J.ch, 0, sizeof(J.ch));
}

static void warn_once(const char *what, int err)
{
	if (J.warned++)
		return;
	alog(L_WARN, "cannot reach the barrier coordinator at %s:%d to %s (%s); other nodes' "
	     "pending names are not waited for", J.job.addr, J.job.port, what, strerror(err));
}

static int recv_frame(struct ackpt_bar_msg *m)
{
	int err = ackpt_frame_recv(J.fd, m, now_ns() + ANSWER_WITHIN_MS * 1000000ull);

	return err ? err : ackpt_chan_open(&J.ch, m);
}

static struct ackpt_bar_msg frame(int type)
{
	return (struct ackpt_bar_msg){ .magic = ACKPT_BAR_MAGIC, .version = ACKPT_BAR_VERSION,
				       .type = (uint16_t)type, .rank = J.job.rank };
}

/* Once per process: a stranger on the port would otherwise get a line per lookup. */
static void dial_log(int level, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	if (level > 0 && J.warned++)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	alog(level <= 0 ? L_ERROR : level == 1 ? L_WARN : level == 2 ? L_INFO : L_DEBUG, "%s", line);
}

/* Called with J.lock held.  0, or -errno (no coordinator to ask). */
static int dial(void)
{
	struct ackpt_dial d = { .observer = 1, .give_up_refused = 1, .one_round = 1,
				.log = dial_log };
	uint64_t id;
	int fd;

	if (J.fd >= 0 && J.pid == getpid())
		return 0;
	if (!J.discovered) {
		ackpt_job_discover(&J.job);
		J.node = node_id();
		J.discovered = 1;
	}
	if (J.job.broken[0] || !J.job.port)
		return -EDESTADDRREQ;
	if (J.retry_at && now_ns() < J.retry_at)
		return -EAGAIN;
	d.rank = J.job.rank;
	d.deadline_ns = now_ns() + ANSWER_WITHIN_MS * 1000000ull;
	fd = ackpt_coord_dial(&J.job, &d, &J.ch, &id);
	if (fd < 0) {
		/* nothing listening: the coordinator has not started, ask again
		 * next time; anything else (a stranger, silence) is not worth
		 * a wait per lookup: a second later at the earliest */
		J.retry_at = fd == -ECONNREFUSED ? 0 : now_ns() + 1000000000ull;
		return fd;
	}
	J.retry_at = 0;
	{
		/* out of the program's way: a high number, hidden, protected */
		int nfd = real.fcntl(fd, F_DUPFD_CLOEXEC, 1000);

		if (nfd >= 0) {
			real.close(fd);
			fd = nfd;
		}
	}
	J.fd = fd;
	J.pid = getpid();
	fd_protect(fd, 1);
	return 0;
}

/* Seal n frames, send them; 0 or -errno.  Called with J.lock held. */
static int send_sealed(struct ackpt_bar_msg *m, int n)
{
	int i;

	for (i = 0; i < n; i++) {
		ackpt_chan_seal(&J.ch, &m[i]);
		ackpt_chan_sent(&J.ch);
	}
	return ackpt_frames_send(J.fd, m, n, now_ns() + ANSWER_WITHIN_MS * 1000000ull);
}

/* Send n frames, read their n answers; returns the OR of their statuses
 * (1: pending), or -errno.  Called with J.lock held. */
static int ask(struct ackpt_bar_msg *m, int n)
{
	int err = send_sealed(m, n), i, any = 0;

	for (i = 0; !err && i < n; i++) {
		struct ackpt_bar_msg a;

		err = recv_frame(&a);
		if (!err && a.type != BAR_ANSWER)
			err = -EPROTO;
		if (!err)
			any |= a.status;
	}
	if (err) {
		hang_up();
		return err;
	}
	return any;
}

/* ---- names ---- */

static uint64_t path_key(const char *canon, int as_dir)
{
	return as_dir ? ackpt_dir_hash(canon) : ackpt_path_hash(canon);
}

/*
 * Announce names (NULL-terminated canonical paths; with_dirs: also as their
 * directories' content, which a rename changes) that wait for op seq (commit_id 0) or commit
 * commit_id of this process's helper.  Called with the session lock held
 * (it orders announcements with the ops they wait for); the answer is one
 * round trip to the coordinator.
 */
void job_announce(const char *const *paths, int with_dirs, uint64_t seq, uint64_t commit_id)
{
	struct ackpt_bar_msg m[8];
	uint64_t progress;
	int n = 0, i, part, err, saved = errno;

	if (!C.multi_node || S.state != SESS_ACTIVE || !S.shm || !session_is_owner())
		return;
	part = __atomic_load_n(&S.shm->coord_part, __ATOMIC_ACQUIRE);
	if (part < 0)
		return; /* the helper is not registered: it can commit nothing either */
	/* publish what we wait for, then read how far the helper is: it does
	 * the opposite (helper.c), so one of us sees the other */
	if (commit_id) {
		if (commit_id > S.shm->announced_commit)
			__atomic_store_n(&S.shm->announced_commit, commit_id, __ATOMIC_SEQ_CST);
	} else if (seq > S.shm->announced_seq) {
		__atomic_store_n(&S.shm->announced_seq, seq, __ATOMIC_SEQ_CST);
	}
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	progress = commit_id ? __atomic_load_n(&S.shm->commits_done, __ATOMIC_SEQ_CST) :
			       __atomic_load_n(&S.shm->durable_seq, __ATOMIC_SEQ_CST);
	if (progress >= (commit_id ? commit_id : seq))
		return; /* done already */
	if (tls_in_job || pthread_mutex_lock(&J.lock))
		return;
	tls_in_job = 1;
	err = dial(); /* first: it learns this node's id */
	for (i = 0; !err && paths[i] && n + 2 <= 8; i++) {
		int d;

		for (d = 0; d <= with_dirs; d++) {
			uint64_t key = path_key(paths[i], d);

			if (!key)
				continue;
			m[n] = frame(BAR_NAME);
			m[n].id = key;
			m[n].arg = commit_id ? commit_id : seq;
			m[n].status = (commit_id ? ACKPT_NAME_COMMIT : 0) | (d ? ACKPT_NAME_DIR : 0);
			m[n].rank = part;
			memcpy(m[n].data, &J.node, 8);
			memcpy(m[n].data + 8, &progress, 8);
			n++;
		}
	}
	if (!err)
		err = ask(m, n);
	if (err < 0 && err != -EAGAIN)
		warn_once("announce a pending name", -err);
	tls_in_job = 0;
	pthread_mutex_unlock(&J.lock);
	errno = saved;
}

/* Wait while canon (as_dir: a name in directory canon) has pending work on
 * another node.  Called without the session lock. */
void job_names_wait(const char *canon, int as_dir)
{
	struct ackpt_bar_msg q;
	uint64_t t0 = 0;
	int saved = errno, said = 0;

	if (!C.multi_node || !session_is_owner() || !path_is_managed(canon))
		return;
	q = frame(BAR_QUERY);
	q.id = ackpt_path_hash(canon); /* a directory is matched by its own path */
	q.status = as_dir ? ACKPT_NAME_DIR : 0;
	for (;;) {
		struct timespec ts = { 0, 2000000 };
		int r;

		if (tls_in_job || pthread_mutex_lock(&J.lock))
			break;
		tls_in_job = 1;
		r = dial();
		memcpy(q.data, &J.node, 8);
		if (!r)
			r = ask(&q, 1);
		tls_in_job = 0;
		pthread_mutex_unlock(&J.lock);
		if (r <= 0) {
			/* ECONNREFUSED: no coordinator yet, so nothing is
			 * staged anywhere; anything else is worth a line */
			if (r < 0 && r != -ECONNREFUSED && r != -EAGAIN)
				warn_once("ask about a pending name", -r);
			break;
		}
		if (!t0)
			t0 = now_ns();
		else if (!said && now_ns() - t0 > 2000000000ull) {
			alog(L_INFO, "waiting for another node to finish writing %s%s", canon,
			     as_dir ? " (a name in it)" : "");
			said = 1;
		}
		nanosleep(&ts, NULL);
	}
	errno = saved;
}

/* A forked child: the connection is the parent's. */
void job_fork_child(void)
{
	pthread_mutex_init(&J.lock, NULL);
	if (J.fd >= 0) {
		fd_protect(J.fd, 0);
		real.close(J.fd);
	}
	J.fd = -1;
	memset(&J.ch, 0, sizeof(J.ch));
}

/* The program dup2()s onto our descriptor: it moves (files_relocate_protected). */
void job_fd_moved(int from, int to)
{
	if (J.fd == from)
		J.fd = to;
}
