"""Torchvision CNNs (ResNet-18/50, MobileNetV2): BatchNorm folding and block adapters.

Preparation (the adapter's ``prepare``, run once on the FP network in eval mode):

1. **BatchNorm folding** (as BRECQ / QDrop / FlexRound do before quantizing):
   every ``BatchNorm2d`` that directly follows a ``Conv2d`` (found by tracing
   the forward with ``torch.fx``, so it works for any traceable CNN) is folded
   into that conv,

       W' = W * gamma / sigma,   b' = (b - mu) * gamma / sigma + beta,
       sigma = sqrt(running_var + eps),

   the conv gains a bias and the BatchNorm is replaced by ``nn.Identity``.
2. **ResNet stem** (ResNet only): ``conv1 -> bn1 -> relu -> maxpool`` are four
   children of the model, so no single module computes the stem. ``conv1``
   becomes a :class:`ResNetStem` (``conv``, ``relu``, ``maxpool``) and
   ``bn1``, ``relu``, ``maxpool`` become ``nn.Identity``; torchvision's
   ``ResNet.forward`` is unchanged and computes the same function. The stem is
   then a real child of the model: quantizing inside it swaps the real layer
   (a view ``nn.Sequential(model.conv1, ...)`` would not).

The class of the model stays ``ResNet`` / ``MobileNetV2``, and every
state-dict key stays the same except:

* folded BatchNorms have no entries (``...bn1.*``, ``...downsample.1.*``,
  MobileNetV2's ``features.*.1.*`` ...), and the convs before them gain ``.bias``;
* ResNet: ``conv1.weight`` is now ``conv1.conv.weight`` (+ ``conv1.conv.bias``).

:func:`torchvision_state_dict` maps a prepared network (FP, or quantized and
hardened: dequantized weights) back to a plain torchvision state dict, each
folded BatchNorm becoming an identity BatchNorm that carries the folded bias
(``weight=1, bias=b', running_mean=0, running_var=1-eps``); it loads with
``strict=True`` into a fresh torchvision model of the same architecture.

Blocks (BRECQ granularity; block ``i``'s output is block ``i+1``'s input):

* ResNet: ``conv1`` (the stem), then every ``BasicBlock`` / ``Bottleneck``
  (``layer1.0`` ... ``layer4.*``). The head (avgpool, flatten, ``fc``) is not a
  block: ``fc`` is quantized round-to-nearest at 8 bits after the blocks.
* MobileNetV2: ``features.0`` (stem ConvBNReLU) ... ``features.17``
  (InvertedResidual) and ``features.18`` (final 1x1 ConvBNReLU); the
  ``classifier`` Linear is quantized round-to-nearest at 8 bits.

First and last layer at 8 bits (``eight_bit``): ResNet ``conv1.conv`` and
``fc``; MobileNetV2 ``features.0.0`` and ``classifier.1`` (the convention of
BRECQ, QDrop and FlexRound). Keep them FP instead with ``quant.keep_fp``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from flexround_pl.models.adapter import Architecture, register

#: Attribute on a prepared model: ``{conv_name (original): (bn_name, eps)}`` of every folded pair.
FOLDS_ATTR = "_flexround_folded_bn"
#: Renamed modules of a prepared model: ``{current name: original torchvision name}``.
RENAMES_ATTR = "_flexround_renamed"


# ----------------------------------------------------------------------------- BatchNorm folding


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` of every ``BatchNorm2d`` fed directly and only by a ``Conv2d``.

    Found by ``torch.fx`` symbolic tracing (module calls only; the model itself
    is not modified). A conv called more than once, or whose output is also
    used elsewhere, is not paired.
    """
    import torch.fx

    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception as e:  # fx raises many error types on untraceable code
        raise ValueError(
            f"cannot fold BatchNorm: torch.fx could not trace {type(model).__name__} "
            f"({type(e).__name__}: {e}); fold it by hand or disable folding"
        ) from None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if not isinstance(modules.get(src.target), nn.Conv2d):
            continue
        if len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        pairs.append((str(src.target), str(node.target)))
    return pairs


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place; ``conv`` gains a bias."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm over {bn.num_features} channels after a conv with {conv.out_channels}")
    dtype = conv.weight.dtype
    w = conv.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + bn.eps)
    new_w = w * factor.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = (b - mean) * factor + beta
    conv.weight = nn.Parameter(new_w.to(dtype), requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(new_b.to(dtype), requires_grad=conv.weight.requires_grad)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every conv -> BatchNorm pair of ``model`` in place; the BatchNorms become ``nn.Identity``.

    Records the folds on the model (for :func:`torchvision_state_dict`) and
    returns them. The model is put in eval mode (folding uses running statistics).
    """
    model.eval()
    pairs = conv_bn_pairs(model)
    folds: dict[str, tuple[str, float]] = dict(getattr(model, FOLDS_ATTR, {}))
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        fold_conv_bn_(model.get_submodule(conv_name), bn)
        _set_submodule(model, bn_name, nn.Identity())
        folds[conv_name] = (bn_name, float(bn.eps))
    setattr(model, FOLDS_ATTR, folds)
    return pairs


# ----------------------------------------------------------------------------- ResNet


class ResNetStem(nn.Sequential):
    """``conv (BN folded) -> relu -> maxpool``: the ResNet stem as one module (a block)."""

    def __init__(self, conv: nn.Module, relu: nn.Module, maxpool: nn.Module) -> None:
        super().__init__(OrderedDict(conv=conv, relu=relu, maxpool=maxpool))


def _is_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer1", "fc"))


def prepare_resnet(model: nn.Module) -> nn.Module:
    """Fold BatchNorm and make the stem one child (``conv1`` -> :class:`ResNetStem`); idempotent."""
    if isinstance(model.conv1, ResNetStem):
        return model.eval()
    if not _is_resnet(model):
        raise ValueError(f"{type(model).__name__} does not look like a torchvision ResNet")
    fold_batchnorm(model)
    if not isinstance(model.bn1, nn.Identity):
        raise ValueError("the ResNet stem's BatchNorm (bn1) could not be folded into conv1")
    model.conv1 = ResNetStem(model.conv1, model.relu, model.maxpool)
    model.relu, model.maxpool = nn.Identity(), nn.Identity()
    setattr(model, RENAMES_ATTR, {"conv1.conv": "conv1"})
    return model.eval()


def prepare_mobilenet_v2(model: nn.Module) -> nn.Module:
    """Fold BatchNorm (MobileNetV2 needs no restructuring); idempotent."""
    if not getattr(model, FOLDS_ATTR, None):
        fold_batchnorm(model)
    return model.eval()


@dataclass(frozen=True)
class ResNetArchitecture(Architecture):
    """ResNet adapter: blocks are the stem and every residual block, read from the model."""

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        if not isinstance(getattr(model, "conv1", None), ResNetStem):
            raise ValueError("ResNet blocks need the prepared model: run the adapter's prepare(model) first")
        named: list[tuple[str, nn.Module]] = [("conv1", model.conv1)]
        for i in range(1, 5):
            layer = getattr(model, f"layer{i}", None)
            if layer is None:
                continue
            named.extend((f"layer{i}.{j}", block) for j, block in enumerate(layer))
        return named


RESNET = register(
    ResNetArchitecture(
        name="resnet",
        class_names=("ResNet",),
        block_path="",
        eight_bit=(r"^conv1\.conv$", r"^fc$"),
        prepare=prepare_resnet,
        output_key=None,
        export_state_dict=lambda model: torchvision_state_dict(model),  # defined below
    )
)

MOBILENET_V2 = register(
    Architecture(
        name="mobilenet_v2",
        class_names=("MobileNetV2",),
        block_path="features",
        eight_bit=(r"^features\.0\.0$", r"^classifier\.1$"),
        prepare=prepare_mobilenet_v2,
        output_key=None,
        export_state_dict=lambda model: torchvision_state_dict(model),  # defined below
    )
)


# ----------------------------------------------------------------------------- export


def _layer_weight(module: nn.Module) -> Optional[Tensor]:
    """FP weight of a plain layer, or the dequantized weight of a hardened quantized one."""
    from flexround_pl.quant.layers import QuantizedLayer

    if isinstance(module, QuantizedLayer):
        if not module.hardened:
            raise ValueError("export needs hardened quantized layers (run the whole pipeline first)")
        return module.weight.detach()
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return module.weight.detach()
    return None


@torch.no_grad()
def torchvision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A plain torchvision state dict of a prepared (optionally quantized) network.

    Quantized layers contribute their dequantized weights; each folded
    BatchNorm comes back as an identity BatchNorm carrying the folded bias.
    Loads with ``strict=True`` into a fresh torchvision model of the same
    architecture and gives the same outputs (up to float rounding).
    """
    folds: dict[str, tuple[str, float]] = getattr(model, FOLDS_ATTR, {})
    renames: dict[str, str] = getattr(model, RENAMES_ATTR, {})
    out: dict[str, Tensor] = OrderedDict()
    for name, module in model.named_modules():
        weight = _layer_weight(module)
        if weight is None:
            continue
        orig = renames.get(name, name)
        out[f"{orig}.weight"] = weight.clone()
        bias = getattr(module, "bias", None)
        if orig in folds:
            bn_name, eps = folds[orig]
            n = weight.shape[0]
            kw = dict(dtype=weight.dtype, device=weight.device)
            out[f"{bn_name}.weight"] = torch.ones(n, **kw)
            out[f"{bn_name}.bias"] = bias.detach().clone() if bias is not None else torch.zeros(n, **kw)
            out[f"{bn_name}.running_mean"] = torch.zeros(n, **kw)
            out[f"{bn_name}.running_var"] = torch.full((n,), 1.0 - eps, **kw)
            out[f"{bn_name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long, device=weight.device)
        elif bias is not None:
            out[f"{orig}.bias"] = bias.detach().clone()
    # anything else with state (unfolded BatchNorms, ...) is copied as is
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if _is_layer(model.get_submodule(owner) if owner else model):
            continue  # written above
        out[f"{renames.get(owner, owner)}.{leaf}" if owner else leaf] = value.detach().clone()
    return out


def _is_layer(module: nn.Module) -> bool:
    from flexround_pl.quant.layers import QuantizedLayer

    return isinstance(module, (QuantizedLayer, nn.Conv2d, nn.Linear))


def count_quantizable(module: nn.Module) -> int:
    """Conv2d / Linear layers (or their quantized wrappers) under ``module``."""
    from flexround_pl.quant.layers import QuantizedLayer

    return sum(isinstance(m, (nn.Conv2d, nn.Linear, QuantizedLayer)) for m in module.modules())
