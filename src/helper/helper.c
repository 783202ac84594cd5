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
#include "engine.h"
#include "fault.h"
#include "order.h"
#include "path.h"
#include "proto.h"

#define MAXPEND   4096
#define PAGE      4096ull
#define DIRECT_MIN (64 * 1024)

enum hop_state { HOP_FREE = 0, HOP_QUEUED, HOP_ISSUED, HOP_DONE };

struct hop {
	struct ackpt_op op;
	char *paths;
	enum hop_state state;
	uint64_t done_bytes;
	int used_direct;
	int fsync_phase;       /* CLOSE: fsync issued */
	struct hop *fnext;     /* next pending op of the same file */
};

struct hfile {
	int fd, dfd;           /* own OFDs: buffered and O_DIRECT (-1 if none) */
	int open;
	int dirty;
	int direct_failed;
	int err;
	int reg_idx;
	int name_durable;      /* its directory entry has been fsynced */
	uint64_t open_gen;     /* H.open_gen when it was opened */
	uint64_t dev, ino;
	char *path;            /* at open, for log lines */
	struct hop *head, *tail, *qhead;
};

static struct {
	struct ackpt_shm *shm;
	char *arena;
	uint64_t arena_size;
	int sock;
	int log_level;   /* 0 error, 1 warn, 2 info, 3 debug */
	int use_direct;
	struct engine *eng;
	struct hop ring[MAXPEND];
	uint64_t head_seq;   /* seq of ring slot at head (next to retire) */
	uint64_t next_seq;   /* seq expected next from the socket */
	unsigned npend;
	struct hfile files[ACKPT_MAX_FILES];
	atomic_int prefault_done;
	atomic_int exiting;
	_Atomic uint64_t max_end;
	int registered;
	struct ackpt_registry *reg;
	int reg_helper;
	long delay_ms;
	int skip_dirfsync;   /* testing knob: the negative control of the power-loss test */
	struct timespec started; /* CLOCK_REALTIME at start */
	uint64_t open_gen;   /* counts OPEN ops */
	struct { char *dir; uint64_t gen; } dircache[16]; /* directories fsynced, and when */
	unsigned dircache_next;
	pid_t pid;
	uint64_t errors_acked;
	int last_err;
	struct commit *cq_head, *cq_tail;
} H;

/* A metadata commit waiting for the barrier, in request order. */
struct commit {
	uint64_t id;
	char *tmp, *final;
	int own_temp;
	uint32_t slot;
	uint64_t dev, ino;  /* the file in that slot at request time */
	int file_err;       /* error of the metadata file itself, up to the commit */
	int state;          /* 0 new, 1 waiting for the barrier, 2 decided */
	int status;
	struct commit *next;
};

static void hlog(int level, const char *fmt, ...)
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

