#!/usr/bin/env bash
# The GPU verification in one command, for a machine with a GPU, a CUDA build of torch and nvcc,
# and no network (a lent GPU for a few minutes): builds the extension in place for the visible
# GPU, then runs, each part under its own time limit so that a part that runs over still leaves
# the report of the others:
#   1. the selftest without its tests (python -m backpropamine_cuda.selftest --no-tests): every
#      kernel against the reference at the papers' sizes, speed against the eager reference and
#      the HBM floor, GPU operations per step, the PTB stack's memory at batch 20 and 80;
#   2. python_tests/ops/test_cuda.py (among them the native kernels against the emulated ones at
#      multi-tile sizes, the CUDA-graph captures);
#   3. compute-sanitizer memcheck, racecheck, synccheck and initcheck over the GPU tests at a
#      small multi-tile size, when the tool is on the machine;
#   4. every other test on the GPU (pytest -k "cuda and not emulat": the op tests through the
#      `fused` fixture), on 8 workers when pytest-xdist is there, until the budget is spent.
# A test that crashes its process (a segmentation fault) is run again alone with torch's
# fatal-signal handler, for the native stack of the crash (crashes.log).
# The report (markdown, committed as it is) and the logs go to benchmarks/results/gpu/, or to
# $GPU_CHECK_OUT.
#
#   bash benchmarks/gpu_check.sh                      # about 10 minutes on an H200
#   GPU_CHECK_BUDGET=300 bash benchmarks/gpu_check.sh # every part stops by 300 s after the start
#   GPU_CHECK_PARTS="tests ops" bash benchmarks/gpu_check.sh  # the build and parts 2 and 4 only
#                                   (parts: selftest tests sanitizer ops; default all four)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-benchmarks/results/gpu}
mkdir -p "$out"
report=$out/gpu_check.md
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-560}
parts=" ${GPU_CHECK_PARTS:-selftest tests sanitizer ops} "
wanted() { [[ $parts == *" $1 "* ]]; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$SECONDS

say() { printf '%s\n' "$@" | tee -a "$report"; }
# run_part LIMIT LOG CMD...: CMD under min(LIMIT, the time left), its output in LOG; prints
# "exit N" or "stopped at the time limit of S s".
run_part() {
  local limit=$1 log=$2 left=$((budget - (SECONDS - start)))
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "not run: the budget of $budget s is spent"
    return
  fi
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  if ((rc == 124 || rc == 137)); then
    echo "stopped at the time limit of $limit s"
  else
    echo "exit $rc in $((SECONDS - t0)) s"
  fi
}

# GPU_CHECK_COMMIT first: the copy of a checkout on a lent machine may carry stale git metadata.
commit=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
: > "$report"
say "# GPU check" "" \
  "Written by \`bash benchmarks/gpu_check.sh\` at commit $commit on $(date -u '+%Y-%m-%d %H:%M UTC')." \
  "" "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)" \
  "- nvcc: $(nvcc --version 2>&1 | grep -o 'release [0-9.]*' || echo 'not found')" \
  "- $("$python" -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")' 2>&1)" \
  "- CPU: $(nproc) cores; time budget $budget s"

say "" "## Build" ""
# The visible GPU's architecture only (cuda_arch_list in _build_config.py), every core.
status=$(MAX_JOBS=$(nproc) run_part 300 "$out/build.log" "$python" setup.py build_ext --inplace)
say "\`python setup.py build_ext --inplace\`: $status (log: build.log)"
if ! "$python" -c "import backpropamine_cuda as bp, sys; sys.exit(not bp.fused.has_cuda_kernels())" \
    >> "$out/build.log" 2>&1; then
  say "" "The extension has no CUDA kernels; the end of build.log:" "" '```'
  tail -n 40 "$out/build.log" | tee -a "$report"
  say '```'
  exit 1
fi

if wanted selftest; then
  say "" "## Selftest" ""
  status=$(run_part 150 "$out/selftest.log" bash -c \
    "'$python' -m backpropamine_cuda.selftest --require-gpu --no-tests | tee -a '$report'")
  say "" "Selftest: $status (progress and errors: selftest.log)"
fi

# On pytest-xdist's workers when it is there: a test that crashes its worker is reported as such
# and the others go on (one crash stopped the serial run before it printed any traceback).
workers=()
"$python" -c "import xdist" 2>/dev/null && workers=(-n 8)
# tests LIMIT LOG PYTEST_ARGS...: a pytest run under run_part; its failures, named one per line
# as they happen (-v), listed in the report even when the run is stopped at its limit.
tests() {
  local limit=$1 log=$2 status
  shift 2
  status=$(OMP_NUM_THREADS=2 run_part "$limit" "$log" "$python" -m pytest -v --tb=short \
    -p no:cacheprovider "${workers[@]}" "$@")
  say "\`pytest $*\`: $status; $(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -n 1) (log: $(basename "$log"))"
  grep -E "(FAILED|ERROR)( |$)" "$log" | grep -v "^=" | head -n 30 | sed 's/^/    /' | tee -a "$report"
  backtraces "$log"
}
# backtraces LOG: each test whose worker crashed in LOG (xdist: "node down", then the test
# FAILED on that worker) run alone with torch's fatal-signal handler on, which prints the native
# stack of every thread (no debugger needed); into crashes.log.
backtraces() {
  local test status
  for test in $(awk '/node down/ {down[$1] = 1; next}
                     $1 in down && /FAILED/ {print $NF; delete down[$1]}' "$1" | head -n 3); do
    echo "### $test" >> "$out/crashes.log"
    status=$(run_part 60 "$out/crashes.log" "$python" -c "import sys, pytest, torch
torch._C._set_print_stack_traces_on_fatal_signal(True)
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:faulthandler', '-s', sys.argv[1]]))" "$test")
    say "    crashed: $test; run alone for its native stack: $status (crashes.log)"
  done
}
if wanted tests; then
  say "" "## GPU tests" ""
  tests 90 "$out/tests_cuda.log" python_tests/ops/test_cuda.py -k "not emulat"
fi

if wanted sanitizer; then
  say "" "## compute-sanitizer" ""
  sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$sanitizer" ]; then
    say "compute-sanitizer is not on this machine: not run."
  else
    # Every kernel at a multi-tile size (N = 129: two column tiles, the RNN's whole-sequence and
    # per-step kernels, the LSTM) and the rollout step.
    selection="tiled and 129 or rollout_step_captures"
    say "Over \`pytest python_tests/ops/test_cuda.py -k '$selection'\` (log: sanitizer.log):" ""
    for tool in memcheck racecheck synccheck initcheck; do
      echo "### $tool" >> "$out/sanitizer.log"
      status=$(run_part 40 "$out/sanitizer.log" "$sanitizer" --tool "$tool" --error-exitcode 99 \
        --print-limit 10 "$python" -m pytest python_tests/ops/test_cuda.py -q \
        -p no:cacheprovider -k "$selection")
      errors=$(awk -v mark="### $tool" '$0 == mark {on = 1; next} /^### / {on = 0} on' \
        "$out/sanitizer.log" | grep -m1 "SUMMARY" || true)
      say "- $tool: $status; ${errors:-no summary line}"
    done
  fi
fi
if wanted ops; then
  say "" "## Every other test on the GPU" ""
  tests 600 "$out/tests_ops.log" python_tests --ignore=python_tests/ops/test_cuda.py \
    -k "cuda and not emulat"
fi
say "" "Done in $((SECONDS - start)) s."
