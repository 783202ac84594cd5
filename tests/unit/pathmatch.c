/* Which paths a root manages: path_under_root, path_matches_root and the
 * default patterns used when no root is configured. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "unit.h"
#include "util.h"

int main(void)
{
	char tmpl[] = "/tmp/ackpt-unit-XXXXXX", root[4096], later[4200];

	CHECK(path_under_root("/ckpt", "/ckpt"));
	CHECK(path_under_root("/ckpt/a/b.pt", "/ckpt"));
	CHECK(!path_under_root("/ckpt2/a", "/ckpt"));
	CHECK(!path_under_root("/ck", "/ckpt"));
	CHECK(path_under_root("/anything", "/"));

	/* globs match the path itself or anything directly below a match */
	CHECK(path_matches_root("/runs/7/ckpt/x.pt", "/runs/*/ckpt", 1));
	CHECK(path_matches_root("/runs/7/ckpt", "/runs/*/ckpt", 1));
	CHECK(!path_matches_root("/runs/7/logs/x.txt", "/runs/*/ckpt", 1));
	CHECK(path_matches_root("/data/step_10.pt", "/data/*.pt", 1));

	/* a root that did not exist at start is resolved when it does */
	if (!mkdtemp(tmpl))
		return 77;
	snprintf(root, sizeof(root), "%s/link", tmpl);
	snprintf(later, sizeof(later), "%s/real", tmpl);
	mkdir(later, 0755);
	CHECK(!path_matches_root("/elsewhere/f", root, 2));
	CHECK(symlink(later, root) == 0);
	strcat(later, "/f.pt");
	CHECK(path_matches_root(later, root, 2));
	unlink(root);
	later[strlen(later) - 5] = 0;
	rmdir(later);
	rmdir(tmpl);

	/* no root: checkpoint-looking names and directories */
	CHECK(path_default_managed("/w/model.pt"));
	CHECK(path_default_managed("/w/shard.safetensors"));
	CHECK(path_default_managed("/w/__0_0.distcp"));
	CHECK(path_default_managed("/w/.metadata"));
	CHECK(path_default_managed("/w/latest_checkpointed_iteration.txt"));
	CHECK(path_default_managed("/w/checkpoints/opt.state"));
	CHECK(path_default_managed("/w/iter_0000100/mp_rank_00/model_optim_rng.pt"));
	CHECK(path_default_managed("/w/global_step20/zero.x"));
	CHECK(!path_default_managed("/w/train.log"));
	CHECK(path_default_managed("/w/ckpt_dir/notes.txt"));
	CHECK(!path_default_managed("/w/myckpt/notes.txt"));
	CHECK(!path_default_managed("/w/config.json"));
	UNIT_DONE();
}
