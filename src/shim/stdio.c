/*
 * stdio: glibc writes FILE streams through internal __write, out of
 * LD_PRELOAD's reach.  For a managed path we hand back an fopencookie
 * stream whose callbacks call our wrappers, and set its _fileno so that
 * fileno() works and libstdc++'s ::write(fileno(f)) lands here too.
 * Streams we made are listed so the destructor can flush them before the
 * final drain (glibc flushes unclosed streams only after destructors).
 */
#include <stdlib.h>
#include <string.h>

#include "shim.h"

struct cookie {
	int fd;
	FILE *f;
	struct cookie *next;
	char buf[];              /* the stream's buffer, where glibc's would be
				  * smaller than BUFSIZ (cookie_stream) */
};

static pthread_mutex_t cookie_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cookie *cookies;

static ssize_t ck_read(void *c, char *buf, size_t n)
{
	return read(((struct cookie *)c)->fd, buf, n);
}

static ssize_t ck_write(void *c, const char *buf, size_t n)
{
	size_t done = 0;

	while (done < n) {
		ssize_t r = write(((struct cookie *)c)->fd, buf + done, n - done);

		if (r < 0)
			return done ? (ssize_t)done : -1;
		done += (size_t)r;
	}
	return (ssize_t)done;
}

static int ck_seek(void *c, off64_t *pos, int whence)
{
	off_t r = lseek(((struct cookie *)c)->fd, *pos, whence);

	if (r < 0)
		return -1;
	*pos = r;
	return 0;
}

static int ck_close(void *c)
{
	struct cookie *ck = c, **pp;
	int r;

	pthread_mutex_lock(&cookie_lock);
	for (pp = &cookies; *pp; pp = &(*pp)->next)
		if (*pp == ck) {
			*pp = ck->next;
			break;
		}
	pthread_mutex_unlock(&cookie_lock);
	r = close(ck->fd);
	free(ck);
	return r;
}

static int mode_flags(const char *mode, int *flags)
{
	int f;
	const char *p;

	switch (mode[0]) {
	case 'r': f = O_RDONLY; break;
	case 'w': f = O_WRONLY | O_CREAT | O_TRUNC; break;
	case 'a': f = O_WRONLY | O_CREAT | O_APPEND; break;
	default: return -EINVAL;
	}
	for (p = mode + 1; *p && *p != ','; p++) {
		if (*p == '+')
			f = (f & ~O_ACCMODE) | O_RDWR;
		else if (*p == 'x')
			f |= O_EXCL;
		else if (*p == 'e')
			f |= O_CLOEXEC;
	}
	*flags = f;
	return 0;
}

/* Wrap a managed fd in a cookie stream; NULL (errno set) on failure. */
static FILE *cookie_stream(int fd, const char *mode)
{
	cookie_io_functions_t io = { ck_read, ck_write, ck_seek, ck_close };
	struct stat st;
	size_t bufsize = 0;
	struct cookie *ck;
	FILE *f;

	/* glibc buffers a file's stream in st_blksize bytes where that is
	 * below BUFSIZ (ext4: 4096), and a cookie stream always in BUFSIZ:
	 * the same buffer as glibc's, so as much reaches the file before a
	 * flush.  It lives as long as the cookie, which outlives its use. */
	if (real.fstat(fd, &st) == 0 && st.st_blksize > 0 && st.st_blksize < BUFSIZ)
		bufsize = (size_t)st.st_blksize;
	ck = calloc(1, sizeof(*ck) + bufsize);
	if (!ck)
		return NULL;
	ck->fd = fd;
	f = fopencookie(ck, mode, io);
	if (!f) {
		free(ck);
		return NULL;
	}
	if (bufsize)
		setvbuf(f, ck->buf, _IOFBF, bufsize);
	f->_fileno = fd;
	ck->f = f;
	pthread_mutex_lock(&cookie_lock);
	ck->next = cookies;
	cookies = ck;
	pthread_mutex_unlock(&cookie_lock);
	return f;
}

void cookies_flush_all(void)
{
	struct cookie *c;
	FILE *list[256];
	int n = 0, i;

	pthread_mutex_lock(&cookie_lock);
	for (c = cookies; c && n < 256; c = c->next)
		list[n++] = c->f;
	pthread_mutex_unlock(&cookie_lock);
	for (i = 0; i < n; i++)
		real.fflush(list[i]);
}

static int is_cookie(FILE *f)
{
	struct cookie *c;
	int yes = 0;

	pthread_mutex_lock(&cookie_lock);
	for (c = cookies; c; c = c->next)
		if (c->f == f) {
			yes = 1;
			break;
		}
	pthread_mutex_unlock(&cookie_lock);
	return yes;
}

