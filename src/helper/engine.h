/*
 * The helper's I/O engine: io_uring with the staging arena registered as
 * fixed buffers where the kernel and memlock allow, or a pool of pwrite
 * threads where io_uring is unavailable.  Both report completions through
 * one eventfd so the main loop polls a single descriptor.
 */
#ifndef ACKPT_ENGINE_H
#define ACKPT_ENGINE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

enum engine_kind { ENGINE_WRITE, ENGINE_FSYNC };

struct engine_req {
	enum engine_kind kind;
	int fd;
	const void *buf;
	size_t len;
	off_t off;
	int fixed_index;  /* registered buffer index, or -1 */
	void *tag;
};

struct engine;

/* Returns NULL and sets *err (-errno) when the requested engine cannot run. */
struct engine *engine_open_uring(unsigned depth, int *err);
struct engine *engine_open_pool(unsigned threads, int *err);

int engine_event_fd(struct engine *e);
/* Register [base, base+len) as fixed buffers of at most 1 GiB each. */
int engine_register(struct engine *e, void *base, size_t len);
int engine_is_uring(struct engine *e);
int engine_has_fixed(struct engine *e);
/* Queue one request; engine_flush makes queued requests visible. */
int engine_queue(struct engine *e, const struct engine_req *r);
int engine_flush(struct engine *e);
/* Calls cb(tag, res) for every finished request; res is bytes or -errno. */
int engine_reap(struct engine *e, void (*cb)(void *tag, long res, void *arg), void *arg);
unsigned engine_inflight(struct engine *e);

#endif
