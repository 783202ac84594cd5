/* The public API (include/ackpt.h). */
#include <stddef.h>
#include <string.h>

#include "ackpt.h"
#include "shim.h"

ACKPT_EXPORT int ackpt_wait(double timeout_s)
{
	int saved = errno, r;
	struct ackpt_shm *shm;

	ENSURE_REAL();
	r = session_sync_all(timeout_s, 0);
	shm = session_shm();
	if (r == 0 && shm && __atomic_load_n(&shm->errors, __ATOMIC_ACQUIRE))
		r = -EIO;
	errno = saved;
	return r;
}

ACKPT_EXPORT int ackpt_wait_uploaded(double timeout_s)
{
	int saved = errno, r;
	uint64_t seq;
	struct ackpt_shm *shm;

	ENSURE_REAL();
	if (!C.upload_url)
		return -EINVAL;
	seq = S.seq;
	r = session_sync_all(timeout_s, 0);
	if (r == 0)
		r = session_wait_uploads(seq, timeout_s, 0);
	shm = session_shm();
	if (r == 0 && shm && (__atomic_load_n(&shm->upload_failures, __ATOMIC_ACQUIRE) ||
			      __atomic_load_n(&shm->upload_state, __ATOMIC_ACQUIRE) < 0))
		r = -EIO;
	errno = saved;
	return r;
}

ACKPT_EXPORT int ackpt_get_stats(struct ackpt_stats *out, size_t size)
{
	struct ackpt_stats s;
	struct ackpt_shm *shm = session_shm(); /* no lock: a start may fail meanwhile */

	/* callers built against the first, shorter struct keep working */
	if (!out || size < offsetof(struct ackpt_stats, active) + sizeof(int32_t))
		return -EINVAL;
	memset(&s, 0, sizeof(s));
	s.bytes_staged = S.bytes_staged;
	s.files = S.files;
	s.stall_seconds = S.stall_ns / 1e9;
	s.active = shm && S.state == SESS_ACTIVE;
	s.staging_bytes = S.arena_size;
	s.bytes_through = S.bytes_through;
	s.copies_overlapped = __atomic_load_n(&S.copies_overlapped, __ATOMIC_RELAXED);
	if (shm) {
		s.bytes_written = __atomic_load_n(&shm->bytes_written, __ATOMIC_ACQUIRE);
		s.errors = __atomic_load_n(&shm->errors, __ATOMIC_ACQUIRE);
		s.ops_pending = S.seq - session_durable();
		s.helper_flags = (int32_t)shm->helper_flags;
		s.helper_cpu_seconds = shm->helper_cpu_ns / 1e9;
		s.uploaded_bytes = __atomic_load_n(&shm->uploaded_bytes, __ATOMIC_ACQUIRE);
		s.uploaded_objects = __atomic_load_n(&shm->uploaded_objects, __ATOMIC_ACQUIRE);
		s.upload_failures = __atomic_load_n(&shm->upload_failures, __ATOMIC_ACQUIRE);
		s.uploads_pending = __atomic_load_n(&shm->uploads_pending, __ATOMIC_ACQUIRE);
		s.bytes_direct = __atomic_load_n(&shm->bytes_direct, __ATOMIC_ACQUIRE);
	}
	memcpy(out, &s, size < sizeof(s) ? size : sizeof(s));
	return 0;
}
