#!/usr/bin/env bash
# Compile-checks every CUDA source with nvcc for sm_80 and sm_90 against the installed torch's
# headers, on machines without a GPU. A CPU-only torch lacks one generated header
# (c10/cuda/impl/cuda_cmake_macros.h), which a one-line stub in a temporary directory provides.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc check: no CUDA sources yet"
  exit 0
fi
nvcc=${NVCC:-nvcc}
command -v "$nvcc" >/dev/null || { echo "nvcc check: nvcc not found" >&2; exit 1; }
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_inc=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")
py_inc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for src in "${sources[@]}"; do
  echo "nvcc check: $src"
  "$nvcc" -c "$src" -o "$stub/out.o" -std=c++20 -Xcompiler -fPIC \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -I"$stub" $torch_inc -I"$py_inc" -Icsrc
done
echo "nvcc check: ${#sources[@]} file(s) compiled"
