/*
 * The barrier control plane between helpers (TCP).  Rank 0's helper hosts
 * the coordinator; every other helper registers on start.  Frames are fixed
 * 72 bytes and versioned.  A connection counts only after both ends proved
 * they know the job's secret (HELLO, CHALLENGE, PROOF: src/common/auth.h);
 * every frame after that carries a sequence number and a MAC, so a stray
 * peer can neither forge, replay nor inject an acknowledgement.
 */
#ifndef ACKPT_BARRIER_H
#define ACKPT_BARRIER_H

#include <stdint.h>

#define ACKPT_BAR_MAGIC   0x42504b41u /* "AKPB" */
#define ACKPT_BAR_VERSION 3 /* 2: observers, NAME, QUERY, ANSWER, PROGRESS;
			     * 3: CHALLENGE, PROOF, sealed frames */
#define ACKPT_NONCE_LEN   16
#define ACKPT_MAC_LEN     16

enum ackpt_bar_type {
	BAR_HELLO = 1,   /* participant -> coord: rank, status ACKPT_HELLO_OBSERVER or 0,
			  * arg its pid, data a fresh nonce (not sealed) */
	BAR_WELCOME,     /* coord -> participant: participant id (the first sealed frame) */
	BAR_REQUEST,     /* participant -> coord: please run barrier for commit `id` */
	BAR_PREPARE,     /* coord -> all: note your staged position, ack when durable */
	BAR_ACK,         /* participant -> coord: barrier `id` durable (status 0) or errno */
	BAR_DECISION,    /* coord -> requester and all: status 0 commit, else abort */
	BAR_BYE,         /* participant -> coord: drained and leaving cleanly */
	/* Other nodes' pending names (docs/DESIGN.md 3.17).  An observer is a
	 * program process (its shim): it says HELLO with status
	 * ACKPT_HELLO_OBSERVER and never takes part in a barrier. */
	BAR_NAME,        /* observer -> coord: a name with pending work: id hash, arg
			  * the op seq or commit id that settles it, status NAME_*,
			  * rank the owning helper's participant id (ACKPT_COORD_LOCAL:
			  * the host), data[0..8) the node id, data[8..16) the owner's
			  * progress (durable seq or commits done) when sent */
	BAR_QUERY,       /* observer -> coord: id hash, status NAME_DIR or 0, data[0..8)
			  * the asker's node id: is it pending on another node? */
	BAR_ANSWER,      /* coord -> observer: one per NAME or QUERY, in order; status 1
			  * pending, 0 not */
	BAR_PROGRESS,    /* participant -> coord: id its durable seq, arg its commits done */
	BAR_CHALLENGE,   /* coord -> client: id the secret's fingerprint, data a fresh
			  * nonce, mac the coordinator's proof (not sealed) */
	BAR_PROOF,       /* client -> coord: mac the client's proof (not sealed) */
};

#define ACKPT_HELLO_OBSERVER 1
/* data[0] of ACK and DECISION: an upload of this barrier's data failed for
 * good somewhere, so its marker is committed but not uploaded */
#define ACKPT_BAR_F_UPLOAD_FAILED 0x1
/* status of a PROGRESS: my data is durable and my uploads for a barrier I
 * owe an ACK are still going: keep it open (every few seconds; uploads end,
 * done or failed, after bounded retries) */
#define ACKPT_PROGRESS_UPLOADING 1
#define ACKPT_NAME_COMMIT    0x1 /* arg is a commit id (else an op seq) */
#define ACKPT_NAME_DIR       0x2 /* the hash is of a directory the name is in */
#define ACKPT_COORD_LOCAL    0x7fffffff /* participant id of the host's own helper */

struct ackpt_bar_msg {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint64_t id;        /* barrier id (coordinator's) or commit id (requester's) */
	uint64_t arg;       /* REQUEST: commit id; DECISION: commit id of the requester */
	int32_t status;     /* 0 or a positive errno */
	int32_t rank;
	uint8_t data[ACKPT_NONCE_LEN]; /* HELLO, CHALLENGE: a nonce; NAME, QUERY: see above */
	uint64_t seq;       /* sealed frames: this direction's frame number, from 0 */
	uint8_t mac[ACKPT_MAC_LEN]; /* sealed: MAC of the frame up to here; CHALLENGE,
				     * PROOF: the proof */
};

_Static_assert(sizeof(struct ackpt_bar_msg) == 72, "barrier frames are 72 bytes");

/* The coordinator listens on MASTER_PORT + this offset when only torchrun's
 * MASTER_ADDR/MASTER_PORT are known (torch's store owns MASTER_PORT). */
#define ACKPT_COORD_PORT_OFFSET 2719

#endif
