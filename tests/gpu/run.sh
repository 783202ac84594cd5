#!/usr/bin/env bash
# shellcheck disable=SC2317,SC2012,SC2015  # functions run through run_step; ls of known names
# tests/gpu/run.sh: the device-memory checks (issue 5) on a machine with an
# NVIDIA GPU, in one self-contained run of under five minutes.  Each check
# prints "PASS <name> <figures>" or "FAIL <name> <why>"; the last line is
# "N passed, M failed" and the exit status is 0 only when nothing failed.
# With $OUT set, the same lines go to $OUT/gpu-results.txt and each step's
# log to $OUT/gpu-logs/.
#
#   bash tests/gpu/run.sh                    build, then every check
#   bash tests/gpu/run.sh --build-only       build and check the library only
#   bash tests/gpu/run.sh --prepare-liburing DIR
#                                            copy this machine's liburing
#                                            (headers + liburing.a) into DIR
#
# What it needs on the GPU machine: an NVIDIA driver (libcuda.so.1), a C
# compiler, cuda.h and cuda_runtime_api.h (from /usr/local/cuda, $CUDA_HOME
# or the nvidia-* wheels torch installs), libcudart (same places), nvcc if
# there is one (without it the test programs are built as C++ with g++ and
# fill device memory with copies instead of kernels), and a python that
# imports torch with CUDA (python3/python on PATH, <repo>/.venv, /opt/venv,
# /opt/conda, or $ACKPT_GPU_PYTHON).  No network.
#
# Building ackpt: with meson, ninja, pkg-config's liburing and cuda.h under
# /usr/local/cuda/include or /usr/include, the meson build (-Dcuda=enabled);
# otherwise the sources are compiled directly with cc (a handful of files)
# against a config.h written here.  The helper needs liburing; a machine
# without the package can use a carried copy, looked for in this order:
#   $ACKPT_LIBURING_DIR, <repo>/shared/liburing, <repo>/third_party/liburing
# each either an install tree (include/liburing.h, lib/liburing.a; make one
# on a machine that has liburing with --prepare-liburing) or a liburing
# source tree (configure, src/), built here.  Then the system's liburing.
# Without any: "FAIL build", exit 1.
#
# Knobs: ACKPT_GPU_BUILD=cc (skip meson), ACKPT_GPU_WORK (scratch directory,
# default a new /tmp/ackpt-gpu.XXXXXX, removed at the end unless
# ACKPT_GPU_KEEP=1), ACKPT_GPU_BUDGET (seconds, default 285).
set -u

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo" || exit 2

t_start=$(date +%s)
budget=${ACKPT_GPU_BUDGET:-285}
passed=0
failed=0
mode=all

usage() {
	sed -n '3,/^set -u/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

prepare_liburing() {
	local dst=$1 inc lib
	inc=$(pkg-config --variable=includedir liburing 2>/dev/null || echo /usr/include)
	lib=$(pkg-config --variable=libdir liburing 2>/dev/null || true)
	[ -f "$lib/liburing.a" ] || lib=$(dirname "$(ls /usr/lib/*/liburing.a /usr/lib64/liburing.a /usr/lib/liburing.a 2>/dev/null | head -1)" 2>/dev/null)
	if [ ! -f "$inc/liburing.h" ] || [ ! -f "$lib/liburing.a" ]; then
		echo "no liburing.h and liburing.a on this machine (apt install liburing-dev)" >&2
		return 1
	fi
	mkdir -p "$dst/include" "$dst/lib" || return 1
	cp "$inc/liburing.h" "$dst/include/" && cp -r "$inc/liburing" "$dst/include/" &&
		cp "$lib/liburing.a" "$dst/lib/" || return 1
	echo "liburing $(pkg-config --modversion liburing 2>/dev/null) copied to $dst"
}

case "${1:-}" in
-h|--help) usage; exit 0 ;;
--build-only) mode=build ;;
--prepare-liburing)
	[ $# -eq 2 ] || { echo "usage: $0 --prepare-liburing DIR" >&2; exit 2; }
	prepare_liburing "$2"
	exit $? ;;
"") ;;
*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

