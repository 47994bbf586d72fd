"""Sliding-window perplexity and bits per byte.

Windows. A sequence of T tokens has T − 1 targets (tokens 1..T−1; token 0 has no left context).
Window k feeds the model `ids[a : e]` with a = k·stride and e = min(a + context, T − 1), so the
logits at input position j predict token j + 1: the window covers targets a+1 .. e, each seen
with its full left context inside the window (up to `context` tokens). Window 0 scores all its
targets 1..e; every later window scores only the targets no earlier window scored (those after
the previous window's e), and the walk stops at the window that reaches token T − 1. Since
stride ≤ context, the new targets of a window always lie inside it, so every token after the
first is scored exactly once. stride == context gives disjoint windows (each target sees only the
tokens of its own block); a smaller stride gives each scored token at least context − stride
tokens of context.

    PPL           = exp(ΣNLL / tokens_scored)
    bits per byte = ΣNLL / (ln 2 · bytes_scored)

`bytes_scored` is the number of UTF-8 bytes of the text the scored tokens (ids[1:]) stand for;
`scored_bytes(tokenizer, ids)` computes it for the tokenizers of `muse.training.data`, which are
byte-level and lossless, so each token stands for a fixed byte string and the count is exact
(for a whole encoded text it is the text's UTF-8 size minus the bytes of its first token).
NLLs are natural-log, computed and summed in float64.

Recall tokens. A scored target t is a recall token when its bigram (ids[t−1], ids[t]) already
occurred earlier inside the window that scores it (`recall_mask`): the token could be copied from
the context. This is Zoology's associative-recall split (Arora et al. 2023), where most of the
gap between attention and recurrent models lies. The NLL is summed separately over recall and
other tokens; the two sums add up to the total.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    bits_per_byte: float
    nll_sum: float  # nats, over the scored tokens
    tokens_scored: int
    bytes_scored: int
    context: int
    stride: int
    recall_nll_sum: float  # nats, over the recall tokens (see the module doc)
    other_nll_sum: float  # nats, over the rest
    recall_tokens: int

    @property
    def nll_per_token(self) -> float:
        return self.nll_sum / self.tokens_scored

    @property
    def bits_per_token(self) -> float:
        return self.nll_per_token / math.log(2)

    @property
    def other_tokens(self) -> int:
        return self.tokens_scored - self.recall_tokens

    @property
    def recall_fraction(self) -> float:
        return self.recall_tokens / self.tokens_scored

    @property
    def recall_ppl(self) -> float:
        """PPL over the recall tokens alone; NaN when there are none (undefined, not 1)."""
        return _ppl(self.recall_nll_sum, self.recall_tokens)

    @property
    def other_ppl(self) -> float:
        return _ppl(self.other_nll_sum, self.other_tokens)


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens) if tokens else math.nan


def recall_mask(windows: torch.Tensor) -> torch.Tensor:
    """For token windows [..., L], a bool mask [..., L−1] over the targets windows[..., 1:]: True
    at target j when the bigram (w[j−1], w[j]) is also the bigram (w[i−1], w[i]) of some earlier
    target i < j of the same window. Each pair is hashed to prev·base + cur and a row offset, and
    a pair is a repeat when its position is after the first position of its hash (sort-based
    `unique`, then a scatter-min): O(L log L) per window, never the O(L²) pairwise comparison."""
    if windows.dim() < 1 or windows.dtype not in (torch.int32, torch.int64):
        raise ValueError("windows must be an integer tensor [..., L] of token ids")
    w = windows.long().reshape(-1, windows.shape[-1])
    rows, length = w.shape
    if length < 2 or rows == 0:
        return torch.zeros(*windows.shape[:-1], max(length - 1, 0), dtype=torch.bool,
                           device=windows.device)
    if int(w.min()) < 0:
        raise ValueError(f"token ids must be ≥ 0, got {int(w.min())}")
    base = int(w.max()) + 1
    if rows * base * base >= 2**63:
        raise ValueError(f"{rows} windows of ids < {base} overflow the int64 pair hash")
    offsets = torch.arange(rows, device=w.device)[:, None] * (base * base)
    keys = (w[:, :-1] * base + w[:, 1:] + offsets).flatten()
    _, inverse = torch.unique(keys, return_inverse=True)
    pos = torch.arange(keys.numel(), device=w.device)
    first = torch.full((int(inverse.max()) + 1,), keys.numel(), device=w.device)
    first = first.scatter_reduce(0, inverse, pos, reduce="amin")
    return (pos > first[inverse]).reshape(*windows.shape[:-1], length - 1)


def scored_bytes(tokenizer, ids: Sequence[int] | torch.Tensor) -> int:
    """UTF-8 bytes of the text that the scored tokens ids[1:] stand for (see the module doc)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return tokenizer.byte_count(ids[1:])


