"""Cost of one reconstruction iteration, per block family and method, vs the FP floor.

For one block of each family (random init, realistic shapes) this times one
reconstruction iteration — forward + backward + Adam step — through the code
path :class:`~flexround_pl.reconstruct.module.BlockReconstruction` uses
(``CalibrationCache`` capture from a real model call, ``BlockDataModule``
batches, quantized layers from ``quantize_modules``, ``training_forward``,
``reconstruction_loss``, ``total_regularization``, Adam):

* ``floor``: a plain copy of the FP block, every Linear / Conv weight
  ``requires_grad`` and Adam on those weights, same batch, same loss. This is
  the cost of one training step of the FP block itself; any learned-rounding
  method needs at least this (it needs dL/dW_hat, i.e. the weight gradients).
* ``flexround`` / ``adaround``: the student (quantized layers, only quantizer
  parameters learn).
* ``lightning``: the same ``--steps`` FlexRound steps through a real
  ``Trainer.fit`` of ``BlockReconstruction`` (as the driver builds it: no
  logger, no progress bar, no validation) vs the plain loop above, for the
  per-step overhead of Lightning.
* ``lp_init``: building the quantized layers of the block (the grid's Lp
  search over 100 candidates dominates), FlexRound, per-tensor.
* ``--precision 32-true bf16-mixed``: every method in each precision.
  ``bf16-mixed`` is what Lightning's ``MixedPrecision`` plugin does on CPU:
  ``torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)`` around
  the training step (forward + loss + regularization), backward and the Adam
  step outside it; parameters (quantizer scales included) stay fp32. With both
  precisions, ``bf16_vs_fp32`` has the CPU-time ratio and the numerical effect
  on one batch (same parameters): relative difference of the loss, and of the
  learnable parameters' gradient (relative L2, cosine, sign agreement).
* ``--compile``: ``nn.Module.compile()`` (``torch.compile``, inductor) of the
  student block (the module ``training_forward`` calls) and of the floor
  block: one-off compile time (first iteration minus the steady-state median),
  steady-state time vs eager, whether a *second* block of the same class (the
  next layer of the model, as the driver builds it: fresh student, no
  ``torch._dynamo.reset()``) recompiles, and the loss vs eager (first and last
  timed iteration, same start). Inductor runs with ``compile_threads = 1``
  (in-process, so the C++ compiler's CPU time is counted as children time)
  and a fresh cache directory per run (cold compile, unless ``--compile-cache``).
  ``--compile-resnet-blocks`` also walks the 8 BasicBlocks of ResNet-18 (three
  shapes / strides, with and without downsample) the same way, to count
  recompilations across block configurations.

Timings: median over ``--steps`` timed iterations after ``--warmup``, wall
(``time.perf_counter``) and CPU (``time.process_time``, all threads of the
process). On a shared machine wall times are noisy; the CPU time is the
steadier number on CPU. Writes ``benchmarks/results/iteration_cost.json``.

    python benchmarks/iteration_cost.py                       # full shapes (minutes on 2 CPU cores)
    python benchmarks/iteration_cost.py --scale 0.25 --steps 5  # quick: batch scaled down
    python benchmarks/iteration_cost.py --families bert --methods floor flexround
    python benchmarks/iteration_cost.py --threads 1 --scale 0.25 --precision 32-true bf16-mixed --lightning-steps 0
    python benchmarks/iteration_cost.py --threads 1 --scale 0.25 --families llama --compile --lightning-steps 0
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flexround_pl.quant.config import GridConfig, QuantConfig  # noqa: E402
from flexround_pl.quant.surgery import quantize_modules, total_regularization  # noqa: E402
from flexround_pl.reconstruct.cache import CalibrationCache, block_output, to_device  # noqa: E402
from flexround_pl.reconstruct.data import BlockDataModule  # noqa: E402
from flexround_pl.reconstruct.module import BlockReconstruction, reconstruction_loss  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed")

# ---- block families ---------------------------------------------------------------
# Each family builds a 2-layer model: ``block`` (layer 0) is the timed block, ``second``
# (layer 1, same class and shapes) is the "next block" of the --compile recompilation check.


def _bert(scale: float) -> dict[str, Any]:
    """One MiniLM-L6 layer (hidden 384, 12 heads, FFN 1536) at batch 32 x 128 tokens."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=128)
    net = transformers.BertForSequenceClassification(cfg).eval()
    b, t = max(1, round(32 * scale)), 128
    ids = torch.randint(0, 1000, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[: b // 2, t - 16:] = 0  # some padding, as real batches have
    batch = {"input_ids": ids, "attention_mask": mask}
    return dict(name=f"bert (MiniLM layer, {b}x{t})", net=net, block=net.bert.encoder.layer[0],
                second=net.bert.encoder.layer[1], run=lambda x: net(**x), batches=[batch])


def _llama(scale: float) -> dict[str, Any]:
    """One SmolLM2-135M decoder layer (hidden 576, 9 heads / 3 KV heads, FFN 1536) at batch 4 x 512."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                                   use_cache=False)
    net = transformers.LlamaForCausalLM(cfg).eval()
    b, t = max(1, round(4 * scale)), 512
    batch = {"input_ids": torch.randint(0, 1000, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long)}
    return dict(name=f"llama (SmolLM2 layer, {b}x{t})", net=net, block=net.model.layers[0],
                second=net.model.layers[1], run=lambda x: net(**x), batches=[batch])


def _resnet(scale: float) -> dict[str, Any]:
    """ResNet-18 ``layer1.0`` BasicBlock (64 ch, BN folded) at batch 32 x 64 x 56 x 56."""
    import torchvision

    from flexround_pl.models.cnn import prepare_resnet

    net = prepare_resnet(torchvision.models.resnet18().eval())
    b = max(1, round(32 * scale))
    batch = {"pixel_values": torch.randn(b, 3, 224, 224)}
    return dict(name=f"resnet (BasicBlock, {b}x64x56x56)", net=net, block=net.layer1[0], second=net.layer1[1],
                run=lambda x: net(x["pixel_values"]), batches=[batch])


FAMILIES: dict[str, Callable[[float], dict[str, Any]]] = {"bert": _bert, "llama": _llama, "resnet": _resnet}

# ---- timing -------------------------------------------------------------------------


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _timed(fn: Callable[[], float], warmup: int, steps: int) -> dict[str, Any]:
    """Median of ``steps`` calls after ``warmup``; the first call (compilation, if any) is also reported.

    ``fn`` returns the step's loss; ``losses`` has every call's, in order."""
    wall, cpu, losses = [], [], []
    first: dict[str, float] = {}
    for i in range(warmup + steps):
        w0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
        losses.append(fn())
        w, c = time.perf_counter() - w0, time.process_time() - c0
        if i == 0:
            first = {"first_wall_s": w, "first_cpu_s": c, "first_children_cpu_s": _children_cpu() - k0}
        if i >= warmup:
            wall.append(w)
            cpu.append(c)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "wall_min_s": min(wall), "cpu_min_s": min(cpu), **first, "losses": losses}


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """The training-step context of Lightning's precision plugin on CPU.

    ``bf16-mixed``: ``MixedPrecision.autocast_context_manager`` (``cache_enabled=False``), which
    ``Strategy.training_step`` enters around ``training_step`` only; ``32-true``: nothing."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
    if precision == "32-true":
        return contextlib.nullcontext()
    raise ValueError(precision)


def _quant_config(method: str, init: str = "lp") -> QuantConfig:
    return QuantConfig(method=method, weight=GridConfig(bits=4, granularity="tensor", init=init))


def _prepare(family: dict[str, Any]) -> tuple[CalibrationCache, nn.Module]:
    cache = CalibrationCache.capture(family["run"], family["block"], family["batches"])
    teacher = copy.deepcopy(family["block"]).eval().requires_grad_(False)
    cache.compute_targets(teacher, torch.device("cpu"), len(cache))
    return cache, teacher


class _Floor:
    """A plain copy of the FP block, every Linear / Conv weight learnable (Adam), same batch and loss."""

    def __init__(self, teacher: nn.Module) -> None:
        self.block = copy.deepcopy(teacher).eval()
        self.params = [m.weight for m in self.block.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.block.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)

    def compile(self) -> None:
        self.block.compile()

    def loss(self, batch: dict[str, Any], step: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = block_output(self.block(batch["q_inputs"], *batch["args"], **batch["kwargs"]))
        rec = reconstruction_loss(out, batch["targets"], batch.get("loss_mask"))
        return rec, rec


class _Student:
    """The quantized block inside ``BlockReconstruction``: ``training_step``'s loss, by hand."""

    def __init__(self, method: str, teacher: nn.Module) -> None:
        student = copy.deepcopy(teacher)
        w0, c0 = time.perf_counter(), time.process_time()
        quantize_modules(student, _quant_config(method))
        self.build_wall_s, self.build_cpu_s = time.perf_counter() - w0, time.process_time() - c0
        self.module = BlockReconstruction(teacher, student, lr=1e-3, tag="bench")
        self.params = self.module.weight_params

    def compile(self) -> None:
        self.module.student.compile()  # the module training_forward calls

    def loss(self, batch: dict[str, Any], step: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        rec = reconstruction_loss(self.module.training_forward(batch), batch["targets"], batch.get("loss_mask"))
        reg = total_regularization(self.module.student, min(1.0, step / total))
        return rec, rec + reg


def _make(method: str, teacher: nn.Module) -> Any:
    return _Floor(teacher) if method == "floor" else _Student(method, teacher)


def _step_fn(runner: Any, batch: dict[str, Any], total_steps: int, precision: str) -> Callable[[], float]:
    """One iteration as Lightning runs it: training_step under the precision context, backward, Adam step."""
    opt = torch.optim.Adam([{"params": runner.params, "lr": 1e-3}], lr=1e-3)
    counter = [0]

    def step() -> float:
        with _autocast(precision):
            rec, total = runner.loss(batch, counter[0], total_steps)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter[0] += 1
        return float(rec.detach())

    return step


@torch.no_grad()
def _fp32_loss(runner: Any, batch: dict[str, Any]) -> float:
    """Reconstruction loss of the current parameters, evaluated in fp32 (no autocast)."""
    rec, _ = runner.loss(batch, 0, 1)
    return float(rec)


def _loss_and_grad(runner: Any, batch: dict[str, Any], precision: str) -> tuple[float, torch.Tensor]:
    for p in runner.params:
        p.grad = None
    with _autocast(precision):
        rec, total = runner.loss(batch, 0, 1)
    total.backward()
    grad = torch.cat([p.grad.detach().flatten().double() for p in runner.params])
    for p in runner.params:
        p.grad = None
    return float(rec.detach()), grad


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _bf16_numerics(method: str, teacher: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
    """Loss and gradient of the learnable parameters on one batch, fp32 vs bf16-mixed, same parameters."""
    torch.manual_seed(0)
    runner = _make(method, teacher)
    l32, g32 = _loss_and_grad(runner, batch, "32-true")
    l16, g16 = _loss_and_grad(runner, batch, "bf16-mixed")
    out: dict[str, Any] = {"loss_fp32": l32, "loss_bf16": l16, "grad_numel": int(g32.numel()),
                           "loss_rel_diff": None, "grad_rel_l2": None, "grad_cos": None, "grad_sign_agree": None}
    nz = g32 != 0
    if l32 > 0 and bool(nz.any()):  # the floor's fp32 loss and gradient are 0 (student == teacher): no ratio
        out.update({
            "loss_rel_diff": _rel(l16, l32),
            "grad_rel_l2": float((g16 - g32).norm() / g32.norm()),
            "grad_cos": float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)),
            "grad_sign_agree": float((torch.sign(g16[nz]) == torch.sign(g32[nz])).float().mean()),
        })
    return out


def _quality(method: str, teacher: nn.Module, batch: dict[str, Any], precision: str, steps: int,
             lr: float) -> dict[str, float]:
    """Train ``steps`` iterations (Adam, cosine to 0, as ``BlockReconstruction``) in ``precision`` from the
    Lp/RTN start; the hard (hardened-codes) loss is evaluated in fp32, as the driver's ``loss_end``."""
    from flexround_pl.quant.surgery import set_hard

    torch.manual_seed(0)
    runner = _Student(method, teacher)
    student = runner.module.student

    @torch.no_grad()
    def hard_loss() -> float:
        set_hard(student, True)
        try:
            return _fp32_loss(runner, batch)
        finally:
            set_hard(student, False)

    start = hard_loss()
    opt = torch.optim.Adam([{"params": runner.params, "lr": lr}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    c0 = time.process_time()
    for i in range(steps):
        with _autocast(precision):
            _, total = runner.loss(batch, i, steps)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return {"hard_loss_start": start, "hard_loss_end": hard_loss(), "cpu_s": time.process_time() - c0,
            "steps": steps, "lr": lr}


# ---- torch.compile ------------------------------------------------------------------


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "frames_compiled": int(counters["frames"]["ok"]),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def _eval_fn(runner: Any, batch: dict[str, Any], precision: str) -> Callable[[], float]:
    """The validation forward the driver also runs per block: no grad, AdaRound hard (a different graph)."""
    from flexround_pl.quant.surgery import set_hard

    @torch.no_grad()
    def fn() -> float:
        student = getattr(getattr(runner, "module", None), "student", None)
        if student is not None:
            set_hard(student, True)
        try:
            with _autocast(precision):
                rec, _ = runner.loss(batch, 0, 1)
        finally:
            if student is not None:
                set_hard(student, False)
        return float(rec)

    return fn


def _first_and_next(fn: Callable[[], float]) -> dict[str, float]:
    t = _timed(fn, 1, 1)
    return {"first_wall_s": t["first_wall_s"], "first_cpu_s": t["first_cpu_s"],
            "first_children_cpu_s": t["first_children_cpu_s"], "wall_s": t["wall_s"], "cpu_s": t["cpu_s"],
            "compile_wall_s": t["first_wall_s"] - t["wall_s"],
            "compile_cpu_s": t["first_cpu_s"] + t["first_children_cpu_s"] - t["cpu_s"]}


def _inductor_startup() -> dict[str, float]:
    """The first compilation of the process (imports, inductor start-up) on a tiny Linear: paid once per run."""
    import torch._dynamo

    lin = nn.Linear(8, 8)
    lin.compile()
    x = torch.randn(4, 8)
    w0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    lin(x).sum().backward()
    out = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0 + _children_cpu() - k0}
    torch._dynamo.reset()
    return out


def _compiled(method: str, teacher: nn.Module, second_teacher: nn.Module, batch: dict[str, Any], precision: str,
              warmup: int, steps: int, eager: dict[str, Any], target_energy: float) -> dict[str, Any]:
    """Compile the block, time it, then a second block of the same class (no reset in between)."""
    import torch._dynamo

    torch._dynamo.reset()
    out: dict[str, Any] = {}
    try:
        before = _dynamo_counts()
        torch.manual_seed(0)
        runner = _make(method, teacher)
        runner.compile()
        t = _timed(_step_fn(runner, batch, warmup + steps, precision), warmup, steps)
        t["compile_wall_s"] = t["first_wall_s"] - t["wall_s"]
        t["compile_cpu_s"] = t["first_cpu_s"] + t["first_children_cpu_s"] - t["cpu_s"]
        t["x_eager_cpu"] = t["cpu_s"] / eager["cpu_s"]
        t["x_eager_wall"] = t["wall_s"] / eager["wall_s"]
        t["eager_first_minus_steady_cpu_s"] = eager["first_cpu_s"] - eager["cpu_s"]
        # same start, same batch: loss of the first (forward only differs) and last (after warmup+steps-1
        # Adam updates) iteration; relative to the eager loss, and to the targets' energy (the floor's
        # eager loss is 0: the block is its own teacher)
        for k, i in (("first", 0), ("last", -1)):
            d = abs(t["losses"][i] - eager["losses"][i])
            t[f"loss_rel_diff_{k}"] = d / eager["losses"][i] if eager["losses"][i] > 0 else None
            t[f"loss_diff_over_target_{k}"] = d / target_energy
        t["counters"] = _delta(_dynamo_counts(), before)
        out.update(t)
        before = _dynamo_counts()
        out["eval_forward"] = _first_and_next(_eval_fn(runner, batch, precision))
        out["eval_forward"]["counters"] = _delta(_dynamo_counts(), before)
        # the next layer of the model: a fresh block of the same class, as the driver builds one per layer
        before = _dynamo_counts()
        torch.manual_seed(0)
        runner2 = _make(method, second_teacher)
        runner2.compile()
        out["second_block"] = _first_and_next(_step_fn(runner2, batch, 2, precision))
        out["second_block"]["eval_forward"] = _first_and_next(_eval_fn(runner2, batch, precision))
        out["second_block"]["counters"] = _delta(_dynamo_counts(), before)
        out["second_block"]["recompiled"] = out["second_block"]["counters"]["frames_compiled"] > 0
    except Exception as e:  # noqa: BLE001 -- report, do not hide: a family that does not compile is a result
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
    return out


def _compile_resnet_blocks(batch_size: int = 2) -> list[dict[str, Any]]:
    """Every BasicBlock of ResNet-18 in turn, as the driver would walk them (no ``torch._dynamo.reset()``):
    compile a FlexRound student, one training step, then the two validation forwards the product runs
    (Lightning's under ``torch.inference_mode``, the driver's ``block_loss`` under ``torch.no_grad``)."""
    import logging

    import torch._dynamo
    import torchvision
    from torch._dynamo.utils import counters

    from flexround_pl.models.cnn import prepare_resnet
    from flexround_pl.quant.surgery import set_hard

    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Keep()
    logging.getLogger("torch._dynamo").addHandler(handler)
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = prepare_resnet(torchvision.models.resnet18().eval())
    blocks = [(f"layer{i}.{j}", getattr(net, f"layer{i}")[j]) for i in range(1, 5) for j in range(2)]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach())) for n, b in blocks]
    with torch.no_grad():
        net(torch.randn(batch_size, 3, 224, 224))
    for h in hooks:
        h.remove()
    out = []
    try:
        for name, block in blocks:
            x = inputs[name]
            with torch.no_grad():
                y = block(x)
            student = copy.deepcopy(block)
            quantize_modules(student, _quant_config("flexround"))
            student.compile()
            f0, n0, w0 = counters["frames"]["ok"], len(messages), time.perf_counter()
            reconstruction_loss(student(x), y).backward()
            w1 = time.perf_counter()
            set_hard(student, True)
            with torch.inference_mode():
                student(x)
            with torch.no_grad():
                student(x)
            set_hard(student, False)
            out.append({"block": name, "input": list(x.shape), "frames_compiled": counters["frames"]["ok"] - f0,
                        "first_step_wall_s": w1 - w0, "evals_wall_s": time.perf_counter() - w1,
                        "recompile_limit_hit": any("recompile_limit" in m for m in messages[n0:])})
            print(f"  resnet-18 {name} {tuple(x.shape)}: {out[-1]['frames_compiled']} graphs compiled, "
                  f"first step {out[-1]['first_step_wall_s']:.1f} s, evals {out[-1]['evals_wall_s']:.1f} s"
                  + (", recompile limit hit (eager from here on)" if out[-1]["recompile_limit_hit"] else ""),
                  flush=True)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    return out


# ---- Lightning ------------------------------------------------------------------------


def _lightning_overhead(teacher: nn.Module, cache: CalibrationCache, batch_size: int, steps: int) -> dict[str, float]:
    """``steps`` FlexRound steps via ``Trainer.fit`` vs a plain loop over the same loader."""
    from flexround_pl.pipeline import TrainerSettings

    out: dict[str, float] = {}
    for kind in ("plain", "lightning"):
        torch.manual_seed(0)
        module = _Student("flexround", teacher).module
        dm = BlockDataModule(cache, batch_size, batch_size, seed=0)
        w0, c0 = time.perf_counter(), time.process_time()
        if kind == "lightning":
            settings = TrainerSettings({"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False,
                                        "enable_progress_bar": False})
            trainer = settings.block_trainer("bench", [], None)
            trainer.fit(module, datamodule=dm)
            assert trainer.global_step == steps
        else:  # the same steps by hand: same loader, same loss, same optimizer and cosine schedule
            opt = torch.optim.Adam([{"params": module.weight_params, "lr": module.lr}], lr=module.lr)
            done = 0
            while done < steps:
                for batch in dm.train_dataloader():
                    rec = reconstruction_loss(module.training_forward(batch), batch["targets"], batch.get("loss_mask"))
                    reg = total_regularization(module.student, done / steps)
                    (rec + reg).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    done += 1
                    if done >= steps:
                        break
        out[f"{kind}_wall_s"] = time.perf_counter() - w0
        out[f"{kind}_cpu_s"] = time.process_time() - c0
    out["overhead_wall_s_per_step"] = (out["lightning_wall_s"] - out["plain_wall_s"]) / steps
    out["overhead_cpu_s_per_step"] = (out["lightning_cpu_s"] - out["plain_cpu_s"]) / steps
    return out


# ---- main -----------------------------------------------------------------------------


def run(families: list[str], methods: list[str], scale: float, warmup: int, steps: int,
        lightning_steps: int, precisions: list[str] | None = None, compile_: bool = False,
        quality_steps: int = 0, quality_lr: float = 1e-3) -> dict[str, Any]:
    precisions = precisions or ["32-true"]
    rows = []
    startup: dict[str, float] | None = None
    for fam_key in families:
        torch.manual_seed(0)
        family = FAMILIES[fam_key](scale)
        cache, teacher = _prepare(family)
        second_teacher = copy.deepcopy(family["second"]).eval().requires_grad_(False)
        batch = to_device(BlockDataModule(cache, len(cache), len(cache), 0).val_dataloader().__iter__().__next__(),
                          torch.device("cpu"))
        target_energy = float(reconstruction_loss(torch.zeros_like(batch["targets"]), batch["targets"],
                                                  batch.get("loss_mask")))
        row: dict[str, Any] = {"family": fam_key, "block": family["name"], "precision": precisions[0],
                               "precisions": {}}
        for precision in precisions:
            res: dict[str, Any] = {}
            for method in methods:
                torch.manual_seed(0)
                runner = _make(method, teacher)
                res[method] = _timed(_step_fn(runner, batch, warmup + steps, precision), warmup, steps)
                res[method]["loss_after_fp32"] = _fp32_loss(runner, batch)
                if method != "floor":
                    res[method]["build_wall_s"], res[method]["build_cpu_s"] = runner.build_wall_s, runner.build_cpu_s
                print(f"  {fam_key} {precision} {method}: {res[method]['cpu_s'] * 1e3:.1f} ms CPU, "
                      f"{res[method]['wall_s'] * 1e3:.1f} ms wall", flush=True)
            for method in methods:
                if method != "floor" and "floor" in res:
                    res[method]["x_floor_cpu"] = res[method]["cpu_s"] / res["floor"]["cpu_s"]
                    res[method]["x_floor_wall"] = res[method]["wall_s"] / res["floor"]["wall_s"]
            row["precisions"][precision] = res
        for method in methods:  # the old keys: the first precision's numbers
            row[method] = row["precisions"][precisions[0]][method]
        if set(PRECISIONS) <= set(precisions):
            p32, p16 = row["precisions"]["32-true"], row["precisions"]["bf16-mixed"]
            row["bf16_vs_fp32"] = {}
            for method in methods:
                num = _bf16_numerics(method, teacher, batch)
                num["x_cpu"] = p16[method]["cpu_s"] / p32[method]["cpu_s"]
                num["x_wall"] = p16[method]["wall_s"] / p32[method]["wall_s"]
                num["loss_after_rel_diff"] = _rel(p16[method]["loss_after_fp32"], p32[method]["loss_after_fp32"])
                row["bf16_vs_fp32"][method] = num
                print(f"  {fam_key} bf16/fp32 {method}: {num['x_cpu']:.2f}x CPU, loss fp32 {num['loss_fp32']:.4g} "
                      f"bf16 {num['loss_bf16']:.4g}, grad rel L2 {num['grad_rel_l2']}", flush=True)
            if "floor" in row["bf16_vs_fp32"]:
                # the floor's bf16 loss is bf16's own error on the FP block (its fp32 loss is 0): its share
                # of the W4 round-to-nearest loss the quantizers start from (FlexRound at init == RTN)
                for method in methods:
                    if method != "floor":
                        row["bf16_vs_fp32"][method]["bf16_floor_over_fp32_loss"] = (
                            row["bf16_vs_fp32"]["floor"]["loss_bf16"] / row["bf16_vs_fp32"][method]["loss_fp32"])
        if quality_steps > 0:
            row["quality"] = {}
            for method in (m for m in methods if m != "floor"):
                q = {p: _quality(method, teacher, batch, p, quality_steps, quality_lr) for p in precisions}
                if set(PRECISIONS) <= set(precisions):
                    a, b = q["32-true"]["hard_loss_end"], q["bf16-mixed"]["hard_loss_end"]
                    q["bf16_over_fp32_end"] = b / a
                row["quality"][method] = q
                print(f"  {fam_key} {method} {quality_steps} steps: hard loss "
                      + ", ".join(f"{p} {q[p]['hard_loss_start']:.4g} -> {q[p]['hard_loss_end']:.4g}" for p in precisions),
                      flush=True)
        if compile_:
            if startup is None:
                startup = _inductor_startup()
            row["compile"] = {}
            for precision in precisions:
                row["compile"][precision] = {}
                for method in methods:
                    c = _compiled(method, teacher, second_teacher, batch, precision, warmup, steps,
                                  row["precisions"][precision][method], target_energy)
                    row["compile"][precision][method] = c
                    if "error" in c:
                        print(f"  {fam_key} {precision} {method} compiled: FAILED {c['error']}", flush=True)
                    else:
                        print(f"  {fam_key} {precision} {method} compiled: {c['cpu_s'] * 1e3:.1f} ms CPU "
                              f"({c['x_eager_cpu']:.2f}x eager), compile {c['compile_wall_s']:.1f} s wall, "
                              f"2nd block recompiled={c['second_block']['recompiled']} "
                              f"({c['second_block']['compile_wall_s']:.1f} s)", flush=True)
        if lightning_steps > 0:
            bs = max(1, len(cache) // 2)
            row["lightning"] = _lightning_overhead(teacher, cache, bs, lightning_steps)
            row["lightning"]["batch_size"] = bs
            row["lightning"]["steps"] = lightning_steps
        rows.append(row)
    out = {
        "rows": rows, "scale": scale, "warmup": warmup, "steps": steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "precisions": precisions, "compile": compile_,
        "quality_steps": quality_steps, "quality_lr": quality_lr,
    }
    if compile_:
        import torch._dynamo.config as dcfg
        import torch._inductor.config as icfg

        out["compile_settings"] = {
            "first_compile_of_process_wall_s": startup and startup["wall_s"],
            "first_compile_of_process_cpu_s": startup and startup["cpu_s"],
            "backend": "inductor", "compile_threads": icfg.compile_threads, "fx_graph_cache": icfg.fx_graph_cache,
            "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "recompile_limit": getattr(dcfg, "recompile_limit", getattr(dcfg, "cache_size_limit", None)),
        }
    return out


def table(result: dict[str, Any], methods: list[str]) -> str:
    head = ["block"] + [f"{m} ms CPU (wall)" for m in methods] + [f"{m} / floor (CPU)" for m in methods if m != "floor"]
    head += ["Lp init s CPU", "Lightning ms/step overhead CPU (wall)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["block"]]
        cells += [f"{r[m]['cpu_s'] * 1e3:.0f} ({r[m]['wall_s'] * 1e3:.0f})" if m in r else "-" for m in methods]
        cells += [f"{r[m]['x_floor_cpu']:.2f}x" if "x_floor_cpu" in r.get(m, {}) else "-" for m in methods if m != "floor"]
        init = r.get("flexround", {}).get("build_cpu_s")
        cells.append("-" if init is None else f"{init:.2f}")
        lt = r.get("lightning")
        cells.append("-" if lt is None else
                     f"{lt['overhead_cpu_s_per_step'] * 1e3:.1f} ({lt['overhead_wall_s_per_step'] * 1e3:.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def precision_table(result: dict[str, Any], methods: list[str]) -> str:
    head = ["block", "method", "fp32 ms CPU", "bf16 ms CPU", "bf16 / fp32 (CPU)", "loss fp32 / bf16",
            "loss rel diff", "grad rel L2", "grad cos", "grad sign agree",
            f"loss after {result['warmup'] + result['steps']} it (fp32 eval), rel diff", "bf16 floor / loss"]

    def f(x: Any, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        for m in methods:
            b = r.get("bf16_vs_fp32", {}).get(m)
            if b is None:
                continue
            p = r["precisions"]
            lines.append("| " + " | ".join([
                r["block"], m, f"{p['32-true'][m]['cpu_s'] * 1e3:.0f}", f"{p['bf16-mixed'][m]['cpu_s'] * 1e3:.0f}",
                f"{b['x_cpu']:.2f}x", f"{b['loss_fp32']:.3g} / {b['loss_bf16']:.3g}", f(b["loss_rel_diff"], ".1e"),
                f(b["grad_rel_l2"], ".1e"), f(b["grad_cos"], ".5f"), f(b["grad_sign_agree"], ".4f"),
                f(b["loss_after_rel_diff"] if m != "floor" else None, ".1e"),
                f(b.get("bf16_floor_over_fp32_loss"), ".1e")]) + " |")
    return "\n".join(lines)


def quality_table(result: dict[str, Any], precisions: list[str]) -> str:
    head = ["block", "method", "steps", "hard loss start (RTN grid)"] + [f"hard loss end, {p}" for p in precisions]
    both = set(PRECISIONS) <= set(precisions)
    if both:
        head.append("bf16 / fp32 end")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        for m, q in r.get("quality", {}).items():
            cells = [r["block"], m, str(result["quality_steps"]), f"{q[precisions[0]]['hard_loss_start']:.4g}"]
            cells += [f"{q[p]['hard_loss_end']:.4g}" for p in precisions]
            if both:
                cells.append(f"{q['bf16_over_fp32_end']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_table(result: dict[str, Any], methods: list[str]) -> str:
    head = ["block", "precision", "method", "eager ms CPU", "compiled ms CPU", "compiled / eager (CPU)",
            "compile s wall (CPU incl. cc)", "eval graph compile s wall", "2nd block: recompiles? compile s wall",
            "loss diff vs eager first / last (rel; floor: / target energy)", "graphs / breaks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        for precision, per in r.get("compile", {}).items():
            for m in methods:
                c = per.get(m)
                if c is None:
                    continue
                e = r["precisions"][precision][m]
                if "error" in c:
                    lines.append("| " + " | ".join([r["block"], precision, m, f"{e['cpu_s'] * 1e3:.0f}",
                                                    f"failed: {c['error'][:120]}", "-", "-", "-", "-", "-"]) + " |")
                    continue
                s = c["second_block"]
                key = "loss_diff_over_target" if m == "floor" else "loss_rel_diff"  # floor: loss is ~0 (noise)
                lines.append("| " + " | ".join([
                    r["block"], precision, m, f"{e['cpu_s'] * 1e3:.0f}", f"{c['cpu_s'] * 1e3:.0f}",
                    f"{c['x_eager_cpu']:.2f}x", f"{c['compile_wall_s']:.1f} ({c['compile_cpu_s']:.1f})",
                    f"{c['eval_forward']['compile_wall_s']:.1f}",
                    f"{'yes' if s['recompiled'] else 'no'}, {s['compile_wall_s'] + s['eval_forward']['compile_wall_s']:.1f}"
                    + (f" (fx cache hits {s['counters']['fxgraph_cache_hit']})" if s["recompiled"] else ""),
                    f"{c[key + '_first']:.1e} / {c[key + '_last']:.1e}",
                    f"{c['counters']['unique_graphs']} / {c['counters']['graph_breaks']}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=["floor", "flexround", "adaround"],
                        choices=["floor", "flexround", "adaround"])
    parser.add_argument("--scale", type=float, default=1.0, help="batch-size multiplier (0.25 = quick run)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed iterations per method (median reported)")
    parser.add_argument("--lightning-steps", type=int, default=10, help="0 skips the Trainer.fit comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--precision", nargs="+", default=["32-true"], choices=list(PRECISIONS),
                        help="training-step precision(s), as Lightning's trainer.precision on CPU; "
                             "both: bf16/fp32 time ratios and the numerical effect")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd student and floor blocks (each precision)")
    parser.add_argument("--quality-steps", type=int, default=0,
                        help="also train N steps per precision (cosine) and compare the final hard loss (fp32 eval)")
    parser.add_argument("--quality-lr", type=float, default=1e-3, help="Adam lr of --quality-steps")
    parser.add_argument("--compile-resnet-blocks", action="store_true",
                        help="with --compile: compile all 8 BasicBlocks of ResNet-18 in turn (recompilations)")
    parser.add_argument("--compile-cache", action="store_true",
                        help="keep inductor's default (warm) cache directory instead of a fresh one")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "iteration_cost.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    precisions = list(dict.fromkeys(args.precision))
    if args.compile_resnet_blocks and not args.compile:
        parser.error("--compile-resnet-blocks needs --compile")
    if args.compile:
        import torch._inductor.config as icfg

        icfg.compile_threads = 1  # in-process: the C++ compiler runs as a waited-for child (CPU time counted)
        if not args.compile_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="iteration_cost_inductor_")
    result = run(args.families, args.methods, args.scale, args.warmup, args.steps, args.lightning_steps,
                 precisions, args.compile, args.quality_steps, args.quality_lr)
    if args.compile_resnet_blocks:
        result["compile_resnet18_blocks"] = _compile_resnet_blocks()
    result["argv"] = sys.argv[1:]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(result, args.methods))
    if any("bf16_vs_fp32" in r for r in result["rows"]):
        print()
        print(precision_table(result, args.methods))
    if args.quality_steps > 0:
        print()
        print(quality_table(result, precisions))
    if args.compile:
        cs = result["compile_settings"]
        print()
        print(f"first compilation of the process (tiny Linear, imports + inductor start-up): "
              f"{cs['first_compile_of_process_wall_s']:.1f} s wall, {cs['first_compile_of_process_cpu_s']:.1f} s CPU")
        print(compile_table(result, args.methods))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
