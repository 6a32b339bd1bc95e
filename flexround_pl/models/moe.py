"""Mixture-of-experts layers: fused expert tensors as one ``nn.Linear`` per expert and projection.

transformers 5 stores a layer's experts fused, as 3-D parameters
(``gate_up_proj: [E, 2I, H]``, ``down_proj: [E, H, I]``, e.g. ``MixtralExperts``,
``Qwen2MoeExperts``). The quantization core quantizes ``Linear`` layers, with a
grid per output channel of each, so :func:`unfuse_experts` replaces such a
module by :class:`LinearExperts`: expert ``e`` is ``gate`` / ``up`` / ``down``
``nn.Linear`` layers holding the same weights, run by the same routing loop
(bit-for-bit the HF arithmetic up to the split of ``gate_up`` into two
matmuls). The router stays FP (it is not a ``Linear``; every anchor tool keeps
it FP).

The per-expert names are those of the family's original checkpoints
(Mixtral ``experts.{e}.w1/w3/w2``, Qwen2-MoE ``experts.{e}.gate_proj/up_proj/down_proj``),
which transformers' own loading conversion fuses back: the plain-FP export
reloads with ``from_pretrained`` unchanged.

Experts that calibration rarely or never routes to still get a grid: weight
grids are initialized from the weights (data-free), and an expert that sees no
token keeps that grid (no gradient reaches it). How many calibration tokens
each expert saw is counted in the FP target pass of each block
(:func:`flexround_pl.reconstruct.cache.in_target_pass`) and reported by
:func:`expert_tokens`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from flexround_pl.reconstruct.cache import in_target_pass

#: fused experts class -> names of (gate, up, down) in the family's original per-expert checkpoints
EXPERT_NAMES = {
    "MixtralExperts": ("w1", "w3", "w2"),
    "Qwen2MoeExperts": ("gate_proj", "up_proj", "down_proj"),
    "Qwen3MoeExperts": ("gate_proj", "up_proj", "down_proj"),
    "OlmoeExperts": ("gate_proj", "up_proj", "down_proj"),
}


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with the checkpoint's names for the three Linear layers."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: nn.Module, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        for name, layer in zip(names, (gate, up, down)):
            setattr(self, name, layer)
        self.act_fn = act

    def forward(self, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class LinearExperts(nn.ModuleList):
    """Drop-in for a fused experts module: same ``forward(hidden, top_k_index, top_k_weights)``."""

    def __init__(self, fused: nn.Module, names: tuple[str, str, str]) -> None:
        n_experts, two_i, hidden = fused.gate_up_proj.shape
        inter = two_i // 2
        experts = []
        with torch.no_grad():
            for e in range(n_experts):
                layers = [nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False),
                          nn.Linear(inter, hidden, bias=False)]
                layers[0].weight.copy_(fused.gate_up_proj[e, :inter])
                layers[1].weight.copy_(fused.gate_up_proj[e, inter:])
                layers[2].weight.copy_(fused.down_proj[e])
                experts.append(ExpertMLP(*layers, act=fused.act_fn, names=names))
        super().__init__(experts)
        self.num_experts = n_experts
        self.tokens_seen = torch.zeros(n_experts, dtype=torch.long)  # FP target pass; not in the state dict

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        if in_target_pass():
            self.tokens_seen += torch.bincount(top_k_index.flatten().cpu(), minlength=self.num_experts)[: self.num_experts]
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            out = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def __deepcopy__(self, memo: dict) -> "LinearExperts":
        # the teacher copy shares the counter: the FP target pass runs on the teacher
        clone = nn.Module.__new__(type(self))
        memo[id(self)] = clone
        for k, v in self.__dict__.items():
            clone.__dict__[k] = v if k == "tokens_seen" else copy.deepcopy(v, memo)
        return clone


def unfuse_experts(model: nn.Module) -> nn.Module:
    """Replace every known fused experts module by :class:`LinearExperts` (in place)."""
    for name, module in list(model.named_modules()):
        names = EXPERT_NAMES.get(type(module).__name__)
        if names is None:
            continue
        if module.gate_up_proj.is_meta:
            raise ValueError(
                f"{name}: mixture-of-experts layers are unfused into Linear layers after loading, which "
                "lazy: true cannot do (the experts stay on meta); set lazy: false"
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LinearExperts(module, names))
    return model


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding experts as 3-D parameters that :func:`unfuse_experts` cannot split."""
    if type(module).__name__ in EXPERT_NAMES:
        return False
    return "expert" in type(module).__name__.lower() and any(
        p.dim() == 3 for p in module.parameters(recurse=False)
    )


def expert_tokens(model: nn.Module) -> dict[str, Any]:
    """``{experts module name: calibration tokens routed to each expert}`` (empty for dense models)."""
    return {name: m.tokens_seen.tolist() for name, m in model.named_modules() if isinstance(m, LinearExperts)}
