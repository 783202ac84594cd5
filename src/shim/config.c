/*
 * Configuration from ACKPT_* variables, and the decision "is this path a
 * managed checkpoint file?".  A malformed value gets one line naming the
 * variable and turns the shim into pure pass-through: guessing would risk
 * managing the wrong files or none of the right ones.
 */
#include <fnmatch.h>
#include <sched.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include "config.h"
#include "shim.h"
#include "job.h"

struct ackpt_config C;

static const char *const default_metadata[] = {
	".metadata", "*.metadata", "metadata.json", "latest_checkpointed_iteration.txt", "latest",
	"*.index.json", "commit_success.txt", NULL,
};

void alog(int level, const char *fmt, ...)
{
	static const char *const names[] = { "error", "warning", "info", "debug" };
	char buf[1024];
	va_list ap;
	int n;

	if (level > C.log_level)
		return;
	n = snprintf(buf, sizeof(buf), "ackpt[%d]: %s: ", (int)getpid(), names[level]);
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
	va_end(ap);
	if (n >= (int)sizeof(buf) - 1)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	syscall(SYS_write, 2, buf, n);
}

static int bad(const char *var, const char *val, const char *expect)
{
	alog(L_ERROR, "%s=\"%s\" is invalid (%s); ackpt is disabled for this process", var, val,
	     expect);
	C.enabled = 0;
	return -EINVAL;
}

static int has_glob(const char *s)
{
	return strpbrk(s, "*?[") != NULL;
}

static int add_root(const char *r)
{
	char canon[PATH_MAX];
	char **roots = realloc(C.roots, (C.nroots + 1) * sizeof(*roots));
	int *g = realloc(C.root_is_glob, (C.nroots + 1) * sizeof(*g));
	size_t n;

	if (!roots || !g)
		return -ENOMEM;
	C.roots = roots;
	C.root_is_glob = g;
	int resolved = !has_glob(r) && real.realpath(r, canon);

	if (!resolved)
		snprintf(canon, sizeof(canon), "%s", r);
	n = strlen(canon);
	while (n > 1 && canon[n - 1] == '/')
		canon[--n] = 0;
	C.roots[C.nroots] = strdup(canon);
	/* 0: canonical directory, 1: glob, 2: did not exist yet */
	C.root_is_glob[C.nroots] = has_glob(r) ? 1 : resolved ? 0 : 2;
	if (!C.roots[C.nroots])
		return -ENOMEM;
	C.nroots++;
	return 0;
}

/* A whole decimal number from lo to hi: 0 and *out, or -1. */
static int parse_count(const char *v, long lo, long hi, long *out)
{
	char *end;
	long k = strtol(v, &end, 10);

	if (end == v || *end || k < lo || k > hi)
		return -1;
	*out = k;
	return 0;
}

/* ACKPT_UPLOAD and its knobs; the helper resolves the rest (s3conf.c). */
static void config_upload(void)
{
	const char *v = getenv("ACKPT_UPLOAD");
	const char *name;
	size_t n;

	if (!C.enabled || !v || !*v)
		return;
	if (!ACKPT_HAVE_UPLOAD) {
		bad("ACKPT_UPLOAD", v, "this ackpt was built without upload support: it needs "
		    "libcurl and zlib at build time (meson setup -Dupload=enabled)");
		return;
	}
	name = !strncmp(v, "s3://", 5) ? v + 5 : !strncmp(v, "msc://", 6) ? v + 6 : NULL;
	n = name ? strcspn(name, "/") : 0;
	if (!name || !n || strpbrk(v, " \t\n") || strlen(v) >= ACKPT_UPLOAD_URL_MAX) {
		bad("ACKPT_UPLOAD", v, "expected s3://bucket/prefix or msc://profile/path");
		return;
	}
	if (!ACKPT_HAVE_MSC && name == v + 6) {
		bad("ACKPT_UPLOAD", v, "this ackpt was built without libyaml, so msc:// URLs cannot "
		    "be read (use s3://, or rebuild with libyaml-dev: meson setup -Dmsc=enabled)");
		return;
	}
	if (!C.nroots) {
		bad("ACKPT_UPLOAD", v, "uploads need managed directories, whose files are named "
		    "relative to them: use --dir or ACKPT_PATHS");
		return;
	}
	C.upload_url = v;
	v = getenv("ACKPT_UPLOAD_PART_SIZE");
	if (v && *v && (ackpt_parse_size(v, &C.upload_part) < 0 || C.upload_part < (5ull << 20) ||
			C.upload_part > (5ull << 30))) {
		bad("ACKPT_UPLOAD_PART_SIZE", v, "expected a size from 5M to 5G, such as 16M");
		return;
	}
	v = getenv("ACKPT_UPLOAD_CONCURRENCY");
	if (v && *v) {
		long k;

		if (parse_count(v, 1, 256, &k) < 0) {
			bad("ACKPT_UPLOAD_CONCURRENCY", v, "expected a number of requests from 1 to 256");
			return;
		}
		C.upload_conc = (unsigned)k;
	}
}

