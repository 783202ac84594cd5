/*
 * The file table.  fdtab maps descriptor numbers to open file descriptions
 * (struct ofd: logical position, O_APPEND), which point to per-inode state
 * (logical size, helper slot, last op).  Keeping state per description and
 * per inode is what makes dup, fdopen-of-a-dup (numpy) and two opens of one
 * file behave.  The untracked fast path is one atomic load of fdtab.
 */
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>

#include "shim.h"

_Atomic(struct ofd *) fdtab[FD_MAX];
atomic_uchar fd_protected[FD_MAX];

#define HASH_BUCKETS 1024
static struct inode_state *inode_hash[HASH_BUCKETS];
static uint8_t slot_used[ACKPT_MAX_FILES];
static uint32_t slot_reported[ACKPT_MAX_FILES];
static uint32_t slot_hint;
static uint64_t unreported_lost;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

void fd_protect(int fd, int on)
{
	if ((unsigned)fd < FD_MAX)
		atomic_store(&fd_protected[fd], on);
}

/* ---- readers' descriptors ---- */

/*
 * A managed file opened for reading while no process of the node had work
 * pending on it: another process may stage writes to it later, and a read
 * through this descriptor after that process's write returned must see
 * them.  Such descriptors are watched: their reads wait in the registry
 * for the file's pending work, when there is any on the node.  The file's
 * identity is kept, and checked again with fstat, because the number may
 * have been closed behind our back and reused.
 */
atomic_uchar fd_watched[FD_MAX];
static struct { uint64_t dev, ino; } *watch_id;

static void watch_set(int fd, const struct stat *st)
{
	if ((unsigned)fd >= FD_MAX)
		return;
	if (!watch_id) {
		void *p = calloc(FD_MAX, sizeof(*watch_id));
		void *none = NULL;

		if (!p)
			return;
		if (!__atomic_compare_exchange_n(&watch_id, &none, p, 0, __ATOMIC_ACQ_REL,
						 __ATOMIC_ACQUIRE))
			free(p);
	}
	watch_id[fd].dev = st->st_dev;
	watch_id[fd].ino = st->st_ino;
	atomic_store_explicit(&fd_watched[fd], 1, memory_order_release);
}

void watch_clear(int fd)
{
	if ((unsigned)fd < FD_MAX && atomic_load_explicit(&fd_watched[fd], memory_order_relaxed))
		atomic_store_explicit(&fd_watched[fd], 0, memory_order_relaxed);
}

/* Before a read through a watched descriptor. */
void watch_wait(int fd)
{
	struct stat st;
	int saved = errno;

	if (!registry_any() || real.fstat(fd, &st) < 0)
		goto out;
	if (!watch_id || st.st_dev != watch_id[fd].dev || st.st_ino != watch_id[fd].ino) {
		watch_clear(fd); /* another file now: closed behind our back */
		goto out;
	}
	registry_wait(st.st_dev, st.st_ino);
out:
	errno = saved;
}

/* ---- inodes ---- */

static unsigned hash_of(uint64_t dev, uint64_t ino)
{
	return (unsigned)((ino * 0x9e3779b97f4a7c15ull) ^ dev) % HASH_BUCKETS;
}

struct inode_state *inode_find(uint64_t dev, uint64_t ino)
{
	struct inode_state *i;

	for (i = inode_hash[hash_of(dev, ino)]; i; i = i->next)
		if (i->dev == dev && i->ino == ino)
			return i;
	return NULL;
}

int inode_pending(struct inode_state *ino)
{
	return ino && ino->last_seq > session_durable();
}

void inode_free(struct inode_state *ino)
{
	struct inode_state **pp = &inode_hash[hash_of(ino->dev, ino->ino)];

	while (*pp && *pp != ino)
		pp = &(*pp)->next;
	if (*pp)
		*pp = ino->next;
	if (S.shm) {
		uint32_t seq = __atomic_load_n(&S.shm->files[ino->slot].err_seq, __ATOMIC_ACQUIRE);

		if (seq != slot_reported[ino->slot] && seq != ino->reported_err_seq && !ino->err_told)
			unreported_lost++;
		S.shm->files[ino->slot].err = 0;
		S.shm->files[ino->slot].err_seq = 0;
	}
	slot_reported[ino->slot] = 0;
	slot_used[ino->slot] = 0;
	if (ino->shadow_fd >= 0) {
		fd_protect(ino->shadow_fd, 0);
		real.close(ino->shadow_fd);
	}
	free(ino->path);
	free(ino->commit_final);
	free(ino);
	S.ninodes--;
}

