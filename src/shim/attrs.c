/*
 * Calls that look a name up to read or change its attributes: access,
 * chmod, chown, utime(s), utimensat and the xattr family.  A deferred
 * rename in this process must look done to them, as it does to open and
 * stat, so each waits for the renames and commits involving its path
 * first.  With nothing pending this is one relaxed load.
 */
#include <limits.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <utime.h>

#include "shim.h"

static void before_name(int dirfd, const char *path)
{
	char canon[PATH_MAX];
	int saved = errno;

	if (LIKELY(!ns_pending_any()) || !C.enabled || !path)
		return;
	if (canon_path(dirfd, path, canon, sizeof(canon)) == 0)
		ns_wait_path(canon);
	errno = saved;
}

#define NAME_CALL(dirfd, path, call) do { ENSURE_REAL(); before_name(dirfd, path); return call; } while (0)

ACKPT_EXPORT int access(const char *path, int mode)
{
	NAME_CALL(AT_FDCWD, path, real.access(path, mode));
}

ACKPT_EXPORT int faccessat(int dirfd, const char *path, int mode, int flags)
{
	NAME_CALL(dirfd, path, real.faccessat(dirfd, path, mode, flags));
}

ACKPT_EXPORT int euidaccess(const char *path, int mode)
{
	NAME_CALL(AT_FDCWD, path, real.euidaccess(path, mode));
}

ACKPT_EXPORT int eaccess(const char *path, int mode)
{
	return euidaccess(path, mode);
}

ACKPT_EXPORT int chmod(const char *path, mode_t mode)
{
	NAME_CALL(AT_FDCWD, path, real.chmod(path, mode));
}

ACKPT_EXPORT int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
	NAME_CALL(dirfd, path, real.fchmodat(dirfd, path, mode, flags));
}

ACKPT_EXPORT int chown(const char *path, uid_t uid, gid_t gid)
{
	NAME_CALL(AT_FDCWD, path, real.chown(path, uid, gid));
}

ACKPT_EXPORT int lchown(const char *path, uid_t uid, gid_t gid)
{
	NAME_CALL(AT_FDCWD, path, real.lchown(path, uid, gid));
}

ACKPT_EXPORT int fchownat(int dirfd, const char *path, uid_t uid, gid_t gid, int flags)
{
	NAME_CALL(dirfd, path, real.fchownat(dirfd, path, uid, gid, flags));
}

ACKPT_EXPORT int utime(const char *path, const struct utimbuf *times)
{
	NAME_CALL(AT_FDCWD, path, real.utime(path, times));
}

ACKPT_EXPORT int utimes(const char *path, const struct timeval times[2])
{
	NAME_CALL(AT_FDCWD, path, real.utimes(path, times));
}

ACKPT_EXPORT int lutimes(const char *path, const struct timeval times[2])
{
	NAME_CALL(AT_FDCWD, path, real.lutimes(path, times));
}

ACKPT_EXPORT int utimensat(int dirfd, const char *path, const struct timespec times[2], int flags)
{
	NAME_CALL(dirfd, path, real.utimensat(dirfd, path, times, flags));
}

ACKPT_EXPORT ssize_t getxattr(const char *path, const char *name, void *value, size_t size)
{
	NAME_CALL(AT_FDCWD, path, real.getxattr(path, name, value, size));
}

ACKPT_EXPORT ssize_t lgetxattr(const char *path, const char *name, void *value, size_t size)
{
	NAME_CALL(AT_FDCWD, path, real.lgetxattr(path, name, value, size));
}

ACKPT_EXPORT int setxattr(const char *path, const char *name, const void *value, size_t size,
			  int flags)
{
	NAME_CALL(AT_FDCWD, path, real.setxattr(path, name, value, size, flags));
}

ACKPT_EXPORT int lsetxattr(const char *path, const char *name, const void *value, size_t size,
			   int flags)
{
	NAME_CALL(AT_FDCWD, path, real.lsetxattr(path, name, value, size, flags));
}

ACKPT_EXPORT ssize_t listxattr(const char *path, char *list, size_t size)
{
	NAME_CALL(AT_FDCWD, path, real.listxattr(path, list, size));
}

ACKPT_EXPORT ssize_t llistxattr(const char *path, char *list, size_t size)
{
	NAME_CALL(AT_FDCWD, path, real.llistxattr(path, list, size));
}

ACKPT_EXPORT int removexattr(const char *path, const char *name)
{
	NAME_CALL(AT_FDCWD, path, real.removexattr(path, name));
}

ACKPT_EXPORT int lremovexattr(const char *path, const char *name)
{
	NAME_CALL(AT_FDCWD, path, real.lremovexattr(path, name));
}
