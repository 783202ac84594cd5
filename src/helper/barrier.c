/*
 * Global durability barrier (helper side).
 *
 * The job (rank, world, coordinator address, secret) comes from the shim,
 * which discovered it with src/common/job.c when its session started.
 * Rank 0's first helper hosts the coordinator (cfg.coord_host, decided by
 * the shim); every other helper registers before its first managed open
 * returns.  A barrier: the coordinator sends PREPARE to every registered
 * participant; each notes how far its queue had been filled at that moment
 * (the shim's staged_seq), acknowledges once all of that is durable, or
 * reports its write error.  All acknowledged -> commit; any error, a lost
 * participant or ACKPT_BARRIER_TIMEOUT -> abort, logged on every rank.
 */
#include "barrier.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../common/auth.h"
#include "../common/barrier.h"
#include "../common/clock.h"
#include "../common/job.h"
#include "../common/proto.h"

#define LOCAL -1
#define MAX_LFD 4
#define MAX_PEND 1024
#define MAX_REQ 256

struct part {
	int fd;
	int rank;
	int alive;
	int hello;            /* authenticated: both ends proved they know the secret */
	int challenged;       /* its HELLO was answered with a CHALLENGE */
	struct ackpt_bar_msg hs, chal; /* the handshake so far */
	struct ackpt_chan ch;
	int observer;         /* a program process asking about names, not in barriers */
	uint64_t durable;     /* its last PROGRESS: durable seq, commits done */
	uint64_t commits;
	uint64_t hello_by;    /* a connection without a HELLO is closed then */
	int rlen;
	unsigned char rbuf[sizeof(struct ackpt_bar_msg)];
};

/* how long a new connection may take to complete the handshake */
#define HELLO_WITHIN_NS 10000000000ull

struct bar {
	uint64_t id;
	int requester;        /* participant index, or LOCAL */
	uint64_t commit_id;   /* the requester's commit id */
	uint64_t deadline;
	int nwait;
	int nslots;
	uint8_t *waiting;     /* [nslots] participants, [nslots] = local */
	uint8_t flags;        /* ACKs' flags, ORed (UPLOAD_F_FAILED) */
	struct bar *next;
};

/* A name with pending work somewhere in the job (BAR_NAME). */
struct cname {
	uint64_t hash, key, node;
	int owner;            /* participant id, or ACKPT_COORD_LOCAL */
	uint32_t flags;       /* ACKPT_NAME_* */
};

#define MAX_NAMES 65536

static struct {
	int global, host, rank, world;
	int multi_node;       /* the job may span nodes */
	const char *broken;   /* why a global barrier cannot work, or NULL */
	struct bar_hooks h;
	struct ackpt_job job; /* with the secret in force */
	uint64_t timeout_ns;
	int port;             /* where the coordinator listens (job.port unless it moved) */
	/* participant side */
	int cfd, crlen, my_id;
	struct ackpt_chan cch;
	unsigned char crbuf[sizeof(struct ackpt_bar_msg)];
	uint64_t sent_durable, sent_commits; /* last PROGRESS sent */
	int progress_owed;    /* a PROGRESS could not be sent yet */
	uint64_t keepalive_at; /* next PROGRESS(UPLOADING) while an ACK waits for uploads */
	int uploading;        /* ACKPT_UPLOAD: ACKs wait for uploads too, which may take
			       * longer than the barrier timeout (keepalives) */
	struct { uint64_t bid, target; } pend[MAX_PEND];
	int npend;
	struct { uint64_t commit_id, deadline; } req[MAX_REQ];
	int nreq;
	/* coordinator side */
	int lfd[MAX_LFD];     /* listening sockets, -1 when unused */
	int nlfd;
	struct part *parts;
	int nparts, capparts, nalive;
	struct bar *bars;
	uint64_t next_bid;
	int lost[64];        /* ranks lost without BYE and not registered again */
	int nlost;
	struct cname *names;
	int nnames, capnames;
	struct ackpt_jobfile pub; /* what we published in the job file */
	int published;
	unsigned long rejected; /* peers that failed the handshake or a frame's MAC */
} B = { .cfd = -1, .my_id = -1 };

/*
 * Seal a frame for c and send it without blocking.  A frame that does not
 * fit the socket at all is not counted (the next one takes its sequence
 * number); one that fits in part tears the stream, so the connection is
 * shut down and its loss handled like any other.
 */
static int send_sealed(int fd, struct ackpt_chan *c, int type, uint64_t id, uint64_t arg,
		       int status, int rank, uint8_t flags)
{
	struct ackpt_bar_msg m = { .magic = ACKPT_BAR_MAGIC, .version = ACKPT_BAR_VERSION,
				   .type = (uint16_t)type, .id = id, .arg = arg, .status = status,
				   .rank = rank };
	ssize_t n;

	m.data[0] = flags; /* ACK, DECISION: ACKPT_BAR_F_* */
	ackpt_chan_seal(c, &m);
	n = send(fd, &m, sizeof(m), MSG_NOSIGNAL | MSG_DONTWAIT);
	if (n == (ssize_t)sizeof(m)) {
		ackpt_chan_sent(c);
		return 0;
	}
	if (n > 0)
		shutdown(fd, SHUT_RDWR);
	return -1;
}

