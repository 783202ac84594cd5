"""Scenarios 7 (multi-rank kill/fault, 4 ranks) and 10b (coordinator fuzz).

7-multi-rank: real 4-rank torchrun + gloo DCP jobs (tests/barrier_progs/
dcp_job.py, two saves: checkpoint 1 small and waited for with
--wait-commit, checkpoint 2 larger) under scripts/ackpt-run with
ACKPT_BARRIER_TIMEOUT=20 and the faulty rank's helper slowed
(ACKPT_TEST_DELAY_RANK/ACKPT_TEST_DELAY_MS).  On one rank r:
  a  SIGKILL of rank r's python while its checkpoint-2 writes are staged
  b  SIGKILL of rank r's helper while the barrier waits for it
  c  ACKPT_FAULT=op=write,err=EIO on rank r (a checkpoint-2 write)
  d  ACKPT_FAULT=op=fsync,err=EIO on rank r (a checkpoint-2 fsync)
Per trial: checkpoint 2 has no .metadata, no hidden temporaries, checkpoint 1
still loads (one checker process for all trials at the end), the job ends
within the barrier timeout + a margin, the exit status is non-zero and the
abort (or, for a killed python, the torch-level failure) is reported; which
ranks' helpers logged the abort is recorded.

10b-coordinator-fuzz: the real program (tests/barrier_progs/committer.py,
rank 0, hosting the coordinator) with 3 simulated legitimate participants;
garbage from many connections for 60 s (quick: 10 s) while a legitimate
commit goes through the barrier every ~1-2 s.

Standalone:  .venv/bin/python tests/faults/multirank.py [--quick] [--only 7|10b] [-v]
"""
import argparse
import errno
import os
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import Tally, build_problem_or_none  # noqa: E402  (puts tests/ on sys.path)

import pytest  # noqa: E402  (barrierutil's waits raise pytest.fail.Exception)

from barrierutil import (Committer, dcp_check, free_master_port, free_port, job_env,  # noqa: E402
                         rank_helper_pid, rank_python_pid, shimmed, sim, start_job,
                         torchrun_argv)
from faultutil import helper_pids, kill_marked  # noqa: E402

Failed = pytest.fail.Exception   # a BaseException subclass

# --------------------------------------------------------------------------
# 7: multi-rank kill / fault
# --------------------------------------------------------------------------

WORLD = 4
BARRIER_TIMEOUT = 20     # ACKPT_BARRIER_TIMEOUT of the jobs
END_MARGIN = 40          # the job must end within BARRIER_TIMEOUT + this after the fault
START_TIMEOUT = 120      # torch import + gloo rendezvous + checkpoint 1 on a loaded 2-CPU box
C1 = (1, 71)             # checkpoint 1: MiB per rank, seed
C2 = (32, 72)            # checkpoint 2
KINDS = {
    "a": "SIGKILL of the rank's python while its checkpoint-2 writes are staged",
    "b": "SIGKILL of the rank's helper while the barrier waits for it",
    "c": "ACKPT_FAULT=op=write,err=EIO on the rank (a checkpoint-2 write)",
    "d": "ACKPT_FAULT=op=fsync,err=EIO on the rank (a checkpoint-2 fsync)",
}
DELAY_MS = {"a": 300, "b": 300, "c": 100, "d": 100}
STAGING = {"a": "16M", "b": "256M", "c": "256M", "d": "256M"}

# Helper write ops of checkpoint 1 per rank (dcp_job.py, 1 MiB per rank,
# thread_count 2), counted once with strace in a run without the shim
# (every write(2) of the program on a managed file is one op; none of them
# is over the staging chunk size): rank 1 18, ranks 2 and 3 15.  The write
# fault aims a few ops into checkpoint 2 so that a miscount by a few still
# lands in checkpoint 2; each data file gets one fsync per checkpoint (DCP
# fsyncs it, the helper skips the fsync of close when clean), 2 per rank.
C1_WRITES = {1: 18, 2: 15, 3: 15}
WRITE_SLACK = 5
C1_FSYNCS = 2

