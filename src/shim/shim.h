/*
 * Internal interfaces of libackpt.so.  The shim owns interception, the
 * file table (per open file description and per inode), staging into the
 * shared arena and the session with its helper.  Internal functions return
 * -errno; only the libc-facing wrappers in posix.c, stdio.c, stat.c,
 * sync.c, namespace.c and process.c turn that into -1/errno.
 */
#ifndef ACKPT_SHIM_H
#define ACKPT_SHIM_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <fts.h>
#include <ftw.h>
#include <glob.h>
#include <sys/resource.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "path.h"
#include "proto.h"
#include "util.h"

#define ACKPT_EXPORT __attribute__((visibility("default")))
#define FD_MAX 65536
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

struct statx;
struct aiocb;
struct sigevent;
struct utimbuf;
struct timeval;

/* ---- the real functions, resolved with dlsym(RTLD_NEXT) ---- */
#define ACKPT_REAL_FUNCS(X) \
	X(int, open, (const char *, int, ...)) \
	X(int, openat, (int, const char *, int, ...)) \
	X(ssize_t, write, (int, const void *, size_t)) \
	X(ssize_t, writev, (int, const struct iovec *, int)) \
	X(ssize_t, pwrite, (int, const void *, size_t, off_t)) \
	X(ssize_t, pwritev, (int, const struct iovec *, int, off_t)) \
	X(ssize_t, pwritev2, (int, const struct iovec *, int, off_t, int)) \
	X(ssize_t, read, (int, void *, size_t)) \
	X(ssize_t, readv, (int, const struct iovec *, int)) \
	X(ssize_t, pread, (int, void *, size_t, off_t)) \
	X(ssize_t, preadv, (int, const struct iovec *, int, off_t)) \
	X(ssize_t, preadv2, (int, const struct iovec *, int, off_t, int)) \
	X(off_t, lseek, (int, off_t, int)) \
	X(int, close, (int)) \
	X(int, close_range, (unsigned, unsigned, int)) \
	X(void, closefrom, (int)) \
	X(int, dup, (int)) \
	X(int, dup2, (int, int)) \
	X(int, dup3, (int, int, int)) \
	X(int, fcntl, (int, int, ...)) \
	X(int, fcntl64, (int, int, ...)) \
	X(int, lockf, (int, int, off_t)) \
	X(int, fsync, (int)) \
	X(int, fdatasync, (int)) \
	X(int, sync_file_range, (int, off_t, off_t, unsigned)) \
	X(int, syncfs, (int)) \
	X(void, sync, (void)) \
	X(int, msync, (void *, size_t, int)) \
	X(int, ftruncate, (int, off_t)) \
	X(int, truncate, (const char *, off_t)) \
	X(int, fallocate, (int, int, off_t, off_t)) \
	X(int, posix_fallocate, (int, off_t, off_t)) \
	X(int, stat, (const char *, struct stat *)) \
	X(int, fstat, (int, struct stat *)) \
	X(int, lstat, (const char *, struct stat *)) \
	X(int, fstatat, (int, const char *, struct stat *, int)) \
	X(int, statx, (int, const char *, int, unsigned, struct statx *)) \
	X(int, __xstat, (int, const char *, struct stat *)) \
	X(int, __fxstat, (int, int, struct stat *)) \
	X(int, __lxstat, (int, const char *, struct stat *)) \
	X(int, __fxstatat, (int, int, const char *, struct stat *, int)) \
	X(void *, mmap, (void *, size_t, int, int, int, off_t)) \
	X(ssize_t, copy_file_range, (int, off_t *, int, off_t *, size_t, unsigned)) \
	X(ssize_t, sendfile, (int, int, off_t *, size_t)) \
	X(ssize_t, splice, (int, off_t *, int, off_t *, size_t, unsigned)) \
	X(int, rename, (const char *, const char *)) \
	X(int, renameat, (int, const char *, int, const char *)) \
	X(int, renameat2, (int, const char *, int, const char *, unsigned)) \
	X(int, link, (const char *, const char *)) \
	X(int, linkat, (int, const char *, int, const char *, int)) \
	X(int, unlink, (const char *)) \
	X(int, unlinkat, (int, const char *, int)) \
	X(int, remove, (const char *)) \
	X(DIR *, opendir, (const char *)) \
	X(int, rmdir, (const char *)) \
	X(DIR *, fdopendir, (int)) \
	X(struct dirent *, readdir, (DIR *)) \
	X(struct dirent64 *, readdir64, (DIR *)) \
	X(int, closedir, (DIR *)) \
	X(FILE *, fopen, (const char *, const char *)) \
	X(FILE *, fdopen, (int, const char *)) \
	X(FILE *, freopen, (const char *, const char *, FILE *)) \
	X(int, fclose, (FILE *)) \
	X(int, fcloseall, (void)) \
	X(int, fflush, (FILE *)) \
	X(int, execve, (const char *, char *const[], char *const[])) \
	X(int, execvpe, (const char *, char *const[], char *const[])) \
	X(int, fexecve, (int, char *const[], char *const[])) \
	X(int, posix_spawn, (pid_t *, const char *, const posix_spawn_file_actions_t *, \
			     const posix_spawnattr_t *, char *const[], char *const[])) \
	X(int, posix_spawnp, (pid_t *, const char *, const posix_spawn_file_actions_t *, \
			      const posix_spawnattr_t *, char *const[], char *const[])) \
	X(void, _exit, (int)) \
	X(void, _Exit, (int)) \
	X(long, syscall, (long, ...)) \
	X(ssize_t, sendmsg, (int, const struct msghdr *, int)) \
	X(int, sigaction, (int, const struct sigaction *, struct sigaction *)) \
	X(sighandler_t, signal, (int, sighandler_t)) \
	X(int, aio_write, (struct aiocb *)) \
	X(int, aio_read, (struct aiocb *)) \
	X(int, lio_listio, (int, struct aiocb *const[], int, struct sigevent *)) \
	X(int, setrlimit, (__rlimit_resource_t, const struct rlimit *)) \
	X(int, prlimit, (pid_t, __rlimit_resource_t, const struct rlimit *, struct rlimit *)) \
	X(int, access, (const char *, int)) \
	X(int, faccessat, (int, const char *, int, int)) \
	X(int, euidaccess, (const char *, int)) \
	X(int, chmod, (const char *, mode_t)) \
	X(int, fchmodat, (int, const char *, mode_t, int)) \
	X(int, chown, (const char *, uid_t, gid_t)) \
	X(int, lchown, (const char *, uid_t, gid_t)) \
	X(int, fchownat, (int, const char *, uid_t, gid_t, int)) \
	X(int, utime, (const char *, const struct utimbuf *)) \
	X(int, utimes, (const char *, const struct timeval *)) \
	X(int, lutimes, (const char *, const struct timeval *)) \
	X(int, utimensat, (int, const char *, const struct timespec *, int)) \
	X(ssize_t, getxattr, (const char *, const char *, void *, size_t)) \
	X(ssize_t, lgetxattr, (const char *, const char *, void *, size_t)) \
	X(int, setxattr, (const char *, const char *, const void *, size_t, int)) \
	X(int, lsetxattr, (const char *, const char *, const void *, size_t, int)) \
	X(ssize_t, listxattr, (const char *, char *, size_t)) \
	X(ssize_t, llistxattr, (const char *, char *, size_t)) \
	X(int, removexattr, (const char *, const char *)) \
	X(int, lremovexattr, (const char *, const char *)) \
	X(int, futimens, (int, const struct timespec *)) \
	X(int, futimes, (int, const struct timeval *)) \
	X(int, fchmod, (int, mode_t)) \
	X(int, fchown, (int, uid_t, gid_t)) \
	X(int, fsetxattr, (int, const char *, const void *, size_t, int)) \
	X(int, fremovexattr, (int, const char *)) \
	X(int, mkdir, (const char *, mode_t)) \
	X(int, mkdirat, (int, const char *, mode_t)) \
	X(int, mknod, (const char *, mode_t, dev_t)) \
	X(int, mknodat, (int, const char *, mode_t, dev_t)) \
	X(int, mkfifo, (const char *, mode_t)) \
	X(int, mkfifoat, (int, const char *, mode_t)) \
	X(int, symlink, (const char *, const char *)) \
	X(int, symlinkat, (const char *, int, const char *)) \
	X(ssize_t, readlink, (const char *, char *, size_t)) \
	X(ssize_t, readlinkat, (int, const char *, char *, size_t)) \
	X(char *, realpath, (const char *, char *)) \
	X(char *, canonicalize_file_name, (const char *)) \
	X(int, chdir, (const char *)) \
	X(int, statfs, (const char *, struct statfs *)) \
	X(int, statvfs, (const char *, struct statvfs *)) \
	X(int, inotify_add_watch, (int, const char *, uint32_t)) \
	X(int, scandir, (const char *, struct dirent ***, int (*)(const struct dirent *), \
			 int (*)(const struct dirent **, const struct dirent **))) \
	X(int, scandir64, (const char *, struct dirent64 ***, int (*)(const struct dirent64 *), \
			   int (*)(const struct dirent64 **, const struct dirent64 **))) \
	X(int, scandirat, (int, const char *, struct dirent ***, int (*)(const struct dirent *), \
			   int (*)(const struct dirent **, const struct dirent **))) \
	X(int, glob, (const char *, int, int (*)(const char *, int), glob_t *)) \
	X(int, glob64, (const char *, int, int (*)(const char *, int), glob64_t *)) \
	X(int, nftw, (const char *, int (*)(const char *, const struct stat *, int, struct FTW *), \
		      int, int)) \
	X(int, ftw, (const char *, int (*)(const char *, const struct stat *, int), int)) \
	X(FTSENT *, fts_read, (FTS *)) \
	X(FTSENT *, fts_children, (FTS *, int))

