#!/usr/bin/env bash
# The design-card run timed as a new user runs it on a fresh machine (issue 11): every default
# family, no tokenizer cache, the gate's default corpus and budget. wiki-mini travels in
# .data/wiki-mini.tgz (../shared does not); the wall time is the last line of machine.txt.
set -uo pipefail
mkdir -p .data/unpacked && tar xzf .data/wiki-mini.tgz -C .data/unpacked
MUSE_BENCH_LIMIT=${MUSE_BENCH_LIMIT:-540} exec bash "$(dirname "$0")/device_bench.sh" \
  --seq 1024 2048 4096 --corpus .data/unpacked/wiki-mini "$@"
