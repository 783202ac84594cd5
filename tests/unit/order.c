/* The per-file ordering contract (src/common/order.h). */
#include "order.h"
#include "unit.h"

int main(void)
{
	/* page-granular overlap */
	CHECK(ackpt_pages_overlap(0, 4096, 0, 1));
	CHECK(!ackpt_pages_overlap(0, 4096, 4096, 4096));
	CHECK(ackpt_pages_overlap(0, 4097, 4096, 1));       /* shares page 1 */
	CHECK(ackpt_pages_overlap(100, 10, 200, 10));       /* same page, disjoint bytes */
	CHECK(!ackpt_pages_overlap(0, 8192, 8192, 100));
	CHECK(ackpt_pages_overlap(5000, 1, 4096, 4096));
	CHECK(!ackpt_pages_overlap(1 << 20, 4096, 0, 1 << 20));

	/* only writes to different pages may pass each other */
	CHECK(ackpt_may_pass(ACKPT_OP_WRITE, 0, 4096, ACKPT_OP_WRITE, 8192, 4096));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 4096, ACKPT_OP_WRITE, 100, 1));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 10, ACKPT_OP_WRITE, 10, 10));
	CHECK(!ackpt_may_pass(ACKPT_OP_FSYNC, 0, 0, ACKPT_OP_WRITE, 1 << 30, 1));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 1, ACKPT_OP_FSYNC, 0, 0));
	CHECK(!ackpt_may_pass(ACKPT_OP_DIRTY, 0, 0, ACKPT_OP_WRITE, 1 << 20, 1));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 1, ACKPT_OP_CLOSE, 0, 0));
	CHECK(!ackpt_may_pass(ACKPT_OP_OPEN, 0, 0, ACKPT_OP_WRITE, 0, 1));
	UNIT_DONE();
}
