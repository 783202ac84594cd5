"""Helpers for test_barrier.py (and bench/barrier_latency): torchrun jobs
under scripts/ackpt-run, observers without the shim, the simulated
participants, network namespaces.

Every job carries ACKPT_TEST_MARK=<uuid> in its environment, so its
processes (rank processes, their ackpt-helpers) are found in /proc.
"""
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import HELPER, LIB, REPO, VENV_PY, _base_env
from faultutil import helper_pids, kill_marked

BPROGS = REPO / "tests" / "barrier_progs"
LAUNCHER = Path(os.environ.get("ACKPT_TEST_LAUNCHER", str(REPO / "scripts" / "ackpt-run")))
TORCHRUN = str(Path(VENV_PY).parent / "torchrun")
COORD_PORT_OFFSET = 2719  # src/common/barrier.h

if str(BPROGS) not in sys.path:
    sys.path.insert(0, str(BPROGS))

import sim  # noqa: E402  (tests/barrier_progs/sim.py)


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

def coord_port(master_port):
    """The coordinator port ackpt derives from torchrun's MASTER_PORT."""
    return (master_port + COORD_PORT_OFFSET - 1024) % (65536 - 1024) + 1024


def _port_free(port, host="0.0.0.0"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_used_ports = set()


def free_port():
    """A free TCP port not handed out before in this session."""
    for _ in range(200):
        s = socket.socket()
        s.bind(("0.0.0.0", 0))
        p = s.getsockname()[1]
        s.close()
        if p not in _used_ports:
            _used_ports.add(p)
            return p
    raise RuntimeError("no free port")


def free_master_port():
    """A MASTER_PORT whose derived coordinator port is free as well."""
    for _ in range(200):
        p = free_port()
        if p < 60000 and _port_free(coord_port(p)) and coord_port(p) not in _used_ports:
            _used_ports.add(coord_port(p))
            return p
    raise RuntimeError("no free master port")


# --------------------------------------------------------------------------
# Environments and jobs
# --------------------------------------------------------------------------

def job_env(mark=None, **extra):
    """A clean environment (no LD_PRELOAD, no ACKPT_* from the caller) with the
    marker; extra values of None remove the variable."""
    env = _base_env()
    env["ACKPT_TEST_MARK"] = mark or uuid.uuid4().hex
    env["ACKPT_HELPER"] = str(HELPER)
    env["ACKPT_LIB"] = str(LIB)
    env["PYTHONWARNINGS"] = "ignore"
    for k in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "RANK",
              "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def shimmed(argv, managed, staging="256M", commit=None, log=None):
    """argv wrapped in scripts/ackpt-run --dir managed."""
    pre = [str(LAUNCHER), "--dir", str(managed), "--staging", staging]
    if commit:
        pre += ["--commit", commit]
    if log:
        pre += ["--log", log]
    return pre + ["--"] + [str(a) for a in argv]


def torchrun_argv(nproc, master_port, script, args, nnodes=1, node_rank=0, master_addr="127.0.0.1"):
    argv = [TORCHRUN, "--nnodes", str(nnodes), "--node-rank", str(node_rank),
            "--master-addr", master_addr, "--master-port", str(master_port),
            "--nproc-per-node", str(nproc), "--monitor-interval", "0.1",
            str(BPROGS / script)]
    return argv + [str(a) for a in args]


EVENT_RE = re.compile(r"^EVENT (\S+) rank=(\d+) (\S+) ?(.*)$", re.M)


@dataclasses.dataclass
class Job:
    label: str
    argv: list
    env: dict
    proc: subprocess.Popen
    out: Path
    err: Path
    t0: float
    returncode: "int | None" = None
    seconds: float = 0.0

    @property
    def mark(self):
        return self.env["ACKPT_TEST_MARK"]

    def stdout(self):
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stderr(self):
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def events(self):
        """[(time, rank, name, detail)] from the EVENT lines so far."""
        return [(float(m.group(1)), int(m.group(2)), m.group(3), m.group(4).strip())
                for m in EVENT_RE.finditer(self.stdout())]

    def event(self, rank, name):
        for e in self.events():
            if e[1] == rank and e[2] == name:
                return e
        return None

    def wait_event(self, rank, name, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = self.event(rank, name)
            if e:
                return e
            if self.proc.poll() is not None:
                e = self.event(rank, name)
                if e:
                    return e
                pytest.fail("[%s] ended (status %s) before rank %d's %r event:\n%s"
                            % (self.label, self.proc.returncode, rank, name, self.describe()),
                            pytrace=False)
            time.sleep(0.01)
        self.kill()
        pytest.fail("[%s] no rank %d %r event within %.0fs:\n%s"
                    % (self.label, rank, name, timeout, self.describe()), pytrace=False)

    def wait(self, timeout, helpers_timeout=60.0):
        """Wait for the job (hard timeout: kill everything and fail), then for
        its helpers to exit.  Returns the exit status."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("[%s] HANG: still running after %.0fs:\n%s"
                        % (self.label, timeout, self.describe()), pytrace=False)
        self.seconds = time.monotonic() - self.t0
        _wait_gone(self.mark, helpers_timeout, self.label)
        return self.returncode

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in marked_pids(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kill_marked(self.mark)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def describe(self, tail=4000):
        def cut(s):
            return s if len(s) <= tail else "...[cut]...\n" + s[-tail:]
        return ("[%s] $ %s\n  exit status %s after %.1fs\n  --- stdout ---\n%s\n  --- stderr ---\n%s"
                % (self.label, " ".join(map(str, self.argv)), self.proc.returncode,
                   time.monotonic() - self.t0 if self.returncode is None else self.seconds,
                   cut(self.stdout()), cut(self.stderr())))

    def stderr_matching(self, pattern):
        return [ln for ln in self.stderr().splitlines() if re.search(pattern, ln)]


def start_job(label, argv, env, logdir, cwd=None, preexec=None):
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    out, err = logdir / ("%s.out" % label), logdir / ("%s.err" % label)
    argv = [str(a) for a in argv]
    with open(out, "wb") as fo, open(err, "wb") as fe:
        p = subprocess.Popen(argv, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                             cwd=str(cwd or logdir), start_new_session=True, preexec_fn=preexec)
    return Job(label, argv, env, p, out, err, time.monotonic())


def run_job(label, argv, env, logdir, timeout=120.0, **kw):
    j = start_job(label, argv, env, logdir, **kw)
    j.wait(timeout)
    return j


def marked_pids(mark, rank=None, exclude_helpers=True):
    """Live pids whose environment holds ACKPT_TEST_MARK=mark (and RANK=rank)."""
    needle = ("ACKPT_TEST_MARK=%s" % mark).encode()
    rk = ("RANK=%d" % rank).encode() if rank is not None else None
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                env = f.read().split(b"\0")
            with open("/proc/%d/comm" % pid) as f:
                comm = f.read().strip()
            with open("/proc/%d/stat" % pid) as f:
                st = f.read()
        except OSError:
            continue
        if needle not in env:
            continue
        if st[st.rfind(")") + 2:].split()[0] in ("Z", "X"):
            continue
        if exclude_helpers and comm == "ackpt-helper":
            continue
        if rk is not None and rk not in env:
            continue
        found.append(pid)
    return sorted(found)


def rank_python_pid(mark, rank):
    """The python process of a torchrun worker with RANK=rank (found by marker)."""
    pids = []
    for pid in marked_pids(mark, rank):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b".py") and b"barrier_progs" in c for c in cmd) and \
                not any(c.endswith(b"torchrun") for c in cmd):
            pids.append(pid)
    return pids


def rank_helper_pid(mark, rank):
    needle = ("RANK=%d" % rank).encode()
    out = []
    for pid in helper_pids(mark):
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                if needle in f.read().split(b"\0"):
                    out.append(pid)
        except OSError:
            pass
    return out


def _wait_gone(mark, timeout, label):
    """Wait until no process (helper or otherwise) with the marker is alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = marked_pids(mark, exclude_helpers=False)
        if not left:
            return
        if time.monotonic() > deadline:
            desc = []
            for p in left:
                try:
                    desc.append("%d %s" % (p, Path("/proc/%d/cmdline" % p).read_bytes()
                                           .replace(b"\0", b" ").decode(errors="replace")))
                except OSError:
                    pass
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail("[%s] processes still alive %.0fs after the job ended:\n  %s"
                        % (label, timeout, "\n  ".join(desc)), pytrace=False)
        time.sleep(0.05)


# --------------------------------------------------------------------------
# Checkers and observers (never under the shim)
# --------------------------------------------------------------------------

def dcp_check(dirs, world, mib, seed, timeout=120):
    """Load DCP checkpoints (one dir or a list) in a fresh process without the
    shim; returns {dir: {ok, bad, error, preloaded}} (a single dict for a
    single dir)."""
    single = isinstance(dirs, (str, os.PathLike))
    dirs = [str(dirs)] if single else [str(d) for d in dirs]
    r = subprocess.run([VENV_PY, str(BPROGS / "dcp_check.py"), str(world), str(mib), str(seed)]
                       + dirs, env=job_env(), capture_output=True, text=True, timeout=timeout)
    try:
        res = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {d: {"ok": False, "error": "checker output unparsable: %r %s"
                   % (r.stdout[-500:], r.stderr[-1500:]), "bad": [], "preloaded": None}
               for d in dirs}
    return res[dirs[0]] if single else res


class Observer:
    """tests/barrier_progs/observer.py in its own process, without the shim."""

    def __init__(self, mode, out, directory, arg, interval_ms=2.0, max_s=120.0):
        self.out = Path(out)
        self.p = subprocess.Popen([VENV_PY, str(BPROGS / "observer.py"), mode, str(out),
                                   str(directory), str(arg), "--interval-ms", str(interval_ms),
                                   "--max-s", str(max_s)],
                                  env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        line = self.p.stdout.readline()
        if line.strip() != "READY":
            self.p.kill()
            pytest.fail("observer did not start: %r %s" % (line, self.p.stderr.read()), pytrace=False)

    def stop(self, timeout=30):
        Path(str(self.out) + ".stop").touch()
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            pytest.fail("observer did not stop", pytrace=False)
        if self.p.returncode != 0 or not self.out.exists():
            pytest.fail("observer failed (%s): %s" % (self.p.returncode, self.p.stderr.read()),
                        pytrace=False)
        return json.loads(self.out.read_text())

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


# --------------------------------------------------------------------------
# The scale program + simulated participants
# --------------------------------------------------------------------------

class Committer:
    """tests/barrier_progs/committer.py under the shim as RANK=rank (default
    0: its helper hosts the coordinator) of a job of `world` ranks with
    ACKPT_COORD=127.0.0.1:port and ACKPT_COMMIT=sync.  exec_wrapper: start it
    as `bash -c 'exec python committer.py ...'` (a launcher script that
    execs the real program)."""

    def __init__(self, directory, world, port, count, logdir, data_kib=256, timeout_s=None,
                 log="warn", rank=0, exec_wrapper=False, secret=sim.TEST_SECRET_HEX, env=None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        extra = {"RANK": rank, "WORLD_SIZE": world, "ACKPT_COORD": "127.0.0.1:%d" % port,
                 "ACKPT_SECRET": secret}
        if timeout_s:
            extra["ACKPT_BARRIER_TIMEOUT"] = timeout_s
        extra.update(env or {})
        self.env = job_env(**extra)
        self.mark = self.env["ACKPT_TEST_MARK"]
        self.err = Path(logdir) / ("committer-%d-r%d.err" % (port, rank))
        self.err.parent.mkdir(parents=True, exist_ok=True)
        cmd = [VENV_PY, BPROGS / "committer.py", self.dir, count, "--data-kib", data_kib]
        if exec_wrapper:
            cmd = ["bash", "-c", 'echo "wrapper $$" >&2; exec "$0" "$@"'] + cmd
        argv = shimmed(cmd, self.dir, staging="32M", commit="sync", log=log)
        self.fe = open(self.err, "wb")
        self.p = subprocess.Popen(argv, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.fe, text=True, start_new_session=True)
        up = self._line(30)
        if not up.startswith("UP "):
            self.kill()
            pytest.fail("committer did not start: %r\n%s" % (up, self.stderr()), pytrace=False)

    def _line(self, timeout):
        import select
        if not select.select([self.p.stdout], [], [], timeout)[0]:
            self.kill()
            pytest.fail("committer: no output within %.0fs (hang?)\n%s" % (timeout, self.stderr()),
                        pytrace=False)
        return self.p.stdout.readline().strip()

    def go(self):
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def commit(self, timeout=60, go=True):
        """Let it do one commit; returns (seconds the close() took, errno)."""
        if go:
            self.go()
        line = self._line(timeout)
        m = re.match(r"COMMIT \d+ (\S+) (\d+)", line)
        if not m:
            self.kill()
            pytest.fail("committer: unexpected %r\n%s" % (line, self.stderr()), pytrace=False)
        return float(m.group(1)), int(m.group(2))

    def finish(self, timeout=60):
        """Close stdin; returns the exit status (after its helper is gone,
        which needs the simulated participants to have left)."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("committer did not exit within %.0fs\n%s" % (timeout, self.stderr()),
                        pytrace=False)
        self.fe.close()
        return rc

    def wait_helper_gone(self, timeout=30):
        _wait_gone(self.mark, timeout, "committer")

    def stderr(self):
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def kill(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kill_marked(self.mark)


# --------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------

NS_A, NS_B = "ackptA", "ackptB"
ADDR_A, ADDR_B = "10.231.0.1", "10.231.0.2"


def _ip(*args, check=True):
    r = subprocess.run(["ip"] + list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError("ip %s: %s" % (" ".join(args), r.stderr.strip()))
    return r


def netns_teardown():
    for ns in (NS_A, NS_B):
        _ip("netns", "del", ns, check=False)


@contextlib.contextmanager
def two_nodes():
    """Two network namespaces joined by a veth pair: ackptA (10.231.0.1/24)
    and ackptB (10.231.0.2/24).  Skips when that is impossible."""
    import shutil
    if shutil.which("ip") is None:
        pytest.skip("`ip` (iproute2) is not installed: cannot create network namespaces")
    netns_teardown()
    try:
        _ip("netns", "add", NS_A)
    except RuntimeError as e:
        pytest.skip("cannot create a network namespace (needs CAP_SYS_ADMIN/CAP_NET_ADMIN): %s" % e)
    try:
        try:
            _ip("netns", "add", NS_B)
            _ip("link", "add", "ackptvA", "netns", NS_A, "type", "veth", "peer", "name", "ackptvB",
                "netns", NS_B)
        except RuntimeError as e:
            pytest.skip("cannot create a veth pair between namespaces: %s" % e)
        for ns, dev, addr in ((NS_A, "ackptvA", ADDR_A), (NS_B, "ackptvB", ADDR_B)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        # reachability check (ping may be missing: use a TCP connect instead)
        yield (NS_A, ADDR_A), (NS_B, ADDR_B)
    finally:
        netns_teardown()


def in_netns(ns, argv):
    return ["ip", "netns", "exec", ns] + [str(a) for a in argv]
