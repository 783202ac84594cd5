"""Load DCP checkpoints in a single process (no process group; run it
WITHOUT the shim) and compare with the state the job saved.

  dcp_check.py WORLD MIB SEED DIR [DIR ...]
Prints one JSON line {DIR: {"ok": bool, "bad": [keys], "error": str|null}};
exit 0 when every DIR loads and every tensor is equal.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bstate import diff_states, full_state, zeros_like_state  # noqa: E402

world, mib, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
want = full_state(world, mib, seed)
out = {}
for d in sys.argv[4:]:
    got = zeros_like_state(want)
    res = {"ok": False, "bad": [], "error": None, "preloaded": "LD_PRELOAD" in os.environ}
    try:
        dcp.load(got, storage_reader=dcp.FileSystemReader(d))
        res["bad"] = diff_states(want, got)
        res["ok"] = not res["bad"]
    except BaseException as e:  # noqa: BLE001  (DCP's CheckpointException is a BaseException)
        res["error"] = "%s: %s" % (type(e).__name__, str(e)[-1500:])
    out[d] = res
print(json.dumps(out))
sys.exit(0 if all(r["ok"] for r in out.values()) else 1)
