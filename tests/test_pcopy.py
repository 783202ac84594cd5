"""A large staging copy is split across worker threads (src/shim/pcopy.c,
ACKPT_COPY_THREADS), and still behaves as the kernel's copy does.

A write whose source has a bad page returns the bytes before that page,
whichever part of the split copy it falls in; a forked child starts its own
workers; the files are byte-identical to a plain run's.  The program runs
plainly and under the shim with 0, 1 and 3 copy threads.
"""
import pytest

from faultutil import need_shim, plain_env, run, shim_env
from test_posix_corners import compile_c

PROG = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MiB (1 << 20)

static void say(const char *what, ssize_t r)
{
	printf("%s: %zd %s\n", what, r, r < 0 ? strerror(errno) : "");
}

int main(int argc, char **argv)
{
	size_t n = 24 * MiB, i;
	char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int fd, st;
	pid_t c;

	if (chdir(argv[1]))
		return 2;
	for (i = 0; i < n; i++)
		p[i] = (char)(i * 131 + (i >> 12));
	fd = open("big.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
	say("whole, 64 bytes in", (write(fd, "h", 1), pwrite(fd, p, n, 64)));
	say("whole", write(fd, p, n));
	mprotect(p + 20 * MiB + 3 * 4096, 4096, PROT_NONE);  /* in the last part */
	say("bad page at 20M+12K", write(fd, p + 4 * MiB, 20 * MiB));
	mprotect(p + 20 * MiB + 3 * 4096, 4096, PROT_READ | PROT_WRITE);
	mprotect(p + 5 * MiB, 4096, PROT_NONE);              /* in the first part */
	say("bad page at 5M", write(fd, p + 4 * MiB, 16 * MiB));
	say("bad page first", write(fd, p + 5 * MiB, 8 * MiB));
	mprotect(p + 5 * MiB, 4096, PROT_READ | PROT_WRITE);
	c = fork();
	if (c == 0) {
		int f2 = open("child.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);

		say("child", write(f2, p + 1, 16 * MiB));
		close(f2);
		_exit(0);
	}
	waitpid(c, &st, 0);
	say("parent after fork", write(fd, p + 2, 12 * MiB));
	close(fd);
	return 0;
}
"""


@pytest.mark.parametrize("threads", ["0", "1", "3"])
def test_split_copy_matches_the_kernel(tmp_path, threads):
    need_shim()
    exe = compile_c(tmp_path, "pcopy", PROG, "-w")
    outs = {}
    for label in ("plain", "shim"):
        out = tmp_path / label
        out.mkdir()
        env = plain_env() if label == "plain" else shim_env(out, ACKPT_COPY_THREADS=threads,
                                                            ACKPT_WRITE_THROUGH="off")
        r = run([exe, out], env)
        assert r.returncode == 0, r.describe()
        outs[label] = r.stdout
    assert outs["shim"] == outs["plain"], outs
    for name in ("big.bin", "child.bin"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "shim" / name).read_bytes(), name


def test_bad_value_is_one_line(tmp_path):
    need_shim()
    out = tmp_path / "out"
    out.mkdir()
    r = run(["sh", "-c", "echo x > %s/f" % out], shim_env(out, ACKPT_COPY_THREADS="many"))
    assert r.returncode == 0
    lines = [ln for ln in r.stderr.splitlines() if "ACKPT_COPY_THREADS" in ln]
    assert len(lines) == 1 and "from 0 to 16" in lines[0], r.stderr
