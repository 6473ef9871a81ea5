"""Penn Treebank (or any corpus in its format): a folder with train.txt, valid.txt and test.txt,
one sentence per line, words separated by spaces. Each line ends with an `<eos>` token (as
awd-lstm-lm's data.py), and the vocabulary covers the three files."""

from pathlib import Path

import torch

from experiments.common import reading

SPLITS = ("train", "valid", "test")
EOS = "<eos>"


def split_paths(folder):
    """{split: its file} of a corpus folder; FileNotFoundError naming the files it lacks."""
    folder = Path(folder)
    paths = {split: folder / f"{split}.txt" for split in SPLITS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"--data {folder}: missing {', '.join(missing)}. --data must be a folder with "
            "train.txt, valid.txt and test.txt (one sentence per line); "
            "experiments/ptb/getdata.sh downloads Penn Treebank into one."
        )
    return paths


class Corpus:
    """The three splits as 1-D LongTensors of word ids, and the vocabulary (`words`, `ids`)."""

    def __init__(self, folder):
        self.words, self.ids = [], {}
        for split, path in split_paths(folder).items():
            setattr(self, split, self._tokenize(path))

    def _tokenize(self, path):
        """A binary or truncated file (not UTF-8 text) raises a DataError naming it."""
        tokens = []
        with reading(path), open(path, encoding="utf-8") as f:
            for line in f:
                for word in line.split() + [EOS]:
                    if word not in self.ids:
                        self.ids[word] = len(self.words)
                        self.words.append(word)
                    tokens.append(self.ids[word])
        return torch.tensor(tokens, dtype=torch.long)

    def __len__(self):
        return len(self.words)


def batchify(tokens, batch_size):
    """(n, batch_size): the corpus cut into batch_size contiguous streams, one per column (the
    tail that does not fill a row is dropped)."""
    rows = tokens.numel() // batch_size
    return tokens[: rows * batch_size].view(batch_size, rows).t().contiguous()


def get_batch(source, i, seq_len):
    """Inputs source[i:i+seq_len] (T, B) and their next words flattened (T * B), T shortened at
    the end of the data."""
    seq_len = min(seq_len, source.size(0) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)