TORCH_FAILURE = (r"ChildFailedError|exitcode\s*:\s*-9|DistBackendError|Connection closed|"
                 r"Connection reset|RuntimeError|Signals\.SIGKILL")
HELPER_LINE = re.compile(r"ackpt-helper\[(\d+)\]: (error|warning|info|debug): (.*)$", re.M)
SHIM_LINE = re.compile(r"ackpt\[(\d+)\]: (error|warning|info|debug): (.*)$", re.M)


def _fault_spec(kind, r):
    if kind == "c":
        return "op=write,nth=%d,err=EIO,mode=once" % (C1_WRITES.get(r, 15) + WRITE_SLACK)
    return "op=fsync,nth=%d,err=EIO,mode=once" % (C1_FSYNCS + 1)


def _leftovers(d):
    try:
        return sorted(n for n in os.listdir(d) if ".ackpt." in n)
    except FileNotFoundError:
        return []


_CASES = None   # --cases: [(kind, rank)] overriding the plan (standalone runs)
_KEEP = False   # --keep: keep every trial's directory and logs


def _plan(quick):
    if _CASES:
        return list(_CASES)
    if quick:
        return [("a", 2), ("c", 3)]
    plan = [(k, r) for k in "abcd" for r in (1, 2, 3)]
    # rank 0 where it makes sense: its python killed while staging, and its
    # helper (the coordinator itself) killed while the barrier waits.
    return plan + [("a", 0), ("b", 0)]


def _wait_event(job, rank, name, timeout):
    """job.wait_event, returning None instead of raising."""
    try:
        return job.wait_event(rank, name, timeout)
    except Failed:
        return None


def _abort_lines(stderr):
    """{helper pid: [abort lines]} and shim abort lines."""
    helpers = {}
    for m in HELPER_LINE.finditer(stderr):
        pid, level, msg = int(m.group(1)), m.group(2), m.group(3)
        if level == "error" and re.search(r"abort", msg):
            helpers.setdefault(pid, []).append(msg)
    shims = [m.group(0) for m in SHIM_LINE.finditer(stderr) if re.search(r"abort", m.group(3))]
    return helpers, shims