work=${ACKPT_GPU_WORK:-}
[ -n "$work" ] || work=$(mktemp -d /tmp/ackpt-gpu.XXXXXX) || exit 2
mkdir -p "$work" || exit 2
results=
logs=$work/logs
if [ -n "${OUT:-}" ]; then
	mkdir -p "$OUT/gpu-logs" && results=$OUT/gpu-results.txt && logs=$OUT/gpu-logs
	: > "$results"
fi
mkdir -p "$logs"

say() {
	printf '%s\n' "$*"
	[ -z "$results" ] || printf '%s\n' "$*" >> "$results"
}
pass() { passed=$((passed + 1)); say "PASS $*"; }
fail() { failed=$((failed + 1)); say "FAIL $*"; }

# Seconds left of the budget, and a step's timeout: what it wants, capped by that.
left() { echo $((budget - ($(date +%s) - t_start))); }
limit() {
	local l
	l=$(( $(left) - 5 ))
	[ "$l" -lt "$1" ] && echo "$l" || echo "$1"
}

# run_step NAME SECONDS CMD...: run CMD (a program or one of the functions
# below, exported to a child bash) under timeout, output to $logs/NAME.log.
# Returns CMD's status (124: timed out, 125: no time left).
run_step() {
	local name=$1 want=$2 t rc
	shift 2
	t=$(limit "$want")
	if [ "$t" -lt 5 ]; then
		echo "no time left in the ${budget}s budget" > "$logs/$name.log"
		return 125
	fi
	timeout -k 5 "$t" bash -c '"$@"' run_step "$@" > "$logs/$name.log" 2>&1
	rc=$?
	[ $rc -ne 124 ] || echo "TIMEOUT after ${t}s" >> "$logs/$name.log"
	return $rc
}

# Why a step failed, on one line: its status and the last lines of its log.
why() {
	local name=$1 rc=$2
	printf 'exit %s: %s' "$rc" "$(tail -n 4 "$logs/$name.log" 2>/dev/null | tr '\n' '|' | cut -c1-400)"
}

# The value of "key value" in a log.
kv() { sed -n "s/^$2 //p" "$logs/$1.log" | tail -n 1; }

# a/b with two decimals; "?" when b is 0 or missing.
ratio() { awk -v a="${1:-0}" -v b="${2:-0}" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else printf "?" }'; }

finish() {
	if [ "${ACKPT_GPU_KEEP:-0}" != 1 ] && [ -z "${ACKPT_GPU_WORK:-}" ]; then
		rm -rf "$work"
	else
		rm -rf "$work/dw" "$work/st" "$work/torch"
	fi
	say "$passed passed, $failed failed"
	[ "$failed" -eq 0 ]
	exit $?
}

# ---- the machine --------------------------------------------------------

say "INFO repo $repo, scratch $work ($(stat -f -c %T "$work" 2>/dev/null) filesystem, $(df -h --output=avail "$work" 2>/dev/null | tail -1 | tr -d ' ') free)"
if command -v nvidia-smi >/dev/null; then
	say "INFO gpu $(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
else
	say "INFO gpu: no nvidia-smi on PATH"
fi

