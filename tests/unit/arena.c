/* Arena placement (src/common/arena.h): chunks start page-aligned, never
 * wrap the ring, never cross a registered-buffer boundary, and fit only
 * when the helper's tail leaves room. */
#include <stdint.h>

#include "arena.h"
#include "unit.h"

static void check_place(uint64_t head, uint64_t len, uint64_t size)
{
	uint64_t pos, end, in;

	ackpt_arena_place(head, len, size, &pos, &end);
	in = pos % size;
	CHECK(pos >= head);
	CHECK(pos % ACKPT_ARENA_ALIGN == 0);
	CHECK(end % ACKPT_ARENA_ALIGN == 0 && end >= pos + len);
	CHECK(in + len <= size);                                   /* no wrap */
	CHECK(in / ACKPT_REG_BUF_MAX == (in + len - 1) / ACKPT_REG_BUF_MAX); /* one buffer */
	CHECK(pos - head < len + size);                            /* skips at most a ring */
}

int main(void)
{
	const uint64_t mib = 1 << 20, size = 64 * mib;
	uint64_t pos, end, h;

	/* straight placement */
	ackpt_arena_place(0, 4096, size, &pos, &end);
	CHECK(pos == 0 && end == 4096);
	ackpt_arena_place(100, 10, size, &pos, &end);
	CHECK(pos == 4096 && end == 8192);

	/* wrap-around: a chunk that would wrap starts at the next lap */
	ackpt_arena_place(size - 4096, 8192, size, &pos, &end);
	CHECK(pos == size && end == size + 8192);
	ackpt_arena_place(3 * size - mib, 2 * mib, size, &pos, &end);
	CHECK(pos == 3 * size && pos % size == 0);

	/* a chunk exactly filling the rest of the lap stays */
	ackpt_arena_place(size - mib, mib, size, &pos, &end);
	CHECK(pos == size - mib && end == size);

	/* never across a 1 GiB registered buffer in a large arena */
	ackpt_arena_place(ACKPT_REG_BUF_MAX - 4096, 8192, 4 * ACKPT_REG_BUF_MAX, &pos, &end);
	CHECK(pos == ACKPT_REG_BUF_MAX);

	/* many heads and lengths */
	for (h = 0; h < 3 * size; h += 12345 * 7 + 1)
		check_place(h, 1 + (h % (8 * mib)), size);
	for (h = 0; h < 5 * ACKPT_REG_BUF_MAX; h += 987654321)
		check_place(h, 1 + (h % (256 * mib)), 4 * ACKPT_REG_BUF_MAX + 12 * mib);

	/* back-pressure: room only when the tail has freed enough */
	CHECK(ackpt_arena_fits(size, 0, size));
	CHECK(!ackpt_arena_fits(size + 4096, 0, size));
	CHECK(ackpt_arena_fits(size + 4096, 4096, size));
	UNIT_DONE();
}