/* coordinator -> participant i */
static int send_part(int i, int type, uint64_t id, uint64_t arg, int status, int rank)
{
	return send_sealed(B.parts[i].fd, &B.parts[i].ch, type, id, arg, status, rank, 0);
}

/* participant -> coordinator */
static int send_coord(int type, uint64_t id, uint64_t arg, int status, uint8_t flags)
{
	return send_sealed(B.cfd, &B.cch, type, id, arg, status,
			   type == BAR_PROGRESS ? B.my_id : B.rank, flags);
}

static int valid(const struct ackpt_bar_msg *m)
{
	return m->magic == ACKPT_BAR_MAGIC && m->version == ACKPT_BAR_VERSION &&
	       m->type >= BAR_HELLO && m->type <= BAR_PROOF;
}

/* A peer failed the handshake or a frame's MAC: a line for the first few. */
static void rejected(const char *why, int rank)
{
	B.rejected++;
	if (B.rejected <= 3 || B.rejected % 1000 == 0)
		B.h.log(1, "coordinator: rejected a peer (claimed rank %d): %s (%lu so far)", rank, why,
			B.rejected);
}

/*
 * Handle the complete frames waiting on a non-blocking socket, at most
 * FRAMES_PER_WAKEUP of them: a peer that streams frames must not keep the
 * helper from its own I/O or from other peers (poll wakes us again for the
 * rest). fn returns nonzero to stop reading (the peer was rejected).
 * Returns -1 when the connection is over: EOF, an error, garbage, or fn
 * said stop.
 */
#define FRAMES_PER_WAKEUP 64

