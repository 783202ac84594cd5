/*
 * The job's secret, the coordinator handshake, sealed frames and the job
 * file.  See auth.h for the protocol and docs/BARRIER.md for why.
 *
 * File and socket calls here go straight to the kernel (syscall(2) for
 * files): the shim links this file too, and must not intercept its own
 * reads of the job file.
 */
#include "auth.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <sodium.h>

#include "clock.h"
#include "job.h"

#define FRAME_SIZE sizeof(struct ackpt_bar_msg)
#define MAC_OFF    __builtin_offsetof(struct ackpt_bar_msg, mac)

/* how long one listener may take to answer a HELLO or a PROOF */
#define ANSWER_WITHIN_NS 10000000000ull

int ackpt_crypto_init(void)
{
	return sodium_init() < 0 ? -1 : 0;
}

void ackpt_random(void *buf, size_t n)
{
	randombytes_buf(buf, n);
}

/* Keyed BLAKE2b of up to three pieces. */
static void kh(uint8_t *out, size_t outlen, const uint8_t *key, size_t keylen, const void *a,
	       size_t alen, const void *b, size_t blen, const void *c, size_t clen)
{
	crypto_generichash_state st;

	crypto_generichash_init(&st, key, keylen, outlen);
	crypto_generichash_update(&st, a, alen);
	if (blen)
		crypto_generichash_update(&st, b, blen);
	if (clen)
		crypto_generichash_update(&st, c, clen);
	crypto_generichash_final(&st, out, outlen);
	sodium_memzero(&st, sizeof(st));
}

uint64_t ackpt_secret_fp(const uint8_t secret[ACKPT_SECRET_LEN])
{
	static const char label[] = "ackpt-fingerprint";
	uint8_t out[16];
	uint64_t fp;

	kh(out, sizeof(out), secret, ACKPT_SECRET_LEN, label, sizeof(label) - 1, NULL, 0, NULL, 0);
	memcpy(&fp, out, sizeof(fp));
	return fp;
}

void ackpt_secret_from_token(const char *token, uint8_t out[ACKPT_SECRET_LEN])
{
	static const char label[] = "ackpt-job-token"; /* hashed with its NUL */

	kh(out, ACKPT_SECRET_LEN, NULL, 0, label, sizeof(label), token, strlen(token), NULL, 0);
}

int ackpt_secret_parse(const char *hex, uint8_t out[ACKPT_SECRET_LEN])
{
	size_t len;

	if (strlen(hex) != 2 * ACKPT_SECRET_LEN)
		return -1;
	if (sodium_hex2bin(out, ACKPT_SECRET_LEN, hex, 2 * ACKPT_SECRET_LEN, NULL, &len, NULL) ||
	    len != ACKPT_SECRET_LEN)
		return -1;
	return 0;
}

void ackpt_secret_hex(const uint8_t s[ACKPT_SECRET_LEN], char out[2 * ACKPT_SECRET_LEN + 1])
{
	sodium_bin2hex(out, 2 * ACKPT_SECRET_LEN + 1, s, ACKPT_SECRET_LEN);
}

/* ---- handshake ---- */

static struct ackpt_bar_msg frame_of(int type)
{
	return (struct ackpt_bar_msg){ .magic = ACKPT_BAR_MAGIC, .version = ACKPT_BAR_VERSION,
				       .type = (uint16_t)type };
}

void ackpt_hs_hello(struct ackpt_bar_msg *m, int rank, int observer, uint64_t pid)
{
	*m = frame_of(BAR_HELLO);
	m->rank = rank;
	m->status = observer ? ACKPT_HELLO_OBSERVER : 0;
	m->arg = pid;
	randombytes_buf(m->data, sizeof(m->data));
}