uint64_t files_unreported_errors(void)
{
	uint64_t n = unreported_lost;
	unsigned b;

	if (!S.shm)
		return n;
	for (b = 0; b < HASH_BUCKETS; b++) {
		struct inode_state *i;

		for (i = inode_hash[b]; i; i = i->next)
			if (!i->err_told &&
			    __atomic_load_n(&S.shm->files[i->slot].err_seq, __ATOMIC_ACQUIRE) !=
				    i->reported_err_seq)
				n++;
	}
	return n;
}

/* Until the inode's ops are complete.  The inode may be freed meanwhile:
 * the caller looks it up again. */
DROPS int inode_drain(struct inode_state *ino)
{
	if (ino->last_seq > session_durable())
		session_unlock_wait(ino->last_seq);
	return 0;
}

static int slot_alloc(void)
{
	unsigned i;

	for (i = 0; i < ACKPT_MAX_FILES; i++) {
		unsigned s = (slot_hint + i) % ACKPT_MAX_FILES;

		if (!slot_used[s]) {
			slot_used[s] = 1;
			slot_hint = s + 1;
			return (int)s;
		}
	}
	return -ENFILE;
}

static struct inode_state *inode_create(int fd, const struct stat *st, const char *canon)
{
	struct inode_state *ino = calloc(1, sizeof(*ino));
	unsigned h = hash_of(st->st_dev, st->st_ino);
	int slot, ret;

	if (!ino)
		return NULL;
	slot = slot_alloc();
	if (slot < 0) {
		session_reap();
		slot = slot_alloc();
	}
	if (slot < 0) {
		free(ino);
		return NULL;
	}
	ino->dev = st->st_dev;
	ino->ino = st->st_ino;
	ino->slot = (uint32_t)slot;
	ino->size = (uint64_t)st->st_size;
	ino->path = strdup(canon);
	ino->shadow_fd = real.fcntl(fd, F_DUPFD_CLOEXEC, 1000);
	if (ino->shadow_fd < 0) {
		slot_used[slot] = 0;
		free(ino->path);
		free(ino);
		return NULL;
	}
	fd_protect(ino->shadow_fd, 1);
	S.shm->files[slot].err = 0;
	S.shm->files[slot].err_seq = 0;
	S.shm->files[slot].written = 0;
	ino->reg_idx = registry_claim(ino->dev, ino->ino, S.helper_pid);
	ino->next = inode_hash[h];
	inode_hash[h] = ino;
	S.ninodes++;
	S.files++;
	ret = session_send_open(ino, ino->shadow_fd);
	if (ret < 0 && S.state != SESS_DEAD) {
		inode_free(ino);
		return NULL;
	}
	return ino;
}

/*
 * The program is about to dup2/dup3 onto fd, which is one of ours (a
 * shadow descriptor, the helper socket or the memfd).  The program gets
 * its way, as it would without us: ours moves to another number first, so
 * it never ends up naming the program's new file (a replay after the
 * helper's death would write the old file's data into it, and our close
 * would close it).  Called with the lock held.
 */
void files_relocate_protected(int fd)
{
	int nfd = real.fcntl(fd, F_DUPFD_CLOEXEC, 1000);
	unsigned b;

	if (nfd < 0)
		return; /* no number left: the dup2 will fail with EMFILE too */
	for (b = 0; b < HASH_BUCKETS; b++) {
		struct inode_state *i;

		for (i = inode_hash[b]; i; i = i->next)
			if (i->shadow_fd == fd)
				i->shadow_fd = nfd;
	}
	job_fd_moved(fd, nfd);
	if (S.sock == fd)
		S.sock = nfd;
	if (S.memfd == fd)
		S.memfd = nfd;
	fd_protect(nfd, 1);
	fd_protect(fd, 0);
	real.close(fd);
}

/* ---- descriptors ---- */

int fd_install(int fd, struct ofd *o)
{
	if ((unsigned)fd >= FD_MAX)
		return -EMFILE;
	o->refs++;
	atomic_store_explicit(&fdtab[fd], o, memory_order_release);
	return 0;
}

/* Queue the commit of ino's marker now (called with the lock held).
 * Returns the commit id, or 0 if it was committed here or not at all. */
static uint64_t marker_commit(struct inode_state *ino)
{
	uint64_t id = 0;

	if (S.state == SESS_ACTIVE &&
	    session_send_commit(ino, ino->path, ino->commit_final, 1, &id) == 0)
		ns_add(ino->path, ino->commit_final, S.seq, id);
	else
		session_commit_now(ino->path, ino->commit_final, 1);
	free(ino->path);
	ino->path = ino->commit_final; /* the name it has from now on */
	ino->commit_final = NULL;
	return id;
}

