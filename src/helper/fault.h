/*
 * Testing knob: ACKPT_FAULT=op=write|fsync|rename|dirfsync|open,nth=N,
 * err=ENOSPC|EIO|EACCES,mode=once|sticky[,rank=R] rewrites the result of the
 * N-th such operation in the helper (io_uring hides them from
 * strace/LD_PRELOAD); with rank=R, only in the helper of rank R's processes.
 */
#ifndef ACKPT_FAULT_H
#define ACKPT_FAULT_H

enum fault_op { FAULT_WRITE, FAULT_FSYNC, FAULT_RENAME, FAULT_DIRFSYNC, FAULT_OPEN, FAULT_NOPS };

void fault_init(const char *spec, int my_rank);
/* Returns 0, or -errno when this operation is to fail. */
int fault_check(enum fault_op op, int unused);

#endif
