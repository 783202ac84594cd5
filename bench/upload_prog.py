"""The programs bench/upload measures (see bench/upload and bench/README.md).

    upload_prog.py boto3 --src FILE --bucket B --key K --part-mib 16 --concurrency 8
                         [--checksum when_supported|when_required] --json OUT
        boto3's upload_file of FILE, 16 MiB parts, 8 threads (the baseline).
        when_supported (botocore's default) declares CRC32 on the multipart
        upload and sends one per part; when_required declares none, as
        ackpt's uploads (which send Content-MD5) do.
    upload_prog.py save --kind plain|ackpt|upload [--phase stall|rate] --src FILE --root ROOT --json OUT
        saves of FILE's bytes into ROOT (64 MiB write()s, fsync, close,
        directory fsync: what a careful user writes), run without ackpt
        (plain), under `ackpt-run --dir ROOT` (ackpt) or under `ackpt-run
        --dir ROOT --upload s3://...` (upload).
        --phase rate (upload only): one save, then time close -> durable
        (ackpt_wait) -> uploaded (ackpt_wait_uploaded): the upload rate.
        --phase stall: two saves:
          save 0  warm-up; then wait until it is durable, so the next save
                  never waits for the disk, and --settle-s more (2 s): the
                  helper faults the rest of its staging arena in, in the
                  background, and a save that reaches cold pages takes the
                  slower write-through path;
          save 1  then: with --upload, save 0's parts are being uploaded now
                  (the stall with uploads running); then wait until it is
                  durable, and (--upload) until both are uploaded.
Times are time.monotonic() (CLOCK_MONOTONIC, one clock for every process), so
bench/upload can read the moto server's CPU in the same windows.
"""
import argparse
import ctypes
import json
import os
import resource
import sys
import time

CHUNK = 64 << 20  # the program writes its bytes 64 MiB per write()


class AckptStats(ctypes.Structure):
    # include/ackpt.h, struct ackpt_stats, with the upload fields
    _fields_ = [("bytes_staged", ctypes.c_uint64), ("files", ctypes.c_uint64),
                ("bytes_written", ctypes.c_uint64), ("errors", ctypes.c_uint64),
                ("ops_pending", ctypes.c_uint64), ("stall_seconds", ctypes.c_double),
                ("active", ctypes.c_int32), ("helper_flags", ctypes.c_int32),
                ("helper_cpu_seconds", ctypes.c_double), ("staging_bytes", ctypes.c_uint64),
                ("uploaded_bytes", ctypes.c_uint64), ("uploaded_objects", ctypes.c_uint64),
                ("upload_failures", ctypes.c_uint64), ("uploads_pending", ctypes.c_uint64)]


class Ackpt:
    def __init__(self):
        lib = ctypes.CDLL(None)
        try:
            self._wait, self._up, self._stats = lib.ackpt_wait, lib.ackpt_wait_uploaded, lib.ackpt_get_stats
        except AttributeError:
            raise SystemExit("upload_prog: libackpt.so is not preloaded (run under scripts/ackpt-run)")
        for f in (self._wait, self._up):
            f.argtypes, f.restype = [ctypes.c_double], ctypes.c_int
        self._stats.argtypes = [ctypes.POINTER(AckptStats), ctypes.c_size_t]
        self._stats.restype = ctypes.c_int

    def wait(self):
        r = self._wait(0.0)
        if r:
            raise SystemExit("upload_prog: ackpt_wait returned %d" % r)

    def wait_uploaded(self):
        r = self._up(0.0)
        if r:
            raise SystemExit("upload_prog: ackpt_wait_uploaded returned %d" % r)

    def stats(self):
        s = AckptStats()
        if self._stats(ctypes.byref(s), ctypes.sizeof(s)) != 0:
            raise SystemExit("upload_prog: ackpt_get_stats failed")
        return {k: getattr(s, k) for k, _ in AckptStats._fields_}


def now():
    return time.monotonic()


def find_helper():
    """The pid of this program's ackpt-helper: the process named ackpt-helper
    whose environment holds our UPLOAD_BENCH_ID (the helper inherits it)."""
    mark = ("UPLOAD_BENCH_ID=%s" % os.environ.get("UPLOAD_BENCH_ID", "")).encode()
    if mark.endswith(b"="):
        return None
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/comm" % name) as f:
                if f.read().strip() != "ackpt-helper":
                    continue
            with open("/proc/%s/environ" % name, "rb") as f:
                if mark in f.read().split(b"\0"):
                    return int(name)
        except OSError:
            continue
    return None


