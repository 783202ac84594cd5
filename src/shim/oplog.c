/*
 * The op log: every op sent to the helper stays here until the helper
 * confirms it, with what is needed to do it again.  If the helper dies,
 * replay() rewrites the unconfirmed ops synchronously from the arena and
 * finishes the commits it had not, so nothing staged is lost.  Also the
 * one place ops are numbered and sent (send_op).
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "shim.h"

#define LOGCAP 8192

struct logrec {
	uint64_t seq;
	uint32_t type;
	struct inode_state *ino;
	uint64_t off, len, arena_pos;
	int pending;   /* [atomic] a WRITE whose copy runs outside the lock:
			* replay waits for it (stage.c, stage_unlocked) */
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

static struct logrec oplog[LOGCAP];
static uint64_t log_first = 1; /* lowest seq still in the log */

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
		/* its copy needs no lock to finish, and finishes soon */
		while (__atomic_load_n(&r->pending, __ATOMIC_ACQUIRE)) {
			struct timespec ts = { 0, 50000 };

			nanosleep(&ts, NULL);
		}
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
		case ACKPT_OP_DIRSYNC: {
			int d = r->paths ? fsync_dir_path(r->paths) : 0;

			/* (a directory gone since has no entries left to keep) */
			if (d && d != -ENOENT && d != -ENOTDIR && d != -ESTALE) {
				S.shm->dirsync_err = -d;
				S.shm->errors++;
				alog(L_ERROR, "synchronous fsync of directory %s failed: %s", r->paths,
				     strerror(-d));
			}
			break;
		}
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
				ret = commit_fsync_dir(newp) < 0 ? EIO : 0;
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

void session_helper_died(void)
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

/* ---- the op ring (proto.h, docs/DESIGN.md 3.21) ---- */

static void ring_copy_in(struct ackpt_ring *r, uint64_t at, const void *src, size_t len)
{
	size_t in, first = ackpt_ring_span(at, len, &in);

	memcpy(r->data + in, src, first);
	memcpy(r->data, (const char *)src + first, len - first);
}

/*
 * Wake the helper if it said it sleeps (urgent: also if it only dozes).
 * Whoever turns its state back to AWAKE sends the one doorbell message.
 * After the record's release store, before reading the state: pairs with
 * the helper's fence between saying it sleeps and looking at the ring.
 */
static int ring_bell(int urgent)
{
	struct ackpt_ring *r = &S.shm->ring;
	uint32_t st;
	char b = 0;
	struct iovec iov = { &b, 1 };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	ssize_t n;

	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	st = __atomic_load_n(&r->sleep, __ATOMIC_RELAXED);
	if (st == ACKPT_RING_AWAKE || (st == ACKPT_RING_DOZING && !urgent))
		return 0;
	if (!__atomic_compare_exchange_n(&r->sleep, &st, ACKPT_RING_AWAKE, 0, __ATOMIC_SEQ_CST,
					 __ATOMIC_RELAXED))
		return 0; /* the helper woke meanwhile */
	do
		n = real.sendmsg(S.sock, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	/* a full socket holds bells enough; a dead helper is found by the
	 * caller's next wait */
	return n < 0 && errno != EAGAIN ? -errno : 0;
}

/*
 * For every wait on the helper's progress: wake it now rather than at its
 * next look (at most a millisecond away: a record is never left unseen).
 * Only under the lock, which keeps S.sock from moving (a program's dup2
 * onto its number) while the bell is sent; a waiter that cannot take it
 * at once leaves the bell to whoever holds it.
 */
void session_bell(void)
{
	if (!S.shm || S.state != SESS_ACTIVE)
		return;
	if (tls_busy) {
		ring_bell(1);
		return;
	}
	if (!session_is_owner() || pthread_mutex_trylock(&S.lock) != 0)
		return;
	if (S.state == SESS_ACTIVE)
		ring_bell(1);
	pthread_mutex_unlock(&S.lock);
}

/* Room for bytes more in the ring, waiting for the helper to take records. */
static int ring_wait_space(size_t bytes)
{
	struct ackpt_ring *r = &S.shm->ring;

	while (r->tail + bytes - __atomic_load_n(&r->head, __ATOMIC_ACQUIRE) > ACKPT_RING_BYTES) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);

		if (r->tail + bytes - __atomic_load_n(&r->head, __ATOMIC_ACQUIRE) <=
		    ACKPT_RING_BYTES)
			break;
		if (!helper_alive()) {
			session_helper_died();
			return -EPIPE;
		}
		futex_wait_gen(gen, 100000000ull); /* rings the bell */
	}
	return 0;
}

