/*
 * Metadata commits in the helper: queued in request order, each waits for
 * the barrier (barrier.c), then the hidden temporary is fsynced and renamed
 * over the final name (after a backup link of the old one), and the
 * directory fsynced; an abort removes the temporary.  commits_done reports
 * them to the shim and the node registry.
 */
#include <dirent.h>
#include <signal.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "barrier.h"
#include "fault.h"
#include "helper.h"
#include "path.h"
#include "upload.h"

/* The shim's hidden temporary for metadata: ".<name>.ackpt.<pid>.<n>". */
int is_metadata_temp(const char *path)
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

void commit_enqueue(struct hop *h)
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
	c->seq = h->op.seq;
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

void commit_decided(uint64_t id, int status, const char *why)
{
	struct commit *c;

	for (c = H.cq_head; c; c = c->next)
		if (c->id == id && c->state == 1) {
			c->state = 2;
			c->status = status;
			if (status == ECANCELED)
				hlog(0, "rank %d: %s not committed: a write of this checkpoint "
				     "returned an error to the program (above)", bar_rank(), c->final);
			else if (status)
				hlog(0, "rank %d: commit of %s aborted: %s%s%s", bar_rank(), c->final,
				     strerror(status), why ? ": " : "", why ? why : "");
			return;
		}
}

/* The barrier saw a data upload of this checkpoint fail for good. */
void commit_upload_failed(uint64_t id)
{
	struct commit *c;

	for (c = H.cq_head; c; c = c->next)
		if (c->id == id)
			c->upload_failed = 1;
}

/*
 * Uploading: the marker goes to the object store after every data upload
 * of this process up to the commit (other ranks': the barrier waited for
 * them) and before the local commit.  Returns 1 while that is going on.
 */
static int commit_upload(struct commit *c)
{
	uint32_t flags = 0;
	int r;

	if (!upload_on() && H.shm->upload_state != -1)
		return 0;
	if (c->state == 2) {
		if (!upload_done_upto(c->seq, &flags))
			return 1;
		if (flags & UPLOAD_F_FAILED)
			c->upload_failed = 1;
		if (c->upload_failed || !upload_on()) {
			hlog(0, "%s is committed here but not uploaded: an upload of this "
			     "checkpoint's data failed for good, so the object store keeps its "
			     "previous marker", c->final);
			return 0;
		}
		c->state = 3;
		upload_marker(c->id, c->tmp, c->final, !c->own_temp);
	}
	r = upload_marker_result(c->id);
	if (r == 1)
		return 1;
	return 0; /* uploaded, or failed and said so: the local commit goes on */
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
void commit_pump(void)
{
	while (H.cq_head) {
		struct commit *c = H.cq_head;

		if (c->state == 0) {
			c->state = 1;
			bar_request(c->id); /* may decide at once (single process) */
		}
		if (c->state < 2)
			return;
		if (!c->status && c->slot < ACKPT_MAX_FILES) {
			struct hfile *f = &H.files[c->slot];

			/* the metadata file's own writes and fsync (its CLOSE
			 * follows the COMMIT) finish first, so their errors count */
			if (f->head && f->dev == c->dev && f->ino == c->ino)
				return;
		}
		if (!c->status && commit_upload(c))
			return;
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
			if (c->status == ECANCELED) {
				/* a write of this checkpoint failed, and the program was told */
				__atomic_fetch_add(&H.shm->commits_withheld, 1, __ATOMIC_RELAXED);
			} else {
				__atomic_fetch_add(&H.shm->commit_failures, 1, __ATOMIC_RELAXED);
				__atomic_store_n(&H.shm->commit_last_err, c->status, __ATOMIC_RELAXED);
			}
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
