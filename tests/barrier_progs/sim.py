"""Simulated barrier participants for the ackpt coordinator.

Opens N TCP connections to the coordinator (rank 0's ackpt-helper), each
sending a HELLO with the job token, and answers every PREPARE with an ACK.
Wire format: src/common/barrier.h (48-byte little-endian frames).

Use as a module (Sim, token, pack, unpack) or from the command line:

  sim.py HOST:PORT N [--mode IDX=MODE ...] [--job-token T] [--run-id R]
         [--rank-base 1]
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
import json
import resource
import selectors
import socket
import struct
import sys
import threading
import time

MAGIC = 0x42504B41
VERSION = 2
HELLO, WELCOME, REQUEST, PREPARE, ACK, DECISION, BYE, NAME, QUERY, ANSWER, PROGRESS = range(1, 12)
FRAME = struct.Struct("<IHHQQii16s")
assert FRAME.size == 48

MASK = (1 << 64) - 1
_ACK_TYPE = ACK.to_bytes(2, "little")


def token(job_token="", run_id="", host="127.0.0.1", port=0):
    """The 16-byte job token: two FNV-1a hashes of "tok|runid|host:port"."""
    s = ("%s|%s|%s:%d" % (job_token or "", run_id or "", host, port)).encode()
    a, b = 0xCBF29CE484222325, 0x84222325CBF29CE4
    for c in s:
        a = ((a ^ c) * 0x100000001B3) & MASK
        b = ((b ^ (c + 0x5B)) * 0x100000001B3) & MASK
    return a.to_bytes(8, "little") + b.to_bytes(8, "little")


def pack(type_, id_=0, arg=0, status=0, rank=0, tok=b"\0" * 16, magic=MAGIC, version=VERSION):
    return FRAME.pack(magic, version, type_, id_ & MASK, arg & MASK, status, rank, tok)


def unpack(b):
    magic, version, type_, id_, arg, status, rank, tok = FRAME.unpack(b)
    return {"magic": magic, "version": version, "type": type_, "id": id_, "arg": arg,
            "status": status, "rank": rank, "token": tok}


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Part:
    __slots__ = ("idx", "rank", "sock", "buf", "mode", "welcomed", "open", "prepares", "acks")

    def __init__(self, idx, rank, sock, mode):
        self.idx, self.rank, self.sock, self.mode = idx, rank, sock, mode
        self.buf = b""
        self.welcomed = False
        self.open = True
        self.prepares = 0
        self.acks = 0


class Sim:
    """n simulated participants.  start() connects and registers them (returns
    once all are welcomed); a background thread then answers PREPAREs until
    stop().  on_decision(frame dict) is called (in that thread) for each
    DECISION frame."""

    def __init__(self, host, port, n, modes=None, job_token="", run_id="", rank_base=1,
                 tok=None, on_decision=None):
        self.host, self.port, self.n = host, port, n
        self.modes = modes or {}
        self.tok = tok if tok is not None else token(job_token, run_id, host, port)
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
            s.sendall(pack(HELLO, rank=p.rank, tok=self.tok))
            s.setblocking(False)
            self.parts.append(p)
            self.sel.register(s, selectors.EVENT_READ, p)
        while not all(p.welcomed for p in self.parts):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("only %d of %d participants welcomed"
                                   % (sum(p.welcomed for p in self.parts), self.n))
            self._poll(min(left, 0.5))
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
                    self._send(p, pack(ACK, id_=bid, rank=p.rank))
        for key, _ in self.sel.select(timeout):
            self._readable(key.data)

    def _send(self, p, frame):
        if not p.open:
            return
        try:
            n = p.sock.send(frame)   # 48 bytes: fits an empty socket buffer
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
        while len(p.buf) >= 48:
            f = unpack(p.buf[:48])
            p.buf = p.buf[48:]
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
                self._send(p, pack(ACK, id_=bid, rank=p.rank))
                self.last_ack[bid] = time.monotonic()
            elif mode == "eio":
                self._send(p, pack(ACK, id_=bid, status=5, rank=p.rank))
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
                        p.sock.sendall(pack(BYE, rank=p.rank))
                    except OSError:
                        pass
                self._close(p)
        self.sel.close()

    def summary(self):
        return {"n": self.n, "welcomed": sum(p.welcomed for p in self.parts),
                "prepares": sum(p.prepares for p in self.parts),
                "acks": sum(p.acks for p in self.parts),
                "decisions": [(d["id"], d["arg"], d["status"], d["rank"]) for d in self.decisions],
                "dropped": self.dropped, "lost": self.lost}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("coord")
    ap.add_argument("n", type=int)
    ap.add_argument("--mode", action="append", default=[])
    ap.add_argument("--job-token", default="")
    ap.add_argument("--run-id", default="")
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

    sim = Sim(host, int(port), a.n, modes, a.job_token, a.run_id, a.rank_base, on_decision=show)
    sim.start()
    print("READY %d" % a.n, flush=True)
    sys.stdin.read()
    sim.stop()
    print(json.dumps(sim.summary()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
