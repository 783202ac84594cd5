/*
 * POSIX descriptor wrappers: open, write, lseek, close, dup and fcntl
 * families.  Each has the same shape: make sure the real function is
 * known, take the untracked fast path when fd/path is not ours, else act
 * and turn -errno into -1/errno.  errno is preserved on success paths.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>

#include "shim.h"

static inline int need_mode(int flags)
{
	return (flags & O_CREAT) || (flags & __O_TMPFILE) == __O_TMPFILE;
}

/* Wait for pending work before an open that could observe or truncate it. */
static void pre_open(int dirfd, const char *path, int flags)
{
	int acc = flags & O_ACCMODE;

	if (!C.enabled || !path)
		return;
	note_fdinfo(path);
	if (acc == O_RDONLY && !(flags & O_TRUNC)) {
		/* readers wait after the open, on the inode they got (files.c,
		 * watched descriptors); only a deferred rename of the name
		 * decides which file that is */
		char canon[PATH_MAX];

		if (ns_pending_any() && canon_path(dirfd, path, canon, sizeof(canon)) == 0)
			ns_wait_path(canon);
		return;
	}
	if (!ns_pending_any() && !S.ninodes && !registry_any())
		return;
	/* a writer that does not truncate observes nothing at its open: our
	 * own pending work on the file is ordered after the open instead */
	wait_path_pending(dirfd, path, ((flags & O_NOFOLLOW) ? AT_SYMLINK_NOFOLLOW : 0) |
			  (!(flags & O_TRUNC) && !(flags & O_DIRECT) ? WAIT_OTHERS_ONLY : 0));
}

/* Metadata (commit marker) opened for writing goes under a hidden name. */
static struct outcome open_metadata(int dirfd, const char *path, int flags, mode_t mode)
{
	char canon[PATH_MAX];
	const char *base = strrchr(path, '/');
	int acc = flags & O_ACCMODE;

	if (!C.enabled || acc == O_RDONLY || (flags & (O_DIRECTORY | O_PATH | __O_TMPFILE)) ||
	    !C.nmetadata || tls_busy || !session_is_owner())
		return NOT_OURS;
	if (!name_is_metadata(base ? base + 1 : path))
		return NOT_OURS;
	if (canon_path(dirfd, path, canon, sizeof(canon)) < 0 || !path_is_managed(canon))
		return NOT_OURS;
	return files_open_metadata(canon, flags, mode);
}

static int do_openat(int dirfd, const char *path, int flags, mode_t mode, const char *how)
{
	int saved = errno, fd;

	if (UNLIKELY(!real.openat))
		return (int)syscall(SYS_openat, dirfd, path, flags, mode);
	pre_open(dirfd, path, flags);
	if (path) {
		struct outcome r = open_metadata(dirfd, path, flags, mode);

		if (r.ours)
			return (int)finish(r.ret, saved);
	}
	errno = saved;
	fd = real.openat(dirfd, path, flags, mode);
	if (fd < 0)
		return fd;
	saved = errno;
	files_post_open(fd, flags, how, 0);
	errno = saved;
	return fd;
}

#define OPEN_MODE(flags, mode) do { \
	if (need_mode(flags)) { va_list ap; va_start(ap, flags); \
		mode = va_arg(ap, mode_t); va_end(ap); } } while (0)

ACKPT_EXPORT int open(const char *path, int flags, ...)
{
	mode_t mode = 0;

	ENSURE_REAL();
	OPEN_MODE(flags, mode);
	return do_openat(AT_FDCWD, path, flags, mode, "open");
}

ACKPT_EXPORT int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;

	ENSURE_REAL();
	OPEN_MODE(flags, mode);
	return do_openat(AT_FDCWD, path, flags, mode, "open64");
}

ACKPT_EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;

	ENSURE_REAL();
	OPEN_MODE(flags, mode);
	return do_openat(dirfd, path, flags, mode, "openat");
}

ACKPT_EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;

	ENSURE_REAL();
	OPEN_MODE(flags, mode);
	return do_openat(dirfd, path, flags, mode, "openat64");
}

