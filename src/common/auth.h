/*
 * Who may talk to the barrier coordinator: the job's secret, the handshake
 * that proves both ends know it without sending it, and the per-frame MAC
 * and sequence number that keep a connection authentic after that
 * (docs/BARRIER.md, "Threat model").  Shared by the helper (coordinator
 * and participants) and the shim (observers), which dial the same way.
 *
 * Primitives are libsodium's keyed BLAKE2b (crypto_generichash): proofs,
 * session keys and frame MACs.  Nothing here is a hand-written primitive.
 */
#ifndef ACKPT_AUTH_H
#define ACKPT_AUTH_H

#include <stddef.h>
#include <stdint.h>

#include "barrier.h"

struct ackpt_job;

#define ACKPT_SECRET_LEN 32

/* Where a job's secret came from (struct ackpt_job.secret_src). */
enum ackpt_secret_src {
	ACKPT_SECRET_NONE = 0, /* none yet: the job file's, or the coordinator makes one */
	ACKPT_SECRET_TOKEN,    /* ACKPT_JOB_TOKEN, hashed */
	ACKPT_SECRET_ENV,      /* ACKPT_SECRET (ackpt-run made it) */
	ACKPT_SECRET_MADE,     /* made by the coordinator's host, published in the job file */
};

/* One authenticated connection: the session key and both sequence numbers. */
struct ackpt_chan {
	uint8_t key[32];
	uint64_t tx, rx;
	char side;             /* 'c' participant or observer, 's' coordinator */
};

/* 0, or -1 when libsodium cannot initialise (no randomness). */
int ackpt_crypto_init(void);
void ackpt_random(void *buf, size_t n);

/* A public name for a secret: what the coordinator says it holds, so that
 * a process with another secret knows to look in the job file. */
uint64_t ackpt_secret_fp(const uint8_t secret[ACKPT_SECRET_LEN]);
void ackpt_secret_from_token(const char *token, uint8_t out[ACKPT_SECRET_LEN]);
/* 64 hex digits -> 0, else -1. */
int ackpt_secret_parse(const char *hex, uint8_t out[ACKPT_SECRET_LEN]);
void ackpt_secret_hex(const uint8_t s[ACKPT_SECRET_LEN], char out[2 * ACKPT_SECRET_LEN + 1]);

/*
 * The handshake (docs/BARRIER.md, "Handshake"):
 *   HELLO      client -> coord: rank, observer flag, pid, a fresh nonce
 *   CHALLENGE  coord -> client: the secret's fingerprint, a fresh nonce,
 *              and the coordinator's proof over both frames
 *   PROOF      client -> coord: the client's proof over both frames
 *   WELCOME    coord -> client: the first sealed frame
 * Both then derive the session key from the secret and both frames.
 */
void ackpt_hs_hello(struct ackpt_bar_msg *m, int rank, int observer, uint64_t pid);
void ackpt_hs_challenge(struct ackpt_bar_msg *c, const uint8_t secret[ACKPT_SECRET_LEN],
			const struct ackpt_bar_msg *hello);
/* who: 's' the coordinator's proof, 'c' the client's. */
void ackpt_hs_proof(const uint8_t secret[ACKPT_SECRET_LEN], char who,
		    const struct ackpt_bar_msg *hello, const struct ackpt_bar_msg *chal,
		    uint8_t out[ACKPT_MAC_LEN]);
/* 1 when mac is the proof of who, in constant time. */
int ackpt_hs_check(const uint8_t secret[ACKPT_SECRET_LEN], char who,
		   const struct ackpt_bar_msg *hello, const struct ackpt_bar_msg *chal,
		   const uint8_t mac[ACKPT_MAC_LEN]);
void ackpt_chan_init(struct ackpt_chan *c, const uint8_t secret[ACKPT_SECRET_LEN],
		     const struct ackpt_bar_msg *hello, const struct ackpt_bar_msg *chal, char side);
/* Stamp the next sequence number and the MAC.  The caller counts the frame
 * as sent (ackpt_chan_sent) only once all of it is in the socket. */
void ackpt_chan_seal(const struct ackpt_chan *c, struct ackpt_bar_msg *m);
static inline void ackpt_chan_sent(struct ackpt_chan *c) { c->tx++; }
/* 0 when m is the next frame from the other side, else -EBADMSG (forged,
 * replayed, reordered or from another connection). */
int ackpt_chan_open(struct ackpt_chan *c, const struct ackpt_bar_msg *m);

/* Send n whole frames on a non-blocking socket, or read one (checking
 * magic and version), waiting until deadline_ns; 0 or -errno (-ETIMEDOUT,
 * -ECONNRESET at end of stream, -EPROTO). */
int ackpt_frames_send(int fd, const struct ackpt_bar_msg *m, int n, uint64_t deadline_ns);
int ackpt_frame_recv(int fd, struct ackpt_bar_msg *m, uint64_t deadline_ns);

/*
 * The job file, <first managed root>/.ackpt-job.<job name> (or
 * ACKPT_SECRET_FILE): what the coordinator's host publishes for the rest
 * of the job, mode 0600 -- the port it listens on and, unless the secret is
 * ACKPT_JOB_TOKEN, the secret.  Read with raw system calls (the shim must
 * not see its own reads).
 */
struct ackpt_jobfile {
	int port;
	int has_secret;
	uint8_t secret[ACKPT_SECRET_LEN];
};

/* 0, or -errno (-ENOENT: not there, -EBADMSG: not a job file). */
int ackpt_jobfile_read(const struct ackpt_job *j, struct ackpt_jobfile *f);
/* Write it atomically (temporary, fsync, rename); 0 or -errno. */
int ackpt_jobfile_write(const struct ackpt_job *j, const struct ackpt_jobfile *f);
/* Remove it if it still says what f says (a later job may own it now). */
void ackpt_jobfile_remove(const struct ackpt_job *j, const struct ackpt_jobfile *f);

/*
 * Dial the coordinator and authenticate both ways.  Tries the port the job
 * file publishes (when there is one) and the job's own port, each address
 * its host name resolves to; a listener that cannot prove it knows the
 * secret is never trusted.  Retries until deadline_ns (CLOCK_MONOTONIC)
 * unless give_up_refused and nothing listens anywhere, or one_round.
 * Returns the connected, non-blocking descriptor with *ch ready and
 * *welcome_id the coordinator's id for us, or -errno:
 *   -ECONNREFUSED  nothing listens (only with give_up_refused)
 *   -EACCES        listeners answered, none proved it knows the secret
 *   -ENOKEY        the coordinator holds a secret we have not got
 *   -ETIMEDOUT     nothing answered in time
 * log(level, fmt, ...) reports waits and impostors (may be NULL).
 */
struct ackpt_dial {
	int rank;
	int observer;
	int give_up_refused;
	int one_round;         /* every address once, no retries */
	uint64_t deadline_ns;
	void (*log)(int level, const char *fmt, ...);
};

int ackpt_coord_dial(const struct ackpt_job *j, const struct ackpt_dial *d, struct ackpt_chan *ch,
		     uint64_t *welcome_id);

#endif
