/*
 * The one clock the shim and the helper measure waits and deadlines with.
 */
#ifndef ACKPT_CLOCK_H
#define ACKPT_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t now_ns(void) /* CLOCK_MONOTONIC */
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif
