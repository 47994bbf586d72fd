"""Top-k mixture-of-experts FFN, a drop-in for `MLP` (DESIGN §3.2).

Each token goes to the k experts of highest router probability and gets their outputs weighted
by those k probabilities renormalised to sum to 1. k ≥ 2 because with k = 1 the renormalised
weight is exactly 1 whatever the logits, so the language-model loss sends the router no
gradient. No token is dropped (no capacity limit): the output is the dense mixture `moe_dense`
computes, up to summation order, at k/E of its cost.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from muse.layers.mlp import MLP, SwiGLU

FFNS = ("mlp", "swiglu", "moe")


def check_moe_sizes(
    n_experts: int, top_k: int, names: tuple[str, str] = ("n_experts", "top_k")
) -> None:
    e_name, k_name = names
    for key, value in ((e_name, n_experts), (k_name, top_k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    if n_experts < 2:
        raise ValueError(f"{e_name} must be ≥ 2 for a mixture, got {n_experts}")
    if not 2 <= top_k <= n_experts:
        raise ValueError(
            f"{k_name} must be in [2, {e_name}={n_experts}], got {top_k} (with {k_name} = 1 "
            "the renormalised gate is constant and the router gets no gradient)"
        )


class MoE(nn.Module):
    """(B, N, D) → (B, N, D), position-wise.

    After each forward, `last_aux_loss` holds the Switch Transformer load-balancing loss
    (Fedus et al. 2021, eq. 4) E · Σ_e f_e · P_e, f_e the fraction of the T·k assignments routed
    to expert e and P_e its mean router probability; it is 1 when routing is uniform, and only
    P carries gradient. `last_load` holds f on the CPU, for diagnostics.
    """

    def __init__(self, *, d_model: int, d_ff: int, n_experts: int = 8, top_k: int = 2):
        super().__init__()
        check_moe_sizes(n_experts, top_k)
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(d_model=d_model, d_ff=d_ff) for _ in range(n_experts))
        self.last_aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) → probabilities (T, E), top-k gates (T, k) summing to 1, expert ids (T, k)."""
        # at least fp32 under autocast: bf16 probabilities would blur the top-k ranking
        logits = self.router(x)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        return probs, top_p / top_p.sum(dim=-1, keepdim=True), top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        tokens, k = flat.shape[0], self.top_k
        probs, gates, expert_ids = self.route(flat)
        if tokens == 0:
            self.last_load = torch.zeros(self.n_experts, dtype=torch.float64)
            self.last_aux_loss = probs.new_zeros(())
            return torch.zeros_like(x)

        # Sort the T·k (token, expert) assignments by expert, so each expert reads one
        # contiguous slice of a single gather; a stable sort keeps the per-token order fixed.
        assigned = expert_ids.reshape(-1)
        order = torch.argsort(assigned, stable=True)
        token_of = order // k
        gate_of = gates.reshape(-1)[order]
        counts = torch.bincount(assigned, minlength=self.n_experts).tolist()  # the one sync

        outputs = []
        groups = flat.index_select(0, token_of).split(counts)
        for expert, rows in zip(self.experts, groups, strict=True):
            if rows.shape[0]:
                outputs.append(expert(rows))
        # the k contributions of a token are summed in the residual stream's precision
        mixed = torch.cat(outputs).to(flat.dtype) * gate_of[:, None].to(flat.dtype)
        out = torch.zeros_like(flat).index_add(0, token_of, mixed)

        self.last_load = torch.tensor(counts, dtype=torch.float64) / (tokens * k)
        self.last_aux_loss = self.n_experts * (self.last_load.to(probs) * probs.mean(0)).sum()
        return out.reshape(x.shape)


def moe_dense(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The reference `MoE.forward` must equal: every expert on every token, weighted by the
    top-k gates scattered into a (T, E) matrix that is zero off the chosen experts."""
    flat = x.reshape(-1, x.shape[-1])
    _, gates, expert_ids = moe.route(flat)
    weights = torch.zeros(flat.shape[0], moe.n_experts, dtype=gates.dtype, device=x.device)
    weights = weights.scatter(1, expert_ids, gates)
    every = torch.stack([expert(flat) for expert in moe.experts], dim=1)  # (T, E, D)
    return (weights[..., None].to(every.dtype) * every).sum(dim=1).reshape(x.shape)


def make_ffn(kind: str, *, d_model: int, d_ff: int, n_experts: int, top_k: int) -> nn.Module:
    if kind == "mlp":
        return MLP(d_model=d_model, d_ff=d_ff)
    if kind == "swiglu":
        return SwiGLU(d_model=d_model, d_ff=d_ff)
    if kind == "moe":
        return MoE(d_model=d_model, d_ff=d_ff, n_experts=n_experts, top_k=top_k)
    raise ValueError(f"ffn must be one of {', '.join(FFNS)}, got {kind!r}")


def check_ffn_config(kind: str, n_experts: int, top_k: int, aux_weight: float) -> None:
    """The FFN keys every family's config shares (ffn, moe_experts, moe_top_k, moe_aux_weight),
    checked even when ffn = "mlp" so a typo does not wait for the day MoE is switched on."""
    if kind not in FFNS:
        raise ValueError(f"ffn must be one of {', '.join(FFNS)}, got {kind!r}")
    check_moe_sizes(n_experts, top_k, names=("moe_experts", "moe_top_k"))
    if (not isinstance(aux_weight, (int, float)) or isinstance(aux_weight, bool)
            or not aux_weight >= 0):
        raise ValueError(f"moe_aux_weight must be a number ≥ 0, got {aux_weight!r}")


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' load-balancing losses from the last forward (0 with none)."""
    losses = [m.last_aux_loss for m in moe_layers(model) if m.last_aux_loss is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.stack(losses).sum()


def moe_diagnostics(model: nn.Module) -> dict[str, float]:
    """Expert load of the last forward: the largest and smallest share of assignments any
    expert of any layer took (1/E each when balanced), and the summed balancing loss."""
    loads = [m.last_load for m in moe_layers(model) if m.last_load is not None]
    if not loads:
        return {}
    return {
        "moe_load_max": max(float(load.max()) for load in loads),
        "moe_load_min": min(float(load.min()) for load in loads),
        "moe_aux_loss": float(moe_aux_loss(model)),
    }