/* _FORTIFY_SOURCE entry points: only called without a mode argument */
ACKPT_EXPORT int __open_2(const char *path, int flags)
{
	ENSURE_REAL();
	return do_openat(AT_FDCWD, path, flags, 0, "__open_2");
}

ACKPT_EXPORT int __open64_2(const char *path, int flags)
{
	ENSURE_REAL();
	return do_openat(AT_FDCWD, path, flags, 0, "__open64_2");
}

ACKPT_EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
	ENSURE_REAL();
	return do_openat(dirfd, path, flags, 0, "__openat_2");
}

ACKPT_EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
	ENSURE_REAL();
	return do_openat(dirfd, path, flags, 0, "__openat64_2");
}

ACKPT_EXPORT int creat(const char *path, mode_t mode)
{
	ENSURE_REAL();
	return do_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, "creat");
}

ACKPT_EXPORT int creat64(const char *path, mode_t mode)
{
	ENSURE_REAL();
	return do_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, "creat64");
}

/* openat2 has no glibc wrapper; syscall() routes here (process.c). */
int shim_openat2(int dirfd, const char *path, void *how, size_t size)
{
	struct { uint64_t flags, mode, resolve; } h = { 0 };
	int saved = errno, fd;

	if (how && size >= sizeof(uint64_t) * 2)
		memcpy(&h, how, size < sizeof(h) ? size : sizeof(h));
	pre_open(dirfd, path, (int)h.flags);
	errno = saved;
	fd = (int)real.syscall(SYS_openat2, dirfd, path, how, size);
	if (fd < 0)
		return fd;
	saved = errno;
	files_post_open(fd, (int)h.flags, "openat2", 0);
	errno = saved;
	return fd;
}

/* ---- writes ---- */

ACKPT_EXPORT ssize_t write(int fd, const void *buf, size_t len)
{
	if (LIKELY(real_ready) && LIKELY(!fd_peek(fd)))
		return real.write(fd, buf, len);
	ENSURE_REAL();
	if (UNLIKELY(!real.write))
		return syscall(SYS_write, fd, buf, len);
	if (fd_peek(fd)) {
		struct iovec v = { (void *)buf, len };
		int saved = errno;
		struct outcome r = managed_write(fd, &v, 1, -1, 1, 0);

		if (r.ours)
			return finish(r.ret, saved);
	}
	return real.write(fd, buf, len);
}

ACKPT_EXPORT ssize_t writev(int fd, const struct iovec *iov, int n)
{
	ENSURE_REAL();
	if (fd_peek(fd)) {
		int saved = errno;
		struct outcome r = n < 0 || n > IOV_MAX ? done(-EINVAL) :
				   managed_write(fd, iov, n, -1, 1, 0);

		if (r.ours)
			return finish(r.ret, saved);
	}
	return real.writev(fd, iov, n);
}

ACKPT_EXPORT ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
	ENSURE_REAL();
	if (fd_peek(fd)) {
		struct iovec v = { (void *)buf, len };
		int saved = errno;
		struct outcome r = managed_write(fd, &v, 1, off, 0, 0);

		if (r.ours)
			return finish(r.ret, saved);
	}
	return real.pwrite(fd, buf, len, off);
}

ACKPT_EXPORT ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off)
{
	return pwrite(fd, buf, len, off);
}

ACKPT_EXPORT ssize_t pwritev(int fd, const struct iovec *iov, int n, off_t off)
{
	ENSURE_REAL();
	if (fd_peek(fd)) {
		int saved = errno;
		struct outcome r = n < 0 || n > IOV_MAX ? done(-EINVAL) :
				   managed_write(fd, iov, n, off, 0, 0);

		if (r.ours)
			return finish(r.ret, saved);
	}
	return real.pwritev(fd, iov, n, off);
}

ACKPT_EXPORT ssize_t pwritev64(int fd, const struct iovec *iov, int n, off_t off)
{
	return pwritev(fd, iov, n, off);
}