static int read_frames(int fd, unsigned char *buf, int *len,
		       int (*fn)(const struct ackpt_bar_msg *, void *), void *arg)
{
	int frames = 0;

	while (frames < FRAMES_PER_WAKEUP) {
		ssize_t n = recv(fd, buf + *len, sizeof(struct ackpt_bar_msg) - *len, MSG_DONTWAIT);
		struct ackpt_bar_msg m;

		if (n == 0)
			return -1;
		if (n < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -1;
		*len += (int)n;
		if (*len < (int)sizeof(m))
			continue;
		memcpy(&m, buf, sizeof(m));
		*len = 0;
		if (!valid(&m))
			return -1;
		frames++;
		if (fn(&m, arg))
			return -1;
	}
	return 0;
}

/* ---- coordinator ---- */

static void decide(struct bar *b, int status, int culprit_rank)
{
	struct bar **pp;
	int i;

	if (b->requester == LOCAL) {
		if (!status && (b->flags & ACKPT_BAR_F_UPLOAD_FAILED))
			B.h.upload_failed(b->commit_id);
		B.h.decided(b->commit_id, status, NULL);
	} else if (b->requester < B.nparts && B.parts[b->requester].alive) {
		send_sealed(B.parts[b->requester].fd, &B.parts[b->requester].ch, BAR_DECISION, b->id,
			    b->commit_id, status, B.rank, b->flags);
	}
	if (status) {
		B.h.log(0, "barrier %llu aborted: %s (rank %d); the metadata is not committed",
			(unsigned long long)b->id,
			status == ECANCELED ? "a write of its checkpoint returned an error to the program"
					    : strerror(status),
			culprit_rank);
		for (i = 0; i < B.nparts; i++)
			if (B.parts[i].alive && B.parts[i].hello && !B.parts[i].observer &&
			    i != b->requester)
				send_part(i, BAR_DECISION, b->id, 0, status, culprit_rank);
	}
	for (pp = &B.bars; *pp; pp = &(*pp)->next)
		if (*pp == b) {
			*pp = b->next;
			break;
		}
	free(b->waiting);
	free(b);
}

static void bar_ack(uint64_t bid, int slot, int status, int rank, uint8_t flags)
{
	struct bar *b;

	for (b = B.bars; b; b = b->next)
		if (b->id == bid)
			break;
	if (!b)
		return;
	b->flags |= flags & ACKPT_BAR_F_UPLOAD_FAILED;
	if (slot == LOCAL)
		slot = b->nslots;
	if (status) {
		decide(b, status, rank);
		return;
	}
	if (b->waiting[slot]) {
		b->waiting[slot] = 0;
		if (--b->nwait == 0)
			decide(b, 0, -1);
	}
}

/* Participant slot (or LOCAL) is durable and still uploading for the
 * barriers it owes: they wait another ACKPT_BARRIER_TIMEOUT. */
static void bar_keepalive(int slot)
{
	uint64_t until = now_ns() + B.timeout_ns;
	struct bar *b;

	for (b = B.bars; b; b = b->next) {
		int s = slot == LOCAL ? b->nslots : slot;

		if ((slot == LOCAL || slot < b->nslots) && b->waiting[s] && b->deadline < until)
			b->deadline = until;
	}
}

static void bar_start(int requester, uint64_t commit_id)
{
	struct bar *b;
	int i;

	if (B.nlost) {
		/* a helper that vanished may have taken staged data with it:
		 * no commit until that rank has a helper registered again */
		B.h.log(0, "coordinator: refusing a commit: rank %d's helper was lost with its data "
			"in an unknown state", B.lost[0]);
		if (requester == LOCAL)
			B.h.decided(commit_id, ECONNRESET, "a rank's helper was lost");
		else if (B.parts[requester].alive)
			send_part(requester, BAR_DECISION, 0, commit_id, ECONNRESET, B.rank);
		return;
	}
	b = calloc(1, sizeof(*b));
	if (!b) {
		if (requester == LOCAL)
			B.h.decided(commit_id, ENOMEM, NULL);
		return;
	}
	b->id = ++B.next_bid;
	b->requester = requester;
	b->commit_id = commit_id;
	b->deadline = now_ns() + B.timeout_ns;
	b->nslots = B.nparts;
	b->waiting = calloc(B.nparts + 1, 1);
	if (!b->waiting) {
		free(b);
		if (requester == LOCAL)
			B.h.decided(commit_id, ENOMEM, NULL);
		return;
	}
	b->next = B.bars;
	B.bars = b;
	for (i = 0; i < B.nparts; i++) {
		if (!B.parts[i].alive || !B.parts[i].hello || B.parts[i].observer)
			continue;
		if (send_part(i, BAR_PREPARE, b->id, 0, 0, B.rank) < 0)
			continue; /* its loss is noticed when the connection breaks */
		b->waiting[i] = 1;
		b->nwait++;
	}
	/* the host's own helper takes part like any other */
	b->waiting[b->nslots] = 1;
	b->nwait++;
	if (B.npend < MAX_PEND) {
		B.pend[B.npend].bid = b->id | (1ull << 63); /* local marker */
		B.pend[B.npend].target = B.h.staged_seq();
		B.npend++;
	}
}

/* ---- other nodes' pending names ---- */

/* How far owner has got (for a commit key or an op seq); 0 when the owner
 * is gone, so nothing of it can still be pending. */
static int owner_progress(int owner, uint32_t flags, uint64_t *v)
{
	struct part *p;

	if (owner == ACKPT_COORD_LOCAL) {
		*v = flags & ACKPT_NAME_COMMIT ? B.h.commits_done() : B.h.durable_seq();
		return 1;
	}
	if (owner < 0 || owner >= B.nparts)
		return 0;
	p = &B.parts[owner];
	if (!p->alive || !p->hello || p->observer)
		return 0;
	*v = flags & ACKPT_NAME_COMMIT ? p->commits : p->durable;
	return 1;
}

static int name_settled(const struct cname *c)
{
	uint64_t v;

	return !owner_progress(c->owner, c->flags, &v) || v >= c->key;
}

static void names_prune(void)
{
	int i;

	for (i = 0; i < B.nnames;)
		if (name_settled(&B.names[i]))
			B.names[i] = B.names[--B.nnames];
		else
			i++;
}

static void on_name(const struct ackpt_bar_msg *m)
{
	struct cname c = { .hash = m->id, .key = m->arg, .owner = m->rank,
			   .flags = (uint32_t)m->status };
	uint64_t progress;
	static int warned;

	memcpy(&c.node, m->data, 8);
	memcpy(&progress, m->data + 8, 8);
	if (c.owner >= 0 && c.owner < B.nparts && B.parts[c.owner].hello &&
	    !B.parts[c.owner].observer) {
		/* the announcer read its helper's progress after publishing
		 * what it announces: take it, the helper may have nothing newer
		 * to report */
		uint64_t *v = c.flags & ACKPT_NAME_COMMIT ? &B.parts[c.owner].commits :
							     &B.parts[c.owner].durable;

		if (progress > *v)
			*v = progress;
	}
	names_prune();
	if (name_settled(&c))
		return;
	if (B.nnames == B.capnames) {
		int cap = B.capnames ? 2 * B.capnames : 256;
		struct cname *n = cap <= MAX_NAMES ? realloc(B.names, cap * sizeof(*n)) : NULL;

		if (!n) {
			if (!warned++)
				B.h.log(1, "coordinator: too many pending names; other nodes may see "
					"old names until they are done");
			return;
		}
		B.names = n;
		B.capnames = cap;
	}
	B.names[B.nnames++] = c;
}

static int name_pending_elsewhere(const struct ackpt_bar_msg *m)
{
	uint64_t node;
	int i;

	memcpy(&node, m->data, 8);
	names_prune();
	for (i = 0; i < B.nnames; i++) {
		const struct cname *c = &B.names[i];

		/* the asker's own node answers for itself, from its registry */
		if (c->hash == m->id && c->node != node &&
		    (c->flags & ACKPT_NAME_DIR) == ((uint32_t)m->status & ACKPT_NAME_DIR))
			return 1;
	}
	return 0;
}

static int on_part_msg(const struct ackpt_bar_msg *m, void *arg)
{
	int i = (int)(intptr_t)arg;
	struct part *p = &B.parts[i];

	if (!p->alive)
		return 1;
	if (!p->hello && !p->challenged) {
		/* HELLO: answer with our proof over its nonce and ours */
		if (m->type != BAR_HELLO) {
			rejected("it did not start with HELLO", m->rank);
			p->alive = 0;
			return 1;
		}
		p->hs = *m;
		ackpt_hs_challenge(&p->chal, B.job.secret, m);
		if (send(p->fd, &p->chal, sizeof(p->chal), MSG_NOSIGNAL | MSG_DONTWAIT) !=
		    (ssize_t)sizeof(p->chal)) {
			p->alive = 0;
			return 1;
		}
		p->challenged = 1;
		return 0;
	}
	if (!p->hello) {
		/* PROOF: the peer knows the secret; from now on every frame is sealed */
		if (m->type != BAR_PROOF || !ackpt_hs_check(B.job.secret, 'c', &p->hs, &p->chal, m->mac)) {
			rejected("it does not know the job's secret", p->hs.rank);
			p->alive = 0;
			return 1;
		}
		ackpt_chan_init(&p->ch, B.job.secret, &p->hs, &p->chal, 's');
		p->hello = 1;
		p->rank = p->hs.rank;
		if (p->hs.status == ACKPT_HELLO_OBSERVER) {
			p->observer = 1;
			send_part(i, BAR_WELCOME, (uint64_t)i, 0, 0, B.rank);
			return 0;
		}
		for (int k = 0; k < B.nlost; k++)
			if (B.lost[k] == p->rank) {
				B.lost[k] = B.lost[--B.nlost];
				break;
			}
		send_part(i, BAR_WELCOME, (uint64_t)i, 0, 0, B.rank);
		return 0;
	}
	if (ackpt_chan_open(&p->ch, m)) {
		rejected("a frame failed authentication (forged, replayed or injected)", p->rank);
		p->alive = 0;
		return 1;
	}
	if (p->observer) {
		if (m->type == BAR_NAME) {
			on_name(m);
			send_part(i, BAR_ANSWER, m->id, 0, 0, B.rank);
		} else if (m->type == BAR_QUERY) {
			send_part(i, BAR_ANSWER, m->id, 0, name_pending_elsewhere(m), B.rank);
		} else {
			p->alive = 0; /* an observer never sends anything else */
		}
		return !p->alive;
	}
	switch (m->type) {
	case BAR_PROGRESS:
		if (m->id > p->durable)
			p->durable = m->id;
		if (m->arg > p->commits)
			p->commits = m->arg;
		if (m->status == ACKPT_PROGRESS_UPLOADING)
			bar_keepalive(i); /* durable, still uploading: not a silent rank */
		break;
	case BAR_REQUEST:
		bar_start(i, m->arg);
		break;
	case BAR_ACK:
		bar_ack(m->id, i, m->status, p->rank, m->data[0]);
		break;
	case BAR_BYE:
		/* drained and leaving: it owes no barrier anything */
		for (struct bar *b = B.bars, *n; b; b = n) {
			n = b->next;
			if (i < b->nslots && b->waiting[i])
				bar_ack(b->id, i, 0, p->rank, 0);
		}
		p->hello = 0;
		p->alive = 0;
		break;
	default:
		p->alive = 0; /* a participant never sends anything else */
		break;
	}
	return !p->alive;
}

static void part_lost(int i)
{
	struct part *p = &B.parts[i];
	struct bar *b, *n;
	int was = p->hello;

	close(p->fd);
	p->fd = -1;
	p->alive = 0;
	p->hello = 0;
	B.nalive--;
	if (!was || p->observer)
		return;
	B.h.log(0, "coordinator: rank %d's helper was lost without leaving cleanly; commits are "
		"refused until that rank registers again", p->rank);
	if (B.nlost < 64)
		B.lost[B.nlost++] = p->rank;
	for (b = B.bars; b; b = n) {
		n = b->next;
		if (i < b->nslots && b->waiting[i]) {
			B.h.log(0, "coordinator: rank %d's helper was lost with data not yet durable",
				p->rank);
			decide(b, ECONNRESET, p->rank);
		}
	}
}

static void coord_accept(int lfd)
{
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC), one = 1;
		struct part *p;

		if (fd < 0)
			return;
		for (int k = 0; k < B.nparts; k++)
			if (B.parts[k].fd < 0 && !B.parts[k].alive) {
				/* a closed slot: no barrier still waits on it, and
				 * the names its helper owned go with it */
				for (int n = 0; n < B.nnames;)
					if (B.names[n].owner == k)
						B.names[n] = B.names[--B.nnames];
					else
						n++;
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				memset(&B.parts[k], 0, sizeof(B.parts[k]));
				B.parts[k].fd = fd;
				B.parts[k].alive = 1;
				B.parts[k].rank = -1;
				B.parts[k].hello_by = now_ns() + HELLO_WITHIN_NS;
				B.nalive++;
				fd = -1;
				break;
			}
		if (fd < 0)
			continue;
		if (B.nparts == B.capparts) {
			int cap = B.capparts ? 2 * B.capparts : 64;
			struct part *np = realloc(B.parts, cap * sizeof(*np));

			if (!np) {
				close(fd);
				return;
			}
			B.parts = np;
			B.capparts = cap;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		p = &B.parts[B.nparts++];
		memset(p, 0, sizeof(*p));
		p->fd = fd;
		p->alive = 1;
		p->rank = -1;
		p->hello_by = now_ns() + HELLO_WITHIN_NS;
		B.nalive++;
	}
}

