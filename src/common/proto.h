/*
 * The protocol between libackpt.so (the shim, in the training process) and
 * ackpt-helper.  Nothing else lives here.
 *
 * Two channels:
 *  - a SOCK_SEQPACKET socket carries op records, in program order, one
 *    record per message; an OPEN record carries the file's descriptor as
 *    SCM_RIGHTS.  When the program dies the kernel still delivers every
 *    record already sent, so the helper finishes all staged work.
 *  - a memfd holds the control block (struct ackpt_shm) followed by the
 *    staging arena.  The shim copies data into the arena; the helper writes
 *    it out and publishes progress (durable watermark, arena tail, errors)
 *    back through the control block.
 */
#ifndef ACKPT_PROTO_H
#define ACKPT_PROTO_H

#include <stdint.h>

#define ACKPT_PROTO_MAGIC   0x74706b63614b4341ull /* "ACKackpt" */
#define ACKPT_PROTO_VERSION 1

/* Descriptor numbers the helper finds its channels on after exec. */
#define ACKPT_HELPER_SOCK_FD 3
#define ACKPT_HELPER_SHM_FD  4

#define ACKPT_MAX_FILES      16384 /* file slots in the control block */
#define ACKPT_ARENA_ALIGN    4096  /* every staged chunk starts page-aligned */
#define ACKPT_REG_BUF_MAX    (1ull << 30) /* io_uring fixed-buffer size cap */

enum ackpt_op_type {
	ACKPT_OP_OPEN = 1,   /* SCM_RIGHTS fd attached; slot := file */
	ACKPT_OP_WRITE,      /* len bytes from arena at arena_pos -> offset */
	ACKPT_OP_FSYNC,      /* program asked; helper syncs in order */
	ACKPT_OP_TRUNCATE,   /* ftruncate(offset) */
	ACKPT_OP_CLOSE,      /* last program reference gone: fsync + close */
	ACKPT_OP_RENAME,     /* global barrier; paths follow the record */
	ACKPT_OP_SYNC_ALL,   /* global barrier: fsync every open file */
	ACKPT_OP_COMMIT,     /* metadata commit: barrier, then rename paths[0] -> paths[1];
			      * offset = commit id; flags & ACKPT_COMMIT_OWN_TEMP: on abort
			      * remove paths[0] (our hidden temporary) */
	ACKPT_OP_DIRTY,      /* the program wrote the file through the kernel itself (a
			      * description shared with another process): fsync it at
			      * the next FSYNC, CLOSE or barrier */
};

#define ACKPT_COMMIT_OWN_TEMP 0x1

struct ackpt_op {
	uint32_t type;
	uint32_t file;      /* slot index, or ACKPT_NO_FILE */
	uint64_t seq;       /* strictly increasing per session, starts at 1 */
	uint64_t offset;    /* file offset (WRITE), new size (TRUNCATE) */
	uint64_t len;       /* bytes (WRITE) */
	uint64_t arena_pos; /* WRITE: monotonic arena position of the data */
	uint64_t arena_end; /* monotonic arena position freed when this op is done */
	uint32_t flags;
	uint32_t path_len;  /* RENAME: bytes of "old\0new\0" after the record */
	uint64_t dev, ino;  /* OPEN: identity, for the node-local registry */
};

#define ACKPT_NO_FILE 0xffffffffu
#define ACKPT_OP_MAX_MSG (sizeof(struct ackpt_op) + 2 * 4096 + 2)

struct ackpt_file_slot {
	int32_t err;        /* first error (positive errno) seen by the helper */
	uint32_t err_seq;   /* bumps each time err is set */
	uint64_t written;   /* bytes written for this slot */
};

/*
 * Control block at offset 0 of the memfd.  Counters written by the helper
 * are only ever increased; the shim waits on the 32-bit *_gen words with
 * FUTEX_WAIT (shared futexes work across the two mappings).
 */
struct ackpt_shm {
	uint64_t magic;
	uint32_t version;
	uint32_t hdr_size;          /* offset of the arena in the memfd */
	uint64_t arena_size;
	int32_t helper_pid;
	uint32_t helper_flags;      /* ACKPT_HF_* */

	/* helper -> shim */
	uint64_t durable_seq;       /* every op with seq <= this is complete */
	uint64_t arena_tail;        /* arena bytes freed (monotonic) */
	uint32_t progress_gen;      /* futex word: bumped on any progress */
	uint32_t pad0;
	uint64_t bytes_written;
	uint64_t errors;
	uint64_t ops_done;
	uint64_t helper_cpu_ns;
	uint64_t prefault_done;     /* bytes of the arena populated by the helper */
	int32_t reg_helper;         /* our index in the node registry, or -1 */
	uint32_t pad1;