ACKPT_EXPORT ssize_t pwritev2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
	ENSURE_REAL();
	if (fd_peek(fd)) {
		/* -1 means "at the file position"; RWF_APPEND/RWF_NOAPPEND
		 * change where, the durability flags are the helper's job like
		 * fsync, and the other flags send the write to the kernel */
		int saved = errno;
		struct outcome r = n < 0 || n > IOV_MAX ? done(-EINVAL) :
				   managed_write(fd, iov, n, off, off == -1, flags);

		if (r.ours)
			return finish(r.ret, saved);
	}
	return real.pwritev2(fd, iov, n, off, flags);
}

ACKPT_EXPORT ssize_t pwritev64v2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
	return pwritev2(fd, iov, n, off, flags);
}

/* ---- positions ---- */

ACKPT_EXPORT off_t lseek(int fd, off_t off, int whence)
{
	ENSURE_REAL();
	if (UNLIKELY(!real.lseek))
		return syscall(SYS_lseek, fd, off, whence);
	if (!fd_peek(fd) && whence != SEEK_SET && whence != SEEK_CUR && C.enabled &&
	    registry_any()) {
		/* another process's staged data decides where the end is */
		struct stat st;
		int saved = errno;

		if (real.fstat(fd, &st) == 0)
			wait_stat_pending(&st);
		errno = saved;
	}
	if (fd_peek(fd)) {
		int saved = errno;
		struct outcome r = managed_lseek(fd, off, whence);

		if (r.ours)
			return finish(r.ret, saved);
	}
	return real.lseek(fd, off, whence);
}

ACKPT_EXPORT off_t lseek64(int fd, off_t off, int whence)
{
	return lseek(fd, off, whence);
}

/* ---- descriptors ---- */

static int is_protected(int fd)
{
	return (unsigned)fd < FD_MAX && atomic_load_explicit(&fd_protected[fd], memory_order_relaxed);
}

static int fcntl_valid(int fd)
{
	return real.fcntl(fd, F_GETFD) >= 0;
}

/*
 * Before a lock call: its range may be relative to the offset (SEEK_CUR),
 * which a staged write moved only in our table.  A process's POSIX lock
 * (process_wide) goes with any close of the file: not with ours, later,
 * of a state the program closed before.
 */
static void lock_prepare(int fd, int process_wide)
{
	if (process_wide)
		settle_closed_fd(fd);
	if (session_lock() == 0) {
		ofd_pos_to_kernel(fd, fd_peek(fd));
		session_unlock();
	}
}

ACKPT_EXPORT int close(int fd)
{
	int saved = errno, r, err = 0, exe;
	uint64_t commit = 0;
	struct stat st;
	struct ofd *o;

	ENSURE_REAL();
	if (UNLIKELY(!real.close))
		return (int)syscall(SYS_close, fd);
	if (UNLIKELY(is_protected(fd)) && session_is_owner()) {
		errno = EBADF; /* never the program's: it did not open it */
		return -1;
	}
	if (UNLIKELY(fd_is_watched(fd)) && session_is_owner())
		watch_clear(fd); /* not a vfork child's: the table is its parent's */
	if (LIKELY(!fd_peek(fd)))
		return real.close(fd);
	if (session_lock() < 0)
		return real.close(fd);
	/* an executable is closed to be run: not "text file busy" for long;
	 * a library to be loaded (dlopen reads and maps it inside ld.so) */
	o = fd_peek(fd); /* another thread may have closed it meanwhile */
	exe = real.fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
	      ((st.st_mode & 0111) || (o && o->ino && o->ino->elf));
	r = real.close(fd);
	if (r == 0 || errno != EBADF)
		err = fd_release_commit(fd, &commit);
	session_unlock();
	if (exe && r == 0)
		settle_closed_stat(&st);
	if (commit && C.commit_sync) {
		/* --commit sync: wait for the metadata commit this close started */
		session_wait_commit(commit, 0);
		if (!err)
			err = session_check_commit_error();
	}
	if (r < 0)
		return r;
	return (int)finish(err, saved);
}