/* ---- participant ---- */

static int on_coord_msg(const struct ackpt_bar_msg *m, void *arg)
{
	int i;

	(void)arg;
	if (ackpt_chan_open(&B.cch, m)) {
		B.h.log(0, "a frame from the coordinator failed authentication (forged, replayed or "
			"injected); dropping the connection");
		return 1;
	}
	switch (m->type) {
	case BAR_PREPARE:
		if (B.npend < MAX_PEND) {
			B.pend[B.npend].bid = m->id;
			B.pend[B.npend].target = B.h.staged_seq();
			B.npend++;
		}
		break;
	case BAR_DECISION:
		for (i = 0; i < B.nreq; i++)
			if (m->arg && B.req[i].commit_id == m->arg) {
				if (!m->status && (m->data[0] & ACKPT_BAR_F_UPLOAD_FAILED))
					B.h.upload_failed(m->arg);
				B.h.decided(m->arg, m->status, NULL);
				B.req[i] = B.req[--B.nreq];
				return 0;
			}
		if (m->status == ECANCELED)
			B.h.log(0, "a metadata commit of this job was not made: a write of its "
				"checkpoint returned an error to the program on rank %d", m->rank);
		else if (m->status)
			B.h.log(0, "a metadata commit of this job was aborted: %s (rank %d)",
				strerror(m->status), m->rank);
		break;
	default:
		break;
	}
	return 0;
}

