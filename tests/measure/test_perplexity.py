"""muse.measure.perplexity: sliding windows score every token once; PPL and bits per byte."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from muse.measure.perplexity import evaluate_perplexity, recall_mask, scored_bytes, windows
from muse.models import build
from muse.training.data import get_tokenizer

COMBOS = [(2, 1), (2, 2), (5, 3), (8, 8), (16, 1), (16, 7), (37, 37), (64, 16), (1000, 1000)]


class Uniform(nn.Module):
    """Zero logits: every token has probability 1/V."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.config.vocab_size)


class Bigram(nn.Module):
    """Logits at a position depend only on the token there: the NLL of a target is the same in
    any window that scores it, so the windowed sum equals the plain sum iff each target is scored
    exactly once."""

    def __init__(self, vocab_size, seed=0):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=g) * 3)

    def forward(self, ids):
        return self.table[ids]


class Recorder(nn.Module):
    """Uniform logits; remembers every window it was fed."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.inputs = []

    def forward(self, ids):
        self.inputs.append(ids.clone())
        return torch.zeros(*ids.shape, self.config.vocab_size)


def random_ids(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("context,stride", COMBOS)
def test_uniform_model_gives_ppl_v(context, stride):
    vocab, n = 50, 123
    result = evaluate_perplexity(Uniform(vocab), random_ids(n, vocab), 1000, context, stride)
    assert result.ppl == pytest.approx(vocab, rel=1e-9, abs=0)
    assert result.tokens_scored == n - 1
    assert result.nll_sum == pytest.approx((n - 1) * math.log(vocab), rel=1e-12)
    assert (result.context, result.stride, result.bytes_scored) == (context, stride, 1000)


def test_uniform_bits_per_byte_by_hand():
    tok = get_tokenizer("bytes")
    text = "naïve café — 東京 and some ASCII.\n" * 3
    ids = torch.tensor(tok.encode(text))
    n_bytes = scored_bytes(tok, ids)
    assert n_bytes == len(text.encode("utf-8")) - 1  # every byte but the first is scored
    result = evaluate_perplexity(Uniform(256), ids, n_bytes, context=16, stride=4)
    # each scored byte costs ln 256 nats = 8 bits
    assert result.bits_per_byte == pytest.approx(8.0, rel=1e-12)
    assert result.ppl == pytest.approx(256, rel=1e-9, abs=0)
    # a tokenizer with 2 bytes a token on average: bits per byte = (T−1)·log2 V / bytes
    vocab, n, nbytes = 1000, 40, 78
    result = evaluate_perplexity(Uniform(vocab), random_ids(n, vocab), nbytes, 8, 8)
    assert result.bits_per_byte == pytest.approx((n - 1) * math.log2(vocab) / nbytes, rel=1e-12)
    assert result.bits_per_token == pytest.approx(math.log2(vocab), rel=1e-12)


@pytest.mark.parametrize("context,stride", COMBOS)
def test_each_token_scored_exactly_once(context, stride):
    vocab, n = 17, 101
    model = Bigram(vocab)
    ids = random_ids(n, vocab, seed=3)
    direct = F.cross_entropy(model(ids[:-1]).double(), ids[1:], reduction="sum").item()
    result = evaluate_perplexity(model, ids, 500, context, stride, batch_size=3)
    assert result.tokens_scored == n - 1
    assert result.nll_sum == pytest.approx(direct, rel=1e-12)


def brute_recall(window: list[int]) -> list[bool]:
    """Target j of a window is a recall token iff an earlier target i has the same bigram."""
    pairs = list(zip(window[:-1], window[1:], strict=True))
    return [any(pairs[i] == pairs[j] for i in range(j)) for j in range(len(pairs))]


@pytest.mark.parametrize("vocab", [2, 3, 7, 50])
@pytest.mark.parametrize("length", [1, 2, 3, 10, 97])
def test_recall_mask_matches_brute_force(vocab, length):
    ids = random_ids(length, vocab, seed=length * 100 + vocab)
    assert recall_mask(ids).tolist() == brute_recall(ids.tolist())
    rows = torch.stack([random_ids(length, vocab, seed=s) for s in range(5)])
    mask = recall_mask(rows)  # rows are independent windows
    assert mask.shape == (5, max(length - 1, 0))
    assert mask.tolist() == [brute_recall(r) for r in rows.tolist()]


def test_recall_mask_by_hand():
    # pairs: (1,2) (2,1) (1,2) (2,3) (3,1) (1,2) (2,1): repeats at targets 3, 6 and 7
    assert recall_mask(torch.tensor([1, 2, 1, 2, 3, 1, 2, 1])).tolist() == [
        False, False, True, False, False, True, True]
    # a repeated token is not enough: the pair (prev, cur) must repeat
    assert not recall_mask(torch.tensor([5, 9, 4, 9, 6, 9])).any()
    assert recall_mask(torch.tensor([7, 7, 7])).tolist() == [False, True]
    with pytest.raises(ValueError, match="must be ≥ 0"):
        recall_mask(torch.tensor([1, -2, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        recall_mask(torch.tensor([1.0, 2.0]))


def brute_split(model, ids, context, stride):
    """Recall and other NLL sums and the recall count, token by token, in float64."""
    recall = other = 0.0
    count = 0
    for a, e, first in windows(ids.numel(), context, stride):
        window = ids[a : e + 1].tolist()
        logp = torch.log_softmax(model(ids[a:e]).double(), dim=-1)
        for t in range(first, e + 1):
            nll = -logp[t - 1 - a, ids[t]].item()
            j = t - a  # the target's position in the window
            if any(window[i - 1 : i + 1] == window[j - 1 : j + 1] for i in range(1, j)):
                recall, count = recall + nll, count + 1
            else:
                other += nll
    return recall, other, count


@pytest.mark.parametrize("context,stride", COMBOS)
def test_recall_and_other_split_the_total(context, stride):
    vocab, n = 4, 101  # a small vocabulary: many repeated pairs
    model = Bigram(vocab, seed=1).double()
    ids = random_ids(n, vocab, seed=5)
    result = evaluate_perplexity(model, ids, 500, context, stride, batch_size=3)
    recall, other, count = brute_split(model, ids, context, stride)
    assert result.recall_tokens == count and result.other_tokens == n - 1 - count
    assert result.recall_nll_sum == pytest.approx(recall, rel=1e-12, abs=1e-12)
    assert result.other_nll_sum == pytest.approx(other, rel=1e-12, abs=1e-12)
    assert result.recall_nll_sum + result.other_nll_sum == pytest.approx(result.nll_sum,
                                                                         rel=1e-12)
    assert result.recall_fraction == count / (n - 1)
    if count:
        assert result.recall_ppl == pytest.approx(math.exp(recall / count), rel=1e-12)
    else:  # a window of 2 tokens holds one pair: nothing to recall, and no PPL to claim
        assert math.isnan(result.recall_ppl)
    assert result.other_ppl == pytest.approx(math.exp(other / (n - 1 - count)), rel=1e-12)


def test_recall_fraction_of_a_repeated_text():
    # two copies of 20 random ids (no pair repeats within one) in one window: targets 21..39
    # repeat a pair of the first copy; target 20's pair (x19, x0) spans the seam and is new
    ids = torch.cat([random_ids(20, 1000, seed=2)] * 2)
    assert not recall_mask(ids[:20]).any()
    result = evaluate_perplexity(Uniform(1000), ids, 40, context=40, stride=40)
    assert result.recall_tokens == 19
    assert result.recall_ppl == pytest.approx(1000, rel=1e-9)


@pytest.mark.parametrize("context,stride", COMBOS)
def test_window_plan(context, stride):
    n = 101
    plan = windows(n, context, stride)
    scored = []
    for a, e, first in plan:
        assert 0 <= a < first <= e + 1 and e - a <= context and a + 1 <= first
        scored.extend(range(first, e + 1))
    assert scored == list(range(1, n))  # every target once, in order
    assert plan[0][2] == 1 and plan[-1][1] == n - 1


def test_windows_fed_to_model():
    model = Recorder(10)
    ids = torch.arange(11) % 10  # targets 1..10
    evaluate_perplexity(model, ids, 10, context=4, stride=2, batch_size=1)
    fed = [x[0].tolist() for x in model.inputs]
    assert fed == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    model.inputs.clear()
    evaluate_perplexity(model, ids, 10, context=4, stride=4, batch_size=8)
    assert [x.shape for x in model.inputs] == [(2, 4), (1, 2)]  # equal lengths batch together


def test_full_context_matches_direct_computation_on_transformer():
    torch.manual_seed(0)
    model = build("transformer", "tiny", vocab_size=64).double()
    ids = random_ids(40, 64, seed=1)
    with torch.no_grad():
        direct = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="sum").item()
    for context, stride in [(39, 39), (100, 5), (39, 1)]:
        result = evaluate_perplexity(model, ids, 39, context, stride)
        assert result.nll_sum == pytest.approx(direct, rel=1e-10)
    # shorter windows see less context: a different (finite) answer, still every token once
    result = evaluate_perplexity(model, ids, 39, 8, 8)
    assert result.tokens_scored == 39 and result.nll_sum != pytest.approx(direct, rel=1e-6)


def test_restores_training_mode():
    model = Bigram(5)
    model.train()
    evaluate_perplexity(model, random_ids(20, 5), 20, 4, 2)
    assert model.training
    model.eval()
    evaluate_perplexity(model, random_ids(20, 5), 20, 4, 2)
    assert not model.training


@pytest.mark.parametrize(
    "n,context,stride,match",
    [
        (10, 1, 1, "context must be >= 2"),
        (10, 4, 0, r"stride must be in \[1, context=4\], got 0"),
        (10, 4, 5, r"stride must be in \[1, context=4\], got 5"),
        (1, 4, 2, "at least 2 tokens"),
        (0, 4, 2, "at least 2 tokens"),
        (10, 4.0, 2, "context must be an integer"),
    ],
)
def test_bad_arguments(n, context, stride, match):
    with pytest.raises(ValueError, match=match):
        evaluate_perplexity(Uniform(5), torch.zeros(n, dtype=torch.long), 10, context, stride)


def test_bad_ids_and_bytes():
    with pytest.raises(ValueError, match="1-D"):
        evaluate_perplexity(Uniform(5), torch.zeros(2, 5, dtype=torch.long), 10, 4, 2)
    with pytest.raises(ValueError, match="text_bytes"):
        evaluate_perplexity(Uniform(5), torch.zeros(5, dtype=torch.long), 0, 4, 2)


def training_text():
    # repetitive but not trivial: a few sentences recombined by a seeded generator
    g = torch.Generator().manual_seed(0)
    subjects = ["the cat", "a dog", "my aunt", "the old king", "every bird"]
    verbs = ["sees", "follows", "paints", "remembers", "forgets"]
    objects = ["the river.", "a red house.", "the moon.", "its shadow.", "the garden wall."]
    parts = []
    for _ in range(160):
        s, v, o = (int(torch.randint(0, 5, (1,), generator=g)) for _ in range(3))
        parts.append(f"{subjects[s]} {verbs[v]} {objects[o]}\n")
    return "".join(parts)


def test_overlapping_windows_beat_disjoint_on_trained_model():
    torch.manual_seed(0)
    tok = get_tokenizer("bytes")
    text = training_text()
    ids = torch.tensor(tok.encode(text))
    split = int(len(ids) * 0.8)
    train, test = ids[:split], ids[split:]
    model = build("transformer", "tiny", vocab_size=256)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 48, 16
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        starts = torch.randint(0, len(train) - seq - 1, (batch,), generator=g)
        x = torch.stack([train[s : s + seq + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    n_bytes = scored_bytes(tok, test)
    disjoint = evaluate_perplexity(model, test, n_bytes, context=32, stride=32)
    sliding = evaluate_perplexity(model, test, n_bytes, context=32, stride=8)
    assert disjoint.tokens_scored == sliding.tokens_scored == len(test) - 1
    assert sliding.ppl < disjoint.ppl < 20  # it learned; more context helps
    assert sliding.bits_per_byte < disjoint.bits_per_byte