/* Close [lo, hi] except our own descriptors. */
static int close_range_sparing(unsigned lo, unsigned hi, int flags)
{
	unsigned a = lo, i;
	int r = 0;

	for (i = lo; i <= hi && i < FD_MAX; i++) {
		if (is_protected((int)i)) {
			if (i > a && real.close_range(a, i - 1, flags) < 0)
				r = -1;
			a = i + 1;
		}
		if (i == UINT32_MAX)
			break;
	}
	if (a <= hi && real.close_range(a, hi, flags) < 0)
		r = -1;
	return r;
}

ACKPT_EXPORT int close_range(unsigned lo, unsigned hi, int flags)
{
	unsigned i;
	int r;

	ENSURE_REAL();
	/* a session that another thread is starting (at program start:
	 * ACKPT_EARLY_START) has channels to spare already: the lock waits
	 * for it */
	if (!session_is_owner() || !C.enabled ||
	    (S.state == SESS_NONE && !__atomic_load_n(&S.starting, __ATOMIC_SEQ_CST)))
		return real.close_range(lo, hi, flags); /* vfork child: hands off */
	if (session_lock() < 0)
		return real.close_range(lo, hi, flags);
	r = close_range_sparing(lo, hi, flags);
	if (r == 0 && !(flags & CLOSE_RANGE_CLOEXEC))
		for (i = lo; i <= hi && i < FD_MAX; i++)
			fd_release((int)i);
	session_unlock();
	return r;
}

ACKPT_EXPORT void closefrom(int lo)
{
	if (lo < 0)
		lo = 0;
	close_range((unsigned)lo, ~0u, 0);
}

/*
 * newfd is a fresh copy of oldfd.  If we still tracked a description under
 * newfd's number, it was closed behind our back (a raw close): drop it, or
 * the copy's writes would go into that old file.
 */
static int dup_track(int oldfd, int newfd)
{
	struct ofd *o;

	if (newfd < 0 || session_lock() < 0)
		return newfd;
	o = fd_peek(oldfd);
	if (fd_peek(newfd) != o) {
		fd_release(newfd);
		if (o)
			fd_install(newfd, o);
	}
	session_unlock();
	files_share_std(newfd);
	return newfd;
}

ACKPT_EXPORT int dup(int fd)
{
	int nfd;

	ENSURE_REAL();
	nfd = real.dup(fd);
	if (nfd >= 0 && (fd_peek(fd) || fd_peek(nfd))) {
		int saved = errno;

		dup_track(fd, nfd);
		errno = saved;
	}
	if (nfd >= 0 && UNLIKELY(fd_is_watched(fd) || fd_is_watched(nfd)))
		watch_copy(fd, nfd);
	return nfd;
}

/*
 * dup2/dup3 onto a managed or protected descriptor.  Under the lock, so
 * the table never names a file the kernel's newfd no longer is: ours is
 * moved out of the way first, and newfd's old state is dropped only if the
 * kernel's call succeeded (a failed dup2 leaves newfd as it was).
 */
static int dup23(int oldfd, int newfd, int flags, int three)
{
	int r, saved = errno, err;

	if (oldfd == newfd && !three)
		return real.dup2(oldfd, newfd);
	if (!session_is_owner()) {
		/* a vfork child setting up a subprocess's stdio: the exec'd
		 * image will write through this description */
		r = three ? real.dup3(oldfd, newfd, flags) : real.dup2(oldfd, newfd);
		if (r >= 0 && fd_peek(oldfd))
			files_share_vfork(oldfd);
		errno = r >= 0 ? saved : errno;
		return r;
	}
	if (session_lock() < 0)
		return three ? real.dup3(oldfd, newfd, flags) : real.dup2(oldfd, newfd);
	if (is_protected(newfd) && fcntl_valid(oldfd))
		files_relocate_protected(newfd);
	r = three ? real.dup3(oldfd, newfd, flags) : real.dup2(oldfd, newfd);
	err = errno;
	if (r >= 0) {
		struct ofd *o = fd_peek(oldfd);

		if (fd_peek(newfd) != o) {
			fd_release(newfd); /* dup2 closed newfd silently */
			if (o)
				fd_install(newfd, o);
		}
	}
	session_unlock();
	if (r >= 0)
		files_share_std(newfd);
	errno = r >= 0 ? saved : err;
	return r;
}

