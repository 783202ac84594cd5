/*
 * Job discovery from the environment: RANK/WORLD_SIZE (torchrun) or
 * SLURM_PROCID/SLURM_NTASKS; nodes from torchrun's GROUP_WORLD_SIZE,
 * Slurm's SLURM_NNODES, or WORLD_SIZE/LOCAL_WORLD_SIZE.  The coordinator
 * is ACKPT_COORD=host:port, else MASTER_ADDR and MASTER_PORT + offset.
 */
#include "job.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int env_int(const char *a, const char *b, int dflt)
{
	const char *v = getenv(a);

	if ((!v || !*v) && b)
		v = getenv(b);
	return v && *v ? atoi(v) : dflt;
}

/* 128-bit FNV-1a twice with different seeds: identifies the job, not a MAC. */
static void derive_token(const char *s, uint8_t out[ACKPT_TOKEN_LEN])
{
	uint64_t a = 0xcbf29ce484222325ull, b = 0x84222325cbf29ce4ull;
	const unsigned char *p;

	for (p = (const unsigned char *)s; *p; p++) {
		a = (a ^ *p) * 0x100000001b3ull;
		b = (b ^ (*p + 0x5bu)) * 0x100000001b3ull;
	}
	memcpy(out, &a, 8);
	memcpy(out + 8, &b, 8);
}

static int count_nodes(int world)
{
	int n = env_int("GROUP_WORLD_SIZE", NULL, 0), local;

	if (n > 0)
		return n;
	n = env_int("SLURM_NNODES", "SLURM_JOB_NUM_NODES", 0);
	if (n > 0 && getenv("SLURM_PROCID") && !getenv("RANK"))
		return n;
	local = env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", 0);
	if (local > 0 && world > 0)
		return (world + local - 1) / local;
	return 0;
}

void ackpt_job_discover(struct ackpt_job *j)
{
	const char *coord = getenv("ACKPT_COORD"), *tok = getenv("ACKPT_JOB_TOKEN");
	char idbuf[512];

	memset(j, 0, sizeof(*j));
	j->rank = env_int("RANK", "SLURM_PROCID", 0);
	j->world = env_int("WORLD_SIZE", "SLURM_NTASKS", 1);
	j->nodes = count_nodes(j->world);
	if (coord && *coord) {
		const char *colon = strrchr(coord, ':');

		if (!colon || colon == coord || atoi(colon + 1) <= 0 || atoi(colon + 1) > 65535) {
			j->global = 1;
			snprintf(j->broken, sizeof(j->broken), "ACKPT_COORD is invalid (expected host:port)");
			return;
		}
		if (coord[0] == '[' && colon[-1] == ']') /* [v6-address]:port */
			snprintf(j->addr, sizeof(j->addr), "%.*s", (int)(colon - coord - 2), coord + 1);
		else
			snprintf(j->addr, sizeof(j->addr), "%.*s", (int)(colon - coord), coord);
		j->port = atoi(colon + 1);
	} else if (getenv("MASTER_ADDR") && getenv("MASTER_PORT")) {
		snprintf(j->addr, sizeof(j->addr), "%s", getenv("MASTER_ADDR"));
		j->port = (atoi(getenv("MASTER_PORT")) + ACKPT_COORD_PORT_OFFSET - 1024) %
			  (65536 - 1024) + 1024;
	}
	if (j->world <= 1 && !(coord && *coord))
		return; /* a single process: the barrier is a local drain */
	j->global = 1;
	if (!j->port) {
		snprintf(j->broken, sizeof(j->broken), "a multi-rank job needs ACKPT_COORD=host:port "
			 "(or torchrun's MASTER_ADDR/MASTER_PORT)");
		return;
	}
	snprintf(idbuf, sizeof(idbuf), "%s|%s|%s:%d", tok ? tok : "",
		 getenv("TORCHELASTIC_RUN_ID") ? getenv("TORCHELASTIC_RUN_ID") :
		 getenv("SLURM_JOB_ID") ? getenv("SLURM_JOB_ID") : "", j->addr, j->port);
	derive_token(idbuf, j->token);
}
