/*
 * The protocol between libackpt.so (the shim, in the training process) and
 * ackpt-helper.  Nothing else lives here.
 *
 * Two channels:
 *  - a memfd holds the control block (struct ackpt_shm), with the op ring
 *    in it, followed by the staging arena.  The shim copies data into the
 *    arena and appends op records to the ring, in program order; the
 *    helper writes the data out and publishes progress (durable watermark,
 *    arena tail, errors) back through the control block.  The memory
 *    outlives the program, so when it dies the helper still finds every
 *    record it published and finishes all staged work.
 *  - a SOCK_SEQPACKET socket carries what memory cannot: each OPEN's
 *    descriptor (SCM_RIGHTS, sent before its record is published), and
 *    the doorbell that wakes a sleeping helper.  Its hangup tells the
 *    helper the program is gone; the shim polls it to see the helper gone.
 */
#ifndef ACKPT_PROTO_H
#define ACKPT_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include "job.h"

#define ACKPT_PROTO_MAGIC   0x74706b63614b4341ull /* "ACKackpt" */
#define ACKPT_PROTO_VERSION 10 /* 2: one payload struct per op; no TRUNCATE (ftruncate
				* goes through the kernel); DIRTY.  3: coord_part, announced_*,
				* cfg.  4: the job's secret in cfg, want_mib.  5: uploads.  6: open.after.
				* 7: chunks at their file offset's place in a page, bytes_direct,
				* FAIL.  8: op records in a ring in the control block, WRITEs
				* extended in place.  9: WRITEs published pending their copy.
				* 10: DIRSYNC, dirsync_err */

/* Descriptor numbers the helper finds its channels on after exec. */
#define ACKPT_HELPER_SOCK_FD 3
#define ACKPT_HELPER_SHM_FD  4

#define ACKPT_MAX_FILES      16384 /* file slots in the control block */
#define ACKPT_MARKER_INTENTS 8     /* markers being created at once (a ring) */
#define ACKPT_INTENT_PATH    4096
#define ACKPT_UPLOAD_URL_MAX   1024
#define ACKPT_UPLOAD_ROOTS_MAX 4096
#define ACKPT_ARENA_ALIGN    4096  /* a chunk keeps its file offset modulo this (arena.h) */
#define ACKPT_REG_BUF_MAX    (1ull << 30) /* io_uring fixed-buffer size cap */

/* shim -> helper: what each record asks.  Ops of one file take effect in
 * the order sent, as order.h states; RENAME, SYNC_ALL, COMMIT and DIRSYNC
 * wait for every earlier op of the session. */
enum ackpt_op_type {
	ACKPT_OP_OPEN = 1,   /* a file the shim will stage for: u.open; the file's
			      * descriptor comes as SCM_RIGHTS; slot `file` := it */
	ACKPT_OP_WRITE,      /* u.write: bytes from the arena into the file */
	ACKPT_OP_FSYNC,      /* the program asked for an fsync: done in order */
	ACKPT_OP_CLOSE,      /* the program's last reference is gone: fsync, close */
	ACKPT_OP_RENAME,     /* u.rename: fsync the file, rename, fsync the directories */
	ACKPT_OP_SYNC_ALL,   /* fsync every open file */
	ACKPT_OP_COMMIT,     /* u.commit: barrier, then rename the metadata into place */
	ACKPT_OP_DIRTY,      /* the program wrote the file through the kernel itself (a
			      * description shared with another process): fsync it at
			      * the next FSYNC, CLOSE or barrier */
	ACKPT_OP_FAIL,       /* a write to the file returned EIO to the program (an
			      * aborted commit is reported there) and its bytes were
			      * dropped: the file is incomplete, so every commit that
			      * covers it must abort */
	ACKPT_OP_DIRSYNC,    /* u.rename (its path_len): the program fsynced this
			      * directory while work was pending; done after every
			      * earlier op, its error reported at the next one */
};

/* OPEN */
struct ackpt_op_open {
	uint64_t dev, ino;  /* the file's identity */
	int32_t reg_idx;    /* its entry in the node registry, or -1 */
	uint32_t pad;
	uint64_t after;     /* the file was reopened while an earlier slot of it still
			     * had work: no op of this slot starts before every op
			     * <= after is complete (0: none) */
};

/* WRITE */
struct ackpt_op_write {
	uint64_t offset;    /* where in the file */
	uint64_t len;       /* bytes */
	uint64_t arena_pos; /* monotonic arena position of the data (arena.h) */
	uint64_t arena_end; /* arena position the shim may reuse once this is done */
};

