"""Decoding in constant memory: after a prompt of each --seq tokens (batch 1, random ids, fed
through the streaming forward in segments of ≤ 4096), 256 greedy tokens are decoded one at a time
(muse.measure.decode). A MUSE family's carried state must not grow with the prompt: its size at
the longest --seq is at most 1.05× its size at the shortest. The transformer's KV cache is the
negative control: it must grow (≥ 1.5× when the longest --seq is ≥ 2× the shortest), or the
criterion could not see growth at all. Recorded beside, per seq: decode tokens/s and, on CUDA,
the allocator's peak while decoding."""

import pytest

from muse.harness.summary import describe
from muse.measure.decode import measure_decode

pytestmark = pytest.mark.gpu
KV_CACHE = ("transformer", "transformer-eager")
NEW_TOKENS = 256
MAX_STATE_GROWTH = 1.05
MIN_CACHE_GROWTH = 1.5


def test_decode_state_is_flat_in_the_prompt(model_case, record):
    seqs = sorted(model_case.seqs)
    if len(seqs) < 2 or seqs[-1] < 2 * seqs[0]:
        pytest.skip(f"growth needs two --seq values a doubling apart, got {seqs}")
    model = model_case.build()
    if not hasattr(model, "init_state"):
        pytest.skip(f"{model_case.spec} does not stream (no init_state): it has no state to "
                    "decode from")
    sizes = {}
    for seq in seqs:
        s = measure_decode(model, seq, NEW_TOKENS, model_case.device, model_case.torch_dtype)
        sizes[seq] = s.state_bytes
        record(model_case, "decode_state_bytes", s.state_bytes, "bytes", seq=seq)
        record(model_case, "decode_tokens_per_s", s.tokens_per_s, "tokens/s", seq=seq,
               extra={"new_tokens": NEW_TOKENS, "seconds": s.seconds})
        if s.peak_bytes is not None:
            record(model_case, "decode_peak_bytes", s.peak_bytes, "bytes", seq=seq)
    growth = sizes[seqs[-1]] / sizes[seqs[0]]
    facts = {"shortest": seqs[0], "longest": seqs[-1], "summary": True}
    if model_case.model in KV_CACHE:
        rec = record(model_case, "kv_cache_growth", growth, "1", threshold=MIN_CACHE_GROWTH,
                     comparison=">=", extra={**facts, "control": True})
    else:
        rec = record(model_case, "decode_state_growth", growth, "1",
                     threshold=MAX_STATE_GROWTH, comparison="<=", extra=facts)
    assert rec.passed, describe(rec)
