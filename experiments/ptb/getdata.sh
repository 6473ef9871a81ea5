#!/usr/bin/env bash
# Downloads Mikolov's Penn Treebank language-modelling files (simple-examples.tgz, as
# awd-lstm-lm's getdata.sh) into a folder, default data/penn, as train.txt, valid.txt and
# test.txt: what main.py --data reads. PTB_URL overrides the address (e.g. a mirror).
#
#     bash experiments/ptb/getdata.sh [folder]
set -euo pipefail
dest="${1:-data/penn}"
url="${PTB_URL:-http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading $url"
if command -v curl >/dev/null; then
  curl -fL --retry 3 -o "$tmp/simple-examples.tgz" "$url"
else
  wget -O "$tmp/simple-examples.tgz" "$url"
fi
tar -xzf "$tmp/simple-examples.tgz" -C "$tmp"
mkdir -p "$dest"
for split in train valid test; do
  mv "$tmp/simple-examples/data/ptb.$split.txt" "$dest/$split.txt"
done

# The standard files (929,589 / 73,760 / 82,430 tokens with one <eos> per line).
if command -v sha256sum >/dev/null; then
  (cd "$dest" && sha256sum -c --quiet) <<'SUMS' || {
fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf  train.txt
c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2  valid.txt
dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0  test.txt
SUMS
    echo "error: the files in $dest differ from the standard Penn Treebank files" >&2
    exit 1
  }
fi
echo "Penn Treebank: $dest/train.txt, valid.txt, test.txt"