/* newfd is now a copy of oldfd: watched as oldfd is (files.c) */
static int dup_watch(int oldfd, int newfd, int r)
{
	if (r >= 0 && oldfd != newfd && UNLIKELY(fd_is_watched(oldfd) || fd_is_watched(newfd))) {
		int saved = errno;

		watch_copy(oldfd, newfd);
		errno = saved;
	}
	return r;
}

ACKPT_EXPORT int dup2(int oldfd, int newfd)
{
	ENSURE_REAL();
	if (!fd_peek(oldfd) && !fd_peek(newfd) && !is_protected(newfd))
		return dup_watch(oldfd, newfd, real.dup2(oldfd, newfd));
	return dup_watch(oldfd, newfd, dup23(oldfd, newfd, 0, 0));
}

ACKPT_EXPORT int dup3(int oldfd, int newfd, int flags)
{
	ENSURE_REAL();
	if (!fd_peek(oldfd) && !fd_peek(newfd) && !is_protected(newfd))
		return dup_watch(oldfd, newfd, real.dup3(oldfd, newfd, flags));
	return dup_watch(oldfd, newfd, dup23(oldfd, newfd, flags, 1));
}

static int fcntl_common(int (*fn)(int, int, ...), int fd, int cmd, va_list ap)
{
	long arg = va_arg(ap, long);
	int r;

	if (!fd_peek(fd)) {
		r = fn(fd, cmd, arg);
		if ((cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && r >= 0 && UNLIKELY(fd_peek(r))) {
			int saved = errno;

			dup_track(fd, r);
			errno = saved;
		}
		if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
			dup_watch(fd, r, r);
		return r;
	}
	switch (cmd) {
	case F_DUPFD:
	case F_DUPFD_CLOEXEC:
		r = fn(fd, cmd, arg);
		if (r >= 0) {
			int saved = errno;

			dup_track(fd, r);
			errno = saved;
		}
		return dup_watch(fd, r, r);
	case F_SETFL:
		r = fn(fd, cmd, arg);
		if (r == 0 && session_lock() == 0) {
			struct ofd *o = fd_peek(fd);

			if (o)
				o->append = !!(arg & O_APPEND);
			session_unlock();
		}
		return r;
	case F_SETLEASE:
		/* a lease needs the file open nowhere else: not by us either
		 * for a state the program closed before */
		settle_closed_fd(fd);
		return fn(fd, cmd, arg);
	case F_SETLK:
	case F_SETLKW:
		lock_prepare(fd, 1);
		return fn(fd, cmd, arg);
	case F_GETLK:
	case F_OFD_SETLK:
	case F_OFD_SETLKW:
	case F_OFD_GETLK:
		lock_prepare(fd, 0); /* per description: no close of ours releases it */
		return fn(fd, cmd, arg);
	default:
		return fn(fd, cmd, arg);
	}
}

ACKPT_EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	int r;

	ENSURE_REAL();
	va_start(ap, cmd);
	r = fcntl_common(real.fcntl, fd, cmd, ap);
	va_end(ap);
	return r;
}

ACKPT_EXPORT int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	int r;

	ENSURE_REAL();
	va_start(ap, cmd);
	r = fcntl_common(real.fcntl64 ? real.fcntl64 : real.fcntl, fd, cmd, ap);
	va_end(ap);
	return r;
}

/* glibc's lockf calls fcntl inside libc, where no wrapper sees it: its
 * range starts at the offset, and F_LOCK and F_TLOCK take POSIX locks. */
ACKPT_EXPORT int lockf(int fd, int cmd, off_t len)
{
	ENSURE_REAL();
	lock_prepare(fd, cmd == F_LOCK || cmd == F_TLOCK);
	return real.lockf(fd, cmd, len);
}

ACKPT_EXPORT int lockf64(int fd, int cmd, off_t len)
{
	return lockf(fd, cmd, len);
}
