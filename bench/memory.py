#!/usr/bin/env python3
"""bench/memory.py: what the staging arena costs in memory, and who is
charged for it.

Runs one program under ackpt-run with the default staging size (or
--staging) inside a fresh memory cgroup (v2, or v1's memory controller),
which saves a checkpoint of --size bytes --saves times with
`write()` calls at torch.save-like 64-byte offsets, waits until it is
durable, and then reports, for the program and for its helper:
  Rss, RssShmem, Pss and Pss_Shmem (/proc/PID/smaps_rollup),
and for the cgroup: its memory use and the shmem it is charged.  Needs
root (it makes the cgroup).  Prints one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("ACKPT_BUILD_DIR", os.path.join(REPO, "build"))

PROG = r"""
import ctypes, os, sys, time, json
d, size, saves = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
blob = os.urandom(16 << 20)
lib = ctypes.CDLL(None)
lib.ackpt_wait.argtypes = [ctypes.c_double]
for s in range(saves):
    with open(os.path.join(d, "ckpt%d.bin" % s), "wb") as f:
        f.write(b"h" * 64)
        left = size
        while left > 0:
            n = min(left, len(blob))
            f.write(blob[:n])
            left -= n
    lib.ackpt_wait(600.0)
    os.unlink(os.path.join(d, "ckpt%d.bin" % s))
print("READY", flush=True)
sys.stdin.readline()
"""


def rollup(pid):
    out = {}
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Rss", "Pss", "Pss_Shmem", "Shared_Clean", "Shared_Dirty"):
                    out[k] = int(v.split()[0]) << 10
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    out["RssShmem"] = int(line.split()[1]) << 10
    except OSError:
        pass
    return out


def make_cgroup(name):
    """(cgroup dir, procs file, usage reader, shmem reader)."""
    v2 = "/sys/fs/cgroup/cgroup.controllers"
    if os.path.exists(v2):
        d = "/sys/fs/cgroup/" + name
        os.mkdir(d)

        def usage():
            return int(open(d + "/memory.current").read())
        stat = d + "/memory.stat"
    else:
        d = "/sys/fs/cgroup/memory/" + name
        os.mkdir(d)

        def usage():
            return int(open(d + "/memory.usage_in_bytes").read())
        stat = d + "/memory.stat"

    def shmem():
        for line in open(stat):
            k, v = line.split()
            if k in ("shmem", "total_shmem"):
                return int(v)
        return None
    return d, d + "/cgroup.procs", usage, shmem


def helper_of(pid_program, mark):
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            env = open("/proc/%s/environ" % p, "rb").read()
            comm = open("/proc/%s/comm" % p).read().strip()
        except OSError:
            continue
        if comm.startswith("ackpt-helper") and (b"ACKPT_MEMBENCH=" + mark.encode()) in env:
            return int(p)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--saves", type=int, default=2)
    ap.add_argument("--staging", default=None, help="ACKPT_STAGING (default: ackpt's default)")
    ap.add_argument("--dir", default=os.path.join(BUILD, "bench-tmp"))
    a = ap.parse_args()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = int(a.size[:-1]) * mult[a.size[-1]] if a.size[-1] in mult else int(a.size)
    os.makedirs(a.dir, exist_ok=True)
    mark = "%d-%d" % (os.getpid(), time.time_ns())
    cg, procs, usage, shmem = make_cgroup("ackpt-membench-" + mark)
    prog = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    prog.write(PROG)
    prog.close()
    env = dict(os.environ, ACKPT_MEMBENCH=mark)
    if a.staging:
        env["ACKPT_STAGING"] = a.staging
    argv = ["sh", "-c", 'echo $$ > "$0"; exec "$@"', procs,
            os.path.join(REPO, "scripts", "ackpt-run"), "--dir", a.dir, "--",
            sys.executable, prog.name, a.dir, str(size), str(a.saves)]
    base = usage()
    p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        if line.strip() != "READY":
            raise SystemExit("program failed: %r" % line)
        time.sleep(0.5)
        h = helper_of(p.pid, mark)
        stats = {"checkpoint_bytes": size + 64, "saves": a.saves,
                 "staging_env": a.staging, "cgroup_usage": usage() - base,
                 "cgroup_shmem": shmem(), "program": rollup(p.pid),
                 "helper": rollup(h) if h else None}
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        os.unlink(prog.name)
        for _ in range(50):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.1)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
