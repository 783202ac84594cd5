/*
 * faultfs: a passthrough FUSE file system over a backing directory that can
 * throttle write bandwidth and inject real errors (test helper of the crash
 * and fault suite, tests/faults/backpressure.py).
 *
 *   faultfs -f -s -o backing=DIR[,throttle=BYTES_PER_S][,fault=OP:N:ERR:MODE][,directio] MNT
 *
 *   backing=DIR   directory whose tree is exposed at MNT (required)
 *   throttle=B    write bandwidth in bytes/s (0 = unlimited): each write is
 *                 delayed so that the running total never exceeds B per second
 *   fault=SPEC    OP:N:ERR:MODE, OP write|fsync|rename, N >= 1, ERR EIO|ENOSPC|
 *                 EACCES (or a number), MODE once|sticky: the N-th OP fails with
 *                 ERR (once), or the N-th and every later one (sticky)
 *   fsyncdelay=MS every fsync/fsyncdir takes at least MS milliseconds (slow flushes)
 *   nolink        link(2) fails with EPERM (a file system without hard links)
 *   trace         log every counted op (op, count, path, injected errno) on stderr
 *   directio      every file is opened with direct_io (the kernel page cache
 *                 is bypassed; by default O_DIRECT opens are honoured by the
 *                 kernel's FUSE direct I/O path, and O_DIRECT is not passed to
 *                 the backing file)
 *
 * "fsync" counts both fsync and fsyncdir requests.  Counters include failed
 * calls.
 *
 * Control file MNT/.faultfs (not listed by readdir; its writes are not
 * counted): writing one line reconfigures, reading returns the counters.
 *   reset                      counters to 0, fault off
 *   fault OP N ERR once|sticky counters to 0, arm the fault
 *   off                        disarm (counters kept)
 *   throttle B                 set the bandwidth
 *   nolink 0|1                 hard links supported / failing with EPERM
 *   fsyncdelay MS              set the fsync delay
 *   mark TEXT                  print TEXT on stderr (to delimit a trace)
 * read: "writes=W fsyncs=F renames=R hits=H bytes=B throttle=T nolink=L fault=SPEC\n"
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define CTL_NAME "/.faultfs"
#define CTL_FH   ((uint64_t)-2)

enum { OP_NONE = 0, OP_WRITE, OP_FSYNC, OP_RENAME };

static struct {
	char *backing;
	char *throttle_s;
	char *fault_s;
	int fsyncdelay;
	int directio;
	int nolink;
	int trace;
} opt;

static const struct fuse_opt fs_opts[] = {
	{ "backing=%s", offsetof(typeof(opt), backing), 0 },
	{ "throttle=%s", offsetof(typeof(opt), throttle_s), 0 },
	{ "fault=%s", offsetof(typeof(opt), fault_s), 0 },
	{ "fsyncdelay=%d", offsetof(typeof(opt), fsyncdelay), 0 },
	{ "directio", offsetof(typeof(opt), directio), 1 },
	{ "nolink", offsetof(typeof(opt), nolink), 1 },
	{ "trace", offsetof(typeof(opt), trace), 1 },
	FUSE_OPT_END
};

static int base_fd = -1;
#define NPATH 65536
static char *fdpath[NPATH];  /* trace: the path each backing fd was opened under */

static void set_fdpath(int fd, const char *path)
{
	if (opt.trace && fd >= 0 && fd < NPATH) {
		free(fdpath[fd]);
		fdpath[fd] = path ? strdup(path) : NULL;
	}
}

static const char *fd_path(const char *path, struct fuse_file_info *fi)
{
	if (path || !fi)
		return path;
	if ((int64_t)fi->fh >= 0 && fi->fh < NPATH)
		return fdpath[fi->fh];
	return NULL;
}
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t bw;            /* bytes/s, 0 = unlimited */
static double next_free;       /* throttle: virtual time the device is free */
static uint64_t cnt[4], hits, bytes;
static int f_op, f_err, f_sticky;
static uint64_t f_nth;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *op_name(int op)
{
	return op == OP_WRITE ? "write" : op == OP_FSYNC ? "fsync" : op == OP_RENAME ? "rename" : "none";
}

