"""Uploads to an object store (ackpt-run --upload s3://BUCKET/PREFIX, ACKPT_UPLOAD).

Every test runs real programs under scripts/ackpt-run against a real moto S3
server (tests/s3util.py: a subprocess on a loopback port) and compares the
objects with the local files byte for byte.  What is checked:

  * single process: torch.save of a few files and a `latest` marker arrive
    intact under PREFIX/<path relative to the root>; ackpt_wait_uploaded()
    returns 0 only once they are all there; struct ackpt_stats counts them.
  * marker last: an observer lists the bucket every few ms during a 2-rank
    torchrun DCP job and a Megatron-style job and never sees a commit marker
    (.metadata, latest_checkpointed_iteration.txt) before every data object
    of its checkpoint.
  * a >= 5 GiB file goes up in multipart and arrives intact (sha256); the
    program's write stall with and without the upload is printed.
  * faults: moto SIGKILLed and restarted mid-upload (the upload completes);
    wrong credentials, a bad session token, a missing bucket (one clear line
    naming the S3 error code, non-zero exit, local files intact); the
    program SIGKILLed after its save (its helper still uploads everything).
  * credentials from an MSC config (msc://PROFILE/PATH, MSC_CONFIG), from
    AWS shared files (AWS_PROFILE), and temporary ones (AWS_SESSION_TOKEN).
  * bad configuration: one line naming the variable.

Knobs: ACKPT_TEST_UPLOAD_GIB (default 5; 0 skips the big-file test, a
smaller number makes it quicker).  Skips when moto/boto3 are not importable
(pip install 'moto[server]' boto3 into .venv) or ackpt is not built.
"""
import base64
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import zipfile
import zlib

import pytest

from barrierutil import LAUNCHER, free_master_port, job_env, run_job, start_job, torchrun_argv
from conftest import HELPER, LIB, VENV_PY
from faultutil import need_shim, shim_env
from s3util import MotoServer, compare_with_bucket, local_files, need_moto

MiB = 1 << 20
GiB = 1 << 30
BUCKET = "ckpt-bucket"
JOB_TIMEOUT = 180.0
STAGING = "256M"
BIG_GIB = float(os.environ.get("ACKPT_TEST_UPLOAD_GIB", "5"))


# --------------------------------------------------------------------------
# Preconditions
# --------------------------------------------------------------------------

def _build_has_uploads():
    """None when the built shim and helper look upload-capable, else why not."""
    try:
        lib = LIB.read_bytes()
        helper = HELPER.read_bytes()
    except OSError as e:
        return "cannot read the build: %s" % e
    if b"ackpt_wait_uploaded" not in lib:
        return "%s has no ackpt_wait_uploaded: built before uploads existed" % LIB
    if b"curl_easy_init" not in helper:
        return "%s was built without upload support (no libcurl)" % HELPER
    return None


def need_uploads():
    need_shim()
    why = _build_has_uploads()
    if why:
        pytest.skip(why)


@pytest.fixture
def moto(tmp_path):
    """A moto server without authentication, with BUCKET."""
    need_uploads()
    need_moto()
    m = MotoServer(tmp_path / "moto")
    m.start([BUCKET])
    yield m
    m.stop()


@pytest.fixture
def moto_auth(tmp_path):
    """A moto server that checks every request's signature (an IAM user
    with an s3:* policy; MotoServer.key_id/secret), with BUCKET."""
    need_uploads()
    need_moto()
    m = MotoServer(tmp_path / "moto-auth", auth=True)
    m.start([BUCKET])
    yield m
    m.stop()


# --------------------------------------------------------------------------
# The program (written into the test's directory: one script, several modes)
# --------------------------------------------------------------------------

