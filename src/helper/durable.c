/*
 * The helper's files: slots, the first error of each (published to the
 * shim), release of their registry entries, and directory durability: a
 * new file's name is durable once its directory has been fsynced after
 * the file was created, and each directory is fsynced once per round.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fault.h"
#include "helper.h"
#include "path.h"
#include "registry.h"

/* The file's data is lost: later ops skip it, commits that cover it abort. */
static void file_mark_failed(struct hfile *f, uint32_t slot, int err)
{
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
}

void file_error(uint32_t slot, int err, const char *what)
{
	struct hfile *f;

	__atomic_fetch_add(&H.shm->errors, 1, __ATOMIC_RELAXED);
	H.last_err = err;
	if (slot == ACKPT_NO_FILE || slot >= ACKPT_MAX_FILES) {
		hlog(0, "%s failed: %s", what, strerror(err));
		return;
	}
	f = &H.files[slot];
	file_mark_failed(f, slot, err);
	__atomic_fetch_add(&H.shm->files[slot].err_seq, 1, __ATOMIC_RELEASE);
	hlog(0, "%s of %s failed: %s", what, f->path ? f->path : "(unknown file)", strerror(err));
	publish();
}

/*
 * The shim reported an aborted commit as EIO from a write to this file and
 * dropped that write's bytes: the program knows (no second report), but a
 * program that carries on regardless (DCP's writer threads end on an
 * exception, and the save goes on without their files' items) must not
 * get a checkpoint with this file committed.
 */
void file_failed_told(uint32_t slot)
{
	struct hfile *f = &H.files[slot];

	/* ECANCELED inside ackpt (the barrier carries it to the committing
	 * helper, which then does not report the abort once more: that would
	 * fail the next checkpoint's first write in turn); EIO for the program */
	/* a real error since the last barrier keeps its own errno */
	if (__atomic_fetch_add(&H.shm->errors, 1, __ATOMIC_RELAXED) == H.errors_acked)
		H.last_err = ECANCELED;
	file_mark_failed(f, slot, ECANCELED);
	__atomic_store_n(&H.shm->files[slot].err, EIO, __ATOMIC_RELEASE);
	hlog(0, "%s is incomplete: a write to it returned EIO to report an aborted commit, so "
	     "no commit that includes it will be made", f->path ? f->path : "(unknown file)");
	publish();
}

void registry_release(struct hfile *f)
{
	ackpt_registry_release(H.reg, f->reg_idx, H.pid, f->dev, f->ino);
	f->reg_idx = -1;
}

void file_close(struct hfile *f)
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
int fsync_checked(int fd)
{
	int ret = fault_check(FAULT_FSYNC, 0);

	if (!ret && fsync(fd) < 0)
		ret = -errno;
	return ret;
}

/* fsync the directory dir; *gone is set when the directory no longer
 * exists, which is not a write error */
int fsync_dir(const char *dir, int *gone)
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
int fsync_dir_of(const char *path)
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

int sync_dir_cached(const char *dir, uint64_t gen)
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

void file_name_durable(uint32_t slot)
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
