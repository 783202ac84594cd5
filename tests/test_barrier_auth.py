"""Who may take part in a barrier (docs/BARRIER.md, "Threat model").

Real coordinators (the helper of a real program under scripts/ackpt-run)
against attackers that know everything but the job's secret: the run id,
the address and the port.  The attackers speak the real protocol
(tests/barrier_progs/sim.py: the handshake, sealed frames) with guessed
secrets, replay and inject frames captured from legitimate connections, and
squat the coordinator's port before the job starts.
"""
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from barrierutil import (Committer, free_master_port, free_port, in_netns, job_env,
                         shimmed, sim, start_job, torchrun_argv, two_nodes)
from faultutil import need_shim


@pytest.fixture(autouse=True)
def _shim_required():
    need_shim()


def _fnv_token(s):
    """What the job token used to be: FNV-1a of "token|run id|host:port"
    (anyone could compute it)."""
    mask = (1 << 64) - 1
    a, b = 0xCBF29CE484222325, 0x84222325CBF29CE4
    for c in s.encode():
        a = ((a ^ c) * 0x100000001B3) & mask
        b = ((b ^ (c + 0x5B)) * 0x100000001B3) & mask
    return a.to_bytes(8, "little") + b.to_bytes(8, "little")


def _guesses(port):
    """Secrets an attacker who knows the run id, address and port can
    compute: the old derivations, the empty token, the run id."""
    out = [sim.secret_from_token(""), sim.secret_from_token("none"),
           sim.secret_from_token("|127.0.0.1:%d" % port)]
    for run_id in ("", "none"):
        t = _fnv_token("|%s|127.0.0.1:%d" % (run_id, port))
        out.append(t + t)
    return out


class _Manual:
    """A participant driven by the test: handshake with a secret, then
    sealed frames; every frame sent is kept (what a wiretap would see)."""

    def __init__(self, port, secret, rank):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.chan, self.welcome = sim.handshake(self.sock, secret, rank)
        self.rank = rank
        self.sent = []

    def send(self, type_, **kw):
        fr = self.chan.seal(sim.pack(type_, rank=self.rank, **kw))
        self.sent.append(fr)
        self.sock.sendall(fr)
        return fr

    def next_frame(self, timeout=10):
        self.sock.settimeout(timeout)
        f = self.chan.open(sim.recv_exact(self.sock, sim.SIZE))
        assert f is not None, "a frame from the coordinator failed its MAC"
        return f

    def wait_prepare(self, timeout=10):
        while True:
            f = self.next_frame(timeout)
            if f["type"] == sim.PREPARE:
                return f["id"]

    def closed_by_peer(self, timeout=5):
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(4096):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def _rejections(text):
    return re.findall(r"coordinator: rejected a peer \(claimed rank -?\d+\): ([^(]+)", text)


# --------------------------------------------------------------------------
# 1. An attacker who knows the run id, the address and the port
# --------------------------------------------------------------------------

