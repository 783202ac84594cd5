"""scripts/ackpt-run: option parsing, environment set-up and errors.

No shim is needed: ACKPT_LIB points at some existing file and the command
is `env`, so only the environment the launcher builds is checked.  (ld.so
complains on stderr that the fake library cannot be preloaded; the tests
read the environment from stdout.)
"""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "scripts" / "ackpt-run"
NOT_FOUND = ("ackpt-run: libackpt.so not found (build with: meson setup build && "
             "meson compile -C build, or set ACKPT_LIB)")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACKPT_") and k != "LD_PRELOAD"}
    env.update(extra)
    return env


@pytest.fixture
def fake(tmp_path):
    """A fake library and helper (any existing files do)."""
    tmp_path = tmp_path.resolve()
    lib = tmp_path / "libackpt.so"
    lib.write_bytes(b"")
    helper = tmp_path / "ackpt-helper"
    shutil.copy("/bin/true", helper)
    return lib, helper


def run(args, env, cwd=None, launcher=LAUNCHER):
    return subprocess.run(["bash", str(launcher), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=30)


def run_env(args, env, cwd=None, launcher=LAUNCHER):
    """Run the launcher with `env` as the command; return the child's environment."""
    p = run([*args, "env"], env, cwd, launcher)
    assert p.returncode == 0, p.stderr
    return dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)


def test_help_documents_options_and_variables():
    p = run(["--help"], clean_env())
    assert p.returncode == 0
    assert p.stderr == ""
    for word in ["--dir", "--staging", "--log", "--commit", "--help", "--version",
                 "ACKPT_PATHS", "ACKPT_METADATA", "ACKPT_STAGING", "ACKPT_LOG",
                 "ACKPT_COMMIT", "ACKPT_COORD", "ACKPT_BARRIER_TIMEOUT", "ACKPT_DISABLE",
                 "ACKPT_DIRECT", "ACKPT_IO", "ACKPT_LIB", "ACKPT_HELPER", "inherit", "ACKPT_SECRET",
                 "ACKPT_JOB_TOKEN", "ACKPT_SECRET_FILE", "ACKPT_WRITE_THROUGH"]:
        assert word in p.stdout, word
    assert run(["-h"], clean_env()).stdout == p.stdout


def test_version():
    p = run(["--version"], clean_env())
    assert p.returncode == 0
    assert re.fullmatch(r"ackpt-run \S+\n", p.stdout)


@pytest.mark.parametrize("args", [
    [],
    ["--"],
    ["--dir", "/x"],
    ["--bogus", "env"],
    ["-x", "env"],
    ["--dir"],
    ["--dir="],
    ["--dir", "--log", "info", "env"],
    ["--staging"],
    ["--staging", "lots", "env"],
    ["--staging=4X", "env"],
    ["--staging", "-1", "env"],
    ["--log", "loud", "env"],
    ["--log=", "env"],
    ["--commit", "maybe", "env"],
    ["--commit=ASYNC", "env"],
])
def test_usage_error_is_one_line_and_exit_2(args, fake):
    lib, helper = fake
    p = run(args, clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper)))
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("ackpt-run: ")


def test_missing_library(tmp_path):
    p = run(["env"], clean_env(ACKPT_LIB=str(tmp_path / "nope.so")))
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr == NOT_FOUND + "\n"


def test_options_set_environment(fake):
    lib, helper = fake
    env = run_env(["--staging", "512M", "--log", "debug", "--commit", "sync", "--"],
                  clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper)))
    assert env["ACKPT_STAGING"] == "512M"
    assert env["ACKPT_LOG"] == "debug"
    assert env["ACKPT_COMMIT"] == "sync"
    assert env["ACKPT_HELPER"] == str(helper)
    assert env["LD_PRELOAD"] == str(lib)
    assert "ACKPT_PATHS" not in env

    env = run_env(["--staging=4G", "--log=warn", "--commit=async"],
                  clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper)))
    assert (env["ACKPT_STAGING"], env["ACKPT_LOG"], env["ACKPT_COMMIT"]) == ("4G", "warn", "async")


def test_unset_options_leave_environment_alone(fake):
    lib, helper = fake
    env = run_env([], clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper),
                                ACKPT_STAGING="1G", ACKPT_LOG="info"))
    assert env["ACKPT_STAGING"] == "1G"
    assert env["ACKPT_LOG"] == "info"
    assert "ACKPT_COMMIT" not in env


def test_a_fresh_secret_per_launch(fake):
    """ackpt-run makes the job's secret: 64 hex digits, another each launch;
    an ACKPT_SECRET already set (an outer ackpt-run's) is kept, and none is
    made when ACKPT_JOB_TOKEN is the secret."""
    lib, helper = fake
    base = clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper))
    a = run_env([], base)["ACKPT_SECRET"]
    b = run_env([], base)["ACKPT_SECRET"]
    assert re.fullmatch(r"[0-9a-f]{64}", a) and re.fullmatch(r"[0-9a-f]{64}", b) and a != b
    assert run_env([], dict(base, ACKPT_SECRET=a))["ACKPT_SECRET"] == a
    assert "ACKPT_SECRET" not in run_env([], dict(base, ACKPT_JOB_TOKEN="t" * 40))


