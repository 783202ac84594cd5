/*
 * Calls that make a name, look one up or list a directory inside glibc or
 * the kernel, where a rename ackpt deferred (docs/DESIGN.md 3.5) would show:
 * the old name still there, the new one missing.  A mkdir of a checkpoint's
 * final name succeeded before its file was renamed there, and the helper's
 * rename then failed; scandir and glob listed the temporary name.  Each
 * waits for the deferred renames and commits of the names it touches, as
 * open, stat and access do.  With nothing deferred this is one relaxed load.
 */
#include <limits.h>
#include <string.h>
#include <sys/inotify.h>

#include "shim.h"

#define NAME_CALL(dirfd, path, call) \
	do { ENSURE_REAL(); wait_name_renames(dirfd, path); return call; } while (0)

ACKPT_EXPORT int mkdir(const char *path, mode_t mode)
{
	NAME_CALL(AT_FDCWD, path, real.mkdir(path, mode));
}

ACKPT_EXPORT int mkdirat(int dirfd, const char *path, mode_t mode)
{
	NAME_CALL(dirfd, path, real.mkdirat(dirfd, path, mode));
}

ACKPT_EXPORT int mknod(const char *path, mode_t mode, dev_t dev)
{
	NAME_CALL(AT_FDCWD, path, real.mknod(path, mode, dev));
}

ACKPT_EXPORT int mknodat(int dirfd, const char *path, mode_t mode, dev_t dev)
{
	NAME_CALL(dirfd, path, real.mknodat(dirfd, path, mode, dev));
}

ACKPT_EXPORT int mkfifo(const char *path, mode_t mode)
{
	NAME_CALL(AT_FDCWD, path, real.mkfifo(path, mode));
}

ACKPT_EXPORT int mkfifoat(int dirfd, const char *path, mode_t mode)
{
	NAME_CALL(dirfd, path, real.mkfifoat(dirfd, path, mode));
}

/* the link's own name; its target is only text */
ACKPT_EXPORT int symlink(const char *target, const char *path)
{
	NAME_CALL(AT_FDCWD, path, real.symlink(target, path));
}

ACKPT_EXPORT int symlinkat(const char *target, int dirfd, const char *path)
{
	NAME_CALL(dirfd, path, real.symlinkat(target, dirfd, path));
}

ACKPT_EXPORT ssize_t readlink(const char *path, char *buf, size_t len)
{
	NAME_CALL(AT_FDCWD, path, real.readlink(path, buf, len));
}

ACKPT_EXPORT ssize_t readlinkat(int dirfd, const char *path, char *buf, size_t len)
{
	NAME_CALL(dirfd, path, real.readlinkat(dirfd, path, buf, len));
}

ACKPT_EXPORT char *realpath(const char *path, char *resolved)
{
	NAME_CALL(AT_FDCWD, path, real.realpath(path, resolved));
}

ACKPT_EXPORT char *canonicalize_file_name(const char *path)
{
	NAME_CALL(AT_FDCWD, path, real.canonicalize_file_name(path));
}

ACKPT_EXPORT int chdir(const char *path)
{
	NAME_CALL(AT_FDCWD, path, real.chdir(path));
}

ACKPT_EXPORT int statfs(const char *path, struct statfs *buf)
{
	NAME_CALL(AT_FDCWD, path, real.statfs(path, buf));
}

ACKPT_EXPORT int statfs64(const char *path, struct statfs64 *buf)
{
	return statfs(path, (struct statfs *)buf);
}

ACKPT_EXPORT int statvfs(const char *path, struct statvfs *buf)
{
	NAME_CALL(AT_FDCWD, path, real.statvfs(path, buf));
}

ACKPT_EXPORT int statvfs64(const char *path, struct statvfs64 *buf)
{
	return statvfs(path, (struct statvfs *)buf);
}

ACKPT_EXPORT int inotify_add_watch(int fd, const char *path, uint32_t mask)
{
	NAME_CALL(AT_FDCWD, path, real.inotify_add_watch(fd, path, mask));
}

ACKPT_EXPORT int scandir(const char *dir, struct dirent ***list,
			 int (*filter)(const struct dirent *),
			 int (*cmp)(const struct dirent **, const struct dirent **))
{
	ENSURE_REAL();
	wait_dir_renames(dir, -1);
	return real.scandir(dir, list, filter, cmp);
}

ACKPT_EXPORT int scandir64(const char *dir, struct dirent64 ***list,
			   int (*filter)(const struct dirent64 *),
			   int (*cmp)(const struct dirent64 **, const struct dirent64 **))
{
	ENSURE_REAL();
	wait_dir_renames(dir, -1);
	return real.scandir64(dir, list, filter, cmp);
}

ACKPT_EXPORT int scandirat(int dirfd, const char *dir, struct dirent ***list,
			   int (*filter)(const struct dirent *),
			   int (*cmp)(const struct dirent **, const struct dirent **))
{
	char canon[PATH_MAX];

	ENSURE_REAL();
	if (C.enabled && ns_pending_any() && canon_path(dirfd, dir, canon, sizeof(canon)) == 0)
		wait_dir_renames(canon, -1);
	return real.scandirat(dirfd, dir, list, filter, cmp);
}

/* The directory a pattern lists first: the part before its first wildcard,
 * up to the last slash (a later wildcard directory waits with it, as all
 * of this process's renames are waited for). */
static void glob_wait(const char *pattern)
{
	char dir[PATH_MAX];
	size_t n;
	char *slash;

	if (!C.enabled || !pattern || !ns_pending_any())
		return;
	n = strcspn(pattern, "*?[");
	if (n >= sizeof(dir))
		n = sizeof(dir) - 1;
	memcpy(dir, pattern, n);
	dir[n] = 0;
	slash = strrchr(dir, '/');
	if (!slash)
		strcpy(dir, ".");
	else if (slash == dir)
		dir[1] = 0;
	else
		*slash = 0;
	wait_dir_renames(dir, -1);
}

ACKPT_EXPORT int glob(const char *pattern, int flags, int (*errfunc)(const char *, int),
		      glob_t *g)
{
	ENSURE_REAL();
	glob_wait(pattern);
	return real.glob(pattern, flags, errfunc, g);
}

ACKPT_EXPORT int glob64(const char *pattern, int flags, int (*errfunc)(const char *, int),
			glob64_t *g)
{
	ENSURE_REAL();
	glob_wait(pattern);
	return real.glob64(pattern, flags, errfunc, g);
}
