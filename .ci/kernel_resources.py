"""The compiled kernels' resources, from ptxas's report (`nvcc -Xptxas -v`, one log per
architecture): one row per kernel family, dtype and architecture (instantiations, registers,
stack frame, spilled bytes, and the resident warps per SM that the registers allow at the
family's block size). A spill, or a per-thread array the compiler could not keep in
registers (a stack frame), is a round trip to memory in the inner loop (csrc/cuda/NOTES.md).
The aim is none; the kernels are not there yet, so the check is a ratchet: it fails (exit 1)
where a family's largest stack frame or spill grows past the committed baseline
(.ci/kernel_resources.json; a family not in it may have none), and says where one shrank so
that the baseline can be lowered (--write-baseline).

    python .ci/kernel_resources.py PTXAS_LOG... [--markdown] [--write-baseline]
"""

import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = Path(__file__).resolve().parent / "kernel_resources.json"
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def block_sizes():
    """Threads per block of each kernel family (the __launch_bounds__ they are compiled for),
    read from the headers that define them."""
    cuda = ROOT / "csrc" / "cuda"
    trace = int(
        re.search(r"constexpr int kThreads = (\d+);", (cuda / "trace_kernels.h").read_text())[1]
    )
    sequence = int(
        re.search(
            r"constexpr int kSequenceMaxThreads = (\d+);", (cuda / "sequence_kernels.h").read_text()
        )[1]
    )
    cell = int(
        re.search(
            r"constexpr int kCellThreads = (\d+);", (cuda / "lstm_cell_kernels.h").read_text()
        )[1]
    )
    return {
        "LstmCellKernel": cell,
        "ForwardKernel": trace,
        "BackwardKernel": trace,
        "ColumnSumKernel": trace,
        "SequenceForwardKernel": sequence,
        "SequenceBackwardKernel": sequence,
    }


def resources(log):
    """[(arch, demangled function name, {REG, STACK, SPILL_STORES, SPILL_LOADS})] of every
    entry function in a ptxas -v log of one architecture."""
    functions, current, arch = {}, None, None
    for line in Path(log).read_text(errors="replace").splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            current, arch = m[1], m[2]
            functions.setdefault(current, {})
        elif m := re.search(r"Function properties for (\S+)", line):
            current = m[1]
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
            r"(\d+) bytes spill loads",
            line,
        ):
            if current in functions:
                functions[current].update(
                    STACK=int(m[1]), SPILL_STORES=int(m[2]), SPILL_LOADS=int(m[3])
                )
        elif m := re.search(r"Used (\d+) registers", line):
            if current in functions:
                functions[current]["REG"] = int(m[1])
    names = list(functions)
    demangled = subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return [(arch, d, functions[n]) for n, d in zip(names, demangled)]


def family_of(name):
    """('ForwardKernel', 'float') for bp::kern::phased_kernel<bp::kern::ForwardKernel<float, ...>>;
    None for a function that is not one of ours."""
    m = re.search(r"phased_kernel<bp::kern::(\w+)<(\w+)", name)
    return (m[1], m[2]) if m else None


def resident_warps(registers, threads):
    """Warps per SM that `registers` per thread allow for blocks of `threads` (registers are
    allocated per warp in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    warps_per_block = -(-threads // 32)
    blocks = REGISTERS_PER_SM // (per_warp * warps_per_block)
    return min(MAX_WARPS_PER_SM, blocks * warps_per_block)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", type=Path, nargs="+", help="ptxas -v logs, one per architecture")
    parser.add_argument("--markdown", action="store_true", help="the table as markdown")
    parser.add_argument(
        "--write-baseline",
        action="store_true",
        help=f"write these stack frames and spills to {BASELINE.name}",
    )
    args = parser.parse_args()
    threads = block_sizes()
    groups = defaultdict(list)
    for arch, name, res in [r for log in args.logs for r in resources(log)]:
        family = family_of(name)
        if family is not None:
            groups[" ".join((*family, arch))].append(res)
    if not groups:
        sys.exit(f"no kernels of ours in {', '.join(map(str, args.logs))}")
    header = [
        "kernel",
        "dtype",
        "arch",
        "instances",
        "threads/block",
        "registers (max)",
        "stack frame B (max)",
        "spill stores B (max)",
        "warps/SM by registers (min)",
    ]
    rows, worst = [], {}
    for key, items in sorted(groups.items()):
        family = key.split()[0]
        regs = max(r.get("REG", 0) for r in items)
        worst[key] = dict(
            stack=max(r.get("STACK", 0) for r in items),
            spill=max(r.get("SPILL_STORES", 0) for r in items),
        )
        rows.append(
            [
                *key.split(),
                len(items),
                threads[family],
                regs,
                worst[key]["stack"],
                worst[key]["spill"],
                resident_warps(regs, threads[family]),
            ]
        )
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(map(str, row)) + " |")
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for row in [header, *rows]:
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    if args.write_baseline:
        BASELINE.write_text(json.dumps(worst, indent=1, sort_keys=True) + "\n")
        print(f"wrote {BASELINE}")
        return
    baseline = json.loads(BASELINE.read_text()) if BASELINE.exists() else {}
    none = dict(stack=0, spill=0)
    worse = [
        f"{key}: {kind} {worst[key][kind]} B, baseline {baseline.get(key, none)[kind]} B"
        for key in worst
        for kind in ("stack", "spill")
        if worst[key][kind] > baseline.get(key, none)[kind]
    ]
    better = [
        key
        for key in worst
        if key in baseline
        and worst[key] != baseline[key]
        and all(worst[key][k] <= baseline[key][k] for k in ("stack", "spill"))
    ]
    if better:
        print("\nbelow the baseline (lower it: --write-baseline):", ", ".join(better))
    if worse:
        print("\nstack frames or spills past the baseline:", *worse, sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
