/*
 * Process boundaries and raw syscalls.  Before an exec that keeps a managed
 * descriptor open (no FD_CLOEXEC), that file is drained so the new image
 * (shell redirection, a subprocess given the fd) writes after our data.
 * syscall() dispatches the numbers that reach files through libc's
 * syscall(3) instead of the named wrappers.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>
#include <sys/uio.h>

#include "shim.h"

int shim_openat2(int dirfd, const char *path, void *how, size_t size);

static void exec_prepare(void)
{
	int saved = errno;

	/* a reader's descriptor goes to the new image, whose reads no
	 * wrapper of ours may see: other processes' staged work first */
	watch_wait_all(1);
	if (S.state != SESS_ACTIVE)
		return;
	if (!session_is_owner()) {
		/* vfork child sharing our memory: it may only wait, never lock */
		files_share_vfork(-1);
		errno = saved;
		return;
	}
	cookies_flush_all();
	settle_closed_executables();
	if (files_any_inherited_open()) {
		uint64_t commit = files_commit_inherited_markers();

		files_share(0);
		session_sync_all(0, 0);
		if (commit)
			session_wait_commit(commit, 0);
	}
	errno = saved;
}

/*
 * posix_spawn's file actions run in the child inside glibc, where no
 * wrapper sees them: one may dup any of our descriptors onto the child's
 * stdout, or open a file we still have staged data for with O_TRUNC.  So
 * with file actions every managed description becomes shared and all
 * staged data is written out first.
 */
static void spawn_prepare(const posix_spawn_file_actions_t *fa)
{
	int saved = errno;

	watch_wait_all(0); /* as exec_prepare; file actions may dup any of them */
	if (S.state != SESS_ACTIVE || !session_is_owner())
		return;
	if (!fa) {
		exec_prepare();
		return;
	}
	cookies_flush_all();
	files_share(1);
	settle_closed_executables();
	session_wait(S.seq, 0, 0);
	errno = saved;
}

ACKPT_EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
	ENSURE_REAL();
	exec_prepare();
	return real.execve(path, argv, envp);
}

ACKPT_EXPORT int execv(const char *path, char *const argv[])
{
	extern char **environ;

	return execve(path, argv, environ);
}

ACKPT_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
	ENSURE_REAL();
	exec_prepare();
	return real.execvpe(file, argv, envp);
}

ACKPT_EXPORT int execvp(const char *file, char *const argv[])
{
	extern char **environ;

	return execvpe(file, argv, environ);
}

ACKPT_EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
	ENSURE_REAL();
	exec_prepare();
	return real.fexecve(fd, argv, envp);
}

/* execl* are variadic wrappers around execve inside glibc (not
 * interposable), so rebuild argv and go through ours. */
static char **collect_args(const char *arg0, va_list ap, char ***envp_out)
{
	va_list cp;
	size_t n = 1, i;
	char **argv;

	va_copy(cp, ap);
	while (va_arg(cp, char *))
		n++;
	va_end(cp);
	argv = malloc((n + 1) * sizeof(*argv));
	if (!argv)
		return NULL;
	argv[0] = (char *)arg0;
	for (i = 1; i < n; i++)
		argv[i] = va_arg(ap, char *);
	argv[n] = NULL;
	if (envp_out) {
		(void)va_arg(ap, char *); /* the terminating NULL */
		*envp_out = va_arg(ap, char **);
	}
	return argv;
}

ACKPT_EXPORT int execl(const char *path, const char *arg0, ...)
{
	extern char **environ;
	va_list ap;
	char **argv;
	int r;

	va_start(ap, arg0);
	argv = collect_args(arg0, ap, NULL);
	va_end(ap);
	if (!argv)
		return -1;
	r = execve(path, argv, environ);
	free(argv);
	return r;
}

