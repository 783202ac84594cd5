/*
 * ackpt public API.  Exported by libackpt.so; programs never need it (the
 * shim works on unmodified programs), but benchmarks, tests and careful
 * tools can ask when their checkpoint is really on storage.  Callable from
 * Python through ctypes.CDLL(None) in a process running under the preload.
 */
#ifndef ACKPT_H
#define ACKPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ackpt_stats {
	uint64_t bytes_staged;   /* bytes copied into staging by this process */
	uint64_t files;          /* managed files opened */
	uint64_t bytes_written;  /* bytes the helper has written to storage */
	uint64_t errors;         /* write/fsync/rename errors seen by the helper */
	uint64_t ops_pending;    /* ops staged but not yet durable */
	double stall_seconds;    /* time spent inside managed write calls */
	int32_t active;          /* 1 once a managed file was opened (helper running) */
	int32_t helper_flags;    /* 1 io_uring, 2 fixed buffers, 4 O_DIRECT */
	double helper_cpu_seconds;
	uint64_t staging_bytes;  /* size of the staging arena */
	/* uploads (ACKPT_UPLOAD): zero without */
	uint64_t uploaded_bytes;   /* bytes the object store accepted */
	uint64_t uploaded_objects; /* objects completed */
	uint64_t upload_failures;  /* objects that failed for good (after retries) */
	uint64_t uploads_pending;  /* objects queued or in flight */
	/* how the bytes went */
	uint64_t bytes_direct;     /* of bytes_written, written with O_DIRECT */
	uint64_t bytes_through;    /* written by this process itself, past staging
				    * (staging full or not faulted in yet) */
	uint64_t copies_overlapped; /* staging copies that began while another
				     * thread's copy was under way */
};

/*
 * Wait until everything this process staged so far is durable (written and
 * fsynced; renames done).  timeout_s <= 0 waits without limit.
 * Returns 0, -ETIMEDOUT, or -EIO when the helper reported an error.
 */
int ackpt_wait(double timeout_s);

/*
 * With ACKPT_UPLOAD: wait until everything this process staged so far is
 * durable and every file it closed so far is uploaded (its commit markers
 * included).  Returns 0, -ETIMEDOUT, -EIO when an upload failed for good
 * (now or before), or -EINVAL without ACKPT_UPLOAD.
 */
int ackpt_wait_uploaded(double timeout_s);

/* Fill *out (size = sizeof(struct ackpt_stats)); returns 0 or -EINVAL. */
int ackpt_get_stats(struct ackpt_stats *out, size_t size);

#ifdef __cplusplus
}
#endif

#endif