void ackpt_hs_proof(const uint8_t secret[ACKPT_SECRET_LEN], char who,
		    const struct ackpt_bar_msg *hello, const struct ackpt_bar_msg *chal,
		    uint8_t out[ACKPT_MAC_LEN])
{
	struct ackpt_bar_msg c = *chal;

	memset(c.mac, 0, sizeof(c.mac)); /* the coordinator's proof is not its own input */
	kh(out, ACKPT_MAC_LEN, secret, ACKPT_SECRET_LEN, &who, 1, hello, FRAME_SIZE, &c, FRAME_SIZE);
	sodium_memzero(&c, sizeof(c));
}

void ackpt_hs_challenge(struct ackpt_bar_msg *c, const uint8_t secret[ACKPT_SECRET_LEN],
			const struct ackpt_bar_msg *hello)
{
	*c = frame_of(BAR_CHALLENGE);
	c->id = ackpt_secret_fp(secret);
	randombytes_buf(c->data, sizeof(c->data));
	ackpt_hs_proof(secret, 's', hello, c, c->mac);
}

int ackpt_hs_check(const uint8_t secret[ACKPT_SECRET_LEN], char who,
		   const struct ackpt_bar_msg *hello, const struct ackpt_bar_msg *chal,
		   const uint8_t mac[ACKPT_MAC_LEN])
{
	uint8_t want[ACKPT_MAC_LEN];

	ackpt_hs_proof(secret, who, hello, chal, want);
	return sodium_memcmp(want, mac, ACKPT_MAC_LEN) == 0;
}

void ackpt_chan_init(struct ackpt_chan *c, const uint8_t secret[ACKPT_SECRET_LEN],
		     const struct ackpt_bar_msg *hello, const struct ackpt_bar_msg *chal, char side)
{
	static const char label = 'k';

	kh(c->key, sizeof(c->key), secret, ACKPT_SECRET_LEN, &label, 1, hello, FRAME_SIZE, chal,
	   FRAME_SIZE);
	c->tx = c->rx = 0;
	c->side = side;
}

static void frame_mac(const uint8_t key[32], char from, const struct ackpt_bar_msg *m,
		      uint8_t out[ACKPT_MAC_LEN])
{
	kh(out, ACKPT_MAC_LEN, key, 32, &from, 1, m, MAC_OFF, NULL, 0);
}

void ackpt_chan_seal(const struct ackpt_chan *c, struct ackpt_bar_msg *m)
{
	m->seq = c->tx;
	frame_mac(c->key, c->side, m, m->mac);
}

int ackpt_chan_open(struct ackpt_chan *c, const struct ackpt_bar_msg *m)
{
	uint8_t want[ACKPT_MAC_LEN];

	frame_mac(c->key, c->side == 's' ? 'c' : 's', m, want);
	if (sodium_memcmp(want, m->mac, ACKPT_MAC_LEN) != 0 || m->seq != c->rx)
		return -EBADMSG;
	c->rx++;
	return 0;
}

/* ---- the job file ---- */

int ackpt_jobfile_read(const struct ackpt_job *j, struct ackpt_jobfile *f)
{
	char buf[512], *line, *save = NULL;
	struct stat st;
	long n;
	int fd, version = 0, err;

	memset(f, 0, sizeof(*f));
	if (!j->jobfile[0])
		return -ENOENT;
	fd = (int)syscall(SYS_openat, AT_FDCWD, j->jobfile, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return -errno;
	if (syscall(SYS_fstat, fd, &st) < 0) {
		err = errno;
		syscall(SYS_close, fd);
		return -err;
	}
	/* only a private file of ours: the trust this whole file rests on */
	if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077)) {
		syscall(SYS_close, fd);
		return -EPERM;
	}
	n = syscall(SYS_read, fd, buf, sizeof(buf) - 1);
	err = errno;
	syscall(SYS_close, fd);
	if (n < 0)
		return -err;
	buf[n] = 0;
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		if (!strncmp(line, "ackpt-job ", 10))
			version = atoi(line + 10);
		else if (!strncmp(line, "port ", 5))
			f->port = atoi(line + 5);
		else if (!strncmp(line, "secret ", 7))
			f->has_secret = ackpt_secret_parse(line + 7, f->secret) == 0;
	}
	sodium_memzero(buf, sizeof(buf));
	if (version != 1 || f->port <= 0 || f->port > 65535)
		return -EBADMSG;
	return 0;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		long r = syscall(SYS_write, fd, p, n);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r < 0 ? -errno : -EIO;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