def _trial(work, kind, r, log):
    """One job.  Returns a dict of observations (never raises for the job's
    misbehaviour)."""
    label = "s7-%s-r%d" % (kind, r)
    base = work / "s7" / label
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    c1, c2 = base / "c1", base / "c2"
    extra = ["--wait-commit"]
    args = ["--save", "%s,%s,%s" % ((c1,) + C1), "--save", "%s,%s,%s" % ((c2,) + C2),
            "--threads", "2"] + extra
    # the fault reaches rank r's helper only (rank=: every helper starts
    # with its program, before the program could set anything)
    env = job_env(ACKPT_TEST_DELAY_RANK=r, ACKPT_TEST_DELAY_MS=DELAY_MS[kind],
                  ACKPT_BARRIER_TIMEOUT=BARRIER_TIMEOUT,
                  ACKPT_FAULT=_fault_spec(kind, r) + ",rank=%d" % r if kind in "cd" else None)
    argv = shimmed(torchrun_argv(WORLD, free_master_port(), "dcp_job.py", args), base,
                   staging=STAGING[kind], log="info")
    res = {"label": label, "kind": kind, "rank": r, "c1": c1, "c2": c2, "problems": [],
           "notes": [], "hang": False, "rc": None, "t_end": None}
    job = start_job(label, argv, env, base)
    res["job"] = job
    t_inj = None
    helpers = {}
    try:
        e = _wait_event(job, 0, "committed0", START_TIMEOUT)
        if e is None or not e[3].startswith("ok"):
            res["problems"].append("checkpoint 1 was not committed (%s); status %s" % (
                e[3] if e else "no committed0 event", job.proc.poll()))
            res["setup_failed"] = True
        # every rank's helper registered during checkpoint 1: map pid -> rank
        for rank in range(WORLD):
            for pid in rank_helper_pid(job.mark, rank):
                helpers[pid] = rank
        res["helpers"] = helpers
        if res.get("setup_failed"):
            pass
        elif kind == "a":
            if _wait_event(job, r, "saving1", 60) is None:
                res["problems"].append("rank %d never started checkpoint 2" % r)
            else:
                time.sleep(0.5)
                pids = rank_python_pid(job.mark, r)
                if job.event(r, "saved1"):
                    res["notes"].append("rank %d finished staging before the kill" % r)
                if len(pids) != 1:
                    res["problems"].append("rank %d's python not found: %s" % (r, pids))
                else:
                    t_inj = time.monotonic()
                    os.kill(pids[0], signal.SIGKILL)
        elif kind == "b":
            if _wait_event(job, 0, "saved1", 60) is None:
                res["problems"].append("rank 0 never finished checkpoint 2's dcp.save")
            else:
                time.sleep(0.5)
                hp = rank_helper_pid(job.mark, r)
                if (c2 / ".metadata").exists():
                    res["notes"].append("checkpoint 2 was committed before the kill (slow rank "
                                        "%d finished early)" % r)
                if len(hp) != 1:
                    res["problems"].append("rank %d's helper not found: %s" % (r, hp))
                else:
                    t_inj = time.monotonic()
                    os.kill(hp[0], signal.SIGKILL)
        else:
            # the fault is armed from the start; it fires in checkpoint 2
            if _wait_event(job, r, "saving1", 60) is not None:
                t_inj = time.monotonic()
        if t_inj is None:
            t_inj = time.monotonic()
            res["injected"] = False
        else:
            res["injected"] = True
        left = t_inj + BARRIER_TIMEOUT + END_MARGIN - time.monotonic()
        try:
            res["rc"] = job.wait(timeout=max(left, 1.0), helpers_timeout=30)
            res["t_end"] = time.monotonic() - t_inj
        except Failed as ex:
            res["hang"] = True
            res["problems"].append("HANG: %s" % str(ex).splitlines()[0])
    except Failed as ex:
        res["problems"].append("driver: %s" % str(ex).splitlines()[0])
    finally:
        job.kill()
        kill_marked(job.mark)
    return res


def _judge(t, res, log):
    """Per-trial criteria (except the checkpoint loads, done in a batch)."""
    job, kind, r, c2 = res["job"], res["kind"], res["rank"], res["c2"]
    label = res["label"]
    err = job.stderr()
    for p in res["problems"]:
        t.fail("%s: %s" % (label, p))
    if res["hang"]:
        t.hangs += 1
    if (c2 / ".metadata").exists():
        t.commits_after_error += 1
        t.fail("%s: checkpoint 2 was committed despite the fault (%s)" % (label, KINDS[kind]))
        res["check_c2"] = True
    left = _leftovers(res["c1"]) + _leftovers(c2)
    if left:
        t.fail("%s: hidden temporaries left: %s" % (label, left))

    helpers = res.get("helpers", {})
    hab, shim_ab = _abort_lines(err)
    reporters = sorted({helpers.get(pid, -1) for pid in hab})
    requested = job.event(0, "saved1") is not None      # rank 0 wrote checkpoint 2's .metadata
    rank0_abort = bool(re.search(r"commit of \S*/c2/\.metadata aborted", err))
    torch_fail = bool(re.search(TORCH_FAILURE, err))
    nonzero = res["rc"] not in (0, None)
    if kind == "a":
        told = torch_fail or rank0_abort
    elif requested:
        told = rank0_abort
    else:
        # the error reached DCP synchronously on rank r: no commit was requested
        told = torch_fail
        res["notes"].append("no commit requested: the error reached DCP itself")
    surfaced = nonzero and told and not res["hang"]
    if surfaced:
        t.surfaced += 1
    elif not res["hang"]:
        t.fail("%s: not reported (exit status %s, rank 0 abort line %s, torch failure %s)"
               % (label, res["rc"], rank0_abort, torch_fail))
    # every surviving rank's helper logs the abort of a requested commit
    expect = set()
    if requested and kind in "bcd":
        expect = set(range(WORLD)) - ({r} if kind == "b" else set())
        missing = sorted(expect - set(reporters))
        if missing and rank0_abort:
            t.fail("%s: the helpers of rank(s) %s did not log the abort (helpers logging it: %s)"
                   % (label, missing, reporters))
    c1_state = job.event(0, "committed1")
    if c1_state and c1_state[3].startswith("ok"):
        t.fail("%s: rank 0's stat of checkpoint 2's .metadata succeeded: %s" % (label, c1_state[3]))
    summary = ("%s: rc=%s end %.1fs after the fault, commit requested %s, helpers logging the "
               "abort: ranks %s of expected %s, shim abort lines %d%s"
               % (label, res["rc"], res["t_end"] or -1, requested, reporters, sorted(expect),
                  len(shim_ab), ("; " + "; ".join(res["notes"])) if res["notes"] else ""))
    torch_ranks = sorted({int(x) for x in re.findall(r"^\[rank(\d+)\]: \w*Error", err, re.M)})
    if kind == "a":
        summary += "; ranks with a torch-level error: %s" % torch_ranks
    res["summary"] = summary
    res["reporters"] = reporters if kind != "a" else ["torch:%s" % torch_ranks]
    log("  " + summary)


