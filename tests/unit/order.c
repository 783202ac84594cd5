/* The per-file ordering contract (src/common/order.h). */
#include "order.h"
#include "unit.h"

int main(void)
{
	/* writes to disjoint bytes may pass each other, within a page too */
	CHECK(ackpt_may_pass(ACKPT_OP_WRITE, 0, 4096, ACKPT_OP_WRITE, 8192, 4096));
	CHECK(ackpt_may_pass(ACKPT_OP_WRITE, 0, 4096, ACKPT_OP_WRITE, 4096, 4096));
	CHECK(ackpt_may_pass(ACKPT_OP_WRITE, 100, 10, ACKPT_OP_WRITE, 110, 10)); /* same page */
	CHECK(ackpt_may_pass(ACKPT_OP_WRITE, 110, 10, ACKPT_OP_WRITE, 100, 10));
	CHECK(ackpt_may_pass(ACKPT_OP_WRITE, 0, 10, ACKPT_OP_WRITE, 10, 10));
	/* any common byte: in order */
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 4096, ACKPT_OP_WRITE, 100, 1));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 11, ACKPT_OP_WRITE, 10, 10));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 19, 1, ACKPT_OP_WRITE, 10, 10));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 1 << 20, ACKPT_OP_WRITE, 4096, 8192));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 4096, 8192, ACKPT_OP_WRITE, 0, 1 << 20));
	/* everything else waits */
	CHECK(!ackpt_may_pass(ACKPT_OP_FSYNC, 0, 0, ACKPT_OP_WRITE, 1 << 30, 1));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 1, ACKPT_OP_FSYNC, 0, 0));
	CHECK(!ackpt_may_pass(ACKPT_OP_DIRTY, 0, 0, ACKPT_OP_WRITE, 1 << 20, 1));
	CHECK(!ackpt_may_pass(ACKPT_OP_WRITE, 0, 1, ACKPT_OP_CLOSE, 0, 0));
	CHECK(!ackpt_may_pass(ACKPT_OP_OPEN, 0, 0, ACKPT_OP_WRITE, 0, 1));
	UNIT_DONE();
}
