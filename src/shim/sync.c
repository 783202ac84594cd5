/*
 * Durability and content access: fsync-family calls on managed files
 * return at once (the helper syncs in order; errors surface at the next
 * call); everything that could observe contents (read, mmap,
 * copy_file_range, sendfile, splice) or change size outside the write
 * path (truncate, fallocate) first waits for the file's pending work.
 */
#include <aio.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>

#include "shim.h"

static struct outcome managed_fsync(int fd)
{
	struct ofd *o;
	int ret = 0;

	if (session_lock() < 0)
		return NOT_OURS;
	o = fd_peek(fd);
	if (!o || !o->ino || o->ino->retired) {
		/* (a reader whose file has nothing pending: the kernel's fsync) */
		session_unlock();
		return NOT_OURS;
	}
	ret = session_check_error_sticky(o->ino);
	if (!ret && S.state == SESS_ACTIVE && o->writable)
		ret = session_send_simple(ACKPT_OP_FSYNC, o->ino);
	else if (!ret && S.state != SESS_ACTIVE && real.fsync(o->ino->shadow_fd) < 0)
		ret = -errno;
	if (ret == -EPIPE)
		ret = 0; /* helper died: the replay synced it */
	session_unlock();
	return done(ret);
}

/* Would a file created in the directory at path be managed? */
static int dir_holds_managed(const char *path)
{
	char probe[PATH_MAX + 2];

	snprintf(probe, sizeof(probe), "%s/x", path);
	return path_is_managed(path) || path_is_managed(probe);
}

/*
 * fsync of a directory that holds managed files, while this process has
 * work pending.  Without ackpt, the program's files were durable before
 * this call and it is cheap; here the helper's writes are still in flight,
 * and the journal commit that a directory fsync forces waits for them
 * (ext4: 80 to 120 ms after a 256 MiB save, under 1 ms in a plain run).
 * So the helper fsyncs the directory after every earlier op (DIRSYNC) and
 * the call returns at once, as an fsync of a managed file does.  The error
 * of such a deferred fsync is returned by the next directory fsync.
 * 1: handled, *ret its result; 0: the kernel's fsync.
 */
static int dir_fsync(int fd, int *ret)
{
	char path[PATH_MAX];
	struct stat st;
	int err;

	if (real.fstat(fd, &st) < 0 || !S_ISDIR(st.st_mode) || session_lock() < 0)
		return 0;
	if (S.state != SESS_ACTIVE && S.state != SESS_DEAD)
		goto kernel;
	/* a deferred one failed: this one reports it, even once the helper
	 * has died (the control block stays mapped then) */
	err = __atomic_exchange_n(&S.shm->dirsync_err, 0, __ATOMIC_ACQ_REL);
	if (err) {
		*ret = -err;
		session_unlock();
		return 1;
	}
	/* the helper is gone, nothing is in flight, or not a checkpoint's
	 * directory */
	if (S.state != SESS_ACTIVE || session_durable() >= S.seq ||
	    fd_path(fd, path, sizeof(path)) < 0 || !dir_holds_managed(path))
		goto kernel;
	/* a failed send (-EPIPE: the helper died, and the replay has written
	 * everything) leaves the fsync to the kernel, as without ackpt */
	if (session_send_dirsync(path) < 0)
		goto kernel;
	*ret = 0;
	session_unlock();
	return 1;
kernel:
	session_unlock();
	return 0;
}

static int fsync_common(int fd, int (*fn)(int))
{
	int saved = errno, ret;
	struct outcome r;

	ENSURE_REAL();
	if (!fd_peek(fd)) {
		if (UNLIKELY(S.state == SESS_ACTIVE || S.state == SESS_DEAD) && dir_fsync(fd, &ret))
			return (int)finish(ret, saved);
		return fn(fd);
	}
	r = managed_fsync(fd);
	if (!r.ours)
		return fn(fd);
	return (int)finish(r.ret, saved);
}

ACKPT_EXPORT int fsync(int fd)
{
	ENSURE_REAL();
	return fsync_common(fd, real.fsync);
}

