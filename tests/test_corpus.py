"""Byte-identical corpus: real programs run without and with the shim must
leave identical output trees (see conftest.run_pair and progs/).

Hand runs without a build skip (fail under CI); ACKPT_TEST_MODE=plain runs
every program twice without the shim, to check the corpus is deterministic.
"""
import subprocess
import textwrap

import pytest

from conftest import PROGS, VENV_PY


def py(prog, *extra):
    return lambda out: [VENV_PY, PROGS / prog, out, *extra]


# ---- C / C++ / Rust ----------------------------------------------------------

@pytest.mark.parametrize("flags", [
    pytest.param((), id="default"),
    # open64/lseek64/pwrite64/ftruncate64 and the fortified __open64_2.
    pytest.param(("-D_FILE_OFFSET_BITS=64", "-D_FORTIFY_SOURCE=2"), id="lfs-fortify"),
])
def test_c_basic(run_pair, build_c, tmp_path, flags):
    exe = build_c("c_basic.c", flags)
    run_pair(lambda out: [exe, out], tmp_path)


def test_c_stdio(run_pair, build_c, tmp_path):
    exe = build_c("c_stdio.c")
    run_pair(lambda out: [exe, out], tmp_path)


def test_cxx_ofstream(run_pair, build_cxx, tmp_path):
    exe = build_cxx("cxx_ofstream.cpp")
    run_pair(lambda out: [exe, out], tmp_path)


def test_rust_io(run_pair, build_rust, tmp_path):
    exe = build_rust("rust_io.rs")
    run_pair(lambda out: [exe, out], tmp_path)


# ---- Python ------------------------------------------------------------------

@pytest.mark.parametrize("prog", [
    "py_basic.py",
    "py_numpy.py",
    "py_torch.py",
    "py_safetensors.py",
    "py_fork.py",
    "py_cp.py",
])
def test_python(run_pair, tmp_path, prog):
    run_pair(py(prog), tmp_path)


_DCP_META_CMP = textwrap.dedent("""
    import pickle, sys, os
    import torch.distributed.checkpoint  # noqa: F401  (makes the classes importable)
    a = pickle.load(open(sys.argv[1], "rb"))
    b = pickle.load(open(sys.argv[2], "rb"))
    bad = []
    for f in ("state_dict_metadata", "planner_data", "storage_data", "version"):
        if getattr(a, f, None) != getattr(b, f, None):
            bad.append(f)
    sa, sb = a.storage_meta, b.storage_meta
    if (sa is None) != (sb is None):
        bad.append("storage_meta presence")
    elif sa is not None:
        # save_id is a fresh uuid4 per save; checkpoint_id is the (different) directory.
        if os.path.basename(str(sa.checkpoint_id)) != os.path.basename(str(sb.checkpoint_id)):
            bad.append("storage_meta.checkpoint_id basename")
        if sa.modules != sb.modules or sa.load_id != sb.load_id:
            bad.append("storage_meta.modules/load_id")
        if not sa.save_id or not sb.save_id:
            bad.append("storage_meta.save_id empty")
    if bad:
        print("unpickled .metadata differs in: " + ", ".join(bad))
        sys.exit(1)
""")


def compare_dcp_metadata(plain_file, shim_file):
    """DCP's .metadata embeds a random save_id and the checkpoint path, so it is
    compared by unpickling; everything else in it must be equal."""
    r = subprocess.run([VENV_PY, "-c", _DCP_META_CMP, str(plain_file), str(shim_file)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return (r.stdout + r.stderr).strip()[-2000:] or "comparison exited %d" % r.returncode
    return None


@pytest.mark.parametrize("threads", [1, 4])
def test_dcp(run_pair, tmp_path, threads):
    run_pair(py("py_dcp.py", str(threads)), tmp_path,
             special={"ckpt/.metadata": compare_dcp_metadata})


# ---- Shell redirection -------------------------------------------------------

SHELL_SCRIPTS = {
    # bash opens the file, dup2s it to fd 1, builtins write to it; then '>>' appends.
    "redirect": 'for i in $(seq 1 2000); do echo "line $i"; done > "$1/redir.txt"; '
                'echo tail >> "$1/redir.txt"',
    # Builtins and exec'd programs share one redirected fd: the shim must drain it
    # before each exec so the external commands write in the right place.
    "mixed-exec": '{ echo head; /bin/echo external-1; seq 1 500; printf "builtin %s\\n" a b c; '
                  'cat "$1/redir_src.txt"; echo tail; } > "$1/mixed.txt"',
}


@pytest.mark.parametrize("name", sorted(SHELL_SCRIPTS))
def test_shell(run_pair, tmp_path, name):
    script = SHELL_SCRIPTS[name]
    if name == "mixed-exec":
        # A managed input file written just before, read by an exec'd cat.
        script = 'seq 1 3000 > "$1/redir_src.txt"; ' + script
    run_pair(lambda out: ["bash", "-c", script, "bash", out], tmp_path,
             expect_stats=False, expect_staged=False)
