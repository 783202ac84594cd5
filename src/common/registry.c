/* The node registry, the parts shim and helper share (registry.h). */
#include "registry.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

struct ackpt_registry *ackpt_registry_map(int create)
{
	struct ackpt_registry *r;
	struct stat st;
	uint64_t zero = 0;
	char p[64];
	long fd;

	snprintf(p, sizeof(p), ACKPT_REGISTRY_PATH, (unsigned)getuid());
	/* raw system calls: the shim's wrappers must not see its own table */
	fd = syscall(SYS_openat, AT_FDCWD, p,
		     O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT : 0), 0600);
	if (fd < 0)
		return NULL;
	if (create && (syscall(SYS_fstat, fd, &st) < 0 ||
		       (st.st_size < (off_t)sizeof(*r) &&
			syscall(SYS_ftruncate, fd, (long)sizeof(*r)) < 0))) {
		syscall(SYS_close, fd);
		return NULL;
	}
	r = (void *)syscall(SYS_mmap, NULL, sizeof(*r), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	syscall(SYS_close, fd);
	if (r == MAP_FAILED)
		return NULL;
	if (create)
		__atomic_compare_exchange_n(&r->magic, &zero, ACKPT_REGISTRY_MAGIC, 0,
					    __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
	if (__atomic_load_n(&r->magic, __ATOMIC_ACQUIRE) != ACKPT_REGISTRY_MAGIC) {
		syscall(SYS_munmap, r, sizeof(*r));
		return NULL;
	}
	return r;
}

/*
 * The low 32 bits of process pid's start time (field 22 of /proc/<pid>/stat,
 * clock ticks after boot); 0 when unknown, -1 when there is no such process.
 * Raw system calls, as in ackpt_registry_map.
 */
static int64_t proc_start(int32_t pid)
{
	char p[40], buf[640], *s;
	unsigned long long start;
	long fd, n;
	int field;

	snprintf(p, sizeof(p), "/proc/%d/stat", (int)pid);
	fd = syscall(SYS_openat, AT_FDCWD, p, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT || errno == ESRCH ? -1 : 0;
	n = syscall(SYS_read, fd, buf, sizeof(buf) - 1);
	syscall(SYS_close, fd);
	if (n <= 0)
		return n < 0 && errno == ESRCH ? -1 : 0;
	buf[n] = 0;
	s = strrchr(buf, ')'); /* the name in parentheses (field 2) may hold anything */
	/* step s to the space before field 22 */
	for (field = 2; s && field < 22; field++)
		s = strchr(s + 1, ' ');
	if (!s || sscanf(s + 1, "%llu", &start) != 1)
		return 0;
	return (int64_t)(uint32_t)start;
}

static int owner_gone(uint64_t owner)
{
	int32_t pid = ackpt_owner_pid(owner);
	uint32_t start = (uint32_t)(owner >> 32);
	int64_t now;

	if (ackpt_registry_owner_gone(pid))
		return 1;
	if (!start)
		return 0;
	now = proc_start(pid);
	return now < 0 || (now > 0 && (uint32_t)now != start);
}

int ackpt_registry_claim_helper(struct ackpt_registry *r)
{
	int32_t pid = (int32_t)getpid();
	int64_t start = proc_start(pid);
	uint64_t mine = (uint32_t)pid | (uint64_t)(start > 0 ? (uint32_t)start : 0) << 32;
	unsigned i;

	for (i = 0; i < ACKPT_REGISTRY_HELPERS; i++) {
		struct ackpt_registry_helper *h = &r->helpers[i];
		uint64_t old = __atomic_load_n(&h->owner, __ATOMIC_RELAXED);

		if (old && !owner_gone(old))
			continue;
		if (__atomic_compare_exchange_n(&h->owner, &old, mine, 0, __ATOMIC_ACQ_REL,
						__ATOMIC_RELAXED)) {
			h->durable_seq = 0;
			h->commits_done = 0;
			return (int)i;
		}
	}
	return -1;
}

void ackpt_registry_release(struct ackpt_registry *r, int idx, int32_t pid, uint64_t dev,
			    uint64_t ino)
{
	struct ackpt_registry_entry *e;

	if (!r || idx < 0 || idx >= ACKPT_REGISTRY_ENTRIES)
		return;
	e = &r->e[idx];
	if (e->dev != dev || e->ino != ino)
		return;
	if (__atomic_load_n(&e->pid, __ATOMIC_ACQUIRE) == pid) {
		__atomic_store_n(&e->live, 0, __ATOMIC_RELEASE);
		__atomic_store_n(&e->shared, 0, __ATOMIC_RELAXED);
	}
	if (__atomic_compare_exchange_n(&e->pid, &pid, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
		__atomic_fetch_sub(&r->used, 1, __ATOMIC_RELAXED);
}

int ackpt_registry_owner_gone(int32_t pid)
{
	return kill(pid, 0) < 0 && errno == ESRCH;
}

int ackpt_registry_helper_gone(const struct ackpt_registry *r, uint32_t slot, int32_t pid)
{
	uint64_t o;

	if (ackpt_registry_owner_gone(pid))
		return 1;
	o = __atomic_load_n(&r->helpers[slot % ACKPT_REGISTRY_HELPERS].owner, __ATOMIC_ACQUIRE);
	return ackpt_owner_pid(o) == pid && owner_gone(o);
}

/*
 * Free the entries and names of helpers that died without releasing them
 * (SIGKILL, the OOM killer).  Otherwise the table's counts stay up, and
 * every process of the node keeps paying for "is anything pending?" (a
 * reader's open then looks up its path; its reads scan the table).  Run by
 * each helper at its start.  Only a gone helper counts (dead, or its pid
 * now another process's): an entry's other fields may belong to a claim
 * still being filled in.  live is left as it is, since a new claimer may
 * already own the entry again when we would store it; a claim sets it
 * last.  Returns how many were freed.
 */
unsigned ackpt_registry_sweep(struct ackpt_registry *r)
{
	unsigned i, freed = 0;

	for (i = 0; i < ACKPT_REGISTRY_ENTRIES; i++) {
		struct ackpt_registry_entry *e = &r->e[i];
		int32_t pid = __atomic_load_n(&e->pid, __ATOMIC_ACQUIRE);

		if (!pid || !ackpt_registry_helper_gone(r, e->helper, pid))
			continue;
		if (__atomic_compare_exchange_n(&e->pid, &pid, 0, 0, __ATOMIC_ACQ_REL,
						__ATOMIC_RELAXED)) {
			__atomic_fetch_sub(&r->used, 1, __ATOMIC_RELAXED);
			freed++;
		}
	}
	for (i = 0; i < ACKPT_REGISTRY_NAMES; i++) {
		struct ackpt_registry_name *n = &r->names[i];
		int32_t pid = __atomic_load_n(&n->pid, __ATOMIC_ACQUIRE);

		if (!pid || !ackpt_registry_helper_gone(r, n->helper, pid))
			continue;
		if (__atomic_compare_exchange_n(&n->pid, &pid, 0, 0, __ATOMIC_ACQ_REL,
						__ATOMIC_RELAXED)) {
			__atomic_fetch_sub(&r->names_used, 1, __ATOMIC_RELAXED);
			freed++;
		}
	}
	return freed;
}

uint64_t ackpt_name_hash(const char *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ull;
	size_t i;

	for (i = 0; i < n; i++) {
		h ^= (unsigned char)p[i];
		h *= 0x100000001b3ull;
	}
	return h | 1;
}

uint64_t ackpt_path_hash(const char *canon)
{
	return ackpt_name_hash(canon, strlen(canon));
}

uint64_t ackpt_dir_hash(const char *canon)
{
	const char *slash = strrchr(canon, '/');

	if (!slash)
		return 0;
	return ackpt_name_hash(canon, slash == canon ? 1 : (size_t)(slash - canon));
}

int ackpt_registry_name_pending(const struct ackpt_registry *r,
				const struct ackpt_registry_name *n, int32_t pid)
{
	const struct ackpt_registry_helper *h = &r->helpers[n->helper % ACKPT_REGISTRY_HELPERS];
	uint64_t commit = __atomic_load_n(&n->commit_id, __ATOMIC_ACQUIRE);

	if (ackpt_owner_pid(__atomic_load_n(&h->owner, __ATOMIC_ACQUIRE)) != pid)
		return 0;
	if (commit)
		return __atomic_load_n(&h->commits_done, __ATOMIC_ACQUIRE) < commit;
	return __atomic_load_n(&h->durable_seq, __ATOMIC_ACQUIRE) <
	       __atomic_load_n(&n->seq, __ATOMIC_ACQUIRE);
}