/* A small file, read whole with raw system calls (this runs inside the
 * program's constructors); -1 when it cannot be read. */
ssize_t read_small(const char *path, char *buf, size_t size)
{
	long fd = syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
	ssize_t got = 0;
	long n;

	if (fd < 0)
		return -1;
	while (got < (ssize_t)size - 1 &&
	       (n = syscall(SYS_read, fd, buf + got, size - 1 - (size_t)got)) > 0)
		got += n;
	syscall(SYS_close, fd);
	buf[got] = 0;
	return got;
}

/* The lowest of limit files named `file` from dir (under /sys/fs/cgroup/...)
 * up to the hierarchy's root at base, or total. */
static uint64_t cgroup_limit(char *dir, size_t base, const char *file, uint64_t total)
{
	char val[64];

	for (;;) {
		size_t len = strlen(dir);
		char *slash;

		while (len > base && dir[len - 1] == '/')
			dir[--len] = 0;
		if (len + strlen(file) + 2 <= 1200) {
			uint64_t lim;
			char *end;

			dir[len] = '/';
			strcpy(dir + len + 1, file);
			if (read_small(dir, val, sizeof(val)) > 0) {
				lim = strtoull(val, &end, 10);
				if (end != val && (*end == '\n' || !*end) && lim && lim < total)
					total = lim;
			}
			dir[len] = 0;
		}
		if (len <= base)
			return total;
		slash = strrchr(dir, '/');
		if (!slash || (size_t)(slash - dir) < base)
			return total;
		*slash = 0;
	}
}

/* The memory this process may use: the machine's, or its memory cgroup's
 * limit (v2 memory.max, v1 memory.limit_in_bytes, the lowest on the way up)
 * when lower. */
