"""One system saving one format at one size, driven round by round by
bench/harness.py over a Unix socket (JSON lines), so that the harness can
interleave systems (A B C A B C ...) on warm, long-lived processes.

Run as `python bench/ckpt_worker.py` with BENCH_SPEC (JSON) and BENCH_CTL (the
socket path) in the environment; under torchrun every rank runs it and rank 0
relays.  The ackpt system is this same program under scripts/ackpt-run: the
save calls are those of workload.py, unchanged; only the timing around them
asks ackpt_wait (through ctypes) when the checkpoint is durable.

Each round: the compute loop runs idle for a while (its idle rate), the state
dict is touched (a training step), the save runs (the stall), and then the
compute loop runs until the checkpoint is durable (its rate under the
background work, and the time to durable).
"""
import ctypes
import json
import os
import socket
import sys
import threading
import time
import traceback

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the compute loop: one core

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402

now = time.monotonic


class AckptStats(ctypes.Structure):
    # include/ackpt.h, struct ackpt_stats
    _fields_ = [("bytes_staged", ctypes.c_uint64), ("files", ctypes.c_uint64),
                ("bytes_written", ctypes.c_uint64), ("errors", ctypes.c_uint64),
                ("ops_pending", ctypes.c_uint64), ("stall_seconds", ctypes.c_double),
                ("active", ctypes.c_int32), ("helper_flags", ctypes.c_int32),
                ("helper_cpu_seconds", ctypes.c_double), ("staging_bytes", ctypes.c_uint64)]


def ackpt_api():
    lib = ctypes.CDLL(None)
    try:
        wait, stats = lib.ackpt_wait, lib.ackpt_get_stats
    except AttributeError:
        return None
    wait.argtypes, wait.restype = [ctypes.c_double], ctypes.c_int
    stats.argtypes, stats.restype = [ctypes.POINTER(AckptStats), ctypes.c_size_t], ctypes.c_int

    def get():
        s = AckptStats()
        if stats(ctypes.byref(s), ctypes.sizeof(s)) != 0:
            return None
        return {k: getattr(s, k) for k, _ in AckptStats._fields_}

    return wait, get


def side_threads_cpu_s():
    """CPU seconds of this process's threads other than the main one: the
    shim's threads under ackpt, DCP's writer thread, gloo's."""
    main = os.getpid()
    tot = 0.0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == main:
            continue
        try:
            with open("/proc/self/task/%s/stat" % tid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            tot += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return tot


def proc_cpu_s(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class ComputeLoop:
    """A stand-in for training: single-threaded fp32 matmuls (numpy releases
    the GIL inside BLAS, as torch does inside its kernels)."""

    def __init__(self, n=256):
        rng = np.random.default_rng(0)
        self.a = rng.random((n, n), dtype=np.float32)
        self.b = rng.random((n, n), dtype=np.float32)

    def run_for(self, seconds):
        n, t0 = 0, now()
        while now() - t0 < seconds:
            self.a @ self.b
            n += 1
        return n / (now() - t0)

    def run_until(self, event):
        n, t0 = 0, now()
        while not event.is_set():
            self.a @ self.b
            n += 1
        return n, now() - t0


class System:
    """save() is what the training loop waits for; wait() blocks until the
    checkpoint is durable (run on a side thread while the loop computes)."""
    background = False

    def __init__(self, spec, pg):
        self.spec, self.pg = spec, pg
        self.fmt = spec["format"]

    def save(self, sd, path):
        workload.saver(self.fmt)(sd, path, durable=True)

    def written(self, path):
        """Where save(sd, path) put the checkpoint."""
        return path

    def wait(self):
        pass

    def round_stats(self):
        return {}

    def close(self):
        pass


class Ackpt(System):
    background = True

    def __init__(self, spec, pg):
        super().__init__(spec, pg)
        api = ackpt_api()
        if api is None:
            raise RuntimeError("ackpt_wait not found: not running under the ackpt preload")
        self._wait, self._stats = api
        self._last = {"helper_cpu_seconds": 0.0}

    def wait(self):
        rc = self._wait(0.0)
        if rc != 0:
            raise RuntimeError("ackpt_wait returned %d" % rc)

    def round_stats(self):
        s = self._stats()
        out = {"ackpt": s}
        if s and self._last:
            out["bg_cpu_s"] = s["helper_cpu_seconds"] - self._last["helper_cpu_seconds"]
        self._last = s
        return out


class Floor(System):
    """The same save into tmpfs without fsync."""

    def __init__(self, spec, pg):
        super().__init__(spec, pg)
        self.shm = spec["shm_dir"]

    def save(self, sd, path):
        workload.saver(self.fmt)(sd, self.written(path), durable=False)

    def written(self, path):
        return os.path.join(self.shm, os.path.basename(path))


class DcpAsync(System):
    background = True

    def __init__(self, spec, pg):
        super().__init__(spec, pg)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.process = spec["system"] == "dcp-process"
        self.kind = AsyncCheckpointerType.PROCESS if self.process else AsyncCheckpointerType.THREAD
        # The stager is kept across saves so its cached staging storages are
        # reused (warm); pinning needs CUDA (torch ignores the flag without it);
        # shared memory lets the PROCESS executor's daemon read the staged
        # copy without pickling it; asynchronous staging and non-blocking
        # copies need an accelerator, so staging happens inside the call.
        self.options = StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                      use_shared_memory=self.process,
                                      use_async_staging=False, use_non_blocking_copy=False)
        self.stager = DefaultStager(self.options)
        self.future, self.path, self._cpu = None, None, None

    def save(self, sd, path):
        import torch.distributed.checkpoint as dcp

        self.path = path
        self.future = dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(path, sync_files=True),
                                     async_checkpointer_type=self.kind, async_stager=self.stager)

    def wait(self):
        f = getattr(self.future, "upload_completion", self.future)
        f.result()
        if torch.distributed.get_rank() == 0:
            workload.fsync_dir(self.path)
            workload.fsync_dir(os.path.dirname(self.path))

    def round_stats(self):
        if not self.process:
            return {}
        from torch.distributed.checkpoint import _async_process_executor as ape

        p = ape._CHECKPOINT_PROCESS
        cpu = proc_cpu_s(p._save_process.pid) if p else None
        out = {}
        if cpu is not None and self._cpu is not None:
            out["bg_cpu_s"] = cpu - self._cpu
        self._cpu = cpu
        return out

    def close(self):
        self.stager.close()
        if self.process:
            from torch.distributed.checkpoint import _async_process_executor as ape

            if ape._CHECKPOINT_PROCESS is not None:
                ape._CHECKPOINT_PROCESS.__del__()  # sends TERMINATE and joins


