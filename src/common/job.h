/*
 * The job a process belongs to, as its environment describes it: rank,
 * world, how many nodes, where the barrier coordinator listens, and the
 * job secret that admits a connection there.  Shared by the shim (which
 * asks the coordinator about other nodes' pending names) and the helper
 * (which takes part in barriers), so both derive the same address and
 * secret from the same variables.
 */
#ifndef ACKPT_JOB_H
#define ACKPT_JOB_H

#include <stdint.h>

#include "auth.h"
#include "barrier.h"

struct ackpt_job {
	int rank, world;
	int nodes;            /* nodes in the job; 0 when the environment does not say */
	int global;           /* a job with a global barrier (world > 1 or ACKPT_COORD) */
	int one_launcher;     /* every rank is a child of one torchrun: one environment */
	char addr[256];       /* coordinator host ("" when unknown) */
	int port;             /* coordinator port (0 when unknown) */
	uint64_t name;        /* names the job file (not a secret) */
	int secret_src;       /* enum ackpt_secret_src */
	uint8_t secret[ACKPT_SECRET_LEN]; /* when secret_src is not NONE */
	char jobfile[512];    /* where the coordinator publishes its port (and the
			       * secret); "" when no managed root says where */
	char broken[160];     /* why the coordinator cannot be reached, or "" */
};

/* Fill j from the environment.  Never fails: j->broken says what is wrong. */
void ackpt_job_discover(struct ackpt_job *j);

/* More than one node may take part: other nodes can hold pending names. */
static inline int ackpt_job_multi_node(const struct ackpt_job *j)
{
	return j->global && j->nodes != 1;
}

#endif
