/*
 * ackpt-helper: one per training process.  Reads op records from the shim
 * in program order, writes staged bytes from the shared arena to storage,
 * makes them durable and publishes progress back through the control block.
 *
 * Ordering rules (the whole correctness argument of this file):
 *  - ops retire in sequence order; durable_seq and arena_tail only advance
 *    over a retired prefix, so the shim may reuse arena space and treat a
 *    file as drained exactly when durable_seq passes its last op;
 *  - within a file, ops are issued in order; a write may overtake earlier
 *    writes of the same file only if their page ranges do not overlap
 *    (page-granular so buffered and O_DIRECT writes never share a page);
 *  - fsync, close and dirty wait for every earlier op of their file;
 *  - rename and sync-all wait for every earlier op of every file, and
 *    nothing after them starts until they finish.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "barrier.h"
#include "clock.h"
#include "engine.h"
#include "fault.h"
#include "order.h"
#include "path.h"
#include "proto.h"
#include "registry.h"
#include "upload.h"
#include "helper.h"

struct helper H;

void hlog(int level, const char *fmt, ...)
{
	static const char *names[] = { "error", "warning", "info", "debug" };
	char buf[1024];
	va_list ap;
	int n;

	if (level > H.log_level)
		return;
	n = snprintf(buf, sizeof(buf), "ackpt-helper[%d]: %s: ", (int)getpid(), names[level]);
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof(buf) - 1)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	if (write(2, buf, n) < 0) {
		/* nowhere left to report */
	}
}

