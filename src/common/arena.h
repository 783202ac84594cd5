/*
 * Where a chunk goes in the staging arena: both processes rely on this.
 * The arena is a ring of arena_size bytes addressed by monotonic positions
 * (pos % arena_size is the offset).  A chunk starts page-aligned, never
 * wraps the ring, and never crosses a registered-buffer boundary
 * (ACKPT_REG_BUF_MAX), so the helper can write it with one fixed-buffer
 * request.  Space is free once the helper's arena_tail passes it.
 */
#ifndef ACKPT_ARENA_H
#define ACKPT_ARENA_H

#include <stdint.h>

#include "proto.h"

/* Place len bytes (len <= arena_size and <= ACKPT_REG_BUF_MAX) after head:
 * *pos is the chunk's start, *end the position the arena is used up to. */
static inline void ackpt_arena_place(uint64_t head, uint64_t len, uint64_t arena_size,
				     uint64_t *pos, uint64_t *end)
{
	uint64_t start = (head + ACKPT_ARENA_ALIGN - 1) & ~(uint64_t)(ACKPT_ARENA_ALIGN - 1);
	uint64_t in = start % arena_size;
	uint64_t piece_left = ACKPT_REG_BUF_MAX - in % ACKPT_REG_BUF_MAX;

	if (arena_size - in < len)
		start += arena_size - in;
	else if (piece_left < len)
		start += piece_left;
	*pos = start;
	*end = (start + len + ACKPT_ARENA_ALIGN - 1) & ~(uint64_t)(ACKPT_ARENA_ALIGN - 1);
}

/* May a chunk ending at end be written into the arena, given the tail? */
static inline int ackpt_arena_fits(uint64_t end, uint64_t tail, uint64_t arena_size)
{
	return end - tail <= arena_size;
}

#endif