PROG = r'''
import ctypes, json, os, random, sys, time

MiB = 1 << 20


class Stats(ctypes.Structure):
    _fields_ = [("bytes_staged", ctypes.c_uint64), ("files", ctypes.c_uint64),
                ("bytes_written", ctypes.c_uint64), ("errors", ctypes.c_uint64),
                ("ops_pending", ctypes.c_uint64), ("stall_seconds", ctypes.c_double),
                ("active", ctypes.c_int32), ("helper_flags", ctypes.c_int32),
                ("helper_cpu_seconds", ctypes.c_double), ("staging_bytes", ctypes.c_uint64),
                ("uploaded_bytes", ctypes.c_uint64), ("uploaded_objects", ctypes.c_uint64),
                ("upload_failures", ctypes.c_uint64), ("uploads_pending", ctypes.c_uint64),
                ("_spare", ctypes.c_char * 256)]


LIB = ctypes.CDLL(None)


def stats():
    try:
        fn = LIB.ackpt_get_stats
    except AttributeError:
        return {"present": 0}
    fn.argtypes = [ctypes.POINTER(Stats), ctypes.c_size_t]
    s = Stats()
    rc = fn(ctypes.byref(s), ctypes.sizeof(s))
    out = {"present": 1, "rc": rc}
    for name, _ in Stats._fields_:
        if not name.startswith("_"):
            out[name] = getattr(s, name)
    return out


def wait_uploaded(timeout):
    try:
        fn = LIB.ackpt_wait_uploaded
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_double]
    fn.restype = ctypes.c_int
    return fn(timeout)


def say(*a):
    sys.stdout.write(" ".join(str(x) for x in a) + "\n")
    sys.stdout.flush()


def data(seed, n):
    return random.Random(seed).randbytes(n)


def write_file(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)


def write_blocks(path, size, seed, block=64 * MiB):
    """size bytes: a random block of `block` bytes with its index stamped on
    each copy (every block differs), in os.write calls of `block`."""
    base = bytearray(random.Random(seed).randbytes(min(block, size)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    off, i = 0, 0
    while off < size:
        n = min(len(base), size - off)
        base[0:8] = (i ^ (seed << 32)).to_bytes(8, "little")
        mv = memoryview(base)[:n]
        while mv:
            w = os.write(fd, mv)
            mv = mv[w:]
        off += n
        i += 1
    os.close(fd)


def torch_files(root):
    import torch
    g = torch.Generator().manual_seed(7)
    os.makedirs(os.path.join(root, "sub", "deep"), exist_ok=True)
    torch.save({"w": torch.randn(3 * MiB // 4, generator=g)}, os.path.join(root, "model.pt"))
    torch.save({"m": torch.randn(12 * MiB // 4, generator=g), "step": 1},
               os.path.join(root, "optim.pt"))
    torch.save({"tiny": torch.arange(10)}, os.path.join(root, "sub", "deep", "extra.pt"))
    torch.save({"x": torch.randn(MiB // 4, generator=g)}, os.path.join(root, "epoch=3-step=100.ckpt"))
    open(os.path.join(root, "empty.bin"), "wb").close()
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_1\n")


def main():
    mode, root = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    os.makedirs(root, exist_ok=True)
    if mode == "small":
        # small ROOT [--wait S] [--linger S]
        torch_files(root)
        say("SAVED")
        if "--wait" in args:
            t0 = time.monotonic()
            rc = wait_uploaded(float(args[args.index("--wait") + 1]))
            say("WAITED", rc, "%.3f" % (time.monotonic() - t0))
        say("STATS", json.dumps(stats()))
        if "--linger" in args:
            time.sleep(float(args[args.index("--linger") + 1]))
    elif mode == "names":
        # files whose names need URI encoding in a request
        for i, name in enumerate(["epoch=3-step=100.ckpt", "a b+c.pt", "unicode-\u00e9\u00df.bin",
                                  "dir with space/x;y,z&w.bin", "tilde~(1).bin"]):
            write_file(os.path.join(root, name), data(i, 1000 + i))
        write_file(os.path.join(root, "latest"), b"1\n")
        say("SAVED")
    elif mode == "big":
        # big ROOT BYTES: one file, then the stall; exit waits for the upload
        size = int(args[0])
        t0 = time.monotonic()
        write_blocks(os.path.join(root, "big.bin"), size, 5)
        say("WROTE %.3f" % (time.monotonic() - t0))
        say("STATS", json.dumps(stats()))
    elif mode == "one":
        # one ROOT BYTES: one file of random blocks
        write_blocks(os.path.join(root, "data.bin"), int(args[0]), 9, block=8 * MiB)
        say("SAVED")
        say("STATS", json.dumps(stats()))
    elif mode == "hold":
        # hold ROOT MIB: three files and a marker, closed; then wait to be killed
        mib = int(args[0])
        for i in range(3):
            write_blocks(os.path.join(root, "shard_%d.bin" % i), mib * MiB, 20 + i, block=8 * MiB)
        with open(os.path.join(root, "latest"), "w") as f:
            f.write("3\n")
        say("SAVED")
        time.sleep(600)
    elif mode == "wait-without-upload":
        write_file(os.path.join(root, "f.bin"), b"x" * 1000)
        say("WAITED", wait_uploaded(5.0))
    else:
        sys.exit("unknown mode " + mode)


main()
'''


@pytest.fixture
def prog(tmp_path):
    p = tmp_path / "up_prog.py"
    p.write_text(PROG)
    return p


def upload_argv(root, url, cmd, staging=STAGING, log=None):
    """cmd under scripts/ackpt-run --dir root [--upload url]."""
    pre = [str(LAUNCHER), "--dir", str(root), "--staging", staging]
    if url:
        pre += ["--upload", url]
    if log:
        pre += ["--log", log]
    return pre + ["--"] + [str(a) for a in cmd]


def job_stats(job):
    """The last STATS line the program printed (a dict), or None."""
    found = re.findall(r"^STATS (.*)$", job.stdout(), re.M)
    return json.loads(found[-1]) if found else None


def stderr_lines(job):
    return [ln for ln in job.stderr().splitlines() if ln.strip()]


def lines_naming(job, *needles):
    return [ln for ln in stderr_lines(job) if any(n in ln for n in needles)]