/* mkdir -p of path's directory, as the program would create it (umask applies). */
static void make_parents(const char *path)
{
	char d[sizeof(((struct ackpt_job *)0)->jobfile)];
	char *p;

	snprintf(d, sizeof(d), "%s", path);
	for (p = d + 1; (p = strchr(p, '/')); p++) {
		*p = 0;
		syscall(SYS_mkdirat, AT_FDCWD, d, 0777);
		*p = '/';
	}
}

int ackpt_jobfile_write(const struct ackpt_job *j, const struct ackpt_jobfile *f)
{
	char tmp[sizeof(j->jobfile) + 32], body[256], hex[2 * ACKPT_SECRET_LEN + 1] = "";
	int fd, err, len;

	if (!j->jobfile[0])
		return -ENOENT;
	if (f->has_secret)
		ackpt_secret_hex(f->secret, hex);
	len = snprintf(body, sizeof(body), "ackpt-job 1\nport %d\n%s%s%s", f->port,
		       f->has_secret ? "secret " : "", hex, f->has_secret ? "\n" : "");
	sodium_memzero(hex, sizeof(hex));
	snprintf(tmp, sizeof(tmp), "%s.tmp.%d", j->jobfile, (int)getpid());
	make_parents(j->jobfile);
	syscall(SYS_unlinkat, AT_FDCWD, tmp, 0);
	fd = (int)syscall(SYS_openat, AT_FDCWD, tmp,
			  O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		sodium_memzero(body, sizeof(body));
		return -errno;
	}
	err = write_all(fd, body, (size_t)len);
	sodium_memzero(body, sizeof(body));
	if (!err && syscall(SYS_fsync, fd) < 0)
		err = -errno;
	syscall(SYS_close, fd);
	if (!err && syscall(SYS_renameat, AT_FDCWD, tmp, AT_FDCWD, j->jobfile) < 0)
		err = -errno;
	if (err)
		syscall(SYS_unlinkat, AT_FDCWD, tmp, 0);
	return err;
}

void ackpt_jobfile_remove(const struct ackpt_job *j, const struct ackpt_jobfile *f)
{
	struct ackpt_jobfile now;

	if (ackpt_jobfile_read(j, &now) == 0 && now.port == f->port &&
	    now.has_secret == f->has_secret &&
	    (!f->has_secret || sodium_memcmp(now.secret, f->secret, ACKPT_SECRET_LEN) == 0))
		syscall(SYS_unlinkat, AT_FDCWD, j->jobfile, 0);
	sodium_memzero(&now, sizeof(now));
}

/* ---- dialing ---- */

enum { TRY_OK, TRY_REFUSED, TRY_SILENT, TRY_FORGED, TRY_NOKEY };

static int io_wait(int fd, short ev, uint64_t deadline)
{
	for (;;) {
		struct pollfd p = { .fd = fd, .events = ev };
		uint64_t now = now_ns();
		int r;

		if (now >= deadline)
			return -ETIMEDOUT;
		r = poll(&p, 1, (int)((deadline - now) / 1000000) + 1);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return -errno;
	}
}

int ackpt_frames_send(int fd, const struct ackpt_bar_msg *m, int n, uint64_t deadline)
{
	size_t done = 0, len = FRAME_SIZE * (size_t)n;

	while (done < len) {
		ssize_t r = send(fd, (const char *)m + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (r > 0) {
			done += (size_t)r;
			continue;
		}
		if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
			int e = io_wait(fd, POLLOUT, deadline);

			if (e)
				return e;
			continue;
		}
		return r < 0 ? -errno : -EPIPE;
	}
	return 0;
}