ACKPT_EXPORT int fdatasync(int fd)
{
	ENSURE_REAL();
	return fsync_common(fd, real.fdatasync);
}

ACKPT_EXPORT int sync_file_range(int fd, off_t off, off_t n, unsigned flags)
{
	int saved = errno, r;

	ENSURE_REAL();
	if (!fd_peek(fd))
		return real.sync_file_range(fd, off, n, flags);
	/* writeback hints for data that is not in the page cache yet: the
	 * helper owns it; only report a pending error */
	if (session_lock() < 0)
		return real.sync_file_range(fd, off, n, flags);
	{
		struct ofd *o = fd_peek(fd);

		r = o && o->ino && !o->ino->retired ? session_check_error_sticky(o->ino) : 0;
	}
	session_unlock();
	if (r < 0) {
		errno = -r;
		return -1;
	}
	errno = saved;
	return 0;
}

ACKPT_EXPORT int syncfs(int fd)
{
	ENSURE_REAL();
	return real.syncfs(fd);
}

ACKPT_EXPORT void sync(void)
{
	ENSURE_REAL();
	real.sync();
}

ACKPT_EXPORT int msync(void *addr, size_t len, int flags)
{
	ENSURE_REAL();
	return real.msync(addr, len, flags);
}

/* ---- reads wait for the file's pending writes ---- */

static void drain_if_tracked(int fd)
{
	if (fd_peek(fd)) {
		int saved = errno;

		managed_drain_fd(fd);
		errno = saved;
	}
	/* a reader may be tracked (our own pending work) and watched too:
	 * another process may have staged writes since the open */
	if (UNLIKELY(fd_is_watched(fd))) {
		int saved = errno;

		watch_wait(fd);
		errno = saved;
	}
}

static void resync_if_tracked(int fd)
{
	if (fd_peek(fd)) {
		int saved = errno;

		managed_resync(fd);
		errno = saved;
	}
}

static void wrote_if_tracked(int fd)
{
	if (fd_peek(fd)) {
		int saved = errno;

		managed_kernel_wrote(fd);
		errno = saved;
	}
}

ACKPT_EXPORT ssize_t read(int fd, void *buf, size_t n)
{
	ssize_t r;

	if (LIKELY(real_ready) && LIKELY(!fd_peek(fd)) && LIKELY(!fd_is_watched(fd)))
		return real.read(fd, buf, n);
	ENSURE_REAL();
	if (UNLIKELY(!real.read))
		return syscall(SYS_read, fd, buf, n);
	drain_if_tracked(fd);
	r = real.read(fd, buf, n);
	if (r > 0)
		resync_if_tracked(fd);
	return r;
}

ACKPT_EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
	if (n > buflen) {
		extern void __chk_fail(void) __attribute__((noreturn));
		__chk_fail();
	}
	return read(fd, buf, n);
}

ACKPT_EXPORT ssize_t readv(int fd, const struct iovec *iov, int n)
{
	ssize_t r;

	ENSURE_REAL();
	drain_if_tracked(fd);
	r = real.readv(fd, iov, n);
	if (r > 0)
		resync_if_tracked(fd);
	return r;
}

ACKPT_EXPORT ssize_t pread(int fd, void *buf, size_t n, off_t off)
{
	ENSURE_REAL();
	drain_if_tracked(fd);
	return real.pread(fd, buf, n, off);
}

ACKPT_EXPORT ssize_t pread64(int fd, void *buf, size_t n, off_t off)
{
	return pread(fd, buf, n, off);
}

ACKPT_EXPORT ssize_t __pread_chk(int fd, void *buf, size_t n, off_t off, size_t buflen)
{
	if (n > buflen) {
		extern void __chk_fail(void) __attribute__((noreturn));
		__chk_fail();
	}
	return pread(fd, buf, n, off);
}

ACKPT_EXPORT ssize_t __pread64_chk(int fd, void *buf, size_t n, off_t off, size_t buflen)
{
	return __pread_chk(fd, buf, n, off, buflen);
}

