/*
 * Uploads when ackpt was built without libcurl or zlib
 * (meson -Dupload=disabled, or the libraries missing): ACKPT_UPLOAD is
 * refused in one line by the shim, and nothing here ever runs an upload.
 */
#include "helper.h"
#include "proto.h"
#include "upload.h"

int upload_init(const struct ackpt_helper_config *cfg, struct ackpt_shm *shm)
{
	if (!cfg->upload_url[0])
		return 0;
	hlog(0, "ACKPT_UPLOAD: this ackpt was built without upload support (it needs libcurl and "
	     "zlib at build time: meson setup -Dupload=enabled)");
	__atomic_store_n(&shm->upload_state, -1, __ATOMIC_RELEASE);
	return -1;
}

int upload_on(void) { return 0; }
void upload_file(int fd, const char *path, uint64_t seq) {}
void upload_renamed(const char *oldp, const char *newp, uint64_t seq) {}

int upload_done_upto(uint64_t seq, uint32_t *flags)
{
	*flags = 0;
	return 1;
}

void upload_marker(uint64_t commit_id, const char *tmp, const char *final, int tmp_was_uploaded) {}
int upload_marker_result(uint64_t commit_id) { return 0; }
int upload_event_fd(void) { return -1; }
void upload_events(void) {}
int upload_idle(void) { return 1; }
uint64_t upload_seq(uint64_t durable) { return durable; }
void upload_finish(void) {}
