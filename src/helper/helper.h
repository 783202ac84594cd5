/*
 * The helper's state and the functions its files share.  helper.c: the
 * main loop, receiving and dispatching ops, completions and retirement;
 * durable.c: file slots, errors and directory durability; commit.c:
 * metadata commits behind the barrier.  The ordering rules are at the top
 * of helper.c.
 */
#ifndef ACKPT_HELPER_H
#define ACKPT_HELPER_H

#include <stdatomic.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

#include "engine.h"
#include "proto.h"

#define MAXPEND   4096
#define PAGE      4096ull
#define DIRECT_MIN (64 * 1024)

enum hop_state { HOP_FREE = 0, HOP_QUEUED, HOP_ISSUED, HOP_DONE };

struct hop {
	struct ackpt_op op;
	char *paths;
	enum hop_state state;
	uint64_t done_bytes;
	int used_direct;
	int fault_seen;      /* the fault injector has counted this op */
	int fault_ret;       /* ... and what it said, until the write is issued */
	uint64_t len;        /* WRITE: bytes this write covers, with the ones merged in */
	struct hop *merged;  /* WRITE: the next op merged into this one's write */
	int merged_in;       /* WRITE: merged into an earlier op's write, which covers it */
	int fsync_phase;       /* CLOSE: fsync issued */
	struct hop *fnext;     /* next pending op of the same file */
};

struct hfile {
	int fd, dfd;           /* own OFDs: buffered and O_DIRECT (-1 if none) */
	int open;
	int dirty;
	int written;           /* written since it was opened: uploaded at its close */
	int direct_failed;
	int err;
	int reg_idx;
	int name_durable;      /* its directory entry has been fsynced */
	uint64_t open_gen;     /* H.open_gen when it was opened */
	uint64_t after;        /* reopened while an earlier slot of the file had work:
				* none of its ops starts before every op <= this is
				* complete */
	uint64_t dev, ino;
	char *path;            /* at open, for log lines */
	struct hop *head, *tail, *qhead;
};

struct helper {
	struct ackpt_shm *shm;
	char *arena;
	uint64_t arena_size;
	int sock;
	int log_level;   /* 0 error, 1 warn, 2 info, 3 debug */
	int use_direct;
	struct engine *eng;
	struct hop ring[MAXPEND];
	uint64_t head_seq;   /* seq of ring slot at head (next to retire) */
	uint64_t next_seq;   /* seq expected next from the ring */
	uint64_t last_record_ns; /* when the ring last had a record (now_ns) */
	int ring_blocked;        /* the next record's copy is under way (ACKPT_REC_PENDING) */
	int prog_gone;           /* the program hung up: a pending record never fills */
	unsigned npend;
	struct hfile files[ACKPT_MAX_FILES];
	atomic_int prefault_done;
	atomic_int exiting;
	_Atomic uint64_t max_in; /* furthest end of a staged chunk within the ring */
	int registered;
	struct ackpt_registry *reg;
	int reg_helper;
	long delay_ms;
	int skip_dirfsync;   /* testing knob: the negative control of the power-loss test */
	struct timespec started; /* CLOCK_REALTIME at start */
	uint64_t open_gen;   /* counts OPEN ops */
	struct { char *dir; uint64_t gen; } dircache[16]; /* directories fsynced, and when */
	unsigned dircache_next;
	pid_t pid;
	uint64_t errors_acked;
	int last_err;
	struct commit *cq_head, *cq_tail;
};
extern struct helper H;

/* A metadata commit waiting for the barrier, in request order. */
struct commit {
	uint64_t id;
	char *tmp, *final;
	int own_temp;
	uint32_t slot;
	uint64_t dev, ino;  /* the file in that slot at request time */
	int file_err;       /* error of the metadata file itself, up to the commit */
	int state;          /* 0 new, 1 waiting for the barrier, 2 decided,
			     * 3 its marker being uploaded */
	int status;
	uint64_t seq;       /* the COMMIT op's */
	int upload_failed;  /* some data upload of this checkpoint failed: keep the
			     * marker out of the object store */
	struct commit *next;
};

void hlog(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void publish(void);
void upload_closing(struct hfile *f, uint64_t seq);
/* durable.c */
void file_error(uint32_t slot, int err, const char *what);
void file_failed_told(uint32_t slot);
void registry_release(struct hfile *f);
void file_close(struct hfile *f);
int fsync_checked(int fd);
int fsync_dir(const char *dir, int *gone);
int fsync_dir_of(const char *path);
int sync_dir_cached(const char *dir, uint64_t gen);
void file_name_durable(uint32_t slot);
/* commit.c */
int is_metadata_temp(const char *path);
void commit_enqueue(struct hop *h);
void commit_decided(uint64_t id, int status, const char *why);
void commit_upload_failed(uint64_t id);
void commit_pump(void);

#endif