/* Drop one reference; the last queues the file's CLOSE, and its commit if
 * it is a marker.  Returns that commit's id, or 0. */
static uint64_t ofd_put(struct ofd *o)
{
	struct inode_state *ino = o->ino;
	uint64_t commit = 0;

	if (--o->refs > 0)
		return 0;
	if (ino) {
		ino->nofd--;
		if (o->writable)
			ino->writers--;
		if (ino->nofd == 0) {
			/*
			 * The commit goes first: sending an op may reap
			 * inodes whose CLOSE is durable, and after our CLOSE
			 * this one could be among them.  The helper's commit
			 * fsyncs the temporary itself, so order is safe.
			 */
			if (ino->commit_final) /* complete: commit it behind the barrier */
				commit = marker_commit(ino);
			if (S.state == SESS_ACTIVE) {
				ino->closing = 1;
				if (session_send_simple(ACKPT_OP_CLOSE, ino) == 0) {
					const char *paths[] = { ino->path, NULL };

					ino->close_seq = ino->last_seq;
					/* other nodes' readers wait for the data */
					if (ino->path)
						job_announce(paths, 0, ino->last_seq, 0);
				} else {
					ino->close_seq = 0;
				}
			}
			if (S.state != SESS_ACTIVE || ino->last_seq <= session_durable()) {
				ino->closing = 1;
				if (S.state != SESS_ACTIVE)
					inode_free(ino);
				else
					session_reap();
			}
		}
	}
	free(o);
	return commit;
}

/* Returns a pending error for the file, if any; *commit (if given) the id
 * of the metadata commit this last close queued, or 0. */
LOCKED int fd_release_commit(int fd, uint64_t *commit)
{
	struct ofd *o = fd_peek(fd);
	uint64_t id;
	int err = 0;

	if (commit)
		*commit = 0;
	if (!o)
		return 0;
	atomic_store_explicit(&fdtab[fd], NULL, memory_order_release);
	if (o->ino && o->refs == 1 && o->writable)
		err = session_check_error_sticky(o->ino);
	id = ofd_put(o);
	if (commit)
		*commit = id;
	return err;
}

LOCKED int fd_release(int fd)
{
	return fd_release_commit(fd, NULL);
}

/* Can the file be opened for writing again, as the helper does? */
static int reopenable(int fd)
{
	char p[64];
	int own;

	snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
	own = real.open(p, O_WRONLY | O_CLOEXEC);
	if (own < 0)
		return 0;
	real.close(own);
	return 1;
}

/*
 * After the program's own open succeeded: decide whether the file is
 * managed (regular, opened for writing, its canonical path under a root)
 * and if so attach it.  The kernel resolved every symlink and dirfd for
 * us: /proc/self/fd/N names the file the program actually opened.
 */
