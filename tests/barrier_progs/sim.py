"""Simulated barrier participants for the ackpt coordinator.

Opens N TCP connections to the coordinator (rank 0's ackpt-helper), each
authenticating with the job's secret (HELLO, CHALLENGE, PROOF, WELCOME), and
answers every PREPARE with a sealed ACK.  Wire format: src/common/barrier.h
(72-byte little-endian frames); handshake and MACs: src/common/auth.c
(keyed BLAKE2b, which is hashlib.blake2b with key=).

Use as a module (Sim, Chan, handshake, pack, unpack, secret_from_token) or
from the command line:

  sim.py HOST:PORT N [--mode IDX=MODE ...] [--secret HEX | --job-token T]
         [--rank-base 1]
    The secret defaults to TEST_SECRET, which tests give the real program
    as ACKPT_SECRET.
    MODE per participant index (0-based; default "ack"):
      ack        answer PREPARE with ACK status 0
      eio        answer PREPARE with ACK status 5 (EIO)
      drop       close the connection (no BYE) on the first PREPARE
      delay:S    answer with ACK status 0 after S seconds
      silent     never answer
  Prints "READY <n>" once every participant got its WELCOME, one
  "DECISION <id> <arg> <status> <rank>" line per decision frame received,
  and a final JSON summary line when stdin reaches EOF (then it sends BYE
  on every connection still open and exits).
"""
import argparse
import hashlib
import json
import os
import resource
import selectors
import socket
import struct
import sys
import threading
import time

MAGIC = 0x42504B41
VERSION = 3
(HELLO, WELCOME, REQUEST, PREPARE, ACK, DECISION, BYE, NAME, QUERY, ANSWER, PROGRESS,
 CHALLENGE, PROOF) = range(1, 14)
OBSERVER = 1
FRAME = struct.Struct("<IHHQQii16sQ16s")
SIZE = FRAME.size
assert SIZE == 72
MAC_OFF = 56

MASK = (1 << 64) - 1
_ACK_TYPE = ACK.to_bytes(2, "little")

# the secret tests give the program as ACKPT_SECRET
TEST_SECRET_HEX = "5e" * 8 + "c2" * 8 + "e7" * 8 + "01" * 8
TEST_SECRET = bytes.fromhex(TEST_SECRET_HEX)


def _kh(size, key, *parts):
    h = hashlib.blake2b(digest_size=size, key=key or b"")
    for p in parts:
        h.update(p)
    return h.digest()


def secret_from_token(job_token):
    """The secret ACKPT_JOB_TOKEN stands for."""
    return _kh(32, None, b"ackpt-job-token\0", job_token.encode())


def fingerprint(secret):
    return int.from_bytes(_kh(16, secret, b"ackpt-fingerprint")[:8], "little")


def proof(secret, who, hello, chal):
    """who: b"s" the coordinator's proof, b"c" the client's."""
    return _kh(16, secret, who, hello, chal[:MAC_OFF] + b"\0" * 16)


def pack(type_, id_=0, arg=0, status=0, rank=0, tok=b"\0" * 16, magic=MAGIC, version=VERSION,
         seq=0, mac=b"\0" * 16):
    return FRAME.pack(magic, version, type_, id_ & MASK, arg & MASK, status, rank, tok,
                      seq & MASK, mac)


def unpack(b):
    magic, version, type_, id_, arg, status, rank, tok, seq, mac = FRAME.unpack(b)
    return {"magic": magic, "version": version, "type": type_, "id": id_, "arg": arg,
            "status": status, "rank": rank, "token": tok, "seq": seq, "mac": mac}


class Chan:
    """One authenticated connection's key and sequence numbers (side b"c")."""

    def __init__(self, secret, hello, chal, side=b"c"):
        self.key = _kh(32, secret, b"k", hello, chal)
        self.side = side
        self.tx = self.rx = 0

    def seal(self, frame):
        head = frame[:48] + struct.pack("<Q", self.tx)
        self.tx += 1
        return head + _kh(16, self.key, self.side, head)

    def open(self, frame):
        """The frame as a dict, or None when it fails its MAC or sequence."""
        other = b"s" if self.side == b"c" else b"c"
        if _kh(16, self.key, other, frame[:MAC_OFF]) != frame[MAC_OFF:SIZE]:
            return None
        f = unpack(frame[:SIZE])
        if f["seq"] != self.rx:
            return None
        self.rx += 1
        return f


