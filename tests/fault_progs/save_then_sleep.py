"""Save a checkpoint, say so, then keep "training" (sleep) until killed.

argv: PATH MIB SEED CHUNK_MIB
Writes MIB MiB of random.Random(SEED).randbytes() to PATH with os.write in
CHUNK_MIB pieces, fsyncs and closes it, prints "saved" (flushed), sleeps.
"""
import os
import random
import sys
import time

path, mib, seed, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) << 20
data = random.Random(seed).randbytes(mib << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
view = memoryview(data)
off = 0
while off < len(data):
    off += os.write(fd, view[off:off + chunk])
os.fsync(fd)
os.close(fd)
print("saved", flush=True)
time.sleep(120)