int files_post_open(int fd, int flags, const char *how, int force)
{
	char canon[PATH_MAX];
	struct inode_state *ino;
	struct stat st;
	struct ofd *o;
	int acc = flags & O_ACCMODE, writable = acc == O_WRONLY || acc == O_RDWR;

	if (fd < 0 || (unsigned)fd >= FD_MAX || !C.enabled)
		return fd;
	if (UNLIKELY(fd_peek(fd)) && session_lock() == 0) {
		/* the kernel reused a number we still track: it was closed behind
		 * our back (a raw close), so the old description is gone */
		fd_release(fd);
		session_unlock();
	}
	watch_clear(fd);
	if (flags & O_PATH)
		return fd;
	if (!writable) {
		if (real.fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
			return fd;
		if (C.nroots && fd_path(fd, canon, sizeof(canon)) == 0 && path_is_managed(canon))
			watch_set(fd, &st); /* later writes by others: its reads wait */
		/* a reader of a file with pending work waits for it */
		if (!S.ninodes && !registry_any())
			return fd;
		registry_wait(st.st_dev, st.st_ino);
		if (!S.ninodes || session_lock() < 0)
			return fd;
		ino = inode_find(st.st_dev, st.st_ino);
		if (ino) {
			inode_drain(ino);
			ino = inode_find(st.st_dev, st.st_ino);
		}
		if (ino && !ino->closing) {
			/* track it so later reads wait for later writes */
			o = calloc(1, sizeof(*o));
			if (o) {
				o->ino = ino;
				ino->nofd++;
				fd_install(fd, o);
			}
		}
		session_unlock();
		return fd;
	}
	if (real.fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		return fd;
	if (fd_path(fd, canon, sizeof(canon)) < 0)
		return fd;
	if (!force && !path_is_managed(canon)) {
		if (S.ninodes || registry_any())
			registry_wait(st.st_dev, st.st_ino);
		return fd;
	}
	if (flags & O_DIRECT) {
		/* the program does its own aligned I/O: drain and stay out of it */
		registry_wait(st.st_dev, st.st_ino);
		return fd;
	}
	cuda_probe(); /* torch may have loaded the driver since the last open */
	if (session_lock() < 0)
		return fd;
	if (session_ensure() < 0) {
		session_unlock();
		return fd;
	}
	ino = inode_find(st.st_dev, st.st_ino);
	if (ino && ino->closing) {
		/* a fresh slot must not overtake the old one's writes */
		inode_drain(ino);
		ino = inode_find(st.st_dev, st.st_ino);
		if (ino && ino->closing && ino->last_seq <= session_durable())
			session_reap();
		ino = inode_find(st.st_dev, st.st_ino);
		if (ino && ino->closing)
			ino = NULL;
	}
	if (!ino) {
		registry_wait(st.st_dev, st.st_ino);
		ino = inode_create(fd, &st, canon);
		if (!ino) {
			session_unlock();
			return fd;
		}
	} else if (flags & O_TRUNC) {
		ino->size = 0;
	}
	cuda_session_ready();
	if ((flags & O_APPEND) && !ino->shared && !reopenable(fd)) {
		/* the helper could only write through this very description,
		 * and its pwrite would append (a 0444 file a non-root program
		 * created): the kernel writes it, in program order */
		ino->shared = 1;
	}
	o = calloc(1, sizeof(*o));
	if (!o) {
		session_unlock();
		return fd;
	}
	o->ino = ino;
	o->writable = 1;
	o->append = !!(flags & O_APPEND);
	o->pos = 0; /* a fresh O_APPEND description too: only a write moves it to the end */
	ino->nofd++;
	ino->writers++;
	fd_install(fd, o);
	alog(L_DEBUG, "%s %s -> fd %d managed (slot %u)", how, canon, fd, ino->slot);
	session_unlock();
	return fd;
}

/*
 * Wait, with the lock dropped and retaken, until the inode behind fd has no
 * staged work.  Returns the description again (it may have been closed by
 * another thread meanwhile: NULL), never a pointer from before the drop.
 */
static struct ofd *drain_fd_locked(int fd)
{
	struct ofd *o = fd_peek(fd);

	while (o && o->ino && o->ino->last_seq > session_durable()) {
		inode_drain(o->ino);
		o = fd_peek(fd);
	}
	return o;
}

/*
 * A write through a description that another process may also use (after
 * fork, posix_spawn, SCM_RIGHTS): the kernel's offset, O_APPEND and size
 * are the only ones every holder sees, so the write goes to the kernel
 * once the inode's staged data is in the file.  The helper is told the
 * file is dirty so the next fsync, close or barrier covers these bytes.
 */
static ssize_t shared_write(int fd, const struct iovec *iov, int iovcnt, off_t off, int use_pos,
			    int rwf)
{
	struct ofd *o = drain_fd_locked(fd);
	struct stat st;
	ssize_t n;

	if (!o || !o->ino)
		return -EBADF;
	registry_wait(o->ino->dev, o->ino->ino); /* other writers' staged data first */
	n = real.pwritev2(fd, iov, iovcnt, use_pos ? -1 : off, rwf);
	if (n < 0)
		return -errno;
	if (real.fstat(fd, &st) == 0)
		o->ino->size = (uint64_t)st.st_size;
	if (use_pos) {
		off_t p = real.lseek(fd, 0, SEEK_CUR);

		if (p >= 0)
			o->pos = (uint64_t)p;
	}
	if (S.state == SESS_ACTIVE)
		session_send_dirty(o->ino);
	return n;
}

/* Stage a write.  off < 0 with use_pos: at the logical position. */
/*
 * The kernel's limits on one write at `at`, applied at the call as the
 * kernel would: a request is cut to MAX_RW_COUNT; an end past LLONG_MAX is
 * EINVAL; past RLIMIT_FSIZE it is cut there, or SIGXFSZ and EFBIG at it;
 * past the filesystem's largest offset (probed only beyond 1 TiB, with
 * lseek, which refuses offsets the file cannot have) the same.  Returns
 * the count to write, or -errno.
 */
static ssize_t write_limits(int fd, uint64_t at, size_t total)
{
	const uint64_t max_rw = 0x7ffff000;
	uint64_t lim = rlimit_fsize();

	if (total > max_rw)
		total = max_rw;
	if (at > (uint64_t)INT64_MAX || total > (uint64_t)INT64_MAX - at)
		return -EINVAL;
	if (total && at + total > lim) {
		if (at >= lim) {
			raise(SIGXFSZ);
			return -EFBIG;
		}
		total = lim - at;
	}
	if (total && at + total > (1ull << 40)) {
		off_t cur = real.lseek(fd, 0, SEEK_CUR);
		uint64_t lo = at, hi = at + total; /* lo is a valid end, hi is probed */

		if (real.lseek(fd, (off_t)at, SEEK_SET) < 0) {
			total = 0;
			lo = hi = 0;
		}
		while (hi > lo && real.lseek(fd, (off_t)hi, SEEK_SET) < 0) {
			uint64_t mid = lo + (hi - lo + 1) / 2;

			if (real.lseek(fd, (off_t)mid, SEEK_SET) < 0)
				hi = mid - 1;
			else
				lo = mid;
		}
		if (cur >= 0)
			real.lseek(fd, cur, SEEK_SET);
		if (hi == 0 && lo == 0)
			return -EFBIG;
		if (hi < at + total)
			total = hi - at;
		if (!total)
			return -EFBIG;
	}
	return (ssize_t)total;
}

#define RWF_KNOWN 0xff /* RWF_HIPRI .. RWF_DONTCACHE */

static struct outcome stage_write(int fd, const struct iovec *iov, int iovcnt, off_t off,
				  int use_pos, int rwf)
{
	struct ofd *o;
	struct inode_state *ino;
	uint64_t t0 = now_ns(), at, pos;
	size_t total = 0, left;
	ssize_t lim;
	int i, ret, append;

	if (session_lock() < 0)
		return NOT_OURS;
	o = fd_peek(fd);
	if (!o || !o->ino || !o->writable) {
		session_unlock();
		return NOT_OURS;
	}
	ino = o->ino;
	for (i = 0; i < iovcnt; i++) {
		if (iov[i].iov_len > SSIZE_MAX - total) {
			session_unlock();
			return done(-EINVAL);
		}
		total += iov[i].iov_len;
	}
	if (rwf & ~RWF_KNOWN) {
		session_unlock();
		return done(-EOPNOTSUPP);
	}
	/* after a write error the helper drops the file's later data: fail
	 * every later write rather than report success without it */
	ret = session_check_error_sticky(ino);
	if (ret < 0) {
		session_unlock();
		return done(ret);
	}
	cuda_probe_late(total);
	if (!use_pos && off < 0) {
		session_unlock();
		return done(-EINVAL);
	}
	if (UNLIKELY(!ino->shared) && registry_shared(ino->reg_idx))
		ino->shared = 1;
	if (ino->shared) {
		ret = shared_write(fd, iov, iovcnt, off, use_pos, rwf);
		S.stall_ns += now_ns() - t0;
		session_unlock();
		return done(ret);
	}
	/* Linux appends even for pwrite on an O_APPEND description, unless
	 * RWF_NOAPPEND; RWF_APPEND appends for this call */
	append = (o->append && !(rwf & RWF_NOAPPEND)) || (rwf & RWF_APPEND);
	at = append ? ino->size : use_pos ? o->pos : (uint64_t)off;
	lim = write_limits(fd, at, total);
	if (lim < 0) {
		session_unlock();
		return done(lim);
	}
	total = (size_t)lim;
	pos = at;
	left = total;
	if (S.state == SESS_ACTIVE) {
		for (i = 0; i < iovcnt && left; i++) {
			size_t len = iov[i].iov_len < left ? iov[i].iov_len : left, staged;

			if (!len)
				continue;
			ret = session_stage(ino, iov[i].iov_base, len, pos,
					    cuda_is_device(iov[i].iov_base), &staged);
			if (ret == -EFAULT) {
				/* a bad buffer: the bytes before it, or EFAULT */
				pos += staged;
				total = (size_t)(pos - at);
				if (!total) {
					session_unlock();
					return done(-EFAULT);
				}
				break;
			}
			if (ret < 0 && S.state != SESS_DEAD) {
				session_unlock();
				return done(ret);
			}
			if (ret < 0) {
				/* helper died mid-write: the rest goes straight to the file */
				ssize_t n = real.pwrite(ino->shadow_fd, iov[i].iov_base, len, (off_t)pos);

				if (n < 0) {
					session_unlock();
					return done(-errno);
				}
			}
			pos += len;
			left -= len;
		}
	} else {
		struct iovec cut[IOV_MAX];
		ssize_t n;
		int k = 0;

		for (i = 0; i < iovcnt && left && k < IOV_MAX; i++) {
			cut[k] = iov[i];
			if (cut[k].iov_len > left)
				cut[k].iov_len = left;
			left -= cut[k++].iov_len;
		}
		n = real.pwritev(ino->shadow_fd, cut, k, (off_t)at);
		if (n < 0) {
			session_unlock();
			return done(-errno);
		}
		total = (size_t)n;
	}
	if (at + total > ino->size)
		ino->size = at + total;
	clock_gettime(CLOCK_REALTIME, &ino->mtime);
	if (use_pos) {
		o->pos = at + total;
		/* keep the kernel offset in step for inherited fds and exec */
		real.lseek(fd, (off_t)o->pos, SEEK_SET);
	}
	S.stall_ns += now_ns() - t0;
	session_unlock();
	return done((ssize_t)total);
}

/*
 * A write to a regular file is one system call to a signal handler: it
 * runs before the write or after all of it, never in the middle (where it
 * would find the lock held, a half-staged write, or exit() with part of
 * the data).  So asynchronous signals wait until the write is staged.
 * Faults raised by the copy itself stay deliverable.
 */
struct outcome managed_write(int fd, const struct iovec *iov, int iovcnt, off_t off, int use_pos,
			     int rwf)
{
	sigset_t all, old;
	struct outcome r;

	sigfillset(&all);
	sigdelset(&all, SIGSEGV);
	sigdelset(&all, SIGBUS);
	sigdelset(&all, SIGFPE);
	sigdelset(&all, SIGILL);
	sigdelset(&all, SIGTRAP);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	r = stage_write(fd, iov, iovcnt, off, use_pos, rwf);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return r;
}

struct outcome managed_lseek(int fd, off_t off, int whence)
{
	struct ofd *o;
	off_t base, r;

	if (session_lock() < 0)
		return NOT_OURS;
	o = fd_peek(fd);
	if (o && o->ino && !o->writable && whence != SEEK_SET && whence != SEEK_CUR) {
		/* a reader asking where the end or the data is: the writes first */
		o = drain_fd_locked(fd);
		session_unlock();
		return NOT_OURS; /* the kernel answers, now that it knows */
	}
	if (!o || !o->ino || !o->writable) {
		session_unlock();
		return NOT_OURS;
	}
	if (UNLIKELY(!o->ino->shared) && registry_shared(o->ino->reg_idx))
		o->ino->shared = 1;
	if (o->ino->shared) {
		o = drain_fd_locked(fd);
		if (o)
			registry_wait(o->ino->dev, o->ino->ino);
		if (!o) {
			session_unlock();
			return done(-EBADF);
		}
		r = real.lseek(fd, off, whence);
		if (r < 0)
			r = -errno;
		else
			o->pos = (uint64_t)r;
		session_unlock();
		return done(r);
	}
	switch (whence) {
	case SEEK_SET: base = 0; break;
	case SEEK_CUR: base = (off_t)o->pos; break;
	case SEEK_END: base = (off_t)o->ino->size; break;
	default:
		/* SEEK_DATA/SEEK_HOLE look at the real file: make it real first */
		o = drain_fd_locked(fd);
		if (!o) {
			session_unlock();
			return done(-EBADF);
		}
		r = real.lseek(fd, off, whence);
		if (r < 0) {
			r = -errno;
		} else {
			o->pos = (uint64_t)r;
		}
		session_unlock();
		return done(r);
	}
	if ((off > 0 && base > INT64_MAX - off) || base + off < 0) {
		session_unlock();
		return done(-EINVAL);
	}
	o->pos = (uint64_t)(base + off);
	real.lseek(fd, (off_t)o->pos, SEEK_SET);
	session_unlock();
	return done((off_t)o->pos);
}

/* Make everything written to fd's file real before a pass-through op. */
int managed_drain_fd(int fd)
{
	struct ofd *o;

	if (!fd_peek(fd) || session_lock() < 0)
		return 0;
	o = fd_peek(fd);
	if (o && o->ino)
		inode_drain(o->ino);
	session_unlock();
	return 0;
}

/* After a pass-through op changed the file: take position and size from the kernel. */
void managed_resync(int fd)
{
	struct ofd *o;
	struct stat st;

	if (!fd_peek(fd) || session_lock() < 0)
		return;
	o = fd_peek(fd);
	if (o && o->ino) {
		off_t p = real.lseek(fd, 0, SEEK_CUR);

		if (p >= 0)
			o->pos = (uint64_t)p;
		if (real.fstat(fd, &st) == 0)
			o->ino->size = (uint64_t)st.st_size;
	}
	session_unlock();
}

/* Before touching a path: wait for a deferred rename involving it, and for
 * pending data of the file it names (flags: AT_SYMLINK_NOFOLLOW honoured). */
int wait_path_pending(int dirfd, const char *path, int flags)
{
	char canon[PATH_MAX];
	struct stat st;

	if (!C.enabled)
		return 0;
	if (ns_pending_any() && canon_path(dirfd, path, canon, sizeof(canon)) == 0)
		ns_wait_path(canon);
	if (!S.ninodes && !registry_any())
		return 0;
	if (real.fstatat(dirfd, path, &st, flags & AT_SYMLINK_NOFOLLOW) < 0)
		return 0;
	return wait_stat_pending(&st);
}

int wait_stat_pending(const struct stat *st)
{
	struct inode_state *ino;

	if (!S_ISREG(st->st_mode))
		return 0;
	registry_wait(st->st_dev, st->st_ino);
	if (!S.ninodes || session_lock() < 0)
		return 0;
	ino = inode_find(st->st_dev, st->st_ino);
	if (ino)
		inode_drain(ino);
	session_unlock();
	return 0;
}

void files_fork_child(void)
{
	unsigned i;

	/* inherited descriptors are plain descriptors in the child; their
	 * state (and the memory) stays with the parent */
	for (i = 0; i < FD_MAX; i++) {
		if (atomic_load_explicit(&fdtab[i], memory_order_relaxed))
			atomic_store_explicit(&fdtab[i], NULL, memory_order_relaxed);
		if (atomic_load_explicit(&fd_protected[i], memory_order_relaxed)) {
			atomic_store_explicit(&fd_protected[i], 0, memory_order_relaxed);
			real.close((int)i);
		}
	}
	memset(inode_hash, 0, sizeof(inode_hash));
	memset(slot_used, 0, sizeof(slot_used));
	memset(slot_reported, 0, sizeof(slot_reported));
	unreported_lost = 0;
}

int files_any_inherited_open(void)
{
	unsigned i;

	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (o && o->ino && o->writable) {
			int fl = real.fcntl((int)i, F_GETFD);

			if (fl >= 0 && !(fl & FD_CLOEXEC))
				return 1;
		}
	}
	return 0;
}

static int fd_inheritable(int fd)
{
	int fl = real.fcntl(fd, F_GETFD);

	return fl >= 0 && !(fl & FD_CLOEXEC);
}

/*
 * Some descriptions are about to reach another process: every writable
 * managed one (all), or those an exec keeps open (!all).  Their inodes go
 * through the kernel from now on, and what is staged for them is written
 * out first, so the other process finds the data, size and offset a
 * synchronous run would show it.  Not for a vfork child: files_share_vfork.
 */
void files_share(int all)
{
	uint64_t wait = 0;
	unsigned i;

	if (S.state != SESS_ACTIVE || !S.ninodes || session_lock() < 0)
		return;
	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (!o || !o->ino || !o->writable || (!all && !fd_inheritable((int)i)))
			continue;
		o->ino->shared = 1;
		if (o->ino->last_seq > wait)
			wait = o->ino->last_seq;
	}
	session_unlock();
	if (wait)
		session_wait(wait, 0, 0);
}