static uint64_t memory_limit(void)
{
	struct sysinfo si;
	uint64_t total = sysinfo(&si) == 0 ? (uint64_t)si.totalram * si.mem_unit : (8ull << 30);
	char cg[2048], dir[1200];
	char *line, *save = NULL;

	if (read_small("/proc/self/cgroup", cg, sizeof(cg)) <= 0)
		return total;
	for (line = strtok_r(cg, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		const char *ctl = strchr(line, ':'), *path = ctl ? strchr(ctl + 1, ':') : NULL;

		if (!path || path[1] != '/')
			continue;
		if (ctl[1] == ':') {
			/* v2: 0::/path, mounted at /sys/fs/cgroup or .../unified */
			snprintf(dir, sizeof(dir), "/sys/fs/cgroup%s", path + 1);
			total = cgroup_limit(dir, strlen("/sys/fs/cgroup"), "memory.max", total);
			snprintf(dir, sizeof(dir), "/sys/fs/cgroup/unified%s", path + 1);
			total = cgroup_limit(dir, strlen("/sys/fs/cgroup/unified"), "memory.max", total);
		} else if ((size_t)(path - ctl - 1) == strlen("memory") &&
			   !strncmp(ctl + 1, "memory", 6)) {
			snprintf(dir, sizeof(dir), "/sys/fs/cgroup/memory%s", path + 1);
			total = cgroup_limit(dir, strlen("/sys/fs/cgroup/memory"),
					     "memory.limit_in_bytes", total);
		}
	}
	return total;
}

/* Ranks of the job on this node, from the launchers' variables; 1 if none. */
static unsigned local_ranks(void)
{
	static const char *const vars[] = { "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE",
					    "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS" };
	unsigned i;
	long k;

	for (i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
		const char *v = getenv(vars[i]);

		if (v && parse_count(v, 1, 65536, &k) == 0)
			return (unsigned)k;
	}
	return 1;
}

/*
 * The staging size: ACKPT_STAGING, or by default a quarter of the memory,
 * shared by the node's ranks (the arena is reserved, and faulted in only
 * as far as checkpoints reach into it: stage.c, arena_head; the helper's
 * prefault).  The default reads the cgroup files, so it is worked out at
 * the first session start, not in every process's constructors.
 */
uint64_t config_staging(void)
{
	if (!C.staging) {
		uint64_t s = memory_limit() / 4 / (C.local_ranks ? C.local_ranks : 1);

		if (s < (64ull << 20))
			s = 64ull << 20;
		if (s > (1ull << 40))
			s = 1ull << 40;
		C.staging = (s + (2ull << 20) - 1) & ~((2ull << 20) - 1);
	}
	return C.staging;
}

void config_load(void)
{
	const char *v;
	long k;

	C.enabled = 1;
	C.log_level = L_WARN;

	v = getenv("ACKPT_LOG");
	if (v && *v) {
		if (!strcmp(v, "error")) C.log_level = L_ERROR;
		else if (!strcmp(v, "warn") || !strcmp(v, "warning")) C.log_level = L_WARN;
		else if (!strcmp(v, "info")) C.log_level = L_INFO;
		else if (!strcmp(v, "debug")) C.log_level = L_DEBUG;
		else { bad("ACKPT_LOG", v, "expected error, warn, info or debug"); return; }
	}
	v = getenv("ACKPT_DISABLE");
	if (v && *v) {
		if (!strcmp(v, "1")) { C.enabled = 0; return; }
		if (strcmp(v, "0")) { bad("ACKPT_DISABLE", v, "expected 0 or 1"); return; }
	}
	C.local_ranks = local_ranks();
	C.staging = 0; /* the default: config_staging() */
	v = getenv("ACKPT_STAGING");
	if (v && *v) {
		if (ackpt_parse_size(v, &C.staging) < 0) {
			bad("ACKPT_STAGING", v, "expected a size such as 512M or 4G");
			return;
		}
		if (C.staging < (16ull << 20)) {
			bad("ACKPT_STAGING", v, "must be at least 16M");
			return;
		}
		C.staging = (C.staging + (2ull << 20) - 1) & ~((2ull << 20) - 1);
	}
	v = getenv("ACKPT_COMMIT");
	if (v && *v) {
		if (!strcmp(v, "sync")) C.commit_sync = 1;
		else if (strcmp(v, "async")) { bad("ACKPT_COMMIT", v, "expected async or sync"); return; }
	}
	v = getenv("ACKPT_DIRECT");
	if (v && *v && strcmp(v, "0") && strcmp(v, "1")) {
		bad("ACKPT_DIRECT", v, "expected 0 or 1");
		return;
	}
	C.direct = !(v && !strcmp(v, "0"));
	v = getenv("ACKPT_TEST_SKIP_DIRFSYNC");
	if (v && *v && strcmp(v, "0") && strcmp(v, "1")) {
		bad("ACKPT_TEST_SKIP_DIRFSYNC", v, "expected 0 or 1");
		return;
	}
	C.test_skip_dirfsync = v && !strcmp(v, "1");
	v = getenv("ACKPT_TEST_DELAY_MS");
	if (v && *v) {
		char *end;
		long ms = strtol(v, &end, 10);
		const char *only = getenv("ACKPT_TEST_DELAY_RANK");

		if (*end || ms < 0 || ms > 600000) {
			bad("ACKPT_TEST_DELAY_MS", v, "expected milliseconds from 0 to 600000");
			return;
		}
		C.test_delay_ms = (int)ms;
		if (only && *only) {
			/* slow only one rank's helper */
			const char *r = getenv("RANK") ? getenv("RANK") : getenv("SLURM_PROCID");

			if (!r || atoi(r) != atoi(only))
				C.test_delay_ms = 0;
		}
	}
	/* the test knobs that study the helper's path keep every write on it */
	C.write_through = !getenv("ACKPT_FAULT") && !getenv("ACKPT_TEST_DELAY_MS");
	v = getenv("ACKPT_WRITE_THROUGH");
	if (v && *v) {
		if (!strcmp(v, "auto") || !strcmp(v, "1"))
			C.write_through = 1;
		else if (!strcmp(v, "off") || !strcmp(v, "0"))
			C.write_through = 0;
		else {
			bad("ACKPT_WRITE_THROUGH", v, "expected auto or off");
			return;
		}
	}
	C.early_start = -1;
	v = getenv("ACKPT_EARLY_START");
	if (v && *v) {
		if (!strcmp(v, "auto"))
			C.early_start = -1;
		else if (!strcmp(v, "on") || !strcmp(v, "1"))
			C.early_start = 1;
		else if (!strcmp(v, "off") || !strcmp(v, "0"))
			C.early_start = 0;
		else {
			bad("ACKPT_EARLY_START", v, "expected auto, on or off");
			return;
		}
	}
	/* the cores this process may run on, shared by the node's ranks, less
	 * the writing thread's own; at most 3 (memory bandwidth, not cores,
	 * is the limit beyond that) */
	{
		cpu_set_t set;
		long ncpu = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set)
									  : sysconf(_SC_NPROCESSORS_ONLN);

		C.copy_threads = (int)(ncpu / C.local_ranks) - 1;
		if (C.copy_threads > 3)
			C.copy_threads = 3;
		if (C.copy_threads < 0)
			C.copy_threads = 0;
	}
	v = getenv("ACKPT_COPY_THREADS");
	if (v && *v) {
		if (parse_count(v, 0, 16, &k) < 0) {
			bad("ACKPT_COPY_THREADS", v, "expected a number of threads from 0 to 16");
			return;
		}
		C.copy_threads = (int)k;
	}
	v = getenv("ACKPT_PIN");
	if (v && *v && strcmp(v, "eager") && strcmp(v, "background")) {
		bad("ACKPT_PIN", v, "expected eager or background");
		return;
	}
	v = getenv("ACKPT_IO");
	if (v && *v && strcmp(v, "uring") && strcmp(v, "pool")) {
		bad("ACKPT_IO", v, "expected uring or pool");
		return;
	}
	C.io_pool = v && !strcmp(v, "pool");
	v = getenv("ACKPT_METADATA");
	if (v && *v) {
		char *copy = strdup(v), *save = NULL, *tok;

		for (tok = copy ? strtok_r(copy, ":", &save) : NULL; tok;
		     tok = strtok_r(NULL, ":", &save)) {
			char **m = realloc(C.metadata, (C.nmetadata + 1) * sizeof(*m));

			if (strchr(tok, '/')) {
				free(copy);
				bad("ACKPT_METADATA", v, "patterns match file names, without '/'");
				return;
			}
			if (!m)
				break;
			C.metadata = m;
			C.metadata[C.nmetadata++] = strdup(tok);
		}
		free(copy);
		if (!C.nmetadata) {
			bad("ACKPT_METADATA", v, "no pattern given; unset it for the defaults");
			return;
		}
	} else {
		C.metadata = (char **)default_metadata;
		while (default_metadata[C.nmetadata])
			C.nmetadata++;
	}
	v = getenv("ACKPT_COORD");
	if (v && *v) {
		const char *colon = strrchr(v, ':');
		char *end;
		long port = colon ? strtol(colon + 1, &end, 10) : 0;

		if (!colon || colon == v || !colon[1] || *end || port <= 0 || port > 65535) {
			bad("ACKPT_COORD", v, "expected host:port");
			return;
		}
	}
	v = getenv("ACKPT_SECRET");
	if (v && *v && !(getenv("ACKPT_JOB_TOKEN") && *getenv("ACKPT_JOB_TOKEN"))) {
		uint8_t secret[ACKPT_SECRET_LEN];

		if (ackpt_secret_parse(v, secret) < 0) {
			bad("ACKPT_SECRET", "(not shown)", "expected 64 hex digits, as ackpt-run makes it");
			return;
		}
		memset(secret, 0, sizeof(secret));
	}
	v = getenv("ACKPT_SECRET_FILE");
	if (v && *v && v[0] != '/') {
		bad("ACKPT_SECRET_FILE", v, "expected an absolute path");
		return;
	}
	C.barrier_timeout = 600;
	v = getenv("ACKPT_BARRIER_TIMEOUT");
	if (v && *v) {
		char *end;
		double t = strtod(v, &end);

		if (*end || !(t > 0)) {
			bad("ACKPT_BARRIER_TIMEOUT", v, "expected seconds > 0");
			return;
		}
		C.barrier_timeout = t;
	}
	{
		const char *rank = getenv("RANK"), *world = getenv("WORLD_SIZE");

		if (!rank || !*rank)
			rank = getenv("SLURM_PROCID");
		if (!world || !*world)
			world = getenv("SLURM_NTASKS");
		C.multi_rank = (world && atoi(world) > 1) || (getenv("ACKPT_COORD") && *getenv("ACKPT_COORD"));
		{
			struct ackpt_job job;

			ackpt_job_discover(&job);
			C.multi_node = ackpt_job_multi_node(&job);
		}
		/* rank 0's first process hosts the coordinator; its children
		 * (which inherit RANK=0) join as participants */
		const char *owner = getenv("ACKPT_COORD_OWNER");

		/* the owner may exec the real program (torchrun --no-python,
		 * srun wrappers): same pid, still the host */
		if (C.multi_rank && rank && atoi(rank) == 0 &&
		    (!owner || atoi(owner) == (int)getpid())) {
			char pid[32];

			snprintf(pid, sizeof(pid), "%d", (int)getpid());
			setenv("ACKPT_COORD_OWNER", pid, 1);
			C.coord_host = 1;
		}
	}
	v = getenv("ACKPT_PATHS");
	if (v && *v) {
		char *copy = strdup(v), *save = NULL, *tok;

		if (!copy)
			return;
		for (tok = strtok_r(copy, ":", &save); tok; tok = strtok_r(NULL, ":", &save)) {
			if (tok[0] != '/') {
				free(copy);
				bad("ACKPT_PATHS", v, "each root must be an absolute path");
				return;
			}
			add_root(tok);
		}
		free(copy);
	}
	config_upload();
}

