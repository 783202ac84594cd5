/*
 * Calls that look a name up to read or change its attributes: access,
 * chmod, chown, utime(s), utimensat and the xattr family, and their fd
 * forms.  A deferred rename must look done to them, as it does to open and
 * stat, so each waits for the renames and commits involving its path
 * first.  Those that change attributes also wait for the file's staged
 * data: times set after the data (cp -p, tar, zip extraction) must not be
 * moved by the helper's later writes, and a chmod or chown lands after the
 * writes before it, as in a plain run.  With nothing pending this is one
 * relaxed load.
 */
#include <limits.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/xattr.h>
#include <utime.h>

#include "shim.h"

/* Before a call that looks path up: the deferred renames involving it. */
void wait_name_renames(int dirfd, const char *path)
{
	char canon[PATH_MAX];
	int saved = errno;

	if (LIKELY(!ns_pending_any()) || !C.enabled || !path)
		return;
	if (canon_path(dirfd, path, canon, sizeof(canon)) == 0)
		ns_wait_path(canon);
	errno = saved;
}

/* An attribute change: the name's renames, then the file's data. */
static void before_change(int dirfd, const char *path, int flags)
{
	int saved = errno;

	if (!C.enabled || !path)
		return;
	if (ns_pending_any() || S.ninodes || registry_any())
		wait_path_pending(dirfd, path, flags & AT_SYMLINK_NOFOLLOW);
	errno = saved;
}

#define NAME_CALL(dirfd, path, call) do { ENSURE_REAL(); wait_name_renames(dirfd, path); return call; } while (0)
#define CHANGE_CALL(dirfd, path, flags, call) \
	do { ENSURE_REAL(); before_change(dirfd, path, flags); return call; } while (0)
#define FD_CHANGE_CALL(fd, call) do { ENSURE_REAL(); wait_fd_pending(fd); return call; } while (0)

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

/* A file the program has closed and now makes executable is about to be
 * run: our descriptor of it would make the exec fail with ETXTBSY. */
static int after_chmod(int r, int dirfd, const char *path, mode_t mode, int flags)
{
	if (r == 0 && (mode & 0111))
		settle_closed_path(dirfd, path, flags);
	return r;
}

ACKPT_EXPORT int chmod(const char *path, mode_t mode)
{
	ENSURE_REAL();
	before_change(AT_FDCWD, path, 0);
	return after_chmod(real.chmod(path, mode), AT_FDCWD, path, mode, 0);
}

ACKPT_EXPORT int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
	ENSURE_REAL();
	before_change(dirfd, path, flags);
	return after_chmod(real.fchmodat(dirfd, path, mode, flags), dirfd, path, mode, flags);
}

ACKPT_EXPORT int chown(const char *path, uid_t uid, gid_t gid)
{
	CHANGE_CALL(AT_FDCWD, path, 0, real.chown(path, uid, gid));
}

ACKPT_EXPORT int lchown(const char *path, uid_t uid, gid_t gid)
{
	CHANGE_CALL(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, real.lchown(path, uid, gid));
}

ACKPT_EXPORT int fchownat(int dirfd, const char *path, uid_t uid, gid_t gid, int flags)
{
	CHANGE_CALL(dirfd, path, flags, real.fchownat(dirfd, path, uid, gid, flags));
}

ACKPT_EXPORT int utime(const char *path, const struct utimbuf *times)
{
	CHANGE_CALL(AT_FDCWD, path, 0, real.utime(path, times));
}

ACKPT_EXPORT int utimes(const char *path, const struct timeval times[2])
{
	CHANGE_CALL(AT_FDCWD, path, 0, real.utimes(path, times));
}

ACKPT_EXPORT int lutimes(const char *path, const struct timeval times[2])
{
	CHANGE_CALL(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, real.lutimes(path, times));
}

ACKPT_EXPORT int utimensat(int dirfd, const char *path, const struct timespec times[2], int flags)
{
	CHANGE_CALL(dirfd, path, flags, real.utimensat(dirfd, path, times, flags));
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
	CHANGE_CALL(AT_FDCWD, path, 0, real.setxattr(path, name, value, size, flags));
}

ACKPT_EXPORT int lsetxattr(const char *path, const char *name, const void *value, size_t size,
			   int flags)
{
	CHANGE_CALL(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, real.lsetxattr(path, name, value, size, flags));
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
	CHANGE_CALL(AT_FDCWD, path, 0, real.removexattr(path, name));
}

ACKPT_EXPORT int lremovexattr(const char *path, const char *name)
{
	CHANGE_CALL(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW, real.lremovexattr(path, name));
}

ACKPT_EXPORT int futimens(int fd, const struct timespec times[2])
{
	FD_CHANGE_CALL(fd, real.futimens(fd, times));
}

ACKPT_EXPORT int futimes(int fd, const struct timeval times[2])
{
	FD_CHANGE_CALL(fd, real.futimes(fd, times));
}

ACKPT_EXPORT int fchmod(int fd, mode_t mode)
{
	FD_CHANGE_CALL(fd, real.fchmod(fd, mode));
}

ACKPT_EXPORT int fchown(int fd, uid_t uid, gid_t gid)
{
	FD_CHANGE_CALL(fd, real.fchown(fd, uid, gid));
}

ACKPT_EXPORT int fsetxattr(int fd, const char *name, const void *value, size_t size, int flags)
{
	FD_CHANGE_CALL(fd, real.fsetxattr(fd, name, value, size, flags));
}

ACKPT_EXPORT int fremovexattr(int fd, const char *name)
{
	FD_CHANGE_CALL(fd, real.fremovexattr(fd, name));
}
