#!/bin/sh
# libackpt.so must export only the libc names it wraps and the public API
# (a leaked symbol in a preload library can override the application's),
# and must never depend on CUDA libraries at link time.
set -eu
lib=$1
map=$2
nm -D --defined-only "$lib" | awk '{print $3}' | sed 's/@.*//' | sort -u > exports.$$
sed -n 's/^    \([A-Za-z_0-9]*\);$/\1/p' "$map" | sort -u > allowed.$$
extra=$(comm -23 exports.$$ allowed.$$)
rm -f exports.$$ allowed.$$
if [ -n "$extra" ]; then
	echo "unexpected exported symbols: $extra"
	exit 1
fi
for must in write open64 fopen64 fclose lseek64 fsync rename statx __xstat ackpt_wait ackpt_get_stats ackpt_wait_uploaded; do
	nm -D --defined-only "$lib" | awk '{print $3}' | grep -qx "$must" || { echo "missing export: $must"; exit 1; }
done
if readelf -d "$lib" | grep NEEDED | grep -Ei 'cuda|cudart'; then
	echo "libackpt.so links CUDA"
	exit 1
fi
echo "exports ok"