def test_ld_preload_prepended_once(fake, tmp_path):
    lib, helper = fake
    tmp_path = tmp_path.resolve()
    base = clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper))

    env = run_env([], {**base, "LD_PRELOAD": "/opt/a.so:/opt/b.so"})
    assert env["LD_PRELOAD"] == f"{lib}:/opt/a.so:/opt/b.so"

    # Space-separated entries are kept too, and ours is not added twice,
    # even when the existing entry names it through a symlink.
    link = tmp_path / "link.so"
    link.symlink_to(lib)
    env = run_env([], {**base, "LD_PRELOAD": f"/opt/a.so {link}:{lib}"})
    assert env["LD_PRELOAD"] == f"{lib}:/opt/a.so"


def test_library_and_helper_made_absolute(fake, tmp_path):
    lib, helper = fake
    tmp_path = tmp_path.resolve()
    env = run_env([], clean_env(ACKPT_LIB=lib.name, ACKPT_HELPER=helper.name), cwd=tmp_path)
    assert env["LD_PRELOAD"] == str(lib)
    assert env["ACKPT_HELPER"] == str(helper)


def test_dir_becomes_absolute_realpath(fake, tmp_path):
    lib, helper = fake
    tmp_path = tmp_path.resolve()
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    env = run_env(["--dir", "alias/ckpt", "--dir=./new/../other", "--dir", str(tmp_path) + "//x/"],
                  clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper)), cwd=tmp_path)
    assert env["ACKPT_PATHS"] == f"{real}/ckpt:{tmp_path}/other:{tmp_path}/x"


def test_dir_appends_to_existing_paths(fake, tmp_path):
    lib, helper = fake
    tmp_path = tmp_path.resolve()
    env = run_env(["--dir", str(tmp_path)],
                  clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper), ACKPT_PATHS="/a:/b"))
    assert env["ACKPT_PATHS"] == f"/a:/b:{tmp_path}"


def test_command_arguments_and_exit_status(fake):
    lib, helper = fake
    env = clean_env(ACKPT_LIB=str(lib), ACKPT_HELPER=str(helper))
    # Option parsing stops at the first non-option: --log belongs to the command.
    p = run(["sh", "-c", 'printf "%s|" "$@"; exit 7', "sh", "--log", "a b"], env)
    assert p.returncode == 7
    assert p.stdout == "--log|a b|"

    p = run(["no-such-command-ackpt"], env)
    assert p.returncode == 127
    assert p.stderr.startswith("ackpt-run: ")


def test_source_checkout_fallback(tmp_path):
    """Without ACKPT_LIB, a launcher in <repo>/scripts uses <repo>/build."""
    tmp_path = tmp_path.resolve()
    (tmp_path / "scripts").mkdir()
    launcher = tmp_path / "scripts" / "ackpt-run"
    shutil.copy(LAUNCHER, launcher)
    p = run(["env"], clean_env(), launcher=launcher)
    assert p.returncode == 2
    assert p.stderr == NOT_FOUND + "\n"

    lib = tmp_path / "build" / "src" / "shim" / "libackpt.so"
    helper = tmp_path / "build" / "src" / "helper" / "ackpt-helper"
    lib.parent.mkdir(parents=True)
    helper.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    shutil.copy("/bin/true", helper)
    env = run_env([], clean_env(), launcher=launcher)
    assert env["LD_PRELOAD"] == str(lib)
    assert env["ACKPT_HELPER"] == str(helper)


def test_installed_copy_uses_substituted_paths(fake, tmp_path):
    """What meson's configure_file makes of the script: the placeholders filled in."""
    lib, helper = fake
    tmp_path = tmp_path.resolve()
    text = LAUNCHER.read_text()
    # configure_file rewrites every @WORD@; only these may appear.
    assert sorted(set(re.findall(r"@[-a-zA-Z0-9_]+@", text))) == [
        "@ACKPT_INSTALLED_HELPER@", "@ACKPT_INSTALLED_LIB@", "@ACKPT_VERSION@"]
    assert "\\@" not in text
    text = (text.replace("@ACKPT_INSTALLED_LIB@", str(lib))
                .replace("@ACKPT_INSTALLED_HELPER@", str(helper))
                .replace("@ACKPT_VERSION@", "9.9.9"))
    installed = tmp_path / "bin" / "ackpt-run"
    installed.parent.mkdir()
    installed.write_text(text)
    installed.chmod(installed.stat().st_mode | stat.S_IXUSR)

    env = run_env([], clean_env(), launcher=installed)
    assert env["LD_PRELOAD"] == str(lib)
    assert env["ACKPT_HELPER"] == str(helper)
    assert run(["--version"], clean_env(), launcher=installed).stdout == "ackpt-run 9.9.9\n"

    # ACKPT_LIB still wins over the installed path.
    other = tmp_path / "other.so"
    other.write_bytes(b"")
    env = run_env([], clean_env(ACKPT_LIB=str(other)), launcher=installed)
    assert env["LD_PRELOAD"] == str(other)