static int parse_err(const char *s)
{
	if (!strcmp(s, "EIO")) return EIO;
	if (!strcmp(s, "ENOSPC")) return ENOSPC;
	if (!strcmp(s, "EACCES")) return EACCES;
	if (!strcmp(s, "EDQUOT")) return EDQUOT;
	if (!strcmp(s, "EROFS")) return EROFS;
	return atoi(s) > 0 ? atoi(s) : -1;
}

static int parse_op(const char *s)
{
	if (!strcmp(s, "write")) return OP_WRITE;
	if (!strcmp(s, "fsync")) return OP_FSYNC;
	if (!strcmp(s, "rename")) return OP_RENAME;
	return -1;
}

/* "OP N ERR MODE" with ':' or ' ' separators; returns 0 or -EINVAL. Caller holds mu. */
static int arm(const char *spec)
{
	char op[32], err[32], mode[32];
	unsigned long long n;
	char buf[160];
	int o, e;

	snprintf(buf, sizeof(buf), "%s", spec);
	for (char *p = buf; *p; p++)
		if (*p == ':')
			*p = ' ';
	if (sscanf(buf, "%31s %llu %31s %31s", op, &n, err, mode) != 4)
		return -EINVAL;
	o = parse_op(op);
	e = parse_err(err);
	if (o < 0 || e <= 0 || n == 0 || (strcmp(mode, "once") && strcmp(mode, "sticky")))
		return -EINVAL;
	memset(cnt, 0, sizeof(cnt));
	hits = 0;
	bytes = 0;
	f_op = o;
	f_nth = n;
	f_err = e;
	f_sticky = !strcmp(mode, "sticky");
	return 0;
}

/* Count one op; the errno to fail it with, or 0. */
static int count_path(int op, const char *path)
{
	uint64_t n;
	int r = 0;

	pthread_mutex_lock(&mu);
	n = ++cnt[op];
	if (f_op == op && (n == f_nth || (f_sticky && n > f_nth))) {
		r = f_err;
		hits++;
	}
	pthread_mutex_unlock(&mu);
	if (op == OP_FSYNC && __atomic_load_n(&opt.fsyncdelay, __ATOMIC_RELAXED) > 0) {
		int ms = __atomic_load_n(&opt.fsyncdelay, __ATOMIC_RELAXED);
		struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

		nanosleep(&ts, NULL);
	}
	if (opt.trace)
		fprintf(stderr, "faultfs: %s #%llu %s%s%s\n", op_name(op), (unsigned long long)n,
			path ? path : "(unlinked)", r ? " -> injected " : "", r ? strerror(r) : "");
	return r;
}

static void throttle(size_t len)
{
	double wake;

	pthread_mutex_lock(&mu);
	if (!bw) {
		pthread_mutex_unlock(&mu);
		return;
	}
	wake = now_s();
	if (next_free > wake)
		wake = next_free;
	wake += (double)len / bw;
	next_free = wake;
	pthread_mutex_unlock(&mu);
	for (;;) {
		double left = wake - now_s();
		struct timespec ts;

		if (left <= 0)
			break;
		ts.tv_sec = (time_t)left;
		ts.tv_nsec = (long)((left - ts.tv_sec) * 1e9);
		nanosleep(&ts, NULL);
	}
}

static const char *rel(const char *path)
{
	while (*path == '/')
		path++;
	return *path ? path : ".";
}

static int is_ctl(const char *path)
{
	return path && !strcmp(path, CTL_NAME);
}

static void *fs_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	(void)conn;
	cfg->use_ino = 1;
	cfg->hard_remove = 1;     /* no .fuse_hidden* files when an open file is unlinked */
	cfg->nullpath_ok = 1;
	cfg->entry_timeout = 0;
	cfg->attr_timeout = 0;
	cfg->negative_timeout = 0;
	cfg->direct_io = opt.directio;
	return NULL;
}