/* RENAME: "old\0new\0" (canonical paths) follow the record */
struct ackpt_op_rename {
	uint32_t path_len;  /* bytes of the paths */
	uint32_t pad;
};

/* COMMIT: "temporary\0final\0" follow the record */
struct ackpt_op_commit {
	uint64_t id;        /* 1, 2, ... per session; commits_done reports them */
	uint32_t path_len;  /* bytes of the paths */
	uint32_t flags;     /* ACKPT_COMMIT_OWN_TEMP: the temporary is ours: on abort,
			     * remove it */
};

#define ACKPT_COMMIT_OWN_TEMP 0x1

/* Exactly one member of u is meaningful: the one named after type (none
 * for FSYNC, CLOSE, SYNC_ALL, DIRTY and FAIL). */

/*
 * The op ring: records in program order, each a header, the op and its
 * paths, padded to ACKPT_RING_ALIGN; a record may wrap past the end.  One
 * producer (the session's shim, under its lock) and one consumer (the
 * helper).  The shim publishes with a release store of tail and rings the
 * doorbell (one socket message without a descriptor) only when the helper
 * said it sleeps (docs/DESIGN.md 3.21).  A small write that continues the
 * last record, a WRITE the helper has not taken yet, extends it instead of
 * adding one (ext below).
 */
#define ACKPT_RING_BYTES (1u << 20)
#define ACKPT_RING_ALIGN 64u

struct ackpt_ring_rec {
	uint32_t len;       /* bytes of op and paths after this header */
	uint32_t pad;
	uint64_t ext;       /* WRITE: bytes appended to it after it was published (the
			     * shim, by CAS, while ACKPT_REC_TAKEN is clear: the write
			     * continues in the file and the arena); the helper sets
			     * ACKPT_REC_TAKEN when it takes the record, and adds what
			     * is below it to u.write.len and u.write.arena_end.
			     * ACKPT_REC_PENDING: published before its bytes were
			     * copied (a large write copied outside the shim's lock);
			     * the helper takes no record from it on until the shim
			     * clears it, after setting u.write.len to the bytes it
			     * copied (0: nothing to write).  Never extended */
};

#define ACKPT_REC_TAKEN   (1ull << 63)
#define ACKPT_REC_PENDING (1ull << 62)

enum {
	ACKPT_RING_AWAKE = 0,  /* the helper will look at the ring again by itself */
	ACKPT_RING_DOZING = 1, /* it looks every millisecond: ring for urgent records */
	ACKPT_RING_ASLEEP = 2, /* it looks only when woken: ring for any record */
};

struct ackpt_ring {
	uint64_t tail;      /* shim: bytes published, monotonic */
	uint8_t pad0[56];
	uint64_t head;      /* helper: bytes consumed, monotonic */
	uint32_t sleep;     /* helper: ACKPT_RING_*; the shim sets AWAKE when it rings */
	uint8_t pad1[52];
	uint8_t data[ACKPT_RING_BYTES];
};

/* Ring bytes a record with len bytes of op and paths takes, header and
 * padding included. */
static inline size_t ackpt_ring_rec_bytes(size_t len)
{
	size_t n = sizeof(struct ackpt_ring_rec) + len;

	return (n + ACKPT_RING_ALIGN - 1) & ~(size_t)(ACKPT_RING_ALIGN - 1);
}

/* len bytes at ring position at lie at data + *in, the first of them up
 * to the ring's end (returned), the rest from data[0]. */
static inline size_t ackpt_ring_span(uint64_t at, size_t len, size_t *in)
{
	size_t first;

	*in = (size_t)(at % ACKPT_RING_BYTES);
	first = ACKPT_RING_BYTES - *in;
	return first > len ? len : first;
}

/* The payload of the descriptor message that goes with an OPEN record. */
struct ackpt_fd_msg {
	uint64_t seq;       /* the OPEN's seq */
};
struct ackpt_op {
	uint32_t type;      /* enum ackpt_op_type */
	uint32_t file;      /* slot index, or ACKPT_NO_FILE */
	uint64_t seq;       /* strictly increasing per session, starts at 1 */
	union {
		struct ackpt_op_open open;
		struct ackpt_op_write write;
		struct ackpt_op_rename rename;
		struct ackpt_op_commit commit;
	} u;
};

