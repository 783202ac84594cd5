/*
 * Namespace operations.  A rename of a file whose data is not yet durable
 * is deferred: the helper performs it after the data and an fsync, then
 * fsyncs the directory, so a crash never leaves the final name holding a
 * partial file.  Until then, any access to either name waits for it (the
 * pending list below).  Unlink passes through: data still in flight to an
 * unlinked inode is harmless.  link waits for the data first.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shim.h"

struct ns_entry {
	char *oldp, *newp;
	uint64_t seq;
	uint64_t commit_id;      /* a metadata commit: wait for the commit itself */
	int reg_idx;             /* its entry in the node registry, or -1 */
	struct ns_entry *next;
};

static struct ns_entry *ns_list;
static atomic_int ns_count;

/* A deferred rename or commit anywhere on the node (cheap when none). */
int ns_pending_any(void)
{
	return atomic_load_explicit(&ns_count, memory_order_relaxed) > 0 || registry_names_any() ||
	       job_multi_node();
}

void ns_prune(uint64_t durable)
{
	struct ns_entry **pp = &ns_list;
	uint64_t commits = session_commits_done();

	while (*pp) {
		struct ns_entry *e = *pp;

		if (e->commit_id ? e->commit_id <= commits : e->seq <= durable) {
			*pp = e->next;
			registry_name_del(e->reg_idx);
			free(e->oldp);
			free(e->newp);
			free(e);
			atomic_fetch_sub(&ns_count, 1);
		} else {
			pp = &e->next;
		}
	}
}

/* A forked child: the parent's pending names stay the parent's.  Another
 * thread may have been mid-update at the fork: forget the list, never free. */
void ns_reset(void)
{
	registry_fork_child();
	ns_list = NULL;
	atomic_store(&ns_count, 0);
}

/* Called with the lock held. */
void ns_add(const char *oldp, const char *newp, uint64_t seq, uint64_t commit_id)
{
	struct ns_entry *e = calloc(1, sizeof(*e));

	if (!e)
		return;
	e->oldp = strdup(oldp);
	e->newp = strdup(newp);
	e->seq = seq;
	e->commit_id = commit_id;
	e->reg_idx = -1;
	if (!e->oldp || !e->newp) {
		free(e->oldp);
		free(e->newp);
		free(e);
		return;
	}
	e->reg_idx = registry_name_add(oldp, newp, seq, commit_id);
	{
		const char *paths[] = { oldp, newp, NULL };

		job_announce(paths, 1, seq, commit_id);
	}
	e->next = ns_list;
	ns_list = e;
	atomic_fetch_add(&ns_count, 1);
}

/* Deleting an old checkpoint after committing a new one waits for the commit. */
void ns_wait_commits(void)
{
	uint64_t want;
	int saved = errno;

	if (!C.enabled || S.state != SESS_ACTIVE || session_lock() < 0)
		return;
	want = S.commits_requested;
	session_unlock();
	if (session_commits_done() < want)
		session_wait_commit(want, 0);
	errno = saved;
}

/* Wait for the deferred renames and commits involving canon (NULL: all). */
static void ns_wait_matching(const char *canon)
{
	uint64_t want = 0, want_commit = 0;
	struct ns_entry *e;

	if (session_lock() < 0)
		return;
	for (e = ns_list; e; e = e->next)
		if (!canon || !strcmp(e->oldp, canon) || !strcmp(e->newp, canon)) {
			if (e->seq > want)
				want = e->seq;
			if (e->commit_id > want_commit)
				want_commit = e->commit_id;
		}
	session_unlock();
	if (want)
		session_wait(want, 0, 0);
	if (want_commit)
		session_wait_commit(want_commit, 0);
}

int ns_wait_path(const char *canon)
{
	job_names_wait(canon, 0);
	if (!atomic_load_explicit(&ns_count, memory_order_relaxed) && !registry_names_any())
		return 0;
	registry_names_wait(canon, 0);
	ns_wait_matching(canon);
	if (session_lock() == 0) {
		session_reap();
		session_unlock();
	}
	return 0;
}