ACKPT_EXPORT int execlp(const char *file, const char *arg0, ...)
{
	extern char **environ;
	va_list ap;
	char **argv;
	int r;

	va_start(ap, arg0);
	argv = collect_args(arg0, ap, NULL);
	va_end(ap);
	if (!argv)
		return -1;
	r = execvpe(file, argv, environ);
	free(argv);
	return r;
}

ACKPT_EXPORT int execle(const char *path, const char *arg0, ...)
{
	va_list ap;
	char **argv, **envp = NULL;
	int r;

	va_start(ap, arg0);
	argv = collect_args(arg0, ap, &envp);
	va_end(ap);
	if (!argv)
		return -1;
	r = execve(path, argv, envp);
	free(argv);
	return r;
}

ACKPT_EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
			     const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
	ENSURE_REAL();
	spawn_prepare(fa);
	return real.posix_spawn(pid, path, fa, attr, argv, envp);
}

ACKPT_EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
			      const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
	ENSURE_REAL();
	spawn_prepare(fa);
	return real.posix_spawnp(pid, file, fa, attr, argv, envp);
}

/* RLIMIT_FSIZE plus one, cached for the write path; 0: read it again. */
static _Atomic uint64_t fsize_limit;

uint64_t rlimit_fsize(void)
{
	uint64_t v = atomic_load_explicit(&fsize_limit, memory_order_relaxed);
	struct rlimit rl;

	if (LIKELY(v))
		return v - 1;
	v = UINT64_MAX - 1;
	if (getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
	    rl.rlim_cur < UINT64_MAX - 1)
		v = (uint64_t)rl.rlim_cur;
	atomic_store_explicit(&fsize_limit, v + 1, memory_order_relaxed);
	return v;
}

ACKPT_EXPORT int setrlimit(__rlimit_resource_t res, const struct rlimit *rl)
{
	int r;

	ENSURE_REAL();
	r = real.setrlimit(res, rl);
	atomic_store(&fsize_limit, 0); /* after: a write meanwhile would cache the old one */
	return r;
}

ACKPT_EXPORT int setrlimit64(__rlimit_resource_t res, const struct rlimit64 *rl)
{
	return setrlimit(res, (const struct rlimit *)rl);
}

ACKPT_EXPORT int prlimit(pid_t pid, __rlimit_resource_t res, const struct rlimit *nl,
			 struct rlimit *ol)
{
	int r;

	ENSURE_REAL();
	r = real.prlimit(pid, res, nl, ol);
	atomic_store(&fsize_limit, 0);
	return r;
}

ACKPT_EXPORT int prlimit64(pid_t pid, __rlimit_resource_t res, const struct rlimit64 *nl,
			   struct rlimit64 *ol)
{
	return prlimit(pid, res, (const struct rlimit *)nl, (struct rlimit *)ol);
}

/* A managed descriptor sent over SCM_RIGHTS becomes shared with the receiver. */
ACKPT_EXPORT ssize_t sendmsg(int sock, const struct msghdr *msg, int flags)
{
	struct cmsghdr *c;

	ENSURE_REAL();
	if (LIKELY(!msg || !msg->msg_controllen) || !C.enabled)
		return real.sendmsg(sock, msg, flags);
	for (c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR((struct msghdr *)msg, c)) {
		size_t i, n;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < n; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			/* a reader's descriptor: the receiver's reads may be no
			 * wrapper's, so other processes' staged work first */
			if (UNLIKELY(fd_is_watched(fd)))
				watch_wait(fd);
			if (fd_peek(fd) && S.state == SESS_ACTIVE && session_is_owner()) {
				int saved = errno;

				files_share_fd(fd);
				errno = saved;
			}
		}
	}
	return real.sendmsg(sock, msg, flags);
}

