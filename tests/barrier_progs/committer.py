"""The one real program of the scale test: rank 0 of a large simulated job.
Run it under the shim with RANK=0 WORLD_SIZE=N ACKPT_COORD=127.0.0.1:PORT
ACKPT_COMMIT=sync (its helper hosts the coordinator).

  committer.py DIR COUNT [--data-kib K]
Prints "UP <pid>" at start, then waits for a line on stdin (the simulated
participants are registered).  Then COUNT times: writes DIR/data_<i>.bin
(K KiB), then DIR/metadata.json (a metadata name) and times its close(),
which returns after the barrier and the commit (ACKPT_COMMIT=sync).  Prints
"COMMIT <i> <seconds> <errno or 0>" per commit and "DONE" at the end.
"""
import argparse
import errno
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("count", type=int)
    ap.add_argument("--data-kib", type=int, default=256)
    a = ap.parse_args()
    print("UP %d" % os.getpid(), flush=True)
    line = sys.stdin.readline()
    if not line:
        return 3
    blob = os.urandom(a.data_kib << 10)
    for i in range(a.count):
        with open(os.path.join(a.dir, "data_%d.bin" % i), "wb") as f:
            f.write(blob)
        body = json.dumps({"iteration": i, "data": "data_%d.bin" % i}).encode()
        err = 0
        fd = os.open(os.path.join(a.dir, "metadata.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, body)
        except OSError as e:
            err = e.errno
        t0 = time.perf_counter()
        try:
            os.close(fd)
        except OSError as e:
            err = err or e.errno
        dt = time.perf_counter() - t0
        print("COMMIT %d %.6f %d" % (i, dt, err), flush=True)
        if err:
            print("ERRNO %s" % errno.errorcode.get(err, err), flush=True)
            break
        if a.count > 1:
            line = sys.stdin.readline()   # one go per commit after the first
            if not line:
                break
    print("DONE", flush=True)
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