def wait_stdout(job, word, timeout):
    """Wait until the program printed a line beginning with word; returns the line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ln in job.stdout().splitlines():
            if ln.startswith(word):
                return ln
        if job.proc.poll() is not None:
            for ln in job.stdout().splitlines():
                if ln.startswith(word):
                    return ln
            pytest.fail("the program ended (status %s) before printing %r:\n%s"
                        % (job.proc.returncode, word, job.describe()), pytrace=False)
        time.sleep(0.02)
    job.kill()
    pytest.fail("no %r from the program within %.0fs:\n%s" % (word, timeout, job.describe()),
                pytrace=False)


def assert_same(server, bucket, prefix, root, job=None, only=None):
    diffs = compare_with_bucket(server, bucket, prefix, root, only=only)
    if diffs:
        msg = ["the bucket differs from %s (s3://%s/%s):" % (root, bucket, prefix)]
        msg += ["  - " + d for d in diffs[:30]]
        if job is not None:
            msg.append(job.describe(3000))
        msg.append("--- moto log (tail) ---\n" + server.log_tail(3000))
        pytest.fail("\n".join(msg), pytrace=False)


# --------------------------------------------------------------------------
# a. single process
# --------------------------------------------------------------------------

def written(rel):
    """Files the small program writes (empty.bin is only created: no object)."""
    return rel != "empty.bin"


def test_single_process_save_and_marker(tmp_path, moto, prog):
    """torch.save of four files (one in a subdirectory, one with '=' in its
    name, one over the 5 MiB part size), an empty file, and a `latest`
    marker.  ackpt_wait_uploaded returns 0, and at that moment every object
    is in the bucket, identical to its file; the empty file (created, never
    written) has no object (docs/UPLOAD.md); the stats count the objects."""
    root = tmp_path / "ckpt"
    prefix = "runs/a"
    env = job_env(**moto.env(ACKPT_UPLOAD_PART_SIZE="5M"))
    job = start_job("small", upload_argv(root, "s3://%s/%s" % (BUCKET, prefix),
                                         [VENV_PY, prog, "small", root, "--wait", 120, "--linger", 3]),
                    env, tmp_path / "logs")
    try:
        line = wait_stdout(job, "WAITED", JOB_TIMEOUT)
        rc = int(line.split()[1])
        assert rc == 0, "ackpt_wait_uploaded returned %d:\n%s" % (rc, job.describe())
        # the program is still running (lingering): everything must be there now
        assert_same(moto, BUCKET, prefix, root, job, only=written)
        status = job.wait(JOB_TIMEOUT)
    finally:
        job.kill()
    assert status == 0, job.describe()
    local = local_files(root)
    assert set(local) == {"model.pt", "optim.pt", "sub/deep/extra.pt", "epoch=3-step=100.ckpt",
                          "empty.bin", "latest"}, local
    uploaded = {k: v for k, v in local.items() if written(k)}
    st = job_stats(job)
    print("wait: %s; stats: %s" % (line, st))
    assert st and st["present"] and st["rc"] == 0, st
    assert st["uploads_pending"] == 0 and st["upload_failures"] == 0, st
    assert st["uploaded_objects"] == len(uploaded), \
        "uploaded_objects %d, %d files written: %s" % (st["uploaded_objects"], len(uploaded), st)
    assert st["uploaded_bytes"] >= sum(uploaded.values()), st
    # each PUT carried the CRC32 of its bytes (x-amz-checksum-crc32, which
    # S3 checks; moto records it): the one-part objects' equal their files'
    for rel, size in uploaded.items():
        if size > 5 * MiB:
            continue  # multipart: a checksum of the parts' checksums
        h = moto.client().head_object(Bucket=BUCKET, Key="%s/%s" % (prefix, rel), ChecksumMode="ENABLED")
        want = base64.b64encode(zlib.crc32((root / rel).read_bytes()).to_bytes(4, "big")).decode()
        assert h.get("ChecksumCRC32") == want, (rel, h.get("ChecksumCRC32"), want)
    # the same objects again after exit (nothing extra, e.g. a temporary name)
    assert_same(moto, BUCKET, prefix, root, job, only=written)
    assert set(moto.list_objects(BUCKET)) == {"%s/%s" % (prefix, k) for k in uploaded}, \
        "objects outside the prefix or temporaries: %s" % sorted(moto.list_objects(BUCKET))


def test_wait_uploaded_without_upload_is_einval(tmp_path, prog):
    """Without ACKPT_UPLOAD, ackpt_wait_uploaded returns -EINVAL."""
    need_uploads()
    root = tmp_path / "ckpt"
    job = run_job("noupload", upload_argv(root, None, [VENV_PY, prog, "wait-without-upload", root]),
                  job_env(), tmp_path / "logs", timeout=JOB_TIMEOUT)
    assert job.returncode == 0, job.describe()
    assert wait_stdout(job, "WAITED", 1).split()[1] == str(-errno.EINVAL), job.describe()


def test_key_names_are_encoded(tmp_path, moto_auth, prog):
    """Names with '=', '+', spaces, ';', ',', '&', '~', '(' and non-ASCII
    characters, against a server that checks signatures: every object
    arrives under exactly the file's name."""
    root = tmp_path / "ckpt"
    job = run_job("names", upload_argv(root, "s3://%s/enc" % BUCKET, [VENV_PY, prog, "names", root]),
                  job_env(**moto_auth.env()), tmp_path / "logs", timeout=JOB_TIMEOUT)
    assert job.returncode == 0, job.describe()
    assert_same(moto_auth, BUCKET, "enc", root, job)


# --------------------------------------------------------------------------
# b. commit markers go last
# --------------------------------------------------------------------------

class BucketObserver(threading.Thread):
    """Lists s3://bucket/prefix/ in a loop (a client of its own, no shim) and
    records every distinct listing: [(time, {relative key: (size, etag)})].
    Keys in `fetch` are also read (GET) whenever their ETag is new, so
    etag -> content is known for them."""

    def __init__(self, server, bucket, prefix, interval=0.002, fetch=()):
        super().__init__(daemon=True)
        self.client = server.client(server.key_id, server.secret)
        self.bucket = bucket
        self.pre = prefix.strip("/") + "/"
        self.interval = interval
        self.fetch = set(fetch)
        self.contents = {}      # etag -> bytes, for keys in fetch
        self.snaps = []
        self.polls = 0
        self.errors = []
        self._stop_ev = threading.Event()

    def _list(self):
        out, token = {}, None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self.pre}
            if token:
                kw["ContinuationToken"] = token
            r = self.client.list_objects_v2(**kw)
            for o in r.get("Contents", []):
                out[o["Key"][len(self.pre):]] = (o["Size"], o["ETag"].strip('"'))
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]

    def run(self):
        last = None
        while not self._stop_ev.is_set():
            try:
                snap = self._list()
            except Exception as e:  # noqa: BLE001 -- keep polling, report at the end
                self.errors.append(repr(e))
                self._stop_ev.wait(0.05)
                continue
            self.polls += 1
            if snap != last:
                self.snaps.append((time.time(), snap))
                last = snap
                for k in self.fetch:
                    if k in snap and snap[k][1] not in self.contents:
                        try:
                            r = self.client.get_object(Bucket=self.bucket, Key=self.pre + k)
                            self.contents[r["ETag"].strip('"')] = r["Body"].read()
                        except Exception as e:  # noqa: BLE001
                            self.errors.append("GET %s: %r" % (k, e))
            self._stop_ev.wait(self.interval)

    def stop(self):
        self._stop_ev.set()
        self.join(30)