ACKPT_EXPORT ssize_t preadv(int fd, const struct iovec *iov, int n, off_t off)
{
	ENSURE_REAL();
	drain_if_tracked(fd);
	return real.preadv(fd, iov, n, off);
}

ACKPT_EXPORT ssize_t preadv64(int fd, const struct iovec *iov, int n, off_t off)
{
	return preadv(fd, iov, n, off);
}

ACKPT_EXPORT ssize_t preadv2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
	ssize_t r;

	ENSURE_REAL();
	drain_if_tracked(fd);
	r = real.preadv2(fd, iov, n, off, flags);
	if (r > 0 && off == -1)
		resync_if_tracked(fd);
	return r;
}

ACKPT_EXPORT ssize_t preadv64v2(int fd, const struct iovec *iov, int n, off_t off, int flags)
{
	return preadv2(fd, iov, n, off, flags);
}

/*
 * A map sees the page cache: the file's staged data goes there first.  A
 * map of a file we write makes the file shared: stores through a shared
 * map and our later writes must land in program order, which only the
 * kernel can give, and a private map shows later writes to the pages it
 * has not copied.  So its writes go through the kernel from now on.
 */
ACKPT_EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	ENSURE_REAL();
	if (!(flags & MAP_ANONYMOUS) && fd >= 0) {
		int saved = errno;

		if (fd_peek(fd)) {
			if (session_lock() == 0) {
				struct inode_state *now = ofd_inode_now(fd_peek(fd));

				if (now)
					now->shared = 1;
				session_unlock();
			}
			wait_fd_pending(fd);
		} else if (S.ninodes || registry_any()) {
			struct stat st;

			if (real.fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
				/* a descriptor we do not track, of a file we write */
				if (S.ninodes && session_lock() == 0) {
					struct inode_state *i = inode_find(st.st_dev, st.st_ino);

					if (i)
						i->shared = 1;
					session_unlock();
				}
				wait_stat_pending(&st);
			}
		}
		errno = saved;
	}
	return real.mmap(addr, len, prot, flags, fd, off);
}

/* glibc's POSIX AIO writes and reads in its own threads through internal
 * calls: what we staged for the file must be in it before they run. */
#define AIO_DRAIN(cb) do { if ((cb) && (fd_peek((cb)->aio_fildes) || \
					 fd_is_watched((cb)->aio_fildes))) { \
	int saved_ = errno; drain_if_tracked((cb)->aio_fildes); errno = saved_; } } while (0)

ACKPT_EXPORT int aio_write(struct aiocb *cb)
{
	ENSURE_REAL();
	AIO_DRAIN(cb);
	return real.aio_write(cb);
}

ACKPT_EXPORT int aio_write64(struct aiocb64 *cb)
{
	return aio_write((struct aiocb *)cb);
}

ACKPT_EXPORT int aio_read(struct aiocb *cb)
{
	ENSURE_REAL();
	AIO_DRAIN(cb);
	return real.aio_read(cb);
}

ACKPT_EXPORT int aio_read64(struct aiocb64 *cb)
{
	return aio_read((struct aiocb *)cb);
}

ACKPT_EXPORT int lio_listio(int mode, struct aiocb *const list[], int n, struct sigevent *sev)
{
	int i;

	ENSURE_REAL();
	for (i = 0; list && i < n; i++)
		AIO_DRAIN(list[i]);
	return real.lio_listio(mode, list, n, sev);
}

ACKPT_EXPORT int lio_listio64(int mode, struct aiocb64 *const list[], int n, struct sigevent *sev)
{
	return lio_listio(mode, (struct aiocb *const *)list, n, sev);
}

ACKPT_EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return mmap(addr, len, prot, flags, fd, off);
}

ACKPT_EXPORT ssize_t copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t n,
				     unsigned flags)
{
	ssize_t r;

	ENSURE_REAL();
	drain_if_tracked(in);
	drain_if_tracked(out);
	r = real.copy_file_range(in, in_off, out, out_off, n, flags);
	if (r > 0) {
		resync_if_tracked(in);
		wrote_if_tracked(out);
	}
	return r;
}