def hello_frame(rank, observer=False):
    return pack(HELLO, arg=os.getpid(), status=OBSERVER if observer else 0, rank=rank,
                tok=os.urandom(16))


def recv_exact(sock, n):
    b = b""
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c:
            raise ConnectionError("closed by the peer after %d bytes" % len(b))
        b += c
    return b


def handshake(sock, secret, rank, observer=False, hello=None):
    """Authenticate a blocking socket both ways; returns (Chan, WELCOME dict).
    Raises PermissionError when the listener's proof is wrong."""
    hello = hello or hello_frame(rank, observer)
    sock.sendall(hello)
    chal = recv_exact(sock, SIZE)
    c = unpack(chal)
    if c["type"] != CHALLENGE:
        raise ConnectionError("expected CHALLENGE, got type %d" % c["type"])
    if c["id"] != fingerprint(secret) or proof(secret, b"s", hello, chal) != c["mac"]:
        raise PermissionError("the listener does not prove it knows the secret")
    sock.sendall(pack(PROOF, mac=proof(secret, b"c", hello, chal)))
    ch = Chan(secret, hello, chal)
    w = ch.open(recv_exact(sock, SIZE))
    if not w or w["type"] != WELCOME:
        raise ConnectionError("no valid WELCOME")
    return ch, w


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Part:
    __slots__ = ("idx", "rank", "sock", "buf", "mode", "welcomed", "open", "prepares", "acks",
                 "chan", "bad")

    def __init__(self, idx, rank, sock, mode):
        self.idx, self.rank, self.sock, self.mode = idx, rank, sock, mode
        self.buf = b""
        self.welcomed = False
        self.open = True
        self.prepares = 0
        self.acks = 0
        self.chan = None
        self.bad = 0            # frames that failed their MAC


