/* canon_path: the directory resolved (symlinks, ".", "..", dirfd), the
 * last component kept as given, trailing slashes dropped. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "unit.h"
#include "util.h"

static int is(const char *got, const char *base, const char *rest)
{
	char want[PATH_MAX];

	snprintf(want, sizeof(want), "%s%s", base, rest);
	if (strcmp(got, want))
		fprintf(stderr, "got %s, want %s\n", got, want);
	return !strcmp(got, want);
}

int main(void)
{
	char tmpl[] = "/tmp/ackpt-unit-XXXXXX", base[PATH_MAX], p[PATH_MAX], out[PATH_MAX];
	int dfd;

	if (!mkdtemp(tmpl) || !realpath(tmpl, base))
		return 77;
	snprintf(p, sizeof(p), "%s/real", base);
	mkdir(p, 0755);
	snprintf(p, sizeof(p), "%s/link", base);
	CHECK(symlink("real", p) == 0);
	snprintf(p, sizeof(p), "%s/real/final", base);
	CHECK(symlink("/nonexistent", p) == 0); /* a dangling last component */

	snprintf(p, sizeof(p), "%s/link/model.pt", base);
	CHECK(canon_path(AT_FDCWD, p, out, sizeof(out)) == 0 && is(out, base, "/real/model.pt"));
	snprintf(p, sizeof(p), "%s/real/./../real/x", base);
	CHECK(canon_path(AT_FDCWD, p, out, sizeof(out)) == 0 && is(out, base, "/real/x"));
	snprintf(p, sizeof(p), "%s/link/final", base); /* last component not followed */
	CHECK(canon_path(AT_FDCWD, p, out, sizeof(out)) == 0 && is(out, base, "/real/final"));
	snprintf(p, sizeof(p), "%s/real/sub/", base);
	CHECK(canon_path(AT_FDCWD, p, out, sizeof(out)) == 0 && is(out, base, "/real/sub"));

	CHECK(chdir(base) == 0);
	CHECK(canon_path(AT_FDCWD, "link/a.bin", out, sizeof(out)) == 0 &&
	      is(out, base, "/real/a.bin"));
	dfd = open("link", O_RDONLY | O_DIRECTORY);
	CHECK(dfd >= 0 && canon_path(dfd, "b.bin", out, sizeof(out)) == 0 &&
	      is(out, base, "/real/b.bin"));
	CHECK(canon_path(AT_FDCWD, "/", out, sizeof(out)) == 0 && !strcmp(out, "/"));
	CHECK(canon_path(AT_FDCWD, "/x", out, sizeof(out)) == 0 && !strcmp(out, "/x"));

	CHECK(canon_path(AT_FDCWD, "", out, sizeof(out)) == -ENOENT);
	CHECK(canon_path(AT_FDCWD, "missing-dir/f", out, sizeof(out)) == -ENOENT);
	CHECK(canon_path(12345, "f", out, sizeof(out)) == -EBADF);

	close(dfd);
	snprintf(p, sizeof(p), "%s/real/final", base);
	unlink(p);
	snprintf(p, sizeof(p), "%s/link", base);
	unlink(p);
	snprintf(p, sizeof(p), "%s/real", base);
	rmdir(p);
	rmdir(base);
	UNIT_DONE();
}