static int rename_checks(const char *co, const char *cn, const struct stat *so)
{
	char parent[PATH_MAX];
	struct stat sp, sn;

	/* the checks a synchronous rename would fail on, done now */
	if (path_dir(parent, sizeof(parent), cn))
		return -ENAMETOOLONG;
	if (real.stat(parent, &sp) < 0)
		return -errno;
	if (!S_ISDIR(sp.st_mode))
		return -ENOTDIR;
	if (sp.st_dev != so->st_dev)
		return -EXDEV;
	if (access(parent, W_OK) < 0)
		return -errno;
	if (real.lstat(cn, &sn) == 0 && S_ISDIR(sn.st_mode))
		return -EISDIR;
	return 0;
}

/* rename onto a metadata name: the commit, done by the helper after the barrier */
static struct outcome defer_commit(const char *co, const char *cn, const struct stat *so)
{
	struct inode_state *ino;
	uint64_t id;
	int ret;

	ret = rename_checks(co, cn, so);
	if (ret < 0)
		return done(ret);
	if (session_lock() < 0)
		return NOT_OURS;
	if (session_ensure() < 0 || S.state != SESS_ACTIVE) {
		session_unlock();
		return NOT_OURS;
	}
	ino = inode_find(so->st_dev, so->st_ino);
	if (ino && ino->closing)
		ino = NULL; /* closed and fsynced: the commit needs nothing of it */
	ret = session_send_commit(ino, co, cn, 0, &id);
	if (ret < 0) {
		/* the helper died: commit here if a local drain suffices */
		if (S.state == SESS_DEAD) {
			uint64_t before = S.dead_commit_failures;

			session_commit_now(co, cn, 0);
			session_unlock();
			return done(S.dead_commit_failures == before ? 0 : -EIO);
		}
		session_unlock();
		return NOT_OURS;
	}
	ns_add(co, cn, S.seq, id);
	if (ino) {
		free(ino->path);
		ino->path = strdup(cn);
	}
	session_unlock();
	if (C.commit_sync)
		session_wait_commit(id, 0);
	return done(0);
}

/* 1 if deferred (done), 0 if the caller should pass through, -errno on error. */
/* Done (deferred, or -errno) or not ours (the caller renames now). */
static struct outcome try_defer_rename(int olddir, const char *oldp, int newdir, const char *newp)
{
	char co[PATH_MAX], cn[PATH_MAX];
	struct stat so;
	struct inode_state *ino, *rename_ino;
	int ret;

	if (canon_path(olddir, oldp, co, sizeof(co)) < 0 ||
	    canon_path(newdir, newp, cn, sizeof(cn)) < 0)
		return NOT_OURS;
	ns_wait_path(co);
	ns_wait_path(cn);
	if (real.lstat(co, &so) < 0)
		return NOT_OURS;
	if (S_ISREG(so.st_mode) && name_is_metadata(cn) && path_is_managed(cn))
		return defer_commit(co, cn, &so);
	if (!S.ninodes)
		return NOT_OURS;
	if (S_ISDIR(so.st_mode)) {
		/* files inside may have pending renames by absolute path */
		session_sync_all(0, 0);
		return NOT_OURS;
	}
	if (!S_ISREG(so.st_mode) || session_lock() < 0)
		return NOT_OURS;
	ino = inode_find(so.st_dev, so.st_ino);
	if (!ino || !inode_pending(ino) || S.state != SESS_ACTIVE) {
		session_unlock();
		return NOT_OURS;
	}
	rename_ino = ino->closing ? NULL : ino; /* a closed file was fsynced at its CLOSE */
	ret = rename_checks(co, cn, &so);
	if (ret < 0) {
		session_unlock();
		return done(ret);
	}
	ret = session_send_rename(rename_ino, co, cn);
	if (ret < 0) {
		session_unlock();
		return NOT_OURS; /* helper gone: it was replayed or we pass through */
	}
	ns_add(co, cn, S.seq, 0);
	if (rename_ino) {
		free(rename_ino->path);
		rename_ino->path = strdup(cn);
	}
	session_unlock();
	return done(0);
}

