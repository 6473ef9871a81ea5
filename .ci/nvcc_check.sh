#!/usr/bin/env bash
# Compile-checks every CUDA source with nvcc for sm_80 and sm_90 against the installed torch's
# headers, on machines without a GPU, with the flags of the real build (_build_config.NVCC_FLAGS
# and torch's own nvcc flags). Fails on any error and on any warning located in our sources
# (csrc/): torch's headers are included as system headers, so their own warnings stay quiet.
# Then the resources of every kernel (.ci/kernel_resources.py: registers, stack frame, local
# memory, resident warps; fails on a stack frame or a spill).
# A CPU-only torch lacks one generated header (c10/cuda/impl/cuda_cmake_macros.h), which a
# one-line stub in a temporary directory provides.
#
#   bash .ci/nvcc_check.sh                           every csrc/**/*.cu
#   NVCC_CHECK_SOURCES="a.cu b.cu" bash .ci/nvcc_check.sh   only these (paths from the repo root)
#   NVCC=/path/to/nvcc bash .ci/nvcc_check.sh
#   NVCC_CHECK_KEEP=DIR bash .ci/nvcc_check.sh       keep ptxas's reports (sm80.log, sm90.log) in DIR
#   NVCC_CHECK_ARCHS=90 bash .ci/nvcc_check.sh       only sm_90 (a quicker look at its kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${NVCC_CHECK_SOURCES:-}" ]; then
  read -r -a sources <<< "$NVCC_CHECK_SOURCES"
else
  mapfile -t sources < <(find csrc -name '*.cu' | sort)
fi
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc check: no CUDA sources yet"
  exit 0
fi
nvcc=${NVCC:-nvcc}
command -v "$nvcc" >/dev/null || { echo "nvcc check: nvcc not found" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The flags of the real build, one per line: ours, torch's, and -isystem for torch's headers.
mapfile -t flags < <(python - <<'EOF'
import sysconfig
from pathlib import Path

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

spec = {}
exec(Path("backpropamine_cuda/_build_config.py").read_text(), spec)
print(*spec["NVCC_FLAGS"], *COMMON_NVCC_FLAGS, "-DTORCH_API_INCLUDE_EXTENSION_H", sep="\n")
for path in [*include_paths(), sysconfig.get_paths()["include"]]:
    print("-isystem", path, sep="\n")
if not (Path(include_paths()[0]) / "c10/cuda/impl/cuda_cmake_macros.h").exists():
    print("NEEDS_STUB")
EOF
)
if [ "${flags[-1]}" = NEEDS_STUB ]; then
  unset 'flags[-1]'
  mkdir -p "$tmp/stub/c10/cuda/impl"
  echo '#pragma once' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
  flags+=(-isystem "$tmp/stub")
fi

# A warning in our code: gcc's "csrc/x.cu:12:5: warning: ..." or nvcc front end's
# "csrc/x.cu(12): warning #177-D: ..." (paths as given, or absolute under this checkout).
ours="^(\./|$(pwd)/)?csrc/[^ :(]*(:[0-9]+(:[0-9]+)?:|\([0-9]+\):) warning"
# The first lines of a compiler log: the first diagnostics matter, later ones often repeat them.
show() {
  head -n 150 "$1"
  local n
  n=$(wc -l < "$1")
  if [ "$n" -gt 150 ]; then echo "... ($((n - 150)) more lines)"; fi
}

failed=0
read -r -a archs <<< "${NVCC_CHECK_ARCHS:-80 90}"
for src in "${sources[@]}"; do
  echo "nvcc check: $src"
  # One nvcc per architecture, side by side, each with its own log: ptxas's report (-v) of one
  # architecture's kernels must not interleave with the other's.
  pids=() ptxas_logs=()
  for arch in "${archs[@]}"; do
    ptxas_logs+=("$tmp/sm$arch.log")
    "$nvcc" -c "$src" -o "$tmp/out$arch.o" "${flags[@]}" -Xcompiler -fPIC,-Wall -Xptxas -v \
      -gencode "arch=compute_$arch,code=sm_$arch" > "${ptxas_logs[-1]}" 2>&1 &
    pids+=($!)
  done
  compiled=1
  for k in "${!archs[@]}"; do
    wait "${pids[$k]}" || compiled=0
  done
  log="$tmp/$(basename "$src").log"  # both logs without ptxas's resource lines
  cat "${ptxas_logs[@]}" | { grep -v "^ptxas info\|bytes stack frame" || true; } > "$log"
  rm -f "$tmp"/out*.o
  if [ "$compiled" -eq 0 ]; then
    show "$log"
    echo "nvcc check: $src FAILED to compile"
    failed=1
    continue
  elif grep -Eq "$ours|ptxas warning" "$log"; then
    show "$log"
    echo "nvcc check: $src compiles, with warnings in our code:"
    grep -E "$ours|ptxas warning" "$log" | sort | uniq -c
    failed=1
  else
    cat "$log"  # warnings outside csrc/, if any (nvcc's own notes)
  fi
  # The kernels' registers, stack frames and spills (fails on a stack frame or a spill).
  if [ -n "${NVCC_CHECK_KEEP:-}" ]; then
    mkdir -p "$NVCC_CHECK_KEEP" && cp "${ptxas_logs[@]}" "$NVCC_CHECK_KEEP/"
  fi
  if ! python .ci/kernel_resources.py "${ptxas_logs[@]}"; then
    echo "nvcc check: $src has kernels with a stack frame or spills"
    failed=1
  fi
done
[ "$failed" -eq 0 ] || exit 1
echo "nvcc check: ${#sources[@]} file(s) compiled for ${archs[*]/#/sm_}, no warnings in csrc/," \
  "no stack frame or spill past the baseline (.ci/kernel_resources.json)"