_Static_assert(sizeof(struct ackpt_op) == 48, "op record layout");
_Static_assert(sizeof(struct ackpt_op_open) == 32 && sizeof(struct ackpt_op_write) == 32 &&
	       sizeof(struct ackpt_op_commit) == 16, "op payload layouts");

/* Bytes of paths following a record (RENAME, DIRSYNC, COMMIT), else 0. */
static inline uint32_t ackpt_op_path_len(const struct ackpt_op *op)
{
	if (op->type == ACKPT_OP_RENAME || op->type == ACKPT_OP_DIRSYNC)
		return op->u.rename.path_len;
	if (op->type == ACKPT_OP_COMMIT)
		return op->u.commit.path_len;
	return 0;
}

/* The arena position freed when op is done (WRITE), else 0. */
static inline uint64_t ackpt_op_arena_end(const struct ackpt_op *op)
{
	return op->type == ACKPT_OP_WRITE ? op->u.write.arena_end : 0;
}

#define ACKPT_NO_FILE 0xffffffffu
#define ACKPT_OP_MAX_MSG (sizeof(struct ackpt_op) + 2 * 4096 + 2)

/* Per file slot, in the control block. */
struct ackpt_file_slot {
	int32_t err;        /* helper: first error (positive errno) on the file; the shim
			     * too, replaying after the helper died; the shim clears it
			     * when it frees the slot */
	uint32_t err_seq;   /* bumped by whoever sets err */
	uint64_t written;   /* helper: bytes written for this slot */
};

/*
 * The shim's validated configuration, handed to the helper in the control
 * block: the helper parses no ACKPT_* variable itself (except ACKPT_FAULT,
 * the test suite's fault injector).  Written by the shim before the helper
 * starts; read-only afterwards.
 */
struct ackpt_helper_config {
	int32_t log_level;          /* 0 error, 1 warn, 2 info, 3 debug (ACKPT_LOG) */
	uint32_t io_pool;           /* 1: pwrite thread pool, not io_uring (ACKPT_IO=pool) */
	uint32_t direct;            /* 1: O_DIRECT for aligned bulk writes (ACKPT_DIRECT) */
	uint32_t coord_host;        /* 1: host the job's barrier coordinator */
	uint64_t barrier_timeout_ns; /* ACKPT_BARRIER_TIMEOUT */
	uint32_t test_delay_ms;     /* ACKPT_TEST_DELAY_MS, for this rank (ACKPT_TEST_DELAY_RANK) */
	uint32_t test_skip_dirfsync; /* ACKPT_TEST_SKIP_DIRFSYNC */
	struct ackpt_job job;       /* discovered when the session started */
	/* uploads (ACKPT_UPLOAD): empty url when off */
	uint64_t upload_part_size;  /* ACKPT_UPLOAD_PART_SIZE, 0: the profile's or 16 MiB */
	uint32_t upload_concurrency; /* ACKPT_UPLOAD_CONCURRENCY, 0: the profile's or 8 */
	uint32_t pad_upload;
	char upload_url[ACKPT_UPLOAD_URL_MAX];
	/* what keys are relative to: per managed root, the directory (for a
	 * glob, its literal leading directories), NUL-separated, ending in an
	 * empty string */
	char upload_roots[ACKPT_UPLOAD_ROOTS_MAX];
};

/*
 * Control block at offset 0 of the memfd.  Each field is written by one
 * process, named in its comment; "shim, after the helper died" marks what
 * the shim takes over while it replays unconfirmed ops synchronously (the
 * helper is gone then, so there is still one writer at a time).  Counters
 * only ever increase; the shim waits on progress_gen with FUTEX_WAIT
 * (shared futexes work across the two mappings).
 */
struct ackpt_shm {
	uint64_t magic;             /* shim, before the helper starts */
	uint32_t version;           /* shim, before the helper starts */
	uint32_t hdr_size;          /* shim, before: offset of the arena in the memfd */
	uint64_t arena_size;        /* shim, before the helper starts */
	int32_t helper_pid;         /* helper, at start */
	uint32_t helper_flags;      /* helper, at start: ACKPT_HF_* */