def _summary(obs):
    return "%d listings, %d distinct, %d errors%s" % (
        obs.polls, len(obs.snaps), len(obs.errors),
        (": " + "; ".join(obs.errors[:3])) if obs.errors else "")


def test_dcp_metadata_uploaded_last(tmp_path, moto):
    """A 2-rank torchrun DCP job (gloo, thread_count 2) saves 4 steps to
    ROOT/step_N.  No listing of the bucket ever shows step_N/.metadata
    without every __R_T.distcp of step_N at its full size."""
    root = tmp_path / "ckpt"
    root.mkdir()
    prefix = "dcp"
    steps, mib = 4, 24
    args = []
    for i in range(1, steps + 1):
        args += ["--save", "%s,%d,%d" % (root / ("step_%d" % i), mib, 100 + i)]
    argv = upload_argv(root, "s3://%s/%s" % (BUCKET, prefix),
                       torchrun_argv(2, free_master_port(), "dcp_job.py", args + ["--threads", 2]))
    obs = BucketObserver(moto, BUCKET, prefix)
    obs.start()
    try:
        job = run_job("dcp", argv, job_env(**moto.env(ACKPT_UPLOAD_PART_SIZE="8M")), tmp_path / "logs",
                      timeout=JOB_TIMEOUT)
    finally:
        time.sleep(0.2)
        obs.stop()
    assert job.returncode == 0, job.describe()
    local = local_files(root)
    bad, early_data = [], 0
    for i in range(1, steps + 1):
        d = "step_%d/" % i
        data = {k: v for k, v in local.items() if k.startswith(d) and k.endswith(".distcp")}
        assert len(data) == 4 and d + ".metadata" in local, \
            "expected 4 .distcp files and a .metadata in %s: %s" % (d, sorted(local))
        for t, snap in obs.snaps:
            missing = [k for k, sz in data.items() if snap.get(k, (None,))[0] != sz]
            if d + ".metadata" in snap and missing:
                bad.append("%.3f: %s.metadata listed while %s missing" % (t, d, missing))
            elif d + ".metadata" not in snap and len(missing) < len(data):
                early_data += 1
    print("observer: %s; listings with some data of a step but no .metadata yet: %d"
          % (_summary(obs), early_data))
    assert not bad, "a .metadata object was visible before its data:\n  " + "\n  ".join(bad[:10])
    assert obs.polls > 10 and len(obs.snaps) > steps, "the observer saw too little: " + _summary(obs)
    assert_same(moto, BUCKET, prefix, root, job)


def test_megatron_tracker_uploaded_last(tmp_path, moto):
    """A 2-rank Megatron-style job: per iteration each rank torch.save's
    iter_N/mp_rank_R/model_optim_rng.pt, then rank 0 writes
    latest_checkpointed_iteration.txt = N.  No listing shows the tracker
    naming N (its ETag is the md5 of its content) before both ranks' files
    of iteration N are there; the tracker never goes backwards."""
    root = tmp_path / "ckpt"
    root.mkdir()
    prefix = "megatron"
    iters, kib = 6, 8192
    tracker = "latest_checkpointed_iteration.txt"
    etag_of = {hashlib.md5(str(n).encode()).hexdigest(): n for n in range(1, iters + 1)}
    argv = upload_argv(root, "s3://%s/%s" % (BUCKET, prefix),
                       torchrun_argv(2, free_master_port(), "megatron_job.py", [root, iters]))
    obs = BucketObserver(moto, BUCKET, prefix, fetch=[tracker])
    obs.start()
    try:
        job = run_job("megatron", argv,
                      job_env(**moto.env(ACKPT_UPLOAD_PART_SIZE="5M", MEGATRON_JOB_KIB=kib)),
                      tmp_path / "logs", timeout=JOB_TIMEOUT)
    finally:
        time.sleep(0.2)
        obs.stop()
    assert job.returncode == 0, job.describe()
    local = local_files(root)
    for c, body in obs.contents.items():
        try:
            etag_of.setdefault(c, int(body.decode()))
        except ValueError:
            pass
    bad, unknown, seen = [], [], []
    for t, snap in obs.snaps:
        if tracker not in snap:
            continue
        n = etag_of.get(snap[tracker][1])
        if n is None:
            unknown.append(snap[tracker])
            continue
        if not seen or seen[-1] != n:
            seen.append(n)
        need = {k: v for k, v in local.items() if k.startswith("iter_%07d/" % n)}
        assert len(need) == 2, "expected 2 files of iteration %d locally: %s" % (n, sorted(local))
        missing = [k for k, sz in need.items() if snap.get(k, (None,))[0] != sz]
        if missing:
            bad.append("%.3f: tracker says %d while %s missing" % (t, n, missing))
    print("observer: %s; tracker values seen: %s" % (_summary(obs), seen))
    assert not unknown, "tracker objects whose content is not an iteration number: %s" % unknown[:5]
    assert not bad, "the tracker object named an iteration before its data:\n  " + "\n  ".join(bad[:10])
    assert seen == sorted(seen), "the tracker object went backwards: %s" % seen
    assert seen and seen[-1] == iters, "last tracker value seen: %s" % seen
    assert moto.get(BUCKET, "%s/%s" % (prefix, tracker)) == str(iters).encode()
    assert_same(moto, BUCKET, prefix, root, job)