py=
pyinfo=
for cand in "${ACKPT_GPU_PYTHON:-}" python3 python "$repo/.venv/bin/python" /opt/venv/bin/python \
	/opt/conda/bin/python "$HOME/venv/bin/python" "$HOME/.venv/bin/python"; do
	[ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
	if pyinfo=$(timeout 90 "$cand" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null); then
		py=$(command -v "$cand")
		break
	fi
done
if [ -n "$py" ]; then
	say "INFO python $py, $(printf '%s' "$pyinfo" | tail -n 1)"
else
	say "INFO no python that imports torch"
fi

# Directories of the nvidia-* wheels (nvidia/cu13, nvidia/cuda_runtime, ...).
wheel_dirs() {
	[ -n "$py" ] || return 0
	timeout 60 "$py" - <<-'EOF' 2>/dev/null
	import glob, os
	try:
	    import nvidia
	    for p in nvidia.__path__:
	        for d in sorted(glob.glob(os.path.join(p, "*"))):
	            print(d)
	except Exception:
	    pass
	try:
	    import triton, os.path as op
	    print(op.join(op.dirname(triton.__file__), "backends", "nvidia"))
	except Exception:
	    pass
	EOF
}

cuda_inc=
cudart_dir=
cudart_lib=
for d in ${CUDA_HOME:+"$CUDA_HOME"} ${CUDA_PATH:+"$CUDA_PATH"} /usr/local/cuda /usr $(wheel_dirs); do
	if [ -z "$cuda_inc" ] && [ -f "$d/include/cuda.h" ] && [ -f "$d/include/cuda_runtime_api.h" ]; then
		cuda_inc=$d/include
	fi
	for l in "$d/lib64" "$d/lib" "$d/lib/x86_64-linux-gnu"; do
		[ -z "$cudart_lib" ] || break
		f=$(ls "$l"/libcudart.so "$l"/libcudart.so.[0-9]* 2>/dev/null | head -1)
		if [ -n "$f" ]; then
			cudart_dir=$l
			cudart_lib=$(basename "$f")
		fi
	done
done
say "INFO cuda headers ${cuda_inc:-none}, libcudart ${cudart_dir:+$cudart_dir/}${cudart_lib:-none}"

# ---- build ackpt --------------------------------------------------------

lib=
helper=

build_meson() {
	meson setup "$work/build" -Dcuda=enabled --buildtype=debugoptimized && meson compile -C "$work/build"
}

# Sets uring_cflags/uring_libs from a carried copy or the system; 1 if none.
find_liburing() {
	local d
	for d in "${ACKPT_LIBURING_DIR:-}" "$repo/shared/liburing" "$repo/third_party/liburing"; do
		[ -n "$d" ] && [ -d "$d" ] || continue
		if [ -f "$d/include/liburing.h" ] && [ -f "$d/lib/liburing.a" ]; then
			uring_cflags="-I$d/include"
			uring_libs="$d/lib/liburing.a"
			echo "liburing: carried install tree $d"
			return 0
		fi
		if [ -f "$d/src/include/liburing.h" ] && [ -f "$d/src/liburing.a" ]; then
			uring_cflags="-I$d/src/include"
			uring_libs="$d/src/liburing.a"
			echo "liburing: carried built source tree $d"
			return 0
		fi
		if [ -x "$d/configure" ] && [ -d "$d/src" ]; then
			echo "liburing: building the carried source tree $d"
			rm -rf "$work/liburing-src" && cp -r "$d" "$work/liburing-src" &&
				(cd "$work/liburing-src" && ./configure --prefix="$work/liburing" &&
					make -C src -j"$(nproc)") || return 1
			uring_cflags="-I$work/liburing-src/src/include"
			uring_libs="$work/liburing-src/src/liburing.a"
			return 0
		fi
	done
	if pkg-config --exists liburing 2>/dev/null; then
		uring_cflags=$(pkg-config --cflags liburing)
		uring_libs=$(pkg-config --libs liburing)
		echo "liburing: system (pkg-config)"
		return 0
	fi
	if printf '#include <liburing.h>\nint main(void){struct io_uring r; return io_uring_queue_init(1,&r,0);}\n' |
		cc -x c -o /dev/null - -luring 2>/dev/null; then
		uring_cflags=
		uring_libs=-luring
		echo "liburing: system (-luring)"
		return 0
	fi
	echo "liburing: not found (no package, no carried copy in \$ACKPT_LIBURING_DIR, shared/liburing or third_party/liburing)"
	return 1
}

build_cc() {
	local b=$work/build-cc version cflags
	[ -n "$cuda_inc" ] || { echo "no cuda.h: the device path would not be compiled in"; return 1; }
	find_liburing || return 3
	mkdir -p "$b" || return 1
	version=$(sed -n "s/^ *version *: *'\([^']*\)'.*/\1/p" meson.build | head -1)
	cat > "$b/config.h" <<-EOF
	/* written by tests/gpu/run.sh (the meson build writes it otherwise) */
	#pragma once
	#define ACKPT_VERSION "${version:-unknown}"
	#define ACKPT_LIBEXECDIR "/usr/local/libexec"
	#define ACKPT_HAVE_CUDA_HEADERS 1
	#define ACKPT_HAVE_UPLOAD 0
	#define ACKPT_HAVE_MSC 0
	EOF
	cflags="-std=gnu11 -O2 -g -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers
		-Wno-format-truncation -Wno-nonnull-compare -U_FILE_OFFSET_BITS -D_GNU_SOURCE
		-fvisibility=hidden -pthread -I$b -Isrc/common -Iinclude"
	local sys_inc=
	[ "$cuda_inc" = /usr/include ] || sys_inc="-isystem $cuda_inc"
	# shellcheck disable=SC2086
	cc $cflags $sys_inc -fPIC -shared -o "$b/libackpt.so" src/shim/*.c src/common/*.c \
		-Wl,--version-script=src/shim/libackpt.map -Wl,-z,nodelete -ldl -lpthread -lsodium || return 1
	# without uploads (libcurl is not needed for the device path): upload_none.c
	local f helper_src=()
	for f in src/helper/*.c; do
		case $f in
		*/upload.c | */s3conf.c) ;;
		*) helper_src+=("$f") ;;
		esac
	done
	# shellcheck disable=SC2086
	cc $cflags $uring_cflags -o "$b/ackpt-helper" "${helper_src[@]}" src/common/*.c \
		$uring_libs -lpthread -lsodium
}
export -f build_meson find_liburing build_cc
export repo work cuda_inc

t0=$(date +%s)
how=
if [ "${ACKPT_GPU_BUILD:-auto}" != cc ] && command -v meson >/dev/null && command -v ninja >/dev/null &&
	pkg-config --exists liburing libsodium 2>/dev/null &&
	{ [ -f /usr/local/cuda/include/cuda.h ] || [ -f /usr/include/cuda.h ]; }; then
	if run_step build-meson 150 build_meson; then
		how=meson
		lib=$work/build/src/shim/libackpt.so
		helper=$work/build/src/helper/ackpt-helper
	fi
fi
if [ -z "$how" ]; then
	run_step build-cc 150 build_cc
	rc=$?
	if [ $rc -eq 0 ]; then
		how=cc
		lib=$work/build-cc/libackpt.so
		helper=$work/build-cc/ackpt-helper
	elif [ $rc -eq 3 ]; then
		fail build "liburing missing: $(tail -n 1 "$logs/build-cc.log")"
	else
		fail build "$(why build-cc $rc)"
	fi
fi
if [ -n "$how" ] && ! command -v readelf >/dev/null; then
	fail build "readelf (binutils) not found: cannot check DT_NEEDED"
	how=
fi
if [ -n "$how" ]; then
	if readelf -d "$lib" | grep NEEDED | grep -qiE 'libcuda|cudart'; then
		fail build "libackpt.so has CUDA in DT_NEEDED: $(readelf -d "$lib" | grep NEEDED | tr -s ' ' | tr '\n' ' ')"
		how=
	elif ! grep -q cuMemHostRegister_v2 "$lib"; then
		fail build "libackpt.so was built without the device path (no cuda.h found by the build)"
		how=
	else
		pass build "$how $(($(date +%s) - t0))s, $lib; DT_NEEDED: $(readelf -d "$lib" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
	fi
fi
[ "$mode" = build ] && finish
[ -n "$how" ] || finish

# ---- build the test programs -------------------------------------------

nvcc=$(command -v nvcc || true)
for c in ${CUDA_HOME:+"$CUDA_HOME/bin/nvcc"} /usr/local/cuda/bin/nvcc; do
	[ -n "$nvcc" ] || { [ -x "$c" ] && nvcc=$c; }
done

build_prog() {
	local src=$1 exe=$2
	if [ -n "$nvcc" ]; then
		"$nvcc" -O2 -arch=native -Iinclude -o "$exe" "$src" -ldl ||
			"$nvcc" -O2 -arch=sm_90 -Iinclude -o "$exe" "$src" -ldl
	else
		[ -n "$cuda_inc" ] && [ -n "$cudart_lib" ] || { echo "no nvcc, and no cuda headers + libcudart for g++"; return 1; }
		g++ -O2 -x c++ -isystem "$cuda_inc" -Iinclude -o "$exe" "$src" \
			-L"$cudart_dir" -l:"$cudart_lib" -Wl,-rpath,"$cudart_dir" -ldl
	fi
}
build_progs() {
	build_prog tests/gpu/devwrite.cu "$work/devwrite" && build_prog tests/gpu/d2h_bench.cu "$work/d2h_bench"
}
export -f build_prog build_progs
export nvcc cudart_dir cudart_lib
if run_step build-progs 120 build_progs; then
	pass build_programs "${nvcc:-g++ (no nvcc: fills by cudaMemcpyAsync)}"
	progs=1
else
	fail build_programs "$(why build-progs $?)"
	progs=
fi

shim_run() {
	# shim_run DIR [ENV=VALUE...] -- CMD...
	local dir=$1
	shift
	local envs=()
	while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
	shift
	env ACKPT_LIB="$lib" ACKPT_HELPER="$helper" ACKPT_LOG=info ${envs[@]+"${envs[@]}"} \
		bash scripts/ackpt-run --dir "$dir" -- "$@"
}
export -f shim_run
export lib helper

# ---- 1. device buffers written with write(), fwrite(), writev() ---------

if [ -n "$progs" ]; then
	mkdir -p "$work/dw"
	run_step devwrite 90 shim_run "$work/dw" ACKPT_STAGING=512M -- "$work/devwrite" files "$work/dw"
	rc=$?
	if [ $rc -eq 0 ] && [ "$(kv devwrite RESULT)" = ok ]; then
		same=yes
		for i in 0 1 2; do
			cmp -s "$work/dw/write_$i.bin" "$work/dw/fwrite_$i.bin" || same=no
		done
		b=$(kv devwrite bytes)
		s=$(kv devwrite write_seconds)
		if [ $same = yes ]; then
			pass devwrite_files "7 files, $((b / 1048576)) MiB from 1/64/256 MiB cudaMalloc buffers (write, unbuffered fwrite, writev), $(kv devwrite fill) queued, match the device after ackpt_wait (write_i == fwrite_i again after exit); writes took ${s}s ($(ratio "$(ratio "$b" "$s")" 1000000000) GB/s), arena 512M"
		else
			fail devwrite_files "files matched in the process but write_i.bin != fwrite_i.bin after exit"
		fi
	else
		fail devwrite_files "$(grep -m1 MISMATCH "$logs/devwrite.log" || why devwrite $rc)"
	fi
	rm -rf "$work/dw"
fi

# ---- 2. D2H bandwidth by kind of host memory ---------------------------

if [ -n "$progs" ]; then
	run_step d2h 60 "$work/d2h_bench" 1024
	rc=$?
	if [ $rc -eq 0 ]; then
		pg=$(kv d2h pageable_gbps)
		mf=$(kv d2h memfd_gbps)
		rg=$(kv d2h registered_gbps)
		mh=$(kv d2h mallochost_gbps)
		figures="1 GiB D2H: pageable $pg GB/s, memfd arena unregistered $mf GB/s, registered arena $rg GB/s, cudaMallocHost $mh GB/s; registered/pageable $(ratio "$rg" "$pg"), registered/cudaMallocHost $(ratio "$rg" "$mh"); cudaHostRegister $(kv d2h register_gbps) GB/s; cuPointerGetAttribute $(kv d2h attr_host_ns) ns (host ptr) $(kv d2h attr_dev_ns) ns (device ptr); idle cuCtxSynchronize $(kv d2h ctxsync_idle_ns) ns"
		if awk -v r="$rg" -v m="$mh" 'BEGIN { exit !(r >= 0.7 * m) }'; then
			pass d2h_bandwidth "$figures"
		else
			fail d2h_bandwidth "registered arena below 0.7 x cudaMallocHost: $figures"
		fi
	else
		fail d2h_bandwidth "$(why d2h $rc)"
	fi
fi

# ---- 3. stall of a 4 GiB device write against cudaMemcpy to pinned memory

if [ -n "$progs" ]; then
	mkdir -p "$work/st"
	run_step stall 150 shim_run "$work/st" ACKPT_STAGING=5G ACKPT_PIN=eager -- "$work/devwrite" stall "$work/st" 4
	rc=$?
	if [ $rc -eq 0 ] && [ "$(kv stall RESULT)" = ok ]; then
		b=$(kv stall bytes)
		sw=$(kv stall shim_write_seconds)
		mc=$(kv stall memcpy_pinned_seconds)
		r=$(ratio "$sw" "$mc")
		figures="4 GiB device write() under the shim ${sw}s ($(ratio "$(ratio "$b" "$sw")" 1000000000) GB/s) vs cudaMemcpy to cudaMallocHost ${mc}s ($(ratio "$(ratio "$b" "$mc")" 1000000000) GB/s): ratio $r; first 1 MiB device write (eager pin of the $(($(kv stall staging_bytes) / 1073741824)) GiB arena) $(kv stall first_write_seconds)s; session start $(kv stall open_seconds)s; ACKPT_STAGING=5G ACKPT_PIN=eager"
		if awk -v r="$r" 'BEGIN { exit !(r != "?" && r <= 2.0) }'; then
			pass stall_4gib "$figures"
		else
			fail stall_4gib "ratio above 2.0 (copies not at pinned speed?): $figures"
		fi
	else
		fail stall_4gib "$(grep -m1 MISMATCH "$logs/stall.log" || why stall $rc)"
	fi
	rm -rf "$work/st"
fi

# ---- 4. torch.save and DCP of CUDA tensors, with and without the shim ---

if [ -z "$py" ]; then
	fail torch "no python on this machine imports torch (set ACKPT_GPU_PYTHON)"
else
	mkdir -p "$work/torch/plain" "$work/torch/shim"
	run_step torch-plain 90 "$py" tests/gpu/torch_check.py save "$work/torch/plain"
	rc1=$?
	rc2=125
	[ $rc1 -ne 0 ] || { run_step torch-shim 90 shim_run "$work/torch/shim" -- "$py" tests/gpu/torch_check.py save "$work/torch/shim"; rc2=$?; }
	if [ $rc1 -ne 0 ]; then
		fail torch_save "the run without the shim failed: $(why torch-plain $rc1)"
	elif [ "$(kv torch-shim shim)" != yes ]; then
		fail torch_save "the run under the shim failed before its saves were done: $(why torch-shim $rc2)"
	else
		run_step torch-compare 90 "$py" tests/gpu/torch_check.py compare "$work/torch/plain" "$work/torch/shim"
		rc3=$?
		tp=$(kv torch-plain torch_save_seconds)
		ts=$(kv torch-shim torch_save_seconds)
		dp=$(kv torch-plain dcp_save_seconds)
		ds=$(kv torch-shim dcp_save_seconds)
		if [ -z "$(kv torch-compare dcp_load_equal)" ]; then
			fail torch_save "compare failed: $(why torch-compare $rc3)"
		else
			if [ "$(kv torch-compare torch_save_identical)" = yes ] && [ "$(kv torch-compare torch_load_equal)" = yes ]; then
				pass torch_save "$(($(kv torch-compare torch_save_bytes) / 1048576)) MiB of CUDA tensors byte-identical to the run without the shim, loads back equal; torch.save ${tp}s plain vs ${ts}s under the shim (ratio $(ratio "$ts" "$tp"))"
			else
				fail torch_save "identical=$(kv torch-compare torch_save_identical) load_equal=$(kv torch-compare torch_load_equal)"
			fi
			if [ "$(kv torch-compare dcp_identical)" = yes ] && [ "$(kv torch-compare dcp_load_equal)" = yes ]; then
				pass torch_dcp "$(kv torch-compare dcp_files) .distcp file(s), $(($(kv torch-compare dcp_bytes) / 1048576)) MiB byte-identical, dcp.load equal; dcp.save ${dp}s plain vs ${ds}s under the shim (ratio $(ratio "$ds" "$dp"))"
			else
				fail torch_dcp "identical=$(kv torch-compare dcp_identical) load_equal=$(kv torch-compare dcp_load_equal)"
			fi
		fi
		rb=$(kv torch-shim raw_bytes)
		rs=$(kv torch-shim raw_write_seconds)
		if [ $rc2 -eq 0 ] && [ "$(kv torch-shim raw_match)" = yes ]; then
			pass torch_data_ptr_write "write(fd, tensor.data_ptr(), $((rb / 1048576)) MiB) of a CUDA tensor under the shim matches tensor.cpu(); ${rs}s ($(ratio "$(ratio "$rb" "$rs")" 1000000000) GB/s)"
		else
			fail torch_data_ptr_write "raw_match=$(kv torch-shim raw_match): $(why torch-shim $rc2)"
		fi
	fi
fi

finish
