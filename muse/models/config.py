"""Strict configuration dataclasses shared by every model family."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from muse.layers.moe import check_ffn_config

C = TypeVar("C", bound="StrictConfig")


@dataclasses.dataclass
class StrictConfig:
    """Base for model configs: building from a mapping rejects unknown keys by name.

    A silently ignored key would turn a setting into a no-op, so every entry point (presets,
    overrides, config files) goes through `from_dict`.
    """

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        check_keys(cls, values)
        return cls(**values)

    def replace(self: C, **overrides: Any) -> C:
        check_keys(type(self), overrides)
        return dataclasses.replace(self, **overrides)

    def require_positive_ints(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")

    def require_nonnegative_ints(self, *keys: str) -> None:
        """Sizes where 0 switches the part off (a window, a rank, a conv, an FFN)."""
        for key in keys:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an integer ≥ 0 (0: off), got {value!r}")

    def reject_unused(self, switch: str, *keys: str) -> None:
        """With the option `switch` off, the keys that only act when it is on must keep their
        defaults: a value set there would be silently ignored, so it is an error."""
        if getattr(self, switch):
            return
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = [k for k in keys if getattr(self, k) != defaults[k]]
        if changed:
            raise ValueError(
                f"{', '.join(f'{k}={getattr(self, k)!r}' for k in changed)} only act(s) with "
                f"{switch}=True, and {switch} is off: turn it on or leave them at their defaults"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_keys(cls: type, values: dict[str, Any]) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise TypeError(
            f"unknown config key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
            f"valid keys: {', '.join(valid)}"
        )


@dataclasses.dataclass
class FFNConfig(StrictConfig):
    """The feed-forward keys the MUSE families share: an MLP or a top-k mixture of experts
    (layers.moe). A family's config inherits them and calls `super().__post_init__()`."""

    ffn: str = "mlp"  # "mlp" (GELU), "swiglu" or "moe" (top-k mixture of experts, layers.moe)
    moe_experts: int = 8
    moe_top_k: int = 2  # ≥ 2: with one expert per token the router gets no gradient
    moe_aux_weight: float = 0.01  # × the load-balancing loss, added to the training loss

    def __post_init__(self) -> None:
        check_ffn_config(self.ffn, self.moe_experts, self.moe_top_k, self.moe_aux_weight)
