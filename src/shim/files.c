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

void fd_protect(int fd, int on)
{
	if ((unsigned)fd < FD_MAX)
		atomic_store(&fd_protected[fd], on);
}

/* ---- readers' descriptors ---- */

/*
 * A descriptor opened for reading a file that another process of the node
 * has work pending for, or a managed file (another process may stage
 * writes to it later, and a read after that process's write returned must
 * see them).  Such descriptors are watched: the open does not wait, but
 * their reads, and copies of them (dup) handed to code no wrapper sees
 * (exec, posix_spawn, SCM_RIGHTS, fdopen), wait in the registry for the
 * file's pending work, when there is any on the node.  The file's identity
 * is kept, and checked again with fstat, because the number may have been
 * closed behind our back and reused.
 */
atomic_uchar fd_watched[FD_MAX];
static struct { uint64_t dev, ino; } *watch_id;
static atomic_int nwatched; /* how many are set: the handoffs scan only then */

static void watch_set_id(int fd, uint64_t dev, uint64_t ino)
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
	watch_id[fd].dev = dev;
	watch_id[fd].ino = ino;
	if (!atomic_exchange_explicit(&fd_watched[fd], 1, memory_order_release))
		atomic_fetch_add_explicit(&nwatched, 1, memory_order_relaxed);
}

static void watch_set(int fd, const struct stat *st)
{
	watch_set_id(fd, st->st_dev, st->st_ino);
}

void watch_clear(int fd)
{
	if ((unsigned)fd < FD_MAX && atomic_load_explicit(&fd_watched[fd], memory_order_relaxed) &&
	    atomic_exchange_explicit(&fd_watched[fd], 0, memory_order_relaxed))
		atomic_fetch_sub_explicit(&nwatched, 1, memory_order_relaxed);
}

/*
 * to is a copy of from (dup, dup2, dup3, F_DUPFD): it reads the same file,
 * so it is watched as from is.  A vfork child shares our tables but not our
 * descriptors, so it marks nothing: it waits now, before the copy can reach
 * the image it execs (a subprocess's stdin).
 */
void watch_copy(int from, int to)
{
	if ((unsigned)to >= FD_MAX)
		return;
	if (!session_is_owner()) {
		if (fd_is_watched(from))
			watch_wait(from);
		return;
	}
	if (fd_is_watched(from) && watch_id)
		watch_set_id(to, watch_id[from].dev, watch_id[from].ino);
	else
		watch_clear(to);
}

/*
 * Before descriptors leave for an image no wrapper of ours sees: every
 * watched descriptor's file is made complete first.  exec: those it keeps
 * (inherited: not close-on-exec); posix_spawn: all of them, as its file
 * actions may dup any onto the child's stdin.
 */
void watch_wait_all(int inherited)
{
	int fd;

	if (!atomic_load_explicit(&nwatched, memory_order_relaxed))
		return;
	for (fd = 0; fd < FD_MAX; fd++) {
		int fl;

		if (!fd_is_watched(fd))
			continue;
		fl = inherited ? real.fcntl(fd, F_GETFD) : 0;
		if (fl >= 0 && !(fl & FD_CLOEXEC))
			watch_wait(fd);
	}
}

/* Before a read through a watched descriptor. */
void watch_wait(int fd)
{
	struct stat st;
	int saved = errno;

	if (!registry_any())
		goto out;
	/* a vfork child shares the table, not the descriptors: it only reads */
	if (real.fstat(fd, &st) < 0) {
		if (errno == EBADF && session_is_owner())
			watch_clear(fd); /* closed behind our back (close_range) */
		goto out;
	}
	if (!watch_id || st.st_dev != watch_id[fd].dev || st.st_ino != watch_id[fd].ino) {
		if (session_is_owner())
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
		if (i->dev == dev && i->ino == ino && !i->superseded)
			return i;
	return NULL;
}

int inode_pending(struct inode_state *ino)
{
	return ino && ino->last_seq > session_durable();
}

/* Some of our writes to it are not in the file yet, so the kernel's size
 * lags ours.  Other pending ops (a CLOSE, an fsync) change no size. */
int inode_writes_pending(const struct inode_state *ino)
{
	return ino->inflight || ino->write_seq > session_durable();
}

/*
 * Before our logical size is used (an append, a new end, SEEK_END, stat):
 * with none of our writes in flight the kernel's size is the file's, and
 * another process may have changed it since we last looked: a child given
 * the descriptor, a shell's >>, truncate(1).  One fstat, and only then.
 */
LOCKED void inode_size_refresh(struct inode_state *ino)
{
	struct stat st;

	if (!inode_writes_pending(ino) && real.fstat(ino->shadow_fd, &st) == 0)
		ino->size = (uint64_t)st.st_size;
}

/* Out of the table: a later lookup or open of the file finds another. */
static void inode_unhash(struct inode_state *ino)
{
	struct inode_state **pp = &inode_hash[hash_of(ino->dev, ino->ino)];

	while (*pp && *pp != ino)
		pp = &(*pp)->next;
	if (*pp)
		*pp = ino->next;
	ino->next = NULL;
}

/* Everything but the memory: out of the table, its slot and shadow
 * descriptor released, its unreported errors counted. */
static void inode_unlink(struct inode_state *ino)
{
	inode_unhash(ino);
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
		ino->shadow_fd = -1;
	}
	S.ninodes--;
}

