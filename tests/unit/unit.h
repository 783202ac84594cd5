/* liburing-style unit tests: exit 0 pass, 1 fail, 77 skip. */
#ifndef ACKPT_UNIT_H
#define ACKPT_UNIT_H

#include <stdio.h>
#include <stdlib.h>

static int unit_failures;

#define CHECK(cond) do { if (!(cond)) { \
	fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
	unit_failures++; } } while (0)

#define UNIT_DONE() return unit_failures ? 1 : 0

#endif