class NvrxDcp(System):
    """nvidia-resiliency-ext: FileSystemWriterAsync + AsyncCallsQueue, the
    documented plan / schedule / finalize sequence."""
    background = True

    def __init__(self, spec, pg):
        super().__init__(spec, pg)
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=True)
        self.path = None

    def save(self, sd, path):
        from functools import partial

        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncRequest
        from nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async import FileSystemWriterAsync
        from nvidia_resiliency_ext.checkpointing.async_ckpt.state_dict_saver import (
            save_state_dict_async_finalize, save_state_dict_async_plan)
        from torch.distributed.checkpoint import DefaultSavePlanner

        self.path = path
        writer = FileSystemWriterAsync(path, thread_count=1)
        writer, md, dw = save_state_dict_async_plan(sd, writer, None, planner=DefaultSavePlanner())
        fn, preload_fn, args = writer.get_save_function_and_args()
        req = AsyncRequest(fn, args, [partial(save_state_dict_async_finalize, writer, md, dw)],
                           preload_fn=preload_fn)
        # schedule_async_request waits for the caller process to preload the
        # tensors and never returns if that process has died: watch it
        box = {}

        def schedule():
            try:
                self.queue.schedule_async_request(req)
            except BaseException as e:
                box["error"] = e
            box["done"] = True

        th = threading.Thread(target=schedule, daemon=True)
        th.start()
        while th.is_alive():
            th.join(0.01)
            self._check_caller()
        if "error" in box:
            raise box["error"]

    def _check_caller(self):
        caller = self.queue.persistent_caller
        proc = caller.process if caller else None
        if proc is not None and proc.exitcode is not None:
            raise RuntimeError("nvrx's persistent async caller process died (exit code %s)" % proc.exitcode)

    def wait(self):
        # finalize(blocking=True) never returns when the caller process has
        # died, so poll and look at the process between polls
        while self.queue.get_num_unfinalized_calls():
            self._check_caller()
            self.queue.maybe_finalize_async_calls(blocking=False, no_dist=False)
            time.sleep(0.005)
        if torch.distributed.get_rank() == 0:
            workload.fsync_dir(self.path)
            workload.fsync_dir(os.path.dirname(self.path))

    def close(self):
        caller = self.queue.persistent_caller
        if caller is None or caller.process is None or caller.process.is_alive():
            self.queue.close()


class NvrxTorch(System):
    """nvidia-resiliency-ext TorchAsyncCheckpoint (async torch.save)."""
    background = True

    def __init__(self, spec, pg):
        super().__init__(spec, pg)
        from nvidia_resiliency_ext.checkpointing.async_ckpt.torch_ckpt import TorchAsyncCheckpoint

        self.ckpt = TorchAsyncCheckpoint(persistent_queue=True)

    def save(self, sd, path):
        self.ckpt.async_save(sd, path)

    def wait(self):
        self.ckpt.finalize_async_save(blocking=True, no_dist=True)

    def close(self):
        self.ckpt.finalize_async_save(blocking=True, no_dist=True, terminate=True)