static int fs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	if (is_ctl(path) || (fi && fi->fh == CTL_FH)) {
		memset(st, 0, sizeof(*st));
		st->st_mode = S_IFREG | 0666;
		st->st_nlink = 1;
		return 0;
	}
	if (fi && (fstat((int)fi->fh, st) == 0))
		return 0;
	if (!path)
		return -EBADF;
	return fstatat(base_fd, rel(path), st, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}

static int fs_access(const char *path, int mask)
{
	if (is_ctl(path))
		return 0;
	return faccessat(base_fd, rel(path), mask, 0) < 0 ? -errno : 0;
}

static int fs_readlink(const char *path, char *buf, size_t size)
{
	ssize_t n = readlinkat(base_fd, rel(path), buf, size - 1);

	if (n < 0)
		return -errno;
	buf[n] = 0;
	return 0;
}

struct dirh {
	DIR *dp;
};

static int fs_opendir(const char *path, struct fuse_file_info *fi)
{
	int fd = openat(base_fd, rel(path), O_RDONLY | O_DIRECTORY);
	struct dirh *d;

	if (fd < 0)
		return -errno;
	d = calloc(1, sizeof(*d));
	if (!d || !(d->dp = fdopendir(fd))) {
		int e = d ? errno : ENOMEM;

		close(fd);
		free(d);
		return -e;
	}
	fi->fh = (uintptr_t)d;
	return 0;
}

static int fs_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t off,
		      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	struct dirh *d = (struct dirh *)(uintptr_t)fi->fh;
	struct dirent *de;

	(void)path;
	(void)flags;
	(void)off;
	rewinddir(d->dp);
	while ((de = readdir(d->dp))) {
		struct stat st;

		memset(&st, 0, sizeof(st));
		st.st_ino = de->d_ino;
		st.st_mode = (mode_t)de->d_type << 12;
		if (filler(buf, de->d_name, &st, 0, 0))
			break;
	}
	return 0;
}

static int fs_releasedir(const char *path, struct fuse_file_info *fi)
{
	struct dirh *d = (struct dirh *)(uintptr_t)fi->fh;

	(void)path;
	closedir(d->dp);
	free(d);
	return 0;
}

static int fs_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi)
{
	struct dirh *d = (struct dirh *)(uintptr_t)fi->fh;
	int e = count_path(OP_FSYNC, path ? path : "(directory)");

	if (e)
		return -e;
	if ((datasync ? fdatasync(dirfd(d->dp)) : fsync(dirfd(d->dp))) < 0)
		return -errno;
	return 0;
}

static int fs_mkdir(const char *path, mode_t mode)
{
	return mkdirat(base_fd, rel(path), mode) < 0 ? -errno : 0;
}

static int fs_unlink(const char *path)
{
	return unlinkat(base_fd, rel(path), 0) < 0 ? -errno : 0;
}

static int fs_rmdir(const char *path)
{
	return unlinkat(base_fd, rel(path), AT_REMOVEDIR) < 0 ? -errno : 0;
}

static int fs_symlink(const char *target, const char *path)
{
	return symlinkat(target, base_fd, rel(path)) < 0 ? -errno : 0;
}

static int fs_link(const char *from, const char *to)
{
	if (__atomic_load_n(&opt.nolink, __ATOMIC_RELAXED))
		return -EPERM;
	return linkat(base_fd, rel(from), base_fd, rel(to), 0) < 0 ? -errno : 0;
}

static int fs_rename(const char *from, const char *to, unsigned int flags)
{
	int e = count_path(OP_RENAME, to);

	if (e)
		return -e;
	if (syscall(SYS_renameat2, base_fd, rel(from), base_fd, rel(to), flags) < 0)
		return -errno;
	return 0;
}

