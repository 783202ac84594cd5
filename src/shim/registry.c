/*
 * The node-local registry: one shared-memory table per uid in /dev/shm that
 * every process under ackpt on the node maps.  It answers the questions a
 * process cannot answer from its own state:
 *  - does another process's helper still have staged data for this inode?
 *    (readers, stat and exec wait for it);
 *  - does another process also write this inode?  (then every writer goes
 *    through the kernel: files.c, shared_write);
 *  - is a name about to change by another process's deferred rename or
 *    metadata commit?  (path lookups wait for it).
 * Entries are claimed with a CAS on their pid; a dead owner's entries are
 * inert (its helper's progress is final) and are reclaimed by anyone.
 */
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "shim.h"
#include "registry.h"

static struct ackpt_registry *reg;
static uint64_t reg_tried;
static int32_t own_names[ACKPT_REGISTRY_NAMES]; /* names claimed by this process */

static struct ackpt_registry *registry_map(int create)
{
	struct ackpt_registry *r;

	if (reg)
		return reg;
	if (!create) {
		/* every process under ackpt creates it at start (registry_init):
		 * if that failed, look again at most once a second */
		uint64_t t = now_ns();

		if (reg_tried && t - reg_tried < 1000000000ull)
			return NULL;
		reg_tried = t;
	}
	r = ackpt_registry_map(create);
	if (!r)
		return NULL;
	reg = r;
	return reg;
}

/*
 * At start, in every process under ackpt: map the node's registry, making
 * it if it is not there.  A process that looked for it only when it first
 * needed it (at most once a second) could miss a writer that appeared in
 * between, and read its file unwaited.
 */
void registry_init(void)
{
	if (C.enabled)
		registry_map(1);
}

int registry_any(void)
{
	struct ackpt_registry *r = registry_map(0);

	return r && __atomic_load_n(&r->used, __ATOMIC_RELAXED);
}

/*
 * After publishing our entry mine: if another live process's entry names
 * the same file, both become shared.  Each claimer publishes, then scans,
 * with a full fence between, so of two racing claimers at least one sees
 * the other.
 */
static void registry_mark_shared(struct ackpt_registry *r, struct ackpt_registry_entry *mine,
				 uint64_t dev, uint64_t ino)
{
	unsigned i;

	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	for (i = 0; i < ACKPT_REGISTRY_ENTRIES; i++) {
		struct ackpt_registry_entry *e = &r->e[i];
		int32_t pid = __atomic_load_n(&e->pid, __ATOMIC_ACQUIRE);

		if (e == mine || !pid || pid == mine->pid ||
		    !__atomic_load_n(&e->live, __ATOMIC_ACQUIRE) || e->dev != dev || e->ino != ino)
			continue;
		__atomic_store_n(&e->shared, 1, __ATOMIC_RELEASE);
		__atomic_store_n(&mine->shared, 1, __ATOMIC_RELEASE);
	}
}

int registry_claim(uint64_t dev, uint64_t ino, pid_t owner)
{
	struct ackpt_registry *r = registry_map(1);
	unsigned i, start;
	int helper = S.shm ? S.shm->reg_helper : -1;

	if (!r || helper < 0 || helper >= ACKPT_REGISTRY_HELPERS)
		return -1;
	start = (unsigned)(ino * 2654435761u) % ACKPT_REGISTRY_ENTRIES;
	for (i = 0; i < ACKPT_REGISTRY_ENTRIES; i++) {
		struct ackpt_registry_entry *e = &r->e[(start + i) % ACKPT_REGISTRY_ENTRIES];
		int32_t zero = 0;

		if (__atomic_load_n(&e->pid, __ATOMIC_RELAXED))
			continue;
		if (__atomic_compare_exchange_n(&e->pid, &zero, owner, 0, __ATOMIC_ACQ_REL,
						__ATOMIC_RELAXED)) {
			e->dev = dev;
			e->ino = ino;
			e->helper = (uint32_t)helper;
			__atomic_store_n(&e->shared, 0, __ATOMIC_RELAXED);
			__atomic_store_n(&e->last_seq, S.seq + 1, __ATOMIC_RELEASE);
			__atomic_store_n(&e->live, 1, __ATOMIC_RELEASE);
			__atomic_fetch_add(&r->used, 1, __ATOMIC_RELEASE);
			registry_mark_shared(r, e, dev, ino);
			return (int)((start + i) % ACKPT_REGISTRY_ENTRIES);
		}
	}
	return -1;
}

/* Is another process under ackpt writing the file of our entry idx too? */
int registry_shared(int idx)
{
	return reg && idx >= 0 && idx < ACKPT_REGISTRY_ENTRIES &&
	       __atomic_load_n(&reg->e[idx].shared, __ATOMIC_ACQUIRE);
}

