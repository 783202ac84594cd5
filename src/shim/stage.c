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

/*
 * Where the next chunk may start.  Once the helper has written out
 * everything (tail == head, as between two checkpoints), staging starts
 * again at the ring's start, so a job's arena use stays at about its
 * largest checkpoint however large the arena is, and the pages the last
 * checkpoint faulted in are the ones the next one uses.  Not for every
 * drained write: positions only grow, and a lap per 64 MiB or more keeps
 * them far from wrapping.
 */
#define RING_RESTART_MIN (64ull << 20)

static uint64_t arena_head(void)
{
	uint64_t in = S.head % S.arena_size;

	if (in >= RING_RESTART_MIN &&
	    S.head == __atomic_load_n(&S.shm->arena_tail, __ATOMIC_ACQUIRE))
		return S.head - in + S.arena_size;
	return S.head;
}

/* Reserve arena space for len bytes bound for file offset off, blocking
 * while the arena is full. */
static int arena_reserve(uint64_t len, uint64_t off, uint64_t *pos, uint64_t *end)
{
	uint64_t stall0 = 0;

	ackpt_arena_place(arena_head(), len, off, S.arena_size, pos, end);
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
 * Can the arena take len bytes at memcpy speed right now?  ARENA_READY: yes;
 * ARENA_COLD: there is room, but the helper has not faulted that part in
 * yet (first touch runs at a fraction of memcpy speed on some machines);
 * ARENA_FULL: no room until the helper writes some out.
 */
enum { ARENA_READY, ARENA_COLD, ARENA_FULL };

static int arena_state(uint64_t len, uint64_t off)
{
	uint64_t pos, end, in, faulted;

	ackpt_arena_place(arena_head(), len, off, S.arena_size, &pos, &end);
	if (!ackpt_arena_fits(end, __atomic_load_n(&S.shm->arena_tail, __ATOMIC_ACQUIRE),
			      S.arena_size))
		return ARENA_FULL;
	faulted = __atomic_load_n(&S.shm->prefault_done, __ATOMIC_ACQUIRE);
	in = pos % S.arena_size;
	return faulted >= S.arena_size || in + len <= faulted ? ARENA_READY : ARENA_COLD;
}

/*
 * With the arena full, the faster way on: waiting for room goes at the
 * helper's pace (O_DIRECT, no dirty-page throttling), writing through at
 * the kernel's (what a run without ackpt gets).  Either can win: the rates
 * both ways, in bytes per second of the program's stall, decide, halved
 * now and then so they follow the machine; every 16th decision takes the
 * other way, so neither rate goes stale.
 */
#define RATE_WINDOW (256ull << 20)
#define COLD_MIN (4ull << 20)

static void rate_add(uint64_t *bytes, uint64_t *ns, uint64_t b, uint64_t t)
{
	*bytes += b;
	*ns += t ? t : 1;
	if (*bytes > RATE_WINDOW) {
		*bytes /= 2;
		*ns /= 2;
	}
}

static int through_is_faster(void)
{
	static unsigned turn;

	if (!S.through_bytes)
		return 1; /* no figure yet: learn it */
	if (!S.waited_bytes)
		return 0;
	if (++turn % 16 == 0)
		return (double)S.through_bytes / S.through_ns <= (double)S.waited_bytes / S.waited_ns;
	return (double)S.through_bytes / S.through_ns > (double)S.waited_bytes / S.waited_ns;
}

/*
 * Write a chunk through the kernel, at the synchronous cost, instead of
 * waiting for staging.  Only where no staged WRITE of the file that is not
 * yet durable could land on the same bytes later (at or past staged_hi),
 * so the file ends up as if every write had been in order.  Returns the
 * bytes written, or -errno.  The caller queues a DIRTY, so the helper
 * fsyncs the file before its next barrier, close or fsync.
 */
static ssize_t write_through(struct inode_state *ino, const char *src, uint64_t len, uint64_t off)
{
	uint64_t done = 0;

	while (done < len) {
		ssize_t n = real.pwrite(ino->shadow_fd, src + done, len - done, (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return done ? (ssize_t)done : n < 0 ? -errno : -EIO;
		done += (uint64_t)n;
	}
	return (ssize_t)done;
}

static int may_write_through(struct inode_state *ino, uint64_t off, uint64_t len, int device,
			     int *full)
{
	int st;

	*full = 0;
	if (!C.write_through || device)
		return 0;
	st = arena_state(len, off);
	if (st == ARENA_READY)
		return 0;
	/* a small piece pays little for first touch (at most COLD_MIN at
	 * 0.2 GB/s, once), and staging it keeps it off the program's path */
	if (st == ARENA_COLD && len < COLD_MIN)
		return 0;
	/* the order rule: nothing staged and not yet durable may land here later */
	if (off < ino->staged_hi && ino->last_seq > __atomic_load_n(&S.shm->durable_seq,
								    __ATOMIC_ACQUIRE))
		return 0;
	/* pwrite on an O_APPEND description appends: our descriptor shares the
	 * program's description, whose flags it may change at any time */
	if (real.fcntl(ino->shadow_fd, F_GETFL) & O_APPEND)
		return 0;
	*full = st == ARENA_FULL;
	return st == ARENA_COLD || through_is_faster();
}

/*
 * A chunk of UNLOCKED_MIN (shim.h) or more is copied with the session lock
 * dropped, so that threads writing at once copy at once (DCP's writer
 * threads, one file each).  Under the lock: arena space is reserved and
 * the WRITE published, marked pending; the helper stops at it and a replay
 * waits for it.  Without it: the copy, then the record is filled in (its
 * length cut to the good prefix after a bad page) and unmarked, neither
 * needing the lock, so a lock holder waiting for the helper's progress
 * never waits on us.  Then the lock again, and the bell.  Smaller chunks
 * copy under the lock, where they can extend the last record instead.  The
 * caller has pinned the description (stage_write): another thread's close
 * cannot queue the file's CLOSE meanwhile.
 */
static int stage_unlocked(struct inode_state *ino, struct ackpt_op *op, const char *src,
			  uint64_t *chunk)
{
	uint64_t at, want = op->u.write.len, off = op->u.write.offset;
	size_t done;
	int ret;

	ret = send_write_pending(op, ino, &at);
	if (ret < 0)
		return ret;
	if (off + want > ino->staged_hi)
		ino->staged_hi = off + want;
	pthread_mutex_unlock(&S.lock); /* tls_busy stays: a re-entry passes through */
	if (__atomic_add_fetch(&S.copying, 1, __ATOMIC_RELAXED) > 1)
		__atomic_add_fetch(&S.copies_overlapped, 1, __ATOMIC_RELAXED);
	ret = stage_copy(S.arena + op->u.write.arena_pos % S.arena_size, src, want, &done);
	__atomic_sub_fetch(&S.copying, 1, __ATOMIC_RELAXED);
	send_write_filled(op, at, ret < 0 ? done : want);
	pthread_mutex_lock(&S.lock);
	session_bell();
	*chunk = ret < 0 ? done : want;
	return ret < 0 ? -EFAULT : 0;
}

/*
 * Copy len bytes at buf into the arena, in chunks, and queue a WRITE for
 * each.  A chunk the arena cannot take at memcpy speed goes through the
 * kernel instead when that keeps the file's order (may_write_through).
 * *staged: bytes queued or written.  A bad source pointer stops at the page
 * it faulted on, as the kernel's copy does: the chunk's good prefix is
 * queued and -EFAULT returned.  1: the kernel took only *staged bytes (a
 * short write through it); report those.
 */
int session_stage(struct inode_state *ino, const void *buf, size_t len, uint64_t off, int device,
		  int unlock, size_t *staged)
{
	const char *src = buf;
	int through = 0, ret;

	*staged = 0;
	while (len) {
		/* a cut inside a long write falls on a file page boundary, so
		 * only the write's own ends are partial pages for the helper */
		uint64_t chunk = len <= S.max_chunk
				       ? len
				       : S.max_chunk - ((off + S.max_chunk) & (ACKPT_ARENA_ALIGN - 1));
		struct ackpt_op op = { .type = ACKPT_OP_WRITE, .file = ino->slot };
		uint64_t pos, end, head = S.head, t0;
		int bad = 0, full, through_now = may_write_through(ino, off, chunk, device, &full);

		/* timed only when the arena is full: the two ways' rates */
		t0 = full ? now_ns() : 0;
		if (through_now) {
			ssize_t n = write_through(ino, src, chunk, off);

			if (full && n > 0)
				rate_add(&S.through_bytes, &S.through_ns, (uint64_t)n, now_ns() - t0);
			if (n > 0) {
				through = 1;
				S.bytes_through += (uint64_t)n;
				*staged += (size_t)n;
				/* demand the helper's prefault must follow: where in
				 * the ring staging would have got */
				uint64_t want = S.head % S.arena_size + S.bytes_through;

				__atomic_store_n(&S.shm->want_mib,
						 (uint32_t)((want < S.arena_size ? want : S.arena_size) >> 20),
						 __ATOMIC_RELAXED);
			}
			if (n < (ssize_t)chunk) {
				/* as the kernel would: the bytes it took, else its error */
				ret = *staged ? 1 : (int)n;
				goto dirty;
			}
			src += chunk;
			off += chunk;
			len -= chunk;
			continue;
		}
		/* the lock was dropped for the last chunk: the helper may be gone */
		if (S.state != SESS_ACTIVE)
			return -EPIPE;
		ret = arena_reserve(chunk, off, &pos, &end);
		if (ret < 0)
			return ret;
		op.u.write.offset = off;
		op.u.write.len = chunk;
		op.u.write.arena_pos = pos;
		op.u.write.arena_end = end;
		if (unlock && !device && chunk >= UNLOCKED_MIN) {
			ret = stage_unlocked(ino, &op, src, &chunk);
			if (ret < 0 && ret != -EFAULT)
				return ret;
			bad = ret == -EFAULT;
		} else {
			if (device) {
				/* chunked through the arena with back-pressure, like host data */
				ret = cuda_copy_to_host(S.arena + pos % S.arena_size, src, chunk);
				if (ret < 0)
					return ret;
			} else {
				size_t done;

				if (stage_copy(S.arena + pos % S.arena_size, src, chunk, &done) < 0) {
					bad = 1;
					chunk = done;
					if (!chunk) {
						S.head = head; /* nothing of it was used */
						ret = -EFAULT;
						goto dirty;
					}
				}
			}
			op.u.write.len = chunk;
			if (!ring_extend(ino, off, chunk, pos, end)) {
				ret = send_op(&op, NULL, 0, -1, ino);
				if (ret < 0)
					return ret;
			}
		}
		if (full && chunk)
			rate_add(&S.waited_bytes, &S.waited_ns, chunk, now_ns() - t0);
		if (off + chunk > ino->staged_hi)
			ino->staged_hi = off + chunk;
		S.bytes_staged += chunk;
		*staged += chunk;
		if (bad) {
			ret = -EFAULT;
			goto dirty;
		}
		src += chunk;
		off += chunk;
		len -= chunk;
	}
	ret = 0;
dirty:
	/* the helper fsyncs what went through the kernel with the rest; one
	 * DIRTY not done yet covers this write too (every FSYNC, CLOSE
	 * or barrier that could leave the file clean comes after it) */
	if (through && ino->dirty_seq <= session_durable()) {
		int r = session_send_simple(ACKPT_OP_DIRTY, ino);

		if (r < 0 && !ret)
			ret = r;
		if (r == 0)
			ino->dirty_seq = S.seq;
	}
	return ret;
}