/* One descriptor leaves through SCM_RIGHTS. */
void files_share_fd(int fd)
{
	struct ofd *o;
	uint64_t wait = 0;

	if (!fd_peek(fd) || session_lock() < 0)
		return;
	o = fd_peek(fd);
	if (o && o->ino && o->writable) {
		o->ino->shared = 1;
		wait = o->ino->last_seq;
	}
	session_unlock();
	if (wait)
		session_wait(wait, 0, 0);
}

/*
 * In a vfork child (CPython's subprocess), which runs in our memory while
 * the parent is suspended until exec: it may mark and wait, never lock or
 * send.  fd < 0: every description the exec keeps open.
 */
void files_share_vfork(int fd)
{
	unsigned i, lo = fd < 0 ? 0 : (unsigned)fd, hi = fd < 0 ? FD_MAX : (unsigned)fd + 1;
	uint64_t wait = 0;

	if (S.state != SESS_ACTIVE)
		return;
	for (i = lo; i < hi && i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (!o || !o->ino || !o->writable || (fd < 0 && !fd_inheritable((int)i)))
			continue;
		o->ino->shared = 1;
		if (o->ino->last_seq > wait)
			wait = o->ino->last_seq;
	}
	if (wait)
		session_wait(wait, 0, 0);
}

/*
 * An exec that keeps a marker's descriptor open hands the marker to a new
 * image that knows nothing of it (`exec > latest; exec /bin/echo 7`): no
 * close of ours would ever commit it.  Commit it now, behind the barrier
 * as always, and wait, so the new image writes its bytes into the final
 * name, as in a plain run where the marker exists (empty) before they
 * arrive.  Returns the last commit id to wait for, or 0.
 */