static int connect_coord(void)
{
	uint64_t wait = B.timeout_ns < 120000000000ull ? B.timeout_ns : 120000000000ull;
	struct ackpt_dial d = { .rank = B.rank, .deadline_ns = now_ns() + wait, .log = B.h.log };
	uint64_t id = 0;
	int fd = ackpt_coord_dial(&B.job, &d, &B.cch, &id);

	if (fd < 0)
		return fd;
	B.my_id = (int)id;
	B.cfd = fd;
	return 0;
}

static int is_listener(int fd)
{
	int i;

	for (i = 0; i < B.nlfd; i++)
		if (B.lfd[i] == fd)
			return 1;
	return 0;
}

/* One listening socket on sa, at B.port; 0 or -errno.  With B.port 0 the
 * kernel picks the port, and B.port becomes it (the others follow). */
static int listen_on(const struct sockaddr *sa0, socklen_t len, int v6only)
{
	int fd = socket(sa0->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1, err;
	struct sockaddr_storage sa;

	if (fd < 0)
		return -errno;
	memcpy(&sa, sa0, len);
	if (sa.ss_family == AF_INET6)
		((struct sockaddr_in6 *)&sa)->sin6_port = htons((uint16_t)B.port);
	else
		((struct sockaddr_in *)&sa)->sin_port = htons((uint16_t)B.port);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (sa.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
	if (bind(fd, (struct sockaddr *)&sa, len) < 0 || listen(fd, 4096) < 0) {
		err = errno;
		close(fd);
		return -err;
	}
	if (!B.port) {
		len = sizeof(sa);
		if (getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
			B.port = ntohs(sa.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&sa)->sin6_port :
								  ((struct sockaddr_in *)&sa)->sin_port);
	}
	B.lfd[B.nlfd++] = fd;
	return 0;
}

static int is_loopback(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
	if (sa->sa_family == AF_INET6) {
		const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;

		return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
	}
	return 0;
}

/*
 * Listen where the job talks: on every address of this host that the
 * coordinator's name or address resolves to (IPv4 or IPv6).  When none of
 * them is this host's (a name that resolves elsewhere from here, an address
 * behind NAT), on every interface, dual-stack where the host allows.  A
 * loopback address does not count for a job that may span nodes: a host
 * name often resolves to 127.0.1.1 on its own host and to its real address
 * everywhere else.  Returns 0, or -errno (-EADDRINUSE: something listens
 * there already).
 */
static int coord_listen(void)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
				  .ai_flags = AI_NUMERICSERV }, *ai = NULL, *a;
	char port[16];
	int ret, first = 0;

	snprintf(port, sizeof(port), "%d", B.port);
	if (getaddrinfo(B.job.addr, port, &hints, &ai) == 0) {
		for (a = ai; a && B.nlfd < MAX_LFD; a = a->ai_next) {
			if (B.multi_node && is_loopback(a->ai_addr))
				continue;
			ret = listen_on(a->ai_addr, a->ai_addrlen, 1);
			if (ret < 0 && ret != -EADDRNOTAVAIL && !first)
				first = ret;
		}
		freeaddrinfo(ai);
	}
	if (B.nlfd)
		return 0;
	if (first)
		return first;
	{
		struct sockaddr_in6 s6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_ANY_INIT };
		struct sockaddr_in s4 = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_ANY) };

		ret = listen_on((struct sockaddr *)&s6, sizeof(s6), 0);
		if (ret < 0 && ret != -EADDRINUSE)
			ret = listen_on((struct sockaddr *)&s4, sizeof(s4), 0);
	}
	if (!ret)
		B.h.log(2, "coordinator: no address of %s on this host that other nodes can reach; "
			"listening on every interface", B.job.addr);
	return ret;
}

/* ---- public ---- */

static const char *need_secret =
	"this multi-rank job has no secret: start it with ackpt-run (which makes one), or set "
	"ACKPT_JOB_TOKEN; a rank 0 can also make one and publish it when the job has a managed "
	"root (ACKPT_PATHS) or ACKPT_SECRET_FILE";

/*
 * Host the coordinator: the secret (made here when the job has none),
 * the port (another one when something that cannot prove it knows the
 * secret holds ours; joining it when it can: an exec'd rank 0's previous
 * image), and the job file for whoever must learn either.  1: hosting;
 * 0: joined the one there (B.cfd); -errno with B.broken set.
 */