static int fs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	if (fi)
		return fchmod((int)fi->fh, mode) < 0 ? -errno : 0;
	return fchmodat(base_fd, rel(path), mode, 0) < 0 ? -errno : 0;
}

static int fs_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
	if (fi)
		return fchown((int)fi->fh, uid, gid) < 0 ? -errno : 0;
	return fchownat(base_fd, rel(path), uid, gid, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}

static int fs_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	int fd, r;

	if (is_ctl(path) || (fi && fi->fh == CTL_FH))
		return 0;
	if (fi)
		return ftruncate((int)fi->fh, size) < 0 ? -errno : 0;
	fd = openat(base_fd, rel(path), O_WRONLY);
	if (fd < 0)
		return -errno;
	r = ftruncate(fd, size) < 0 ? -errno : 0;
	close(fd);
	return r;
}

static int fs_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
	if (fi)
		return futimens((int)fi->fh, tv) < 0 ? -errno : 0;
	return utimensat(base_fd, rel(path), tv, AT_SYMLINK_NOFOLLOW) < 0 ? -errno : 0;
}

static int backing_flags(int flags)
{
	return flags & ~(O_DIRECT | O_NOFOLLOW);
}

/* open (or create) the backing file of path for the file handle fi */
static int open_backing(const char *path, int flags, mode_t mode, struct fuse_file_info *fi)
{
	int fd = openat(base_fd, rel(path), backing_flags(fi->flags) | flags, mode);

	if (fd < 0)
		return -errno;
	fi->fh = (uint64_t)fd;
	set_fdpath(fd, path);
	if (opt.directio)
		fi->direct_io = 1;
	return 0;
}

static int fs_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	if (is_ctl(path))
		return -EEXIST;
	return open_backing(path, O_CREAT, mode, fi);
}

static int fs_open(const char *path, struct fuse_file_info *fi)
{
	if (is_ctl(path)) {
		fi->fh = CTL_FH;
		fi->direct_io = 1;
		fi->nonseekable = 0;
		return 0;
	}
	return open_backing(path, 0, 0, fi);
}

static int fs_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	ssize_t n;

	(void)path;
	if (fi->fh == CTL_FH) {
		char s[512];
		int len;

		pthread_mutex_lock(&mu);
		len = snprintf(s, sizeof(s),
			       "writes=%llu fsyncs=%llu renames=%llu hits=%llu bytes=%llu throttle=%llu "
			       "nolink=%d fault=%s:%llu:%d:%s\n",
			       (unsigned long long)cnt[OP_WRITE], (unsigned long long)cnt[OP_FSYNC],
			       (unsigned long long)cnt[OP_RENAME], (unsigned long long)hits,
			       (unsigned long long)bytes, (unsigned long long)bw, opt.nolink, op_name(f_op),
			       (unsigned long long)f_nth, f_err, f_sticky ? "sticky" : "once");
		pthread_mutex_unlock(&mu);
		if (off >= len)
			return 0;
		if ((size_t)(len - off) < size)
			size = len - off;
		memcpy(buf, s + off, size);
		return (int)size;
	}
	n = pread((int)fi->fh, buf, size, off);
	return n < 0 ? -errno : (int)n;
}

static int ctl_write(const char *buf, size_t size)
{
	char line[256];
	unsigned long long v;
	int r = 0;

	if (size >= sizeof(line))
		return -EINVAL;
	memcpy(line, buf, size);
	line[size] = 0;
	line[strcspn(line, "\n")] = 0;
	pthread_mutex_lock(&mu);
	if (!strcmp(line, "reset")) {
		memset(cnt, 0, sizeof(cnt));
		hits = 0;
		bytes = 0;
		f_op = OP_NONE;
	} else if (!strcmp(line, "off")) {
		f_op = OP_NONE;
	} else if (!strncmp(line, "fault ", 6)) {
		r = arm(line + 6);
	} else if (!strncmp(line, "mark ", 5)) {
		fprintf(stderr, "faultfs: mark %s\n", line + 5);
	} else if (sscanf(line, "fsyncdelay %llu", &v) == 1) {
		__atomic_store_n(&opt.fsyncdelay, (int)v, __ATOMIC_RELAXED);
	} else if (sscanf(line, "nolink %llu", &v) == 1) {
		__atomic_store_n(&opt.nolink, v ? 1 : 0, __ATOMIC_RELAXED);
	} else if (sscanf(line, "throttle %llu", &v) == 1) {
		bw = v;
		next_free = 0;
	} else {
		r = -EINVAL;
	}
	pthread_mutex_unlock(&mu);
	return r < 0 ? r : (int)size;
}