static int rename_common(int olddir, const char *oldp, int newdir, const char *newp,
			 unsigned flags)
{
	int saved = errno;

	if (C.enabled && S.state == SESS_ACTIVE && oldp && newp) {
		if (flags == 0) {
			struct outcome r = try_defer_rename(olddir, oldp, newdir, newp);

			if (r.ours && r.ret == 0 && C.commit_sync)
				session_sync_all(0, 0); /* --commit sync: wait until it is durable */
			if (r.ours)
				return (int)finish(r.ret, saved);
		} else {
			wait_path_pending(olddir, oldp, AT_SYMLINK_NOFOLLOW);
			wait_path_pending(newdir, newp, AT_SYMLINK_NOFOLLOW);
		}
	}
	errno = saved;
	if (flags)
		return real.renameat2(olddir, oldp, newdir, newp, flags);
	return real.renameat(olddir, oldp, newdir, newp);
}

ACKPT_EXPORT int rename(const char *oldp, const char *newp)
{
	ENSURE_REAL();
	if (!C.enabled || S.state != SESS_ACTIVE)
		return real.rename(oldp, newp);
	return rename_common(AT_FDCWD, oldp, AT_FDCWD, newp, 0);
}

ACKPT_EXPORT int renameat(int od, const char *oldp, int nd, const char *newp)
{
	ENSURE_REAL();
	if (!C.enabled || S.state != SESS_ACTIVE)
		return real.renameat(od, oldp, nd, newp);
	return rename_common(od, oldp, nd, newp, 0);
}

ACKPT_EXPORT int renameat2(int od, const char *oldp, int nd, const char *newp, unsigned flags)
{
	ENSURE_REAL();
	if (!C.enabled || S.state != SESS_ACTIVE)
		return real.renameat2(od, oldp, nd, newp, flags);
	return rename_common(od, oldp, nd, newp, flags);
}

static void wait_both(int od, const char *oldp, int nd, const char *newp, int follow)
{
	int saved = errno;

	if (C.enabled && (S.state == SESS_ACTIVE || registry_any())) {
		if (oldp)
			wait_path_pending(od, oldp, follow ? 0 : AT_SYMLINK_NOFOLLOW);
		if (newp)
			wait_path_pending(nd, newp, AT_SYMLINK_NOFOLLOW);
	}
	errno = saved;
}

ACKPT_EXPORT int link(const char *oldp, const char *newp)
{
	ENSURE_REAL();
	wait_both(AT_FDCWD, oldp, AT_FDCWD, newp, 0);
	return real.link(oldp, newp);
}

ACKPT_EXPORT int linkat(int od, const char *oldp, int nd, const char *newp, int flags)
{
	ENSURE_REAL();
	if ((flags & AT_EMPTY_PATH) && (!oldp || !*oldp)) {
		/* naming an O_TMPFILE: its data must be complete first */
		if (fd_peek(od)) {
			int saved = errno;

			managed_drain_fd(od);
			errno = saved;
		}
		wait_both(nd, newp, nd, NULL, 0);
	} else {
		wait_both(od, oldp, nd, newp, flags & AT_SYMLINK_FOLLOW);
	}
	return real.linkat(od, oldp, nd, newp, flags);
}

/* Before a deletion: commits finish first, and a deferred rename of this
 * name is done first. */
static void before_delete(int dirfd, const char *path)
{
	int saved = errno;
	char canon[PATH_MAX];

	ns_wait_commits();
	if (C.enabled && ns_pending_any() && canon_path(dirfd, path, canon, sizeof(canon)) == 0)
		ns_wait_path(canon);
	errno = saved;
}

ACKPT_EXPORT int unlink(const char *path)
{
	ENSURE_REAL();
	before_delete(AT_FDCWD, path);
	return real.unlink(path);
}

ACKPT_EXPORT int unlinkat(int dirfd, const char *path, int flags)
{
	ENSURE_REAL();
	before_delete(dirfd, path);
	return real.unlinkat(dirfd, path, flags);
}

ACKPT_EXPORT int remove(const char *path)
{
	ENSURE_REAL();
	before_delete(AT_FDCWD, path);
	return real.remove(path);
}

/*
 * A listing must not show a name that a deferred rename or commit is about
 * to change, and whether a directory is empty depends on them too: wait
 * for all of ours, and for other processes' into or out of dir (a path,
 * or dirfd >= 0).
 */