static void futex_wake_all(uint32_t *addr)
{
	syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void publish(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	__atomic_store_n(&H.shm->helper_cpu_ns, (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec,
			 __ATOMIC_RELAXED);
	if (H.reg && H.reg_helper >= 0)
		__atomic_store_n(&H.reg->helpers[H.reg_helper].durable_seq,
				 __atomic_load_n(&H.shm->durable_seq, __ATOMIC_RELAXED), __ATOMIC_RELEASE);
	if (upload_on())
		__atomic_store_n(&H.shm->upload_seq,
				 upload_seq(__atomic_load_n(&H.shm->durable_seq, __ATOMIC_RELAXED)),
				 __ATOMIC_RELEASE);
	__atomic_fetch_add(&H.shm->progress_gen, 1, __ATOMIC_RELEASE);
	futex_wake_all(&H.shm->progress_gen);
}

static struct hop *ring_at(uint64_t seq) { return &H.ring[seq % MAXPEND]; }

static void file_unlink_head(struct hfile *f, struct hop *h)
{
	if (f->head == h) {
		f->head = h->fnext;
		if (!f->head)
			f->tail = NULL;
	}
}

static void retire(void)
{
	int progressed = 0;

	while (H.npend) {
		struct hop *h = ring_at(H.head_seq);

		if (h->state != HOP_DONE)
			break;
		if (h->op.file != ACKPT_NO_FILE && h->op.file < ACKPT_MAX_FILES)
			file_unlink_head(&H.files[h->op.file], h);
		__atomic_store_n(&H.shm->durable_seq, h->op.seq, __ATOMIC_RELEASE);
		if (ackpt_op_arena_end(&h->op) > __atomic_load_n(&H.shm->arena_tail, __ATOMIC_RELAXED))
			__atomic_store_n(&H.shm->arena_tail, ackpt_op_arena_end(&h->op), __ATOMIC_RELEASE);
		__atomic_fetch_add(&H.shm->ops_done, 1, __ATOMIC_RELAXED);
		free(h->paths);
		memset(h, 0, sizeof(*h));
		H.head_seq++;
		H.npend--;
		progressed = 1;
	}
	if (progressed)
		publish();
}

static void mark_done(struct hop *h)
{
	for (; h; h = h->merged)
		h->state = HOP_DONE;
}


/* The bytes an issued WRITE covers: its own, and those of the writes merged
 * into it (merge_following). */
static uint64_t write_span(const struct hop *h)
{
	return h->len ? h->len : h->op.u.write.len;
}

/* May op h (the first not-yet-issued op of its file) start now? */
static int file_op_ready(struct hfile *f, struct hop *h)
{
	struct hop *p;

	/* the file's previous slot first (its CLOSE and all before it) */
	if (f->after && H.head_seq <= f->after)
		return 0;
	f->after = 0;

	for (p = f->head; p && p != h; p = p->fnext) {
		if (p->state == HOP_DONE || p->merged_in)
			continue; /* a merged op: its group's first op covers it */
		if (!ackpt_may_pass(p->op.type, p->op.u.write.offset, write_span(p), h->op.type,
				    h->op.u.write.offset, h->op.u.write.len))
			return 0;
	}
	return 1;
}

/*
 * The next piece of a write still to go: a partial first page, buffered;
 * then the page-aligned middle, with O_DIRECT when it is large enough and
 * the filesystem takes it; then the partial last page, buffered.  The
 * arena keeps each chunk at its file offset's place within a page
 * (arena.h), so the middle's buffer is page-aligned too.  An O_DIRECT
 * piece covers only whole pages inside this write, so any other write that
 * touches those pages overlaps it byte for byte and waits (order.h).
 */
static void issue_write(struct hfile *f, struct hop *h)
{
	uint64_t pos = h->op.u.write.arena_pos % H.arena_size;
	uint64_t off = h->op.u.write.offset + h->done_bytes;
	uint64_t len = h->len - h->done_bytes;
	const char *buf = H.arena + pos + h->done_bytes;
	uint64_t head = (PAGE - off % PAGE) % PAGE, mid;
	struct engine_req r = {
		.kind = ENGINE_WRITE, .fd = f->fd, .buf = buf, .len = len, .off = (off_t)off,
		.fixed_index = H.registered ? (int)(pos / ACKPT_REG_BUF_MAX) : -1, .tag = h,
	};
	int ret;

	h->used_direct = 0;
	mid = head ? 0 : len & ~(uint64_t)(PAGE - 1);
	if (H.use_direct && !f->direct_failed && mid >= DIRECT_MIN && !((uintptr_t)buf % PAGE)) {
		if (f->dfd < 0) {
			char p[64];

			snprintf(p, sizeof(p), "/proc/self/fd/%d", f->fd);
			f->dfd = open(p, O_WRONLY | O_DIRECT | O_CLOEXEC);
			if (f->dfd < 0)
				f->direct_failed = 1;
		}
		if (f->dfd >= 0) {
			r.fd = f->dfd;
			r.len = mid;
			h->used_direct = 1;
		}
	} else if (head && len > head && H.use_direct && !f->direct_failed &&
		   ((len - head) & ~(uint64_t)(PAGE - 1)) >= DIRECT_MIN) {
		r.len = head; /* the rest may go direct */
	}
	h->state = HOP_ISSUED;
	f->dirty = 1;
	f->written = 1;
	if (H.delay_ms) {
		/* testing knob: a slow disk, so tests can watch commits wait */
		struct timespec ts = { H.delay_ms / 1000, (H.delay_ms % 1000) * 1000000L };

		nanosleep(&ts, NULL);
	}
	/* the test injector counts ops, not the pieces of one */
	if (!h->fault_seen)
		h->fault_ret = fault_check(FAULT_WRITE, 0);
	h->fault_seen = 1;
	ret = h->fault_ret;
	h->fault_ret = 0;
	if (ret) {
		mark_done(h);
		file_error(h->op.file, -ret, "write");
		return;
	}
	ret = engine_queue(H.eng, &r);
	if (ret < 0) {
		mark_done(h);
		file_error(h->op.file, -ret, "write submission");
	}
}

/*
 * Writes queued right behind h that continue it both in the file and in
 * the arena go out with it as one write (up to MERGE_MAX): a burst of small
 * writes costs one system call, not one each, and their partial pages are
 * joined, so only the run's two ends go through the page cache.  Each
 * merged op is still an op: it must be free to start (file_op_ready), the
 * fault injector counts it (one it fails goes alone, and fails), and it is
 * done when the whole write is.
 */
#define MERGE_MAX (16ull << 20)

#define MERGE_EARLY 16

static void merge_following(struct hfile *f, struct hop *h)
{
	uint64_t in = h->op.u.write.arena_pos % H.arena_size;
	struct hop *early[MERGE_EARLY], *last = h, *n, *p;
	int ne = 0, i;

	h->len = h->op.u.write.len;
	if (!h->fault_seen) {
		h->fault_ret = fault_check(FAULT_WRITE, 0);
		h->fault_seen = 1;
	}
	if (h->fault_ret)
		return;
	/* the file's earlier unfinished ops, gathered once (file_op_ready per
	 * candidate would walk them all again each time): a candidate
	 * continues h, so it overlaps neither h nor the ones merged before it */
	for (p = f->head; p && p != h; p = p->fnext) {
		if (p->state == HOP_DONE || p->merged_in)
			continue;
		if (ne == MERGE_EARLY)
			return; /* many in flight: merging gains little now */
		early[ne++] = p;
	}
	while ((n = f->qhead) && n->state == HOP_QUEUED && n->op.type == ACKPT_OP_WRITE) {
		uint64_t noff = n->op.u.write.offset, nlen = n->op.u.write.len;

		if (noff != h->op.u.write.offset + h->len ||
		    n->op.u.write.arena_pos % H.arena_size != in + h->len ||
		    in / ACKPT_REG_BUF_MAX != (in + h->len + nlen - 1) / ACKPT_REG_BUF_MAX ||
		    h->len + nlen > MERGE_MAX)
			break;
		for (i = 0; i < ne; i++)
			if (early[i]->state != HOP_DONE &&
			    !ackpt_may_pass(early[i]->op.type, early[i]->op.u.write.offset,
					    write_span(early[i]), n->op.type, noff, nlen))
				break;
		if (i < ne)
			break;
		n->fault_ret = fault_check(FAULT_WRITE, 0);
		n->fault_seen = 1;
		if (n->fault_ret)
			break;
		f->qhead = n->fnext;
		n->state = HOP_ISSUED;
		n->merged_in = 1;
		last->merged = n;
		last = n;
		h->len += nlen;
	}
}

static void issue_fsync(struct hfile *f, struct hop *h)
{
	struct engine_req r = { .kind = ENGINE_FSYNC, .fd = f->fd, .fixed_index = -1, .tag = h };
	int ret;

	h->state = HOP_ISSUED;
	f->dirty = 0;
	ret = fault_check(FAULT_FSYNC, 0);
	if (!ret)
		ret = engine_queue(H.eng, &r);
	if (ret < 0) {
		file_error(h->op.file, -ret, "fsync");
		if (h->op.type == ACKPT_OP_CLOSE)
			file_close(f);
		h->state = HOP_DONE;
	}
}

static void sync_all_files(void)
{
	unsigned i;

	for (i = 0; i < ACKPT_MAX_FILES; i++) {
		struct hfile *f = &H.files[i];
		int ret;

		if (!f->open)
			continue;
		if (f->dirty) {
			f->dirty = 0;
			ret = fsync_checked(f->fd);
			if (ret)
				file_error(i, -ret, "fsync");
		}
		file_name_durable(i);
	}
}

static void run_rename(struct hop *h)
{
	const char *oldp = h->paths, *newp;
	int ret;

	if (!oldp) {
		file_error(h->op.file, EINVAL, "rename (no paths)");
		return;
	}
	newp = oldp + strlen(oldp) + 1;
	if (h->op.file != ACKPT_NO_FILE && h->op.file < ACKPT_MAX_FILES) {
		struct hfile *f = &H.files[h->op.file];

		if (f->open && f->dirty) {
			f->dirty = 0;
			ret = fsync_checked(f->fd);
			if (ret) {
				file_error(h->op.file, -ret, "fsync before rename");
				return; /* never move partial data under the final name */
			}
		}
		if (f->err) {
			hlog(0, "not renaming %s: its data failed to reach storage", oldp);
			return;
		}
	}
	ret = fault_check(FAULT_RENAME, 0);
	if (!ret && rename(oldp, newp) < 0)
		ret = -errno;
	if (ret) {
		if (h->op.file >= ACKPT_MAX_FILES || !H.files[h->op.file].open) {
			/* nothing of the program's can hear of it but its exit */
			char what[2 * PATH_MAX + 32];

			__atomic_fetch_add(&H.shm->renames_failed, 1, __ATOMIC_RELEASE);
			snprintf(what, sizeof(what), "rename of %s to %s", oldp, newp);
			file_error(ACKPT_NO_FILE, -ret, what);
			return;
		}
		file_error(h->op.file, -ret, "rename");
		return;
	}
	ret = fsync_dir_of(newp);
	if (!ret && strncmp(oldp, newp, strrchr(newp, '/') - newp + 1))
		ret = fsync_dir_of(oldp);
	if (!ret) {
		/* the new directory's own entry too (a directory just made) */
		char nd[PATH_MAX], parent[PATH_MAX];
		int gone = 0;

		if (!path_dir(nd, sizeof(nd), newp) && strcmp(nd, "/") &&
		    !path_dir(parent, sizeof(parent), nd)) {
			ret = fsync_dir(parent, &gone);
			if (gone)
				ret = 0;
		}
	}
	if (ret) {
		file_error(h->op.file, -ret, "directory fsync after rename");
		return;
	}
	/* an object already uploaded (or queued) under the old name moves; a
	 * file still open is uploaded under its new name at its close */
	if (h->op.file == ACKPT_NO_FILE || h->op.file >= ACKPT_MAX_FILES ||
	    !H.files[h->op.file].open)
		upload_renamed(oldp, newp, h->op.seq);
}

/*
 * The program's fsync of a directory, taken off its path while it had work
 * pending (ACKPT_OP_DIRSYNC), done here after every earlier op.  A failure
 * is counted like a write error and handed to the program's next directory
 * fsync (dirsync_err).  A directory gone since has no entries left to keep.
 */
static void run_dirsync(struct hop *h)
{
	char what[PATH_MAX + 32];
	int gone = 0, ret;

	if (!h->paths)
		return;
	ret = fsync_dir(h->paths, &gone);
	if (!ret || gone)
		return;
	__atomic_store_n(&H.shm->dirsync_err, -ret, __ATOMIC_RELEASE);
	snprintf(what, sizeof(what), "fsync of directory %s", h->paths);
	file_error(ACKPT_NO_FILE, -ret, what);
}

/*
 * A file the program wrote is closed and durable: upload it under the name
 * it has now (a deferred rename may have moved it since its open).
 */
void upload_closing(struct hfile *f, uint64_t seq)
{
	char link[64], target[PATH_MAX];
	ssize_t n;

	if (!H.shm->upload_state || !f->open || !f->written || f->err || f->fd < 0)
		return;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", f->fd);
	n = readlink(link, target, sizeof(target) - 1);
	if (n <= 0 || (size_t)n >= sizeof(target) - 1)
		return;
	target[n] = 0;
	if (n > 10 && !strcmp(target + n - 10, " (deleted)"))
		return; /* removed before it was closed: nothing to upload */
	upload_file(f->fd, target, seq);
}

/* ---- barrier hooks ---- */

static uint64_t hook_staged(void)
{
	return __atomic_load_n(&H.shm->staged_seq, __ATOMIC_ACQUIRE);
}

static uint64_t hook_commits(void)
{
	return H.shm->commits_done;
}

static int hook_uploaded(uint64_t target, uint32_t *flags)
{
	return upload_done_upto(target, flags);
}

static uint64_t hook_durable(void)
{
	return __atomic_load_n(&H.shm->durable_seq, __ATOMIC_ACQUIRE);
}

static int hook_error(void)
{
	uint64_t e;

	/* written is not yet durable for files the program keeps open
	 * without fsync: sync them before answering */
	sync_all_files();
	e = __atomic_load_n(&H.shm->errors, __ATOMIC_ACQUIRE);

	if (e == H.errors_acked)
		return 0;
	H.errors_acked = e;
	return H.last_err ? H.last_err : EIO;
}

static void hook_log(int level, const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	hlog(level, "%s", buf);
}

static void dispatch(void)
{
	uint64_t s;

	for (s = H.head_seq; s < H.head_seq + H.npend; s++) {
		struct hop *h = ring_at(s);
		struct hfile *f;

		if (h->state != HOP_QUEUED)
			continue;
		if (h->op.type == ACKPT_OP_RENAME || h->op.type == ACKPT_OP_SYNC_ALL ||
		    h->op.type == ACKPT_OP_COMMIT || h->op.type == ACKPT_OP_DIRSYNC) {
			retire(); /* ops before it may have finished in this very pass */
			if (s != H.head_seq)
				break;
			if (h->op.type == ACKPT_OP_RENAME)
				run_rename(h);
			else if (h->op.type == ACKPT_OP_COMMIT)
				commit_enqueue(h);
			else if (h->op.type == ACKPT_OP_DIRSYNC)
				run_dirsync(h);
			else
				sync_all_files();
			mark_done(h);
			retire();
			s = H.head_seq - 1; /* loop increment lands on the new head */
			continue;
		}
		f = &H.files[h->op.file];
		if (f->qhead != h || !file_op_ready(f, h))
			continue;
		f->qhead = h->fnext;
		switch (h->op.type) {
		case ACKPT_OP_WRITE:
			if (!f->open || f->err) {
				/* never write after an error: the file is already lost */
				mark_done(h);
				break;
			}
			merge_following(f, h);
			issue_write(f, h);
			break;
		case ACKPT_OP_FSYNC:
			if (!f->open || !f->dirty) {
				if (f->open)
					file_name_durable(h->op.file);
				mark_done(h);
				break;
			}
			issue_fsync(f, h);
			break;
		case ACKPT_OP_CLOSE:
			if (f->open && f->dirty) {
				h->fsync_phase = 1;
				issue_fsync(f, h);
			} else {
				if (f->open)
					file_name_durable(h->op.file); /* created, never written */
				upload_closing(f, h->op.seq);
				file_close(f);
				mark_done(h);
			}
			break;
		case ACKPT_OP_DIRTY:
			f->dirty = 1;
			f->written = 1;
			mark_done(h);
			break;
		case ACKPT_OP_FAIL:
			if (f->open && !f->err)
				file_failed_told(h->op.file);
			mark_done(h);
			break;
		default:
			mark_done(h);
			break;
		}
	}
	engine_flush(H.eng);
	retire();
}

static void on_complete(void *tag, long res, void *arg)
{
	struct hop *h = tag;
	struct hfile *f = &H.files[h->op.file];

	if (h->op.type == ACKPT_OP_WRITE) {
		if (res == -EINVAL && h->used_direct) {
			/* the filesystem refused O_DIRECT for this range: go buffered */
			f->direct_failed = 1;
			issue_write(f, h);
			return;
		}
		if (res < 0) {
			file_error(h->op.file, (int)-res, "write");
		} else if (res == 0 && h->done_bytes < h->len) {
			file_error(h->op.file, EIO, "write (no progress)");
		} else {
			h->done_bytes += res;
			__atomic_fetch_add(&H.shm->bytes_written, (uint64_t)res, __ATOMIC_RELAXED);
			if (h->used_direct)
				__atomic_fetch_add(&H.shm->bytes_direct, (uint64_t)res,
						   __ATOMIC_RELAXED);
			__atomic_fetch_add(&H.shm->files[h->op.file].written, (uint64_t)res,
					   __ATOMIC_RELAXED);
			if (h->done_bytes < h->len) {
				issue_write(f, h);
				return;
			}
		}
		mark_done(h);
		return;
	}
	/* fsync, possibly as the first half of a close */
	if (res < 0)
		file_error(h->op.file, (int)-res, "fsync");
	else
		file_name_durable(h->op.file);
	if (h->op.type == ACKPT_OP_CLOSE) {
		upload_closing(f, h->op.seq);
		file_close(f);
	}
	mark_done(h);
}

static void reap_cb(void *tag, long res, void *arg) { on_complete(tag, res, arg); }

/* ---- receiving ops ---- */

/* How long the helper dozes (looks at the ring every millisecond, unwoken)
 * after the last record before it sleeps until rung. */
#define RING_DOZE_NS (50ull * 1000000)

/*
 * Descriptors for OPEN records, read off the socket (they are sent before
 * their record is published, and bells come in between), oldest first.
 */
#define FDQ 64
static struct { uint64_t seq; int fd; } fdq[FDQ];
static unsigned fdq_n;

/*
 * Read what the socket holds: descriptors (queued), bells (dropped).
 * Returns 0, or -EPIPE once the program has hung up.
 */
static int sock_drain(void)
{
	for (;;) {
		struct ackpt_fd_msg fm;
		char cbuf[CMSG_SPACE(sizeof(int))];
		struct iovec iov = { &fm, sizeof(fm) };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
				    .msg_controllen = sizeof(cbuf) };
		struct cmsghdr *c;
		int fd = -1;
		ssize_t n;

		if (fdq_n == FDQ)
			return 0; /* the ring's OPEN records take them first */
		n = recvmsg(H.sock, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -EPIPE;
		if (n == 0)
			return -EPIPE;
		for (c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
			if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
				memcpy(&fd, CMSG_DATA(c), sizeof(int));
		if (fd < 0)
			continue; /* a bell */
		if ((size_t)n < sizeof(fm)) {
			close(fd);
			continue;
		}
		fdq[fdq_n].seq = fm.seq;
		fdq[fdq_n++].fd = fd;
	}
}

/* The descriptor sent with OPEN seq, or -1; older ones (an OPEN that never
 * got published) are closed. */
static int fd_for(uint64_t seq)
{
	int tries;

	for (tries = 0; tries < 2; tries++) {
		int fd = -1;
		unsigned i, k = 0;

		for (i = 0; i < fdq_n; i++) {
			if (fdq[i].seq == seq && fd < 0)
				fd = fdq[i].fd;
			else if (fdq[i].seq <= seq)
				close(fdq[i].fd);
			else
				fdq[k++] = fdq[i];
		}
		fdq_n = k;
		if (fd >= 0)
			return fd;
		sock_drain(); /* sent before the record was published: it is there */
	}
	return -1;
}

static void ring_copy_out(uint64_t at, void *dst, size_t len)
{
	const struct ackpt_ring *r = &H.shm->ring;
	size_t in, first = ackpt_ring_span(at, len, &in);

	memcpy(dst, r->data + in, first);
	memcpy((char *)dst + first, r->data, len - first);
}

static int ring_has_records(void)
{
	return __atomic_load_n(&H.shm->ring.tail, __ATOMIC_ACQUIRE) != H.shm->ring.head;
}

/* Take one record off the ring: 1, or 0 when it is empty. */
static int receive_one(void)
{
	struct ackpt_ring *r = &H.shm->ring;
	uint64_t at = r->head, tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
	char buf[ACKPT_OP_MAX_MSG];
	struct ackpt_ring_rec rec;
	struct ackpt_op op;
	struct hop *h;
	size_t n, bytes;
	int fd = -1;

	H.ring_blocked = 0;
	if (tail == at)
		return 0;
	ring_copy_out(at, &rec, sizeof(rec));
	n = rec.len;
	bytes = ackpt_ring_rec_bytes(n);
	if (n < sizeof(op) || n > sizeof(buf) || bytes > tail - at) {
		hlog(0, "bad op record (%zu bytes); protocol mismatch", n);
		__atomic_store_n(&r->head, tail, __ATOMIC_RELEASE);
		return 0;
	}
	ring_copy_out(at + sizeof(rec), buf, n);
	memcpy(&op, buf, sizeof(op));
	if (op.type == ACKPT_OP_WRITE) {
		struct ackpt_ring_rec *hdr = (struct ackpt_ring_rec *)(r->data + at % ACKPT_RING_BYTES);
		uint64_t ext = __atomic_load_n(&hdr->ext, __ATOMIC_ACQUIRE);

		if (ext & ACKPT_REC_PENDING) {
			/* its copy is under way: nothing from here on before it.
			 * Once the program is gone it never ends (the copying
			 * thread died with it, its write never returned): drop it */
			if (!H.prog_gone) {
				H.ring_blocked = 1;
				return 0;
			}
			op.u.write.len = 0;
		} else {
			/* the shim may have cut its length (a bad page) before
			 * clearing PENDING: read the op again after the acquire */
			ring_copy_out(at + sizeof(rec), &op, sizeof(op));
		}
		/* take it: from now on the shim adds to a new record; acquire,
		 * so the bytes it appended are in the arena */
		ext = __atomic_fetch_or(&hdr->ext, ACKPT_REC_TAKEN, __ATOMIC_ACQUIRE);
		op.u.write.len += ext & ~(ACKPT_REC_TAKEN | ACKPT_REC_PENDING);
		op.u.write.arena_end += ext & ~(ACKPT_REC_TAKEN | ACKPT_REC_PENDING);
	}
	__atomic_store_n(&r->head, at + bytes, __ATOMIC_RELEASE);
	H.last_record_ns = now_ns();
	if (op.seq != H.next_seq)
		hlog(0, "op sequence gap: got %llu, expected %llu", (unsigned long long)op.seq,
		     (unsigned long long)H.next_seq);
	H.next_seq = op.seq + 1;
	if (H.npend == 0)
		H.head_seq = op.seq;
	if (op.type == ACKPT_OP_OPEN)
		fd = fd_for(op.seq);
	if (op.type == ACKPT_OP_WRITE) {
		uint64_t in_end = op.u.write.arena_pos % H.arena_size + op.u.write.len;

		if (in_end > atomic_load(&H.max_in))
			atomic_store(&H.max_in, in_end);
	}
	h = ring_at(op.seq);
	memset(h, 0, sizeof(*h));
	h->op = op;
	h->state = HOP_QUEUED;
	if (ackpt_op_path_len(&op) && n >= sizeof(op) + ackpt_op_path_len(&op)) {
		h->paths = malloc(ackpt_op_path_len(&op) + 1);
		if (h->paths) {
			memcpy(h->paths, buf + sizeof(op), ackpt_op_path_len(&op));
			h->paths[ackpt_op_path_len(&op)] = 0;
		}
	}
	H.npend++;
	if (op.type == ACKPT_OP_WRITE && !op.u.write.len) {
		mark_done(h); /* its copy found nothing to copy, or never ended */
		return 1;
	}
	if (op.type == ACKPT_OP_OPEN) {
		struct hfile *f = op.file < ACKPT_MAX_FILES ? &H.files[op.file] : NULL;

		if (f && fd >= 0) {
			char p[64];
			int own;

			if (f->open)
				file_close(f);
			snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
			own = fault_check(FAULT_OPEN, 0) ? -1 : open(p, O_WRONLY | O_CLOEXEC);
			if (own >= 0) {
				close(fd);
			} else {
				/* mode 0444 or similar: keep the program's OFD.  Never
				 * change its flags, which the program shares: one with
				 * O_APPEND the shim writes through the kernel itself, so
				 * no WRITE comes here for it */
				own = fd;
			}
			free(f->path);
			memset(f, 0, sizeof(*f));
			f->fd = own;
			{
				char link[64], target[4096];
				ssize_t n;

				snprintf(link, sizeof(link), "/proc/self/fd/%d", own);
				n = readlink(link, target, sizeof(target) - 1);
				if (n > 0) {
					target[n] = 0;
					f->path = strdup(target);
				}
			}
			f->dfd = -1;
			f->open = 1;
			f->open_gen = ++H.open_gen;
			f->reg_idx = op.u.open.reg_idx;
			f->dev = op.u.open.dev;
			f->ino = op.u.open.ino;
			f->after = op.u.open.after;
		} else {
			if (fd >= 0)
				close(fd);
			if (f) {
				/* the error is this file's, not the slot's previous one's */
				f->dev = op.u.open.dev;
				f->ino = op.u.open.ino;
			}
			file_error(op.file, EBADF, "open (no descriptor received)");
		}
		mark_done(h);
		return 1;
	}
	if (fd >= 0)
		close(fd);
	if (op.type != ACKPT_OP_RENAME && op.type != ACKPT_OP_SYNC_ALL &&
	    op.type != ACKPT_OP_COMMIT && op.type != ACKPT_OP_DIRSYNC) {
		struct hfile *f;

		if (op.file >= ACKPT_MAX_FILES) {
			mark_done(h);
			return 1;
		}
		f = &H.files[op.file];
		if (f->tail)
			f->tail->fnext = h;
		else
			f->head = h;
		f->tail = h;
		if (!f->qhead)
			f->qhead = h;
	}
	return 1;
}

/* ---- arena prefault (off the critical path) ---- */

/*
 * Fault the arena in ahead of use, off the critical path, from the ring's
 * start.  Staging restarts at the ring's start between checkpoints (the
 * shim's arena_head), so the furthest point staging reached in the ring
 * (or would have reached, counting what the shim wrote through the kernel
 * meanwhile) is about the largest checkpoint: the target stays a quarter
 * (and a step) past it.  A short run touches little, a second checkpoint
 * of the same size finds its pages ready, and a large arena costs memory
 * only as far as checkpoints use it.  mlock both populates and pins;
 * without memlock, populate.
 */
static void *prefault_main(void *arg)
{
	/* progress is published per step: the shim writes through the kernel
	 * what lands past it, so small steps keep that short at start */
	const uint64_t step = 8ull << 20;
	int lock_ok = 1;
	uint64_t off = 0;

	while (off < H.arena_size) {
		uint64_t end = atomic_load(&H.max_in),
			 want = (uint64_t)__atomic_load_n(&H.shm->want_mib, __ATOMIC_RELAXED) << 20;
		uint64_t len = H.arena_size - off < step ? H.arena_size - off : step, target;

		if (want > end)
			end = want;
		target = end + end / 4 + step;
		if (target > H.arena_size)
			target = H.arena_size;

		if (off >= target) {
			struct timespec ts = { 0, 10000000 };

			if (atomic_load(&H.exiting))
				break;
			nanosleep(&ts, NULL);
			continue;
		}
		if (!(lock_ok && mlock(H.arena + off, len) == 0)) {
			lock_ok = 0;
			if (madvise(H.arena + off, len, MADV_POPULATE_WRITE) < 0) {
				volatile char *p = H.arena + off;
				uint64_t i;

				for (i = 0; i < len; i += PAGE)
					p[i] = p[i];
			}
		}
		off += len;
		__atomic_store_n(&H.shm->prefault_done, off, __ATOMIC_RELEASE);
	}
	if (off >= H.arena_size) {
		hlog(3, "arena of %llu MiB faulted in (%s)", (unsigned long long)(H.arena_size >> 20),
		     lock_ok ? "locked" : "not locked: memlock limit");
		atomic_store(&H.prefault_done, 1);
	}
	return NULL;
}

/*
 * After the program is gone: wait for its uploads, still serving the
 * barrier (a coordinator here answers other ranks meanwhile), with a line
 * every 10 s.
 */
static void wait_uploads(void)
{
	uint64_t t0 = now_ns(), next = t0 + 2000000000ull;
	struct pollfd p[64];

	while (!upload_idle()) {
		int n = 0, nb;

		p[n].fd = upload_event_fd();
		p[n++].events = POLLIN;
		nb = bar_pollfds(p + n, 64 - n);
		if (poll(p, (nfds_t)(n + nb), 100) < 0 && errno != EINTR)
			break;
		upload_events();
		publish();
		bar_handle(p + n, nb);
		bar_tick();
		if (now_ns() >= next) {
			hlog(1, "the program has exited; waiting for %llu upload(s) (%.0f s so far)",
			     (unsigned long long)__atomic_load_n(&H.shm->uploads_pending, __ATOMIC_RELAXED),
			     (now_ns() - t0) / 1e9);
			next = now_ns() + 10000000000ull;
		}
	}
}

static void registry_map(void)
{
	unsigned freed;

	H.reg = ackpt_registry_map(1);
	if (!H.reg)
		return;
	H.reg_helper = ackpt_registry_claim_helper(H.reg);
	freed = ackpt_registry_sweep(H.reg);
	if (freed)
		hlog(3, "freed %u node registry entries of helpers that died", freed);
}

int main(int argc, char **argv)
{
	struct stat st;
	pthread_t t;
	int eof = 0, ret, reg_tried = 0, npfd = 0, nbar, timeout;
	struct pollfd *pfd = NULL;
	pid_t child;
	unsigned i;

	H.log_level = 1; /* until the control block says */
	H.sock = ACKPT_HELPER_SOCK_FD;
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGTERM, SIG_IGN);
	signal(SIGHUP, SIG_IGN);

	if (fstat(ACKPT_HELPER_SHM_FD, &st) < 0 || fcntl(H.sock, F_GETFD) < 0) {
		fprintf(stderr, "ackpt-helper: started without its channels; it is run by libackpt.so\n");
		return 2;
	}
	/* Keep nothing of the program's but stderr (for our log lines): an
	 * inherited pipe would make its reader wait for us. */
	{
		int null = open("/dev/null", O_RDWR | O_CLOEXEC);

		if (null >= 0) {
			dup2(null, 0);
			dup2(null, 1);
			close(null);
		}
		syscall(SYS_close_range, ACKPT_HELPER_SHM_FD + 1, ~0u, 0);
	}
	/* Detach from the program so its wait() never reaps us; the shim reaps
	 * this intermediate process at once. */
	child = fork();
	if (child < 0)
		return 1;
	if (child > 0)
		_exit(0);
	setsid();
	H.pid = getpid();
	clock_gettime(CLOCK_REALTIME, &H.started);

	H.shm = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, ACKPT_HELPER_SHM_FD, 0);
	if (H.shm == MAP_FAILED || H.shm->magic != ACKPT_PROTO_MAGIC ||
	    H.shm->version != ACKPT_PROTO_VERSION) {
		hlog(0, "control block mismatch (helper and library from different builds?)");
		return 1;
	}
	/* as the shim's mapping: 2 MiB pages where shmem_enabled allows */
	madvise(H.shm, st.st_size, MADV_HUGEPAGE);
	H.arena = (char *)H.shm + H.shm->hdr_size;
	H.arena_size = H.shm->arena_size;
	/* the shim's validated configuration: nothing here parses ACKPT_* */
	H.log_level = H.shm->cfg.log_level;
	H.use_direct = H.shm->cfg.direct != 0;
	H.delay_ms = H.shm->cfg.test_delay_ms;
	/* testing knob: skip every directory fsync, so the power-loss test can
	 * show that it catches a commit that is not durable */
	H.skip_dirfsync = H.shm->cfg.test_skip_dirfsync != 0;
	/* the test suite's fault injector */
	fault_init(getenv("ACKPT_FAULT"), H.shm->cfg.job.rank);
	for (i = 0; i < ACKPT_MAX_FILES; i++) {
		H.files[i].fd = H.files[i].dfd = -1;
		H.files[i].reg_idx = -1;
	}
	H.reg_helper = -1;
	registry_map();
	H.shm->reg_helper = H.reg_helper;

	if (!H.shm->cfg.io_pool)
		H.eng = engine_open_uring(256, &ret);
	if (!H.eng) {
		if (!H.shm->cfg.io_pool)
			hlog(1, "io_uring unavailable (%s); using a pwrite thread pool", strerror(-ret));
		H.eng = engine_open_pool(4, &ret);
		if (!H.eng) {
			hlog(0, "no I/O engine: %s", strerror(-ret));
			return 1;
		}
	}
	H.shm->helper_flags = (engine_is_uring(H.eng) ? ACKPT_HF_URING : 0) |
			      (H.use_direct ? ACKPT_HF_DIRECT : 0);
	if (pthread_create(&t, NULL, prefault_main, NULL) == 0)
		pthread_detach(t);
	/* a bad upload configuration is said here, once; the checkpoints
	 * are still written, and every upload counts as failed */
	upload_init(&H.shm->cfg, H.shm);
	H.next_seq = 1;
	H.head_seq = 1;
	{
		struct bar_hooks hooks = { hook_staged, hook_durable, hook_commits, hook_error,
					   commit_decided, hook_log, hook_uploaded,
					   commit_upload_failed };

		/* registers with the coordinator before the shim's open returns */
		if (bar_init(&hooks, &H.shm->cfg) < 0)
			return 1;
		H.shm->coord_part = bar_part_id();
	}
	__atomic_store_n(&H.shm->helper_pid, H.pid, __ATOMIC_RELEASE);
	publish();

	for (;;) {
		int nfds = 0, tick;

		/* the program's hangup ends nothing: what it published is in
		 * the ring, and all of it is written */
		if (!eof && sock_drain() < 0)
			eof = H.prog_gone = 1;
		while (H.npend < MAXPEND - 1 && receive_one())
			;
		dispatch();
		commit_pump();
		tick = bar_tick();
		commit_pump();
		if (eof && !H.npend && !engine_inflight(H.eng) && !H.cq_head && !ring_has_records())
			break;
		if (!reg_tried && atomic_load(&H.prefault_done) && engine_is_uring(H.eng) &&
		    !engine_inflight(H.eng)) {
			reg_tried = 1;
			if (engine_register(H.eng, H.arena, H.arena_size) == 0) {
				H.registered = 1;
				H.shm->helper_flags |= ACKPT_HF_FIXED_BUFS;
			} else {
				hlog(3, "arena not registered as fixed buffers (memlock); plain writes");
			}
		}
		if (npfd < bar_participants() + 8) {
			npfd = bar_participants() * 2 + 16;
			free(pfd);
			pfd = calloc(npfd, sizeof(*pfd));
			if (!pfd)
				break;
		}
		pfd[nfds].fd = engine_event_fd(H.eng);
		pfd[nfds++].events = POLLIN;
		if (upload_on()) {
			pfd[nfds].fd = upload_event_fd();
			pfd[nfds++].events = POLLIN;
		}
		if (!eof && fdq_n < FDQ) { /* a full queue leaves the socket unread */
			pfd[nfds].fd = H.sock;
			pfd[nfds++].events = POLLIN;
		}
		/* after publishing progress, before reading what was announced:
		 * pairs with the fence in the shim's job_announce() */
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		bar_progress(__atomic_load_n(&H.shm->durable_seq, __ATOMIC_RELAXED),
			     __atomic_load_n(&H.shm->commits_done, __ATOMIC_RELAXED),
			     __atomic_load_n(&H.shm->announced_seq, __ATOMIC_RELAXED),
			     __atomic_load_n(&H.shm->announced_commit, __ATOMIC_RELAXED));
		nbar = bar_pollfds(pfd + nfds, npfd - nfds);
		timeout = engine_inflight(H.eng) ? 1000 : 5000;
		if (tick >= 0 && tick < timeout)
			timeout = tick;
		if (H.npend < MAXPEND - 1) {
			/* say how we sleep, then look at the ring once more: a
			 * record published before the shim read our state is seen
			 * here, one after it comes with a bell (or, dozing, within
			 * a millisecond).  Dozing for a while after the last record
			 * spares a burst of small writes a bell each. */
			uint32_t st = !H.ring_blocked && (eof || now_ns() - H.last_record_ns > RING_DOZE_NS)
					      ? ACKPT_RING_ASLEEP
					      : ACKPT_RING_DOZING;

			__atomic_store_n(&H.shm->ring.sleep, st, __ATOMIC_SEQ_CST);
			__atomic_thread_fence(__ATOMIC_SEQ_CST);
			/* at a record whose copy is under way: its copier rings
			 * when done, and we look every millisecond meanwhile */
			if (ring_has_records() && !H.ring_blocked)
				timeout = 0; /* still reap and serve the barrier */
			else if (st == ACKPT_RING_DOZING && timeout > 1)
				timeout = 1;
		}
		ret = poll(pfd, nfds + nbar, timeout);
		__atomic_store_n(&H.shm->ring.sleep, ACKPT_RING_AWAKE, __ATOMIC_RELAXED);
		if (ret < 0 && errno != EINTR)
			break;
		engine_reap(H.eng, reap_cb, NULL);
		retire();
		if (upload_on()) {
			upload_events();
			publish();
		}
		bar_handle(pfd + nfds, nbar);
	}
	free(pfd);

	atomic_store(&H.exiting, 1);
	/* The program is gone (or closed us) and every op retired: make all
	 * remaining files durable, then close them. */
	for (i = 0; i < ACKPT_MAX_FILES; i++) {
		struct hfile *f = &H.files[i];

		if (!f->open)
			continue;
		if (is_metadata_temp(f->path)) {
			/* the program died while writing metadata: it was never
			 * committed, so its hidden temporary must not stay behind */
			unlink(f->path);
			file_close(f);
			continue;
		}
		if (f->dirty) {
			ret = fsync_checked(f->fd);
			if (ret)
				file_error(i, -ret, "fsync at exit");
		}
		file_name_durable(i);
		upload_closing(f, H.next_seq);
		file_close(f);
	}
	/* markers the program began to create and never committed (killed
	 * before their OPEN reached us): every commit is done by now, so a
	 * temporary still there was never going to be renamed */
	for (i = 0; i < ACKPT_MARKER_INTENTS; i++) {
		char *p = H.shm->marker_intent[i];

		p[ACKPT_INTENT_PATH - 1] = 0;
		/* look first: a normal run has renamed them all, and should
		 * make no unlink call here */
		if (p[0] && is_metadata_temp(p) && access(p, F_OK) == 0 && unlink(p) == 0)
			hlog(3, "removed %s: the program died before writing it", p);
	}
	publish();
	/* the program is gone; what it wrote still goes up, and the helper
	 * stays (and keeps its registry entry) until it has */
	wait_uploads();
	upload_finish();
	publish();
	if (H.reg && H.reg_helper >= 0)
		__atomic_store_n(&H.reg->helpers[H.reg_helper].owner, 0, __ATOMIC_RELEASE);
	bar_shutdown();
	hlog(3, "done: %llu bytes written, %llu errors",
	     (unsigned long long)H.shm->bytes_written, (unsigned long long)H.shm->errors);
	return H.shm->errors || H.shm->upload_failures ? 1 : 0;
}
