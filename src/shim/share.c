/*
 * Descriptions that reach another process (fork, exec, posix_spawn, a vfork
 * child's dup2, SCM_RIGHTS): their staged data is written out and their
 * writes go through the kernel from then on (docs/DESIGN.md 3.4), and
 * markers whose descriptors survive an exec or the exit are committed.
 */
#include <stdlib.h>
#include <string.h>

#include "shim.h"

static int fd_inheritable(int fd)
{
	int fl = real.fcntl(fd, F_GETFD);

	return fl >= 0 && !(fl & FD_CLOEXEC);
}

int files_any_inherited_open(void)
{
	unsigned i;

	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (o && o->ino && o->writable && fd_inheritable((int)i))
			return 1;
	}
	return 0;
}

/*
 * Some descriptions are about to reach another process: every writable
 * managed one (all), or those an exec keeps open (!all).  Their inodes go
 * through the kernel from now on, and what is staged for them is written
 * out first, so the other process finds the data, size and offset a
 * synchronous run would show it.  Not for a vfork child: files_share_vfork.
 */
void files_share(int all)
{
	uint64_t wait = 0;
	unsigned i;

	if (S.state != SESS_ACTIVE || !S.ninodes || session_lock() < 0)
		return;
	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (!o || !o->ino || (!all && !fd_inheritable((int)i)))
			continue;
		if (!o->writable) {
			/* a reader: the other process reads what is in the file */
			struct inode_state *now = ofd_inode_now(o);

			if (now && now->last_seq > wait)
				wait = now->last_seq;
			continue;
		}
		o->ino->shared = 1;
		ofd_pos_to_kernel((int)i, o);
		if (o->ino->last_seq > wait)
			wait = o->ino->last_seq;
	}
	session_unlock();
	if (wait)
		session_wait(wait, 0, 0);
}

/* Every description's offset to the kernel (someone reads fdinfo). */
void files_pos_to_kernel(void)
{
	unsigned i;

	if (session_lock() < 0)
		return;
	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (o && o->pos_lazy)
			ofd_pos_to_kernel((int)i, o);
	}
	session_unlock();
}

/* One descriptor leaves through SCM_RIGHTS. */
void files_share_fd(int fd)
{
	struct ofd *o;
	uint64_t wait = 0;

	if (!fd_peek(fd) || session_lock() < 0)
		return;
	o = fd_peek(fd);
	if (o && o->ino && o->writable) {
		o->ino->shared = 1;
		ofd_pos_to_kernel(fd, o);
		wait = o->ino->last_seq;
	} else if (o && o->ino && ofd_inode_now(o)) {
		wait = ofd_inode_now(o)->last_seq; /* a reader */
	}
	session_unlock();
	if (wait)
		session_wait(wait, 0, 0);
}

/*
 * A managed description became standard input, output or error (dup2 onto
 * 1, an open into a closed 0): glibc's stdin, stdout and stderr read and
 * write it inside glibc, where no wrapper sees them, at the kernel's
 * offset.  It is shared from now on, as with another process.
 */
void files_share_std(int fd)
{
	if ((unsigned)fd <= 2 && fd_peek(fd))
		files_share_fd(fd);
}

/*
 * In a vfork child (CPython's subprocess), which runs in our memory while
 * the parent is suspended until exec: it may mark and wait, never lock or
 * send.  fd < 0: every description the exec keeps open.
 */
void files_share_vfork(int fd)
{
	unsigned i, lo = fd < 0 ? 0 : (unsigned)fd, hi = fd < 0 ? FD_MAX : (unsigned)fd + 1;
	uint64_t wait = 0;

	if (S.state != SESS_ACTIVE)
		return;
	for (i = lo; i < hi && i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (!o || !o->ino || (fd < 0 && !fd_inheritable((int)i)))
			continue;
		if (!o->writable) {
			struct inode_state *now = ofd_inode_now(o);

			if (now && now->last_seq > wait)
				wait = now->last_seq;
			continue;
		}
		o->ino->shared = 1;
		/* no lock here, but the parent thread that could move the
		 * offset is suspended, and the description is the same */
		ofd_pos_to_kernel((int)i, o);
		if (o->ino->last_seq > wait)
			wait = o->ino->last_seq;
	}
	if (wait)
		session_wait(wait, 0, 0);
}

/*
 * An exec that keeps a marker's descriptor open hands the marker to a new
 * image that knows nothing of it (`exec > latest; exec /bin/echo 7`): no
 * close of ours would ever commit it.  Commit it now, behind the barrier
 * as always, and wait, so the new image writes its bytes into the final
 * name, as in a plain run where the marker exists (empty) before they
 * arrive.  Returns the last commit id to wait for, or 0.
 */
uint64_t files_commit_inherited_markers(void)
{
	uint64_t id = 0, r;
	unsigned i;

	if (S.state == SESS_NONE || S.state == SESS_FAILED || !S.ninodes || session_lock() < 0)
		return 0;
	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (o && o->ino && o->ino->commit_final && fd_inheritable((int)i)) {
			r = files_marker_commit(o->ino);
			if (r > id)
				id = r;
		}
	}
	session_unlock();
	return id;
}

/*
 * A commit marker still open when the process exits would otherwise never
 * be committed: release every descriptor of one, as the kernel's close at
 * exit would, so its commit is queued before the exit drain.
 */
void files_release_markers(void)
{
	unsigned i;

	if (S.state == SESS_NONE || S.state == SESS_FAILED || !S.ninodes || session_lock() < 0)
		return;
	for (i = 0; i < FD_MAX; i++) {
		struct ofd *o = atomic_load_explicit(&fdtab[i], memory_order_acquire);

		if (o && o->ino && o->ino->commit_final)
			fd_release((int)i);
	}
	session_unlock();
}
