/*
 * Where a chunk goes in the staging arena: both processes rely on this.
 * The arena is a ring of arena_size bytes addressed by monotonic positions
 * (pos % arena_size is the offset).  A chunk sits at the same offset within
 * a page as the file offset it is written to, so the helper can write the
 * page-aligned middle of any write with O_DIRECT; a chunk that continues
 * the previous one in the file (the common, sequential case) follows it in
 * the arena without a gap, so partial pages cost nothing.  A chunk never
 * wraps the ring and never crosses a registered-buffer boundary
 * (ACKPT_REG_BUF_MAX), so the helper can write it with one fixed-buffer
 * request.  Space is free once the helper's arena_tail passes it.
 */
#ifndef ACKPT_ARENA_H
#define ACKPT_ARENA_H

#include <stdint.h>

#include "proto.h"

/*
 * Place len bytes bound for file offset off after head.  A span too short
 * for the chunk (the end of the ring, or of a 1 GiB buffer) is skipped, so
 * len + one page must fit in the span at the ring's start: the shim's
 * chunks are at most a quarter of the arena and 16 MiB.  *pos is the
 * chunk's start, with pos % page == off % page; *end = *pos + len, where
 * the next chunk may start.
 */
static inline void ackpt_arena_place(uint64_t head, uint64_t len, uint64_t off,
				     uint64_t arena_size, uint64_t *pos, uint64_t *end)
{
	const uint64_t mask = ACKPT_ARENA_ALIGN - 1;
	uint64_t shift = off & mask;
	uint64_t start = head + ((shift - head) & mask);

	for (;;) {
		uint64_t in = start % arena_size;
		uint64_t room = arena_size - in;
		uint64_t piece_left = ACKPT_REG_BUF_MAX - in % ACKPT_REG_BUF_MAX;

		if (piece_left < room)
			room = piece_left;
		if (len <= room)
			break;
		/* to the boundary (page-aligned), then the same shift again */
		start += room + shift;
	}
	*pos = start;
	*end = start + len;
}

/* May a chunk ending at end be written into the arena, given the tail? */
static inline int ackpt_arena_fits(uint64_t end, uint64_t tail, uint64_t arena_size)
{
	return end - tail <= arena_size;
}

#endif
