/*
 * The write path: a write, pwrite, writev or pwritev2 to a managed file,
 * checked against the kernel's limits at the call, staged into the arena
 * (or written through the kernel when the description is shared with
 * another process), and the logical offset and size kept; lseek on managed
 * descriptors; draining before reads that must see the staged data.
 */
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "shim.h"

/*
 * A staged write or an lseek moves only our offset: the kernel's is set
 * here, before anything that reads or moves it (a read through the same
 * description, a write through the kernel, sendfile, a lock relative to
 * SEEK_CUR) and before the description reaches another process (fork,
 * exec, a vfork child, SCM_RIGHTS).  Private descriptions are the common
 * case, and this saves every write an lseek.
 */
void ofd_pos_to_kernel(int fd, struct ofd *o)
{
	if (o && o->pos_lazy) {
		if (real.lseek(fd, (off_t)o->pos, SEEK_SET) >= 0)
			o->pos_lazy = 0;
	}
}

/*
 * Wait, with the lock dropped and retaken, until the inode behind fd has no
 * staged work.  Returns the description again (it may have been closed by
 * another thread meanwhile: NULL), never a pointer from before the drop.
 */
static struct ofd *drain_fd_locked(int fd)
{
	for (;;) {
		struct ofd *o = fd_peek(fd);
		struct inode_state *now = ofd_inode_now(o);

		if (!now || now->last_seq <= session_durable())
			return o;
		inode_drain(now);
	}
}

/*
 * A write through a description that another process may also use (after
 * fork, posix_spawn, SCM_RIGHTS): the kernel's offset, O_APPEND and size
 * are the only ones every holder sees, so the write goes to the kernel
 * once the inode's staged data is in the file.  The helper is told the
 * file is dirty so the next fsync, close or barrier covers these bytes.
 * So does a write with a pwritev2 flag only the kernel can judge.
 */
static ssize_t shared_write(int fd, const struct iovec *iov, int iovcnt, off_t off, int use_pos,
			    int rwf)
{
	struct ofd *o = drain_fd_locked(fd);
	struct stat st;
	ssize_t n;

	if (!o || !o->ino)
		return -EBADF;
	ofd_pos_to_kernel(fd, o);
	registry_wait(o->ino->dev, o->ino->ino); /* other writers' staged data first */
	n = real.pwritev2(fd, iov, iovcnt, use_pos ? -1 : off, rwf);
	if (n < 0)
		return -errno;
	if (real.fstat(fd, &st) == 0)
		o->ino->size = (uint64_t)st.st_size;
	if (use_pos) {
		off_t p = real.lseek(fd, 0, SEEK_CUR);

		if (p >= 0)
			o->pos = (uint64_t)p;
	}
	if (S.state == SESS_ACTIVE)
		session_send_dirty(o->ino);
	return n;
}

/* below 1 TiB the filesystems checkpoints live on take any offset (vfat,
 * whose files end at 4 GiB, is the exception ackpt does not probe for) */
#define LSEEK_PROBE_MIN (1ll << 40)

/*
 * The kernel's limits on one write at `at`, applied at the call as the
 * kernel would: a request is cut to MAX_RW_COUNT; an end past LLONG_MAX is
 * EINVAL; past RLIMIT_FSIZE it is cut there, or SIGXFSZ and EFBIG at it;
 * past the filesystem's largest offset (probed only beyond 1 TiB, with
 * lseek, which refuses offsets the file cannot have) the same.  Returns
 * the count to write, or -errno.
 */
static ssize_t write_limits(int fd, uint64_t at, size_t total)
{
	const uint64_t max_rw = 0x7ffff000;
	uint64_t lim = rlimit_fsize();

	if (total > max_rw)
		total = max_rw;
	if (at > (uint64_t)INT64_MAX || total > (uint64_t)INT64_MAX - at)
		return -EINVAL;
	if (total && at + total > lim) {
		if (at >= lim) {
			raise(SIGXFSZ);
			return -EFBIG;
		}
		total = lim - at;
	}
	if (total && at + total > LSEEK_PROBE_MIN) {
		off_t cur = real.lseek(fd, 0, SEEK_CUR);
		uint64_t lo = at, hi = at + total; /* lo is a valid end, hi is probed */

		if (real.lseek(fd, (off_t)at, SEEK_SET) < 0) {
			total = 0;
			lo = hi = 0;
		}
		while (hi > lo && real.lseek(fd, (off_t)hi, SEEK_SET) < 0) {
			uint64_t mid = lo + (hi - lo + 1) / 2;

			if (real.lseek(fd, (off_t)mid, SEEK_SET) < 0)
				hi = mid - 1;
			else
				lo = mid;
		}
		if (cur >= 0)
			real.lseek(fd, cur, SEEK_SET);
		if (hi == 0 && lo == 0)
			return -EFBIG;
		if (hi < at + total)
			total = hi - at;
		if (!total)
			return -EFBIG;
	}
	return (ssize_t)total;
}

