/*
 * The ordering contract between the shim and the helper: ops on one file
 * take effect in the order the shim sent them, except that a WRITE may
 * start before an earlier, unfinished WRITE of the same file when the two
 * touch no common page (page-granular, so a buffered write and an O_DIRECT
 * write never share a page).  Everything else (FSYNC, CLOSE, DIRTY,
 * RENAME, SYNC_ALL, COMMIT) waits for all earlier ops of its file.
 */
#ifndef ACKPT_ORDER_H
#define ACKPT_ORDER_H

#include <stdint.h>

#include "proto.h"

#define ACKPT_PAGE 4096ull

static inline int ackpt_pages_overlap(uint64_t a_off, uint64_t a_len, uint64_t b_off,
				      uint64_t b_len)
{
	uint64_t a0 = a_off & ~(ACKPT_PAGE - 1), a1 = (a_off + a_len + ACKPT_PAGE - 1) & ~(ACKPT_PAGE - 1);
	uint64_t b0 = b_off & ~(ACKPT_PAGE - 1), b1 = (b_off + b_len + ACKPT_PAGE - 1) & ~(ACKPT_PAGE - 1);

	return a0 < b1 && b0 < a1;
}

/* May op (type, off, len) start while the earlier op (ptype, poff, plen)
 * of the same file is unfinished? */
static inline int ackpt_may_pass(uint32_t ptype, uint64_t poff, uint64_t plen, uint32_t type,
				 uint64_t off, uint64_t len)
{
	return ptype == ACKPT_OP_WRITE && type == ACKPT_OP_WRITE &&
	       !ackpt_pages_overlap(poff, plen, off, len);
}

#endif