def proc_cpu(pid):
    """CPU seconds (user + system, every thread) of pid, or None."""
    if not pid:
        return None
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def evict(path):
    """Drop path's pages from the page cache, so that a reader reads the disk
    (as ackpt's helper does: the file it uploads was written with O_DIRECT)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cmd_boto3(a):
    import boto3
    from boto3.s3.transfer import TransferConfig

    from botocore.config import Config

    s3 = boto3.client("s3", config=Config(request_checksum_calculation=a.checksum))
    s3.head_bucket(Bucket=a.bucket)
    cfg = TransferConfig(multipart_threshold=a.part_mib << 20, multipart_chunksize=a.part_mib << 20,
                         max_concurrency=a.concurrency, use_threads=True)
    evict(a.src)
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), now()
    s3.upload_file(a.src, a.bucket, a.key, Config=cfg)
    t1, ru1 = now(), resource.getrusage(resource.RUSAGE_SELF)
    return {"t0": t0, "t1": t1, "wall_s": t1 - t0,
            "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "size": os.path.getsize(a.src)}


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path, data):
    mv = memoryview(data)
    t0 = now()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    off, each = 0, []
    while off < len(mv):
        t = now()
        off += os.write(fd, mv[off:off + CHUNK])
        each.append(round(now() - t, 6))
    t_w = now()
    os.fsync(fd)
    os.close(fd)
    fsync_dir(os.path.dirname(path))
    t1 = now()
    return {"t0": t0, "t_close": t1, "write_s": t_w - t0, "save_s": t1 - t0, "each_write_s": each}


def cmd_save(a):
    api = None if a.kind == "plain" else Ackpt()
    if a.phase == "rate" and a.kind != "upload":
        raise SystemExit("upload_prog: --phase rate needs --kind upload")
    with open(a.src, "rb") as f:
        data = f.read()
    st = api.stats if api else (lambda: None)
    staged = lambda b, e: None if not api else (e["bytes_staged"] - b["bytes_staged"])  # noqa: E731
    nsaves = 1 if a.phase == "rate" else 2
    names = [os.path.join(a.root, "f%d.bin" % i) for i in range(nsaves)]
    out = {"kind": a.kind, "phase": a.phase, "size": len(data), "names": [os.path.basename(n) for n in names]}

    if a.phase == "rate":
        # one save; then close -> durable -> uploaded
        b = st()
        s = save(names[0], data)
        e = st()
        s["stall_seconds"] = e["stall_seconds"] - b["stall_seconds"]
        s["staged"] = staged(b, e)
        api.wait()
        s["t_durable"] = now()
        d = st()
        helper = find_helper()
        cpu_d = proc_cpu(helper)
        api.wait_uploaded()
        s["t_uploaded"] = now()
        u, cpu_u = st(), proc_cpu(helper)
        # the helper's own count (ackpt_get_stats, as of its last publish)
        # and /proc's (read now)
        s["helper_cpu_upload_stats_s"] = u["helper_cpu_seconds"] - d["helper_cpu_seconds"]
        s["helper_cpu_upload_s"] = (cpu_u - cpu_d if cpu_u is not None and cpu_d is not None
                                    else s["helper_cpu_upload_stats_s"])
        s["uploaded_bytes"] = u["uploaded_bytes"] - d["uploaded_bytes"]
        out["helper_pid"] = helper
        out["save0"] = s
        out["stats"] = u
        return out

    # save 0: warm-up
    b = st()
    s = save(names[0], data)
    s["staged"] = staged(b, st())
    if api:
        api.wait()
    s["durable_s"] = now() - s["t0"]
    out["save0"] = s
    time.sleep(a.settle_s)

    # save 1: with --upload, save 0's parts are being uploaded meanwhile
    b = st()
    s = save(names[1], data)
    e = st()
    s["staged"] = staged(b, e)
    if api:
        s["stall_seconds"] = e["stall_seconds"] - b["stall_seconds"]
        s["uploads_pending_before"], s["uploads_pending_after"] = b["uploads_pending"], e["uploads_pending"]
        s["uploaded_objects_before"] = b["uploaded_objects"]
        s["uploaded_bytes_during"] = e["uploaded_bytes"] - b["uploaded_bytes"]
        api.wait()
        s["durable_s"] = now() - s["t0"]
        if a.kind == "upload":
            api.wait_uploaded()
            s["uploaded_s"] = now() - s["t0"]
        out["stats"] = st()
    out["save1"] = s
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("boto3")
    b.add_argument("--src", required=True)
    b.add_argument("--bucket", required=True)
    b.add_argument("--key", required=True)
    b.add_argument("--part-mib", type=int, default=16)
    b.add_argument("--concurrency", type=int, default=8)
    b.add_argument("--checksum", choices=("when_supported", "when_required"), default="when_supported")
    b.add_argument("--json", required=True)
    s = sub.add_parser("save")
    s.add_argument("--kind", choices=("plain", "ackpt", "upload"), required=True)
    s.add_argument("--phase", choices=("stall", "rate"), default="stall")
    s.add_argument("--src", required=True)
    s.add_argument("--root", required=True)
    s.add_argument("--settle-s", type=float, default=2.0)
    s.add_argument("--json", required=True)
    a = ap.parse_args()
    res = cmd_boto3(a) if a.cmd == "boto3" else cmd_save(a)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
