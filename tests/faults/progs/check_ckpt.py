"""Check a checkpoint tree left by progs/trainer.py against a reference tree.

argv: FLAVOR REFDIR MIB OUTDIR...   (one JSON line per OUTDIR)
Prints one JSON object: committed (iterations a loader would trust), bad
(list of problems: torn/unloadable/mismatching committed checkpoints),
bytes_bad (size of committed files that differ), temporaries (.ackpt.
files), tracker (its value or null).
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

flavor, ref, mib = sys.argv[1], sys.argv[2], float(sys.argv[3])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from state import state  # noqa: E402
def check(out):
    global res
    res = {"committed": [], "bad": [], "bytes_bad": 0, "temporaries": [], "tracker": None}

    for root, dirs, files in os.walk(out):
        for f in files + dirs:
            if ".ackpt." in f:
                res["temporaries"].append(os.path.relpath(os.path.join(root, f), out))


    def cmp_file(a, b, what):
        try:
            x = open(a, "rb").read()
        except OSError as e:
            res["bad"].append("%s: %s" % (what, e))
            res["bytes_bad"] += os.path.getsize(b)
            return False
        y = open(b, "rb").read()
        if x != y:
            res["bad"].append("%s: %d bytes, reference %d, differ" % (what, len(x), len(y)))
            res["bytes_bad"] += len(y)
            return False
        return True


    def same_state(a, b):
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
        if torch.is_tensor(a):
            return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
        return a == b


    if flavor == "megatron":
        tp = os.path.join(out, "latest_checkpointed_iteration.txt")
        if os.path.exists(tp):
            txt = open(tp).read()
            res["tracker"] = txt
            try:
                t = int(txt)
            except ValueError:
                res["bad"].append("tracker holds %r" % txt)
                t = 0
            # the tracker names t: t and every earlier iteration were saved before it
            for i in range(1, t + 1):
                rel = "iter_%07d/mp_rank_00/model_optim_rng.pt" % i
                p = os.path.join(out, rel)
                if not cmp_file(p, os.path.join(ref, rel), rel):
                    continue
                try:
                    sd = torch.load(p, weights_only=True)
                    rsd = torch.load(os.path.join(ref, rel), weights_only=True)
                    if not same_state(sd, rsd):
                        res["bad"].append("%s loads but differs" % rel)
                except Exception as e:  # noqa: BLE001
                    res["bad"].append("%s does not load: %r" % (rel, e))
                res["committed"].append(i)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
        for name in sorted(os.listdir(out)):
            d = os.path.join(out, name)
            if not name.startswith("step_") or not os.path.exists(os.path.join(d, ".metadata")):
                continue  # no metadata: a loader ignores the directory
            i = int(name[5:])
            rd = os.path.join(ref, name)
            ok = True
            for f in sorted(os.listdir(rd)):
                if f.endswith(".distcp"):
                    ok &= cmp_file(os.path.join(d, f), os.path.join(rd, f), "%s/%s" % (name, f))
            try:
                m = FileSystemReader(d).read_metadata()
                rm = FileSystemReader(rd).read_metadata()
                if m.state_dict_metadata != rm.state_dict_metadata or m.storage_data != rm.storage_data:
                    res["bad"].append("%s/.metadata differs from the reference" % name)
                    ok = False
            except Exception as e:  # noqa: BLE001
                res["bad"].append("%s: metadata unreadable: %r" % (name, e))
                ok = False
            if ok:
                # a full load through DCP into tensors shaped like the reference state
                want = state(i, mib)
                got = {k: (v.clone().zero_() if torch.is_tensor(v) else
                           {kk: vv.clone().zero_() for kk, vv in v.items()}) for k, v in want.items()}
                try:
                    dcp.load(got, checkpoint_id=d)
                    if not same_state(got, want):
                        res["bad"].append("%s: loads but differs from the reference state" % name)
                except Exception as e:  # noqa: BLE001
                    res["bad"].append("%s: dcp.load failed: %r" % (name, e))
            res["committed"].append(i)

    return res


for out in sys.argv[4:]:
    print(json.dumps(check(out)), flush=True)