void registry_note_op(int idx, uint64_t seq)
{
	if (reg && idx >= 0 && idx < ACKPT_REGISTRY_ENTRIES)
		__atomic_store_n(&reg->e[idx].last_seq, seq, __ATOMIC_RELEASE);
}

/* Another process's helper has work for the file that is not durable yet
 * (a snapshot: more may come).  Never waits. */
int registry_pending(uint64_t dev, uint64_t ino)
{
	struct ackpt_registry *r = registry_map(0);
	unsigned i;

	if (!r || !__atomic_load_n(&r->used, __ATOMIC_RELAXED))
		return 0;
	for (i = 0; i < ACKPT_REGISTRY_ENTRIES; i++) {
		struct ackpt_registry_entry *e = &r->e[i];
		int32_t pid = __atomic_load_n(&e->pid, __ATOMIC_ACQUIRE);
		struct ackpt_registry_helper *h;

		if (!pid || e->dev != dev || e->ino != ino)
			continue;
		if (pid == S.helper_pid && S.state == SESS_ACTIVE)
			continue;
		if (ackpt_registry_owner_gone(pid))
			continue;
		/* a claim still being filled in counts as pending */
		h = &r->helpers[e->helper % ACKPT_REGISTRY_HELPERS];
		if ((ackpt_owner_pid(__atomic_load_n(&h->owner, __ATOMIC_ACQUIRE)) != pid ||
		     __atomic_load_n(&h->durable_seq, __ATOMIC_ACQUIRE) <
			     __atomic_load_n(&e->last_seq, __ATOMIC_ACQUIRE)) &&
		    !ackpt_registry_helper_gone(r, e->helper, pid))
			return 1;
	}
	return 0;
}

/* Wait while another process's helper has pending work on (dev, ino).
 * Returns 1 if there was some, 0 if not. */
int registry_wait(uint64_t dev, uint64_t ino)
{
	struct ackpt_registry *r = registry_map(0);
	uint64_t t0 = now_ns(), warned = 0;
	unsigned i, spins = 0;
	int waited = 0;

	if (!r || !__atomic_load_n(&r->used, __ATOMIC_RELAXED))
		return 0;
	for (i = 0; i < ACKPT_REGISTRY_ENTRIES; i++) {
		struct ackpt_registry_entry *e = &r->e[i];

		for (;;) {
			int32_t pid = __atomic_load_n(&e->pid, __ATOMIC_ACQUIRE);
			struct timespec ts = { 0, 2000000 };
			struct ackpt_registry_helper *h;

			if (!pid || e->dev != dev || e->ino != ino)
				break;
			if (pid == S.helper_pid && S.state == SESS_ACTIVE)
				break; /* ours: the local table orders it */
			h = &r->helpers[e->helper % ACKPT_REGISTRY_HELPERS];
			if (ackpt_owner_pid(__atomic_load_n(&h->owner, __ATOMIC_ACQUIRE)) == pid &&
			    __atomic_load_n(&h->durable_seq, __ATOMIC_ACQUIRE) >=
				    __atomic_load_n(&e->last_seq, __ATOMIC_ACQUIRE))
				break; /* nothing pending right now */
			/* every 2 ms: is it dead?  Every 0.5 s: is its pid another
			 * process's now? (a look in /proc) */
			if (ackpt_registry_owner_gone(pid) ||
			    (++spins % 256 == 0 && ackpt_registry_helper_gone(r, e->helper, pid))) {
				/* owner died without releasing: reclaim */
				if (__atomic_compare_exchange_n(&e->pid, &pid, 0, 0, __ATOMIC_ACQ_REL,
								__ATOMIC_RELAXED))
					__atomic_fetch_sub(&r->used, 1, __ATOMIC_RELAXED);
				break;
			}
			if (!warned && now_ns() - t0 > 2000000000ull) {
				alog(L_INFO, "waiting for ackpt-helper %d to finish a file", (int)pid);
				warned = 1;
			}
			waited = 1;
			nanosleep(&ts, NULL);
		}
	}
	return waited;
}


/* ---- pending names ---- */

/*
 * Publish a deferred rename (commit_id 0) or metadata commit of oldp to
 * newp (canonical paths), so other processes on the node wait for it.
 * Returns the entry's index or -1 (table full or no registry: other
 * processes then see the old names until it is done; logged once).
 */
