/* The in-helper fault hook (see fault.h).  Parsed once at start. */
#include "fault.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const op_names[FAULT_NOPS] = { "write", "fsync", "rename", "dirfsync", "open" };

static struct {
	int active;
	enum fault_op op;
	unsigned long nth;
	int err;
	int sticky;
	unsigned long count;
} F;

static int parse_err(const char *s)
{
	if (!strcmp(s, "ENOSPC"))
		return ENOSPC;
	if (!strcmp(s, "EIO"))
		return EIO;
	if (!strcmp(s, "EACCES"))
		return EACCES;
	if (!strcmp(s, "EDQUOT"))
		return EDQUOT;
	return 0;
}

void fault_init(const char *spec, int my_rank)
{
	char buf[256], *save = NULL, *tok;
	int have_op = 0;

	if (!spec || !*spec)
		return;
	snprintf(buf, sizeof(buf), "%s", spec);
	F.nth = 1;
	F.err = EIO;
	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');
		int i;

		if (!eq)
			goto bad;
		*eq++ = 0;
		if (!strcmp(tok, "op")) {
			for (i = 0; i < FAULT_NOPS; i++)
				if (!strcmp(eq, op_names[i]))
					break;
			if (i == FAULT_NOPS)
				goto bad;
			F.op = i;
			have_op = 1;
		} else if (!strcmp(tok, "nth")) {
			char *end;

			F.nth = strtoul(eq, &end, 10);
			if (*end || !F.nth)
				goto bad;
		} else if (!strcmp(tok, "err")) {
			F.err = parse_err(eq);
			if (!F.err)
				goto bad;
		} else if (!strcmp(tok, "rank")) {
			/* one rank's helper only, with one setting for the job */
			char *end;
			long r = strtol(eq, &end, 10);

			if (*end || end == eq || r < 0)
				goto bad;
			if (r != my_rank)
				return;
		} else if (!strcmp(tok, "mode")) {
			if (!strcmp(eq, "sticky"))
				F.sticky = 1;
			else if (strcmp(eq, "once"))
				goto bad;
		} else {
			goto bad;
		}
	}
	if (!have_op)
		goto bad;
	F.active = 1;
	return;
bad:
	fprintf(stderr, "ackpt-helper: error: ACKPT_FAULT=\"%s\" is malformed "
		"(op=write|fsync|rename|dirfsync|open,nth=N,err=ENOSPC|EIO|EACCES,mode=once|sticky,"
		"rank=R); ignored\n",
		spec);
}

int fault_check(enum fault_op op, int unused)
{
	(void)unused;
	if (!F.active || op != F.op)
		return 0;
	F.count++;
	if (F.count == F.nth || (F.sticky && F.count > F.nth))
		return -F.err;
	return 0;
}