class DcpAsyncAckpt(DcpAsync):
    """DCP async_save THREAD, the same script run under ackpt-run: the two
    composed.  Durable once DCP's future resolves and ackpt's helper has
    made everything durable and committed the metadata."""

    def __init__(self, spec, pg):
        super().__init__(dict(spec, system="dcp-thread"), pg)
        self.ackpt = Ackpt(spec, pg)

    def wait(self):
        super().wait()
        self.ackpt.wait()

    def round_stats(self):
        return self.ackpt.round_stats()


SYSTEMS = {"sync": System, "ackpt": Ackpt, "floor": Floor, "dcp-thread": DcpAsync,
           "dcp-process": DcpAsync, "dcp-thread-ackpt": DcpAsyncAckpt, "nvrx-dcp": NvrxDcp,
           "nvrx-torch": NvrxTorch}


def short_error(e):
    lines = traceback.format_exception_only(type(e), e)
    return (lines[-1] if lines else repr(e)).strip()[:2000]


class Worker:
    def __init__(self, spec):
        self.spec = spec
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.dist = spec["format"].startswith("dcp") or spec["system"].startswith("nvrx")
        self.sock = None
        self.prev = None

    def init_dist(self):
        import torch.distributed as dist

        if "MASTER_ADDR" not in os.environ:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                              WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo")

    def send(self, obj):
        self.sock.sendall((json.dumps(obj) + "\n").encode())

    def recv(self):
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("harness went away")
            buf += chunk
        return json.loads(buf)

    def bcast(self, obj):
        if self.world == 1:
            return obj
        lst = [obj]
        torch.distributed.broadcast_object_list(lst, src=0)
        return lst[0]

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def one_round(self, cmd):
        step = cmd["round"]
        res = {"rank": self.rank}
        res["idle_rate"] = self.loop.run_for(cmd["idle_s"]) if cmd["idle_s"] > 0 else None
        workload.touch(self.sd, step)
        path = os.path.join(self.spec["dir"], workload.ckpt_name(self.spec["format"], step))
        self.barrier()
        t0 = now()
        self.system.save(self.sd, path)
        t1 = now()
        res["stall_s"] = t1 - t0
        if self.system.background:
            done, box = threading.Event(), {}

            def waiter():
                try:
                    self.system.wait()
                except BaseException as e:  # reported, not raised: the loop must stop
                    box["error"] = short_error(e)
                box["t"] = now()
                done.set()

            side0 = side_threads_cpu_s()
            threading.Thread(target=waiter, daemon=True).start()
            n, dt = self.loop.run_until(done)
            res["side_threads_cpu_s"] = side_threads_cpu_s() - side0
            if "error" in box:
                raise RuntimeError("wait: " + box["error"])
            res["durable_s"] = box["t"] - t0
            res["busy_iters"], res["busy_s"] = n, dt
        else:
            res["durable_s"] = res["stall_s"]
        res.update(self.system.round_stats())
        self.barrier()
        # keep one checkpoint on disk at a time; removal is outside the timing
        if self.rank == 0:
            if self.prev:
                remove(self.prev)
            self.prev = self.system.written(path)
            if self.spec["system"] == "floor":  # tmpfs is memory: free it now
                remove(self.prev)
                self.prev = None
        return res

    def main(self):
        spec = self.spec
        if self.dist:
            self.init_dist()
        if self.rank == 0:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(os.environ["BENCH_CTL"])
            self.send({"hello": spec["worker_id"], "pid": os.getpid()})
        t = now()
        self.sd = workload.make_state_dict(spec["size_bytes"], self.rank, self.world)
        self.loop = ComputeLoop()
        info = {"rank": self.rank, "build_s": now() - t, "state_bytes": workload.state_bytes(self.sd),
                "tensors": len(self.sd)}
        err = None
        try:
            self.system = SYSTEMS[spec["system"]](spec, None)
        except BaseException as e:
            err = short_error(e)
        errs = [x for x in self.gather(err) or [] if x]
        infos = self.gather(info)
        if self.rank == 0:
            self.send({"ready": True, "ranks": infos, "error": errs[0] if errs else None})
        if errs:
            return
        while True:
            cmd = self.bcast(self.recv() if self.rank == 0 else None)
            if cmd.get("quit"):
                break
            try:
                res = self.one_round(cmd)
            except BaseException as e:
                res = {"rank": self.rank, "error": short_error(e)}
            results = self.gather(res)
            if self.rank == 0:
                self.send({"round": cmd["round"], "ranks": results})
        try:
            self.system.close()
        except BaseException:
            pass
        if self.rank == 0 and self.prev:
            remove(self.prev)


def remove(path):
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


if __name__ == "__main__":
    w = Worker(json.loads(os.environ["BENCH_SPEC"]))
    try:
        w.main()
    finally:
        if w.dist and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except BaseException:
                pass
    sys.stdout.flush()
    # DCP's PROCESS executor and nvrx's persistent caller leave daemons whose
    # teardown at interpreter exit can hang; everything is durable by now.
    os._exit(0)