def scenario_multirank(work, log, quick=False):
    t = Tally("7-multi-rank", "Multi-rank (4 ranks): a fault or kill on one rank. No rank commits, "
              "every rank reports it, and none hangs (bounded by the barrier timeout)")
    work = Path(work)
    results = []
    for kind, r in _plan(quick):
        t0 = time.monotonic()
        res = _trial(work, kind, r, log)
        res["seconds"] = time.monotonic() - t0
        t.trials += 1
        t.injected += 1
        if not res.get("injected"):
            t.fail("%s: the fault could not be injected" % res["label"])
        _judge(t, res, log)
        results.append(res)
    # checkpoint 1 of every trial (and any committed checkpoint 2) must load
    c1s = [res["c1"] for res in results if (res["c1"] / ".metadata").exists()]
    for res in results:
        if not (res["c1"] / ".metadata").exists():
            t.torn += 0   # never committed: a setup failure, reported above
    chk = dcp_check(c1s, WORLD, *C1, timeout=300) if c1s else {}
    for res in results:
        v = chk.get(str(res["c1"]))
        if v is not None and not v["ok"]:
            t.torn += 1
            t.fail("%s: checkpoint 1 no longer loads: %s" % (res["label"], str(v)[:300]))
    c2s = [res["c2"] for res in results if res.get("check_c2")]
    if c2s:
        chk2 = dcp_check(c2s, WORLD, *C2, timeout=300)
        for res in results:
            v = chk2.get(str(res["c2"]))
            if v is not None and not v["ok"]:
                t.torn += 1
                t.fail("%s: committed checkpoint 2 does not load: %s" % (res["label"], str(v)[:300]))
    for res in results:
        if not _KEEP and all(not f.startswith(res["label"] + ":") for f in t.failures):
            shutil.rmtree(work / "s7" / res["label"], ignore_errors=True)
    per = ", ".join("%s%d %.0fs" % (res["kind"], res["rank"], res["seconds"]) for res in results)
    t.notes.append("4-rank torchrun+gloo DCP jobs, ACKPT_BARRIER_TIMEOUT=%d, faulty rank's helper "
                   "slowed; kinds: %s" % (BARRIER_TIMEOUT, "; ".join(
                       "(%s) %s" % kv for kv in KINDS.items())))
    t.notes.append("trials (kind+rank, seconds): " + per)
    rep = ["%s%d: %s" % (res["kind"], res["rank"], res.get("reporters", []))
           for res in results]
    t.notes.append("ranks whose helper logged the abort (a: ranks printing a torch-level error; "
                   "killed ranks are SIGTERMed by torchrun), per trial: " + "; ".join(rep))
    return t


