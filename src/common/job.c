/*
 * Job discovery from the environment: RANK/WORLD_SIZE (torchrun) or
 * SLURM_PROCID/SLURM_NTASKS; nodes from torchrun's GROUP_WORLD_SIZE,
 * Slurm's SLURM_NNODES, or WORLD_SIZE/LOCAL_WORLD_SIZE.  The coordinator
 * is ACKPT_COORD=host:port, else MASTER_ADDR and MASTER_PORT + offset.
 * The secret is ACKPT_JOB_TOKEN's, else ACKPT_SECRET's (ackpt-run makes
 * one per launch), else the job file's (src/common/auth.h).
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

/* FNV-1a: names the job file, nothing more (anyone can compute it). */
static uint64_t job_name(const char *s)
{
	uint64_t a = 0xcbf29ce484222325ull;

	for (; *s; s++)
		a = (a ^ (unsigned char)*s) * 0x100000001b3ull;
	return a;
}

/* ACKPT_SECRET_FILE, else a file in the first managed root that is a plain
 * directory (not a glob): on shared storage in a job that spans nodes. */
static void find_jobfile(struct ackpt_job *j)
{
	const char *f = getenv("ACKPT_SECRET_FILE"), *paths = getenv("ACKPT_PATHS"), *end;

	if (f && *f) {
		if (f[0] != '/')
			snprintf(j->broken, sizeof(j->broken), "ACKPT_SECRET_FILE must be an absolute path");
		else
			snprintf(j->jobfile, sizeof(j->jobfile), "%s", f);
		return;
	}
	for (; paths && *paths; paths = *end ? end + 1 : end) {
		size_t n;

		end = strchr(paths, ':');
		if (!end)
			end = paths + strlen(paths);
		n = (size_t)(end - paths);
		while (n > 1 && paths[n - 1] == '/')
			n--;
		if (paths[0] != '/' || memchr(paths, '*', n) || memchr(paths, '?', n) ||
		    memchr(paths, '[', n) || n + 32 > sizeof(j->jobfile))
			continue;
		snprintf(j->jobfile, sizeof(j->jobfile), "%.*s/.ackpt-job.%016llx", (int)n, paths,
			 (unsigned long long)j->name);
		return;
	}
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
	const char *sec = getenv("ACKPT_SECRET");
	char idbuf[512];

	memset(j, 0, sizeof(*j));
	j->rank = env_int("RANK", "SLURM_PROCID", 0);
	j->world = env_int("WORLD_SIZE", "SLURM_NTASKS", 1);
	j->nodes = count_nodes(j->world);
	j->one_launcher = j->nodes == 1 && getenv("TORCHELASTIC_RUN_ID") != NULL;
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
	snprintf(idbuf, sizeof(idbuf), "%s|%s:%d",
		 getenv("TORCHELASTIC_RUN_ID") ? getenv("TORCHELASTIC_RUN_ID") :
		 getenv("SLURM_JOB_ID") ? getenv("SLURM_JOB_ID") : "", j->addr, j->port);
	j->name = job_name(idbuf);
	if (tok && *tok) {
		ackpt_secret_from_token(tok, j->secret);
		j->secret_src = ACKPT_SECRET_TOKEN;
	} else if (sec && *sec) {
		if (ackpt_secret_parse(sec, j->secret) < 0) {
			snprintf(j->broken, sizeof(j->broken), "ACKPT_SECRET is invalid (expected 64 hex "
				 "digits, as ackpt-run makes it)");
			return;
		}
		j->secret_src = ACKPT_SECRET_ENV;
	}
	find_jobfile(j);
}
