"""torch CUDA tensors saved with and without the shim, for tests/gpu/run.sh.

    torch_check.py save OUTDIR        torch.save and DCP (one process) of CUDA
                                      tensors into OUTDIR; under the shim also
                                      a raw write() of a tensor's data_ptr()
    torch_check.py compare PLAIN SHIM torch.save files and .distcp files
                                      byte-identical; both load back equal

Prints "key value" lines; exits 0 (pass), 1 (mismatch) or 2 (error).
TORCH_CHECK_DEVICE=cpu runs the same on CPU tensors: how CPU CI checks this
script (tests/test_cuda_cpu.py).
"""
import ctypes
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
DEVICE = os.environ.get("TORCH_CHECK_DEVICE", "cuda")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402


def state_dict():
    """The same tensors on every call (seeded generator on the device)."""
    d = DEVICE
    g = torch.Generator(device=d).manual_seed(1234)
    return {
        "embed.weight": torch.randn(8192, 1024, device=d, generator=g),            # 32 MiB fp32
        "layer.0.weight": torch.randn(4096, 4096, device=d, generator=g).half(),   # 32 MiB fp16
        "layer.0.bias": torch.randn(4096, device=d, generator=g).to(torch.bfloat16),
        "big": torch.randn(32, 1024, 1024, device=d, generator=g).to(torch.bfloat16),  # 64 MiB
        "step": torch.arange(1000, device=d, dtype=torch.int64),
        "odd": torch.randn(12345, device=d, generator=g)[::3],   # non-contiguous view
    }


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def ackpt():
    """The shim's API in this process, or None when not under the preload."""
    lib = ctypes.CDLL(None)
    try:
        wait = lib.ackpt_wait
    except AttributeError:
        return None
    wait.argtypes = [ctypes.c_double]
    wait.restype = ctypes.c_int
    return wait


def save(out):
    os.makedirs(out, exist_ok=True)
    sd = state_dict()
    synchronize()
    t0 = time.monotonic()
    torch.save(sd, os.path.join(out, "model.pt"))
    print("torch_save_seconds %.3f" % (time.monotonic() - t0))
    t0 = time.monotonic()
    dcp.save(sd, checkpoint_id=os.path.join(out, "dcp"))
    print("dcp_save_seconds %.3f" % (time.monotonic() - t0))
    wait = ackpt()
    if wait is None:
        print("shim no")
        return 0
    print("shim yes")
    # a custom writer handing the device pointer straight to write(2), right
    # after queueing the kernels that produce the tensor (no synchronize)
    t = (sd["big"].float() * 3 + 1).to(torch.bfloat16)
    n = t.numel() * t.element_size()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    libc.write.restype = ctypes.c_ssize_t
    fd = os.open(os.path.join(out, "raw.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    done = 0
    t0 = time.monotonic()
    while done < n:
        r = libc.write(fd, t.data_ptr() + done, n - done)
        if r <= 0:
            print("raw_write errno %d" % ctypes.get_errno())
            return 1
        done += r
    stall = time.monotonic() - t0
    os.close(fd)
    if wait(120) != 0:
        print("ackpt_wait failed")
        return 2
    host = t.cpu()
    want = ctypes.string_at(host.data_ptr(), n)
    with open(os.path.join(out, "raw.bin"), "rb") as f:
        got = f.read()
    print("raw_bytes %d" % n)
    print("raw_write_seconds %.4f" % stall)
    print("raw_match %s" % ("yes" if got == want else "no"))
    return 0 if got == want else 1


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


def compare(plain, shim):
    bad = 0
    want = state_dict()
    a, b = os.path.join(plain, "model.pt"), os.path.join(shim, "model.pt")
    same = same_bytes(a, b)
    print("torch_save_bytes %d" % os.path.getsize(b))
    print("torch_save_identical %s" % ("yes" if same else "no"))
    bad |= not same
    got = torch.load(b, map_location=DEVICE)
    ok = set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    print("torch_load_equal %s" % ("yes" if ok else "no"))
    bad |= not ok

    da, db = os.path.join(plain, "dcp"), os.path.join(shim, "dcp")
    fa = sorted(f for f in os.listdir(da) if f.endswith(".distcp"))
    fb = sorted(f for f in os.listdir(db) if f.endswith(".distcp"))
    same = fa == fb and bool(fa) and all(same_bytes(os.path.join(da, f), os.path.join(db, f)) for f in fa)
    print("dcp_files %d" % len(fb))
    print("dcp_bytes %d" % sum(os.path.getsize(os.path.join(db, f)) for f in fb))
    print("dcp_identical %s" % ("yes" if same else "no"))
    bad |= not same
    loaded = {k: torch.zeros_like(v) for k, v in want.items()}
    dcp.load(loaded, checkpoint_id=db)
    ok = all(torch.equal(loaded[k], want[k]) for k in want)
    print("dcp_load_equal %s" % ("yes" if ok else "no"))
    bad |= not ok
    return 1 if bad else 0


def main():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch")
        return 2
    if len(sys.argv) == 3 and sys.argv[1] == "save":
        return save(sys.argv[2])
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        return compare(sys.argv[2], sys.argv[3])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