struct ackpt_real {
#define X(ret, name, args) ret(*name) args;
	ACKPT_REAL_FUNCS(X)
#undef X
};

extern struct ackpt_real real;
extern atomic_int real_ready;
void real_resolve(void);
#define ENSURE_REAL() do { if (UNLIKELY(!atomic_load_explicit(&real_ready, memory_order_acquire))) real_resolve(); } while (0)

/*
 * What a managed operation did: not ours (the wrapper calls the real
 * function instead), or done, with its result: a count, a descriptor, 0, or
 * -errno.  Wrappers turn a done result into libc's -1/errno in one place,
 * finish().
 */
struct outcome {
	int ours;
	long ret;
};
#define NOT_OURS ((struct outcome){ 0, 0 })

static inline struct outcome done(long ret)
{
	return (struct outcome){ 1, ret };
}

/* A done result as libc returns it; errno is the caller's on success. */
static inline long finish(long ret, int saved_errno)
{
	if (ret < 0) {
		errno = (int)-ret;
		return -1;
	}
	errno = saved_errno;
	return ret;
}

/* ---- configuration (config.c) ---- */
struct ackpt_config {
	int enabled;
	int log_level;           /* 0 error .. 3 debug */
	uint64_t staging;        /* ACKPT_STAGING; 0: the default, config_staging() */
	unsigned local_ranks;    /* the job's ranks on this node (launchers' variables) */
	int commit_sync;
	char **metadata;         /* metadata (commit marker) name patterns */
	int nmetadata;
	int multi_rank;          /* a job with a global barrier */
	int multi_node;          /* ... that may span nodes (job.c) */
	int io_pool;             /* ACKPT_IO=pool */
	int direct;              /* ACKPT_DIRECT (default 1) */
	int write_through;       /* ACKPT_WRITE_THROUGH: a write staging cannot take at
				  * memcpy speed goes through the kernel (default 1,
				  * 0 under ACKPT_FAULT or ACKPT_TEST_DELAY_MS) */
	int extend;              /* a write may extend the last ring record (oplog.c);
				  * 0 under ACKPT_FAULT, read when the session starts
				  * (a rank may set it just before, as the helper
				  * inherits it then) */
	int copy_threads;        /* ACKPT_COPY_THREADS: workers that split a large staging
				  * copy with the writing thread (pcopy.c) */
	int test_delay_ms;       /* ACKPT_TEST_DELAY_MS for this rank */
	int test_skip_dirfsync;  /* ACKPT_TEST_SKIP_DIRFSYNC */
	int coord_host;          /* this process's helper hosts the coordinator */
	int early_start;         /* ACKPT_EARLY_START: -1 auto, 0 off, 1 on */
	double barrier_timeout;  /* seconds */
	char **roots;            /* canonical directories, or globs */
	int *root_is_glob;
	int nroots;
	const char *upload_url;  /* ACKPT_UPLOAD, or NULL */
	uint64_t upload_part;    /* ACKPT_UPLOAD_PART_SIZE, 0: default */
	unsigned upload_conc;    /* ACKPT_UPLOAD_CONCURRENCY, 0: default */
};
extern struct ackpt_config C;