# --------------------------------------------------------------------------
# 10b: coordinator fuzz
# --------------------------------------------------------------------------

FUZZ_WORLD = 4           # 1 real program + 3 simulated participants
FUZZ_TIMEOUT = 20        # ACKPT_BARRIER_TIMEOUT of the committer
GARBAGE_KINDS = ["random", "magic-random-fields", "hello-random-token", "torn-frame", "http",
                 "forged-legit-shape", "near-miss-secret", "burst", "idle-half-open",
                 "half-close", "sudden-close", "rst", "slow-drip", "flood"]
STALL_BOUND = 5.0        # a legitimate commit (participants ACK at once) slower than this is a stall
FLOOD_S = (1.0, 3.0)     # a "flood": valid-magic frames streamed without a HELLO for this long
FLOOD_GAP = 4.0          # seconds between floods (each moves ~GB over loopback: 2 shared CPUs)


class _Fuzzer:
    """Threads throwing garbage at the coordinator."""

    def __init__(self, port, secret, s, seed, nthreads=3):
        self.port, self.good, self.s = port, secret, s
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.conns = 0
        self.sent = 0
        self.by_kind = {k: 0 for k in GARBAGE_KINDS}
        self.refused = 0
        self.connect_errors = {}
        self.welcomed = 0           # a garbage connection that got a WELCOME: a violation
        self.flooding = False       # at most one flood at a time, FLOOD_GAP apart
        self.flood_end = 0.0
        self.held = []              # (close at, sock)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(nthreads)]

    def start(self):
        for th in self.threads:
            th.start()
        return self

    def finish(self):
        self.stop.set()
        for th in self.threads:
            th.join(10)
        with self.lock:
            held, self.held = self.held, []
        for _, c in held:
            self._check_welcome(c)
            c.close()

    def _bid(self):
        return max(self.s.prepares) if self.s.prepares else 1

    def _payload(self, rnd, kind):
        F = sim.pack
        if kind == "random":
            return rnd.randbytes(rnd.randrange(1, 400))
        if kind == "magic-random-fields":
            n = rnd.randrange(1, 6)
            return b"".join(F(rnd.randrange(0, 14), rnd.getrandbits(64), rnd.getrandbits(64),
                              rnd.randrange(-2**31, 2**31), rnd.randrange(-2**31, 2**31),
                              rnd.randbytes(16), version=rnd.choice([sim.VERSION] * 3 + [0, sim.VERSION + 1, 0xFFFF]))
                            for _ in range(n))
        if kind == "hello-random-token":
            return F(sim.HELLO, rank=rnd.randrange(-2**31, 2**31), tok=rnd.randbytes(16)) + \
                rnd.randbytes(rnd.randrange(0, 100))
        if kind == "torn-frame":
            full = F(rnd.randrange(1, 8), rnd.getrandbits(64), rnd.getrandbits(64))
            return full[:rnd.randrange(1, 48)]
        if kind == "http":
            return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * rnd.randrange(1, 4)
        if kind == "forged-legit-shape":
            # frames exactly as a participant sends them (real ranks, the
            # running barrier's id), but without a valid HELLO first,
            # replayed and duplicated
            bid = self._bid()
            rank = rnd.randrange(1, FUZZ_WORLD)
            frames = [F(sim.ACK, id_=bid, status=5, rank=rank), F(sim.ACK, id_=bid, rank=rank),
                      F(sim.ACK, id_=bid + 1, status=5, rank=rank),
                      F(sim.REQUEST, arg=rnd.randrange(1, 100), rank=rank),
                      F(sim.BYE, rank=rank), F(sim.DECISION, id_=bid, status=5, rank=rank),
                      F(sim.PREPARE, id_=bid + 1), F(sim.WELCOME, id_=rnd.randrange(4))]
            out = b"".join(rnd.choice(frames) for _ in range(rnd.randrange(1, 20)))
            if rnd.random() < 0.5:
                # a HELLO, then a PROOF made up without the secret
                out = F(sim.HELLO, rank=rank, tok=rnd.randbytes(16)) + \
                    F(sim.PROOF, mac=rnd.randbytes(16)) + out
            return out
        if kind == "burst":
            if rnd.random() < 0.5:
                return rnd.randbytes(rnd.randrange(64 << 10, 1 << 20))
            fr = F(sim.ACK, id_=self._bid(), status=5, rank=rnd.randrange(1, FUZZ_WORLD))
            return fr * rnd.randrange(1000, 20000)
        return b""

    def _check_welcome(self, c):
        try:
            c.setblocking(False)
            got = c.recv(65536)
        except (BlockingIOError, OSError):
            return
        for i in range(0, len(got) - sim.SIZE + 1, sim.SIZE):
            if struct.unpack_from("<IHH", got, i)[2] == sim.WELCOME and \
                    struct.unpack_from("<I", got, i)[0] == sim.MAGIC:
                with self.lock:
                    self.welcomed += 1

    def _connect(self):
        try:
            c = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            return c
        except OSError as e:
            with self.lock:
                if e.errno == errno.ECONNREFUSED:
                    self.refused += 1
                k = errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
                self.connect_errors[k] = self.connect_errors.get(k, 0) + 1
            return None

    def _run(self, idx):
        rnd = random.Random("%s/%d" % (self.seed, idx))
        while not self.stop.is_set():
            # expire held connections
            now = time.monotonic()
            with self.lock:
                due = [x for x in self.held if x[0] <= now]
                self.held = [x for x in self.held if x[0] > now]
            for _, c in due:
                self._check_welcome(c)
                try:
                    c.close()
                except OSError:
                    pass
            kind = rnd.choice(GARBAGE_KINDS)
            if kind == "flood":
                with self.lock:
                    if self.flooding or time.monotonic() < self.flood_end + FLOOD_GAP:
                        kind = "burst"
                    else:
                        self.flooding = True
            c = self._connect()
            if c is None and kind == "flood":
                with self.lock:
                    self.flooding = False
            if c is None:
                time.sleep(0.05)
                continue
            payload = self._payload(rnd, kind)
            sent = 0
            try:
                if kind == "slow-drip":
                    fr = sim.pack(sim.HELLO, rank=1, tok=rnd.randbytes(16))
                    for b in fr[:rnd.randrange(1, 48)]:
                        c.sendall(bytes([b]))
                        sent += 1
                        time.sleep(0.01)
                elif kind == "flood":
                    buf = sim.pack(sim.ACK, id_=self._bid(), status=5, rank=1) * 21845  # ~1 MiB
                    t_stop = time.monotonic() + rnd.uniform(*FLOOD_S)
                    try:
                        while time.monotonic() < t_stop and not self.stop.is_set():
                            c.sendall(buf)
                            sent += len(buf)
                    finally:
                        with self.lock:
                            self.flooding = False
                            self.flood_end = time.monotonic()
                elif kind == "near-miss-secret":
                    # a whole handshake with a secret one bit off, then
                    # ACKs sealed with the session key that secret gives
                    near = bytearray(self.good)
                    near[rnd.randrange(len(near))] ^= 1 << rnd.randrange(8)
                    near = bytes(near)
                    hello = sim.hello_frame(rnd.randrange(1, FUZZ_WORLD))
                    c.sendall(hello)
                    chal = sim.recv_exact(c, sim.SIZE)
                    out = sim.pack(sim.PROOF, mac=sim.proof(near, b"c", hello, chal))
                    ch = sim.Chan(near, hello, chal)
                    out += b"".join(ch.seal(sim.pack(sim.ACK, id_=self._bid(), status=5, rank=1))
                                    for _ in range(rnd.randrange(1, 5)))
                    c.sendall(out)
                    sent += len(hello) + len(out)
                elif kind == "half-close":
                    c.sendall(sim.pack(sim.HELLO, rank=2, tok=rnd.randbytes(16))[:20])
                    sent += 20
                    c.shutdown(socket.SHUT_WR)
                elif payload:
                    c.sendall(payload)
                    sent += len(payload)
            except OSError:
                pass     # the coordinator closed on us: expected
            with self.lock:
                self.conns += 1
                self.sent += sent
                self.by_kind[kind] += 1
            if kind in ("idle-half-open", "half-close", "slow-drip") or \
                    (rnd.random() < 0.05 and kind != "rst"):
                with self.lock:
                    if len(self.held) < 150:
                        self.held.append((time.monotonic() + rnd.uniform(0.5, 8.0), c))
                        c = None
            if c is not None:
                if kind == "rst" or rnd.random() < 0.2:
                    try:
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                elif kind != "sudden-close":
                    self._check_welcome(c)
                c.close()
            # ~100-200 connections/s per thread: fuzz hard, but leave the
            # 2 shared CPUs (and the ephemeral ports: TIME_WAIT) usable
            time.sleep(rnd.uniform(0.002, 0.01))