void wait_dir_renames(const char *path, int dirfd)
{
	char canon[PATH_MAX];
	int saved = errno;

	if (!C.enabled || !ns_pending_any())
		return;
	ns_wait_matching(NULL);
	if (registry_names_any() || job_multi_node()) {
		int ok = dirfd >= 0 ? fd_path(dirfd, canon, sizeof(canon)) == 0 :
				      path && real.realpath(path, canon);

		if (ok) {
			job_names_wait(canon, 1);
			registry_names_wait(canon, 1);
		}
	}
	errno = saved;
}

/*
 * Listings of this process's own descriptor directory (/proc/self/fd,
 * /dev/fd) leave out our descriptors, so a program that counts what it
 * has open sees what it opened.  The streams are kept in a small table;
 * readdir of any other stream costs one relaxed load.
 */
#define FD_DIRS 16
static _Atomic(DIR *) fd_dirs[FD_DIRS];
static atomic_int nfd_dirs;

static int is_own_fd_dir(const char *resolved)
{
	char own[64];

	snprintf(own, sizeof(own), "/proc/%d/fd", (int)getpid());
	return !strcmp(resolved, own);
}

static DIR *note_fd_dir(DIR *d, const char *path, int fd)
{
	char canon[PATH_MAX];
	unsigned i;

	if (!d || S.state == SESS_NONE || !C.enabled)
		return d;
	if (fd >= 0) {
		if (fd_path(fd, canon, sizeof(canon)) < 0)
			return d;
	} else if (!path || !real.realpath(path, canon)) {
		return d;
	}
	if (!is_own_fd_dir(canon))
		return d;
	for (i = 0; i < FD_DIRS; i++) {
		DIR *none = NULL;

		if (atomic_compare_exchange_strong(&fd_dirs[i], &none, d)) {
			atomic_fetch_add(&nfd_dirs, 1);
			break;
		}
	}
	return d;
}

static int hides_ours(DIR *d)
{
	unsigned i;

	if (LIKELY(!atomic_load_explicit(&nfd_dirs, memory_order_relaxed)))
		return 0;
	for (i = 0; i < FD_DIRS; i++)
		if (atomic_load(&fd_dirs[i]) == d)
			return 1;
	return 0;
}

static int protected_name(const char *name)
{
	char *end;
	long fd = strtol(name, &end, 10);

	return *name && !*end && fd >= 0 && fd < FD_MAX &&
	       atomic_load_explicit(&fd_protected[fd], memory_order_relaxed);
}

ACKPT_EXPORT struct dirent *readdir(DIR *d)
{
	struct dirent *e;

	ENSURE_REAL();
	if (LIKELY(!hides_ours(d)))
		return real.readdir(d);
	do
		e = real.readdir(d);
	while (e && protected_name(e->d_name));
	return e;
}

ACKPT_EXPORT struct dirent64 *readdir64(DIR *d)
{
	struct dirent64 *e;

	ENSURE_REAL();
	if (LIKELY(!hides_ours(d)))
		return real.readdir64(d);
	do
		e = real.readdir64(d);
	while (e && protected_name(e->d_name));
	return e;
}

ACKPT_EXPORT int closedir(DIR *d)
{
	unsigned i;

	ENSURE_REAL();
	if (UNLIKELY(hides_ours(d)))
		for (i = 0; i < FD_DIRS; i++) {
			DIR *mine = d;

			if (atomic_compare_exchange_strong(&fd_dirs[i], &mine, NULL)) {
				atomic_fetch_sub(&nfd_dirs, 1);
				break;
			}
		}
	return real.closedir(d);
}

ACKPT_EXPORT DIR *opendir(const char *path)
{
	ENSURE_REAL();
	wait_dir_renames(path, -1);
	return note_fd_dir(real.opendir(path), path, -1);
}

ACKPT_EXPORT DIR *fdopendir(int fd)
{
	ENSURE_REAL();
	wait_dir_renames(NULL, fd);
	return note_fd_dir(real.fdopendir(fd), NULL, fd);
}

ACKPT_EXPORT int rmdir(const char *path)
{
	ENSURE_REAL();
	wait_dir_renames(path, -1);
	ns_wait_commits();
	return real.rmdir(path);
}