def test_attacker_cannot_register_ack_nack_or_stall(tmp_path):
    """A real rank 0 (its helper hosts the coordinator) with three simulated
    participants that hold the job's random secret; one ACKs 0.5 s late, so
    every barrier has a window.  During five commits, attackers who know the
    run id, address and port but not the secret:
      - handshake with every secret they can compute, then send sealed ACKs
        with status EIO (a NACK), ACK 0, REQUEST and BYE frames;
      - send HELLO and a made-up PROOF followed by plain ACK/NACK frames;
      - hold 40 connections open after HELLO without a PROOF (a stall).
    None gets a WELCOME, every commit succeeds and waits for the late
    legitimate ACK (no forged ACK counted, no NACK aborted it), and the
    coordinator names each rejection."""
    port = free_port()
    secret = os.urandom(32)
    com = Committer(tmp_path / "ckpt", 4, port, 5, tmp_path / "logs", timeout_s=15,
                    secret=secret.hex())
    s = sim.Sim("127.0.0.1", port, 3, {0: "delay:0.5"}, secret=secret).start(timeout=30)
    stop = threading.Event()
    stats = {"handshakes": 0, "forged": 0, "welcomed": 0, "stalls": 0, "errors": 0}
    stalls = []

    def attack():
        guesses = _guesses(port)
        k = 0
        while not stop.is_set():
            bid = max(s.prepares) if s.prepares else 1
            try:
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:
                stats["errors"] += 1
                continue
            try:
                if k % 2 == 0:
                    g = guesses[(k // 2) % len(guesses)]
                    try:
                        ch, _ = sim.handshake(c, g, rank=1 + k % 3)
                        stats["welcomed"] += 1     # must never happen
                    except PermissionError:
                        # the coordinator proved a secret we do not have;
                        # answer as if we had it anyway
                        stats["handshakes"] += 1
                        hello = sim.hello_frame(1)
                        c2 = socket.create_connection(("127.0.0.1", port), timeout=5)
                        c2.sendall(hello)
                        chal = sim.recv_exact(c2, sim.SIZE)
                        ch = sim.Chan(g, hello, chal)
                        c2.sendall(sim.pack(sim.PROOF, mac=sim.proof(g, b"c", hello, chal)) +
                                   ch.seal(sim.pack(sim.ACK, id_=bid, status=5, rank=1)) +
                                   ch.seal(sim.pack(sim.ACK, id_=bid, rank=2)) +
                                   ch.seal(sim.pack(sim.REQUEST, arg=77, rank=1)) +
                                   ch.seal(sim.pack(sim.BYE, rank=3)))
                        got = b""
                        c2.settimeout(3)
                        try:
                            while True:
                                b = c2.recv(4096)
                                if not b:
                                    break
                                got += b
                        except OSError:
                            pass
                        frames = [sim.unpack(got[i:i + sim.SIZE])
                                  for i in range(0, len(got) - sim.SIZE + 1, sim.SIZE)]
                        if any(f["type"] == sim.WELCOME for f in frames):
                            stats["welcomed"] += 1
                        c2.close()
                else:
                    c.sendall(sim.hello_frame(2) + sim.pack(sim.PROOF, mac=os.urandom(16)) +
                              sim.pack(sim.ACK, id_=bid, status=5, rank=2) +
                              sim.pack(sim.ACK, id_=bid, rank=2))
                    stats["forged"] += 1
            except OSError:
                pass
            finally:
                c.close()
            k += 1
            time.sleep(0.01)

    try:
        for _ in range(40):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(sim.hello_frame(3))
            stalls.append(c)
        stats["stalls"] = len(stalls)
        th = threading.Thread(target=attack, daemon=True)
        th.start()
        results = [com.commit(timeout=60) for _ in range(5)]
        stop.set()
        th.join(30)
        summ = s.summary()
    finally:
        stop.set()
        for c in stalls:
            c.close()
        s.stop()
        rc = com.finish()
    print("attacks: %s; commits (s, errno): %s" % (stats, results))
    assert stats["welcomed"] == 0, "an attacker without the secret was welcomed"
    assert stats["handshakes"] > 0 and stats["forged"] > 0
    for dt, err in results:
        assert err == 0, "a commit failed under attack (errno %d)\n%s" % (err, com.stderr())
        assert dt >= 0.45, ("a commit finished %.3fs after its request, before the late legitimate "
                            "ACK (0.5 s): a forged ACK counted" % dt)
    assert summ["decisions"] == [] and summ["lost"] == [] and summ["bad_frames"] == 0, summ
    assert rc == 0, com.stderr()
    why = _rejections(com.stderr())
    assert any("does not know the job's secret" in w for w in why), com.stderr()


# --------------------------------------------------------------------------
# 2. Frames captured from a legitimate connection
# --------------------------------------------------------------------------

def test_captured_frames_are_rejected_when_replayed_or_injected(tmp_path):
    """Rank 0 is real; ranks 1 and 2 are the test's own participants (they
    know the secret).  A wiretap keeps what rank 1 sends.
      - Injected: during a barrier that rank 2 has not answered, rank 1's
        sealed ACK of that very barrier is sent on rank 2's connection.
        Accepted, it would count as rank 2's ACK and commit before rank 2's
        data is durable; it must be rejected, and the commit must not
        happen.
      - Replayed: rank 1's earlier sealed ACK sent again on its own
        connection is rejected (its sequence number is spent).
      - A captured HELLO and PROOF replayed on a new connection get no
        WELCOME: the coordinator's fresh nonce makes the old proof wrong."""
    port = free_port()
    secret = os.urandom(32)
    com = Committer(tmp_path / "ckpt", 3, port, 3, tmp_path / "logs", timeout_s=8,
                    secret=secret.hex())
    p1 = _Manual(port, secret, 1)
    p2 = _Manual(port, secret, 2)
    try:
        # a good commit first: both ACK
        com.go()
        for p in (p1, p2):
            bid = p.wait_prepare()
            p.send(sim.ACK, id_=bid)
        dt, err = com.commit(go=False)
        assert err == 0, com.stderr()
        first = (tmp_path / "ckpt" / "metadata.json").read_text()
        old_ack = p1.sent[-1]

        # injected: rank 1's ACK of this barrier, on rank 2's connection
        com.go()
        bid1, bid2 = p1.wait_prepare(), p2.wait_prepare()
        assert bid1 == bid2
        captured = p1.send(sim.ACK, id_=bid1)
        p2.sock.sendall(captured)
        assert p2.closed_by_peer(), "the injected frame did not get rank 2's connection closed"
        dt, err = com.commit(go=False, timeout=30)
        assert err != 0, ("the commit succeeded on a frame injected into rank 2's connection: "
                          "rank 2 never acknowledged")
        assert (tmp_path / "ckpt" / "metadata.json").read_text() == first

        # replayed on its own connection
        p1.sock.sendall(old_ack)
        assert p1.closed_by_peer(), "a replayed frame did not get the connection closed"

        # a captured handshake replayed on a new connection
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        hello = sim.hello_frame(1)
        ch_sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        ch_sock.sendall(hello)
        chal = sim.recv_exact(ch_sock, sim.SIZE)
        proof = sim.pack(sim.PROOF, mac=sim.proof(secret, b"c", hello, chal))
        ch_sock.close()     # the legitimate client went away before sending it
        c.sendall(hello + proof)
        c.settimeout(5)
        got = b""
        try:
            while True:
                b = c.recv(4096)
                if not b:
                    break
                got += b
        except OSError:
            pass
        c.close()
        types = [sim.unpack(got[i:i + sim.SIZE])["type"]
                 for i in range(0, len(got) - sim.SIZE + 1, sim.SIZE)]
        assert sim.WELCOME not in types, "a replayed handshake was welcomed"
    finally:
        p1.close()
        p2.close()
        com.kill()
    why = _rejections(com.stderr())
    print("rejections: %s" % why)
    assert sum("failed authentication" in w for w in why) >= 2, com.stderr()
    assert any("does not know the job's secret" in w for w in why), com.stderr()


# --------------------------------------------------------------------------
# 3. A fake coordinator squatting the port
# --------------------------------------------------------------------------

class _Squatter:
    """Listens on the coordinator's port before the job starts and answers
    like a coordinator that does not have the secret: a CHALLENGE with the
    secret's fingerprint (public: a real coordinator sends it to anyone)
    and a made-up proof, or with a guessed secret's fingerprint; right after
    it a WELCOME, a PREPARE and a 'commit' DECISION in the shape of the old
    protocol."""

    def __init__(self, port):
        self.srv = socket.create_server(("127.0.0.1", port))
        self.srv.settimeout(0.2)
        self.hellos = 0
        self.stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)
        self.th.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                c, _ = self.srv.accept()
            except OSError:
                continue
            try:
                c.settimeout(2)
                f = sim.unpack(sim.recv_exact(c, sim.SIZE))
                if f["type"] == sim.HELLO:
                    self.hellos += 1
                fp = sim.fingerprint(sim.TEST_SECRET if self.hellos % 2 else
                                     sim.secret_from_token(""))
                c.sendall(sim.pack(sim.CHALLENGE, id_=fp, tok=os.urandom(16), mac=os.urandom(16)) +
                          sim.pack(sim.WELCOME, id_=1) + sim.pack(sim.PREPARE, id_=1) +
                          sim.pack(sim.DECISION, id_=1, arg=1, status=0))
                time.sleep(0.5)
            except OSError:
                pass
            finally:
                c.close()

    def close(self):
        self.stop.set()
        self.th.join(5)
        self.srv.close()


def test_squatter_never_makes_a_rank_commit(tmp_path):
    """Something that speaks the protocol holds the coordinator's port when
    the job starts.  Rank 1 starts first and meets only the squatter: it
    says in one line that the listener does not prove it knows the secret,
    and keeps looking.  Rank 0's helper, finding the port taken, probes it
    with a real HELLO, gets no proof, listens on another port and publishes
    it in the job file (mode 0600, in the shared managed root).  Rank 1
    finds it there, and both ranks' commits go through the real barrier."""
    port = free_port()
    shared = tmp_path / "shared"
    shared.mkdir()
    sq = _Squatter(port)
    env = {"ACKPT_PATHS": str(shared)}  # ackpt-run appends --dir: the job file goes here
    r1 = r0 = None
    try:
        r1 = Committer(shared / "r1", 2, port, 2, tmp_path / "logs", timeout_s=30, rank=1,
                       secret=None, env=dict(env, ACKPT_SECRET=sim.TEST_SECRET_HEX), log="info")
        r1.go()
        time.sleep(2)
        r0 = Committer(shared / "r0", 2, port, 2, tmp_path / "logs", timeout_s=30, env=env,
                       log="info")
        jobfiles = []
        for _ in range(100):
            jobfiles = list(shared.glob(".ackpt-job.*"))
            if jobfiles:
                break
            time.sleep(0.1)
        assert jobfiles, "rank 0 published no job file\n" + r0.stderr()
        st = jobfiles[0].stat()
        res1 = [r1.commit(go=False, timeout=60)]
        r1.go()
        res1.append(r1.commit(go=False, timeout=60))
        res0 = [r0.commit(timeout=60) for _ in range(2)]
        rc1, rc0 = r1.finish(), r0.finish()
    finally:
        sq.close()
        for r in (r0, r1):
            if r is not None:
                r.kill()
    print("squatter saw %d HELLOs; rank 1 commits %s, rank 0 commits %s" % (sq.hellos, res1, res0))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid(), oct(st.st_mode)
    assert sq.hellos >= 2, "the squatter was never asked (the test did not test anything)"
    for dt, err in res1 + res0:
        assert err == 0, (r0.stderr(), r1.stderr())
    assert rc0 == 0 and rc1 == 0, (r0.stderr(), r1.stderr())
    moved = re.findall(r"port %d on \S+ is taken by a program that does not know the job's "
                       r"secret; listening on port (\d+) instead" % port, r0.stderr())
    assert len(moved) == 1, r0.stderr()
    said = [re.match(r"(\S+)\[(\d+)\]", ln).groups() for ln in r1.stderr().splitlines()
            if "does not prove it knows" in ln]
    assert ("ackpt-helper" in [w for w, _ in said] and
            len(said) == len(set(said))), "one line per process:\n" + r1.stderr()
    assert not list(shared.glob(".ackpt-job.*")), "the job file outlived the job"


def test_squatter_without_a_job_file_fails_loudly(tmp_path):
    """The same squatter, but no managed root to publish another port in
    (ACKPT_PATHS unset, the default name patterns): rank 0 says in one line
    that the port is taken and how to fix it, and its commit fails; nothing
    commits through the squatter."""
    port = free_port()
    sq = _Squatter(port)
    try:
        env = job_env(RANK=0, WORLD_SIZE=2, ACKPT_COORD="127.0.0.1:%d" % port,
                      ACKPT_SECRET=os.urandom(32).hex(), ACKPT_COMMIT="sync",
                      LD_PRELOAD=str(Path(job_env()["ACKPT_LIB"])))
        d = tmp_path / "ckpt"
        d.mkdir()
        prog = ("import os\n"
                "fd = os.open(%r, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
                "os.write(fd, b'{}')\n"
                "try:\n    os.close(fd)\n    print('closed')\n"
                "except OSError as e:\n    print('close errno', e.errno)\n"
                % str(d / "metadata.json"))
        import subprocess
        from conftest import VENV_PY
        p = subprocess.run([VENV_PY, "-c", prog], env=env, capture_output=True, text=True,
                           timeout=60)
    finally:
        sq.close()
    print(p.stdout, p.stderr)
    assert "close errno" in p.stdout, p.stdout + p.stderr
    assert not (d / "metadata.json").exists() or (d / "metadata.json").read_text() != "{}"
    lines = [ln for ln in p.stderr.splitlines() if "is taken by a program that does not know" in ln
             and "metadata commits will be aborted" in ln]
    assert len(lines) == 1 and "ACKPT_COORD" in lines[0], p.stderr
    assert len([ln for ln in p.stderr.splitlines() if "does not prove it knows" in ln]) <= 2, \
        "one line per process (helper, program) about the stranger, not one per lookup"


# --------------------------------------------------------------------------
# 4. Secrets: made by ackpt-run, shared through the job file, or none
# --------------------------------------------------------------------------

def test_two_nodes_with_their_own_ackpt_run_share_the_secret_through_the_file(tmp_path):
    """Multi-node torchrun, one `ackpt-run torchrun --nnodes 2` per node (two
    network and mount namespaces), so each node's ackpt-run makes its own
    secret.  Rank 0 publishes its secret in the job file in the shared
    managed root (mode 0600, owned by the job's user); node 1's helper and
    program processes find the coordinator holding another secret, read the
    file, and register.  DCP's .metadata is committed for every step and
    the checkpoint loads on every rank; the file is gone after the job."""
    import shutil
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    out = tmp_path / "ckpt"
    out.mkdir()
    seen = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for f in out.glob(".ackpt-job.*"):
                try:
                    st = f.stat()
                    seen[f.name] = (stat.S_IMODE(st.st_mode), st.st_uid,
                                    "secret " in f.read_text())
                except OSError:
                    pass
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    with two_nodes() as ((ns_a, addr_a), (ns_b, _addr_b)):
        port = free_master_port()
        jobs = []
        try:
            for node, ns, dev in ((0, ns_a, "ackptvA"), (1, ns_b, "ackptvB")):
                argv = shimmed(torchrun_argv(1, port, "read_your_writes.py", [out, "dcp"],
                                             nnodes=2, node_rank=node, master_addr=addr_a),
                               out, log="info")
                argv = ["unshare", "-m", "sh", "-c",
                        "mount -t tmpfs tmpfs /dev/shm && exec \"$@\"", "sh"] + argv
                jobs.append(start_job("node%d" % node, in_netns(ns, argv),
                                      job_env(GLOO_SOCKET_IFNAME=dev, TP_SOCKET_IFNAME=dev),
                                      tmp_path))
            for j in jobs:
                j.wait(240)
        finally:
            stop.set()
            for j in jobs:
                j.kill()
    th.join(5)
    for j in jobs:
        assert j.returncode == 0, j.describe()
    for step in (0, 1):
        assert (out / ("step%d" % step) / ".metadata").exists(), jobs[0].describe()
    assert seen, "no job file appeared in the shared root"
    for name, (mode, uid, has_secret) in seen.items():
        assert mode == 0o600 and uid == os.geteuid() and has_secret, (name, oct(mode), uid)
    assert not list(out.glob(".ackpt-job.*")), "the job file outlived the job"
    for j in jobs:
        assert "aborted" not in j.stderr(), j.describe()
        assert "does not prove" not in j.stderr(), j.describe()
    lines = sorted(ln for j in jobs for ln in j.stdout().splitlines() if ln.startswith("rank "))
    assert len(lines) == 4, lines


def test_no_secret_anywhere_one_line_and_no_commit(tmp_path):
    """A multi-rank job started without ackpt-run (LD_PRELOAD by hand), no
    ACKPT_JOB_TOKEN and no managed root to publish a secret in: rank 0 says
    so in one line naming the variables, and its metadata commit fails
    instead of going through a guessable token."""
    port = free_port()
    d = tmp_path / "ckpt"
    d.mkdir()
    env = job_env(RANK=0, WORLD_SIZE=2, ACKPT_COORD="127.0.0.1:%d" % port, ACKPT_COMMIT="sync",
                  LD_PRELOAD=job_env()["ACKPT_LIB"])
    prog = ("import os\n"
            "fd = os.open(%r, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
            "os.write(fd, b'{}')\n"
            "try:\n    os.close(fd)\n    print('closed')\n"
            "except OSError as e:\n    print('close errno', e.errno)\n" % str(d / "metadata.json"))
    import subprocess
    from conftest import VENV_PY
    p = subprocess.run([VENV_PY, "-c", prog], env=env, capture_output=True, text=True, timeout=60)
    print(p.stdout, p.stderr)
    assert "close errno" in p.stdout, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "has no secret" in ln and
             "metadata commits will be aborted" in ln]
    assert len(lines) == 1, p.stderr
    assert "ACKPT_JOB_TOKEN" in lines[0] and "ackpt-run" in lines[0], lines[0]


