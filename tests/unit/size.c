/* ACKPT_STAGING's size syntax: ackpt_parse_size. */
#include <errno.h>
#include <stdint.h>

#include "unit.h"
#include "util.h"

static uint64_t parsed(const char *s)
{
	uint64_t v = 12345;

	return ackpt_parse_size(s, &v) == 0 ? v : UINT64_MAX;
}

int main(void)
{
	uint64_t v;

	CHECK(parsed("0") == 0);
	CHECK(parsed("512") == 512);
	CHECK(parsed("4k") == 4096 && parsed("4K") == 4096 && parsed("4KiB") == 4096);
	CHECK(parsed("4KB") == 4096);
	CHECK(parsed("64M") == 64ull << 20);
	CHECK(parsed("1G") == 1ull << 30 && parsed("1GiB") == 1ull << 30);
	CHECK(parsed("2T") == 2ull << 40);
	CHECK(parsed("16777215T") == 16777215ull << 40);
	/* refused: the caller prints one line naming the variable */
	CHECK(ackpt_parse_size("", &v) == -EINVAL);
	CHECK(ackpt_parse_size(NULL, &v) == -EINVAL);
	CHECK(ackpt_parse_size("-1", &v) == -EINVAL);
	CHECK(ackpt_parse_size("1.5G", &v) == -EINVAL);
	CHECK(ackpt_parse_size("G", &v) == -EINVAL);
	CHECK(ackpt_parse_size("10X", &v) == -EINVAL);
	CHECK(ackpt_parse_size("1GG", &v) == -EINVAL);
	CHECK(ackpt_parse_size("1 G", &v) == -EINVAL);
	CHECK(ackpt_parse_size("16777216T", &v) == -EINVAL); /* 2^64: overflows */
	CHECK(ackpt_parse_size("99999999999999999999", &v) == -EINVAL);
	UNIT_DONE();
}
