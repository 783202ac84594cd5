/*
 * Commit markers opened for writing: written under a hidden temporary in
 * the same directory, with the old marker's mode, owner and extended
 * attributes, and renamed over the final name after the barrier
 * (docs/DESIGN.md 3.7 and 3.16).
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>

#include "shim.h"

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
	unsigned n;

	if (real.lstat(canon, &st) == 0 && S_ISLNK(st.st_mode)) {
		char target[PATH_MAX];

		/* as the kernel would: refuse with O_NOFOLLOW, else write
		 * (and commit) through the link to its target */
		if (flags & O_NOFOLLOW)
			return done(-ELOOP);
		if (!real.realpath(canon, target) || !path_is_managed(target))
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
	n = atomic_fetch_add(&counter, 1);
	if (snprintf(tmp, sizeof(tmp), "%.*s.%s.ackpt.%d.%u", (int)(base - canon), canon, base,
		     (int)getpid(), n) >= (int)sizeof(tmp))
		return NOT_OURS;
	/* the helper learns the name before the file exists (a kill in
	 * between must not leave it behind): the session starts here if this
	 * is the process's first managed file */
	if (session_lock() == 0) {
		if (session_ensure() == 0 && S.shm && strlen(tmp) < ACKPT_INTENT_PATH)
			memcpy(S.shm->marker_intent[n % ACKPT_MARKER_INTENTS], tmp, strlen(tmp) + 1);
		session_unlock();
	}
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
