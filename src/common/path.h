/* Path helpers shared by the shim and the helper. */
#ifndef ACKPT_PATH_H
#define ACKPT_PATH_H

#include <stdio.h>
#include <string.h>

/*
 * The directory holding path into dir ("/" for "/x"). Returns -1 when path
 * has no '/' or the result does not fit; the caller then has no directory.
 */
static inline int path_dir(char *dir, size_t size, const char *path)
{
	char *slash;

	if ((size_t)snprintf(dir, size, "%s", path) >= size)
		return -1;
	slash = strrchr(dir, '/');
	if (!slash)
		return -1;
	slash[slash == dir] = 0;
	return 0;
}

#endif