static int coord_host(const struct ackpt_job *j)
{
	static char why[224];
	int ret, need_file;

	if (B.job.secret_src == ACKPT_SECRET_NONE) {
		if (!j->jobfile[0]) {
			B.broken = need_secret;
			return -ENOKEY;
		}
		ackpt_random(B.job.secret, ACKPT_SECRET_LEN);
		B.job.secret_src = ACKPT_SECRET_MADE;
	}
	ret = coord_listen();
	if (ret == -EADDRINUSE) {
		struct ackpt_dial d = { .rank = B.rank, .give_up_refused = 1,
					.deadline_ns = now_ns() + 3000000000ull, .log = B.h.log };
		uint64_t id;
		int fd = ackpt_coord_dial(&B.job, &d, &B.cch, &id);

		if (fd >= 0) {
			B.h.log(2, "coordinator: this job's coordinator already listens on %s port %d "
				"(an earlier image of this rank); joining it", B.job.addr, B.port);
			B.cfd = fd;
			B.my_id = (int)id;
			return 0;
		}
		if (!j->jobfile[0]) {
			snprintf(why, sizeof(why), "port %d on %s is taken by a program that does not "
				 "know the job's secret, and there is no job file to publish another in: "
				 "set ACKPT_COORD=host:port to a free port", B.port, B.job.addr);
			B.broken = why;
			return -EADDRINUSE;
		}
		B.port = 0;
		ret = coord_listen();
		if (!ret)
			B.h.log(1, "coordinator: port %d on %s is taken by a program that does not know "
				"the job's secret; listening on port %d instead, published in %s",
				j->port, B.job.addr, B.port, j->jobfile);
	}
	if (ret) {
		snprintf(why, sizeof(why), "cannot host the barrier coordinator on %s port %d: %s",
			 B.job.addr, j->port, strerror(-ret));
		B.broken = why;
		return ret;
	}
	/* a secret nobody else has, a port nobody expects, or ranks whose own
	 * ackpt-run made them another secret (one per node under torchrun, one
	 * per task under `srun ackpt-run`): they learn it from the file.  Only
	 * the ranks of one torchrun on one node surely share our environment. */
	need_file = B.job.secret_src == ACKPT_SECRET_MADE || B.port != j->port ||
		    (B.job.secret_src != ACKPT_SECRET_TOKEN && !j->one_launcher);
	if (!need_file && j->jobfile[0]) {
		/* a killed coordinator's file of the same name would send the
		 * ranks to its old port first */
		if (unlink(j->jobfile) == 0)
			B.h.log(3, "coordinator: removed a stale job file %s", j->jobfile);
	}
	if (need_file) {
		B.pub.port = B.port;
		B.pub.has_secret = B.job.secret_src != ACKPT_SECRET_TOKEN;
		memcpy(B.pub.secret, B.job.secret, ACKPT_SECRET_LEN);
		ret = j->jobfile[0] ? ackpt_jobfile_write(&B.job, &B.pub) : -ENOENT;
		if (!ret) {
			B.published = 1;
		} else if (B.job.secret_src == ACKPT_SECRET_MADE || B.port != j->port) {
			snprintf(why, sizeof(why), "cannot write the job file %s: %s", j->jobfile,
				 strerror(-ret));
			B.broken = why;
			return ret;
		} else {
			B.h.log(1, "coordinator: cannot write the job file %s (%s); other nodes need "
				"this node's ACKPT_SECRET or ACKPT_JOB_TOKEN", j->jobfile[0] ?
				j->jobfile : "(no managed root)", strerror(-ret));
		}
	}
	B.host = 1;
	B.h.log(3, "coordinator listening on %s port %d (%d socket%s)%s", B.job.addr, B.port, B.nlfd,
		B.nlfd > 1 ? "s" : "", B.published ? ", published in the job file" : "");
	return 1;
}

int bar_init(const struct bar_hooks *hooks, const struct ackpt_helper_config *cfg)
{
	const struct ackpt_job *j = &cfg->job;

	B.h = *hooks;
	B.rank = j->rank;
	B.world = j->world;
	B.multi_node = ackpt_job_multi_node(j);
	B.timeout_ns = cfg->barrier_timeout_ns ? cfg->barrier_timeout_ns : 600ull * 1000000000ull;
	B.uploading = cfg->upload_url[0] != 0;
	if (!j->global)
		return 0; /* a single process: the barrier is a local drain */
	B.global = 1;
	if (j->broken[0]) {
		B.broken = j->broken;
		B.h.log(0, "%s; metadata commits will be aborted", B.broken);
		return 0;
	}
	if (ackpt_crypto_init() < 0) {
		B.broken = "libsodium cannot initialise (no randomness?)";
		B.h.log(0, "%s; metadata commits will be aborted", B.broken);
		return 0;
	}
	B.job = *j;
	B.port = j->port;

	if (cfg->coord_host) {
		struct rlimit rl;

		if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
			rl.rlim_cur = rl.rlim_max;
			setrlimit(RLIMIT_NOFILE, &rl);
		}
		/* a coordinator that cannot be hosted fails every commit, loudly;
		 * the helper still runs, so writes stay asynchronous */
		if (coord_host(j) < 0)
			B.h.log(0, "%s; metadata commits will be aborted", B.broken);
		return 0;
	}
	{
		int ret = connect_coord();

		if (ret < 0) {
			B.h.log(0, "cannot register with the coordinator at %s:%d: %s", B.job.addr, B.port,
				ret == -EACCES ? "no listener there proves it knows the job's secret "
						 "(another program on the port?)" :
				ret == -ENOKEY ? "it holds another secret than this rank, and no job "
						 "file gives it (start every node with the same "
						 "ACKPT_JOB_TOKEN, or give the job a managed root on "
						 "shared storage)" :
				strerror(-ret));
			return ret;
		}
	}
	return 0;
}