/*
 * Append len bytes, already copied into the arena at pos..end, to the last
 * record instead of adding one: only when that record is a WRITE of the
 * same file that they continue both in the file and in the arena (same
 * lap, same registered 1 GiB piece), and the helper has not taken it (the
 * CAS fails once ACKPT_REC_TAKEN is set).  A burst of small writes then
 * costs the helper one op, and the op log and the ring a record, per run
 * rather than per call.  Returns 1 if extended.
 */
#define EXTEND_MAX (16ull << 20)

int ring_extend(struct inode_state *ino, uint64_t off, uint64_t len, uint64_t pos, uint64_t end)
{
	struct ackpt_ring_rec *rec;
	struct logrec *l;
	uint64_t old, in;

	if (!C.extend || S.ext_at == UINT64_MAX || S.ext_file != ino->slot || off != S.ext_off_end ||
	    pos != S.ext_arena_end || end != pos + len || S.ext_bytes + len > EXTEND_MAX)
		return 0;
	in = pos % S.arena_size;
	if (in < S.ext_bytes || in + len > S.arena_size ||
	    (in - S.ext_bytes) / ACKPT_REG_BUF_MAX != (in + len - 1) / ACKPT_REG_BUF_MAX)
		return 0; /* the run would cross the ring's end or a registered piece */
	/* records start at 64-byte boundaries: a header is never split */
	rec = (struct ackpt_ring_rec *)(S.shm->ring.data + S.ext_at % ACKPT_RING_BYTES);
	old = __atomic_load_n(&rec->ext, __ATOMIC_RELAXED);
	if (old & ACKPT_REC_TAKEN)
		return 0;
	/* release: the bytes are in the arena before the helper can see them */
	if (!__atomic_compare_exchange_n(&rec->ext, &old, old + len, 0, __ATOMIC_RELEASE,
					 __ATOMIC_RELAXED))
		return 0; /* taken meanwhile */
	S.ext_bytes += len;
	S.ext_off_end += len;
	S.ext_arena_end = end;
	l = &oplog[S.seq % LOGCAP];
	if (l->seq == S.seq)
		l->len += len; /* a replay rewrites the whole run */
	return 1;
}