static FILE *do_fopen(const char *path, const char *mode, int is64)
{
	int flags, fd, saved = errno;
	FILE *f;

	ENSURE_REAL();
	if (!C.enabled || !mode || mode_flags(mode, &flags) < 0 || tls_busy)
		return real.fopen(path, mode);
	if ((flags & O_ACCMODE) == O_RDONLY) {
		note_fdinfo(path);
		/* readers only need to wait for pending work */
		if (ns_pending_any() || S.ninodes || registry_any())
			wait_path_pending(AT_FDCWD, path, 0);
		errno = saved;
		return real.fopen(path, mode);
	}
	fd = open(path, flags, 0666);
	if (fd < 0)
		return NULL;
	if (!fd_peek(fd)) {
		/* not ours: an ordinary stream over the descriptor we opened */
		f = real.fdopen(fd, mode);
		if (!f) {
			int e = errno;

			real.close(fd);
			errno = e;
		}
		return f;
	}
	f = cookie_stream(fd, mode);
	if (!f) {
		int e = errno;

		close(fd);
		errno = e;
		return NULL;
	}
	/* glibc's fopen "a" starts at the end; "a+" at 0, as the descriptor */
	if (mode[0] == 'a' && !strchr(mode, '+'))
		lseek(fd, 0, SEEK_END);
	errno = saved;
	(void)is64;
	return f;
}

ACKPT_EXPORT FILE *fopen(const char *path, const char *mode)
{
	return do_fopen(path, mode, 0);
}

ACKPT_EXPORT FILE *fopen64(const char *path, const char *mode)
{
	return do_fopen(path, mode, 1);
}

ACKPT_EXPORT FILE *fdopen(int fd, const char *mode)
{
	struct ofd *o;
	FILE *f;
	int fl;

	ENSURE_REAL();
	o = fd_peek(fd);
	if (!o || !o->writable) {
		/* the stream reads inside glibc, where no wrapper waits
		 * (np.fromfile of a file just written) */
		wait_fd_pending(fd);
		return real.fdopen(fd, mode);
	}
	/* as glibc's: validate the fd, set O_APPEND for "a" and "a+", and
	 * seek to the end for "a" only */
	fl = real.fcntl(fd, F_GETFL);
	if (fl < 0)
		return NULL;
	f = cookie_stream(fd, mode);
	if (f && mode && mode[0] == 'a') {
		if (!(fl & O_APPEND))
			fcntl(fd, F_SETFL, fl | O_APPEND);
		if (!strchr(mode, '+'))
			lseek(fd, 0, SEEK_END);
	}
	return f;
}

/*
 * freopen keeps the FILE object.  One of our cookie streams stays a cookie
 * stream (glibc cannot reopen it: its file operations are ours) over the
 * new file, on the old descriptor number as glibc keeps it; writes through
 * it reach our wrappers whether or not the new file is managed.  Any other
 * stream is glibc's to reopen, once the new path's pending work is done.
 */
static struct cookie *cookie_of(FILE *f)
{
	struct cookie *c;

	pthread_mutex_lock(&cookie_lock);
	for (c = cookies; c && c->f != f; c = c->next)
		;
	pthread_mutex_unlock(&cookie_lock);
	return c;
}

static FILE *cookie_reopen(struct cookie *ck, const char *path, const char *mode)
{
	char self[64];
	int flags, fd, old = ck->fd;

	if (!mode || mode_flags(mode, &flags) < 0) {
		errno = EINVAL;
		return NULL;
	}
	real.fflush(ck->f);
	if (!path) {
		/* the same file in a new mode */
		snprintf(self, sizeof(self), "/proc/self/fd/%d", old);
		path = self;
		flags &= ~(O_CREAT | O_EXCL | O_TRUNC);
	}
	fd = open(path, flags, 0666);
	if (fd < 0) {
		int e = errno;

		fclose(ck->f); /* as glibc: a failed freopen closes the stream */
		errno = e;
		return NULL;
	}
	if (fd != old) {
		dup3(fd, old, flags & O_CLOEXEC);
		close(fd);
	}
	clearerr(ck->f);
	if (mode[0] == 'a' && !strchr(mode, '+'))
		lseek(old, 0, SEEK_END);
	return ck->f;
}

static FILE *do_freopen(const char *path, const char *mode, FILE *stream)
{
	struct cookie *ck;
	int fd;

	ENSURE_REAL();
	if (stream && (ck = cookie_of(stream)) != NULL)
		return cookie_reopen(ck, path, mode);
	if (stream) {
		fd = fileno(stream);
		if (fd >= 0 && fd_peek(fd) && session_lock() == 0) {
			fd_release(fd);
			session_unlock();
		}
	}
	if (path && C.enabled)
		wait_path_pending(AT_FDCWD, path, 0);
	return real.freopen(path, mode, stream);
}

ACKPT_EXPORT FILE *freopen(const char *path, const char *mode, FILE *stream)
{
	return do_freopen(path, mode, stream);
}

ACKPT_EXPORT FILE *freopen64(const char *path, const char *mode, FILE *stream)
{
	return do_freopen(path, mode, stream);
}

ACKPT_EXPORT int fclose(FILE *f)
{
	int fd;

	ENSURE_REAL();
	if (!f || is_cookie(f))
		return real.fclose(f); /* the close callback releases our state */
	fd = fileno(f);
	if (fd >= 0 && fd_peek(fd) && session_lock() == 0) {
		/* a stream glibc opened over a descriptor we track (fdopen of a
		 * read-only fd): forget it before glibc closes it internally */
		fd_release(fd);
		session_unlock();
	}
	return real.fclose(f);
}

ACKPT_EXPORT int fcloseall(void)
{
	ENSURE_REAL();
	return real.fcloseall();
}

ACKPT_EXPORT int fflush(FILE *f)
{
	ENSURE_REAL();
	return real.fflush(f);
}