/*
 * The pwritev2 flags a staged write honours: HIPRI means nothing to a
 * buffered write, the durability flags follow ackpt's fsync rule, and
 * APPEND/NOAPPEND change where it lands.  The kernel takes or refuses the
 * others by filesystem (NOWAIT, ATOMIC, DONTCACHE) or by kernel version
 * (any it does not know), so a write with any of them goes to the kernel.
 */
#define RWF_STAGED (RWF_HIPRI | RWF_DSYNC | RWF_SYNC | RWF_APPEND | RWF_NOAPPEND)

/*
 * A managed write's end: its time in the stall statistic, and the time it
 * returns, which is also the file's new mtime.  One clock for both (the
 * wall clock the mtime needs) saves a read per write; a step of the clock
 * during a write only skews the statistic.
 */
static struct timespec stall_end(const struct timespec *t0)
{
	struct timespec t1;
	int64_t ns;

	clock_gettime(CLOCK_REALTIME, &t1);
	ns = (int64_t)(t1.tv_sec - t0->tv_sec) * 1000000000 + (t1.tv_nsec - t0->tv_nsec);
	if (ns > 0)
		S.stall_ns += (uint64_t)ns;
	return t1;
}

/* The pages [at, at + len) touches, for stat's blocks (stat.c): a write
 * that goes on where the last ended does not count its first page twice */
static void note_pages(struct inode_state *ino, uint64_t at, uint64_t len)
{
	uint64_t first = at / 4096, end = (at + len + 4095) / 4096;

	if (at == ino->pending_end && at % 4096 && ino->pending_pages)
		first++;
	if (end > first)
		ino->pending_pages += end - first;
	ino->pending_end = at + len;
}