/* The OPEN's descriptor, ahead of its record. */
static int send_fd(int fd, uint64_t seq)
{
	struct ackpt_fd_msg fm = { .seq = seq };
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { &fm, sizeof(fm) };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			    .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	ssize_t n;

	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	do
		n = real.sendmsg(S.sock, &m, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	return n < 0 ? -EPIPE : 0;
}

/*
 * Assign the next seq, log the op and hand it to the helper: a record in
 * the ring, and no system call unless the helper sleeps (or the op is an
 * OPEN, whose descriptor only a socket can carry).
 */
static int publish(struct ackpt_op *op, const char *paths, size_t plen, int fd,
		   struct inode_state *ino, uint64_t *ring_at)
{
	struct ackpt_ring *r = &S.shm->ring;
	struct ackpt_ring_rec h = { .len = (uint32_t)(sizeof(*op) + plen) };
	size_t bytes = ackpt_ring_rec_bytes(h.len);
	struct logrec *l;
	uint64_t at;

	if (log_wait_space() < 0 || ring_wait_space(bytes) < 0)
		return -EPIPE;
	op->seq = ++S.seq;
	l = &oplog[op->seq % LOGCAP];
	free(l->paths);
	*l = (struct logrec){ .seq = op->seq, .type = op->type, .ino = ino };
	if (op->type == ACKPT_OP_WRITE) {
		l->off = op->u.write.offset;
		l->len = op->u.write.len;
		l->arena_pos = op->u.write.arena_pos;
	}
	if (plen) {
		l->paths = malloc(plen);
		if (l->paths)
			memcpy(l->paths, paths, plen);
	}
	if (ino) {
		ino->last_seq = op->seq;
		if (op->type == ACKPT_OP_WRITE)
			ino->write_seq = op->seq;
		registry_note_op(ino->reg_idx, op->seq);
	}
	if (fd >= 0 && send_fd(fd, op->seq) < 0) {
		session_helper_died();
		return -EPIPE;
	}
	at = r->tail;
	S.ext_at = UINT64_MAX;
	/* extensible: a write whose reservation ends where its data does (a
	 * write cut short by a bad page reserved more than it holds), and
	 * whose copy is done */
	if (op->type == ACKPT_OP_WRITE && !ring_at &&
	    op->u.write.arena_end == op->u.write.arena_pos + op->u.write.len) {
		S.ext_at = at;
		S.ext_file = op->file;
		S.ext_off_end = op->u.write.offset + op->u.write.len;
		S.ext_arena_end = op->u.write.arena_end;
		S.ext_bytes = op->u.write.len;
	}
	if (ring_at) {
		/* its bytes are not in the arena yet: the helper waits at it */
		h.ext = ACKPT_REC_PENDING;
		l->pending = 1;
		*ring_at = at;
	}
	ring_copy_in(r, at, &h, sizeof(h));
	ring_copy_in(r, at + sizeof(h), op, sizeof(*op));
	if (plen)
		ring_copy_in(r, at + sizeof(h) + sizeof(*op), paths, plen);
	__atomic_store_n(&r->tail, at + bytes, __ATOMIC_RELEASE);
	__atomic_store_n(&S.shm->staged_seq, op->seq, __ATOMIC_RELEASE);
	/* a short write can wait for a dozing helper's next look; anything
	 * else (a large write, an fsync, a commit) should start now.  Not a
	 * pending write: its copier rings when it is done, and a dead helper
	 * found here would make us replay a record we have not filled */
	if (!ring_at &&
	    ring_bell(op->type != ACKPT_OP_WRITE || op->u.write.len >= (1u << 20)) < 0) {
		session_helper_died();
		return -EPIPE;
	}
	/* only now: reaping may free closed inodes, never the one in hand
	 * (callers pass no inode whose CLOSE was sent) */
	session_reap();
	return 0;
}

int send_op(struct ackpt_op *op, const char *paths, size_t plen, int fd,
	    struct inode_state *ino)
{
	return publish(op, paths, plen, fd, ino, NULL);
}

/*
 * A WRITE published before its bytes are copied, so the copy can run
 * outside the lock (stage.c): the record carries ACKPT_REC_PENDING, at
 * which the helper stops, and replay waits.  *ring_at: where it is, for
 * send_write_filled.
 */
int send_write_pending(struct ackpt_op *op, struct inode_state *ino, uint64_t *ring_at)
{
	return publish(op, NULL, 0, -1, ino, ring_at);
}

/*
 * The copy of a pending WRITE is done, len bytes of it (fewer than
 * published after a bad source page; 0 leaves nothing to write).  No lock:
 * the record and its log entry are the copier's until the release stores
 * below, and finishing must never wait for the lock, which a thread
 * waiting for this record's progress may hold.
 */
void send_write_filled(struct ackpt_op *op, uint64_t ring_at, uint64_t len)
{
	struct ackpt_ring *r = &S.shm->ring;
	struct ackpt_ring_rec *rec = (struct ackpt_ring_rec *)(r->data + ring_at % ACKPT_RING_BYTES);
	struct logrec *l = &oplog[op->seq % LOGCAP];

	if (len != op->u.write.len) {
		op->u.write.len = len;
		ring_copy_in(r, ring_at + sizeof(*rec), op, sizeof(*op));
		l->len = len;
	}
	__atomic_store_n(&l->pending, 0, __ATOMIC_RELEASE);
	__atomic_fetch_and(&rec->ext, ~ACKPT_REC_PENDING, __ATOMIC_RELEASE);
}

int session_send_open(struct inode_state *ino, int fd)
{
	struct ackpt_op op = { .type = ACKPT_OP_OPEN, .file = ino->slot,
			       .u.open = { .dev = ino->dev, .ino = ino->ino, .reg_idx = ino->reg_idx,
					   .after = ino->after } };

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

int session_send_dirsync(const char *dir)
{
	struct ackpt_op op = { .type = ACKPT_OP_DIRSYNC, .file = ACKPT_NO_FILE };
	size_t a = strlen(dir) + 1;

	if (a > ACKPT_OP_MAX_MSG - sizeof(op))
		return -ENAMETOOLONG;
	op.u.rename.path_len = (uint32_t)a;
	return send_op(&op, dir, a, -1, NULL);
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

/* Drop the records the helper has confirmed, and the inodes whose CLOSE
 * was among them. */
void oplog_prune(uint64_t durable)
{
	while (log_first <= durable && log_first <= S.seq) {
		struct logrec *r = &oplog[log_first % LOGCAP];

		if (r->seq == log_first) {
			if (r->type == ACKPT_OP_CLOSE && r->ino && r->ino->closing &&
			    r->ino->close_seq == r->seq) {
				if (r->ino->nofd)
					inode_retire(r->ino); /* a reader still holds it */
				else
					inode_free(r->ino);
			}
			free(r->paths);
			memset(r, 0, sizeof(*r));
		}
		log_first++;
	}
}

/* Forget the commits the helper has finished (ids <= done). */
void oplog_prune_commits(uint64_t done)
{
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

/* A new session: its seqs start at 1. */
void oplog_reset(void)
{
	log_first = 1;
}

/* A forked child: another thread may have been mid-update; forget the
 * parent's records, never free them. */
void oplog_fork_child(void)
{
	uint64_t s;

	for (s = log_first; s <= S.seq; s++)
		memset(&oplog[s % LOGCAP], 0, sizeof(oplog[0]));
	log_first = 1;
	pc_head = pc_tail = NULL;
}