def test_a_made_secret_through_the_job_file(tmp_path):
    """Without ackpt-run's secret but with a managed root (LD_PRELOAD and
    ACKPT_PATHS by hand): rank 0 makes a random secret, publishes it in the
    job file, and rank 1 reads it there; both commit."""
    port = free_port()
    shared = tmp_path / "shared"
    shared.mkdir()
    lib = job_env()["ACKPT_LIB"]
    procs = []
    import subprocess
    from conftest import VENV_PY
    prog = ("import os, sys, time\n"
            "d = sys.argv[1]\n"
            "os.makedirs(d, exist_ok=True)\n"
            "with open(os.path.join(d, 'data.bin'), 'wb') as f:\n    f.write(os.urandom(1 << 20))\n"
            "fd = os.open(os.path.join(d, 'metadata.json'), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n"
            "os.write(fd, b'{}')\n"
            "try:\n    os.close(fd)\n    print('closed')\n"
            "except OSError as e:\n    print('close errno', e.errno)\n")
    for rank in (0, 1):
        env = job_env(RANK=rank, WORLD_SIZE=2, ACKPT_COORD="127.0.0.1:%d" % port,
                      ACKPT_COMMIT="sync", ACKPT_PATHS=str(shared), ACKPT_BARRIER_TIMEOUT=30,
                      LD_PRELOAD=lib)
        procs.append(subprocess.Popen([VENV_PY, "-c", prog, str(shared / ("r%d" % rank))],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    print(outs)
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0 and o.strip() == "closed", (o, e)
    for rank in (0, 1):
        assert (shared / ("r%d" % rank) / "metadata.json").read_text() == "{}"


def test_job_token_is_the_secret(tmp_path):
    """ACKPT_JOB_TOKEN, when set, is the secret (hashed): a participant with
    the same token registers and the commit goes through; one with another
    token sees a coordinator that cannot prove its secret to it."""
    port = free_port()
    tok = os.urandom(24).hex()
    com = Committer(tmp_path / "ckpt", 2, port, 1, tmp_path / "logs", timeout_s=15, secret=None,
                    env={"ACKPT_JOB_TOKEN": tok})
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(PermissionError):
            sim.handshake(c, sim.secret_from_token(tok + "x"), rank=1)
        c.close()
        s = sim.Sim("127.0.0.1", port, 1, job_token=tok).start(timeout=30)
        dt, err = com.commit()
        summ = s.summary()
        s.stop()
    finally:
        rc = com.finish()
    assert err == 0 and rc == 0, com.stderr()
    assert summ["prepares"] == 1 and summ["acks"] == 1, summ


def test_bad_secret_is_one_line_naming_the_variable(tmp_path):
    """ACKPT_SECRET that is not 64 hex digits: one line naming the variable
    (not its value), and the program runs as without ackpt."""
    import subprocess
    from conftest import VENV_PY
    env = job_env(ACKPT_SECRET="not-a-secret", LD_PRELOAD=job_env()["ACKPT_LIB"],
                  ACKPT_PATHS=str(tmp_path))
    p = subprocess.run([VENV_PY, "-c", "open(%r, 'w').write('x')" % str(tmp_path / "f")],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "ACKPT_SECRET" in lines[0], p.stderr
    assert "not-a-secret" not in p.stderr
    assert (tmp_path / "f").read_text() == "x"
