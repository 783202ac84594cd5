"""The CUDA device path (src/shim/cuda.c, docs/CUDA.md) on a machine without a GPU.

- The CUDA build (meson -Dcuda=enabled, in a temporary build directory)
  compiles and links, without libcuda/libcudart in DT_NEEDED and without a
  cu* symbol in its dynamic symbol table.
- A CPU-only process under the shim never maps libcuda, even with a
  libcuda.so.1 on LD_LIBRARY_PATH; neither does a python process that imports
  torch and saves a CPU tensor.
- The device path's logic runs against a fake driver (cuda_progs/fakecuda.c:
  device memory the CPU cannot read, fills that land only at a context
  synchronize, a call log): writes of device buffers are correct, each copy is
  ordered after a context synchronize, the arena is registered once (eagerly
  or in the background) and unregistered after the last copy, and a forked
  child never calls CUDA.
- The GPU programs (tests/gpu/) compile with nvcc and with g++; tests/gpu/run.sh
  is valid bash and its compiler-only build fallback works.
- The checks that need a real device skip, saying why, on a machine without one.
"""
import os
import py_compile
import re
import shutil
import subprocess

import pytest

from conftest import REPO, VENV_PY, run_program

CUDA_PROGS = REPO / "tests" / "cuda_progs"
GPU = REPO / "tests" / "gpu"
LAUNCHER = REPO / "scripts" / "ackpt-run"
CUDA_INCLUDE_DIRS = ["/usr/local/cuda/include", "/usr/include"]
STUB_CANDIDATES = ["/usr/local/cuda/lib64/stubs/libcuda.so",
                   "/usr/local/cuda/targets/x86_64-linux/lib/stubs/libcuda.so"]
MiB = 1 << 20