	/* progress */
	uint64_t durable_seq;       /* helper; shim after the helper died: every op with
				     * seq <= this is complete */
	uint64_t arena_tail;        /* helper: arena positions below this are free */
	uint32_t progress_gen;      /* helper: futex word, bumped on any progress */
	uint32_t pad0;
	uint64_t bytes_written;     /* helper */
	uint64_t errors;            /* helper; shim after the helper died */
	uint64_t ops_done;          /* helper */
	uint64_t helper_cpu_ns;     /* helper */
	uint64_t prefault_done;     /* helper: bytes of the arena it has populated */
	int32_t reg_helper;         /* helper, at start: its index in the node registry, or -1 */
	uint32_t want_mib;          /* shim: how far into the ring staging would have got,
				     * in MiB, counting what it wrote through the kernel
				     * because the arena was not faulted in yet; the helper
				     * faults ahead of it */

	uint64_t staged_seq;        /* shim: last op seq it has sent */

	/* metadata commits, in request order */
	uint64_t commits_done;      /* helper: commit ids <= this are finished (ok or aborted) */
	uint64_t commit_failures;   /* helper: aborted commits */
	int32_t commit_last_err;    /* helper: errno of the last abort */
	int32_t dirsync_err;        /* helper: errno of a failed DIRSYNC; the shim takes
				     * it (exchanging 0) at the program's next directory
				     * fsync */

	/* other nodes' view (docs/DESIGN.md 3.17) */
	int32_t coord_part;         /* helper, at start: its participant id at the barrier
				     * coordinator (ACKPT_COORD_LOCAL: it hosts it), or -1 */
	uint32_t pad3;
	uint64_t announced_seq;     /* shim: highest op seq it told the coordinator a name
				     * waits for; the helper reports progress past it */
	uint64_t announced_commit;  /* shim: the same for commit ids */

	struct ackpt_helper_config cfg; /* shim, before the helper starts */

	/* shim, before it creates a marker's hidden temporary: its path, so a
	 * program killed before the temporary reached the helper (an OPEN op)
	 * leaves nothing behind; the helper unlinks any that still exist when
	 * it exits, after its last commit */
	char marker_intent[ACKPT_MARKER_INTENTS][ACKPT_INTENT_PATH];

	struct ackpt_file_slot files[ACKPT_MAX_FILES];

	/* uploads (docs/UPLOAD.md), all written by the helper */
	int32_t upload_state;       /* 0 off, 1 running, -1 configured but cannot work */
	uint32_t pad4;
	uint64_t uploaded_bytes;
	uint64_t uploaded_objects;
	uint64_t upload_failures;   /* objects that failed for good */
	uint64_t uploads_pending;   /* objects queued or in flight */
	uint64_t upload_seq;        /* every upload that an op <= this started is over
				     * (done or failed), and every op <= it is durable */
	uint64_t bytes_direct;      /* helper: of bytes_written, with O_DIRECT */
	uint64_t commits_withheld;  /* helper: commits not made because a file of theirs
				     * was failed by a FAIL op: the program was told at
				     * that write, so not reported again; counted at exit */
	uint64_t renames_failed;    /* helper: deferred renames of closed files that
				     * failed: no later call can report them, so the
				     * program's exit does (status 1) */

	struct ackpt_ring ring __attribute__((aligned(64))); /* op records (above) */
};

_Static_assert(__builtin_offsetof(struct ackpt_shm, durable_seq) == 32 &&
	       __builtin_offsetof(struct ackpt_shm, staged_seq) == 104 &&
	       __builtin_offsetof(struct ackpt_shm, cfg) == 160 &&
	       __builtin_offsetof(struct ackpt_shm, files) == 160 + sizeof(struct ackpt_helper_config) +
								ACKPT_MARKER_INTENTS * ACKPT_INTENT_PATH,
	       "control block layout");

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
#define ACKPT_REGISTRY_PATH "/dev/shm/ackpt-registry-v5.%u" /* %u: uid; bump with the layout */
#define ACKPT_REGISTRY_ENTRIES 4096
#define ACKPT_REGISTRY_HELPERS 1024
#define ACKPT_REGISTRY_NAMES   1024
#define ACKPT_REGISTRY_MAGIC   (0x34746572706b6361ull ^ (uint64_t)sizeof(struct ackpt_registry))

/* One per live helper: how far its queue is durable.  Written by that
 * helper only (owner cleared by it at exit).  owner is the helper's pid in
 * its low 32 bits and the low 32 bits of its start time (clock ticks after
 * boot, /proc/<pid>/stat field 22) in its high ones: one word, claimed with
 * one CAS.  The two name one process: a waiter whose helper died unseen
 * cannot be fooled by another process that got the same pid. */
struct ackpt_registry_helper {
	uint64_t owner;     /* 0 = free */
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
