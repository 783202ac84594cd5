/* Walks its directory with nftw, ftw and fts while one file with staged
 * data is closed and one is still open: the sizes the walks report must
 * be a plain run's (test_corners_found.py). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <fts.h>
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char big[3000000];

static int each_nftw(const char *p, const struct stat *s, int t, struct FTW *f)
{
	(void)f;
	if (t == FTW_F)
		printf("nftw %s %lld\n", p, (long long)s->st_size);
	return 0;
}

static int each_ftw(const char *p, const struct stat *s, int t)
{
	if (t == FTW_F)
		printf("ftw %s %lld\n", p, (long long)s->st_size);
	return 0;
}

int main(int argc, char **argv)
{
	char *paths[] = { ".", NULL };
	FTSENT *e;
	FTS *f;
	int a, b;

	if (argc < 2 || chdir(argv[1]) < 0)
		return 2;
	memset(big, 'z', sizeof(big));
	a = open("closed.bin", O_CREAT | O_WRONLY | O_TRUNC, 0644);
	if (a < 0 || write(a, big, sizeof(big)) != (ssize_t)sizeof(big) || close(a) < 0)
		return 3;
	b = open("open.bin", O_CREAT | O_WRONLY | O_TRUNC, 0644);
	if (b < 0 || write(b, big, 1234567) != 1234567)
		return 4;
	nftw(".", each_nftw, 8, FTW_PHYS);
	ftw(".", each_ftw, 8);
	f = fts_open(paths, FTS_PHYSICAL, NULL);
	while ((e = fts_read(f)))
		if (e->fts_info == FTS_F)
			printf("fts %s %lld\n", e->fts_path, (long long)e->fts_statp->st_size);
	fts_close(f);
	return close(b) < 0 ? 5 : 0;
}
