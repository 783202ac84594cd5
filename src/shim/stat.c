/*
 * stat family: report sizes, times and blocks of files with staged data
 * as a synchronous run would, and wait for other processes' staged data.  Both generations are
 * wrapped: stat/fstat/lstat/fstatat (glibc >= 2.33) and __xstat & co
 * (wheels built against older glibc), plus statx.
 */
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>

#include "shim.h"

/* What stat reports that staged writes change. */
struct settled {
	uint64_t size, blocks, blksize;
	struct timespec mtime, ctime;
};

static int ts_after(const struct timespec *a, const struct timespec *b)
{
	return a->tv_sec > b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec > b->tv_nsec);
}

/*
 * What a synchronous run would show for (dev, ino) while this process has
 * staged work for it: the logical size, mtime and ctime no older than the
 * last staged write, and the blocks the data will take.  Once our writes
 * are in the file, the kernel's size stands (a child may have written
 * through a shared description since, or another program truncated it),
 * even while a CLOSE or fsync is still pending, but only if the caller
 * asked the kernel after the writes landed: returns 1 when they may have
 * landed in between (none pending now, and the kernel's size is not ours),
 * and the caller asks the kernel again and calls this with final set.
 */
static int settle(uint64_t dev, uint64_t ino, struct settled *st, int final)
{
	struct inode_state *i;
	int again = 0;

	if (!S.ninodes || session_lock() < 0)
		return 0;
	i = inode_find(dev, ino);
	if (i) {
		if (inode_writes_pending(i)) {
			/* the kernel's blocks, and the staged pages' as if none
			 * were in yet, but never more than the whole size
			 * takes: a sparse file stays sparse */
			uint64_t bs = st->blksize ? st->blksize : 4096;
			uint64_t whole = (i->size + bs - 1) / bs * (bs / 512);
			uint64_t blocks = st->blocks + i->pending_pages * 8;

			st->size = i->size;
			if (blocks > whole)
				blocks = whole;
			if (blocks > st->blocks)
				st->blocks = blocks;
		} else if (!final && st->size != i->size) {
			again = 1;
		} else {
			/* our writes are in: the size is the kernel's, which
			 * another process may have changed since */
			i->size = st->size;
		}
		if (!again && inode_pending(i)) {
			if (ts_after(&i->mtime, &st->mtime))
				st->mtime = i->mtime;
			if (ts_after(&i->mtime, &st->ctime))
				st->ctime = i->mtime;
		}
	}
	session_unlock();
	return again;
}

/* Another process on the node has staged work for the file: 1 once that
 * is written, and the caller asks the kernel again. */
static int other_pending(uint64_t dev, uint64_t ino, mode_t mode)
{
	return S_ISREG(mode) && registry_any() && registry_wait(dev, ino) > 0;
}

/* Returns settle()'s "ask the kernel again". */
static int fix_stat(struct stat *st, int final)
{
	struct settled v = { (uint64_t)st->st_size, (uint64_t)st->st_blocks,
			     (uint64_t)st->st_blksize, st->st_mtim, st->st_ctim };

	if (S_ISREG(st->st_mode)) {
		if (settle(st->st_dev, st->st_ino, &v, final))
			return 1;
		st->st_size = (off_t)v.size;
		st->st_blocks = (blkcnt_t)v.blocks;
		st->st_mtim = v.mtime;
		st->st_ctim = v.ctime;
	}
	return 0;
}

/* After a successful real call: wait for other processes' staged data
 * (redo the call) or report our own logical size (redo the call if our
 * work landed while the kernel was asked). */
#define SETTLE(r, st, call) do { \
	if ((r) == 0 && other_pending((st)->st_dev, (st)->st_ino, (st)->st_mode)) \
		(r) = (call); \
	if ((r) == 0 && S.ninodes && fix_stat(st, 0)) { \
		(r) = (call); \
		if ((r) == 0) \
			fix_stat(st, 1); \
	} \
} while (0)

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
	SETTLE(r, st, real.stat(path, st));
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
	SETTLE(r, st, real.lstat(path, st));
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
	SETTLE(r, st, real.fstat(fd, st));
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
	SETTLE(r, st, real.fstatat(dirfd, path, st, flags));
	return r;
}

ACKPT_EXPORT int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
	return fstatat(dirfd, path, (struct stat *)st, flags);
}

ACKPT_EXPORT int statx(int dirfd, const char *path, int flags, unsigned mask, struct statx *stx)
{
	int r;

	ENSURE_REAL();
	if (!(flags & AT_EMPTY_PATH) || (path && *path))
		before_path(dirfd, path, flags);
	r = real.statx(dirfd, path, flags, mask, stx);
	if (r == 0 && other_pending(makedev(stx->stx_dev_major, stx->stx_dev_minor), stx->stx_ino,
				    stx->stx_mode))
		r = real.statx(dirfd, path, flags, mask, stx);
	for (int final = 0; r == 0 && S.ninodes && S_ISREG(stx->stx_mode); final = 1) {
		struct settled v = { stx->stx_size, stx->stx_blocks, stx->stx_blksize,
				     { stx->stx_mtime.tv_sec, stx->stx_mtime.tv_nsec },
				     { stx->stx_ctime.tv_sec, stx->stx_ctime.tv_nsec } };

		if (settle(makedev(stx->stx_dev_major, stx->stx_dev_minor), stx->stx_ino, &v, final)) {
			r = real.statx(dirfd, path, flags, mask, stx); /* our work landed meanwhile */
			continue;
		}
		stx->stx_size = v.size;
		stx->stx_blocks = v.blocks;
		stx->stx_mtime.tv_sec = v.mtime.tv_sec;
		stx->stx_mtime.tv_nsec = (uint32_t)v.mtime.tv_nsec;
		stx->stx_ctime.tv_sec = v.ctime.tv_sec;
		stx->stx_ctime.tv_nsec = (uint32_t)v.ctime.tv_nsec;
		break;
	}
	return r;
}

