"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): the synthetic task on
which most of the gap between attention and recurrent mixers shows.

A sequence holds n key–value pairs (k₁ v₁ … kₙ vₙ), then the keys again in a random order,
each followed by its value. Only the values of that second part are scored: a model gets them
right only by recalling what followed the same key earlier. Keys and values come from disjoint
halves of the vocabulary (token 0 is left out), so no bigram statistic can give the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MQAR:
    vocab_size: int = 256
    pairs: int = 8
    seq_len: int = 64

    def __post_init__(self) -> None:
        if self.seq_len < 4 * self.pairs:
            raise ValueError(f"seq_len {self.seq_len} < 4 × pairs ({self.pairs}): the pairs and "
                             "their queries do not fit")
        if (self.vocab_size - 1) // 2 < self.pairs:
            raise ValueError(f"vocab_size {self.vocab_size} gives fewer than pairs={self.pairs} "
                             "distinct keys")

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (size, seq_len), targets (size, seq_len) with −100 where nothing is scored):
        targets[t] is the token the model must predict after reading ids[..t]."""
        half = (self.vocab_size - 1) // 2
        n = self.pairs
        keys = torch.rand(size, half, generator=generator).argsort(dim=1)[:, :n] + 1
        values = torch.randint(half + 1, 2 * half + 1, (size, n), generator=generator)
        order = torch.rand(size, n, generator=generator).argsort(dim=1)
        ids = torch.zeros(size, self.seq_len, dtype=torch.long)
        ids[:, 0:2 * n:2], ids[:, 1:2 * n:2] = keys, values
        ids[:, 2 * n:4 * n:2] = keys.gather(1, order)
        ids[:, 2 * n + 1:4 * n:2] = values.gather(1, order)
        rest = self.seq_len - 4 * n  # filler after the queries: random keys nobody asks about
        if rest:
            ids[:, 4 * n:] = torch.randint(1, half + 1, (size, rest), generator=generator)
        targets = torch.full_like(ids, -100)
        # the value of query j sits at 2n + 2j + 1 and is predicted from position 2n + 2j
        targets[:, 2 * n:4 * n:2] = ids[:, 2 * n + 1:4 * n:2]
        return ids, targets


def mqar_loss_and_accuracy(logits: torch.Tensor, targets: torch.Tensor):
    scored = targets != -100
    loss = F.cross_entropy(logits[scored].float(), targets[scored])
    accuracy = (logits[scored].argmax(-1) == targets[scored]).float().mean()
    return loss, accuracy


def train_mqar(model: torch.nn.Module, task: MQAR, *, steps: int, batch: int, lr: float,
               seed: int = 0, eval_batches: int = 8, device: str = "cpu") -> dict:
    """AdamW with a cosine schedule on fresh batches; accuracy on held-out batches."""
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    for _ in range(steps):
        ids, targets = (t.to(device) for t in task.batch(batch, gen))
        loss, _ = mqar_loss_and_accuracy(model(ids), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    held = torch.Generator().manual_seed(10_000 + seed)
    losses, accs = [], []
    with torch.no_grad():
        for _ in range(eval_batches):
            ids, targets = (t.to(device) for t in task.batch(batch, held))
            loss, acc = mqar_loss_and_accuracy(model(ids), targets)
            losses.append(loss.item())
            accs.append(acc.item())
    return {"loss": sum(losses) / len(losses), "accuracy": sum(accs) / len(accs)}
