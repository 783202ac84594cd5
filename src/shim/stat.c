/*
 * stat family: report logical sizes for files with staged data, so a
 * program sees what a synchronous run would.  Both generations are
 * wrapped: stat/fstat/lstat/fstatat (glibc >= 2.33) and __xstat & co
 * (wheels built against older glibc), plus statx.
 */
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>

#include "shim.h"

/* The logical size of (dev, ino) if this process has staged data for it. */
static int logical_size(uint64_t dev, uint64_t ino, uint64_t *size)
{
	struct inode_state *i;
	int found = 0;

	if (!S.ninodes || session_lock() < 0)
		return 0;
	i = inode_find(dev, ino);
	if (i) {
		*size = i->size;
		found = 1;
	}
	session_unlock();
	return found;
}

static void fix_stat(struct stat *st)
{
	uint64_t size;

	if (S_ISREG(st->st_mode) && logical_size(st->st_dev, st->st_ino, &size))
		st->st_size = (off_t)size;
}

static void before_path(int dirfd, const char *path, int flags)
{
	char canon[4096];

	if (C.enabled && ns_pending_any() && path &&
	    canon_path(dirfd, path, canon, sizeof(canon)) == 0)
		ns_wait_path(canon);
}

ACKPT_EXPORT int stat(const char *path, struct stat *st)
{
	int r;

	ENSURE_REAL();
	before_path(AT_FDCWD, path, 0);
	r = real.stat(path, st);
	if (r == 0 && S.ninodes)
		fix_stat(st);
	return r;
}

ACKPT_EXPORT int stat64(const char *path, struct stat64 *st)
{
	return stat(path, (struct stat *)st);
}

ACKPT_EXPORT int lstat(const char *path, struct stat *st)
{
	int r;

	ENSURE_REAL();
	before_path(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW);
	r = real.lstat(path, st);
	if (r == 0 && S.ninodes)
		fix_stat(st);
	return r;
}

ACKPT_EXPORT int lstat64(const char *path, struct stat64 *st)
{
	return lstat(path, (struct stat *)st);
}

ACKPT_EXPORT int fstat(int fd, struct stat *st)
{
	int r;

	ENSURE_REAL();
	if (UNLIKELY(!real.fstat))
		return (int)syscall(SYS_fstat, fd, st);
	r = real.fstat(fd, st);
	if (r == 0 && S.ninodes)
		fix_stat(st);
	return r;
}

ACKPT_EXPORT int fstat64(int fd, struct stat64 *st)
{
	return fstat(fd, (struct stat *)st);
}

ACKPT_EXPORT int fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
	int r;

	ENSURE_REAL();
	if (!(flags & AT_EMPTY_PATH) || (path && *path))
		before_path(dirfd, path, flags);
	r = real.fstatat(dirfd, path, st, flags);
	if (r == 0 && S.ninodes)
		fix_stat(st);
	return r;
}

ACKPT_EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	return fstatat(dirfd, path, (struct stat *)st, flags);
}

ACKPT_EXPORT int statx(int dirfd, const char *path, int flags, unsigned mask, struct statx *stx)
{
	int r;
	uint64_t size;

	ENSURE_REAL();
	if (!(flags & AT_EMPTY_PATH) || (path && *path))
		before_path(dirfd, path, flags);
	r = real.statx(dirfd, path, flags, mask, stx);
	if (r == 0 && S.ninodes && S_ISREG(stx->stx_mode) &&
	    logical_size(makedev(stx->stx_dev_major, stx->stx_dev_minor), stx->stx_ino, &size))
		stx->stx_size = size;
	return r;
}

/* pre-2.33 entry points; ver is _STAT_VER (1 on x86_64) */
ACKPT_EXPORT int __xstat(int ver, const char *path, struct stat *st)
{
	int r;

	ENSURE_REAL();
	before_path(AT_FDCWD, path, 0);
	r = real.__xstat ? real.__xstat(ver, path, st) : real.stat(path, st);
	if (r == 0 && S.ninodes)
		fix_stat(st);
	return r;
}

ACKPT_EXPORT int __xstat64(int ver, const char *path, struct stat64 *st)
{
	return __xstat(ver, path, (struct stat *)st);
}

ACKPT_EXPORT int __lxstat(int ver, const char *path, struct stat *st)
{
	int r;

	ENSURE_REAL();
	before_path(AT_FDCWD, path, AT_SYMLINK_NOFOLLOW);
	r = real.__lxstat ? real.__lxstat(ver, path, st) : real.lstat(path, st);
	if (r == 0 && S.ninodes)
		fix_stat(st);
	return r;
}

ACKPT_EXPORT int __lxstat64(int ver, const char *path, struct stat64 *st)
{
	return __lxstat(ver, path, (struct stat *)st);
}

ACKPT_EXPORT int __fxstat(int ver, int fd, struct stat *st)
{
	int r;

	ENSURE_REAL();
	r = real.__fxstat ? real.__fxstat(ver, fd, st) : real.fstat(fd, st);
	if (r == 0 && S.ninodes)
		fix_stat(st);
	return r;
}

ACKPT_EXPORT int __fxstat64(int ver, int fd, struct stat64 *st)
{
	return __fxstat(ver, fd, (struct stat *)st);
}

ACKPT_EXPORT int __fxstatat(int ver, int dirfd, const char *path, struct stat *st, int flags)
{
	int r;

	ENSURE_REAL();
	before_path(dirfd, path, flags);
	r = real.__fxstatat ? real.__fxstatat(ver, dirfd, path, st, flags) :
			      real.fstatat(dirfd, path, st, flags);
	if (r == 0 && S.ninodes)
		fix_stat(st);
	return r;
}

ACKPT_EXPORT int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
	return __fxstatat(ver, dirfd, path, (struct stat *)st, flags);
}