/* pre-2.33 entry points; ver is _STAT_VER (1 on x86_64) */
ACKPT_EXPORT int __xstat(int ver, const char *path, struct stat *st)
{
	int r;

	ENSURE_REAL();
	before_path(AT_FDCWD, path, 0);
	r = real.__xstat ? real.__xstat(ver, path, st) : real.stat(path, st);
	SETTLE(r, st, real.__xstat ? real.__xstat(ver, path, st) : real.stat(path, st));
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
	SETTLE(r, st, real.__lxstat ? real.__lxstat(ver, path, st) : real.lstat(path, st));
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
	SETTLE(r, st, real.__fxstat ? real.__fxstat(ver, fd, st) : real.fstat(fd, st));
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
	SETTLE(r, st, real.__fxstatat ? real.__fxstatat(ver, dirfd, path, st, flags) :
			      real.fstatat(dirfd, path, st, flags));
	return r;
}

ACKPT_EXPORT int __fxstatat64(int ver, int dirfd, const char *path, struct stat64 *st, int flags)
{
	return __fxstatat(ver, dirfd, path, (struct stat *)st, flags);
}

/*
 * File tree walks stat each file inside glibc and hand the result to the
 * program: the sizes, times and blocks of files with staged data are
 * settled before it sees them, as stat's are.  The program's callback is
 * kept per thread (a callback may walk another tree: saved and restored).
 */
static __thread int (*nftw_fn)(const char *, const struct stat *, int, struct FTW *);
static __thread int (*ftw_fn)(const char *, const struct stat *, int);

/* What a walk's callback sees of a file: a settled copy of glibc's stat */
static const struct stat *walk_view(const struct stat *sb, int flag, struct stat *copy)
{
	if (!sb || flag != FTW_F)
		return sb;
	*copy = *sb;
	fix_stat(copy, 1);
	return copy;
}

static int nftw_each(const char *path, const struct stat *sb, int flag, struct FTW *f)
{
	struct stat st;

	return nftw_fn(path, walk_view(sb, flag, &st), flag, f);
}

static int ftw_each(const char *path, const struct stat *sb, int flag)
{
	struct stat st;

	return ftw_fn(path, walk_view(sb, flag, &st), flag);
}

ACKPT_EXPORT int nftw(const char *dir, int (*fn)(const char *, const struct stat *, int,
						 struct FTW *), int nfd, int flags)
{
	int (*outer)(const char *, const struct stat *, int, struct FTW *) = nftw_fn;
	int r;

	ENSURE_REAL();
	if (!C.enabled || !fn)
		return real.nftw(dir, fn, nfd, flags);
	wait_dir_renames(dir, -1);
	nftw_fn = fn;
	r = real.nftw(dir, nftw_each, nfd, flags);
	nftw_fn = outer;
	return r;
}

ACKPT_EXPORT int nftw64(const char *dir, int (*fn)(const char *, const struct stat64 *, int,
						   struct FTW *), int nfd, int flags)
{
	return nftw(dir, (int (*)(const char *, const struct stat *, int, struct FTW *))fn, nfd,
		    flags);
}

ACKPT_EXPORT int ftw(const char *dir, int (*fn)(const char *, const struct stat *, int), int nfd)
{
	int (*outer)(const char *, const struct stat *, int) = ftw_fn;
	int r;

	ENSURE_REAL();
	if (!C.enabled || !fn)
		return real.ftw(dir, fn, nfd);
	wait_dir_renames(dir, -1);
	ftw_fn = fn;
	r = real.ftw(dir, ftw_each, nfd);
	ftw_fn = outer;
	return r;
}

ACKPT_EXPORT int ftw64(const char *dir, int (*fn)(const char *, const struct stat64 *, int),
		       int nfd)
{
	return ftw(dir, (int (*)(const char *, const struct stat *, int))fn, nfd);
}

/* a regular file's entry, with the stat fts made of it */
static void fts_fix(FTSENT *e)
{
	if (e->fts_statp)
		fix_stat(e->fts_statp, 1);
}

ACKPT_EXPORT FTSENT *fts_read(FTS *fts)
{
	FTSENT *e;

	ENSURE_REAL();
	e = real.fts_read(fts);
	if (C.enabled && e && e->fts_info == FTS_F)
		fts_fix(e);
	return e;
}

ACKPT_EXPORT FTSENT64 *fts64_read(FTS64 *fts)
{
	return (FTSENT64 *)fts_read((FTS *)fts);
}

ACKPT_EXPORT FTSENT *fts_children(FTS *fts, int opts)
{
	FTSENT *list, *e;

	ENSURE_REAL();
	list = real.fts_children(fts, opts);
	if (C.enabled)
		for (e = list; e; e = e->fts_link)
			if (e->fts_info == FTS_F)
				fts_fix(e);
	return list;
}

ACKPT_EXPORT FTSENT64 *fts64_children(FTS64 *fts, int opts)
{
	return (FTSENT64 *)fts_children((FTS *)fts, opts);
}