int path_is_managed(const char *canon)
{
	int i;

	if (!C.enabled || canon[0] != '/')
		return 0;
	if (!strncmp(canon, "/proc/", 6) || !strncmp(canon, "/sys/", 5) ||
	    !strncmp(canon, "/dev/", 5))
		return 0;
	if (!C.nroots)
		return path_default_managed(canon);
	for (i = 0; i < C.nroots; i++)
		if (path_matches_root(canon, C.roots[i], C.root_is_glob[i]))
			return 1;
	return 0;
}

/* Does the final name of this file make a checkpoint exist for a loader? */
int name_is_metadata(const char *canon)
{
	const char *base = strrchr(canon, '/');
	int i;

	base = base ? base + 1 : canon;
	for (i = 0; i < C.nmetadata; i++)
		if (!fnmatch(C.metadata[i], base, 0))
			return 1;
	return 0;
}

/* What the helper needs of the configuration, validated here, and the job
 * as the environment describes it now (the session is starting). */
void config_for_helper(struct ackpt_helper_config *h)
{
	memset(h, 0, sizeof(*h));
	h->log_level = C.log_level;
	h->io_pool = (uint32_t)C.io_pool;
	h->direct = (uint32_t)C.direct;
	h->coord_host = (uint32_t)C.coord_host;
	h->barrier_timeout_ns = (uint64_t)(C.barrier_timeout * 1e9);
	h->test_delay_ms = (uint32_t)C.test_delay_ms;
	h->test_skip_dirfsync = (uint32_t)C.test_skip_dirfsync;
	ackpt_job_discover(&h->job);
	if (C.upload_url) {
		size_t o = 0;
		int i;

		snprintf(h->upload_url, sizeof(h->upload_url), "%s", C.upload_url);
		h->upload_part_size = C.upload_part;
		h->upload_concurrency = C.upload_conc;
		/* keys are relative to the root's directory; for a glob, to
		 * its literal leading directories */
		for (i = 0; i < C.nroots; i++) {
			const char *r = C.roots[i];
			size_t len = strlen(r);

			if (C.root_is_glob[i] == 1) {
				const char *g = strpbrk(r, "*?[");

				while (g > r && g[-1] != '/')
					g--;
				len = g > r + 1 ? (size_t)(g - r - 1) : 1;
			}
			if (o + len + 2 > sizeof(h->upload_roots))
				break;
			memcpy(h->upload_roots + o, r, len);
			o += len;
			h->upload_roots[o++] = 0;
		}
		h->upload_roots[o] = 0;
	}
}