ACKPT_EXPORT ssize_t sendfile(int out, int in, off_t *off, size_t n)
{
	ssize_t r;

	ENSURE_REAL();
	drain_if_tracked(in);
	drain_if_tracked(out);
	r = real.sendfile(out, in, off, n);
	if (r > 0) {
		resync_if_tracked(in);
		wrote_if_tracked(out);
	}
	return r;
}

ACKPT_EXPORT ssize_t sendfile64(int out, int in, off_t *off, size_t n)
{
	return sendfile(out, in, off, n);
}

ACKPT_EXPORT ssize_t splice(int in, off_t *in_off, int out, off_t *out_off, size_t n,
			    unsigned flags)
{
	ssize_t r;

	ENSURE_REAL();
	drain_if_tracked(in);
	drain_if_tracked(out);
	r = real.splice(in, in_off, out, out_off, n, flags);
	if (r > 0) {
		resync_if_tracked(in);
		wrote_if_tracked(out);
	}
	return r;
}

/* ---- size changes ---- */

/*
 * Through the kernel, after the file's staged writes: a truncate that grows
 * a mapped file must make the new pages valid at once (a store there would
 * raise SIGBUS), and one that shrinks must land after the writes before it.
 */
static struct outcome managed_ftruncate(int fd, off_t len)
{
	struct ofd *o;
	int ret;

	if (len < 0)
		return done(-EINVAL);
	o = lock_writable(fd);
	if (!o)
		return NOT_OURS;
	ret = session_check_error_sticky(o->ino);
	if (!ret) {
		while (o && o->ino && inode_pending(o->ino)) {
			inode_drain(o->ino);
			o = fd_peek(fd); /* looked up again: the lock was dropped */
		}
		if (!o || !o->ino) {
			session_unlock();
			return done(-EBADF);
		}
		ret = real.ftruncate(fd, len) < 0 ? -errno : 0;
		if (!ret) {
			o->ino->size = (uint64_t)len;
			if (S.state == SESS_ACTIVE)
				session_send_dirty(o->ino);
		}
	}
	session_unlock();
	return done(ret);
}

ACKPT_EXPORT int ftruncate(int fd, off_t len)
{
	int saved = errno;
	struct outcome r;

	ENSURE_REAL();
	if (!fd_peek(fd))
		return real.ftruncate(fd, len);
	r = managed_ftruncate(fd, len);
	if (!r.ours)
		return real.ftruncate(fd, len);
	return (int)finish(r.ret, saved);
}

ACKPT_EXPORT int ftruncate64(int fd, off_t len)
{
	return ftruncate(fd, len);
}

ACKPT_EXPORT int truncate(const char *path, off_t len)
{
	struct stat st;
	int r;

	ENSURE_REAL();
	if (C.enabled && path)
		wait_path_pending(AT_FDCWD, path, 0);
	r = real.truncate(path, len);
	if (r == 0 && S.ninodes && real.stat(path, &st) == 0 && session_lock() == 0) {
		struct inode_state *i = inode_find(st.st_dev, st.st_ino);

		if (i)
			i->size = (uint64_t)len;
		session_unlock();
	}
	return r;
}

ACKPT_EXPORT int truncate64(const char *path, off_t len)
{
	return truncate(path, len);
}

ACKPT_EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
	int r;

	ENSURE_REAL();
	drain_if_tracked(fd);
	r = real.fallocate(fd, mode, off, len);
	if (r == 0)
		resync_if_tracked(fd);
	return r;
}

ACKPT_EXPORT int fallocate64(int fd, int mode, off_t off, off_t len)
{
	return fallocate(fd, mode, off, len);
}

ACKPT_EXPORT int posix_fallocate(int fd, off_t off, off_t len)
{
	int r;

	ENSURE_REAL();
	drain_if_tracked(fd);
	r = real.posix_fallocate(fd, off, len);
	if (r == 0)
		resync_if_tracked(fd);
	return r;
}

ACKPT_EXPORT int posix_fallocate64(int fd, off_t off, off_t len)
{
	return posix_fallocate(fd, off, len);
}