def windows(total: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(a, e, first): window input ids[a:e], scoring targets first..e (token indices)."""
    _check(total, context, stride)
    out = []
    scored_upto = 0  # last target index scored so far
    a = 0
    while scored_upto < total - 1:
        e = min(a + context, total - 1)
        out.append((a, e, scored_upto + 1))
        scored_upto = e
        a += stride
    return out


def _check(total: int, context: int, stride: int) -> None:
    for key, value in (("context", context), ("stride", stride)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    if total < 2:
        raise ValueError(f"perplexity needs at least 2 tokens (one to predict), got {total}")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    text_bytes: int,
    context: int,
    stride: int,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> PerplexityResult:
    """Sliding-window PPL and bits per byte of a causal LM, `model(ids[B, N]) -> logits[B, N, V]`,
    on the 1-D token sequence `ids`; `text_bytes` is the UTF-8 byte count of the text of the
    scored tokens ids[1:] (`scored_bytes(tokenizer, ids)`). The model is put in eval mode (and
    back in train mode afterwards if it was training)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError("ids must be a 1-D LongTensor of token ids")
    total = ids.numel()
    _check(total, context, stride)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(text_bytes, int) or text_bytes < 1:
        raise ValueError(f"text_bytes must be a positive integer, got {text_bytes!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    ids = ids.to(device=device, dtype=torch.long)

    plan = windows(total, context, stride)
    # Batch consecutive windows of equal length (all but possibly the last few are full).
    groups: list[list[tuple[int, int, int]]] = []
    for w in plan:
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == w[1] - w[0]:
            last.append(w)
        else:
            groups.append([w])

    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    recall_sum = torch.zeros_like(nll_sum)
    other_sum = torch.zeros_like(nll_sum)
    recall_count = torch.zeros((), dtype=torch.long, device=device)
    scored = 0
    try:
        for group in groups:
            x = torch.stack([ids[a:e] for a, e, _ in group])
            logits = model(x)
            if logits.dim() != 3 or logits.shape[:2] != x.shape:
                raise ValueError(
                    f"model returned logits of shape {tuple(logits.shape)} for input "
                    f"{tuple(x.shape)}; expected [B, N, V]"
                )
            # the window with its last target: mask[j] classifies the target at input j + 1
            recall = recall_mask(torch.stack([ids[a : e + 1] for a, e, _ in group]))
            for row, (a, e, first) in enumerate(group):
                # logits at input position j (= token a + j) predict token a + j + 1
                rows = logits[row, first - 1 - a : e - a].double()
                targets = ids[first : e + 1]
                is_recall = recall[row, first - 1 - a : e - a]
                logp = torch.log_softmax(rows, dim=-1)
                nll = -logp.gather(-1, targets[:, None])[:, 0]
                nll_sum += nll.sum()
                recall_sum += torch.where(is_recall, nll, 0.0).sum()
                other_sum += torch.where(is_recall, 0.0, nll).sum()
                recall_count += is_recall.sum()
                scored += targets.numel()
    finally:
        model.train(was_training)

    assert scored == total - 1, (scored, total)
    nll = float(nll_sum.item())
    return PerplexityResult(
        ppl=math.exp(nll / scored),
        bits_per_byte=nll / (math.log(2) * text_bytes),
        nll_sum=nll,
        tokens_scored=scored,
        bytes_scored=text_bytes,
        context=context,
        stride=stride,
        recall_nll_sum=float(recall_sum.item()),
        other_nll_sum=float(other_sum.item()),
        recall_tokens=int(recall_count.item()),
    )