int ackpt_frame_recv(int fd, struct ackpt_bar_msg *m, uint64_t deadline)
{
	size_t got = 0;

	while (got < FRAME_SIZE) {
		ssize_t r = recv(fd, (char *)m + got, FRAME_SIZE - got, MSG_DONTWAIT);

		if (r > 0) {
			got += (size_t)r;
			continue;
		}
		if (r == 0)
			return -ECONNRESET;
		if (errno == EAGAIN || errno == EINTR) {
			int e = io_wait(fd, POLLIN, deadline);

			if (e)
				return e;
			continue;
		}
		return -errno;
	}
	if (m->magic != ACKPT_BAR_MAGIC || m->version != ACKPT_BAR_VERSION)
		return -EPROTO;
	return 0;
}

/* A connected non-blocking socket to a, or -1 (*refused: nothing listens). */
static int connect_by(const struct addrinfo *a, uint64_t deadline, int *refused)
{
	int fd = socket(a->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), err = 0;
	socklen_t len = sizeof(err);

	*refused = 1;
	if (fd < 0)
		return -1;
	if (connect(fd, a->ai_addr, a->ai_addrlen) < 0 && errno != EINPROGRESS)
		err = errno;
	else if (io_wait(fd, POLLOUT, deadline) < 0)
		err = ETIMEDOUT;
	else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err) {
		*refused = err != ETIMEDOUT;
		syscall(SYS_close, fd);
		return -1;
	}
	return fd;
}

/* One listener: connect, HELLO, check its proof with whichever of keys its
 * fingerprint names, PROOF, WELCOME. */
static int try_one(const struct addrinfo *a, const uint8_t (*keys)[ACKPT_SECRET_LEN], int nkeys,
		   const struct ackpt_dial *d, struct ackpt_chan *ch, uint64_t *wid, int *fd_out)
{
	uint64_t now = now_ns(), deadline = now + ANSWER_WITHIN_NS;
	struct ackpt_bar_msg hello, chal, m;
	const uint8_t *key = NULL;
	int refused, fd, k, one = 1;

	/* within the caller's deadline, but a second at least for each try */
	if (deadline > d->deadline_ns)
		deadline = d->deadline_ns > now + 1000000000ull ? d->deadline_ns : now + 1000000000ull;
	fd = connect_by(a, deadline, &refused);
	if (fd < 0)
		return refused ? TRY_REFUSED : TRY_SILENT;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	ackpt_hs_hello(&hello, d->rank, d->observer, (uint64_t)getpid());
	k = ackpt_frames_send(fd, &hello, 1, deadline);
	if (!k)
		k = ackpt_frame_recv(fd, &chal, deadline);
	if (k || chal.type != BAR_CHALLENGE) {
		syscall(SYS_close, fd);
		/* an answer that is not a CHALLENGE of our version: not ours */
		return k == -ETIMEDOUT || k == -ECONNRESET || k == -EPIPE ? TRY_SILENT : TRY_FORGED;
	}
	for (k = 0; k < nkeys && !key; k++)
		if (ackpt_secret_fp(keys[k]) == chal.id)
			key = keys[k];
	if (!key) {
		syscall(SYS_close, fd);
		return TRY_NOKEY;
	}
	if (!ackpt_hs_check(key, 's', &hello, &chal, chal.mac)) {
		syscall(SYS_close, fd);
		return TRY_FORGED;
	}
	m = frame_of(BAR_PROOF);
	ackpt_hs_proof(key, 'c', &hello, &chal, m.mac);
	ackpt_chan_init(ch, key, &hello, &chal, 'c');
	if (ackpt_frames_send(fd, &m, 1, deadline) || ackpt_frame_recv(fd, &m, deadline) ||
	    ackpt_chan_open(ch, &m) || m.type != BAR_WELCOME) {
		/* it proved it knows the secret: a coordinator that refused us */
		syscall(SYS_close, fd);
		sodium_memzero(ch, sizeof(*ch));
		return TRY_SILENT;
	}
	*wid = m.id;
	*fd_out = fd;
	return TRY_OK;
}

