/*
 * Uploads to an object store (ACKPT_UPLOAD): every file the program wrote
 * under a managed root goes to <prefix>/<path relative to the root> once it
 * is closed and durable; a commit marker goes only after every rank's data
 * uploads are done (the barrier's ACK waits for them), and before its local
 * commit.  upload.c runs the transfers on a thread of its own with libcurl;
 * s3conf.c finds the bucket, endpoint and credentials.  See docs/UPLOAD.md.
 */
#ifndef ACKPT_HELPER_UPLOAD_H
#define ACKPT_HELPER_UPLOAD_H

#include <stdint.h>

struct ackpt_helper_config;
struct ackpt_shm;

/* Where and how to upload, resolved from the URL, the environment, the AWS
 * files and the MSC config (s3conf.c). */
struct s3conf {
	char *url;          /* as the user gave it, for log lines */
	char *bucket;
	char *prefix;       /* no leading or trailing '/'; may be empty */
	char *endpoint;     /* scheme://host[:port], no trailing '/' */
	char *region;
	char *access_key, *secret_key, *session_token;
	int path_style;     /* bucket in the path (custom endpoints), else in the host */
	int verify_tls;     /* 0 only when an MSC profile says verify: false */
	uint64_t part_size;
	unsigned concurrency;
};

/* Fill c from cfg and the environment; 0, or -EINVAL after one line that
 * names what is wrong.  s3conf_free releases it. */
int s3conf_resolve(struct s3conf *c, const struct ackpt_helper_config *cfg);
void s3conf_free(struct s3conf *c);

#define UPLOAD_F_FAILED 0x1 /* an upload failed for good since the last barrier */

/* 0 without ACKPT_UPLOAD; -1 when it is set but cannot work (said once). */
int upload_init(const struct ackpt_helper_config *cfg, struct ackpt_shm *shm);
int upload_on(void);
/* The file at path (open as fd, any mode) was written and is now durable,
 * as of op seq: upload it under its key, if it is under a root. */
void upload_file(int fd, const char *path, uint64_t seq);
/* A deferred rename the helper performed: an object of old moves to new. */
void upload_renamed(const char *oldp, const char *newp, uint64_t seq);
/* Are the uploads started by ops <= seq finished?  *flags gets
 * UPLOAD_F_FAILED if one failed for good since the last call that said 1. */
int upload_done_upto(uint64_t seq, uint32_t *flags);
/* A commit marker: upload tmp's contents under final's key, in order after
 * every earlier upload; tmp_was_uploaded: tmp is the program's own file
 * (renamed into the marker), whose object goes.  upload_marker_result: 1
 * still going, 0 done, or -errno. */
void upload_marker(uint64_t commit_id, const char *tmp, const char *final, int tmp_was_uploaded);
int upload_marker_result(uint64_t commit_id);
/* Readable when an upload finished; upload_events() clears it. */
int upload_event_fd(void);
void upload_events(void);
int upload_idle(void);
/* How far uploads are over, given how far ops are durable. */
uint64_t upload_seq(uint64_t durable);
/* At exit, once upload_idle(): stop the thread; name what failed. */
void upload_finish(void);

#endif
