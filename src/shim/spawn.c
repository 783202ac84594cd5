/*
 * Starting the helper: find its binary, and run it as an orphan through a
 * clone()d child with no exit signal, so the program never sees a child or
 * a SIGCHLD of ours.  The session (session.c) hands it its channels.
 */
#include <dlfcn.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "config.h"
#include "shim.h"

extern char **environ;

int fd_move_high(int fd)
{
	int nfd = real.fcntl(fd, F_DUPFD_CLOEXEC, 1000);

	if (nfd < 0)
		return fd;
	real.close(fd);
	return nfd;
}

static int find_helper(char *out, size_t n)
{
	const char *env = getenv("ACKPT_HELPER");
	static const char *const rel[] = { "ackpt-helper", "../helper/ackpt-helper",
					   "../libexec/ackpt-helper", NULL };
	Dl_info info;
	int i;

	if (env && *env) {
		snprintf(out, n, "%s", env);
		return real.access(out, X_OK) == 0 ? 0 : -ENOENT;
	}
	if (dladdr((void *)find_helper, &info) && info.dli_fname) {
		char dir[PATH_MAX];
		char *slash;

		snprintf(dir, sizeof(dir), "%s", info.dli_fname);
		slash = strrchr(dir, '/');
		if (slash) {
			*slash = 0;
			for (i = 0; rel[i]; i++) {
				snprintf(out, n, "%s/%s", dir, rel[i]);
				if (real.access(out, X_OK) == 0)
					return 0;
			}
		}
	}
	snprintf(out, n, "%s/ackpt-helper", ACKPT_LIBEXECDIR);
	return real.access(out, X_OK) == 0 ? 0 : -ENOENT;
}

struct spawn_args {
	const char *path;
	char **argv, **envp;
	int sock, memfd;
	sigset_t mask;          /* the program's mask, restored before exec */
	char *stack2;           /* top of the second child's stack */
};

/*
 * The child of spawn_helper, in our memory until it execs (CLONE_VM |
 * CLONE_VFORK): raw system calls only, no wrapper, no lock, no allocation.
 * Its signal handlers are its own copy: reset the program's to default
 * first, so no handler of the program's ever runs in it.
 */
static int spawn_child(void *arg)
{
	struct spawn_args *a = arg;
	struct kernel_sigaction { void *handler; unsigned long flags; void *restorer;
				  uint64_t mask; } sa, dfl = { 0 };
	long sock, memfd;
	int sig;

	for (sig = 1; sig < 65; sig++) {
		if (sig == SIGKILL || sig == SIGSTOP)
			continue;
		if (real.syscall(SYS_rt_sigaction, sig, NULL, &sa, 8) == 0 &&
		    sa.handler != SIG_DFL && sa.handler != SIG_IGN)
			real.syscall(SYS_rt_sigaction, sig, &dfl, NULL, 8);
	}
	/* via fresh numbers, so neither can clobber the other */
	sock = real.syscall(SYS_fcntl, a->sock, F_DUPFD, 10);
	memfd = real.syscall(SYS_fcntl, a->memfd, F_DUPFD, 10);
	if (sock < 0 || memfd < 0 ||
	    real.syscall(SYS_dup2, sock, ACKPT_HELPER_SOCK_FD) < 0 ||
	    real.syscall(SYS_dup2, memfd, ACKPT_HELPER_SHM_FD) < 0)
		real.syscall(SYS_exit, 127);
	real.syscall(SYS_close, sock);
	real.syscall(SYS_close, memfd);
	real.syscall(SYS_rt_sigprocmask, SIG_SETMASK, &a->mask, NULL, 8);
	real.syscall(SYS_execve, a->path, a->argv, a->envp);
	real.syscall(SYS_exit, 127);
	return 127;
}

/*
 * Our direct child: starts the one that execs (an exec gives a process
 * SIGCHLD as its exit signal again, so that one must not be ours), and
 * exits with no exit signal.  Both share our memory until the exec, so the
 * program's page tables are never copied.
 */
static int spawn_middle(void *arg)
{
	struct spawn_args *a = arg;
	long pid = clone(spawn_child, a->stack2, CLONE_VM | CLONE_VFORK | SIGCHLD, a);
	int st = 0;

	if (pid < 0)
		real.syscall(SYS_exit, 126);
	/* it has exec'd or died: if it died, say how */
	if (real.syscall(SYS_wait4, pid, &st, WNOHANG, NULL) == pid)
		real.syscall(SYS_exit, WIFEXITED(st) ? WEXITSTATUS(st) : 125);
	real.syscall(SYS_exit, 0);
	return 0;
}

/*
 * Start the helper.  Our child has no exit signal (clone, not posix_spawn)
 * and exits at once, and the helper's process is its orphan: a program with
 * a SIGCHLD handler never sees either, and its waitpid(-1) cannot reap
 * them.  We reap our child here with __WCLONE.
 */
int spawn_helper(int helper_sock)
{
	struct spawn_args a = { .sock = helper_sock, .memfd = S.memfd };
	const size_t stack_size = 128 * 1024;
	char path[PATH_MAX];
	char *argv[] = { path, NULL };
	sigset_t all;
	char **envp, *stack;
	size_t n = 0, i, j = 0;
	pid_t pid;
	int ret, st, saved;

	ret = find_helper(path, sizeof(path));
	if (ret < 0) {
		alog(L_WARN, "ackpt-helper not found (set ACKPT_HELPER); writes stay synchronous");
		return ret;
	}
	while (environ && environ[n])
		n++;
	envp = calloc(n + 2, sizeof(*envp));
	stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK,
		     -1, 0);
	if (!envp || stack == MAP_FAILED) {
		free(envp);
		if (stack != MAP_FAILED)
			munmap(stack, stack_size);
		return -ENOMEM;
	}
	/* the helper takes its configuration from the control block
	 * (config_for_helper), and is not itself under ackpt */
	for (i = 0; i < n; i++)
		if (strncmp(environ[i], "LD_PRELOAD=", 11))
			envp[j++] = environ[i];
	a.path = path;
	a.argv = argv;
	a.envp = envp;
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &a.mask);
	saved = errno;
	a.stack2 = stack + stack_size / 2;
	pid = clone(spawn_middle, stack + stack_size, CLONE_VM | CLONE_VFORK, &a);
	ret = pid < 0 ? errno : 0;
	errno = saved;
	pthread_sigmask(SIG_SETMASK, &a.mask, NULL);
	munmap(stack, stack_size);
	free(envp);
	if (ret) {
		alog(L_WARN, "cannot start %s: %s; writes stay synchronous", path, strerror(ret));
		return -ret;
	}
	while (waitpid(pid, &st, __WCLONE) < 0 && errno == EINTR)
		;
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		alog(L_WARN, "cannot start %s (status %d); writes stay synchronous", path, st);
		return -ECHILD;
	}
	return 0;
}