def scenario_fuzz(work, log, quick=False):
    t = Tally("10b-coordinator-fuzz", "the coordinator rejects unauthenticated or malformed "
              "messages: fuzz it with random frames for 60 s and it must not crash")
    work = Path(work)
    dur = 10.0 if quick else 60.0
    base = work / "s10b"
    shutil.rmtree(base, ignore_errors=True)
    port = free_port()
    seed = int(time.time())
    com = s = fz = None
    commits = lats = None
    try:
        try:
            com = Committer(base / "ckpt", FUZZ_WORLD, port, 100000, base / "logs",
                            timeout_s=FUZZ_TIMEOUT, data_kib=64)
            s = sim.Sim("127.0.0.1", port, FUZZ_WORLD - 1).start(timeout=60)
        except (Failed, OSError, TimeoutError) as e:
            t.fail("setup: %s" % str(e).splitlines()[0])
            return t
        commits, lats, bad = 0, [], 0
        dt, err = com.commit(timeout=FUZZ_TIMEOUT + 15)
        if err:
            t.fail("the first commit (before any garbage) failed with errno %d" % err)
        fz = _Fuzzer(port, s.secret, s, seed).start()
        rnd = random.Random(seed)
        t_end = time.monotonic() + dur
        while time.monotonic() < t_end:
            time.sleep(rnd.uniform(1.0, 2.0))
            if not helper_pids(com.mark):
                t.fail("the coordinator's helper died under garbage:\n%s" % com.stderr()[-2000:])
                break
            try:
                dt, err = com.commit(timeout=FUZZ_TIMEOUT + 15)
            except Failed as e:
                t.hangs += 1
                t.fail("a legitimate commit was not answered within %ds: %s"
                       % (FUZZ_TIMEOUT + 15, str(e).splitlines()[0]))
                break
            commits += 1
            lats.append(dt)
            if dt > STALL_BOUND and not err:
                t.fail("legitimate commit %d took %.1fs (participants ACK at once; normally a few "
                       "ms): the coordinator was stalled by unauthenticated traffic" % (commits, dt))
            if err:
                bad += 1
                t.fail("legitimate commit %d under garbage failed with errno %d (%.2fs)"
                       % (commits, err, dt))
                break    # the committer stops after a failed commit
        fz.finish()
        time.sleep(0.3)
        if not t.failures:
            if not helper_pids(com.mark):
                t.fail("the coordinator's helper died under garbage:\n%s" % com.stderr()[-2000:])
            else:
                try:
                    dt, err = com.commit(timeout=FUZZ_TIMEOUT + 15)
                    commits += 1
                    lats.append(dt)
                    if err:
                        t.fail("the commit after the fuzz failed with errno %d" % err)
                except Failed as e:
                    t.hangs += 1
                    t.fail("the commit after the fuzz was not answered: %s" % str(e).splitlines()[0])
        summ = s.summary()
        aborts = [d for d in summ["decisions"] if d[2] != 0]
        if aborts:
            t.fail("simulated participants were told of %d abort(s): %s" % (len(aborts), aborts[:3]))
        if summ["lost"]:
            t.fail("the coordinator dropped legitimate participants %s" % summ["lost"])
        if fz.welcomed:
            t.fail("%d garbage connection(s) got a WELCOME" % fz.welcomed)
        if fz.refused:
            t.fail("%d connection attempts refused (the coordinator stopped listening)" % fz.refused)
        s.stop()
        s = None
        try:
            rc = com.finish(timeout=60)
        except Failed as e:
            t.hangs += 1
            t.fail("the program did not exit: %s" % str(e).splitlines()[0])
            rc = None
        if rc is not None and rc != 0:
            t.fail("the program exited with status %s:\n%s" % (rc, com.stderr()[-2000:]))
        try:
            com.wait_helper_gone(30)
        except Failed as e:
            t.hangs += 1
            t.fail("the coordinator's helper did not exit: %s" % str(e).splitlines()[0])
        t.trials = fz.conns
        t.injected = 0
        t.classes = [k for k in GARBAGE_KINDS if fz.by_kind[k]]
        t.notes.append("%.0f s of garbage from 3 threads: %d connections, %d bytes (per kind: %s); "
                       "connect errors %s" % (dur, fz.conns, fz.sent, ", ".join(
                           "%s %d" % kv for kv in fz.by_kind.items()), fz.connect_errors or "none"))
        if lats:
            ls = sorted(lats)
            t.notes.append("%d legitimate commits through the barrier meanwhile (3 simulated "
                           "participants), all errno 0: %s; close() latency median %.1f ms, max "
                           "%.1f ms (bound %.0f s)" % (commits, "yes" if not bad else "NO",
                                                      ls[len(ls) // 2] * 1000, ls[-1] * 1000,
                                                      STALL_BOUND))
        log("  10b: %s" % " / ".join(t.notes))
    finally:
        if fz is not None:
            fz.finish()
        if s is not None:
            try:
                s.stop()
            except Exception:  # noqa: BLE001
                pass
        if com is not None:
            com.kill()
    if not t.failures and not _KEEP:
        shutil.rmtree(base, ignore_errors=True)
    return t


# --------------------------------------------------------------------------

def _print(t):
    print("scenario %-22s %s  trials %d, injected %d, surfaced %d, commits after error %d, torn %d, "
          "bytes lost %d, hangs %d, failures %d, %.0fs"
          % (t.name, "PASS" if t.ok() else "FAIL", t.trials, t.injected, t.surfaced,
             t.commits_after_error, t.torn, t.bytes_lost, t.hangs, len(t.failures), t.seconds))
    for n in t.notes:
        print("    note: %s" % n)
    for f in t.failures:
        print("    FAIL: %s" % f[:1500])


def main():
    ap = argparse.ArgumentParser(description="scenarios 7 and 10b of the fault suite")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["7", "10b"], default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--cases", default=None,
                    help="scenario 7 only these trials, e.g. a2,b0,c3 (kind a-d + rank)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    global _CASES, _KEEP
    _KEEP = a.keep
    if a.cases:
        _CASES = [(c[0], int(c[1:])) for c in a.cases.split(",") if c]
    problem = build_problem_or_none()
    if problem:
        print("multirank: %s" % problem, file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="ackpt-faults-mr-", dir="/tmp"))
    os.chmod(work, 0o755)

    def log(msg):
        if a.verbose:
            print(msg, flush=True)

    tallies = []
    for num, fn in (("7", scenario_multirank), ("10b", scenario_fuzz)):
        if a.only and a.only != num:
            continue
        t0 = time.monotonic()
        print("scenario %s (%s) ..." % (num, "quick" if a.quick else "full"), flush=True)
        t = fn(work, log, quick=a.quick)
        t.seconds = time.monotonic() - t0
        _print(t)
        tallies.append(t)
    ok = all(t.ok() for t in tallies)
    if a.keep or not ok:
        print("work dir kept: %s" % work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
