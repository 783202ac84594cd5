/*
 * The global durability barrier, helper side: job discovery, the
 * coordinator (hosted by rank 0's helper) and the participant client.
 * See docs/BARRIER.md for why this covers every staged byte.
 */
#ifndef ACKPT_HELPER_BARRIER_H
#define ACKPT_HELPER_BARRIER_H

#include <poll.h>
#include <stdint.h>

struct bar_hooks {
	uint64_t (*staged_seq)(void);   /* how far the shim has filled our queue */
	uint64_t (*durable_seq)(void);  /* how far it is durable */
	uint64_t (*commits_done)(void); /* commit ids <= this are finished */
	int (*error_since_ack)(void);   /* errno of a write error since the last ack, or 0 */
	void (*decided)(uint64_t commit_id, int status, const char *why);
	void (*log)(int level, const char *fmt, ...);
	/* uploads (upload.h): are those of ops <= target over?  *flags gets
	 * 1 when one failed for good; and a commit whose barrier saw that */
	int (*uploaded)(uint64_t target, uint32_t *flags);
	void (*upload_failed)(uint64_t commit_id);
};

struct ackpt_helper_config;
/* Returns 0, or -errno when a multi-rank job cannot reach its coordinator.
 * cfg: the shim's validated configuration, with the job. */
int bar_init(const struct bar_hooks *hooks, const struct ackpt_helper_config *cfg);
int bar_is_global(void);         /* 0: single process, the barrier is a local drain */
int bar_rank(void);
/* Ask for a barrier for local commit `commit_id`; the result comes via hooks->decided. */
void bar_request(uint64_t commit_id);
/* Fill pollfds (at most max); returns how many. */
int bar_pollfds(struct pollfd *p, int max);
void bar_handle(const struct pollfd *p, int n);
/* Timeouts and acks that became due; returns ms until the next deadline (or -1). */
int bar_tick(void);
/* Leave cleanly; a host waits (bounded) for its participants to leave first. */
void bar_shutdown(void);
int bar_participants(void);
/* Our participant id at the coordinator (ACKPT_COORD_LOCAL when we host
 * it), or -1 when not registered. */
int bar_part_id(void);
void bar_progress(uint64_t durable, uint64_t commits, uint64_t ann_seq, uint64_t ann_commit);

#endif