static int fs_write(const char *path, const char *buf, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	ssize_t n;
	int e;

	(void)path;
	if (fi->fh == CTL_FH)
		return ctl_write(buf, size);
	e = count_path(OP_WRITE, fd_path(path, fi));
	if (e)
		return -e;
	throttle(size);
	n = pwrite((int)fi->fh, buf, size, off);
	if (n < 0)
		return -errno;
	pthread_mutex_lock(&mu);
	bytes += (uint64_t)n;
	pthread_mutex_unlock(&mu);
	return (int)n;
}

static int fs_statfs(const char *path, struct statvfs *st)
{
	(void)path;
	return fstatvfs(base_fd, st) < 0 ? -errno : 0;
}

static int fs_flush(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	(void)fi;
	return 0;
}

static int fs_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	if (fi->fh != CTL_FH)
		close((int)fi->fh);
	return 0;
}

static int fs_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	int e;

	(void)path;
	if (fi->fh == CTL_FH)
		return 0;
	e = count_path(OP_FSYNC, fd_path(path, fi));
	if (e)
		return -e;
	if ((datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh)) < 0)
		return -errno;
	return 0;
}

static int fs_fallocate(const char *path, int mode, off_t off, off_t len, struct fuse_file_info *fi)
{
	(void)path;
	if (fi->fh == CTL_FH)
		return -EOPNOTSUPP;
	return fallocate((int)fi->fh, mode, off, len) < 0 ? -errno : 0;
}

static const struct fuse_operations ops = {
	.init = fs_init,
	.getattr = fs_getattr,
	.access = fs_access,
	.readlink = fs_readlink,
	.opendir = fs_opendir,
	.readdir = fs_readdir,
	.releasedir = fs_releasedir,
	.fsyncdir = fs_fsyncdir,
	.mkdir = fs_mkdir,
	.unlink = fs_unlink,
	.rmdir = fs_rmdir,
	.symlink = fs_symlink,
	.link = fs_link,
	.rename = fs_rename,
	.chmod = fs_chmod,
	.chown = fs_chown,
	.truncate = fs_truncate,
	.utimens = fs_utimens,
	.create = fs_create,
	.open = fs_open,
	.read = fs_read,
	.write = fs_write,
	.statfs = fs_statfs,
	.flush = fs_flush,
	.release = fs_release,
	.fsync = fs_fsync,
	.fallocate = fs_fallocate,
};

int main(int argc, char *argv[])
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	int r;

	if (fuse_opt_parse(&args, &opt, fs_opts, NULL) == -1)
		return 2;
	if (!opt.backing) {
		fprintf(stderr, "faultfs: -o backing=DIR is required\n");
		return 2;
	}
	base_fd = open(opt.backing, O_RDONLY | O_DIRECTORY);
	if (base_fd < 0) {
		perror(opt.backing);
		return 2;
	}
	if (opt.throttle_s)
		bw = strtoull(opt.throttle_s, NULL, 10);
	if (opt.fault_s && arm(opt.fault_s) < 0) {
		fprintf(stderr, "faultfs: bad fault=%s (OP:N:ERR:once|sticky)\n", opt.fault_s);
		return 2;
	}
	umask(0);
	r = fuse_main(args.argc, args.argv, &ops, NULL);
	fuse_opt_free_args(&args);
	return r;
}
