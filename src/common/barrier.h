/*
 * The barrier control plane between helpers (TCP).  Rank 0's helper hosts
 * the coordinator; every other helper registers on start.  Frames are fixed
 * 48 bytes, versioned, and a connection is accepted only after a HELLO
 * carrying the job token, so a stray peer cannot forge an acknowledgement.
 */
#ifndef ACKPT_BARRIER_H
#define ACKPT_BARRIER_H

#include <stdint.h>

#define ACKPT_BAR_MAGIC   0x42504b41u /* "AKPB" */
#define ACKPT_BAR_VERSION 1
#define ACKPT_TOKEN_LEN   16

enum ackpt_bar_type {
	BAR_HELLO = 1,   /* participant -> coord: token, pid, rank */
	BAR_WELCOME,     /* coord -> participant: participant id */
	BAR_REQUEST,     /* participant -> coord: please run barrier for commit `id` */
	BAR_PREPARE,     /* coord -> all: note your staged position, ack when durable */
	BAR_ACK,         /* participant -> coord: barrier `id` durable (status 0) or errno */
	BAR_DECISION,    /* coord -> requester and all: status 0 commit, else abort */
	BAR_BYE,         /* participant -> coord: drained and leaving cleanly */
};

struct ackpt_bar_msg {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint64_t id;        /* barrier id (coordinator's) or commit id (requester's) */
	uint64_t arg;       /* REQUEST: commit id; DECISION: commit id of the requester */
	int32_t status;     /* 0 or a positive errno */
	int32_t rank;
	uint8_t token[ACKPT_TOKEN_LEN]; /* HELLO only; zero elsewhere */
};

_Static_assert(sizeof(struct ackpt_bar_msg) == 48, "barrier frames are 48 bytes");

/* The coordinator listens on MASTER_PORT + this offset when only torchrun's
 * MASTER_ADDR/MASTER_PORT are known (torch's store owns MASTER_PORT). */
#define ACKPT_COORD_PORT_OFFSET 2719

#endif