	/* shim -> helper */
	uint64_t staged_seq;        /* last op seq the shim has sent */

	/* helper -> shim: metadata commits, in request order */
	uint64_t commits_done;      /* commit ids <= this are finished (ok or aborted) */
	uint64_t commit_failures;   /* aborted commits */
	int32_t commit_last_err;    /* errno of the last abort */
	uint32_t pad2;

	struct ackpt_file_slot files[ACKPT_MAX_FILES];
};

#define ACKPT_HF_URING      0x1  /* io_uring engine (else pwrite pool) */
#define ACKPT_HF_FIXED_BUFS 0x2  /* arena registered as fixed buffers */
#define ACKPT_HF_DIRECT     0x4  /* O_DIRECT used for aligned bulk data */

static inline uint64_t ackpt_shm_hdr_size(void)
{
	uint64_t s = sizeof(struct ackpt_shm);
	return (s + ACKPT_ARENA_ALIGN - 1) & ~(uint64_t)(ACKPT_ARENA_ALIGN - 1);
}

/*
 * Node-local registry of files with pending work, so that another process
 * under ackpt (cp, an upload script) that opens such a file waits for it.
 * One table per uid in /dev/shm; entries are claimed with a CAS on `pid`.
 */
#define ACKPT_REGISTRY_PATH "/dev/shm/ackpt-registry-v4.%u" /* %u: uid; bump with the layout */
#define ACKPT_REGISTRY_ENTRIES 4096
#define ACKPT_REGISTRY_HELPERS 1024
#define ACKPT_REGISTRY_NAMES   1024
#define ACKPT_REGISTRY_MAGIC   (0x34746572706b6361ull ^ (uint64_t)sizeof(struct ackpt_registry))

/* One per live helper: how far its queue is durable.  Written by that
 * helper only (pid cleared by it at exit). */
struct ackpt_registry_helper {
	int32_t pid;        /* 0 = free */
	uint32_t pad;
	uint64_t durable_seq;
	uint64_t commits_done; /* as ackpt_shm.commits_done */
};

/* A deferred rename (commit_id 0) or metadata commit by some process on
 * the node.  Path lookups in other processes that hit old_hash or new_hash
 * (or, for opendir and rmdir, old_dir or new_dir) wait while it is
 * pending: helpers[helper].durable_seq < seq, or commits_done < commit_id.
 * Written by the claiming shim; anyone may reclaim it once it is done or
 * its helper is dead. */
struct ackpt_registry_name {
	int32_t pid;        /* claiming process's helper; 0 = free */
	uint32_t helper;    /* index into helpers[] */
	uint64_t seq;
	uint64_t commit_id;
	uint64_t old_hash, new_hash; /* FNV-1a of the canonical paths, never 0 */
	uint64_t old_dir, new_dir;   /* ... of their directories */
	uint32_t live;      /* the fields above are valid */
	uint32_t pad;
};
_Static_assert(sizeof(struct ackpt_registry_name) == 64, "registry name layout");

/* One per file with a writer under ackpt.  A reader waits while
 * helpers[helper].durable_seq < last_seq (the file has pending work).
 * Written by the claiming shim, except pid (cleared by the helper, or by
 * anyone who finds the helper dead) and shared (set by any claimer). */
struct ackpt_registry_entry {
	int32_t pid;        /* owning helper; 0 = free */
	uint32_t helper;    /* index into helpers[] */
	uint64_t dev, ino;
	uint64_t last_seq;  /* written by the shim on each op for the file */
	uint32_t live;      /* dev and ino are valid (release-stored after them) */
	uint32_t shared;    /* another process also writes this file: every
			     * writer goes through the kernel, in kernel order */
};

_Static_assert(sizeof(struct ackpt_registry_entry) == 40, "registry entry layout");

struct ackpt_registry {
	uint64_t magic;
	uint32_t used;      /* live entries, a cheap "anything pending?" test */
	uint32_t names_used; /* claimed names[] entries, the same for names */
	struct ackpt_registry_helper helpers[ACKPT_REGISTRY_HELPERS];
	struct ackpt_registry_entry e[ACKPT_REGISTRY_ENTRIES];
	struct ackpt_registry_name names[ACKPT_REGISTRY_NAMES];
};

#endif