static void say_where(const struct addrinfo *a, char *out, size_t n)
{
	char host[INET6_ADDRSTRLEN + 2], port[16];

	if (getnameinfo(a->ai_addr, a->ai_addrlen, host, sizeof(host), port, sizeof(port),
			NI_NUMERICHOST | NI_NUMERICSERV))
		snprintf(out, n, "?");
	else
		snprintf(out, n, a->ai_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
}

int ackpt_coord_dial(const struct ackpt_job *j, const struct ackpt_dial *d, struct ackpt_chan *ch,
		     uint64_t *welcome_id)
{
	uint64_t start = now_ns();
	int said_wait = 0, said_forged = 0, ret = -ETIMEDOUT;

	if (ackpt_crypto_init() < 0)
		return -ENOSYS;
	for (;;) {
		uint8_t keys[2][ACKPT_SECRET_LEN];
		struct ackpt_jobfile f;
		int nkeys = 0, ports[2], nports = 0, listener = 0, nokey = 0, forged = 0, i;

		if (j->secret_src != ACKPT_SECRET_NONE)
			memcpy(keys[nkeys++], j->secret, ACKPT_SECRET_LEN);
		if (ackpt_jobfile_read(j, &f) == 0) {
			if (f.has_secret && (!nkeys || sodium_memcmp(f.secret, keys[0], ACKPT_SECRET_LEN)))
				memcpy(keys[nkeys++], f.secret, ACKPT_SECRET_LEN);
			if (f.port != j->port)
				ports[nports++] = f.port; /* published: the job's port was taken */
		}
		sodium_memzero(&f, sizeof(f));
		ports[nports++] = j->port;
		for (i = 0; i < nports; i++) {
			struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
						  .ai_flags = AI_NUMERICSERV }, *ai = NULL, *a;
			char port[16];

			snprintf(port, sizeof(port), "%d", ports[i]);
			if (getaddrinfo(j->addr, port, &hints, &ai) != 0)
				continue;
			for (a = ai; a; a = a->ai_next) {
				int fd = -1, r = try_one(a, (const uint8_t (*)[ACKPT_SECRET_LEN])keys,
							 nkeys, d, ch, welcome_id, &fd);

				if (r == TRY_OK) {
					freeaddrinfo(ai);
					sodium_memzero(keys, sizeof(keys));
					return fd;
				}
				listener |= r != TRY_REFUSED;
				nokey |= r == TRY_NOKEY;
				forged |= r == TRY_FORGED;
				/* a wrong proof, or a secret that neither we nor the job
				 * file have (the file is written before the coordinator
				 * answers anyone): a stranger, or another job */
				if ((r == TRY_FORGED || r == TRY_NOKEY) && !said_forged++ && d->log) {
					char where[INET6_ADDRSTRLEN + 24];

					say_where(a, where, sizeof(where));
					d->log(1, "the listener at %s does not prove it knows the job's "
					       "secret (another program on the port, or another job's "
					       "coordinator); not trusting it", where);
				}
			}
			freeaddrinfo(ai);
		}
		sodium_memzero(keys, sizeof(keys));
		ret = forged ? -EACCES : nokey ? -ENOKEY : listener ? -ETIMEDOUT : -ECONNREFUSED;
		if (!listener && d->give_up_refused)
			return -ECONNREFUSED;
		if (d->one_round || now_ns() >= d->deadline_ns)
			return ret;
		if (!said_wait && now_ns() - start > 5000000000ull && d->log) {
			d->log(2, "waiting for the coordinator at %s:%d%s%s", j->addr, j->port,
			       nokey ? ": it holds another secret than this process; waiting for the "
				       "job file " : "",
			       nokey ? (j->jobfile[0] ? j->jobfile : "(none: no managed root)") : "");
			said_wait = 1;
		}
		{
			struct timespec ts = { 0, 100000000 };

			nanosleep(&ts, NULL);
		}
	}
}
