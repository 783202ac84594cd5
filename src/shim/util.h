/* Pure helpers of the shim (util.c): no state, testable alone. */
#ifndef ACKPT_UTIL_H
#define ACKPT_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

extern char *(*util_realpath)(const char *, char *);
extern ssize_t (*util_readlink)(const char *, char *, size_t);

int ackpt_parse_size(const char *s, uint64_t *out);
int path_under_root(const char *path, const char *root);
int path_matches_root(const char *canon, const char *root, int kind);
int path_default_managed(const char *canon);
int fd_path(int fd, char *out, size_t outlen);
int canon_path(int dirfd, const char *path, char *out, size_t outlen);

#endif
