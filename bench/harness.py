"""bench/run: ackpt against synchronous saving, DCP async_save and
nvidia-resiliency-ext, beside the machine's limits, measured in one run on one
directory.  Prints a table and writes results.json, results.md and PNG plots.

For each size and format, one long-lived worker process per system
(bench/ckpt_worker.py) builds the same state dict; the harness then drives
them round by round, interleaved (A B C A B C ...), so drift on a shared,
noisy machine hits every system alike.  Round 0 of each worker is the warm-up
save (faulting memory in, starting helpers and daemons) and is reported
separately; the rest are the measured saves.  A background thread samples
/proc to sum the resident memory of every process that belongs to a worker
(its ranks, torchrun, DCP's daemon, ackpt's helper), found by an environment
variable they all inherit.

Nothing here passes or fails: targets are reported as ratios, with how far
off they are.
"""
import argparse
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BUILD = os.environ.get("ACKPT_BUILD_DIR", os.path.join(REPO, "build"))
RUN = os.path.join(REPO, "scripts", "ackpt-run")
WORKER = os.path.join(HERE, "ckpt_worker.py")
MiB, GiB = 1 << 20, 1 << 30
MIN_WINDOW_S = 0.05  # shortest mean persist window that gives an interference figure
BARRIER_NA = "not yet available (barrier issue #3 not landed)"

sys.path.insert(0, HERE)
import workload  # noqa: E402  (imports torch; only for labels and sizes here)