static void publish(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
	__atomic_store_n(&H.shm->helper_cpu_ns, (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec,
			 __ATOMIC_RELAXED);
	if (H.reg && H.reg_helper >= 0)
		__atomic_store_n(&H.reg->helpers[H.reg_helper].durable_seq,
				 __atomic_load_n(&H.shm->durable_seq, __ATOMIC_RELAXED), __ATOMIC_RELEASE);
	__atomic_fetch_add(&H.shm->progress_gen, 1, __ATOMIC_RELEASE);
	futex_wake_all(&H.shm->progress_gen);
}

static void file_error(uint32_t slot, int err, const char *what)
{
	struct hfile *f;

	__atomic_fetch_add(&H.shm->errors, 1, __ATOMIC_RELAXED);
	H.last_err = err;
	if (slot == ACKPT_NO_FILE || slot >= ACKPT_MAX_FILES) {
		hlog(0, "%s failed: %s", what, strerror(err));
		return;
	}
	f = &H.files[slot];
	if (!f->err)
		f->err = err;
	{
		/* a commit waiting for this very file (its CLOSE's fsync can come
		 * after the COMMIT) must not go ahead: its own fsync of the file
		 * would be a retried fsync, and could succeed without the data */
		struct commit *c;

		for (c = H.cq_head; c; c = c->next)
			if (c->slot == slot && c->dev == f->dev && c->ino == f->ino && !c->file_err)
				c->file_err = err;
	}
	if (!__atomic_load_n(&H.shm->files[slot].err, __ATOMIC_RELAXED))
		__atomic_store_n(&H.shm->files[slot].err, err, __ATOMIC_RELEASE);
	__atomic_fetch_add(&H.shm->files[slot].err_seq, 1, __ATOMIC_RELEASE);
	hlog(0, "%s of %s failed: %s", what, f->path ? f->path : "(unknown file)", strerror(err));
	publish();
}

static void registry_release(struct hfile *f)
{
	struct ackpt_registry_entry *e;
	int32_t pid;

	if (!H.reg || f->reg_idx < 0 || f->reg_idx >= ACKPT_REGISTRY_ENTRIES)
		return;
	e = &H.reg->e[f->reg_idx];
	pid = H.pid;
	if (e->dev == f->dev && e->ino == f->ino &&
	    __atomic_load_n(&e->pid, __ATOMIC_ACQUIRE) == pid) {
		__atomic_store_n(&e->live, 0, __ATOMIC_RELEASE);
		__atomic_store_n(&e->shared, 0, __ATOMIC_RELAXED);
	}
	if (e->dev == f->dev && e->ino == f->ino &&
	    __atomic_compare_exchange_n(&e->pid, &pid, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
		__atomic_fetch_sub(&H.reg->used, 1, __ATOMIC_RELAXED);
	f->reg_idx = -1;
}

static void file_close(struct hfile *f)
{
	if (f->dfd >= 0)
		close(f->dfd);
	if (f->fd >= 0)
		close(f->fd);
	f->fd = f->dfd = -1;
	f->open = 0;
	f->dirty = 0;
	registry_release(f);
}

/* fsync, or the error the fault hook makes of it */
static int fsync_checked(int fd)
{
	int ret = fault_check(FAULT_FSYNC, 0);

	if (!ret && fsync(fd) < 0)
		ret = -errno;
	return ret;
}

/* fsync the directory dir; *gone is set when the directory no longer
 * exists, which is not a write error */
static int fsync_dir(const char *dir, int *gone)
{
	int fd, ret;

	if (H.skip_dirfsync)
		return 0;
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0) {
		if (gone && (errno == ENOENT || errno == ENOTDIR || errno == ESTALE))
			*gone = 1;
		return -errno;
	}
	ret = fault_check(FAULT_DIRFSYNC, 0);
	if (!ret && fsync(fd) < 0)
		ret = -errno;
	close(fd);
	return ret;
}

/* fsync the directory holding path */
static int fsync_dir_of(const char *path)
{
	char dir[PATH_MAX];

	return path_dir(dir, sizeof(dir), path) ? 0 : fsync_dir(dir, NULL);
}

/*
 * Make a data file's name durable, not just its bytes: fsync its directory,
 * and that directory's parent (a checkpoint directory the program has just
 * made). Journaling filesystems usually commit the entry with the file's own
 * fsync; others (ext2, some network filesystems) do not, and a commit must
 * never name data whose directory entry a power loss can take away. A
 * directory fsynced after the file was opened is not fsynced again.
 */
static int dir_synced_since(const char *dir, uint64_t gen)
{
	unsigned i;

	for (i = 0; i < sizeof(H.dircache) / sizeof(H.dircache[0]); i++)
		if (H.dircache[i].dir && H.dircache[i].gen >= gen && !strcmp(H.dircache[i].dir, dir))
			return 1;
	return 0;
}

static int sync_dir_cached(const char *dir, uint64_t gen)
{
	unsigned i;
	int ret, gone = 0;

	if (dir_synced_since(dir, gen))
		return 0;
	ret = fsync_dir(dir, &gone);
	if (gone)
		return 0; /* removed with its directory: no name left to keep */
	if (ret)
		return ret;
	i = H.dircache_next++ % (sizeof(H.dircache) / sizeof(H.dircache[0]));
	free(H.dircache[i].dir);
	H.dircache[i].dir = strdup(dir);
	H.dircache[i].gen = H.open_gen;
	return 0;
}

static void file_name_durable(uint32_t slot)
{
	struct hfile *f = &H.files[slot];
	char link[64], path[PATH_MAX], dir[PATH_MAX], parent[PATH_MAX];
	ssize_t n;
	int ret;

	if (f->name_durable || f->err || f->fd < 0)
		return;
	/* where the file is now: it may have been renamed since it was opened */
	snprintf(link, sizeof(link), "/proc/self/fd/%d", f->fd);
	n = readlink(link, path, sizeof(path) - 1);
	if (n <= 0 || path[0] != '/')
		return;
	path[n] = 0;
	f->name_durable = 1;
	if ((n > 10 && !strcmp(path + n - 10, " (deleted)")) || path_dir(dir, sizeof(dir), path))
		return; /* no name left to keep */
	ret = sync_dir_cached(dir, f->open_gen);
	if (!ret && strcmp(dir, "/") && !path_dir(parent, sizeof(parent), dir))
		ret = sync_dir_cached(parent, f->open_gen);
	if (ret)
		file_error(slot, -ret, "directory fsync");
}

/* ---- op bookkeeping ---- */

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
	h->state = HOP_DONE;
}


/* May op h (the first not-yet-issued op of its file) start now? */
static int file_op_ready(struct hfile *f, struct hop *h)
{
	struct hop *p;

	for (p = f->head; p && p != h; p = p->fnext) {
		if (p->state == HOP_DONE)
			continue;
		if (!ackpt_may_pass(p->op.type, p->op.u.write.offset, p->op.u.write.len, h->op.type,
				    h->op.u.write.offset, h->op.u.write.len))
			return 0;
	}
	return 1;
}

static void issue_write(struct hfile *f, struct hop *h)
{
	uint64_t pos = h->op.u.write.arena_pos % H.arena_size;
	uint64_t off = h->op.u.write.offset + h->done_bytes;
	uint64_t len = h->op.u.write.len - h->done_bytes;
	const char *buf = H.arena + pos + h->done_bytes;
	struct engine_req r = {
		.kind = ENGINE_WRITE, .fd = f->fd, .buf = buf, .len = len, .off = (off_t)off,
		.fixed_index = H.registered ? (int)(pos / ACKPT_REG_BUF_MAX) : -1, .tag = h,
	};
	int ret;

	h->used_direct = 0;
	if (H.use_direct && !f->direct_failed && len >= DIRECT_MIN && !(off % PAGE) &&
	    !(len % PAGE) && !((uintptr_t)buf % PAGE)) {
		if (f->dfd < 0) {
			char p[64];

			snprintf(p, sizeof(p), "/proc/self/fd/%d", f->fd);
			f->dfd = open(p, O_WRONLY | O_DIRECT | O_CLOEXEC);
			if (f->dfd < 0)
				f->direct_failed = 1;
		}
		if (f->dfd >= 0) {
			r.fd = f->dfd;
			h->used_direct = 1;
		}
	}
	h->state = HOP_ISSUED;
	f->dirty = 1;
	if (H.delay_ms) {
		/* testing knob: a slow disk, so tests can watch commits wait */
		struct timespec ts = { H.delay_ms / 1000, (H.delay_ms % 1000) * 1000000L };

		nanosleep(&ts, NULL);
	}
	ret = fault_check(FAULT_WRITE, 0);
	if (ret) {
		h->state = HOP_DONE;
		file_error(h->op.file, -ret, "write");
		return;
	}
	ret = engine_queue(H.eng, &r);
	if (ret < 0) {
		h->state = HOP_DONE;
		file_error(h->op.file, -ret, "write submission");
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
	if (ret)
		file_error(h->op.file, -ret, "directory fsync after rename");
}

/* The shim's hidden temporary for metadata: ".<name>.ackpt.<pid>.<n>". */
static int is_metadata_temp(const char *path)
{
	const char *base = path ? strrchr(path, '/') : NULL;
	const char *tag;
	unsigned pid, n;
	char end;

	if (!base || base[1] != '.')
		return 0;
	tag = strstr(base, ".ackpt.");
	return tag && sscanf(tag, ".ackpt.%u.%u%c", &pid, &n, &end) == 2;
}

/* ---- metadata commits ---- */

static void commit_enqueue(struct hop *h)
{
	struct commit *c = calloc(1, sizeof(*c));
	const char *tmp = h->paths;

	if (!c || !tmp) {
		free(c);
		__atomic_fetch_add(&H.shm->commit_failures, 1, __ATOMIC_RELAXED);
		__atomic_store_n(&H.shm->commit_last_err, ENOMEM, __ATOMIC_RELAXED);
		__atomic_store_n(&H.shm->commits_done, h->op.u.commit.id, __ATOMIC_RELEASE);
		if (H.reg && H.reg_helper >= 0)
			__atomic_store_n(&H.reg->helpers[H.reg_helper].commits_done, h->op.u.commit.id,
					 __ATOMIC_RELEASE);
		return;
	}
	c->id = h->op.u.commit.id;
	c->tmp = strdup(tmp);
	c->final = strdup(tmp + strlen(tmp) + 1);
	c->own_temp = !!(h->op.u.commit.flags & ACKPT_COMMIT_OWN_TEMP);
	c->slot = h->op.file;
	if (c->slot < ACKPT_MAX_FILES) {
		c->file_err = H.files[c->slot].err;
		c->dev = H.files[c->slot].dev;
		c->ino = H.files[c->slot].ino;
	}
	if (H.cq_tail)
		H.cq_tail->next = c;
	else
		H.cq_head = c;
	H.cq_tail = c;
}

static void commit_decided(uint64_t id, int status, const char *why)
{
	struct commit *c;

	for (c = H.cq_head; c; c = c->next)
		if (c->id == id && c->state == 1) {
			c->state = 2;
			c->status = status;
			if (status)
				hlog(0, "rank %d: commit of %s aborted: %s%s%s", bar_rank(), c->final,
				     strerror(status), why ? ": " : "", why ? why : "");
			return;
		}
}

/*
 * Backup links ".<name>.ackpt.prev.<helper pid>" of helpers that died (or a
 * machine that lost power) between making the link and removing it: once a
 * new commit of <name> is durable nobody needs them, and nobody else would
 * remove them. Only links made before this helper started, by a pid that no
 * longer exists, are removed: on a filesystem shared between nodes a pid
 * says nothing about another node's helper, whose link would be fresh.
 */
static void remove_stale_backups(const char *final)
{
	char dirpath[PATH_MAX], prefix[NAME_MAX + 16];
	const char *base = strrchr(final, '/');
	struct dirent *de;
	DIR *d;
	size_t plen;

	if (!base || (size_t)(base - final) >= sizeof(dirpath))
		return;
	snprintf(dirpath, sizeof(dirpath), "%.*s", (int)(base - final) ? (int)(base - final) : 1, final);
	if (snprintf(prefix, sizeof(prefix), ".%s.ackpt.prev.", base + 1) >= (int)sizeof(prefix))
		return;
	plen = strlen(prefix);
	d = opendir(dirpath);
	if (!d)
		return;
	while ((de = readdir(d))) {
		struct stat st;
		char *end;
		long pid;

		if (strncmp(de->d_name, prefix, plen))
			continue;
		pid = strtol(de->d_name + plen, &end, 10);
		if (*end || pid <= 0 || pid == H.pid || !(kill((pid_t)pid, 0) < 0 && errno == ESRCH))
			continue;
		if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
		    st.st_ctim.tv_sec > H.started.tv_sec ||
		    (st.st_ctim.tv_sec == H.started.tv_sec && st.st_ctim.tv_nsec >= H.started.tv_nsec))
			continue;
		if (unlinkat(dirfd(d), de->d_name, 0) == 0)
			hlog(2, "removed %s/%s, left by a helper that died during a commit", dirpath,
			     de->d_name);
	}
	closedir(d);
}

static int storage_errno(int e)
{
	return e == EIO || e == ENOSPC || e == EDQUOT || e == EROFS;
}

/*
 * The previous metadata, kept as backup while the new name is not yet
 * durable: a hard link, or where the filesystem has none (FUSE, some network
 * filesystems) a copy, fsynced. Returns 0 with a backup, 1 without one for a
 * harmless reason (the previous file unreadable or gone), or a storage
 * error, which aborts the commit like any other error on the way to it.
 */
static int make_backup(const char *final, const char *backup, const struct stat *st)
{
	char buf[65536];
	int in, out, ret = 0;
	ssize_t n;

	unlink(backup);
	if (link(final, backup) == 0)
		return 0;
	in = open(final, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (in < 0)
		return storage_errno(errno) ? -errno : 1;
	out = open(backup, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, st->st_mode & 07777);
	if (out < 0) {
		ret = storage_errno(errno) ? -errno : 1;
		close(in);
		return ret;
	}
	while (!ret && (n = read(in, buf, sizeof(buf))) != 0) {
		if (n < 0) {
			ret = -errno;
			break;
		}
		errno = 0;
		if (write(out, buf, (size_t)n) != n)
			ret = errno ? -errno : -ENOSPC;
	}
	if (!ret)
		ret = fsync_checked(out);
	close(in);
	close(out);
	if (ret)
		unlink(backup);
	return ret;
}

static int commit_apply(struct commit *c)
{
	char backup[4096];
	const char *base;
	struct stat st;
	int fd, ret = 0, have_backup = 0, had_prev = 0;

	if (c->file_err)
		return -c->file_err; /* the metadata's own bytes did not all land */
	/* the data of the metadata file itself, then the name, then the name's
	 * directory: a loader that sees the name sees complete contents */
	fd = open(c->tmp, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return -errno;
	ret = fsync_checked(fd);
	close(fd);
	if (ret)
		return ret;
	/* keep the previous metadata reachable until the new name is durable */
	base = strrchr(c->final, '/');
	base = base ? base + 1 : c->final;
	had_prev = lstat(c->final, &st) == 0;
	if (had_prev && S_ISREG(st.st_mode) &&
	    snprintf(backup, sizeof(backup), "%.*s.%s.ackpt.prev.%d", (int)(base - c->final),
		     c->final, base, (int)H.pid) < (int)sizeof(backup)) {
		ret = make_backup(c->final, backup, &st);
		if (ret < 0)
			return ret;
		have_backup = ret == 0;
		ret = 0;
	}
	ret = fault_check(FAULT_RENAME, 0);
	if (!ret && rename(c->tmp, c->final) < 0)
		ret = -errno;
	if (!ret) {
		ret = fsync_dir_of(c->final);
		if (ret) {
			/* not known durable: put the previous state back; with
			 * no copy of it, keep the new one (its data is durable)
			 * rather than leave no metadata at all */
			if (have_backup)
				rename(backup, c->final);
			else if (!had_prev)
				unlink(c->final);
			have_backup = 0;
			fsync_dir_of(c->final);
		}
	}
	if (have_backup)
		unlink(backup);
	if (!ret)
		remove_stale_backups(c->final);
	return ret;
}

/* Run the oldest commit as far as it can go; commits finish in order. */
static void commit_pump(void)
{
	while (H.cq_head) {
		struct commit *c = H.cq_head;

		if (c->state == 0) {
			c->state = 1;
			bar_request(c->id); /* may decide at once (single process) */
		}
		if (c->state != 2)
			return;
		if (!c->status && c->slot < ACKPT_MAX_FILES) {
			struct hfile *f = &H.files[c->slot];

			/* the metadata file's own writes and fsync (its CLOSE
			 * follows the COMMIT) finish first, so their errors count */
			if (f->head && f->dev == c->dev && f->ino == c->ino)
				return;
		}
		if (!c->status) {
			int ret = commit_apply(c);

			if (ret) {
				c->status = -ret;
				hlog(0, "commit of %s failed: %s", c->final, strerror(-ret));
			} else {
				hlog(3, "committed %s", c->final);
			}
		}
		if (c->status) {
			if (c->own_temp)
				unlink(c->tmp);
			__atomic_fetch_add(&H.shm->commit_failures, 1, __ATOMIC_RELAXED);
			__atomic_store_n(&H.shm->commit_last_err, c->status, __ATOMIC_RELAXED);
		}
		__atomic_store_n(&H.shm->commits_done, c->id, __ATOMIC_RELEASE);
		if (H.reg && H.reg_helper >= 0)
			__atomic_store_n(&H.reg->helpers[H.reg_helper].commits_done, c->id,
					 __ATOMIC_RELEASE);
		H.cq_head = c->next;
		if (!H.cq_head)
			H.cq_tail = NULL;
		free(c->tmp);
		free(c->final);
		free(c);
		publish();
	}
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
		    h->op.type == ACKPT_OP_COMMIT) {
			retire(); /* ops before it may have finished in this very pass */
			if (s != H.head_seq)
				break;
			if (h->op.type == ACKPT_OP_RENAME)
				run_rename(h);
			else if (h->op.type == ACKPT_OP_COMMIT)
				commit_enqueue(h);
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
				file_close(f);
				mark_done(h);
			}
			break;
		case ACKPT_OP_DIRTY:
			f->dirty = 1;
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
		} else if (res == 0 && h->done_bytes < h->op.u.write.len) {
			file_error(h->op.file, EIO, "write (no progress)");
		} else {
			h->done_bytes += res;
			__atomic_fetch_add(&H.shm->bytes_written, (uint64_t)res, __ATOMIC_RELAXED);
			__atomic_fetch_add(&H.shm->files[h->op.file].written, (uint64_t)res,
					   __ATOMIC_RELAXED);
			if (h->done_bytes < h->op.u.write.len) {
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
	if (h->op.type == ACKPT_OP_CLOSE)
		file_close(f);
	mark_done(h);
}

static void reap_cb(void *tag, long res, void *arg) { on_complete(tag, res, arg); }

/* ---- receiving ops ---- */

static int receive_one(void)
{
	char buf[ACKPT_OP_MAX_MSG];
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { buf, sizeof(buf) };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			    .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c;
	struct ackpt_op op;
	struct hop *h;
	int fd = -1;
	ssize_t n;

	n = recvmsg(H.sock, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 0 : -errno;
	if (n == 0)
		return -EPIPE;
	for (c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			memcpy(&fd, CMSG_DATA(c), sizeof(int));
	if ((size_t)n < sizeof(op)) {
		hlog(0, "short op record (%zd bytes); protocol mismatch", n);
		if (fd >= 0)
			close(fd);
		return 1;
	}
	memcpy(&op, buf, sizeof(op));
	if (op.seq != H.next_seq)
		hlog(0, "op sequence gap: got %llu, expected %llu", (unsigned long long)op.seq,
		     (unsigned long long)H.next_seq);
	H.next_seq = op.seq + 1;
	if (H.npend == 0)
		H.head_seq = op.seq;
	if (ackpt_op_arena_end(&op) > atomic_load(&H.max_end))
		atomic_store(&H.max_end, ackpt_op_arena_end(&op));
	h = ring_at(op.seq);
	memset(h, 0, sizeof(*h));
	h->op = op;
	h->state = HOP_QUEUED;
	if (ackpt_op_path_len(&op) && (size_t)n >= sizeof(op) + ackpt_op_path_len(&op)) {
		h->paths = malloc(ackpt_op_path_len(&op) + 1);
		if (h->paths) {
			memcpy(h->paths, buf + sizeof(op), ackpt_op_path_len(&op));
			h->paths[ackpt_op_path_len(&op)] = 0;
		}
	}
	H.npend++;

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
	    op.type != ACKPT_OP_COMMIT) {
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
 * Fault the arena in ahead of use, off the critical path: the target stays
 * at twice the furthest position staged so far (plus 64 MiB), so a short
 * run touches little and a second checkpoint of the same size finds its
 * pages ready.  mlock both populates and pins; without memlock, populate.
 */
static void *prefault_main(void *arg)
{
	const uint64_t step = 64ull << 20;
	int lock_ok = 1;
	uint64_t off = 0;

	while (off < H.arena_size) {
		uint64_t end = atomic_load(&H.max_end);
		uint64_t target = end >= H.arena_size / 2 ? H.arena_size : 2 * end + step;
		uint64_t len = H.arena_size - off < step ? H.arena_size - off : step;

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

static void registry_map(void)
{
	struct stat st;
	uint64_t zero = 0;
	char p[64];
	int fd;

	snprintf(p, sizeof(p), ACKPT_REGISTRY_PATH, (unsigned)getuid());
	fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0)
		return;
	if (fstat(fd, &st) == 0 && st.st_size < (off_t)sizeof(struct ackpt_registry) &&
	    ftruncate(fd, sizeof(struct ackpt_registry)) < 0) {
		close(fd);
		return;
	}
	H.reg = mmap(NULL, sizeof(struct ackpt_registry), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (H.reg != MAP_FAILED)
		__atomic_compare_exchange_n(&H.reg->magic, &zero, ACKPT_REGISTRY_MAGIC, 0,
					    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
	if (H.reg == MAP_FAILED || H.reg->magic != ACKPT_REGISTRY_MAGIC) {
		H.reg = NULL;
		return;
	}
	for (unsigned i = 0; i < ACKPT_REGISTRY_HELPERS; i++) {
		struct ackpt_registry_helper *h = &H.reg->helpers[i];
		int32_t old = __atomic_load_n(&h->pid, __ATOMIC_RELAXED);

		if (old && !(kill(old, 0) < 0 && errno == ESRCH))
			continue;
		if (__atomic_compare_exchange_n(&h->pid, &old, H.pid, 0, __ATOMIC_ACQ_REL,
						__ATOMIC_RELAXED)) {
			h->durable_seq = 0;
			h->commits_done = 0;
			H.reg_helper = (int)i;
			break;
		}
	}
}

static int parse_level(const char *s)
{
	if (!s || !*s)
		return 1;
	if (!strcmp(s, "error"))
		return 0;
	if (!strcmp(s, "info"))
		return 2;
	if (!strcmp(s, "debug"))
		return 3;
	return 1;
}

int main(int argc, char **argv)
{
	struct stat st;
	pthread_t t;
	const char *io = getenv("ACKPT_IO");
	const char *direct = getenv("ACKPT_DIRECT");
	int eof = 0, ret, reg_tried = 0, npfd = 0, nbar, timeout;
	struct pollfd *pfd = NULL;
	pid_t child;
	unsigned i;

	H.log_level = parse_level(getenv("ACKPT_LOG"));
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
	H.arena = (char *)H.shm + H.shm->hdr_size;
	H.arena_size = H.shm->arena_size;
	H.use_direct = !(direct && !strcmp(direct, "0"));
	fault_init(getenv("ACKPT_FAULT"));
	if (getenv("ACKPT_TEST_DELAY_MS"))
		H.delay_ms = strtol(getenv("ACKPT_TEST_DELAY_MS"), NULL, 10);
	/* testing knob: skip every directory fsync, so the power-loss test can
	 * show that it catches a commit that is not durable */
	H.skip_dirfsync = getenv("ACKPT_TEST_SKIP_DIRFSYNC") && !strcmp(getenv("ACKPT_TEST_SKIP_DIRFSYNC"), "1");
	if (getenv("ACKPT_TEST_DELAY_RANK") && *getenv("ACKPT_TEST_DELAY_RANK")) {
		/* slow only one rank's helper */
		const char *r = getenv("RANK") ? getenv("RANK") : getenv("SLURM_PROCID");

		if (!r || atoi(r) != atoi(getenv("ACKPT_TEST_DELAY_RANK")))
			H.delay_ms = 0;
	}
	for (i = 0; i < ACKPT_MAX_FILES; i++) {
		H.files[i].fd = H.files[i].dfd = -1;
		H.files[i].reg_idx = -1;
	}
	H.reg_helper = -1;
	registry_map();
	H.shm->reg_helper = H.reg_helper;

	if (!(io && !strcmp(io, "pool")))
		H.eng = engine_open_uring(256, &ret);
	if (!H.eng) {
		if (!(io && !strcmp(io, "pool")))
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
	H.next_seq = 1;
	H.head_seq = 1;
	{
		struct bar_hooks hooks = { hook_staged, hook_durable, hook_commits, hook_error,
					   commit_decided, hook_log };

		/* registers with the coordinator before the shim's open returns */
		if (bar_init(&hooks) < 0)
			return 1;
		H.shm->coord_part = bar_part_id();
	}
	__atomic_store_n(&H.shm->helper_pid, H.pid, __ATOMIC_RELEASE);
	publish();

	for (;;) {
		int nfds = 0, tick;

		while (!eof && H.npend < MAXPEND - 1) {
			ret = receive_one();
			if (ret == 0)
				break;
			if (ret < 0) {
				eof = 1;
				break;
			}
		}
		dispatch();
		commit_pump();
		tick = bar_tick();
		commit_pump();
		if (eof && !H.npend && !engine_inflight(H.eng) && !H.cq_head)
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
		if (!eof && H.npend < MAXPEND - 1) {
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
		if (poll(pfd, nfds + nbar, timeout) < 0 && errno != EINTR)
			break;
		engine_reap(H.eng, reap_cb, NULL);
		retire();
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
		file_close(f);
	}
	publish();
	if (H.reg && H.reg_helper >= 0)
		__atomic_store_n(&H.reg->helpers[H.reg_helper].pid, 0, __ATOMIC_RELEASE);
	bar_shutdown();
	hlog(3, "done: %llu bytes written, %llu errors",
	     (unsigned long long)H.shm->bytes_written, (unsigned long long)H.shm->errors);
	return H.shm->errors ? 1 : 0;
}