int bar_is_global(void) { return B.global; }

int bar_part_id(void)
{
	if (!B.global)
		return -1;
	return B.host ? ACKPT_COORD_LOCAL : B.cfd >= 0 ? B.my_id : -1;
}

/*
 * Tell the coordinator how far we have got, when a program process has
 * announced names that wait for it (ann_*: the highest op seq and commit
 * id announced).  The caller fences between publishing durable/commits
 * and reading ann_*; the announcer fences the other way round and sends
 * the progress it saw, so one of the two always reports it.
 */
void bar_progress(uint64_t durable, uint64_t commits, uint64_t ann_seq, uint64_t ann_commit)
{
	if (!B.global || B.host || B.cfd < 0)
		return;
	if (durable == B.sent_durable && commits == B.sent_commits)
		return;
	if (B.sent_durable >= ann_seq && B.sent_commits >= ann_commit && !B.progress_owed)
		return;
	if (send_coord(BAR_PROGRESS, durable, commits, 0, 0) < 0) {
		B.progress_owed = 1; /* the socket is full: again at the next tick */
		return;
	}
	B.progress_owed = 0;
	B.sent_durable = durable;
	B.sent_commits = commits;
}
int bar_rank(void) { return B.rank; }

int bar_participants(void)
{
	return B.nalive;
}

void bar_request(uint64_t commit_id)
{
	if (!B.global) {
		/* a single process: the drain is done (the commit op waited for
		 * every earlier op); commit only if nothing failed since the
		 * last commit */
		int err = B.h.error_since_ack();

		B.h.decided(commit_id, err, err ? "a write of this checkpoint failed" : NULL);
		return;
	}
	if (B.broken) {
		B.h.decided(commit_id, EDESTADDRREQ, B.broken);
		return;
	}
	if (B.host) {
		bar_start(LOCAL, commit_id);
		return;
	}
	if (B.cfd < 0 || send_coord(BAR_REQUEST, 0, commit_id, 0, 0) < 0) {
		B.h.decided(commit_id, ENOTCONN, "the coordinator is gone");
		return;
	}
	if (B.nreq < MAX_REQ) {
		B.req[B.nreq].commit_id = commit_id;
		B.req[B.nreq].deadline = now_ns() + B.timeout_ns + 5000000000ull;
		B.nreq++;
	}
}

int bar_pollfds(struct pollfd *p, int max)
{
	int n = 0, i;

	if (B.cfd >= 0 && n < max) {
		p[n].fd = B.cfd;
		p[n++].events = POLLIN;
	}
	for (i = 0; i < B.nlfd && n < max; i++) {
		p[n].fd = B.lfd[i];
		p[n++].events = POLLIN;
	}
	for (i = 0; i < B.nparts && n < max; i++)
		if (B.parts[i].fd >= 0) {
			p[n].fd = B.parts[i].fd;
			p[n++].events = POLLIN;
		}
	return n;
}

void bar_handle(const struct pollfd *p, int n)
{
	int k, i;

	for (k = 0; k < n; k++) {
		if (!p[k].revents)
			continue;
		if (p[k].fd == B.cfd) {
			if (read_frames(B.cfd, B.crbuf, &B.crlen, on_coord_msg, NULL) < 0) {
				B.h.log(0, "lost the coordinator; pending metadata commits are aborted");
				close(B.cfd);
				B.cfd = -1;
				while (B.nreq)
					B.h.decided(B.req[--B.nreq].commit_id, ENOTCONN,
						    "the coordinator is gone");
			}
		} else if (is_listener(p[k].fd)) {
			coord_accept(p[k].fd);
		} else {
			for (i = 0; i < B.nparts; i++)
				if (B.parts[i].fd == p[k].fd)
					break;
			if (i == B.nparts)
				continue;
			if (read_frames(B.parts[i].fd, B.parts[i].rbuf, &B.parts[i].rlen, on_part_msg,
					(void *)(intptr_t)i) < 0 ||
			    !B.parts[i].alive) {
				int bye = !B.parts[i].alive && !B.parts[i].hello;

				if (bye && B.parts[i].fd >= 0) {
					close(B.parts[i].fd);
					B.parts[i].fd = -1;
					B.nalive--;
				} else {
					part_lost(i);
				}
			}
		}
	}
}

/*
 * Before a barrier is declared timed out: read what peers have already
 * sent. The helper may have been busy (its own I/O) while their ACKs
 * arrived; an answer that is waiting in a socket is an answer.
 */
static void read_ready_peers(void)
{
	int max = B.nparts + 2 + MAX_LFD, n;
	struct pollfd *p = calloc((size_t)max, sizeof(*p));

	if (!p)
		return;
	n = bar_pollfds(p, max);
	if (n > 0 && poll(p, (nfds_t)n, 0) > 0)
		bar_handle(p, n);
	free(p);
}

