/*
 * Metadata commits as the program sees them: how many are done, whether
 * one failed (reported once, as EIO), waiting for one, and committing
 * without a helper (after it died).  The helper commits behind the
 * barrier; the ops that ask it to are sent by oplog.c.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shim.h"

/* fsync the directory dir: 0 or -errno (of its open, or of the fsync) */
int fsync_dir_path(const char *dir)
{
	int fd, ret = 0;

	fd = real.open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (real.fsync(fd) < 0)
		ret = -errno;
	real.close(fd);
	return ret;
}

/* fsync the directory holding path */
int commit_fsync_dir(const char *path)
{
	char dir[PATH_MAX];

	if (path_dir(dir, sizeof(dir), path))
		return 0;
	return fsync_dir_path(dir);
}

/*
 * Without a helper: a single process's barrier is its own drain, which the
 * synchronous rewrite has just done, so commit here; a multi-rank job has
 * no barrier any more and must not commit.
 */
void session_commit_now(const char *tmp, const char *final, int own_temp)
{
	int fd, ret = 0;

	if (C.multi_rank && real.access(tmp, F_OK) == 0) {
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
				ret = commit_fsync_dir(final);
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
			ret = commit_fsync_dir(final);
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

int session_wait_commit(uint64_t id, double timeout_s)
{
	uint64_t t0 = now_ns(), next = t0 + 1000000000ull;
	uint64_t deadline = timeout_s > 0 ? t0 + (uint64_t)(timeout_s * 1e9) : UINT64_MAX;

	while (session_commits_done() < id) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);
		uint64_t t, pending;

		if (session_commits_done() >= id)
			break;
		t = now_ns();
		if (t >= deadline)
			return -ETIMEDOUT;
		if (helper_gone())
			break;
		/* a marker waits for the job's uploads: say why this takes long */
		pending = C.upload_url ? __atomic_load_n(&S.shm->uploads_pending, __ATOMIC_RELAXED) : 0;
		if (pending && t >= next) {
			dprintf(2, "ackpt: a commit marker waits for %llu upload(s) to %s (%.1f MiB "
				"sent so far)\n", (unsigned long long)pending, C.upload_url,
				__atomic_load_n(&S.shm->uploaded_bytes, __ATOMIC_RELAXED) / 1048576.0);
			next = t + 5000000000ull;
		}
		futex_wait_gen(gen, 100000000ull);
	}
	return 0;
}