/* Stage a write.  off < 0 with use_pos: at the logical position. */
static struct outcome stage_write(int fd, const struct iovec *iov, int iovcnt, off_t off,
				  int use_pos, int rwf)
{
	struct ofd *o;
	struct inode_state *ino;
	struct timespec t0;
	uint64_t at, pos, size0 = 0;
	size_t total = 0, total0, left;
	ssize_t lim, result;
	int i, ret, append, unlock, host0 = 0;

	o = lock_writable(fd);
	if (!o)
		return NOT_OURS;
	clock_gettime(CLOCK_REALTIME, &t0);
	ino = o->ino;
	for (i = 0; i < iovcnt; i++) {
		if (iov[i].iov_len > SSIZE_MAX - total) {
			session_unlock();
			return done(-EINVAL);
		}
		total += iov[i].iov_len;
	}
	if ((rwf & RWF_APPEND) && (rwf & RWF_NOAPPEND) && !(rwf & ~RWF_STAGED)) {
		session_unlock();
		return done(-EINVAL); /* the kernel's answer, before it writes */
	}
	/* an aborted commit is reported at the next call on a managed file.
	 * When that is a write, its bytes are not written, so the file is
	 * incomplete: the helper marks it failed, and no commit that includes
	 * it goes ahead, even if the program carries on */
	ret = session_check_commit_error();
	if (ret < 0) {
		ino->err_told = 1;
		if (S.state == SESS_ACTIVE)
			session_send_simple(ACKPT_OP_FAIL, ino);
		session_unlock();
		return done(ret);
	}
	/* after a write error the helper drops the file's later data: fail
	 * every later write rather than report success without it */
	ret = session_check_error_sticky(ino);
	if (ret < 0) {
		session_unlock();
		return done(ret);
	}
	cuda_probe_late(total);
	if (!use_pos && off < 0) {
		session_unlock();
		return done(-EINVAL);
	}
	if (UNLIKELY(!ino->shared) && registry_shared(ino->reg_idx))
		ino->shared = 1;
	if (ino->shared || (rwf & ~RWF_STAGED)) {
		ret = shared_write(fd, iov, iovcnt, off, use_pos, rwf);
		stall_end(&t0);
		session_unlock();
		return done(ret);
	}
	/* Linux appends even for pwrite on an O_APPEND description, unless
	 * RWF_NOAPPEND; RWF_APPEND appends for this call */
	append = (o->append && !(rwf & RWF_NOAPPEND)) || (rwf & RWF_APPEND);
	inode_size_refresh(ino);
	at = append ? ino->size : use_pos ? o->pos : (uint64_t)off;
	lim = write_limits(fd, at, total);
	if (lim < 0) {
		session_unlock();
		return done(lim);
	}
	total = total0 = (size_t)lim;
	if (!total) {
		/* as the kernel: no bytes, so no new position, size or mtime,
		 * even past the end or on an O_APPEND description */
		stall_end(&t0);
		session_unlock();
		return done(0);
	}
	pos = at;
	left = total;
	if (!inode_writes_pending(ino))
		ino->pending_pages = 0;
	/*
	 * A large write copies with the lock dropped (stage.c): hold the
	 * description, as the kernel holds the file, so another thread's
	 * close queues the file's CLOSE only after it; and take the range now,
	 * so that another thread's write, lseek or append meanwhile comes
	 * after this one, as with the kernel's position lock.
	 */
	unlock = S.state == SESS_ACTIVE && total >= UNLOCKED_MIN && !ino->commit_final;
	if (unlock) {
		ofd_pin(o);
		size0 = ino->size;
		if (at + total > ino->size)
			ino->size = at + total;
		if (use_pos) {
			o->pos = at + total;
			o->pos_lazy = 1;
		}
	}
	if (S.state == SESS_ACTIVE) {
		for (i = 0; i < iovcnt && left; i++) {
			size_t len = iov[i].iov_len < left ? iov[i].iov_len : left, staged;

			if (!len)
				continue;
			int device = cuda_is_device(iov[i].iov_base);

			if (i == 0)
				host0 = !device;
			ret = session_stage(ino, iov[i].iov_base, len, pos, device, unlock, &staged);
			if (ret == 1) {
				/* the kernel took part of it (written through) */
				pos += staged;
				total = (size_t)(pos - at);
				break;
			}
			if (ret == -EFAULT) {
				/* a bad buffer: the bytes before it, or EFAULT */
				pos += staged;
				total = (size_t)(pos - at);
				if (!total) {
					result = -EFAULT;
					goto out;
				}
				break;
			}
			if (ret < 0 && S.state != SESS_DEAD) {
				result = ret;
				goto out;
			}
			if (ret < 0) {
				/* helper died mid-write: the rest goes straight to the file */
				ssize_t n = real.pwrite(ino->shadow_fd, iov[i].iov_base, len, (off_t)pos);

				if (n < 0) {
					result = -errno;
					goto out;
				}
			}
			pos += len;
			left -= len;
		}
	} else {
		struct iovec cut[IOV_MAX];
		ssize_t n;
		int k = 0;

		for (i = 0; i < iovcnt && left && k < IOV_MAX; i++) {
			cut[k] = iov[i];
			if (cut[k].iov_len > left)
				cut[k].iov_len = left;
			left -= cut[k++].iov_len;
		}
		n = real.pwritev(ino->shadow_fd, cut, k, (off_t)at);
		if (n < 0) {
			session_unlock();
			return done(-errno);
		}
		total = (size_t)n;
	}
	result = (ssize_t)total;
out:
	if (unlock) {
		/* cut short (a bad page; an error, which moves nothing): give
		 * back what was not written, unless another thread has moved
		 * on from it */
		uint64_t kept = result < 0 ? 0 : total;

		if (use_pos && o->pos == at + total0)
			o->pos = at + kept;
		if (ino->size == at + total0 && kept < total0)
			ino->size = size0 > at + kept ? size0 : at + kept;
	} else if (result >= 0) {
		if (at + total > ino->size)
			ino->size = at + total;
		if (use_pos) {
			o->pos = at + total;
			o->pos_lazy = 1;
		}
	}
	if (result >= 0) {
		ino->mtime = stall_end(&t0);
		note_pages(ino, at, (uint64_t)result);
		/* host bytes just staged are readable (a device buffer's are
		 * not); bytes the kernel took need no settling at the close */
		if (at == 0 && result >= 4 && iov[0].iov_len >= 4 && host0)
			ino->elf = !memcmp(iov[0].iov_base, "\177ELF", 4);
	} else {
		stall_end(&t0);
	}
	if (unlock)
		ofd_unpin(o);
	session_unlock();
	return done(result);
}

/*
 * A write to a regular file is one system call to a signal handler: it
 * runs before the write or after all of it, never in the middle (where it
 * would find the lock held, a half-staged write, or exit() with part of
 * the data).  So asynchronous signals wait until the write is staged.
 * Faults raised by the copy itself stay deliverable.
 */