uint64_t files_commit_inherited_markers(void)
{
	uint64_t id = 0, r;
	unsigned i;

	if (S.state == SESS_NONE || S.state == SESS_FAILED || !S.ninodes || session_lock() < 0)
		return 0;
	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (o && o->ino && o->ino->commit_final && fd_inheritable((int)i)) {
			r = marker_commit(o->ino);
			if (r > id)
				id = r;
		}
	}
	session_unlock();
	return id;
}

/*
 * A commit marker still open when the process exits would otherwise never
 * be committed: release every descriptor of one, as the kernel's close at
 * exit would, so its commit is queued before the exit drain.
 */
void files_release_markers(void)
{
	unsigned i;

	if (S.state == SESS_NONE || S.state == SESS_FAILED || !S.ninodes || session_lock() < 0)
		return;
	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (o && o->ino && o->ino->commit_final)
			fd_release((int)i);
	}
	session_unlock();
}

/* Every extended attribute of path onto fd (ACLs and security labels
 * included); best effort, as cp --preserve=xattr. */
static void copy_xattrs(const char *path, int fd)
{
	char names[4096], value[4096];
	ssize_t n = real.llistxattr(path, names, sizeof(names));
	char *p;

	for (p = names; n > 0 && p < names + n; p += strlen(p) + 1) {
		ssize_t v = real.lgetxattr(path, p, value, sizeof(value));

		if (v >= 0)
			real.fsetxattr(fd, p, value, (size_t)v, 0);
	}
}

