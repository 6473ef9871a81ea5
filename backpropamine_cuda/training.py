"""What the experiments' training scripts share: checkpoints written atomically, the random
generators' states (so that a resumed run continues exactly), and CSV logs.

    from backpropamine_cuda.training import atomic_save, rng_states, set_rng_states
"""
import csv
import os
import random

import numpy as np
import torch


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: an interrupted save leaves the old file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_states():
    """Python's, NumPy's (its key array as a tensor: weights_only loading accepts tensors, not
    arrays), torch's and CUDA's random generator states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                numpy=(kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(states):
    """Restores what rng_states returned."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def start_csv(path, fields, keep=lambda row: False):
    """(Re)writes the CSV log at `path` with its header and the existing rows for which
    keep(row) is true (those a resumed run had already logged)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if keep(r)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def append_csv(path, fields, rows):
    """Appends dict rows to the CSV log at `path` (started by start_csv); returns all rows."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields).writerows(rows)
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