def load_script(name):
    """bench/NAME (a script without .py) as a module."""
    path = os.path.join(HERE, name)
    loader = importlib.machinery.SourceFileLoader("bench_" + name, path)
    spec = importlib.util.spec_from_loader("bench_" + name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def load_micro():
    return load_script("micro")


SYSTEM_LABEL = {
    "sync": "synchronous (save + fsync)",
    "ackpt": "ackpt (same script, ackpt-run)",
    "dcp-thread": "DCP async_save THREAD",
    "dcp-process": "DCP async_save PROCESS",
    "dcp-thread-ackpt": "DCP async_save THREAD, under ackpt-run",
    "nvrx-dcp": "nvrx FileSystemWriterAsync",
    "nvrx-torch": "nvrx TorchAsyncCheckpoint",
    "floor": "floor: same save to /dev/shm, no fsync",
}
ORDER = ["sync", "ackpt", "dcp-thread", "dcp-process", "dcp-thread-ackpt", "nvrx-dcp", "nvrx-torch",
         "floor"]


def systems_for(fmt, nvrx):
    s = ["sync", "ackpt"]
    if fmt.startswith("dcp"):
        s += ["dcp-thread", "dcp-process", "dcp-thread-ackpt"]
    if nvrx and fmt == "dcp1":
        s.append("nvrx-dcp")
    if nvrx and fmt == "torch":
        s.append("nvrx-torch")
    return s + ["floor"]


def fmt_size(b):
    return "%d MiB" % (b // MiB) if b < GiB else "%g GiB" % (b / GiB)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""


def machine(tmp):
    info = {}
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    info["cores"] = os.cpu_count()
    info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)
    info["kernel"] = platform.release()
    info["os"] = sh(". /etc/os-release && echo $PRETTY_NAME")
    src = sh("df --output=source,fstype %s | tail -1" % tmp).split()
    info["filesystem"] = " ".join(src)
    dev = os.path.basename(src[0]) if src else ""
    info["disk"] = sh("lsblk -dno NAME,SIZE,ROTA,MODEL /dev/%s 2>/dev/null" % dev) or dev
    for mnt in open("/proc/mounts"):
        f = mnt.split()
        if src and f[0] == src[0]:
            info["mount_options"] = f[3]
            break
    info["python"] = platform.python_version()
    import numpy
    import safetensors
    import torch

    info["torch"] = torch.__version__
    info["numpy"] = numpy.__version__
    info["safetensors"] = safetensors.__version__
    info["cuda_available"] = torch.cuda.is_available()
    try:
        from importlib.metadata import version

        info["nvidia_resiliency_ext"] = version("nvidia-resiliency-ext")
    except Exception as e:
        info["nvidia_resiliency_ext"] = "not installed (%s)" % e
    info["fio"] = sh("fio --version") or "missing"
    info["ackpt"] = sh("git -C %s rev-parse --short HEAD" % REPO)
    # libackpt.so is built from the work tree, which may hold uncommitted edits
    dirty = sh("git -C %s status --porcelain -- src include meson.build" % REPO)
    info["ackpt_uncommitted"] = [x[3:] for x in dirty.splitlines()]
    info["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
    return info


# ---------------------------------------------------------------- memory

class MemSampler(threading.Thread):
    """Peak of the summed Rss and Pss of every process whose environment holds
    BENCH_WORKER_ID=<id>.  Pss divides shared pages (ackpt's staging arena is
    mapped by the program and its helper, DCP's shared staging by the trainer
    and its daemon) among their users, so its sum counts them once; Rss
    counts them in each process."""

    def __init__(self, period=0.2, pss_every=5):
        super().__init__(daemon=True)
        self.period, self.pss_every = period, pss_every
        self.owner = {}  # pid -> worker id or None
        self.peak = {}   # wid -> {"rss": bytes, "pss": bytes, "procs": n}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _wid(self, pid):
        # A pid seen between fork and exec still has the harness's environment:
        # look again until it shows a worker id.
        if self.owner.get(pid) is None:
            wid = None
            try:
                with open("/proc/%d/environ" % pid, "rb") as f:
                    for kv in f.read().split(b"\0"):
                        if kv.startswith(b"BENCH_WORKER_ID="):
                            wid = kv.split(b"=", 1)[1].decode()
            except OSError:
                pass
            self.owner[pid] = wid
        return self.owner[pid]

    def pids_of(self, wid):
        return [p for p, w in list(self.owner.items()) if w == wid]

    @staticmethod
    def _read(pid, name, keys):
        out = {}
        with open("/proc/%d/%s" % (pid, name)) as f:
            for line in f:
                k = line.split(":", 1)[0]
                if k in keys:
                    out[k] = int(line.split()[1]) * 1024
        return out

    def sample(self, pss=True):
        live = set()
        tot = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            live.add(pid)
            wid = self._wid(pid)
            if wid is None:
                continue
            try:
                rss = self._read(pid, "status", ("VmRSS",)).get("VmRSS", 0)
                p = self._read(pid, "smaps_rollup", ("Pss",)).get("Pss", 0) if pss else 0
            except OSError:
                continue
            t = tot.setdefault(wid, [0, 0, 0])
            t[0] += rss
            t[1] += p
            t[2] += 1
        for pid in list(self.owner):
            if pid not in live:
                del self.owner[pid]
        with self.lock:
            for wid, (rss, p, n) in tot.items():
                pk = self.peak.setdefault(wid, {"rss": 0, "pss": 0, "procs": 0})
                pk["rss"], pk["procs"] = max(pk["rss"], rss), max(pk["procs"], n)
                if pss:
                    pk["pss"] = max(pk["pss"], p)

    def run(self):
        # VmRSS is a counter (cheap); Pss needs a walk of the page tables, so
        # it is sampled every pss_every-th time to keep the harness off the
        # cores it measures.
        i = 0
        while not self.stop.wait(self.period):
            try:
                self.sample(pss=i % self.pss_every == 0)
            except Exception:
                pass
            i += 1

    def get(self, wid):
        with self.lock:
            return dict(self.peak.get(wid, {}))


# ---------------------------------------------------------------- workers

COORD_PORT_OFFSET = 2719  # src/common/barrier.h: ackpt's coordinator port under torchrun


def free_master_port():
    """A MASTER_PORT for torchrun, below the ephemeral range like torchrun's
    default 29500, such that ackpt's default coordinator port (MASTER_PORT +
    2719) is free as well.  In the ephemeral range a coordinator port is often
    blocked by other connections' TIME_WAIT sockets, and then every rank falls
    back to synchronous writes after a 10 s registration timeout (reported in
    bench/RESULTS.md)."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 32768 - COORD_PORT_OFFSET - 1)
        socks = []
        try:
            for p in (port, port + COORD_PORT_OFFSET):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", p))
            return port
        except OSError:
            continue
        finally:
            for x in socks:
                x.close()
    raise WorkerError("no free MASTER_PORT")


class WorkerError(Exception):
    pass


class Worker:
    """One system's process (tree) for one (size, format)."""

    def __init__(self, h, wid, size, fmt, system):
        self.h, self.wid, self.size, self.fmt, self.system = h, wid, size, fmt, system
        self.ranks = 2 if fmt == "dcp2" else 1
        self.dir = os.path.join(h.tmp, wid)
        os.makedirs(self.dir, exist_ok=True)
        self.ctl = os.path.join(h.tmp, "ctl-%s.sock" % wid)
        self.logpath = os.path.join(h.logdir, wid + ".log")
        self.proc = self.conn = None
        self.buf = b""
        self.error = None
        self.rounds = []
        self.info = None
        self.staging = None
        self.shm = None

    def command(self):
        py = sys.executable
        if self.ranks > 1:
            port = free_master_port()
            cmd = [os.path.join(os.path.dirname(py), "torchrun"), "--nnodes", "1",
                   "--nproc-per-node", str(self.ranks), "--master-addr", "127.0.0.1",
                   "--master-port", str(port), WORKER]
        else:
            cmd = [py, WORKER]
        if self.system in ("ackpt", "dcp-thread-ackpt"):
            # Staging for the whole checkpoint of one rank plus a quarter, so a
            # save never waits for space (back-pressure would measure the
            # disk, not the staging path); every rank gets its own arena.
            per_rank = self.size // self.ranks
            # (ackpt refuses arenas under 16M)
            self.staging = max(64, int(math.ceil(per_rank * 1.25 / MiB)))
            cmd = [RUN, "--dir", self.dir, "--staging", "%dM" % self.staging, "--"] + cmd
        return cmd

    def start(self):
        if os.path.exists(self.ctl):
            os.unlink(self.ctl)
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(self.ctl)
        self.lsock.listen(1)
        shm = None
        if self.system == "floor":
            shm = os.path.join("/dev/shm", "ackpt-bench-%d-%s" % (os.getpid(), self.wid))
            os.makedirs(shm, exist_ok=True)
        self.shm = shm
        spec = {"format": self.fmt, "size_bytes": self.size, "system": self.system,
                "dir": self.dir, "shm_dir": shm, "worker_id": self.wid}
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("ACKPT_") and k not in ("ACKPT_LIB", "ACKPT_HELPER"):
                del env[k]
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        env.update(BENCH_SPEC=json.dumps(spec), BENCH_CTL=self.ctl, BENCH_WORKER_ID=self.wid,
                   PYTHONUNBUFFERED="1")
        self.logf = open(self.logpath, "w")
        self.proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=REPO)

    def _wait_readable(self, sock, deadline):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError("timed out")
            r, _, _ = select.select([sock], [], [], min(left, 1.0))
            if r:
                return
            if self.proc.poll() is not None:
                raise WorkerError("exited with status %s" % self.proc.returncode)

    def recv(self, timeout):
        deadline = time.monotonic() + timeout
        if self.conn is None:
            self._wait_readable(self.lsock, deadline)
            self.conn, _ = self.lsock.accept()
        while b"\n" not in self.buf:
            self._wait_readable(self.conn, deadline)
            chunk = self.conn.recv(1 << 16)
            if not chunk:
                self.proc.wait(timeout=10)
                raise WorkerError("closed its connection (status %s)" % self.proc.returncode)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, obj):
        self.conn.sendall((json.dumps(obj) + "\n").encode())

    def log_tail(self, n=6):
        try:
            with open(self.logpath, errors="replace") as f:
                lines = [x.rstrip() for x in f if x.strip()]
            return " | ".join(lines[-n:])[-1500:]
        except OSError:
            return ""

    def log_lines(self, word):
        try:
            with open(self.logpath, errors="replace") as f:
                return [x.strip() for x in f if word in x]
        except OSError:
            return []

    def log_exception(self):
        """The last exception line in the log, e.g. raised in a daemon process
        of the system under test that the worker itself cannot see."""
        try:
            with open(self.logpath, errors="replace") as f:
                lines = [x.strip() for x in f]
        except OSError:
            return ""
        for x in reversed(lines):
            head = x.split(":", 1)[0]
            if ":" in x and " " not in head and (head.endswith("Error") or head.endswith("Exception")):
                return x[:600]
        return ""

    def fail(self, what, e):
        self.error = "%s: %s" % (what, e)
        tail = self.log_tail()
        exc = self.log_exception()
        if exc and exc not in self.error:
            self.error += " -- last exception in the log (possibly a child process): " + exc
        elif tail and isinstance(e, WorkerError) and any(w in str(e) for w in ("timed out", "status")):
            self.error += " -- log: " + tail
        self.kill()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        # what escaped the process group (ackpt's helper forks away): by id
        self.h.sampler.sample(pss=False)
        for pid in self.h.sampler.pids_of(self.wid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def close(self, timeout):
        if self.proc and self.proc.poll() is None and self.conn is not None and not self.error:
            try:
                self.send({"quit": True})
                self.proc.wait(timeout=timeout)
            except Exception:
                pass
        if self.proc and self.proc.poll() is None:
            self.kill()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                pass
        # let a helper that forked away finish and exit before the next group
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.h.sampler.sample(pss=False)
            if not self.h.sampler.pids_of(self.wid):
                break
            time.sleep(0.2)
        for x in (self.conn, self.lsock):
            if x:
                x.close()
        self.logf.close()
        for p in (self.ctl,):
            if os.path.exists(p):
                os.unlink(p)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.shm:
            shutil.rmtree(self.shm, ignore_errors=True)


# ---------------------------------------------------------------- harness

def mem_estimate(size, fmt, system):
    """Bytes a worker may hold at its peak (state dict, copies, staging, a
    Python with torch per process); used to decide what can run side by side."""
    ranks = 2 if fmt == "dcp2" else 1
    per_proc = 450 * MiB
    extra = {"sync": 0, "ackpt": 1.25 * size, "floor": size, "dcp-thread": size,
             "dcp-thread-ackpt": 2.25 * size,
             "dcp-process": size + per_proc, "nvrx-dcp": size, "nvrx-torch": size}[system]
    if fmt in ("safetensors",):
        extra += size  # save_file serializes into one buffer first
    return size + extra + per_proc * (ranks + (1 if ranks > 1 else 0))


def mem_available():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * GiB


class Harness:
    def __init__(self, args):
        self.args = args
        self.t_start = time.monotonic()
        self.tmp = args.tmp
        self.logdir = os.path.join(args.out, "logs")
        os.makedirs(self.logdir, exist_ok=True)
        self.sampler = MemSampler()
        self.results = []
        self.done_saves = 0
        self.total_saves = 0
        self.nvrx_errors = {}
        self.live = []

    def progress(self, msg):
        el = time.monotonic() - self.t_start
        eta = ""
        if self.done_saves:
            rest = el / self.done_saves * (self.total_saves - self.done_saves)
            eta = "  eta %dm%02ds" % (rest // 60, rest % 60)
        log("[%3d/%d %2dm%02ds%s] %s" % (self.done_saves, self.total_saves, el // 60, el % 60, eta, msg))

    def groups(self, size, systems, fmt):
        budget = self.args.mem_fraction * mem_available()
        out, cur, used = [], [], 0
        for s in systems:
            need = mem_estimate(size, fmt, s)
            if cur and used + need > budget:
                out.append(cur)
                cur, used = [], 0
            cur.append(s)
            used += need
        return out + ([cur] if cur else [])

    def timeout(self, size):
        return self.args.timeout + 90 * size / GiB

    def run_cell(self, size, fmt):
        systems = systems_for(fmt, not self.args.no_nvrx)
        rounds = self.args.rounds + 1
        for s in [s for s in systems if s in self.nvrx_errors]:
            self.results.append(self.row(size, fmt, s, error=self.nvrx_errors[s]
                                         + " (as at the first size; not retried)"))
            self.done_saves += rounds
            systems.remove(s)
        for group in self.groups(size, systems, fmt):
            workers = []
            for s in group:
                wid = "%s-%s-%s" % (fmt, fmt_size(size).replace(" ", ""), s)
                workers.append(Worker(self, wid, size, fmt, s))
                self.live.append(workers[-1])
            if len(group) > 1 and len(workers) > 1:
                self.progress("%s %s: starting %s (interleaved)" % (fmt_size(size), workload.FORMAT_LABEL[fmt],
                                                                  ", ".join(w.system for w in workers)))
            for w in workers:
                w.start()
            t_ready = self.timeout(size) + 60
            for w in workers:
                try:
                    hello = w.recv(t_ready)
                    ready = w.recv(t_ready)
                    w.info = ready
                    if ready.get("error"):
                        w.fail("setup", ready["error"])
                except Exception as e:
                    w.fail("start", e)
            for r in range(rounds):
                for w in workers:
                    if w.error:
                        continue
                    try:
                        w.send({"round": r, "idle_s": self.args.idle_s})
                        # the PROCESS executor spawns its daemon in round 0
                        tmo = self.timeout(size) * (3 if r == 0 else 1)
                        if w.system.startswith("nvrx"):
                            tmo = min(tmo, self.args.nvrx_timeout)
                        msg = w.recv(tmo)
                        errs = [x["error"] for x in msg["ranks"] if "error" in x]
                        if errs:
                            raise WorkerError(errs[0])
                        w.rounds.append(msg["ranks"])
                        st = max(x["stall_s"] for x in msg["ranks"])
                        du = max(x["durable_s"] for x in msg["ranks"])
                        self.done_saves += 1
                        self.progress("%-8s %-22s %-12s %s  stall %7.3f s  durable %7.3f s"
                                      % (fmt_size(size), workload.FORMAT_LABEL[fmt], w.system,
                                         "warm-up " if r == 0 else "round %d" % r, st, du))
                    except Exception as e:
                        w.fail("round %d" % r, e)
                        self.done_saves += rounds - r
                        self.progress("%s %s %s: ERROR %s" % (fmt_size(size), fmt, w.system, w.error[:300]))
            for w in workers:
                w.close(self.timeout(size))
                self.live.remove(w)
                row = self.row(size, fmt, w.system, worker=w)
                row["interleaved_with"] = [x.system for x in workers if x is not w]
                if w.system.startswith("nvrx") and w.error:
                    self.nvrx_errors[w.system] = w.error
                self.results.append(row)

    def row(self, size, fmt, system, worker=None, error=None):
        row = {"size_bytes": size, "size": fmt_size(size), "format": fmt,
               "format_label": workload.FORMAT_LABEL[fmt], "ranks": 2 if fmt == "dcp2" else 1,
               "system": system, "system_label": SYSTEM_LABEL[system]}
        w = worker
        if w is not None:
            error = w.error
            row["staging_mib"] = w.staging
            if w.info:
                row["tensors"] = sum(x["tensors"] for x in w.info["ranks"])
                row["state_bytes"] = sum(x["state_bytes"] for x in w.info["ranks"])
            row["rounds"] = w.rounds
            mem = self.sampler.get(w.wid)
            if mem:
                row["peak_rss_mib"] = mem["rss"] / MiB
                row["peak_pss_mib"] = mem["pss"] / MiB
                row["processes"] = mem["procs"]
        if w is not None and system == "ackpt" and w.rounds and not error:
            off = sorted({x["rank"] for rr in w.rounds for x in rr
                          if not (x.get("ackpt") or {}).get("active")})
            if off:
                error = ("ackpt was not active (synchronous pass-through) on rank(s) %s: %s"
                         % (off, " | ".join(w.log_lines("ackpt")[:6])[:1200]))
        row["status"] = "error" if error else "ok"
        if error:
            row["error"] = error
        if w is None or not w.rounds:
            return row
        first, meas = w.rounds[0], w.rounds[1:]
        stall = lambda rr: max(x["stall_s"] for x in rr)  # noqa: E731  the slowest rank holds the step
        dur = lambda rr: max(x["durable_s"] for x in rr)  # noqa: E731
        row["first_stall_s"] = stall(first)
        row["first_durable_s"] = dur(first)
        row["measured_saves"] = len(meas)
        if meas:
            st = [stall(rr) for rr in meas]
            du = [dur(rr) for rr in meas]
            row["stall_p50_s"], row["stall_max_s"] = statistics.median(st), max(st)
            row["durable_p50_s"], row["durable_max_s"] = statistics.median(du), max(du)
            row["durable_rate_mib_s"] = size / MiB / row["durable_p50_s"]
            idle = [x["idle_rate"] for rr in meas for x in rr if x.get("idle_rate")]
            it = sum(x.get("busy_iters", 0) for rr in meas for x in rr)
            bs = sum(x.get("busy_s", 0) for rr in meas for x in rr)
            if idle and bs > 0:
                row["idle_rate"] = statistics.mean(idle)
                row["busy_rate"] = it / bs
                row["busy_s_per_save"] = bs / len(meas) / row["ranks"]
                # a window of a few ms holds a handful of iterations: noise
                if row["busy_s_per_save"] >= MIN_WINDOW_S:
                    row["interference_pct"] = 100 * (1 - row["busy_rate"] / row["idle_rate"])
            bg = [sum(x["bg_cpu_s"] for x in rr if "bg_cpu_s" in x) for rr in meas
                  if any("bg_cpu_s" in x for x in rr)]
            if bg:
                row["bg_cpu_s_per_save"] = statistics.mean(bg)
            flags = [x["ackpt"]["helper_flags"] for rr in meas for x in rr if x.get("ackpt")]
            if flags:
                row["helper_flags"] = flags[-1]
        return row

    def limits(self, size, micro_mod, when):
        d = os.path.join(self.tmp, "limits")
        os.makedirs(d, exist_ok=True)
        mib = size // MiB
        out = {}
        try:
            if when == "start":
                sb = micro_mod.stage_bench(d, mib, 0, False)
                out["memcpy_s"] = sb["memcpy_s"]
                out["memcpy_gib_s"] = size / GiB / sb["memcpy_s"]
            out["fio_direct_mib_s"] = micro_mod.fio(d, mib, 1)
            out["fio_buffered_mib_s"] = micro_mod.fio(d, mib, 0)
        except Exception as e:
            out["error"] = str(e)
        shutil.rmtree(d, ignore_errors=True)
        return out

    def barrier_latency(self):
        """Barrier latency comes from bench/barrier_latency, the barrier
        issue's own benchmark, once that is committed; until then the result
        says it is not available."""
        prog = os.path.join(HERE, "barrier_latency")
        tracked = subprocess.run(["git", "-C", REPO, "ls-files", "--error-unmatch", "bench/barrier_latency"],
                                 capture_output=True).returncode == 0
        if self.args.no_barrier or not (tracked and os.access(prog, os.X_OK)):
            return None
        self.progress("barrier latency at 16/256/1024 participants (bench/barrier_latency)")
        out = os.path.join(self.tmp, "barrier.json")
        try:
            p = subprocess.run([sys.executable, prog, "--sizes", "1,16,256,1024", "--json", out],
                               capture_output=True, text=True, timeout=300, cwd=REPO)
            data = json.load(open(out)) if os.path.exists(out) else None
            return {"source": "bench/barrier_latency", "rc": p.returncode, "table": p.stdout[-4000:],
                    "json": data}
        except Exception as e:
            return {"source": "bench/barrier_latency", "error": str(e)}

    def upload(self):
        """The upload row (bench/upload): ackpt-run --upload against boto3's
        upload_file on a moto S3 server; skipped, saying why, without moto."""
        a = self.args
        try:
            mod = load_script("upload")
        except Exception as e:
            log("bench/run: upload row skipped: bench/upload cannot be loaded (%s)" % e)
            return {"skipped": "bench/upload cannot be loaded (%s)" % e}
        why = mod.moto_problem()
        if why:
            log("bench/run: upload row skipped: %s" % why)
            return {"skipped": why}
        self.progress("upload: %d MiB to a moto S3 server, ackpt-run --upload vs boto3 upload_file, %d reps "
                      "(bench/upload)" % (a.upload_mib, a.upload_reps))
        d = os.path.join(self.tmp, "upload")
        try:
            return mod.measure(d, a.upload_mib, a.upload_reps, log=lambda x: self.progress("upload: " + x),
                               logdir=self.logdir)
        except Exception as e:
            return {"error": "%s: %s" % (type(e).__name__, e)}
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def train_loop(self):
        """bench/train_loop, twice (the state dict saved into an open file
        and fsynced; torch.save to a path, then reopen, fsync, close): K
        saves with compute between, each system's first save included,
        ackpt with its default staging."""
        a = self.args
        size = a.train_size or ("4G" if mem_available() >= 18 * GiB else "1G")
        out = {"size": size, "saves": a.train_saves, "compute_s": 3.0}
        d = os.path.join(self.tmp, "train")
        for variant in ("same-fd", "reopen"):
            self.progress("training loop (%s): %d saves of a %s state dict, 3 s of compute between, sync "
                          "and ackpt with default staging (bench/train_loop)" % (variant, a.train_saves, size))
            js = os.path.join(self.logdir, "train-%s.json" % variant)
            argv = [sys.executable, os.path.join(HERE, "train_loop"), "--size", size, "--saves",
                    str(a.train_saves), "--compute", "3", "--dir", d, "--systems", "sync,ackpt",
                    "--json", js] + (["--reopen"] if variant == "reopen" else [])
            try:
                r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   timeout=a.timeout * 10)
                if r.returncode != 0:
                    out[variant] = {"error": "exit %d: %s" % (r.returncode, r.stdout[-1500:])}
                else:
                    with open(js) as f:
                        out[variant] = json.load(f)
            except Exception as e:
                out[variant] = {"error": "%s: %s" % (type(e).__name__, e)}
            finally:
                shutil.rmtree(d, ignore_errors=True)
        return out

    def run(self):
        a = self.args
        micro_mod = load_micro()
        only_upload = a.only == "upload"
        plan = [(s, f) for s in a.sizes for f in a.formats if s <= GiB or f in a.large_formats]
        if only_upload:
            plan, a.sizes = [], []
        self.total_saves = sum(len(systems_for(f, not a.no_nvrx)) * (a.rounds + 1) for s, f in plan)
        self.plan = plan
        res = {"mode": "upload only" if only_upload else "quick" if a.quick else "full",
               "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
               "machine": machine(self.tmp),
               "config": {"sizes": [fmt_size(s) for s in a.sizes], "formats": a.formats,
                          "measured_saves": a.rounds, "warmup_saves": 1, "idle_s": a.idle_s,
                          "staging": "1.25 x the per-rank checkpoint size",
                          "compute_loop": "numpy fp32 256x256 matmul, 1 BLAS thread",
                          "dir": self.tmp},
               "barrier_latency": {"16": BARRIER_NA, "256": BARRIER_NA, "1024": BARRIER_NA}}
        res["config"]["large_formats"] = a.large_formats
        self.sampler.start()
        lim = {}
        for s in a.sizes:
            self.progress("limits at %s: warm memcpy, fio O_DIRECT and buffered" % fmt_size(s))
            lim[fmt_size(s)] = {"start": self.limits(s, micro_mod, "start")}
        if not a.no_micro and not only_upload:
            self.progress("micro: raw write() of %d MiB, plain and under ackpt (bench/micro)" % a.micro_mib)
            d = os.path.join(self.tmp, "micro")
            os.makedirs(d, exist_ok=True)
            try:
                m = micro_mod.measure(d, a.micro_mib, a.micro_rounds, log=lambda x: self.progress("micro: " + x))
                m.pop("raw", None)
                res["micro"] = m
            except Exception as e:
                res["micro"] = {"error": str(e)}
            shutil.rmtree(d, ignore_errors=True)
        for s, f in plan:
            self.run_cell(s, f)
        if not only_upload:
            res["barrier_latency"] = self.barrier_latency() or res["barrier_latency"]
        if not a.no_upload:
            res["upload"] = self.upload()
        if not a.no_train and not only_upload:
            res["train_loop"] = self.train_loop()
        for s in a.sizes:
            self.progress("limits at %s again (drift check)" % fmt_size(s))
            lim[fmt_size(s)]["end"] = self.limits(s, micro_mod, "end")
        for k, v in lim.items():
            st, en = v["start"], v.get("end", {})
            for key in ("fio_direct_mib_s", "fio_buffered_mib_s"):
                vals = [x[key] for x in (st, en) if x.get(key)]
                v[key] = statistics.mean(vals) if vals else None
            v["memcpy_s"] = st.get("memcpy_s")
            v["memcpy_gib_s"] = st.get("memcpy_gib_s")
        res["limits"] = lim
        res["results"] = self.results
        res["targets"] = targets(res)
        res["duration_s"] = time.monotonic() - self.t_start
        res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        self.sampler.stop.set()
        return res


# ---------------------------------------------------------------- analysis

def find(res, size, fmt, system):
    for r in res["results"]:
        if r["size"] == size and r["format"] == fmt and r["system"] == system and r["status"] == "ok":
            return r
    return None


def targets(res):
    t = []

    def add(name, where, value, goal, ok, gap):
        t.append({"target": name, "where": where, "measured": value, "goal": goal,
                  "met": ok, "gap": None if ok else gap})

    m = res.get("micro", {})
    if "ackpt_warm_stall_s" in m:
        r = m["ackpt_warm_stall_s"] / m["memcpy_s"]
        add("raw write() stall / memcpy", "%d MiB, C microbench" % m["size_mib"], "%.2fx" % r, "<= 1.5x",
            r <= 1.5, "%.2fx over (%.0f ms vs %.0f ms allowed)" % (r / 1.5, 1e3 * m["ackpt_warm_stall_s"],
                                                                   1.5e3 * m["memcpy_s"]))
        r = m["ackpt_warm_stall_s"] / m["sync_write_fsync_s"]
        add("raw write() stall / sync write+fsync", "%d MiB" % m["size_mib"], "%.3fx" % r, "<= 0.1x",
            r <= 0.1, "%.1fx over" % (r / 0.1))
        if m.get("fio_direct_mib_s"):
            r = m["ackpt_write_rate_mib_s"] / m["fio_direct_mib_s"]
            add("ackpt write rate / fio O_DIRECT", "%d MiB raw write" % m["size_mib"],
                "%.0f%% (%.0f of %.0f MiB/s)" % (100 * r, m["ackpt_write_rate_mib_s"], m["fio_direct_mib_s"]),
                ">= 80%", r >= 0.8, "%.0f points short" % (100 * (0.8 - r)))
        v = m["fastpath_overhead_ns"]
        add("untracked fast path overhead", "4 KiB write() to an unmanaged file", "%+.1f ns" % v,
            "<= 50 ns", v <= 50, "%.0f ns over" % (v - 50))
        for key, what in (("small", "4 KiB"), ("tiny", "64 B")):
            if m.get("%s_write_ns_ackpt" % key):
                a, p = m["%s_write_ns_ackpt" % key], m["%s_write_ns_plain" % key]
                r = a / p
                add("small write / plain write()", "%s write() to a managed file" % what,
                    "%.2fx (%.0f vs %.0f ns)" % (r, a, p), "<= 0.5x", r <= 0.5,
                    "%.0f ns over" % (a - 0.5 * p))
    wt = m.get("writer_threads")
    if wt:
        n, lim = wt["threads"], wt["memcpy1_s"] / wt["memcpyn_s"]
        r = wt["stall1_nosplit_s"] / wt["stalln_nosplit_s"]
        goal = min(n, lim)
        # within a tenth of what memcpy itself gains from the extra threads
        add("writer threads' staging rate / one thread's",
            "%d threads, one file each, %d MiB in 8 MiB writes, no split copy" % (n, m["size_mib"]),
            "%.2fx" % r, ">= %.2fx (memcpy's own %d-thread scaling, at most %dx)" % (0.9 * goal, n, n),
            r >= 0.9 * goal, "%.2fx short" % (0.9 * goal - r))
    u = res.get("upload") or {}
    where = "%s MiB, %s MiB parts, concurrency %s, moto S3 server on the same cores" % (
        u.get("size_mib"), u.get("part_mib"), u.get("concurrency"))
    if "upload_rate_ratio" in u:
        r = u["upload_rate_ratio"]
        add("upload rate, ackpt vs boto3 upload_file, same part size and concurrency", where,
            "%.2fx (%.0f vs %.0f MiB/s)" % (r, u["upload_mib_s"], u["boto3_mib_s"]), ">= 1.0x", r >= 1.0,
            "%.2fx short (%.2f s vs %.2f s)%s" % (1 / r, u["upload_s"], u["boto3_s"],
                                               "" if "upload_rate_ratio_nocrc" not in u else
                                               "; %.2fx against boto3 without a checksum"
                                               % u["upload_rate_ratio_nocrc"]))
    if "busy_stall_ratio" in u:
        r = u["busy_stall_ratio"]
        add("save stall with uploads running vs without (ackpt --upload / ackpt)",
            "%s MiB write+fsync+close while the previous save uploads (objects pending then: %s)"
            % (u.get("size_mib"), ", ".join(str(x) for x in u.get("uploads_pending_in_busy_save", []))),
            "%.2fx (%.3f s vs %.3f s)" % (r, u["stall_upload"]["second_s"], u["stall_ackpt"]["second_s"]),
            "~1.0x (<= 1.1x)", r <= 1.1, "%.2fx over" % (r / 1.1))
    tl = res.get("train_loop") or {}
    for variant, what in (("same-fd", "state dict saved into an open file, fsync"),
                          ("reopen", "torch.save(sd, path), reopen, fsync, close")):
        v = tl.get(variant) or {}
        st = v.get("stalls") or {}
        if st.get("sync") and st.get("ackpt"):
            ratios = [x / y for x, y in zip(st["ackpt"], st["sync"]) if y]
            worst = max(ratios)
            add("training loop: stall per save / synchronous (worst save, the first included)",
                "%d saves of %s, %s, default staging" % (len(st["ackpt"]), tl.get("size"), what),
                "%.2fx (per save: %s)" % (worst, ", ".join("%.2f" % r for r in ratios)), "<= 1.0x",
                worst <= 1.0, "%.2fx over" % worst)
    sizes = res["config"]["sizes"]
    for size in sizes:
        for fmt in res["config"]["formats"]:
            a, fl = find(res, size, fmt, "ackpt"), find(res, size, fmt, "floor")
            where = "%s, %s" % (workload.FORMAT_LABEL[fmt], size)
            if a and fl and "stall_p50_s" in a and "stall_p50_s" in fl:
                r = a["stall_p50_s"] / fl["stall_p50_s"]
                add("framework save stall / floor (tmpfs, no fsync)", where, "%.2fx" % r, "<= 1.2x", r <= 1.2,
                    "%.2fx over (%.3f s vs %.3f s allowed)" % (r / 1.2, a["stall_p50_s"], 1.2 * fl["stall_p50_s"]))
            sy = find(res, size, fmt, "sync")
            if a and sy and "stall_p50_s" in a and "stall_p50_s" in sy:
                # never slower than without ackpt: stall and time to durable
                for key, what in (("stall", "stall"), ("durable", "time to durable")):
                    va = max(a[key + "_max_s"], a.get("first_%s_s" % key) or 0)
                    vs = sy[key + "_p50_s"]
                    r = va / vs
                    add("%s (worst save, the first included) / synchronous p50" % what, where,
                        "%.2fx (%.3f s vs %.3f s)" % (r, va, vs), "<= 1.0x", r <= 1.0,
                        "%.2fx over" % r)
                    # the same save without ackpt: each system's first save
                    # also pays for its own warm-up (allocator, page cache,
                    # DCP's planning, gloo), which the p50 leaves out
                    fa, fs = a.get("first_%s_s" % key), sy.get("first_%s_s" % key)
                    if fa and fs:
                        r = fa / fs
                        add("first save's %s / synchronous first save's" % what, where,
                            "%.2fx (%.3f s vs %.3f s)" % (r, fa, fs), "<= 1.0x", r <= 1.0,
                            "%.2fx over" % r)
            fio = (res.get("limits", {}).get(size) or {}).get("fio_direct_mib_s")
            if a and fio and a.get("durable_rate_mib_s"):
                r = a["durable_rate_mib_s"] / fio
                gap = "%.0f points short" % (100 * (0.9 - r))
                if a.get("size_bytes") and a.get("stall_p50_s") and a.get("durable_p50_s"):
                    # durable cannot come before the program's last write:
                    # how fast the save itself produced its bytes, and how
                    # long after it returned they were durable
                    own = a["size_bytes"] / 2 ** 20 / a["stall_p50_s"]
                    gap += "; the save itself ran at %.0f MiB/s (%.0f%% of fio), durable %.0f ms after " \
                           "it returned" % (own, 100 * own / fio,
                                            1e3 * (a["durable_p50_s"] - a["stall_p50_s"]))
                add("durable rate (size / time to durable) / fio O_DIRECT", where,
                    "%.0f%% (%.0f of %.0f MiB/s)" % (100 * r, a["durable_rate_mib_s"], fio), ">= 90%",
                    r >= 0.9, gap)
            if a and a.get("bg_cpu_s_per_save") is not None and a.get("size_bytes"):
                v = a["bg_cpu_s_per_save"] / (a["size_bytes"] / 2 ** 30)
                add("helper CPU seconds per GiB written", where, "%.2f s/GiB" % v, "reported", True, None)
            if a and "interference_pct" in a:
                v = a["interference_pct"]
                add("interference (compute loop slow-down while persisting)", where, "%.1f%%" % v, "<= 10%",
                    v <= 10, "%.1f points over" % (v - 10))
            if fmt.startswith("dcp") and a and "stall_p50_s" in a:
                peers = [p for p in (find(res, size, fmt, s) for s in ("dcp-thread", "dcp-process"))
                         if p and "stall_p50_s" in p]
                if peers:
                    best = min(peers, key=lambda p: p["stall_p50_s"])
                    ok = a["stall_p50_s"] <= best["stall_p50_s"]
                    add("stall vs best DCP async_save", where + " (best: %s)" % best["system"],
                        "%.3f s vs %.3f s" % (a["stall_p50_s"], best["stall_p50_s"]), "<=", ok,
                        "%.2fx the peer's stall" % (a["stall_p50_s"] / best["stall_p50_s"]))
                    ok = a["durable_p50_s"] <= best["durable_p50_s"]
                    add("time to durable vs that DCP async_save", where,
                        "%.3f s vs %.3f s" % (a["durable_p50_s"], best["durable_p50_s"]), "<=", ok,
                        "%.2fx the peer's time" % (a["durable_p50_s"] / best["durable_p50_s"]))
    return t


# ---------------------------------------------------------------- output

def f3(v, unit=" s"):
    return "-" if v is None else "%.3f%s" % (v, unit)


def interference_cell(r):
    if "interference_pct" in r:
        return "%.1f%%" % r["interference_pct"]
    if "busy_s_per_save" in r:
        return "n/a (durable %.0f ms after return)" % (1e3 * r["busy_s_per_save"])
    return "-"


def table_rows(res):
    rows = []
    for r in res["results"]:
        if r["status"] != "ok":
            rows.append([r["size"], r["format_label"], r["system_label"], "ERROR: " + r["error"][:400]]
                        + [""] * 8)
            continue
        rows.append([
            r["size"], r["format_label"], r["system_label"],
            f3(r.get("first_stall_s")),
            f3(r.get("stall_p50_s")), f3(r.get("stall_max_s")),
            f3(r.get("durable_p50_s")), f3(r.get("durable_max_s")),
            interference_cell(r),
            "-" if "peak_rss_mib" not in r else "%.0f / %.0f" % (r["peak_rss_mib"], r["peak_pss_mib"]),
            "-" if "bg_cpu_s_per_save" not in r else "%.2f" % r["bg_cpu_s_per_save"],
            str(r.get("measured_saves", 0)),
        ])
    return rows


HEAD = ["size", "format", "system", "first save stall", "stall p50", "stall max", "durable p50",
        "durable max", "interference", "peak RSS / PSS MiB", "bg CPU s/save", "saves"]


def markdown(res):
    L = []
    mc = res["machine"]
    if res["mode"] == "upload only":
        L.append("Mode: upload only; started %s; took %.0f s." % (res["started"], res["duration_s"]))
    else:
        L.append("Mode: %s; %d measured saves per system after one warm-up save; started %s; took %.0f s."
                 % (res["mode"], res["config"]["measured_saves"], res["started"], res["duration_s"]))
    L.append("")
    L.append("Machine: %s, %d cores, %.0f GiB RAM; %s, kernel %s; checkpoint directory on %s (%s); "
             "torch %s, safetensors %s, nvidia-resiliency-ext %s, %s."
             % (mc.get("cpu"), mc.get("cores"), mc.get("ram_gib"), mc.get("os"), mc.get("kernel"),
                mc.get("filesystem"), mc.get("disk"), mc.get("torch"), mc.get("safetensors"),
                mc.get("nvidia_resiliency_ext"), mc.get("fio")))
    L.append("")
    L.append("ackpt at commit %s%s. Load average (1, 5, 15 min) at start %s, at end %s: the machine is "
             "shared, so other work ran beside this benchmark." % (
                 mc.get("ackpt"), "" if not mc.get("ackpt_uncommitted") else
                 " plus uncommitted edits to " + ", ".join(mc["ackpt_uncommitted"]),
                 " / ".join(mc.get("loadavg_start", [])), " / ".join(mc.get("loadavg_end", []))))
    L.append("")
    only_upload = res["mode"] == "upload only"
    if only_upload:
        L.append("Upload row only (`bench/run --only upload`): no saves, limits or micro benchmark in this run.")
        L.append("")
    if not only_upload:
        L.append("### Limits (same directory, same run)")
        L.append("")
        L.append("| size | warm memcpy | memcpy GiB/s | fio O_DIRECT MiB/s (start, end) | fio buffered MiB/s (start, end) |")
        L.append("| --- | --- | --- | --- | --- |")
        def n0(x):
            return "-" if x is None else "%.0f" % x

        for k, v in res["limits"].items():
            st, en = v["start"], v.get("end", {})
            L.append("| %s | %s | %s | %s (%s, %s) | %s (%s, %s) |" % (
                k, f3(v.get("memcpy_s")), "-" if not v.get("memcpy_gib_s") else "%.1f" % v["memcpy_gib_s"],
                n0(v.get("fio_direct_mib_s")), n0(st.get("fio_direct_mib_s")), n0(en.get("fio_direct_mib_s")),
                n0(v.get("fio_buffered_mib_s")), n0(st.get("fio_buffered_mib_s")), n0(en.get("fio_buffered_mib_s"))))
        L.append("")
        L.append("### Saves")
        L.append("")
        L.append("Stall: wall time inside the save call (DCP 2 ranks: the slower rank). Durable: from the start of "
                 "the save until data and metadata are durable (synchronous: the same as the stall; ackpt: until "
                 "`ackpt_wait` returns 0; DCP async: until the upload future resolves and the directory is "
                 "fsynced). Interference: how much slower a concurrent single-threaded matmul loop runs between "
                 "the save's return and durability than the same loop idle, just before. Peak RSS / PSS: summed "
                 "over every process of the system (ranks, torchrun, DCP's daemon, ackpt's helper); PSS counts "
                 "shared staging once. bg CPU: CPU seconds per save of ackpt's helper or DCP's daemon process.")
        L.append("")
        L.append("| " + " | ".join(HEAD) + " |")
        L.append("|" + " --- |" * len(HEAD))
        for row in table_rows(res):
            L.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
        L.append("")
        groups = []
        for r in res["results"]:
            if "interleaved_with" in r:
                g = "%s %s: %s" % (r["size"], workload.FORMAT_LABEL[r["format"]],
                                   ", ".join(sorted([r["system"]] + r["interleaved_with"], key=ORDER.index)))
                if g not in groups:
                    groups.append(g)
        if groups:
            L.append("Interleaved in one pass (workers that fit in memory side by side): " + "; ".join(groups) + ".")
            L.append("")
        bl = res.get("barrier_latency", {})
        if "source" in bl:
            L.append("Barrier latency (from %s, exit status %s):" % (bl["source"], bl.get("rc")))
            L.append("")
            L.append("```")
            L.append(bl.get("table") or bl.get("error", ""))
            L.append("```")
        else:
            L.append("Barrier latency at 16 / 256 / 1024 participants: %s." % BARRIER_NA)
        L.append("")
    m = res.get("micro")
    if m:
        L.append("### Micro: raw write() (bench/micro)")
        L.append("")
        if "error" in m:
            L.append("error: " + m["error"])
        else:
            L.append("| measure | value | ratio |")
            L.append("| --- | --- | --- |")
            for name, val, note in load_micro().report_rows(m):
                L.append("| %s | %s | %s |" % (name, val, note))
        L.append("")
    if "upload" in res:
        u = res["upload"]
        L.append("### Uploads to an object store (bench/upload)")
        L.append("")
        if "error" in u:
            L.append("error: " + u["error"])
        else:
            if "versions" in u:
                v = u["versions"]
                L.append("A moto S3 server (moto %s, werkzeug %s; a Python server on the same cores) on a loopback "
                         "port; boto3 %s; the helper's libcurl %s. %d repetition(s), alternating; medians; took %.0f s."
                         % (v.get("moto"), v.get("werkzeug"), v.get("boto3"), v.get("curl"), u.get("reps", 0),
                            u.get("duration_s", 0)))
                L.append("")
            L.append("| measure | value | note |")
            L.append("| --- | --- | --- |")
            for name, val, note in upload_rows(u):
                L.append("| %s | %s | %s |" % (name, val, note.replace("|", "/")))
        L.append("")
    if "train_loop" in res:
        tl = res["train_loop"]
        L.append("### A training loop (bench/train_loop)")
        L.append("")
        L.append("%s saves of a %s state dict in one process, 3 s of real compute between them; ackpt with "
                 "its default staging; the first save is included. Stall per save, seconds (ratio to the "
                 "synchronous save of the same index)." % (tl.get("saves"), tl.get("size")))
        L.append("")
        for variant, what in (("same-fd", "saved into an open file, then fsync"),
                              ("reopen", "`torch.save(sd, path)`, then reopen, fsync, close")):
            v = tl.get(variant) or {}
            if "error" in v:
                L.append("%s: error: %s" % (what, v["error"][:500]))
                L.append("")
                continue
            st = v.get("stalls") or {}
            n = len(st.get("sync", []))
            L.append("%s:" % what)
            L.append("")
            L.append("| system | " + " | ".join("save %d" % i for i in range(n)) + " |")
            L.append("| --- |" + " --- |" * n)
            for sysname, vals in st.items():
                cells = ["%.2f (%.2fx)" % (x, x / y) if y else "%.2f" % x
                         for x, y in zip(vals, st.get("sync", vals))]
                L.append("| %s | %s |" % (sysname, " | ".join(cells)))
            L.append("")
    L.append("### Targets")
    L.append("")
    L.append("| target | where | measured | goal | met | gap |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    for t in res["targets"]:
        L.append("| %s | %s | %s | %s | %s | %s |" % (t["target"], t["where"], t["measured"], t["goal"],
                                                      "yes" if t["met"] else "**no**", t["gap"] or ""))
    L.append("")
    return "\n".join(L)


def upload_rows(u):
    """(measure, value, note) rows of the upload row's result."""
    if "error" in u:
        return [("upload row", "error", u["error"])]
    if "skipped" in u:
        return [("upload row", "skipped", u["skipped"])]
    return load_script("upload").report_rows(u)


def print_table(res):
    if res["results"]:
        rows = [HEAD] + table_rows(res)
        rows = [[c if len(c) < 60 else c[:57] + "..." for c in r] for r in rows]
        w = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
        for i, r in enumerate(rows):
            print("  ".join(c.ljust(w[j]) for j, c in enumerate(r)))
            if i == 0:
                print("  ".join("-" * x for x in w))
        print()
    if "upload" in res:
        u = res["upload"]
        rows = upload_rows(u)
        w = max(len(r[0]) for r in rows)
        print("uploads to an object store (bench/upload):")
        for name, val, note in rows:
            print("  %-*s  %12s  %s" % (w, name, val, note))
        print()
    for t in res["targets"]:
        print("%-4s %s [%s]: %s (goal %s)%s" % ("ok" if t["met"] else "MISS", t["target"], t["where"],
                                                 t["measured"], t["goal"], "" if t["met"] else " -- " + t["gap"]))
    bl = res.get("barrier_latency", {})
    if "source" in bl:
        print("barrier latency (%s):" % bl["source"])
        print(bl.get("table") or bl.get("error", ""))
    elif res["mode"] != "upload only":
        print("barrier latency (16/256/1024 participants): " + BARRIER_NA)


def parse_size(s):
    s = s.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def main():
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB only (about 2 minutes)")
    ap.add_argument("--out", default=os.path.join(BUILD, "bench-results"),
                    help="where results.json, results.md and the plots go (default build/bench-results)")
    ap.add_argument("--tmp", default=os.path.join(BUILD, "bench-tmp"),
                    help="checkpoint directory on the storage to measure (default build/bench-tmp)")
    ap.add_argument("--sizes", help="comma-separated total checkpoint sizes, e.g. 256M,1G")
    ap.add_argument("--formats", help="comma-separated subset of " + ",".join(workload.FORMATS))
    ap.add_argument("--rounds", type=int, default=5, help="measured saves per system (default 5)")
    ap.add_argument("--idle-s", type=float, help="idle compute-loop time before each save")
    ap.add_argument("--micro-mib", type=int, help="raw write() size (default 1024; --quick 512)")
    ap.add_argument("--micro-rounds", type=int)
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--no-nvrx", action="store_true", help="skip nvidia-resiliency-ext")
    ap.add_argument("--no-barrier", action="store_true", help="skip the barrier latency step")
    ap.add_argument("--large-formats", default="torch,dcp1",
                    help="formats also run at sizes above 1 GiB (default torch,dcp1: at 4 GiB the "
                         "systems no longer fit side by side in 24 GiB, so each costs a separate pass)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--only", choices=("upload",),
                    help="run one optional section alone: upload (bench/upload, about 4 minutes)")
    ap.add_argument("--no-train", action="store_true",
                    help="skip the training-loop rows (bench/train_loop, about 5 minutes at 4 GiB)")
    ap.add_argument("--train-saves", type=int, default=4, help="saves per training-loop run (default 4)")
    ap.add_argument("--train-size", help="state dict size of the training loop (default 4G, or 1G with "
                    "less than 18 GiB of memory available)")
    ap.add_argument("--no-upload", action="store_true",
                    help="skip the upload row (it also runs only where moto[server] and boto3 import)")
    ap.add_argument("--upload-mib", type=int, default=1024,
                    help="file size of the upload row, MiB (default 1024: moto holds a whole object in "
                         "memory, several times over, to complete a multipart upload)")
    ap.add_argument("--upload-reps", type=int, default=3, help="repetitions of the upload row (default 3)")
    ap.add_argument("--timeout", type=float, default=120, help="base timeout per step, seconds")
    ap.add_argument("--nvrx-timeout", type=float, default=45,
                    help="timeout of an nvidia-resiliency-ext save, seconds (it hangs when its worker dies)")
    ap.add_argument("--mem-fraction", type=float, default=0.75,
                    help="share of available memory that side-by-side workers may use")
    a = ap.parse_args()
    if a.sizes:
        a.sizes = [parse_size(x) for x in a.sizes.split(",")]
    elif a.quick:
        a.sizes = [256 * MiB]
    else:
        a.sizes = [256 * MiB, GiB]
        # 4 GiB when the machine can hold it next to its copies and staging
        if mem_available() >= 18 * GiB:
            a.sizes.append(4 * GiB)
    a.formats = a.formats.split(",") if a.formats else list(workload.FORMATS)
    a.large_formats = a.large_formats.split(",")
    for f in a.formats:
        if f not in workload.FORMATS:
            ap.error("unknown format %s" % f)
    if a.idle_s is None:
        a.idle_s = 0.2 if a.quick else 0.5
    if a.micro_rounds is None:
        a.micro_rounds = 3 if a.quick else 5
    if a.micro_mib is None:
        a.micro_mib = 512 if a.quick else 1024
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    if a.only == "upload" and a.no_upload:
        ap.error("--only upload and --no-upload contradict each other")
    if a.upload_reps < 1:
        ap.error("--upload-reps must be >= 1")
    for p in (os.path.join(BUILD, "src", "shim", "libackpt.so"), os.path.join(BUILD, "bench", "stage_bench")):
        if not os.path.exists(p):
            sys.exit("bench/run: %s missing; build first (meson setup build && meson compile -C build)" % p)
    if not shutil.which("fio"):
        log("bench/run: fio not found; install it (Debian: apt-get install fio); fio rows will be empty")
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.tmp, exist_ok=True)
    fs = sh("stat -f -c %%T %s" % a.tmp)
    if fs in ("tmpfs", "ramfs"):
        log("bench/run: warning: %s is on %s, not on a disk" % (a.tmp, fs))
    h = Harness(a)

    def on_signal(sig, frame):
        raise SystemExit("bench/run: stopped by signal %d" % sig)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        res = h.run()
    finally:
        for w in list(h.live):
            w.kill()
            if w.shm:
                shutil.rmtree(w.shm, ignore_errors=True)
        shutil.rmtree(a.tmp, ignore_errors=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(res)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    if not a.no_plots and res["results"]:
        try:
            import plots

            for p in plots.plot_all(res, a.out):
                log("wrote " + p)
        except Exception as e:
            log("bench/run: plots skipped: %s" % e)
    print()
    print_table(res)
    print()
    print("wrote %s/results.json, %s/results.md (%.0f s)" % (a.out, a.out, res["duration_s"]))


if __name__ == "__main__":
    main()