int registry_name_add(const char *oldp, const char *newp, uint64_t seq, uint64_t commit_id)
{
	struct ackpt_registry *r = registry_map(1);
	int helper = S.shm ? S.shm->reg_helper : -1;
	static int warned;
	unsigned i;

	if (!r || helper < 0 || helper >= ACKPT_REGISTRY_HELPERS) {
		alog(L_DEBUG, "no node registry: %s -> %s not published", oldp, newp);
		return -1;
	}
	for (i = 0; i < ACKPT_REGISTRY_NAMES; i++) {
		struct ackpt_registry_name *n = &r->names[i];
		int32_t pid = __atomic_load_n(&n->pid, __ATOMIC_ACQUIRE);

		if (pid && (kill(pid, 0) == 0 || errno != ESRCH) &&
		    (!__atomic_load_n(&n->live, __ATOMIC_ACQUIRE) || ackpt_registry_name_pending(r, n, pid)))
			continue;
		/* free, or inert (done, or its helper died): take it */
		if (!__atomic_compare_exchange_n(&n->pid, &pid, S.helper_pid, 0, __ATOMIC_ACQ_REL,
						 __ATOMIC_RELAXED))
			continue;
		if (!pid)
			__atomic_fetch_add(&r->names_used, 1, __ATOMIC_RELAXED);
		__atomic_store_n(&n->live, 0, __ATOMIC_RELEASE);
		n->helper = (uint32_t)helper;
		n->old_hash = ackpt_path_hash(oldp);
		n->new_hash = ackpt_path_hash(newp);
		n->old_dir = ackpt_dir_hash(oldp);
		n->new_dir = ackpt_dir_hash(newp);
		__atomic_store_n(&n->seq, seq, __ATOMIC_RELEASE);
		__atomic_store_n(&n->commit_id, commit_id, __ATOMIC_RELEASE);
		__atomic_store_n(&n->live, 1, __ATOMIC_RELEASE);
		own_names[i] = 1;
		alog(L_DEBUG, "pending %s %s -> %s published to the node", commit_id ? "commit" : "rename",
		     oldp, newp);
		return (int)i;
	}
	if (!warned++)
		alog(L_WARN, "the node's table of pending renames is full; other processes may see "
		     "old names until the helper is done");
	return -1;
}

/* Our entry idx is done: free it. */
void registry_name_del(int idx)
{
	struct ackpt_registry_name *n;
	int32_t pid = S.helper_pid;

	if (!reg || idx < 0 || idx >= ACKPT_REGISTRY_NAMES || !own_names[idx])
		return;
	own_names[idx] = 0;
	n = &reg->names[idx];
	__atomic_store_n(&n->live, 0, __ATOMIC_RELEASE);
	if (__atomic_compare_exchange_n(&n->pid, &pid, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
		__atomic_fetch_sub(&reg->names_used, 1, __ATOMIC_RELAXED);
}

/* A forked child: the parent's entries stay the parent's. */
void registry_fork_child(void)
{
	memset(own_names, 0, sizeof(own_names));
}

int registry_names_any(void)
{
	struct ackpt_registry *r = registry_map(0);

	return r && __atomic_load_n(&r->names_used, __ATOMIC_RELAXED);
}

/*
 * Wait while another process's deferred rename or commit involves canon:
 * as the file's old or new name, or (as_dir: opendir, rmdir) as the
 * directory either name is in.  Ours are ordered by namespace.c.
 */
void registry_names_wait(const char *canon, int as_dir)
{
	struct ackpt_registry *r = registry_map(0);
	uint64_t h, t0 = 0;
	unsigned i, spins = 0;
	int warned = 0;

	if (!r || !__atomic_load_n(&r->names_used, __ATOMIC_RELAXED))
		return;
	h = ackpt_path_hash(canon); /* a directory is matched by its own path */
	for (i = 0; i < ACKPT_REGISTRY_NAMES; i++) {
		struct ackpt_registry_name *n = &r->names[i];

		for (;;) {
			int32_t pid = __atomic_load_n(&n->pid, __ATOMIC_ACQUIRE);
			struct timespec ts = { 0, 1000000 };
			int match;

			if (!pid || !__atomic_load_n(&n->live, __ATOMIC_ACQUIRE) ||
			    (pid == S.helper_pid && S.state == SESS_ACTIVE))
				break;
			match = as_dir ? (n->old_dir == h || n->new_dir == h) :
					 (n->old_hash == h || n->new_hash == h);
			if (!match || !ackpt_registry_name_pending(r, n, pid))
				break;
			if (ackpt_registry_owner_gone(pid) ||
			    (++spins % 512 == 0 && ackpt_registry_helper_gone(r, n->helper, pid)))
				break; /* its helper is gone: what it did is all there is */
			if (!t0)
				t0 = now_ns();
			if (!warned && now_ns() - t0 > 2000000000ull) {
				alog(L_INFO, "waiting for ackpt-helper %d to rename or commit %s",
				     (int)pid, canon);
				warned = 1;
			}
			nanosleep(&ts, NULL);
		}
	}
}
