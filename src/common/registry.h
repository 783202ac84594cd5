/*
 * The node registry (layout in proto.h), as both processes use it: the
 * shim claims entries and names and waits on them; the helper claims a
 * progress slot, publishes its progress and releases its files' entries.
 * This file holds what both do the same way: find and map the table, the
 * name hashes, and the predicates on entries.  Nothing here calls a
 * function the shim wraps (it is compiled into libackpt.so too).
 */
#ifndef ACKPT_REGISTRY_H
#define ACKPT_REGISTRY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "proto.h"

/* Map the node's registry; create: make it when missing.  NULL when it
 * cannot be had (no /dev/shm, another layout there). */
struct ackpt_registry *ackpt_registry_map(int create);

/* A helper slot's owner (proto.h): its pid. */
static inline int32_t ackpt_owner_pid(uint64_t owner)
{
	return (int32_t)(uint32_t)owner;
}

/* Take a progress slot for the calling helper: returns its index, or -1. */
int ackpt_registry_claim_helper(struct ackpt_registry *r);
unsigned ackpt_registry_sweep(struct ackpt_registry *r); /* dead helpers' entries: freed */
int ackpt_registry_owner_gone(int32_t pid); /* no process has the entry's pid (cheap) */
/* The helper pid of slot `slot` is gone: dead, or its pid now names
 * another process (reads /proc: for waits that last, and for sweeps).
 * 0 when it cannot tell (the slot holds another pid: a claim still being
 * filled in). */
int ackpt_registry_helper_gone(const struct ackpt_registry *r, uint32_t slot, int32_t pid);

/* Release entry idx if pid still owns it for (dev, ino). */
void ackpt_registry_release(struct ackpt_registry *r, int idx, int32_t pid, uint64_t dev,
			    uint64_t ino);

/* Name hashes: FNV-1a of a canonical path, never 0 (0: no name). */
uint64_t ackpt_name_hash(const char *p, size_t n);
uint64_t ackpt_path_hash(const char *canon);
uint64_t ackpt_dir_hash(const char *canon);   /* of the directory canon is in; 0 if none */

/* Name n, claimed by helper pid, is still pending: the helper is alive
 * in its slot and has not got past it. */
int ackpt_registry_name_pending(const struct ackpt_registry *r,
				const struct ackpt_registry_name *n, int32_t pid);

#endif