void config_load(void);
uint64_t config_staging(void); /* at session start */
/* a small file (/proc, /sys) read whole without the wrappers; -1 if unreadable */
ssize_t read_small(const char *path, char *buf, size_t size);
struct ackpt_helper_config;
void config_for_helper(struct ackpt_helper_config *h); /* at session start */
int path_is_managed(const char *canon);
int name_is_metadata(const char *canon);

/* ---- logging: library code below the wrappers does not print ---- */
void alog(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
enum { L_ERROR, L_WARN, L_INFO, L_DEBUG };

/*
 * Ownership.  Everything below is guarded by S.lock (session_lock), except
 * what is marked:
 *   [atomic]   read without the lock (fast paths, vfork children, waiters);
 *   [fixed]    set once before the state is published, read-only after;
 *   [vfork]    also stored by a vfork child while the parent is suspended.
 * Functions marked LOCKED must be called with S.lock held; those marked
 * DROPS may release and retake it (session_unlock_wait): every pointer into
 * the tables (struct ofd, struct inode_state) looked up before the call is
 * stale after it and must be looked up again.
 */
#define LOCKED /* caller holds S.lock */
#define DROPS  /* caller holds S.lock; may drop and retake it */

/* ---- file table (files.c) ---- */
struct inode_state {
	uint64_t dev, ino;       /* [fixed] */
	uint32_t slot;           /* [fixed] the helper's file slot */
	int shadow_fd;           /* our descriptor of it (moves on dup2 onto it) */
	uint64_t size;           /* logical size */
	struct timespec mtime;   /* when the last write was staged */
	uint64_t last_seq;       /* last op touching this inode */
	uint64_t write_seq;      /* its last WRITE: until the helper has done it, the
				  * kernel's size lags ours (inode_size_refresh) */
	int inflight;            /* writes copying into staging without the lock */
	uint64_t pending_pages;  /* 4 KiB pages written since its writes were last all
				  * in the file: the blocks stat adds to the kernel's */
	uint64_t pending_end;    /* where the last of them ended */
	int elf;                 /* its first bytes are an ELF header: a library a
				  * loader may map once it is closed (close settles it) */
	uint64_t dirty_seq;      /* its last DIRTY (written through the kernel) */
	uint64_t staged_hi;      /* end of the furthest WRITE staged for it: writing
				  * through the kernel at or past it overtakes nothing */
	int nofd;                /* open file descriptions referencing it */
	int writers;             /* ... of which opened for writing */
	uint32_t reported_err_seq;
	int err_told;            /* the program got an error for this file: later failures
				  * of its in-flight writes are the same loss, told */
	int reg_idx;             /* [fixed] its node registry entry, or -1 */
	int closing;
	int retired;             /* its CLOSE is complete but readers remain: out of the
				  * table, slot released; freed with the last reader */
	int superseded;          /* reopened for writing while its CLOSE was pending: a
				  * new inode state took over (inode_find skips this one),
				  * this one stays for its pending ops */
	uint64_t after;          /* a reopen: the previous slot's last op, which the
				  * helper completes before any op of this one */
	int shared;              /* [vfork] a description of it may be in another
				  * process: its writes go through the kernel */
	uint64_t close_seq;
	char *path;
	char *commit_final;      /* metadata written under a hidden name: its final name */
	struct inode_state *next;
};

struct ofd {
	int refs;                /* descriptors pointing at it, and pins */
	int pins;                /* writes under way without the lock (stage_write) */
	struct inode_state *ino; /* [fixed] NULL for a description the helper never saw */
	uint64_t pos;
	int pos_lazy;            /* the kernel's offset is behind pos (set by a staged
				  * write or lseek): ofd_pos_to_kernel before anything
				  * that uses the kernel's (docs/DESIGN.md 3.21) */
	int append;
	int writable;            /* [fixed] */
	FILE *cookie;            /* our fopencookie stream over it, if any */
};

/* [atomic] stored under the lock, loaded anywhere */
extern _Atomic(struct ofd *) fdtab[FD_MAX];
extern atomic_uchar fd_protected[FD_MAX];
extern atomic_uchar fd_watched[FD_MAX];
void watch_clear(int fd);
void watch_wait(int fd);
void watch_copy(int from, int to); /* a dup of a watched descriptor */
void watch_wait_all(int inherited); /* before descriptors leave for another image */
static inline int fd_is_watched(int fd)
{
	return (unsigned)fd < FD_MAX &&
	       atomic_load_explicit(&fd_watched[fd], memory_order_relaxed);
}

static inline struct ofd *fd_peek(int fd)
{
	if ((unsigned)fd >= FD_MAX)
		return NULL;
	return atomic_load_explicit(&fdtab[fd], memory_order_acquire);
}

/* ---- session (session.c) ---- */
enum { SESS_NONE = 0, SESS_ACTIVE, SESS_DEAD, SESS_FAILED };

struct session {
	pthread_mutex_t lock;
	int state;               /* [atomic] read unlocked as a hint, changed locked */
	int starting;            /* [atomic] session_start is under way (its channels may
				  * exist while state is still SESS_NONE) */
	int start_unlocked;      /* an early start waits for its helper with the lock
				  * dropped: session_ensure waits on started */
	pthread_cond_t started;  /* signalled (with the lock) when that wait ends */
	pid_t owner;             /* [fixed] per process (set again in a fork child) */
	int memfd, sock;         /* [fixed] while ACTIVE (moved only on dup2 onto them) */
	struct ackpt_shm *shm;   /* [fixed] while ACTIVE; its fields: see proto.h */
	char *arena;             /* [fixed] while ACTIVE */
	uint64_t arena_size;     /* [fixed] */
	uint64_t max_chunk;      /* [fixed] */
	uint64_t head;           /* arena allocation position (monotonic) */
	uint64_t seq;            /* last assigned op seq */
	/* the last record in the ring, while it is a WRITE that a continuing
	 * write may extend (oplog.c); ext_at == UINT64_MAX: none */
	uint64_t ext_at, ext_off_end, ext_arena_end, ext_bytes;
	uint32_t ext_file;
	pid_t helper_pid;        /* [fixed] while ACTIVE */
	int ninodes;             /* [atomic] read unlocked as "anything tracked?" */
	uint64_t commits_requested;
	uint64_t commit_failures_seen; /* reported to the program */
	uint64_t dead_commit_failures;
	/* stats */
	uint64_t bytes_staged, files;
	uint64_t bytes_through;  /* written through the kernel: staging could not take them at once */
	int copying;              /* [atomic] staging copies under way outside the lock */
	uint64_t copies_overlapped; /* [atomic] ... that began while another was under way */
	/* with the arena full: bytes and stall time written through, and
	 * staged after waiting for room (stage.c, through_is_faster) */
	uint64_t through_bytes, through_ns, waited_bytes, waited_ns;
	uint64_t stall_ns;
};
extern struct session S;
extern __thread int tls_busy;            /* this thread holds S.lock */

/*
 * The session is split by job: session.c (lock, start, waits, fork, exit),
 * spawn.c (starting the helper), stage.c (arena and staging copy),
 * oplog.c (numbering, sending and logging ops; replay when the helper
 * dies), commit.c (commits as the program sees them).
 */
int session_lock(void);        /* returns 0 if we may use managed state */
void session_unlock(void);
DROPS void session_unlock_wait(uint64_t seq); /* until seq is done */
/* The session's shared memory for a reader without the lock, or NULL where
 * no session is up: S.shm is set before the state turns ACTIVE (a release
 * store) and unmapped only by a start that failed, whose state never
 * turned, or in a fork child. */
static inline struct ackpt_shm *session_shm(void)
{
	int st = __atomic_load_n(&S.state, __ATOMIC_ACQUIRE);

	return st == SESS_ACTIVE || st == SESS_DEAD ? S.shm : NULL;
}
int session_ensure(void);      /* start arena+helper; -errno on failure */
/* a chunk this large is copied with the session lock dropped (stage.c) */
#define UNLOCKED_MIN (256u << 10)
LOCKED int session_stage(struct inode_state *ino, const void *buf, size_t len, uint64_t off, int device,
			 int unlock, size_t *staged);
LOCKED int session_send_simple(uint32_t type, struct inode_state *ino);
LOCKED int session_send_dirty(struct inode_state *ino);
LOCKED int session_send_open(struct inode_state *ino, int fd);
LOCKED int session_send_rename(struct inode_state *ino, const char *oldp, const char *newp);
LOCKED int session_send_dirsync(const char *dir);
LOCKED int session_send_commit(struct inode_state *ino, const char *tmp, const char *final, int own_temp,
			uint64_t *commit_id);
int session_wait_commit(uint64_t id, double timeout_s);
uint64_t session_commits_done(void);
uint64_t session_commit_failures(void);
int session_check_commit_error(void);
void session_commit_now(const char *tmp, const char *final, int own_temp);
void files_fsync_all(void);
int session_wait(uint64_t seq, double timeout_s, int progress);
uint64_t session_durable(void);
int session_check_error(struct inode_state *ino);
int session_check_error_sticky(struct inode_state *ino); /* fsync: at every call */
LOCKED void session_reap(void);
int session_sync_all(double timeout_s, int progress);
/* Wait until every upload started by an op <= seq is over (ACKPT_UPLOAD). */
int session_wait_uploads(uint64_t seq, double timeout_s, int progress);
void session_init_once(void);
int session_is_owner(void);
int helper_alive(void);
int helper_gone(void);         /* repairs (replay) when it died; 1 if gone */
int futex_wait_gen(uint32_t old, uint64_t timeout_ns);
void session_bell(void); /* wake a sleeping helper */
int ring_extend(struct inode_state *ino, uint64_t off, uint64_t len, uint64_t pos, uint64_t end);
/* spawn.c */
int fd_move_high(int fd);
int spawn_helper(int helper_sock);
/* stage.c */
void *arena_prefault_main(void *arg);
/* oplog.c */
struct ackpt_op;
LOCKED int send_op(struct ackpt_op *op, const char *paths, size_t plen, int fd,
		   struct inode_state *ino);
LOCKED int send_write_pending(struct ackpt_op *op, struct inode_state *ino, uint64_t *ring_at);
void send_write_filled(struct ackpt_op *op, uint64_t ring_at, uint64_t len);
LOCKED void session_helper_died(void);
LOCKED void oplog_prune(uint64_t durable);
LOCKED void oplog_prune_commits(uint64_t done);
void oplog_reset(void);
void oplog_fork_child(void);
/* commit.c */
int fsync_dir_path(const char *dir);
int commit_fsync_dir(const char *path);

/* files.c: the fd and inode tables, opens, watched readers; write.c: the
 * write path; share.c: descriptions that reach another process; marker.c:
 * markers opened for writing */
LOCKED uint64_t files_marker_commit(struct inode_state *ino);
struct ofd *lock_writable(int fd); /* returns with the lock held, or NULL */
LOCKED struct inode_state *inode_create(int fd, const struct stat *st, const char *canon);
int files_post_open(int fd, int flags, const char *how, int force);
struct outcome files_open_metadata(const char *canon, int flags, mode_t mode);
LOCKED struct inode_state *inode_find(uint64_t dev, uint64_t ino);
DROPS int inode_drain(struct inode_state *ino);
int inode_pending(struct inode_state *ino);
int inode_writes_pending(const struct inode_state *ino);
LOCKED void inode_size_refresh(struct inode_state *ino);
LOCKED void inode_free(struct inode_state *ino);
LOCKED void inode_retire(struct inode_state *ino);
LOCKED struct inode_state *inode_create_after(int fd, const struct stat *st, const char *canon,
					      const struct inode_state *prev);
LOCKED struct inode_state *ofd_inode_now(struct ofd *o);
#define WAIT_OTHERS_ONLY 0x40000000 /* wait_path_pending: not our own inodes */
int wait_path_pending(int dirfd, const char *path, int flags);
int wait_stat_pending(const struct stat *st);
void wait_fd_pending(int fd);
void wait_name_renames(int dirfd, const char *path);
void wait_dir_renames(const char *path, int dirfd);
void settle_closed_stat(const struct stat *st);
void settle_closed_fd(int fd);
void settle_closed_path(int dirfd, const char *path, int flags);
void settle_closed_executables(void);
LOCKED int fd_install(int fd, struct ofd *o);
LOCKED void ofd_unpin(struct ofd *o); /* after ofd_pin, by a write */
LOCKED void ofd_pin(struct ofd *o);
LOCKED int fd_release(int fd); /* drop our state for fd; -errno from pending error */
LOCKED int fd_release_commit(int fd, uint64_t *commit); /* ... and the commit it queued */
struct outcome managed_write(int fd, const struct iovec *iov, int iovcnt, off_t off, int use_pos,
			     int rwf);
uint64_t rlimit_fsize(void);
struct outcome managed_lseek(int fd, off_t off, int whence);
int managed_drain_fd(int fd);
void ofd_pos_to_kernel(int fd, struct ofd *o);
void files_pos_to_kernel(void);
/* /proc/self/fdinfo shows the kernel's offsets: make them ours first */
static inline void note_fdinfo(const char *path)
{
	if (UNLIKELY(S.ninodes && path && !strncmp(path, "/proc/", 6) && strstr(path, "/fdinfo")))
		files_pos_to_kernel();
}
void managed_resync(int fd);
void managed_kernel_wrote(int fd); /* sendfile and the like wrote into fd */
void files_fork_child(void);
int files_any_inherited_open(void);
void files_share(int all);
void files_share_fd(int fd);
void files_share_std(int fd);
void files_share_vfork(int fd);
void files_release_markers(void);
uint64_t files_commit_inherited_markers(void);
void fd_protect(int fd, int on);
void files_relocate_protected(int fd); /* lock held */
/* registry.c */
/* job.c: pending names on other nodes */
int job_multi_node(void);
void job_announce(const char *const *paths, int with_dirs, uint64_t seq, uint64_t commit_id);
void job_names_wait(const char *canon, int as_dir);
void job_fork_child(void);
void job_fd_moved(int from, int to);

void registry_init(void);
int registry_wait(uint64_t dev, uint64_t ino);
int registry_pending(uint64_t dev, uint64_t ino); /* another process's, not durable: 1 */
int registry_name_add(const char *oldp, const char *newp, uint64_t seq, uint64_t commit_id);
void registry_name_del(int idx);
int registry_names_any(void);
void registry_names_wait(const char *canon, int as_dir);
void registry_fork_child(void);
int registry_claim(uint64_t dev, uint64_t ino, pid_t owner);
int registry_any(void);
int registry_shared(int idx);
void registry_note_op(int idx, uint64_t seq);
void cookies_flush_all(void);
uint64_t files_unreported_errors(void);

/* device memory (cuda.c): all no-ops without CUDA headers or a loaded driver */
void cuda_probe(void);
void cuda_session_ready(void);
void cuda_probe_late(size_t len);
void cuda_fork_child(void);
int cuda_is_device(const void *p);
int cuda_copy_to_host(void *dst, const void *src, size_t n);
void cuda_exit(void);
int cuda_state(void);

/* copies from the program's buffers (efault.c) */
void efault_init(void);
/* signals.c: signals held during a write, the program's dispositions */
void sig_init(void);
int sig_holding(void);
void sig_hold(void);
void sig_release(void);
int sig_action(int sig, const struct sigaction *act, struct sigaction *old);
/* sigaction in a vfork child, for a signal whose kernel handler is ours
 * (handler) and whose program disposition is prog */
int sig_action_vfork(int sig, const struct sigaction *act, struct sigaction *old,
		     void (*handler)(int, siginfo_t *, void *), const struct sigaction *prog);
/* every signal but the ones a fault raises (they stay deliverable) */
void async_signals(sigset_t *set);
int efault_copy(void *dst, const void *src, size_t n, size_t *done);
/* pcopy.c: efault_copy, split across worker threads when large */
int stage_copy(void *dst, const void *src, size_t n, size_t *done);
void pcopy_atfork_child(void);

/* namespace (namespace.c) */
int ns_pending_any(void);
int ns_wait_path(const char *canon);
LOCKED void ns_add(const char *oldp, const char *newp, uint64_t seq, uint64_t commit_id);
void ns_wait_commits(void);
void ns_prune(uint64_t durable);
void ns_reset(void);

#endif
