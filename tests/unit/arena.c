/* Arena placement (src/common/arena.h): a chunk keeps its file offset's
 * place within a page, follows a chunk it continues without a gap, never
 * wraps the ring, never crosses a registered-buffer boundary, and fits
 * only when the helper's tail leaves room. */
#include <stdint.h>

#include "arena.h"
#include "unit.h"

static void check_place(uint64_t head, uint64_t len, uint64_t off, uint64_t size)
{
	uint64_t pos, end, in;

	ackpt_arena_place(head, len, off, size, &pos, &end);
	in = pos % size;
	CHECK(pos >= head);
	CHECK(pos % ACKPT_ARENA_ALIGN == off % ACKPT_ARENA_ALIGN);
	CHECK(end == pos + len);
	CHECK(in + len <= size);                                   /* no wrap */
	CHECK(in / ACKPT_REG_BUF_MAX == (in + len - 1) / ACKPT_REG_BUF_MAX); /* one buffer */
	CHECK(pos - head < len + size + ACKPT_ARENA_ALIGN);        /* skips at most a ring */
	/* no gap when the chunk fits where it would start anyway */
	if (head % ACKPT_ARENA_ALIGN == off % ACKPT_ARENA_ALIGN && head % size + len <= size &&
	    (head % size) / ACKPT_REG_BUF_MAX == (head % size + len - 1) / ACKPT_REG_BUF_MAX)
		CHECK(pos == head);
}

int main(void)
{
	const uint64_t mib = 1 << 20, size = 64 * mib;
	uint64_t pos, end, h;

	/* straight placement, at the file offset's place in a page */
	ackpt_arena_place(0, 4096, 0, size, &pos, &end);
	CHECK(pos == 0 && end == 4096);
	ackpt_arena_place(100, 10, 0, size, &pos, &end);
	CHECK(pos == 4096 && end == 4106);
	ackpt_arena_place(100, 10, 8292, size, &pos, &end); /* 8292 % 4096 == 100 */
	CHECK(pos == 100 && end == 110);
	ackpt_arena_place(100, 10, 50, size, &pos, &end);
	CHECK(pos == 4096 + 50);
	/* a sequential writer's chunks follow each other */
	ackpt_arena_place(0, 64, 64, size, &pos, &end);
	CHECK(pos == 64 && end == 128);
	ackpt_arena_place(end, 16 * mib, 128, size, &pos, &end);
	CHECK(pos == 128 && end == 128 + 16 * mib);

	/* wrap-around: a chunk that would wrap starts at the next lap */
	ackpt_arena_place(size - 4096, 8192, 0, size, &pos, &end);
	CHECK(pos == size && end == size + 8192);
	ackpt_arena_place(size - 4096, 8192, 64, size, &pos, &end);
	CHECK(pos == size + 64 && end == size + 64 + 8192);
	ackpt_arena_place(3 * size - mib, 2 * mib, 0, size, &pos, &end);
	CHECK(pos == 3 * size && pos % size == 0);

	/* a chunk exactly filling the rest of the lap stays */
	ackpt_arena_place(size - mib, mib, 0, size, &pos, &end);
	CHECK(pos == size - mib && end == size);

	/* never across a 1 GiB registered buffer in a large arena */
	ackpt_arena_place(ACKPT_REG_BUF_MAX - 4096, 8192, 0, 4 * ACKPT_REG_BUF_MAX, &pos, &end);
	CHECK(pos == ACKPT_REG_BUF_MAX);
	/* ... nor across the ring's end just after a buffer boundary (arena
	 * sizes are 2 MiB multiples, so the last span can be short) */
	ackpt_arena_place(ACKPT_REG_BUF_MAX - 4096, 16 * mib, 7, ACKPT_REG_BUF_MAX + 2 * mib, &pos,
			  &end);
	CHECK(pos == ACKPT_REG_BUF_MAX + 2 * mib + 7);

	/* many heads, lengths and offsets */
	for (h = 0; h < 3 * size; h += 12345 * 7 + 1)
		check_place(h, 1 + (h % (8 * mib)), h * 31 + (h >> 3), size);
	for (h = 0; h < 3 * size; h += 4096 * 77 + 64)
		check_place(h, 1 + (h % (8 * mib)), h, size); /* sequential */
	for (h = 0; h < 5 * ACKPT_REG_BUF_MAX; h += 987654321)
		check_place(h, 1 + (h % (256 * mib)), h / 3, 4 * ACKPT_REG_BUF_MAX + 12 * mib);
	for (h = 0; h < 5 * ACKPT_REG_BUF_MAX; h += 98765431)
		check_place(h, 1 + (h % (16 * mib)), h / 7, ACKPT_REG_BUF_MAX + 2 * mib);

	/* back-pressure: room only when the tail has freed enough */
	CHECK(ackpt_arena_fits(size, 0, size));
	CHECK(!ackpt_arena_fits(size + 4096, 0, size));
	CHECK(ackpt_arena_fits(size + 4096, 4096, size));
	UNIT_DONE();
}
