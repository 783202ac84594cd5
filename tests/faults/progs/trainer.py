"""A deterministic training loop that saves a checkpoint every iteration.

argv: FLAVOR OUTDIR FIRST LAST MIB
  FLAVOR megatron: torch.save(state, OUTDIR/iter_XXXXXXX/mp_rank_00/model_optim_rng.pt),
                   then OUTDIR/latest_checkpointed_iteration.txt with open('w') (the tracker)
  FLAVOR dcp:      torch.distributed.checkpoint.save(state, OUTDIR/step_XXXXXXX)
                   (data in __0_0.distcp, .metadata.tmp renamed to .metadata)
The state of iteration i is a function of i only (torch.manual_seed(i)), so a
synchronous reference save of iteration i is byte-identical.
Prints "ready" after imports and "saved I" (flushed) when save I returned.
"""
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

flavor, out, first, last, mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
if flavor == "dcp":
    import torch.distributed.checkpoint as dcp  # noqa: E402
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from state import state  # noqa: E402


def iter_dir(i):
    return os.path.join(out, ("iter_%07d" if flavor == "megatron" else "step_%07d") % i)


print("ready", flush=True)
for i in range(first, last + 1):
    sd = state(i, mib)
    if flavor == "megatron":
        d = os.path.join(iter_dir(i), "mp_rank_00")
        os.makedirs(d, exist_ok=True)
        torch.save(sd, os.path.join(d, "model_optim_rng.pt"))
        with open(os.path.join(out, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(i))
    else:
        dcp.save(sd, checkpoint_id=iter_dir(i))
    print("saved %d" % i, flush=True)