int bar_tick(void)
{
	uint64_t now = now_ns(), durable;
	struct bar *b, *n;
	int i, next = -1;

	for (b = B.bars; b; b = b->next)
		if (now >= b->deadline) {
			read_ready_peers();
			break;
		}
	for (i = 0; i < B.nparts; i++) {
		struct part *p = &B.parts[i];

		/* idle strangers must not hold descriptors and slots forever */
		if (p->fd >= 0 && p->alive && !p->hello && now >= p->hello_by) {
			B.h.log(1, "coordinator: closed a connection that sent no HELLO within %.0f s",
				HELLO_WITHIN_NS / 1e9);
			close(p->fd);
			p->fd = -1;
			p->alive = 0;
			B.nalive--;
		}
	}
	durable = B.h.durable_seq();

	for (i = 0; i < B.npend;) {
		uint32_t uflags = 0;

		/* durable, and (uploading) every upload of a file closed
		 * before the barrier is over: a marker then never reaches
		 * the object store before the data it names */
		if (durable >= B.pend[i].target && B.h.uploaded(B.pend[i].target, &uflags)) {
			int err = B.h.error_since_ack();
			uint64_t bid = B.pend[i].bid;
			uint8_t f = (uflags & 1) ? ACKPT_BAR_F_UPLOAD_FAILED : 0;

			if (bid & (1ull << 63))
				bar_ack(bid & ~(1ull << 63), LOCAL, err, B.rank, f);
			else if (B.cfd >= 0)
				send_coord(BAR_ACK, bid, 0, err, f);
			B.pend[i] = B.pend[--B.npend];
			continue;
		}
		if (durable >= B.pend[i].target && now >= B.keepalive_at) {
			/* durable; its uploads are still going (each ends, done or
			 * failed, after bounded retries): tell the coordinator this
			 * rank is not silent, so the barrier waits for them */
			B.keepalive_at = now + (B.timeout_ns / 3 < 5000000000ull ? B.timeout_ns / 3
									      : 5000000000ull);
			if (B.pend[i].bid & (1ull << 63))
				bar_keepalive(LOCAL);
			else if (B.cfd >= 0)
				send_coord(BAR_PROGRESS, B.sent_durable, B.sent_commits,
					   ACKPT_PROGRESS_UPLOADING, 0);
		}
		i++;
	}
	for (b = B.bars; b; b = n) {
		n = b->next;
		if (now >= b->deadline) {
			int culprit = -1, j;

			for (j = 0; j < b->nslots; j++)
				if (b->waiting[j]) {
					culprit = B.parts[j].rank;
					break;
				}
			if (culprit < 0 && b->waiting[b->nslots])
				culprit = B.rank;
			B.h.log(0, "coordinator: no answer from rank %d within %.0f s", culprit,
				B.timeout_ns / 1e9);
			decide(b, ETIMEDOUT, culprit);
		} else {
			int ms = (int)((b->deadline - now) / 1000000) + 1;

			if (next < 0 || ms < next)
				next = ms;
		}
	}
	for (i = 0; i < B.nreq;) {
		/* with uploads, the coordinator's barrier may wait longer than the
		 * timeout (ranks still uploading keep it open): its decision, or
		 * the loss of its connection, is what ends the wait */
		if (now >= B.req[i].deadline && !B.uploading) {
			B.h.decided(B.req[i].commit_id, ETIMEDOUT, "no decision from the coordinator");
			B.req[i] = B.req[--B.nreq];
			continue;
		}
		i++;
	}
	if (B.npend && (next < 0 || next > 50))
		next = 50;
	if (B.nreq && (next < 0 || next > 1000))
		next = 1000;
	if (B.progress_owed && (next < 0 || next > 10))
		next = 10;
	return next;
}

/* participants that completed HELLO and have not left */
static int registered(void)
{
	int i, n = 0;

	for (i = 0; i < B.nparts; i++)
		n += B.parts[i].alive && B.parts[i].hello && !B.parts[i].observer;
	return n;
}

void bar_shutdown(void)
{
	if (B.cfd >= 0) {
		send_coord(BAR_BYE, 0, 0, 0, 0);
		close(B.cfd);
		B.cfd = -1;
	}
	if (B.host) {
		/* others may still need us: wait (bounded) until they leave */
		uint64_t deadline = now_ns() + B.timeout_ns;
		struct pollfd *p = calloc(B.capparts + 2 + MAX_LFD, sizeof(*p));
		int logged = 0;

		while (p && registered() > 0 && now_ns() < deadline) {
			int n = bar_pollfds(p, B.capparts + 2 + MAX_LFD), t;

			if (!logged) {
				B.h.log(3, "coordinator: waiting for %d participant(s) to leave", registered());
				logged = 1;
			}
			t = bar_tick();
			if (poll(p, n, t < 0 || t > 1000 ? 1000 : t) > 0)
				bar_handle(p, n);
			/* refresh after possible growth */
			free(p);
			p = calloc(B.capparts + 2 + MAX_LFD, sizeof(*p));
		}
		free(p);
		while (B.nlfd)
			close(B.lfd[--B.nlfd]);
		if (B.published)
			ackpt_jobfile_remove(&B.job, &B.pub);
	}
}