class Sim:
    """n simulated participants.  start() connects and registers them (returns
    once all are welcomed); a background thread then answers PREPAREs until
    stop().  on_decision(frame dict) is called (in that thread) for each
    DECISION frame."""

    def __init__(self, host, port, n, modes=None, secret=None, job_token="", rank_base=1,
                 on_decision=None):
        self.host, self.port, self.n = host, port, n
        self.modes = modes or {}
        self.secret = secret or (secret_from_token(job_token) if job_token else TEST_SECRET)
        self.rank_base = rank_base
        self.on_decision = on_decision
        self.parts = []
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.decisions = []
        self.prepares = {}      # barrier id -> time first PREPARE was seen
        self.last_ack = {}      # barrier id -> time the last immediate ACK was sent
        self.dropped = []
        self.lost = []          # participants the coordinator closed on us
        self.timers = []        # (due, part, barrier id)
        self._stop = threading.Event()
        self._thread = None

    # -- setup --------------------------------------------------------
    def start(self, timeout=60.0):
        raise_nofile(self.n + 256)
        deadline = time.monotonic() + timeout
        for i in range(self.n):
            while True:
                try:
                    s = socket.create_connection((self.host, self.port), timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            p = _Part(i, self.rank_base + i, s, self.modes.get(i, "ack"))
            s.settimeout(max(1.0, deadline - time.monotonic()))
            p.chan, _ = handshake(s, self.secret, p.rank)
            p.welcomed = True
            s.setblocking(False)
            self.parts.append(p)
            self.sel.register(s, selectors.EVENT_READ, p)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self._poll(0.02)

    def _poll(self, timeout):
        now = time.monotonic()
        due = [t for t in self.timers if t[0] <= now]
        if due:
            self.timers = [t for t in self.timers if t[0] > now]
            for _, p, bid in due:
                if bid is None:
                    self._close(p)
                else:
                    self._send(p, p.chan.seal(pack(ACK, id_=bid, rank=p.rank)))
        for key, _ in self.sel.select(timeout):
            self._readable(key.data)

    def _send(self, p, frame):
        if not p.open:
            return
        try:
            n = p.sock.send(frame)   # 72 bytes: fits an empty socket buffer
            if n < len(frame):
                p.sock.setblocking(True)
                p.sock.sendall(frame[n:])
                p.sock.setblocking(False)
            if frame[6:8] == _ACK_TYPE:
                p.acks += 1
        except BlockingIOError:
            p.sock.setblocking(True)
            p.sock.sendall(frame)
            p.sock.setblocking(False)
        except OSError:
            self._close(p, lost=True)

    def _close(self, p, lost=False):
        if not p.open:
            return
        p.open = False
        try:
            self.sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        p.sock.close()
        if lost:
            self.lost.append(p.idx)

    def _readable(self, p):
        try:
            data = p.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(p, lost=True)
            return
        p.buf += data
        while len(p.buf) >= SIZE:
            f = p.chan.open(p.buf[:SIZE])
            p.buf = p.buf[SIZE:]
            if f is None:
                p.bad += 1
                self._close(p, lost=True)
                return
            self._frame(p, f)
            if not p.open:
                return

    def _frame(self, p, f):
        t = f["type"]
        if t == WELCOME:
            p.welcomed = True
        elif t == PREPARE:
            bid = f["id"]
            with self.lock:
                self.prepares.setdefault(bid, time.monotonic())
            p.prepares += 1
            mode = p.mode
            if mode == "ack":
                self._send(p, p.chan.seal(pack(ACK, id_=bid, rank=p.rank)))
                self.last_ack[bid] = time.monotonic()
            elif mode == "eio":
                self._send(p, p.chan.seal(pack(ACK, id_=bid, status=5, rank=p.rank)))
            elif mode == "drop":
                self.dropped.append(p.idx)
                self._close(p)
            elif mode.startswith("delay:"):
                self.timers.append((time.monotonic() + float(mode[6:]), p, bid))
            elif mode == "silent":
                pass
        elif t == DECISION:
            with self.lock:
                self.decisions.append(f)
            if self.on_decision:
                self.on_decision(f)

    def set_mode(self, idx, mode):
        """Change how participant idx answers from now on."""
        self.parts[idx].mode = mode

    def drop(self, idx):
        """Close participant idx's connection now, without a BYE."""
        p = self.parts[idx]
        self.dropped.append(idx)
        if self._thread:
            # the loop thread owns the selector: let it do the close
            self.timers.append((0, p, None))
        else:
            self._close(p)

    # -- teardown ------------------------------------------------------
    def stop(self, bye=True):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        for p in self.parts:
            if p.open:
                if bye:
                    try:
                        p.sock.setblocking(True)
                        p.sock.sendall(p.chan.seal(pack(BYE, rank=p.rank)))
                    except OSError:
                        pass
                self._close(p)
        self.sel.close()

    def summary(self):
        return {"n": self.n, "welcomed": sum(p.welcomed for p in self.parts),
                "prepares": sum(p.prepares for p in self.parts),
                "acks": sum(p.acks for p in self.parts),
                "decisions": [(d["id"], d["arg"], d["status"], d["rank"]) for d in self.decisions],
                "dropped": self.dropped, "lost": self.lost,
                "bad_frames": sum(p.bad for p in self.parts)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("coord")
    ap.add_argument("n", type=int)
    ap.add_argument("--mode", action="append", default=[])
    ap.add_argument("--secret", default="")
    ap.add_argument("--job-token", default="")
    ap.add_argument("--rank-base", type=int, default=1)
    a = ap.parse_args()
    host, port = a.coord.rsplit(":", 1)
    modes = {}
    for m in a.mode:
        k, v = m.split("=", 1)
        modes[int(k)] = v

    def show(f):
        sys.stdout.write("DECISION %d %d %d %d\n" % (f["id"], f["arg"], f["status"], f["rank"]))
        sys.stdout.flush()

    sim = Sim(host, int(port), a.n, modes, bytes.fromhex(a.secret) if a.secret else None,
              a.job_token, a.rank_base, on_decision=show)
    sim.start()
    print("READY %d" % a.n, flush=True)
    sys.stdin.read()
    sim.stop()
    print(json.dumps(sim.summary()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