static void inode_free_mem(struct inode_state *ino)
{
	free(ino->path);
	free(ino->commit_final);
	free(ino);
}

void inode_free(struct inode_state *ino)
{
	inode_unlink(ino);
	inode_free_mem(ino);
}

/*
 * Its CLOSE is complete, but a reader opened it since (a reopen that did
 * not wait): nothing of it is pending any more, so it leaves the table and
 * gives its slot back; the reader's description keeps the memory until its
 * last descriptor closes (ofd_put).
 */
void inode_retire(struct inode_state *ino)
{
	inode_unlink(ino);
	ino->retired = 1;
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

/*
 * The inode that holds the file's pending work now, for a description that
 * may have outlived its own (a reader whose inode retired: a later writer
 * of the file has a new one), or NULL.
 */
struct inode_state *ofd_inode_now(struct ofd *o)
{
	if (!o || !o->ino)
		return NULL;
	if (o->ino->retired || o->ino->superseded)
		return inode_find(o->ino->dev, o->ino->ino);
	return o->ino;
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

static struct inode_state *inode_create_from(int fd, const struct stat *st, const char *canon,
					     const struct inode_state *prev);

struct inode_state *inode_create(int fd, const struct stat *st, const char *canon)
{
	return inode_create_from(fd, st, canon, NULL);
}

/* A new state for a file whose previous one (prev) still has pending work. */
struct inode_state *inode_create_after(int fd, const struct stat *st, const char *canon,
				       const struct inode_state *prev)
{
	return inode_create_from(fd, st, canon, prev);
}

static struct inode_state *inode_create_from(int fd, const struct stat *st, const char *canon,
					     const struct inode_state *prev)
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
	if (prev) {
		/* what the program sees, and what the kernel must not overtake */
		ino->size = prev->size;
		ino->mtime = prev->mtime;
		ino->staged_hi = prev->staged_hi;
		ino->last_seq = prev->last_seq;
		ino->write_seq = prev->write_seq;
		ino->pending_pages = prev->pending_pages;
		ino->pending_end = prev->pending_end;
		ino->after = prev->last_seq;
	}
	ino->path = strdup(canon);
	ino->shadow_fd = real.fcntl(fd, F_DUPFD_CLOEXEC, 1000);
	if (ino->shadow_fd < 0) {
		slot_used[slot] = 0;
		free(ino->path);
		free(ino);
		return NULL;
	}
	fd_protect(ino->shadow_fd, 1);
	if (prev)
		inode_size_refresh(ino); /* prev's size only while its writes lag */
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

/* Take the lock and return fd's writable managed description; NULL, with
 * the lock not held, when fd is not one. */
struct ofd *lock_writable(int fd)
{
	struct ofd *o;
	int ret = session_lock();

	if (ret < 0) {
		/* the write goes to the kernel as it is: a vfork child's after
		 * our data; a signal handler's (re-entered while this thread
		 * holds the lock) at least at our offset */
		o = fd_peek(fd);
		if (ret == -ECHILD && o && o->writable)
			files_share_vfork(fd);
		else if (ret == -EDEADLK && o && o->writable)
			ofd_pos_to_kernel(fd, o);
		return NULL;
	}
	o = fd_peek(fd);
	if (!o || !o->ino || !o->writable) {
		session_unlock();
		return NULL;
	}
	return o;
}

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
uint64_t files_marker_commit(struct inode_state *ino)
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
		if (ino->nofd == 0 && ino->retired) {
			inode_free_mem(ino); /* a reader's, after its CLOSE completed */
		} else if (ino->nofd == 0 && ino->closing) {
			/* a reader of a file whose CLOSE is queued already: the
			 * record frees it when the CLOSE completes */
			if (S.state != SESS_ACTIVE)
				inode_free(ino);
			else if (ino->last_seq <= session_durable())
				session_reap();
		} else if (ino->nofd == 0) {
			/*
			 * The commit goes first: sending an op may reap
			 * inodes whose CLOSE is durable, and after our CLOSE
			 * this one could be among them.  The helper's commit
			 * fsyncs the temporary itself, so order is safe.
			 */
			if (ino->commit_final) /* complete: commit it behind the barrier */
				commit = files_marker_commit(ino);
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

/* A write that drops the lock holds o (stage_write), as the kernel pins
 * the file during a write: another thread's close returns at once, and
 * the last reference, maybe ours, queues the file's CLOSE. */
LOCKED void ofd_pin(struct ofd *o)
{
	o->refs++;
	o->pins++;
	o->ino->inflight++;
}

LOCKED void ofd_unpin(struct ofd *o)
{
	o->pins--;
	o->ino->inflight--;
	ofd_put(o);
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
	/* the last descriptor reports the file's error, whether or not a
	 * write still holds the description */
	if (o->ino && o->refs - o->pins == 1 && o->writable)
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
	int acc = flags & O_ACCMODE, writable = acc == O_WRONLY || acc == O_RDWR, theirs;

	if (fd < 0 || (unsigned)fd >= FD_MAX || !C.enabled)
		return fd;
	if (UNLIKELY(fd_peek(fd)) && session_lock() == 0) {
		/* the kernel reused a number we still track: it was closed behind
		 * our back (a raw close), so the old description is gone */
		fd_release(fd);
		session_unlock();
	}
	if (UNLIKELY(fd_is_watched(fd)) && session_is_owner())
		watch_clear(fd);
	if (flags & O_PATH)
		return fd;
	if (!writable) {
		if (real.fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
			return fd;
		/*
		 * Watched, so that its reads wait for other processes' staged
		 * work: a managed path's (they may write it later), and any
		 * file another process has work pending for now.  The open
		 * itself cannot observe that work, so it does not wait; what
		 * can (read, mmap, fstat, lseek to the end, a copy of the
		 * descriptor handed to an exec or over SCM_RIGHTS) waits first.
		 */
		theirs = registry_any() && registry_pending(st.st_dev, st.st_ino);
		if (!session_is_owner()) {
			/* a vfork child shares our table, not our descriptors: it
			 * cannot mark this one, so it waits now */
			if (theirs)
				registry_wait(st.st_dev, st.st_ino);
		} else if (theirs || (C.nroots && fd_path(fd, canon, sizeof(canon)) == 0 &&
				      path_is_managed(canon))) {
			watch_set(fd, &st);
		}
		if (!S.ninodes || session_lock() < 0)
			return fd;
		/*
		 * Our own pending work: the open cannot observe it, so it does
		 * not wait (torch.save, then a reopen to fsync).  The reader is
		 * tracked, and whatever can observe the contents through it
		 * (read, mmap, sendfile, lseek to the end or to data, a fork or
		 * exec that hands it on) waits for the file's work first; an
		 * fsync through it returns at once, as through the writer.
		 */
		ino = inode_find(st.st_dev, st.st_ino);
		if (ino && S.state == SESS_ACTIVE &&
		    !(ino->closing && ino->last_seq <= session_durable())) {
			o = calloc(1, sizeof(*o));
			if (o) {
				o->ino = ino;
				ino->nofd++;
				fd_install(fd, o);
			}
		}
		session_unlock();
		files_share_std(fd);
		return fd;
	}
	if (real.fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		return fd;
	if (fd_path(fd, canon, sizeof(canon)) < 0)
		return fd;
	if (!force && !path_is_managed(canon)) {
		/* the kernel writes through it: our staged work first */
		if (S.ninodes || registry_any())
			wait_stat_pending(&st);
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
	if (ino && ino->closing && !ino->nofd && !(flags & O_TRUNC) && S.state == SESS_ACTIVE &&
	    ino->close_seq && ino->last_seq > session_durable()) {
		/*
		 * Written, closed, and now reopened for writing (a reopen to
		 * fsync) while its CLOSE is pending: a new inode state takes
		 * over at once.  It starts from the old one's logical size and
		 * order (staged_hi, last_seq), and the helper starts none of
		 * its ops before the old slot's CLOSE is complete.
		 */
		struct inode_state *prev = ino;

		registry_wait(st.st_dev, st.st_ino);
		prev->superseded = 1;
		ino = inode_create_after(fd, &st, canon, prev);
		if (!ino) {
			/* untracked, so the kernel writes it: the old work first */
			prev->superseded = 0;
			inode_drain(prev);
			session_unlock();
			return fd;
		}
	} else if (ino && ino->closing) {
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
	files_share_std(fd);
	return fd;
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
	if (flags & WAIT_OTHERS_ONLY) {
		/* our own work is ordered by the open itself (files_post_open) */
		if (S_ISREG(st.st_mode))
			registry_wait(st.st_dev, st.st_ino);
		return 0;
	}
	return wait_stat_pending(&st);
}

/*
 * Finish the states of a file that the program has closed: its CLOSE
 * queued, or a reopen that took over from it.  We keep a descriptor of
 * such a state until the helper is done with it (a replay after the
 * helper's death writes through it), and while it is open the kernel
 * counts the file as open for writing (exec fails with ETXTBSY, a lease
 * with EAGAIN), and its close would release the POSIX locks this process
 * holds on the file.  Waits for their CLOSE and closes ours.
 */
DROPS static void inode_settle_closed(uint64_t dev, uint64_t ino)
{
	struct inode_state *i = inode_find(dev, ino);
	uint64_t upto;

	if (!i)
		return;
	upto = i->closing ? i->last_seq : i->after;
	if (!upto)
		return;
	if (upto > session_durable())
		session_unlock_wait(upto);
	session_reap();
}

void settle_closed_stat(const struct stat *st)
{
	int saved = errno;

	if (!S.ninodes || !S_ISREG(st->st_mode) || session_lock() < 0)
		return;
	inode_settle_closed(st->st_dev, st->st_ino);
	session_unlock();
	errno = saved;
}

void settle_closed_fd(int fd)
{
	struct stat st;
	int saved = errno;

	if (S.ninodes && real.fstat(fd, &st) == 0)
		settle_closed_stat(&st);
	errno = saved;
}

void settle_closed_path(int dirfd, const char *path, int flags)
{
	struct stat st;
	int saved = errno;

	if (S.ninodes && path && real.fstatat(dirfd, path, &st, flags & AT_SYMLINK_NOFOLLOW) == 0)
		settle_closed_stat(&st);
	errno = saved;
}

/*
 * Before a fork, exec or spawn: the child may run a file this process
 * wrote and closed, which another program made executable since (`printf
 * ... > x.sh; chmod +x x.sh; ./x.sh` in one shell).  Finish the closed
 * states of executables, so that our descriptor does not fail that exec
 * with ETXTBSY.  Closed checkpoints, not executable, are not waited for.
 */
void settle_closed_executables(void)
{
	struct stat st[16];
	unsigned b, n = 0, k;
	int saved = errno;

	if (!S.ninodes || session_lock() < 0)
		return;
	for (b = 0; b < HASH_BUCKETS && n < 16; b++) {
		struct inode_state *i;

		for (i = inode_hash[b]; i && n < 16; i = i->next)
			if (i->closing && real.fstat(i->shadow_fd, &st[n]) == 0 &&
			    (st[n].st_mode & 0111))
				n++;
	}
	session_unlock();
	for (k = 0; k < n; k++)
		settle_closed_stat(&st[k]);
	errno = saved;
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

/*
 * Before the file behind fd is read or changed where no wrapper of ours
 * sees it (a stream's reads inside glibc, a map, an attribute change):
 * this process's staged data for it, and other processes', first.  Keeps
 * errno.
 */
void wait_fd_pending(int fd)
{
	int saved = errno;

	if (fd_peek(fd)) {
		managed_drain_fd(fd);
	} else if (C.enabled && (S.ninodes || registry_any())) {
		struct stat st;

		/* a descriptor we do not track, of a file we may write */
		if (real.fstat(fd, &st) == 0)
			wait_stat_pending(&st);
	}
	if (fd_is_watched(fd))
		watch_wait(fd);
	errno = saved;
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
