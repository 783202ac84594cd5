/*
 * The staging arena, shim side: pre-faulting it into our view, reserving
 * space with back-pressure, and copying a write into it (session_stage),
 * one op per chunk.  The layout rules are in src/common/arena.h.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "arena.h"
#include "shim.h"

/*
 * The helper faults the arena in (and locks it where memlock allows): that
 * first touch is slow on some VMs and must not hold this process's mmap
 * lock or delay its exit.  This thread only maps the already-present pages
 * into our view, following the helper's progress, so staging later runs at
 * warm memcpy speed.
 */
void *arena_prefault_main(void *arg)
{
	const uint64_t step = 64ull << 20;
	uint64_t off = 0;
	struct ackpt_shm *shm = S.shm;
	char *arena = S.arena;
	uint64_t size = S.arena_size;

	while (off < size && S.shm == shm) {
		uint64_t ready = __atomic_load_n(&shm->prefault_done, __ATOMIC_ACQUIRE);
		uint64_t len = size - off < step ? size - off : step;

		if (ready < off + len) {
			struct timespec ts = { 0, 20000000 };

			if (S.state != SESS_ACTIVE)
				break;
			ts.tv_nsec = 50000000;
			nanosleep(&ts, NULL);
			continue;
		}
		madvise(arena + off, len, MADV_POPULATE_WRITE);
		off += len;
	}
	return NULL;
}

/* Reserve arena space for len bytes, blocking while the arena is full. */
static int arena_reserve(uint64_t len, uint64_t *pos, uint64_t *end)
{
	uint64_t stall0 = 0;

	ackpt_arena_place(S.head, len, S.arena_size, pos, end);
	while (!ackpt_arena_fits(*end, __atomic_load_n(&S.shm->arena_tail, __ATOMIC_ACQUIRE),
				 S.arena_size)) {
		uint32_t gen = __atomic_load_n(&S.shm->progress_gen, __ATOMIC_ACQUIRE);

		if (!stall0)
			stall0 = now_ns();
		if (ackpt_arena_fits(*end, __atomic_load_n(&S.shm->arena_tail, __ATOMIC_ACQUIRE),
				     S.arena_size))
			break;
		if (!helper_alive()) {
			session_helper_died();
			return -EPIPE;
		}
		futex_wait_gen(gen, 100000000ull);
	}
	S.head = *end;
	return 0;
}

/*
 * Copy len bytes at buf into the arena, in chunks, and queue a WRITE for
 * each.  *staged: bytes queued.  A bad source pointer stops at the page it
 * faulted on, as the kernel's copy does: the chunk's good prefix is queued
 * and -EFAULT returned.
 */
int session_stage(struct inode_state *ino, const void *buf, size_t len, uint64_t off, int device,
		  size_t *staged)
{
	const char *src = buf;

	*staged = 0;
	while (len) {
		uint64_t chunk = len < S.max_chunk ? len : S.max_chunk;
		struct ackpt_op op = { .type = ACKPT_OP_WRITE, .file = ino->slot };
		uint64_t pos, end, head = S.head;
		int ret, bad = 0;

		ret = arena_reserve(chunk, &pos, &end);
		if (ret < 0)
			return ret;
		if (device) {
			/* chunked through the arena with back-pressure, like host data */
			ret = cuda_copy_to_host(S.arena + pos % S.arena_size, src, chunk);
			if (ret < 0)
				return ret;
		} else {
			size_t done;

			if (efault_copy(S.arena + pos % S.arena_size, src, chunk, &done) < 0) {
				bad = 1;
				chunk = done;
				if (!chunk) {
					S.head = head; /* nothing of it was used */
					return -EFAULT;
				}
			}
		}
		op.u.write.offset = off;
		op.u.write.len = chunk;
		op.u.write.arena_pos = pos;
		op.u.write.arena_end = end;
		ret = send_op(&op, NULL, 0, -1, ino);
		if (ret < 0)
			return ret;
		S.bytes_staged += chunk;
		*staged += chunk;
		if (bad)
			return -EFAULT;
		src += chunk;
		off += chunk;
		len -= chunk;
	}
	return 0;
}