def cuda_include():
    for d in CUDA_INCLUDE_DIRS:
        if os.path.isfile(os.path.join(d, "cuda.h")):
            return d
    return None


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and k != "LD_LIBRARY_PATH" and not k.startswith(("ACKPT_", "FAKECUDA_"))}
    env.update({"LC_ALL": "C", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------
# The CUDA build
# --------------------------------------------------------------------------

def meson_build(tmp, cuda):
    if shutil.which("meson") is None or shutil.which("ninja") is None:
        pytest.skip("meson/ninja not on PATH: cannot build ackpt")
    b = tmp / ("build-cuda-" + cuda)
    r = subprocess.run(["meson", "setup", str(b), "-Dcuda=" + cuda], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, "meson setup -Dcuda=%s failed:\n%s%s" % (cuda, r.stdout[-3000:], r.stderr[-3000:])
    r = subprocess.run(["meson", "compile", "-C", str(b)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, "meson compile failed:\n%s%s" % (r.stdout[-4000:], r.stderr[-3000:])
    return b


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    if cuda_include() is None:
        pytest.skip("no cuda.h under %s: the CUDA build cannot be checked here" % " or ".join(CUDA_INCLUDE_DIRS))
    b = meson_build(tmp_path_factory.mktemp("cuda-build"), "enabled")
    lib, helper = b / "src" / "shim" / "libackpt.so", b / "src" / "helper" / "ackpt-helper"
    assert lib.is_file() and helper.is_file()
    return b


def lib_of(build):
    return build / "src" / "shim" / "libackpt.so"


def helper_of(build):
    return build / "src" / "helper" / "ackpt-helper"


def needed(path):
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def test_cuda_build_compiles_and_links(cuda_build):
    config = (cuda_build / "config.h").read_text()
    assert re.search(r"#define ACKPT_HAVE_CUDA_HEADERS 1\b", config), config
    # the device path is compiled in: the driver entry points are looked up by name
    data = lib_of(cuda_build).read_bytes()
    for name in (b"cuPointerGetAttribute", b"cuMemcpyDtoHAsync_v2", b"cuMemHostRegister_v2",
                 b"cuCtxSynchronize", b"libcuda.so.1"):
        assert name in data, "%s not referenced by the CUDA build of libackpt.so" % name.decode()


def test_no_cuda_in_dt_needed(cuda_build):
    if shutil.which("readelf") is None:
        pytest.skip("readelf not on PATH")
    for path in (lib_of(cuda_build), helper_of(cuda_build)):
        libs = needed(path)
        assert libs, "readelf shows no DT_NEEDED at all for %s" % path
        bad = [x for x in libs if re.search(r"cuda|cudart|nvidia", x, re.I)]
        assert not bad, "%s has CUDA in DT_NEEDED: %s" % (path.name, bad)


def test_no_cu_symbols_in_dynamic_table(cuda_build):
    if shutil.which("nm") is None:
        pytest.skip("nm not on PATH")
    out = subprocess.run(["nm", "-D", str(lib_of(cuda_build))], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()]
    cu = [n for n in names if re.match(r"cu[A-Z]", n)]
    # neither exported (it would override the application's driver) nor imported (linked)
    assert not cu, "libackpt.so has CUDA driver symbols in its dynamic table: %s" % cu


def test_disabled_build_has_no_device_path(tmp_path):
    b = meson_build(tmp_path, "disabled")
    assert re.search(r"#define ACKPT_HAVE_CUDA_HEADERS 0\b", (b / "config.h").read_text())
    assert b"cuMemcpyDtoHAsync" not in lib_of(b).read_bytes()


# --------------------------------------------------------------------------
# The fake driver and the programs
# --------------------------------------------------------------------------

def cc():
    c = os.environ.get("CC", "cc")
    if shutil.which(c) is None:
        pytest.skip("%s not found on PATH" % c)
    return c


@pytest.fixture(scope="module")
def fake_cuda(tmp_path_factory):
    """A directory holding the fake libcuda.so.1 (put it on LD_LIBRARY_PATH)."""
    d = tmp_path_factory.mktemp("fakecuda")
    r = subprocess.run([cc(), "-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-shared", "-fPIC",
                        "-fvisibility=hidden", "-Wl,-soname,libcuda.so.1", "-o", str(d / "libcuda.so.1"),
                        str(CUDA_PROGS / "fakecuda.c"), "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def devwrite(tmp_path_factory):
    exe = tmp_path_factory.mktemp("fake-devwrite") / "fake_devwrite"
    r = subprocess.run([cc(), "-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-o", str(exe),
                        str(CUDA_PROGS / "fake_devwrite.c"), "-ldl", "-lpthread"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return exe


@pytest.fixture(scope="module")
def stub_cuda(tmp_path_factory):
    """A directory whose libcuda.so.1 is NVIDIA's stub library, or None."""
    for s in STUB_CANDIDATES:
        if os.path.isfile(s):
            d = tmp_path_factory.mktemp("stubcuda")
            (d / "libcuda.so.1").symlink_to(s)
            return d
    return None


def shim_run(build, tmp_path, argv, label, out=None, timeout=120, **env):
    """Run argv under scripts/ackpt-run --dir OUT with the given build."""
    out = out or tmp_path / (label + "-out")
    out.mkdir(parents=True, exist_ok=True)
    e = clean_env(ACKPT_LIB=lib_of(build), ACKPT_HELPER=helper_of(build), **env)
    full = ["bash", str(LAUNCHER), "--dir", str(out), "--"] + [str(a) for a in argv]
    res = run_program(full, tmp_path, e, label, out, tmp_path / "no-stats.json", timeout=timeout)
    return res


def fake_run(cuda_build, devwrite, fake_cuda, tmp_path, mode, **env):
    out = tmp_path / (mode + "-out")
    log = tmp_path / (mode + ".log")
    env.setdefault("ACKPT_STAGING", "16M")
    res = shim_run(cuda_build, tmp_path, [devwrite, mode, out], mode, out=out,
                   LD_LIBRARY_PATH=fake_cuda, FAKECUDA_LOG=log, **env)
    calls = []
    if log.exists():
        for line in log.read_text().splitlines():
            pid, tid, call, *args = line.split()
            calls.append((int(pid), int(tid), call, args))
    return res, calls


def ok(res):
    assert res.returncode == 0 and "OK" in res.stdout.split(), res.describe()


# --------------------------------------------------------------------------
# CPU-only processes never load libcuda
# --------------------------------------------------------------------------

def test_cpu_process_never_maps_libcuda(cuda_build, devwrite, fake_cuda, tmp_path):
    # a libcuda.so.1 is loadable here, so any dlopen without RTLD_NOLOAD would map it
    res, calls = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "cpu")
    ok(res)
    assert "LIBCUDA_MAPPED 0" in res.stdout, res.describe()
    assert calls == [], "a CPU-only process called the driver: %s" % calls[:5]


TORCH_CPU = r"""
import os, sys, torch
out = sys.argv[1]
t = torch.arange(1 << 16, dtype=torch.float32).reshape(256, 256)
torch.save({"w": t, "step": 3}, os.path.join(out, "model.pt"))
with open("/proc/self/maps") as f:
    maps = sorted({l.split()[-1] for l in f if "libcuda." in l})
print("LIBCUDA_MAPPED", 1 if maps else 0, " ".join(maps))
"""


@pytest.mark.parametrize("with_stub", [False, True], ids=["no-libcuda", "stub-libcuda"])
def test_torch_cpu_save_never_maps_libcuda(cuda_build, stub_cuda, tmp_path, with_stub):
    """no-libcuda: neither torch nor the shim may map libcuda.  stub-libcuda:
    with NVIDIA's stub loadable, torch maps it on import by itself (its CUDA
    libraries dlopen libcuda.so.1 in their initialisers); the shim must not
    add anything, and the save is unchanged."""
    r = subprocess.run([VENV_PY, "-c", "import torch"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip("torch is not importable by %s" % VENV_PY)
    if with_stub and stub_cuda is None:
        pytest.skip("no NVIDIA stub libcuda.so in %s" % ", ".join(STUB_CANDIDATES))
    extra = {"LD_LIBRARY_PATH": stub_cuda} if with_stub else {}
    plain_out = tmp_path / "plain-out"
    plain_out.mkdir()
    plain = run_program([VENV_PY, "-c", TORCH_CPU, plain_out], tmp_path, clean_env(**extra), "plain",
                        plain_out, tmp_path / "no-stats.json", timeout=300)
    assert plain.returncode == 0, plain.describe()
    shim = shim_run(cuda_build, tmp_path, [VENV_PY, "-c", TORCH_CPU, tmp_path / "shim-out"], "shim",
                    timeout=300, **extra)
    assert shim.returncode == 0, shim.describe()
    mapped = re.search(r"^LIBCUDA_MAPPED .*$", shim.stdout, re.M).group(0)
    if with_stub:
        assert mapped == re.search(r"^LIBCUDA_MAPPED .*$", plain.stdout, re.M).group(0), (plain.stdout, shim.stdout)
    else:
        if "LIBCUDA_MAPPED 1" in plain.stdout:
            pytest.skip("a libcuda.so.1 is loadable on this machine and torch maps it on import: "
                        + plain.stdout.strip())
        assert mapped.startswith("LIBCUDA_MAPPED 0"), "libcuda mapped under the shim:\n" + shim.describe()
    a = (plain_out / "model.pt").read_bytes()
    b = (tmp_path / "shim-out" / "model.pt").read_bytes()
    assert a == b, "torch.save output differs under the shim"


# --------------------------------------------------------------------------
# The device path against the fake driver
# --------------------------------------------------------------------------

def copies(calls):
    return [c for c in calls if c[2] == "cuMemcpyDtoHAsync"]


def index_of(calls, name, *prefix):
    return [i for i, c in enumerate(calls) if c[2] == name and c[3][:len(prefix)] == list(prefix)]


# bytes the basic mode writes from device memory: write(a, b, c), pwrite(m),
# writev(.., a, ..), fwrite(b, c)
BASIC_DEVICE_BYTES = 2 * (MiB + 123) + 2 * (3 * MiB + 40 * MiB) + 2 * MiB


def test_device_writes_fake_driver(cuda_build, devwrite, fake_cuda, tmp_path):
    res, calls = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "basic")
    ok(res)
    pids = {c[0] for c in calls}
    assert len(pids) == 1, "the driver was called from more than one process: %s" % pids
    cp = copies(calls)
    assert cp, "no cuMemcpyDtoHAsync: device writes did not take the device path"
    total = sum(int(c[3][1]) for c in cp)
    assert total == BASIC_DEVICE_BYTES, "device bytes copied %d, written %d" % (total, BASIC_DEVICE_BYTES)
    # chunked through the 16 MiB arena: no copy larger than a quarter of it
    assert max(int(c[3][1]) for c in cp) <= 4 * MiB
    # on a private non-blocking stream (CU_STREAM_NON_BLOCKING = 1)
    creates = [c for c in calls if c[2] == "cuStreamCreate"]
    assert [c[3] for c in creates] == [["1"]], creates
    assert all(c[3][2] == "stream_flags=1" for c in cp)
    # ordering rule: a context synchronize on the writer's thread before every copy
    last = None
    for i, c in enumerate(calls):
        if c[2] == "cuCtxSynchronize":
            last = c[1]
        elif c[2] == "cuMemcpyDtoHAsync":
            assert last == c[1], "copy %d not preceded by cuCtxSynchronize on its thread: %s" % (i, calls[max(0, i - 4):i + 1])
            last = None
    # one classification per device or host buffer written while CUDA is live
    # one memory-type query per write buffer; the owning-context lookups are
    # logged separately ("cuPointerGetAttribute context ...")
    attrs = [c for c in calls if c[2] == "cuPointerGetAttribute" and c[3][:1] != ["context"]]
    assert len(attrs) == 10, "cuPointerGetAttribute calls: %d, want one per write buffer (10)" % len(attrs)


def test_arena_pinned_once_and_unpinned_after_last_copy(cuda_build, devwrite, fake_cuda, tmp_path):
    res, calls = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "basic")
    ok(res)
    begin = [c for c in calls if c[2] == "cuMemHostRegister" and c[3][0] == "begin"]
    done = [c for c in calls if c[2] == "cuMemHostRegister" and c[3][0] == "done"]
    assert len(begin) == 1 and len(done) == 1, begin + done
    ptr, size, flags = done[0][3][1:4]
    assert int(size) == 16 * MiB, "registered %s bytes, the arena is 16 MiB" % size
    assert flags == "1", "cuMemHostRegister flags %s, want CU_MEMHOSTREGISTER_PORTABLE" % flags
    unreg = index_of(calls, "cuMemHostUnregister")
    assert len(unreg) == 1, [calls[i] for i in unreg]
    assert calls[unreg[0]][3][0] == ptr and calls[unreg[0]][3][-1] == "0", calls[unreg[0]]
    last_copy = max(i for i, c in enumerate(calls) if c[2] == "cuMemcpyDtoHAsync")
    assert unreg[0] > last_copy, "arena unregistered before the last copy"


def test_pin_in_background_off_the_critical_path(cuda_build, devwrite, fake_cuda, tmp_path):
    res, calls = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "basic", FAKECUDA_REGISTER_MS=400)
    ok(res)
    writer = copies(calls)[0][1]
    begin = index_of(calls, "cuMemHostRegister", "begin")
    done = index_of(calls, "cuMemHostRegister", "done")
    # (the program may well exit before a 400 ms registration is done)
    assert len(begin) == 1 and len(done) <= 1
    assert calls[begin[0]][1] != writer, "registration ran on the writing thread without ACKPT_PIN=eager"
    first_copy = next(i for i, c in enumerate(calls) if c[2] == "cuMemcpyDtoHAsync")
    assert first_copy < (done[0] if done else len(calls)), "the first device write waited for the registration"
    assert copies(calls)[0][3][3] == "pinned=0"


def test_pin_eager(cuda_build, devwrite, fake_cuda, tmp_path):
    res, calls = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "basic", ACKPT_PIN="eager",
                          FAKECUDA_REGISTER_MS=200)
    ok(res)
    writer = copies(calls)[0][1]
    done = index_of(calls, "cuMemHostRegister", "done")
    assert len(done) == 1 and calls[done[0]][1] == writer, "ACKPT_PIN=eager: not registered on the writer's thread"
    first_copy = next(i for i, c in enumerate(calls) if c[2] == "cuMemcpyDtoHAsync")
    assert done[0] < first_copy
    assert all(c[3][3] == "pinned=1" for c in copies(calls)), "a copy went to unpinned memory"


def test_pin_failure_warns_once_and_stays_correct(cuda_build, devwrite, fake_cuda, tmp_path):
    res, calls = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "basic", FAKECUDA_REGISTER_FAIL=1)
    ok(res)
    warnings = [l for l in res.stderr.splitlines() if "pin" in l and "warning" in l]
    assert len(warnings) == 1, res.stderr
    assert not index_of(calls, "cuMemHostUnregister"), "unregistered an arena that was never registered"


def test_forked_child_never_calls_cuda(cuda_build, devwrite, fake_cuda, tmp_path):
    res, calls = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "fork")
    ok(res)
    child = int(re.search(r"^CHILD (\d+)$", res.stdout, re.M).group(1))
    assert child not in {c[0] for c in calls}, [c for c in calls if c[0] == child]
    assert copies(calls), "the parent's device write did not take the device path"


def test_driver_loaded_without_context(cuda_build, devwrite, fake_cuda, tmp_path):
    res, calls = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "loaded")
    ok(res)
    # with the driver loaded but no context anywhere, the shim may only ask
    # what kind of memory a buffer is: no context, stream or memory calls
    names = set(c[2] for c in calls)
    assert names <= {"cuInit", "cuPointerGetAttribute"}, "calls without a context: %s" % calls


def test_nvidia_stub_library_loaded(cuda_build, devwrite, stub_cuda, tmp_path):
    if stub_cuda is None:
        pytest.skip("no NVIDIA stub libcuda.so in %s" % ", ".join(STUB_CANDIDATES))
    res = shim_run(cuda_build, tmp_path, [devwrite, "loaded", tmp_path / "stub-out"], "stub",
                   out=tmp_path / "stub-out", LD_LIBRARY_PATH=stub_cuda, ACKPT_LOG="debug")
    ok(res)
    assert "CUINIT 34" in res.stdout  # CUDA_ERROR_STUB_LIBRARY
    assert "device-pointer writes enabled" in res.stderr, "the shim did not find the loaded driver"


def test_device_write_from_thread_without_context(cuda_build, devwrite, fake_cuda, tmp_path):
    res, _ = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "nocontext")
    ok(res)


def test_device_write_on_fd_opened_before_cuda(cuda_build, devwrite, fake_cuda, tmp_path):
    res, _ = fake_run(cuda_build, devwrite, fake_cuda, tmp_path, "early-fd")
    ok(res)


# --------------------------------------------------------------------------
# The GPU programs and script, checked as far as a CPU machine can
# --------------------------------------------------------------------------

def find_nvcc():
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)


@pytest.mark.parametrize("src", ["devwrite.cu", "d2h_bench.cu"])
def test_gpu_program_compiles_with_nvcc(src, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA toolkit is not installed")
    r = subprocess.run([nvcc, "-O2", "-I", str(REPO / "include"), "-o", str(tmp_path / "prog"),
                        str(GPU / src), "-ldl"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("src", ["devwrite.cu", "d2h_bench.cu"])
def test_gpu_program_compiles_without_nvcc(src, tmp_path):
    """run.sh's path for a GPU machine without nvcc: C++ against the headers."""
    inc = next((d for d in ("/usr/local/cuda/include",) if os.path.isfile(d + "/cuda_runtime_api.h")), None)
    if inc is None or shutil.which("g++") is None:
        pytest.skip("no cuda_runtime_api.h or no g++")
    r = subprocess.run(["g++", "-O2", "-Wall", "-Wextra", "-x", "c++", "-isystem", inc, "-I",
                        str(REPO / "include"), "-c", "-o", str(tmp_path / "prog.o"), str(GPU / src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_gpu_script_is_valid(tmp_path):
    r = subprocess.run(["bash", "-n", str(GPU / "run.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", str(GPU / "run.sh")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    py_compile.compile(str(GPU / "torch_check.py"), cfile=str(tmp_path / "torch_check.pyc"), doraise=True)
    r = subprocess.run(["bash", str(GPU / "run.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "liburing" in r.stdout


def test_gpu_torch_check_on_cpu_tensors(cuda_build, tmp_path):
    """tests/gpu/torch_check.py end to end with TORCH_CHECK_DEVICE=cpu: the
    plain and shim saves, the raw data_ptr() write, and the comparison."""
    r = subprocess.run([VENV_PY, "-c", "import torch"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip("torch is not importable by %s" % VENV_PY)
    script = GPU / "torch_check.py"
    env = clean_env(TORCH_CHECK_DEVICE="cpu")
    plain_out = tmp_path / "plain"
    plain_out.mkdir()
    plain = run_program([VENV_PY, script, "save", plain_out], tmp_path, env, "plain", plain_out,
                        tmp_path / "no-stats.json", timeout=300)
    assert plain.returncode == 0 and "shim no" in plain.stdout, plain.describe()
    shim = shim_run(cuda_build, tmp_path, [VENV_PY, script, "save", tmp_path / "shim"], "shim",
                    out=tmp_path / "shim", timeout=300, TORCH_CHECK_DEVICE="cpu")
    assert shim.returncode == 0 and "raw_match yes" in shim.stdout, shim.describe()
    cmp = subprocess.run([VENV_PY, str(script), "compare", str(plain_out), str(tmp_path / "shim")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    for key in ("torch_save_identical", "torch_load_equal", "dcp_identical", "dcp_load_equal"):
        assert "%s yes" % key in cmp.stdout, cmp.stdout


def test_gpu_script_cc_build_with_carried_liburing(devwrite, fake_cuda, tmp_path):
    """The build the GPU machine falls back to: cc, a config.h of its own, and
    liburing from a carried copy; the result must work like the meson build."""
    if cuda_include() is None:
        pytest.skip("no cuda.h: run.sh cannot build the device path here")
    carried = tmp_path / "liburing"
    r = subprocess.run(["bash", str(GPU / "run.sh"), "--prepare-liburing", str(carried)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip("no liburing headers + liburing.a on this machine to carry: " + r.stderr.strip())
    work = tmp_path / "work"
    r = subprocess.run(["bash", str(GPU / "run.sh"), "--build-only"], capture_output=True, text=True,
                       timeout=300, env=clean_env(ACKPT_GPU_BUILD="cc", ACKPT_GPU_WORK=work,
                                                  ACKPT_LIBURING_DIR=carried))
    assert r.returncode == 0 and "PASS build cc" in r.stdout, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "1 passed, 0 failed"
    b = work / "build-cc"
    assert "liburing: carried install tree" in (work / "logs" / "build-cc.log").read_text()
    assert not [x for x in needed(b / "ackpt-helper") if "uring" in x], "helper not linked statically"
    r = subprocess.run(["sh", str(REPO / "tests" / "check_exports.sh"), str(b / "libackpt.so"),
                        str(REPO / "src" / "shim" / "libackpt.map")], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # lay it out like a meson build dir and run the device path through it
    fake_build = tmp_path / "as-meson"
    (fake_build / "src" / "shim").mkdir(parents=True)
    (fake_build / "src" / "helper").mkdir(parents=True)
    (fake_build / "src" / "shim" / "libackpt.so").symlink_to(b / "libackpt.so")
    (fake_build / "src" / "helper" / "ackpt-helper").symlink_to(b / "ackpt-helper")
    res, calls = fake_run(fake_build, devwrite, fake_cuda, tmp_path, "basic")
    ok(res)
    assert copies(calls)


# --------------------------------------------------------------------------
# Real device: skipped, with the reason, on a machine without one
# --------------------------------------------------------------------------

GPU_PROBE = r"""
import ctypes
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    print("no NVIDIA GPU/driver on this machine: libcuda.so.1 cannot be loaded (%s)" % e)
    raise SystemExit
r = cuda.cuInit(0)
n = ctypes.c_int(0)
if r != 0:
    print("no NVIDIA GPU/driver on this machine: cuInit returned %d%s"
          % (r, " (CUDA_ERROR_STUB_LIBRARY)" if r == 34 else ""))
elif cuda.cuDeviceGetCount(ctypes.byref(n)) != 0 or n.value < 1:
    print("no NVIDIA GPU on this machine: cuDeviceGetCount found none")
else:
    print("GPU %d" % n.value)
"""


@pytest.fixture(scope="module")
def gpu():
    """Skip, saying why, unless a CUDA driver and a device are usable.  The probe
    runs in a child: cuInit here would make every later fork a CUDA fork."""
    r = subprocess.run(["python3", "-c", GPU_PROBE], capture_output=True, text=True, timeout=120,
                       env=clean_env())
    out = r.stdout.strip()
    if not out.startswith("GPU "):
        pytest.skip(out or "GPU probe failed: " + r.stderr[-300:])


def test_device_write_real_gpu(gpu, cuda_build, tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("a GPU is present but nvcc is not; run tests/gpu/run.sh instead")
    exe = tmp_path / "devwrite"
    r = subprocess.run([nvcc, "-O2", "-arch=native", "-I", str(REPO / "include"), "-o", str(exe),
                        str(GPU / "devwrite.cu"), "-ldl"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = shim_run(cuda_build, tmp_path, [exe, "files", tmp_path / "dw"], "devwrite",
                   out=tmp_path / "dw", timeout=300, ACKPT_STAGING="512M")
    assert res.returncode == 0 and "RESULT ok" in res.stdout, res.describe()