/*
 * A metadata file opened for writing is created under a hidden name in the
 * same directory (O_EXCL, the program's mode and umask) and committed to its
 * final name after the barrier when the program closes it.  Done with the
 * fd or -errno, or not ours when the ordinary path applies (read-modify-write
 * of an existing file, or no helper).
 */
struct outcome files_open_metadata(const char *canon, int flags, mode_t mode)
{
	static atomic_uint counter;
	char tmp[PATH_MAX];
	const char *base = strrchr(canon, '/') + 1;
	struct stat st;
	struct ofd *o;
	int exists, fd, saved;

	if (real.lstat(canon, &st) == 0 && S_ISLNK(st.st_mode)) {
		char target[PATH_MAX];

		/* as the kernel would: refuse with O_NOFOLLOW, else write
		 * (and commit) through the link to its target */
		if (flags & O_NOFOLLOW)
			return done(-ELOOP);
		if (!realpath(canon, target) || !path_is_managed(target))
			return NOT_OURS;
		return files_open_metadata(target, flags | O_NOFOLLOW, mode);
	}
	exists = real.stat(canon, &st) == 0;
	if (exists && !S_ISREG(st.st_mode))
		return NOT_OURS;
	if (exists && (flags & O_EXCL) && (flags & O_CREAT))
		return done(-EEXIST);
	if ((exists && !(flags & O_TRUNC)) || (!exists && !(flags & O_CREAT)))
		return NOT_OURS;
	if (snprintf(tmp, sizeof(tmp), "%.*s.%s.ackpt.%d.%u", (int)(base - canon), canon, base,
		     (int)getpid(), atomic_fetch_add(&counter, 1)) >= (int)sizeof(tmp))
		return NOT_OURS;
	fd = real.openat(AT_FDCWD, tmp, (flags & ~O_TRUNC) | O_CREAT | O_EXCL | O_NOFOLLOW,
			 mode);
	if (fd < 0)
		return done(-errno);
	/* O_TRUNC on an existing file keeps its mode, owner, group and
	 * extended attributes; so does the commit (only the inode changes:
	 * the marker must appear whole, after the barrier) */
	if (exists) {
		real.fchmod(fd, st.st_mode & 07777);
		if (real.fchown(fd, st.st_uid, st.st_gid) < 0 && st.st_gid != getegid())
			real.fchown(fd, (uid_t)-1, st.st_gid); /* the group at least, if ours */
		copy_xattrs(canon, fd);
	}
	saved = errno;
	files_post_open(fd, flags, "open (metadata)", 1);
	errno = saved;
	o = fd_peek(fd);
	if (!o || !o->ino || session_lock() < 0) {
		real.close(fd);
		real.unlink(tmp);
		return NOT_OURS;
	}
	o->ino->commit_final = strdup(canon);
	session_unlock();
	alog(L_DEBUG, "metadata %s staged as %s", canon, tmp);
	return done(fd);
}

/* Helper gone: make every file this process still tracks durable. */
void files_fsync_all(void)
{
	unsigned b;

	for (b = 0; b < HASH_BUCKETS; b++) {
		struct inode_state *i;

		for (i = inode_hash[b]; i; i = i->next)
			if (i->shadow_fd >= 0 && real.fsync(i->shadow_fd) < 0)
				alog(L_ERROR, "fsync of %s failed: %s", i->path ? i->path : "?",
				     strerror(errno));
	}
}