struct outcome managed_write(int fd, const struct iovec *iov, int iovcnt, off_t off, int use_pos,
			     int rwf)
{
	sigset_t all, old;
	struct outcome r;

	if (LIKELY(sig_holding())) {
		/* no system call: signals.c holds what arrives meanwhile */
		sig_hold();
		r = stage_write(fd, iov, iovcnt, off, use_pos, rwf);
		sig_release();
		return r;
	}
	async_signals(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	r = stage_write(fd, iov, iovcnt, off, use_pos, rwf);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return r;
}

struct outcome managed_lseek(int fd, off_t off, int whence)
{
	struct ofd *o;
	off_t base, r;

	if (session_lock() < 0)
		return NOT_OURS;
	o = fd_peek(fd);
	if (o && o->ino && !o->writable && whence != SEEK_SET && whence != SEEK_CUR) {
		/* a reader asking where the end or the data is: the writes first */
		o = drain_fd_locked(fd);
		session_unlock();
		return NOT_OURS; /* the kernel answers, now that it knows */
	}
	if (!o || !o->ino || !o->writable) {
		session_unlock();
		return NOT_OURS;
	}
	if (UNLIKELY(!o->ino->shared) && registry_shared(o->ino->reg_idx))
		o->ino->shared = 1;
	if (o->ino->shared) {
		o = drain_fd_locked(fd);
		if (o)
			registry_wait(o->ino->dev, o->ino->ino);
		if (!o) {
			session_unlock();
			return done(-EBADF);
		}
		ofd_pos_to_kernel(fd, o);
		r = real.lseek(fd, off, whence);
		if (r < 0)
			r = -errno;
		else
			o->pos = (uint64_t)r;
		session_unlock();
		return done(r);
	}
	switch (whence) {
	case SEEK_SET: base = 0; break;
	case SEEK_CUR: base = (off_t)o->pos; break;
	case SEEK_END:
		inode_size_refresh(o->ino);
		base = (off_t)o->ino->size;
		break;
	default:
		/* SEEK_DATA/SEEK_HOLE look at the real file: make it real first */
		o = drain_fd_locked(fd);
		if (!o) {
			session_unlock();
			return done(-EBADF);
		}
		ofd_pos_to_kernel(fd, o);
		r = real.lseek(fd, off, whence);
		if (r < 0) {
			r = -errno;
		} else {
			o->pos = (uint64_t)r;
		}
		session_unlock();
		return done(r);
	}
	if ((off > 0 && base > INT64_MAX - off) || base + off < 0) {
		session_unlock();
		return done(-EINVAL);
	}
	if (base + off > LSEEK_PROBE_MIN) {
		/* past 1 TiB the filesystem's largest offset may refuse it: the
		 * kernel's lseek says so, and where it accepts, the kernel's
		 * offset is ours at once */
		r = real.lseek(fd, base + off, SEEK_SET);
		if (r < 0) {
			r = -errno;
			session_unlock();
			return done(r);
		}
		o->pos = (uint64_t)r;
		o->pos_lazy = 0;
		session_unlock();
		return done(r);
	}
	o->pos = (uint64_t)(base + off);
	o->pos_lazy = 1;
	session_unlock();
	return done((off_t)o->pos);
}

/* Make everything written to fd's file real, and the kernel's offset
 * ours, before a pass-through op. */
int managed_drain_fd(int fd)
{
	if (!fd_peek(fd) || session_lock() < 0)
		return 0;
	ofd_pos_to_kernel(fd, drain_fd_locked(fd));
	session_unlock();
	return 0;
}

/* After a pass-through op changed the file: take position and size from the kernel. */
/*
 * The kernel wrote into fd for the program (sendfile, copy_file_range,
 * splice): take its offset and size, and tell the helper the file is dirty,
 * so that its next fsync, close or barrier covers those bytes too (and an
 * upload sees a written file).
 */
void managed_kernel_wrote(int fd)
{
	struct ofd *o;

	managed_resync(fd);
	if (!fd_peek(fd) || session_lock() < 0)
		return;
	o = fd_peek(fd);
	if (o && o->ino && S.state == SESS_ACTIVE)
		session_send_dirty(o->ino);
	session_unlock();
}

void managed_resync(int fd)
{
	struct ofd *o;
	struct stat st;

	if (!fd_peek(fd) || session_lock() < 0)
		return;
	o = fd_peek(fd);
	if (o && o->ino && o->writable) { /* a reader's offset and size are the kernel's */
		/* the op was positional if our offset is still ahead of the
		 * kernel's (anything that moves it synced it first) */
		off_t p = o->pos_lazy ? -1 : real.lseek(fd, 0, SEEK_CUR);

		if (p >= 0)
			o->pos = (uint64_t)p;
		if (real.fstat(fd, &st) == 0)
			o->ino->size = (uint64_t)st.st_size;
	}
	session_unlock();
}
