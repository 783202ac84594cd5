/*
 * Pure helpers of the shim, with no state of their own, so the C unit tests
 * (tests/unit/) can link them alone: size parsing, path matching and
 * canonical paths.
 */
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

/* The shim points these past its own wrappers (real.c), so that its path
 * checks never wait on the names they are checking. */
char *(*util_realpath)(const char *, char *) = realpath;
ssize_t (*util_readlink)(const char *, char *, size_t) = readlink;

/* Basenames that mark checkpoint files when no root is configured. */
static const char *const default_names[] = {
	"*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.distcp", "*.bin", "*.npy", "*.npz",
	".metadata", "*.metadata", ".metadata.tmp", "metadata.json", "latest",
	"latest_checkpointed_iteration.txt", "*.index.json", "commit_success.txt", NULL,
};
/* Directory components that mark checkpoint directories (temp-then-rename
 * savers open random names, so the directory is what identifies them). */
static const char *const default_dirs[] = {
	"checkpoint*", "ckpt*", "iter_*", "global_step*", NULL,
};


/* "64M", "1G", "512", "2GiB", "4KB": bytes; -EINVAL for anything else. */
int ackpt_parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	uint64_t mul = 1;

	if (!s || !*s || *s == '-')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	switch (*end) {
	case 0: break;
	case 'k': case 'K': mul = 1ull << 10; end++; break;
	case 'm': case 'M': mul = 1ull << 20; end++; break;
	case 'g': case 'G': mul = 1ull << 30; end++; break;
	case 't': case 'T': mul = 1ull << 40; end++; break;
	default: return -EINVAL;
	}
	if (*end == 'i' || *end == 'B')
		end += (*end == 'i' && end[1] == 'B') ? 2 : 1;
	if (*end || v > UINT64_MAX / mul)
		return -EINVAL;
	*out = v * mul;
	return 0;
}

/* Is path (canonical) root itself or below it? */
int path_under_root(const char *path, const char *root)
{
	size_t n = strlen(root);

	if (n == 1 && root[0] == '/')
		return 1;
	return !strncmp(path, root, n) && (path[n] == '/' || path[n] == 0);
}

/*
 * Does canonical path fall under a configured root?  kind 0: a canonical
 * directory; 1: a glob (matching the path or its directory); 2: a directory
 * that did not exist at start (resolved again now).
 */
int path_matches_root(const char *canon, const char *root, int kind)
{
	if (kind == 1) {
		char pat[PATH_MAX + 4];

		snprintf(pat, sizeof(pat), "%s/*", root);
		return !fnmatch(root, canon, 0) || !fnmatch(pat, canon, 0);
	}
	if (path_under_root(canon, root))
		return 1;
	if (kind == 2) {
		char now[PATH_MAX];

		return util_realpath(root, now) && strcmp(now, root) && path_under_root(canon, now);
	}
	return 0;
}

/* With no root configured: a checkpoint-looking name or directory. */
int path_default_managed(const char *canon)
{
	const char *base = strrchr(canon, '/') + 1, *p;
	int i;

	for (i = 0; default_names[i]; i++)
		if (!fnmatch(default_names[i], base, 0))
			return 1;
	for (p = canon; p < base; p = strchr(p, '/') + 1) {
		char comp[NAME_MAX + 1];
		const char *e = strchr(p, '/');
		size_t n = e - p;

		if (!n || n > NAME_MAX)
			continue;
		memcpy(comp, p, n);
		comp[n] = 0;
		for (i = 0; default_dirs[i]; i++)
			if (!fnmatch(default_dirs[i], comp, 0))
				return 1;
	}
	return 0;
}

/* What the kernel says fd names (its /proc/self/fd link): 0, or -1. */
int fd_path(int fd, char *out, size_t outlen)
{
	char link[64];
	ssize_t n;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = util_readlink(link, out, outlen - 1);
	if (n <= 0)
		return -1;
	out[n] = 0;
	return 0;
}

/* Canonical absolute path: the directory resolved, the last component kept. */
int canon_path(int dirfd, const char *path, char *out, size_t outlen)
{
	char full[PATH_MAX], dir[PATH_MAX], rdir[PATH_MAX];
	const char *base;
	char *slash;

	if (!path || !*path)
		return -ENOENT;
	if (path[0] == '/') {
		snprintf(full, sizeof(full), "%s", path);
	} else if (dirfd == AT_FDCWD) {
		if (!getcwd(dir, sizeof(dir)))
			return -errno;
		snprintf(full, sizeof(full), "%s/%s", dir, path);
	} else {
		if (fd_path(dirfd, dir, sizeof(dir)) < 0)
			return -EBADF;
		snprintf(full, sizeof(full), "%s/%s", dir, path);
	}
	{
		size_t n = strlen(full);

		while (n > 1 && full[n - 1] == '/')
			full[--n] = 0;
	}
	slash = strrchr(full, '/');
	base = slash + 1;
	if (slash == full)
		snprintf(dir, sizeof(dir), "/");
	else {
		*slash = 0;
		snprintf(dir, sizeof(dir), "%s", full);
	}
	if (!util_realpath(dir, rdir))
		return -errno;
	snprintf(out, outlen, "%s%s%s", rdir, strcmp(rdir, "/") ? "/" : "", base);
	return 0;
}

