"""Sources and compiler flags of the extension, shared by setup.py (ahead-of-time build) and the
first-use build of _extension.py. Imports nothing from torch so setup.py can read it anywhere."""
from pathlib import Path

# -fopenmp: at::parallel_for is an inline OpenMP loop; without it the kernels run on one thread.
CXX_FLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]
LD_FLAGS = ["-fopenmp"]


def cpu_sources(csrc: Path):
    """The C++ sources of the CPU build, relative to the folder `csrc`."""
    return sorted(str(p) for p in [*csrc.glob("*.cpp"), *csrc.glob("cpu/*.cpp")])