# --------------------------------------------------------------------------
# c. one big file, multipart
# --------------------------------------------------------------------------

def _mem_available():
    with open("/proc/meminfo") as f:
        for ln in f:
            if ln.startswith("MemAvailable:"):
                return int(ln.split()[1]) * 1024
    return 0


def _digests(path, part_size):
    """(sha256 hex, size, the ETag S3 gives a multipart upload of the file in
    parts of part_size: md5 of the parts' md5s, "-", the part count)."""
    sha, md5s, n = hashlib.sha256(), [], 0
    with open(path, "rb") as f:
        while True:
            b = f.read(part_size)
            if not b:
                break
            sha.update(b)
            md5s.append(hashlib.md5(b).digest())
            n += len(b)
    return sha.hexdigest(), n, "%s-%d" % (hashlib.md5(b"".join(md5s)).hexdigest(), len(md5s))


def test_big_file_multipart(tmp_path, moto, prog):
    """A file of ACKPT_TEST_UPLOAD_GIB (5) GiB in 16 MiB parts: the object's
    ETag is the multipart ETag of the file's parts (moto computes it from the
    md5 of each part it received), and its sha256, streamed back from moto,
    is the file's.  Prints the program's write stall (stats.stall_seconds)
    with and without the upload; no timing is asserted.  About 2 minutes."""
    if BIG_GIB <= 0:
        pytest.skip("ACKPT_TEST_UPLOAD_GIB=0")
    size = int(BIG_GIB * GiB)
    part = 16 * MiB
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * size + 2 * GiB:
        pytest.skip("needs %.1f GiB free under %s (the file, moto's parts and its object), has %.1f"
                    % ((3 * size + 2 * GiB) / GiB, tmp_path, free / GiB))
    key = "big/big.bin"
    base_root, root = tmp_path / "baseline", tmp_path / "ckpt"
    try:
        # the same write without uploads: the stall to compare with
        base = run_job("baseline", upload_argv(base_root, None, [VENV_PY, prog, "big", base_root, size]),
                       job_env(), tmp_path / "logs", timeout=600)
        assert base.returncode == 0, base.describe()
        shutil.rmtree(base_root)
        t0 = time.monotonic()
        job = run_job("big", upload_argv(root, "s3://%s/big" % BUCKET, [VENV_PY, prog, "big", root, size]),
                      job_env(**moto.env(ACKPT_UPLOAD_PART_SIZE="16M")), tmp_path / "logs", timeout=900)
        total = time.monotonic() - t0
        assert job.returncode == 0, job.describe() + "\n--- moto log ---\n" + moto.log_tail()
        b, u = job_stats(base), job_stats(job)
        wb, wu = wait_stdout(base, "WROTE", 1).split()[1], wait_stdout(job, "WROTE", 1).split()[1]
        print("write phase %ss without upload, %ss with; stall_seconds %.3f without, %.3f with; "
              "whole run with upload %.1fs" % (wb, wu, b["stall_seconds"], u["stall_seconds"], total))
        progress = [ln for ln in stderr_lines(job) if ln.startswith("ackpt:")]
        print("ackpt lines: %s ... (%d)" % (progress[:2], len(progress)))
        assert progress, "no progress line (ackpt: ...) while the exit waited for the upload:\n" \
            + job.describe()
        assert set(moto.list_objects(BUCKET, "big/")) == {key}
        head = moto.head(BUCKET, key)
        etag = head["ETag"].strip('"')
        local_sha, n, want_etag = _digests(root / "big.bin", part)
        assert n == size and head["ContentLength"] == size, head
        assert re.fullmatch(r"[0-9a-f]{32}-\d+", etag), "not a multipart ETag: %s" % etag
        assert etag == want_etag, "ETag %s, but the file's 16 MiB parts give %s" % (etag, want_etag)
        print("ETag %s" % etag)
        # moto loads the whole object into memory to serve a GET
        if _mem_available() < 1.5 * size + GiB:
            print("streamed sha256 skipped: %.1f GiB of memory available, moto needs ~%.1f to serve "
                  "the GET (the ETag check above covers every part)"
                  % (_mem_available() / GiB, 1.5 * size / GiB))
        else:
            obj_sha, on = moto.sha256_object(BUCKET, key)
            assert (obj_sha, on) == (local_sha, n), \
                "object sha256 %s (%d bytes) vs file %s (%d bytes)" % (obj_sha, on, local_sha, n)
    finally:
        shutil.rmtree(base_root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------
# d. faults
# --------------------------------------------------------------------------

def test_moto_killed_and_restarted_mid_upload(tmp_path, moto, prog):
    """A 768 MiB file in 5 MiB parts, 2 at a time.  After a few parts have
    arrived moto is SIGKILLed (everything it held is lost), and 3 s later
    restarted on the same port with the bucket (empty) made again before the
    port opens.  The upload is retried and the program exits 0 with the
    object identical to the file."""
    root = tmp_path / "ckpt"
    key = "kr/data.bin"
    size = 768 * MiB
    env = job_env(**moto.env(ACKPT_UPLOAD_PART_SIZE="5M", ACKPT_UPLOAD_CONCURRENCY=2))
    job = start_job("killrestart", upload_argv(root, "s3://%s/kr" % BUCKET, [VENV_PY, prog, "one", root, size]),
                    env, tmp_path / "logs")
    try:
        if not moto.wait_requests("partNumber=", 6, timeout=120):
            pytest.fail("no UploadPart reached moto within 120s:\n%s\n--- moto log ---\n%s"
                        % (job.describe(), moto.log_tail()), pytrace=False)
        moto.kill()
        parts_before = moto.requests_seen("partNumber=")
        completed = moto.requests_seen("POST /%s/%s?uploadId=" % (BUCKET, key))
        assert completed == 0, "the upload completed before the kill: make the file larger"
        time.sleep(3)
        moto.start()
        status = job.wait(600)
    finally:
        job.kill()
    print("parts before the kill: %d; after the restart: %d UploadPart, %d PutObject/Complete; "
          "%.1fs in all" % (parts_before, moto.requests_seen("partNumber="),
                            moto.requests_seen("/%s/%s" % (BUCKET, key)), job.seconds))
    print("ackpt lines: %s" % lines_naming(job, "ackpt")[:6])
    assert status == 0, job.describe() + "\n--- moto log ---\n" + moto.log_tail()
    assert_same(moto, BUCKET, "kr", root, job)


@pytest.mark.parametrize("case", ["wrong-secret", "unknown-key", "bad-session-token"])
def test_bad_credentials(tmp_path, moto_auth, prog, case):
    """Credentials the server refuses: one clear line naming the S3 error
    code, a non-zero exit, nothing in the bucket, and the local files
    written as without uploads."""
    if case == "wrong-secret":
        creds, code = {"AWS_SECRET_ACCESS_KEY": "x" * 40}, "SignatureDoesNotMatch"
    elif case == "unknown-key":
        creds, code = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"}, "InvalidAccessKeyId"
    else:
        k, s, _ = moto_auth.session_credentials()
        creds, code = {"AWS_ACCESS_KEY_ID": k, "AWS_SECRET_ACCESS_KEY": s,
                       "AWS_SESSION_TOKEN": "bogus-token"}, "InvalidToken"
    _expect_refused(tmp_path, moto_auth, prog, moto_auth.env(**creds), "s3://%s/p" % BUCKET,
                    [code, "AccessDenied"], code)


def test_missing_bucket(tmp_path, moto, prog):
    """A bucket that does not exist: a line naming NoSuchBucket, non-zero
    exit, the local files intact."""
    _expect_refused(tmp_path, moto, prog, moto.env(), "s3://no-such-bucket/p", ["NoSuchBucket"],
                    "NoSuchBucket", bucket="no-such-bucket")


def _expect_refused(tmp_path, server, prog, aws_env, url, codes, main_code, bucket=BUCKET):
    root = tmp_path / "ckpt"
    job = run_job("refused", upload_argv(root, url, [VENV_PY, prog, "small", root]),
                  job_env(**aws_env), tmp_path / "logs", timeout=JOB_TIMEOUT)
    print("exit %s after %.1fs; stderr:\n%s" % (job.returncode, job.seconds, job.stderr()[-2000:]))
    assert job.returncode != 0, "exit status 0 although no upload can succeed:\n" + job.describe()
    assert wait_stdout(job, "SAVED", 1), job.describe()
    named = lines_naming(job, *codes)
    assert named, "no stderr line names %s:\n%s" % (" or ".join(codes), job.describe())
    first = next((ln for ln in stderr_lines(job) if ln.startswith("ackpt")), "")
    assert main_code in first, "the first ackpt line does not name %s:\n  %s\n%s" % (
        main_code, first, job.describe())
    # at most one line per object (4 data files; the marker is never tried)
    # and one more for the first refusal: no line per retry
    assert len(named) <= 5, "the error is repeated (once per retry?):\n  %s" % "\n  ".join(named[:10])
    assert lines_naming(job, "s3://%s/" % bucket), \
        "no line names the object (s3://%s/...):\n%s" % (bucket, job.describe())
    # training was not failed: the files are all there, complete
    local = local_files(root)
    assert set(local) == {"model.pt", "optim.pt", "sub/deep/extra.pt", "epoch=3-step=100.ckpt",
                          "empty.bin", "latest"}, local
    assert (root / "latest").read_text() == "step_1\n"
    assert zipfile.is_zipfile(root / "optim.pt"), "optim.pt is not a complete torch.save file"
    if bucket == BUCKET:
        assert server.list_objects(BUCKET) == {}, "objects despite refused credentials"


def test_helper_finishes_uploads_after_sigkill(tmp_path, moto, prog):
    """The program saves three 64 MiB files and a marker, closes them, and
    is SIGKILLed.  Its helper still uploads all of them (one request at a
    time, so most are still to go at the kill), then exits."""
    root = tmp_path / "ckpt"
    env = job_env(**moto.env(ACKPT_UPLOAD_PART_SIZE="5M", ACKPT_UPLOAD_CONCURRENCY=1))
    job = start_job("hold", upload_argv(root, "s3://%s/held" % BUCKET, [VENV_PY, prog, "hold", root, 64]),
                    env, tmp_path / "logs")
    try:
        wait_stdout(job, "SAVED", JOB_TIMEOUT)
        os.kill(job.proc.pid, signal.SIGKILL)   # ackpt-run exec's the program
        at_kill = moto.list_objects(BUCKET, "held/")
        t0 = time.monotonic()
        # (the marker may still be under its hidden temporary name locally)
        want = {"held/shard_%d.bin" % i: 64 * MiB for i in range(3)}
        want["held/latest"] = 2
        got = {}
        while time.monotonic() - t0 < 300:
            got = moto.list_objects(BUCKET, "held/")
            if got == want:
                break
            time.sleep(0.2)
        print("objects at the kill: %d of %d; all there %.1fs later" % (len(at_kill), len(want),
                                                                       time.monotonic() - t0))
        assert got == want, "after 300s the bucket holds %s, expected %s\n%s" % (got, want, job.describe())
        assert_same(moto, BUCKET, "held", root, job)
        job.wait(60, helpers_timeout=120)   # the helper leaves once it is done
    finally:
        job.kill()
    local = local_files(root)
    assert set(local) == {"shard_0.bin", "shard_1.bin", "shard_2.bin", "latest"}, local
    assert (root / "latest").read_text() == "3\n"


# --------------------------------------------------------------------------
# e. where credentials come from
# --------------------------------------------------------------------------

def test_msc_profile(tmp_path, moto_auth, prog):
    """msc://ckpt/run1 with MSC_CONFIG naming a YAML config whose s3 profile
    has the endpoint, region, base_path BUCKET/msc/base and S3Credentials;
    no AWS_* in the environment.  The server checks signatures, so the
    profile's credentials are the ones used."""
    cfg = tmp_path / "msc.yaml"
    cfg.write_text("""profiles:
  ckpt:
    storage_provider:
      type: s3
      options:
        base_path: %s/msc/base
        endpoint_url: %s
        region_name: us-east-1
    credentials_provider:
      type: S3Credentials
      options:
        access_key: %s
        secret_key: %s
""" % (BUCKET, moto_auth.url, moto_auth.key_id, moto_auth.secret))
    root = tmp_path / "ckpt"
    env = job_env(**moto_auth.env(MSC_CONFIG=cfg, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                                  AWS_ENDPOINT_URL=None, AWS_REGION=None, AWS_DEFAULT_REGION=None))
    job = run_job("msc", upload_argv(root, "msc://ckpt/run1", [VENV_PY, prog, "small", root]),
                  env, tmp_path / "logs", timeout=JOB_TIMEOUT)
    assert job.returncode == 0, job.describe() + "\n--- moto log ---\n" + moto_auth.log_tail()
    assert_same(moto_auth, BUCKET, "msc/base/run1", root, job, only=written)
    assert all(k.startswith("msc/base/run1/") for k in moto_auth.list_objects(BUCKET))


def test_aws_shared_files_profile(tmp_path, moto_auth, prog):
    """Credentials from an AWS credentials file (AWS_SHARED_CREDENTIALS_FILE)
    under AWS_PROFILE, the region from the config file (AWS_CONFIG_FILE);
    the [default] profile's key is wrong, so only the named one works."""
    creds, conf = tmp_path / "aws-credentials", tmp_path / "aws-config"
    creds.write_text("[default]\naws_access_key_id = AKIAWRONGWRONGWRONG0\naws_secret_access_key = nope\n\n"
                     "[ckpt]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                     % (moto_auth.key_id, moto_auth.secret))
    conf.write_text("[default]\nregion = eu-west-1\n\n[profile ckpt]\nregion = us-east-1\n")
    root = tmp_path / "ckpt"
    env = job_env(**moto_auth.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_REGION=None,
                                  AWS_DEFAULT_REGION=None, AWS_PROFILE="ckpt",
                                  AWS_SHARED_CREDENTIALS_FILE=creds, AWS_CONFIG_FILE=conf))
    job = run_job("awsfiles", upload_argv(root, "s3://%s/files" % BUCKET, [VENV_PY, prog, "small", root]),
                  env, tmp_path / "logs", timeout=JOB_TIMEOUT)
    assert job.returncode == 0, job.describe() + "\n--- moto log ---\n" + moto_auth.log_tail()
    assert_same(moto_auth, BUCKET, "files", root, job, only=written)


def test_session_token(tmp_path, moto_auth, prog):
    """Temporary credentials (an assumed role's key, secret and
    AWS_SESSION_TOKEN) work against a server that checks the token."""
    k, s, t = moto_auth.session_credentials()
    root = tmp_path / "ckpt"
    env = job_env(**moto_auth.env(AWS_ACCESS_KEY_ID=k, AWS_SECRET_ACCESS_KEY=s, AWS_SESSION_TOKEN=t))
    job = run_job("token", upload_argv(root, "s3://%s/tok" % BUCKET, [VENV_PY, prog, "small", root]),
                  env, tmp_path / "logs", timeout=JOB_TIMEOUT)
    assert job.returncode == 0, job.describe() + "\n--- moto log ---\n" + moto_auth.log_tail()
    assert_same(moto_auth, BUCKET, "tok", root, job, only=written)


# --------------------------------------------------------------------------
# f. bad configuration
# --------------------------------------------------------------------------

BAD = [
    ("ACKPT_UPLOAD", {"ACKPT_UPLOAD": "ftp://x"}),
    ("ACKPT_UPLOAD_PART_SIZE", {"ACKPT_UPLOAD": "s3://%s/p" % BUCKET, "ACKPT_UPLOAD_PART_SIZE": "1K"}),
    ("ACKPT_UPLOAD_PART_SIZE", {"ACKPT_UPLOAD": "s3://%s/p" % BUCKET, "ACKPT_UPLOAD_PART_SIZE": "lots"}),
]


@pytest.mark.parametrize("var,values", BAD, ids=["ftp-url", "part-size-1K", "part-size-lots"])
def test_bad_upload_config_is_one_line(tmp_path, var, values):
    """A bad upload setting: exactly one stderr line, naming the variable;
    the program's own file is written."""
    need_uploads()
    out = tmp_path / "out"
    out.mkdir()
    env = shim_env(out, AWS_ACCESS_KEY_ID="AKIAEXAMPLE000000000", AWS_SECRET_ACCESS_KEY="x" * 40,
                   AWS_REGION="us-east-1", AWS_ENDPOINT_URL="http://127.0.0.1:9",
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_PROFILE=None, AWS_SESSION_TOKEN=None, MSC_CONFIG=None, **values)
    r = subprocess.run([VENV_PY, "-c", "open(%r, 'w').write('x')" % str(out / "f")],
                       env=env, capture_output=True, text=True, timeout=90)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    print("exit status %d; stderr: %r" % (r.returncode, r.stderr))
    assert len(lines) == 1 and var in lines[0], \
        "expected exactly one stderr line naming %s, got:\n%s" % (var, r.stderr)
    assert (out / "f").read_text() == "x"


MSC_BAD = [
    ("gcs", "storage_provider:\n      type: gcs\n      options:\n        base_path: b/p\n",
     ['type "gcs" is not supported']),
    ("option", "storage_provider:\n      type: s3\n      options:\n        base_path: b/p\n"
               "        rust_client: {}\n", ['option "rust_client" is not supported']),
    ("creds", "storage_provider:\n      type: s3\n      options:\n        base_path: b/p\n"
              "    credentials_provider:\n      type: AzureCredentials\n      options: {}\n",
     ['credentials_provider type "AzureCredentials" is not supported']),
    ("unset-var", "storage_provider:\n      type: s3\n      options:\n        base_path: ${ACKPT_TEST_NO_SUCH_VAR}\n",
     ["unset environment variable"]),
    ("no-profile", None, ['has no profile "ckpt"']),
]


@pytest.mark.parametrize("case,body,want", MSC_BAD, ids=[c[0] for c in MSC_BAD])
def test_msc_config_refusals_are_one_line(tmp_path, case, body, want):
    """An MSC profile ackpt cannot honour (another provider type, an option
    or credentials type it does not read, an unset ${VAR}, no such profile):
    the helper says so in one line naming the field and the config file; the
    program's files are still written, and it exits non-zero because nothing
    could be uploaded."""
    need_uploads()
    cfg = tmp_path / "msc.yaml"
    cfg.write_text("profiles:\n  other:\n    storage_provider:\n      type: s3\n      options:\n"
                   "        base_path: x\n" + ("  ckpt:\n    " + body if body else ""))
    out = tmp_path / "out"
    out.mkdir()
    env = shim_env(out, ACKPT_UPLOAD="msc://ckpt/run", MSC_CONFIG=str(cfg),
                   AWS_ACCESS_KEY_ID="AKIAEXAMPLE000000000", AWS_SECRET_ACCESS_KEY="x" * 40,
                   AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_PROFILE=None, AWS_SESSION_TOKEN=None)
    r = subprocess.run([VENV_PY, "-c", "open(%r, 'w').write('x')" % str(out / "f")],
                       env=env, capture_output=True, text=True, timeout=90)
    helper_lines = [ln for ln in r.stderr.splitlines() if "ackpt-helper" in ln and "error" in ln]
    print("exit status %d; stderr: %r" % (r.returncode, r.stderr))
    assert helper_lines and all(w in helper_lines[0] for w in want) and str(cfg) in helper_lines[0], r.stderr
    assert "ACKPT_UPLOAD" in helper_lines[0], r.stderr
    # one line for the configuration; nothing per object
    assert len([ln for ln in helper_lines if "msc" in ln.lower() or "MSC" in ln]) == 1, r.stderr
    assert (out / "f").read_text() == "x"
    assert r.returncode == 1, r.stderr


def test_barrier_waits_for_uploads_longer_than_its_timeout(tmp_path, moto):
    """ACKPT_BARRIER_TIMEOUT=2, and each rank's 256 MiB file takes longer
    than that to upload (one request at a time): a rank whose data is
    durable and whose uploads are still going keeps the barrier open
    (PROGRESS frames), so the commits happen, locally and in the bucket,
    instead of being aborted as if a rank had gone silent."""
    root = tmp_path / "ckpt"
    root.mkdir()
    prefix = "slow"
    tracker = "latest_checkpointed_iteration.txt"
    argv = upload_argv(root, "s3://%s/%s" % (BUCKET, prefix),
                       torchrun_argv(2, free_master_port(), "megatron_job.py", [root, 2]))
    t0 = time.monotonic()
    job = run_job("slow-upload", argv,
                  job_env(**moto.env(ACKPT_UPLOAD_PART_SIZE="8M", ACKPT_UPLOAD_CONCURRENCY=1,
                                     ACKPT_BARRIER_TIMEOUT=2, MEGATRON_JOB_KIB=256 * 1024)),
                  tmp_path / "logs", timeout=JOB_TIMEOUT)
    took = time.monotonic() - t0
    assert job.returncode == 0, job.describe()
    out = job.describe()
    assert "aborted" not in out and "no answer from rank" not in out, out
    assert (root / tracker).read_text().strip() == "2"
    print("job took %.1f s with a 2 s barrier timeout" % took)
    assert_same(moto, BUCKET, prefix, root, job)
    assert moto.get(BUCKET, "%s/%s" % (prefix, tracker)).strip() == b"2"
