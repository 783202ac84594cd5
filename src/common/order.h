/*
 * The ordering contract between the shim and the helper: ops on one file
 * take effect in the order the shim sent them, except that a WRITE may
 * start before an earlier, unfinished WRITE of the same file when the two
 * touch no common byte.  That is enough to keep a buffered write and an
 * O_DIRECT write off each other's pages: the helper writes with O_DIRECT
 * only whole pages that lie inside one write, so any other write touching
 * such a page overlaps it.  Everything else (FSYNC, CLOSE, DIRTY, RENAME,
 * SYNC_ALL, COMMIT) waits for all earlier ops of its file.
 */
#ifndef ACKPT_ORDER_H
#define ACKPT_ORDER_H

#include <stdint.h>

#include "proto.h"

/* May op (type, off, len) start while the earlier op (ptype, poff, plen)
 * of the same file is unfinished? */
static inline int ackpt_may_pass(uint32_t ptype, uint64_t poff, uint64_t plen, uint32_t type,
				 uint64_t off, uint64_t len)
{
	return ptype == ACKPT_OP_WRITE && type == ACKPT_OP_WRITE &&
	       (off >= poff + plen || poff >= off + len);
}

#endif
