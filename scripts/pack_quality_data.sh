#!/usr/bin/env bash
# Pack en-prose and wiki-mini from ../shared/data with the bpe:8192 tokenizer and its encoded
# splits into .data/carry.txz (git-ignored; xz keeps it and the checkout under the
# device's 64 MiB), for scripts/device_quality.sh on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.data/stage
rm -rf "$stage" && mkdir -p "$stage/cache"
for corpus in en-prose wiki-mini; do
  mkdir -p "$stage/$corpus" && cp ../shared/data/$corpus/* "$stage/$corpus/"
done
chmod -R u+w "$stage"
python3 - "$stage" <<'PY'
import sys
from muse.training.data import encoded_split, get_tokenizer, load_corpus
stage = sys.argv[1]
prose = load_corpus(f"{stage}/en-prose")
tok = get_tokenizer("bpe:8192", prose, cache_dir=f"{stage}/cache")
for corpus in (prose, load_corpus(f"{stage}/wiki-mini")):
    for split in ("train", "valid", "test"):
        if corpus is prose or split == "test":
            encoded_split(tok, corpus, split, cache_dir=f"{stage}/cache")
PY
tar cJf .data/carry.txz -C "$stage" .
ls -l .data/carry.txz
