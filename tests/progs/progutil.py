"""Shared helpers for the Python corpus programs (imported from tests/progs/).

Every program writes only under its output directory (argv[1]) and exits 0 on
success.  Anything a program *observes* (tell(), fstat sizes, lseek results)
goes into an ``observed.json`` in the output directory, so the plain run and
the shim run are compared on what the program saw, not only on what landed on
disk.  Self-checks that fail call ``fail()`` which exits 1 with a message.

When ACKPT_TEST_STATS is set, ``report_stats()`` writes the shim's
``ackpt_get_stats`` (or {"present": 0} when the shim is not loaded) to that
path, which is outside the output tree.
"""
import ctypes
import json
import os
import sys


def fail(msg):
    sys.stderr.write("SELF-CHECK FAILED: %s\n" % msg)
    sys.stderr.flush()
    os._exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def prng_bytes(n, seed):
    """Deterministic pseudo-random bytes (numpy-free, fast enough for tens of MiB)."""
    import random
    return random.Random(seed).randbytes(n)


class Observed:
    """Collects observations and writes them as JSON into the output dir."""

    def __init__(self, outdir, name="observed.json"):
        self.path = os.path.join(outdir, name)
        self.items = []

    def add(self, key, value):
        self.items.append([key, value])

    def eq(self, key, value, expected):
        """Record an observation and also self-check it against what is expected."""
        self.add(key, value)
        check(value == expected, "%s: got %r, expected %r" % (key, value, expected))

    def write(self):
        with open(self.path, "w") as f:
            json.dump(self.items, f, indent=1, sort_keys=True)
            f.write("\n")


class AckptStats(ctypes.Structure):
    """struct ackpt_stats from include/ackpt.h."""
    _fields_ = [
        ("bytes_staged", ctypes.c_uint64),
        ("files", ctypes.c_uint64),
        ("bytes_written", ctypes.c_uint64),
        ("errors", ctypes.c_uint64),
        ("ops_pending", ctypes.c_uint64),
        ("stall_seconds", ctypes.c_double),
        ("active", ctypes.c_int32),
        ("helper_flags", ctypes.c_int32),
        ("helper_cpu_seconds", ctypes.c_double),
        ("staging_bytes", ctypes.c_uint64),
        ("uploaded_bytes", ctypes.c_uint64),
        ("uploaded_objects", ctypes.c_uint64),
        ("upload_failures", ctypes.c_uint64),
        ("uploads_pending", ctypes.c_uint64),
        ("bytes_direct", ctypes.c_uint64),
        ("bytes_through", ctypes.c_uint64),
        ("copies_overlapped", ctypes.c_uint64),
        # room to grow: the library rejects a size smaller than its own struct
        ("_spare", ctypes.c_char * 256),
    ]


def _lib():
    try:
        lib = ctypes.CDLL(None)
        fn = lib.ackpt_get_stats
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.POINTER(AckptStats), ctypes.c_size_t]
    fn.restype = ctypes.c_int
    w = lib.ackpt_wait
    w.argtypes = [ctypes.c_double]
    w.restype = ctypes.c_int
    return lib


def ackpt_wait(timeout_s=60.0):
    """ackpt_wait() when the shim is loaded; None otherwise."""
    lib = _lib()
    if lib is None:
        return None
    return lib.ackpt_wait(timeout_s)


def get_stats():
    lib = _lib()
    if lib is None:
        return {"present": 0}
    st = AckptStats()
    rc = lib.ackpt_get_stats(ctypes.byref(st), ctypes.sizeof(st))
    d = {"present": 1, "rc": rc}
    for name, _ in AckptStats._fields_:
        if not name.startswith("_"):
            d[name] = getattr(st, name)
    return d


def report_stats():
    path = os.environ.get("ACKPT_TEST_STATS")
    if not path:
        return
    with open(path, "w") as f:
        json.dump(get_stats(), f)
