/*
 * The node registry's table of pending names (proto.h, struct
 * ackpt_registry_name), shared by both processes: a shim publishes its own
 * deferred renames and commits; a helper publishes, as "remote" entries,
 * those another node of the job announced through the coordinator.  Readers
 * on the node wait while an entry involving their path is pending.
 */
#ifndef ACKPT_NAMES_H
#define ACKPT_NAMES_H

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

#include "proto.h"

static inline uint64_t ackpt_name_hash(const char *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	size_t i;

	for (i = 0; i < n; i++) {
		h ^= (unsigned char)p[i];
		h *= 0x100000001b3ull;
	}
	return h | 1; /* never 0: 0 means "no name" */
}

static inline uint64_t ackpt_path_hash(const char *canon)
{
	return ackpt_name_hash(canon, strlen(canon));
}

static inline uint64_t ackpt_dir_hash(const char *canon)
{
	const char *slash = strrchr(canon, '/');

	if (!slash)
		return 0;
	return ackpt_name_hash(canon, slash == canon ? 1 : (size_t)(slash - canon));
}

/*
 * Still pending: its helper is alive (holds its slot) and, for a local
 * entry, has not got past it; a remote entry is pending until its helper
 * removes it (the announcing node said it is settled).
 */
static inline int ackpt_name_pending(struct ackpt_registry *r, struct ackpt_registry_name *n,
				     int32_t pid)
{
	struct ackpt_registry_helper *h = &r->helpers[n->helper % ACKPT_REGISTRY_HELPERS];
	uint64_t commit = __atomic_load_n(&n->commit_id, __ATOMIC_ACQUIRE);

	if (__atomic_load_n(&h->pid, __ATOMIC_ACQUIRE) != pid)
		return 0;
	if (__atomic_load_n(&n->remote, __ATOMIC_ACQUIRE))
		return 1;
	if (commit)
		return __atomic_load_n(&h->commits_done, __ATOMIC_ACQUIRE) < commit;
	return __atomic_load_n(&h->durable_seq, __ATOMIC_ACQUIRE) <
	       __atomic_load_n(&n->seq, __ATOMIC_ACQUIRE);
}

/*
 * Claim a free or inert entry for helper `pid` (index `helper`) and fill
 * it.  Hashes of 0 match nothing.  Returns its index, or -1 when the table
 * is full.
 */
static inline int ackpt_name_claim(struct ackpt_registry *r, int32_t pid, uint32_t helper,
				   uint64_t old_hash, uint64_t new_hash, uint64_t old_dir,
				   uint64_t new_dir, uint64_t seq, uint64_t commit_id, int remote)
{
	unsigned i;

	for (i = 0; i < ACKPT_REGISTRY_NAMES; i++) {
		struct ackpt_registry_name *n = &r->names[i];
		int32_t old = __atomic_load_n(&n->pid, __ATOMIC_ACQUIRE);

		if (old && (kill(old, 0) == 0 || errno != ESRCH) &&
		    (!__atomic_load_n(&n->live, __ATOMIC_ACQUIRE) || ackpt_name_pending(r, n, old)))
			continue;
		/* free, or inert (done, or its helper died): take it */
		if (!__atomic_compare_exchange_n(&n->pid, &old, pid, 0, __ATOMIC_ACQ_REL,
						 __ATOMIC_RELAXED))
			continue;
		if (!old)
			__atomic_fetch_add(&r->names_used, 1, __ATOMIC_RELAXED);
		__atomic_store_n(&n->live, 0, __ATOMIC_RELEASE);
		n->helper = helper;
		n->old_hash = old_hash;
		n->new_hash = new_hash;
		n->old_dir = old_dir;
		n->new_dir = new_dir;
		__atomic_store_n(&n->remote, (uint32_t)remote, __ATOMIC_RELEASE);
		__atomic_store_n(&n->seq, seq, __ATOMIC_RELEASE);
		__atomic_store_n(&n->commit_id, commit_id, __ATOMIC_RELEASE);
		__atomic_store_n(&n->live, 1, __ATOMIC_RELEASE);
		return (int)i;
	}
	return -1;
}

/* Free entry idx if helper `pid` still holds it. */
static inline void ackpt_name_release(struct ackpt_registry *r, int idx, int32_t pid)
{
	struct ackpt_registry_name *n;

	if (idx < 0 || idx >= ACKPT_REGISTRY_NAMES)
		return;
	n = &r->names[idx];
	if (__atomic_load_n(&n->pid, __ATOMIC_ACQUIRE) != pid)
		return;
	__atomic_store_n(&n->live, 0, __ATOMIC_RELEASE);
	if (__atomic_compare_exchange_n(&n->pid, &pid, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
		__atomic_fetch_sub(&r->names_used, 1, __ATOMIC_RELAXED);
}

#endif