ACKPT_EXPORT long syscall(long nr, ...)
{
	long a[6];
	va_list ap;
	int i;

	va_start(ap, nr);
	for (i = 0; i < 6; i++)
		a[i] = va_arg(ap, long);
	va_end(ap);
	ENSURE_REAL();
	if (!C.enabled || !real.syscall)
		goto raw;
	switch (nr) {
	case SYS_write:
		return write((int)a[0], (const void *)a[1], (size_t)a[2]);
	case SYS_pwrite64:
		return pwrite((int)a[0], (const void *)a[1], (size_t)a[2], (off_t)a[3]);
	case SYS_openat:
		return openat((int)a[0], (const char *)a[1], (int)a[2], (mode_t)a[3]);
	case SYS_openat2:
		return shim_openat2((int)a[0], (const char *)a[1], (void *)a[2], (size_t)a[3]);
	case SYS_statx:
		return statx((int)a[0], (const char *)a[1], (int)a[2], (unsigned)a[3],
			     (struct statx *)a[4]);
	/* the kernel's struct stat is glibc's on x86-64 and arm64 */
	case SYS_fstat:
		return fstat((int)a[0], (struct stat *)a[1]);
	case SYS_newfstatat:
		return fstatat((int)a[0], (const char *)a[1], (struct stat *)a[2], (int)a[3]);
#ifdef SYS_stat
	case SYS_stat:
		return stat((const char *)a[0], (struct stat *)a[1]);
	case SYS_lstat:
		return lstat((const char *)a[0], (struct stat *)a[1]);
#endif
	case SYS_copy_file_range:
		return copy_file_range((int)a[0], (off_t *)a[1], (int)a[2], (off_t *)a[3],
				       (size_t)a[4], (unsigned)a[5]);
	case SYS_close_range:
		return close_range((unsigned)a[0], (unsigned)a[1], (int)a[2]);
	/* descriptor changes we must see, or a reused number would route a new
	 * file's writes into an old managed file */
	case SYS_close:
		return close((int)a[0]);
	case SYS_dup:
		return dup((int)a[0]);
	case SYS_dup2:
		return dup2((int)a[0], (int)a[1]);
	case SYS_dup3:
		return dup3((int)a[0], (int)a[1], (int)a[2]);
	case SYS_fcntl:
		return fcntl((int)a[0], (int)a[1], a[2]);
	case SYS_writev:
		return writev((int)a[0], (const struct iovec *)a[1], (int)a[2]);
	case SYS_pwritev:
		return pwritev((int)a[0], (const struct iovec *)a[1], (int)a[2], (off_t)a[3]);
	case SYS_lseek:
		return lseek((int)a[0], (off_t)a[1], (int)a[2]);
	/* reads wait for staged writes, and some use the offset */
	case SYS_read:
		return read((int)a[0], (void *)a[1], (size_t)a[2]);
	case SYS_readv:
		return readv((int)a[0], (const struct iovec *)a[1], (int)a[2]);
	case SYS_pread64:
		return pread((int)a[0], (void *)a[1], (size_t)a[2], (off_t)a[3]);
	case SYS_sendfile:
		return sendfile((int)a[0], (int)a[1], (off_t *)a[2], (size_t)a[3]);
	case SYS_splice:
		return splice((int)a[0], (off_t *)a[1], (int)a[2], (off_t *)a[3], (size_t)a[4],
			      (unsigned)a[5]);
	case SYS_fsync:
		return fsync((int)a[0]);
	case SYS_fdatasync:
		return fdatasync((int)a[0]);
	case SYS_ftruncate:
		return ftruncate((int)a[0], (off_t)a[1]);
	default:
		break;
	}
raw:
	if (real.syscall)
		return real.syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
	{
		long r;
		register long r10 __asm__("r10") = a[3];
		register long r8 __asm__("r8") = a[4];
		register long r9 __asm__("r9") = a[5];

		__asm__ volatile("syscall" : "=a"(r)
				 : "a"(nr), "D"(a[0]), "S"(a[1]), "d"(a[2]), "r"(r10), "r"(r8), "r"(r9)
				 : "rcx", "r11", "memory");
		if (r < 0 && r > -4096) {
			errno = (int)-r;
			return -1;
		}
		return r;
	}
}
