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

Timings: median over ``--steps`` timed iterations after ``--warmup``, wall
(``time.perf_counter``) and CPU (``time.process_time``, all threads of the
process). On a shared machine wall times are noisy; the CPU time is the
steadier number on CPU. Writes ``benchmarks/results/iteration_cost.json``.

    python benchmarks/iteration_cost.py                       # full shapes (minutes on 2 CPU cores)
    python benchmarks/iteration_cost.py --scale 0.25 --steps 5  # quick: batch scaled down
    python benchmarks/iteration_cost.py --families bert --methods floor flexround
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
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

# ---- block families ---------------------------------------------------------------


def _bert(scale: float) -> dict[str, Any]:
    """One MiniLM-L6 layer (hidden 384, 12 heads, FFN 1536) at batch 32 x 128 tokens."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=1, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=128)
    net = transformers.BertForSequenceClassification(cfg).eval()
    b, t = max(1, round(32 * scale)), 128
    ids = torch.randint(0, 1000, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[: b // 2, t - 16:] = 0  # some padding, as real batches have
    batch = {"input_ids": ids, "attention_mask": mask}
    return dict(name=f"bert (MiniLM layer, {b}x{t})", net=net, block=net.bert.encoder.layer[0],
                run=lambda x: net(**x), batches=[batch])


def _llama(scale: float) -> dict[str, Any]:
    """One SmolLM2-135M decoder layer (hidden 576, 9 heads / 3 KV heads, FFN 1536) at batch 4 x 512."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                                   use_cache=False)
    net = transformers.LlamaForCausalLM(cfg).eval()
    b, t = max(1, round(4 * scale)), 512
    batch = {"input_ids": torch.randint(0, 1000, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long)}
    return dict(name=f"llama (SmolLM2 layer, {b}x{t})", net=net, block=net.model.layers[0],
                run=lambda x: net(**x), batches=[batch])


def _resnet(scale: float) -> dict[str, Any]:
    """ResNet-18 ``layer1.0`` BasicBlock (64 ch, BN folded) at batch 32 x 64 x 56 x 56."""
    import torchvision

    from flexround_pl.models.cnn import prepare_resnet

    net = prepare_resnet(torchvision.models.resnet18().eval())
    b = max(1, round(32 * scale))
    batch = {"pixel_values": torch.randn(b, 3, 224, 224)}
    return dict(name=f"resnet (BasicBlock, {b}x64x56x56)", net=net, block=net.layer1[0],
                run=lambda x: net(x["pixel_values"]), batches=[batch])


FAMILIES: dict[str, Callable[[float], dict[str, Any]]] = {"bert": _bert, "llama": _llama, "resnet": _resnet}

# ---- timing -------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], warmup: int, steps: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "wall_min_s": min(wall), "cpu_min_s": min(cpu)}


def _quant_config(method: str, init: str = "lp") -> QuantConfig:
    return QuantConfig(method=method, weight=GridConfig(bits=4, granularity="tensor", init=init))


def _prepare(family: dict[str, Any]) -> tuple[CalibrationCache, nn.Module]:
    cache = CalibrationCache.capture(family["run"], family["block"], family["batches"])
    teacher = copy.deepcopy(family["block"]).eval().requires_grad_(False)
    cache.compute_targets(teacher, torch.device("cpu"), len(cache))
    return cache, teacher


def _floor_step(teacher: nn.Module, batch: dict[str, Any]) -> Callable[[], None]:
    fp = copy.deepcopy(teacher).eval()
    params = [m.weight for m in fp.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    fp.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3)

    def step() -> None:
        out = block_output(fp(batch["q_inputs"], *batch["args"], **batch["kwargs"]))
        loss = reconstruction_loss(out, batch["targets"], batch.get("loss_mask"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _student(family: dict[str, Any], method: str, teacher: nn.Module) -> tuple[BlockReconstruction, float, float]:
    student = copy.deepcopy(teacher)
    w0, c0 = time.perf_counter(), time.process_time()
    quantize_modules(student, _quant_config(method))
    build_wall, build_cpu = time.perf_counter() - w0, time.process_time() - c0
    return BlockReconstruction(teacher, student, lr=1e-3, tag="bench"), build_wall, build_cpu


def _student_step(module: BlockReconstruction, batch: dict[str, Any], total_steps: int) -> Callable[[], None]:
    """One iteration exactly as ``BlockReconstruction.training_step`` + Lightning's optimizer step do it."""
    opt = torch.optim.Adam([{"params": module.weight_params, "lr": module.lr}], lr=module.lr)
    counter = [0]

    def step() -> None:
        rec = reconstruction_loss(module.training_forward(batch), batch["targets"], batch.get("loss_mask"))
        reg = total_regularization(module.student, min(1.0, counter[0] / total_steps))
        (rec + reg).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter[0] += 1

    return step


def _lightning_overhead(teacher: nn.Module, cache: CalibrationCache, batch_size: int, steps: int) -> dict[str, float]:
    """``steps`` FlexRound steps via ``Trainer.fit`` vs a plain loop over the same loader."""
    from flexround_pl.pipeline import TrainerSettings

    out: dict[str, float] = {}
    for kind in ("plain", "lightning"):
        torch.manual_seed(0)
        module, _, _ = _student({}, "flexround", teacher)
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
        lightning_steps: int) -> dict[str, Any]:
    rows = []
    for fam_key in families:
        torch.manual_seed(0)
        family = FAMILIES[fam_key](scale)
        cache, teacher = _prepare(family)
        batch = to_device(BlockDataModule(cache, len(cache), len(cache), 0).val_dataloader().__iter__().__next__(),
                          torch.device("cpu"))
        row: dict[str, Any] = {"family": fam_key, "block": family["name"]}
        for method in methods:
            torch.manual_seed(0)
            if method == "floor":
                row["floor"] = _timed(_floor_step(teacher, batch), warmup, steps)
            else:
                module, bw, bc = _student(family, method, teacher)
                row[method] = _timed(_student_step(module, batch, warmup + steps), warmup, steps)
                row[method]["build_wall_s"], row[method]["build_cpu_s"] = bw, bc
            print(f"  {fam_key} {method}: {row[method]['cpu_s'] * 1e3:.1f} ms CPU, "
                  f"{row[method]['wall_s'] * 1e3:.1f} ms wall", flush=True)
        for method in methods:
            if method != "floor" and "floor" in row:
                row[method]["x_floor_cpu"] = row[method]["cpu_s"] / row["floor"]["cpu_s"]
                row[method]["x_floor_wall"] = row[method]["wall_s"] / row["floor"]["wall_s"]
        if lightning_steps > 0:
            bs = max(1, len(cache) // 2)
            row["lightning"] = _lightning_overhead(teacher, cache, bs, lightning_steps)
            row["lightning"]["batch_size"] = bs
            row["lightning"]["steps"] = lightning_steps
        rows.append(row)
    return {
        "rows": rows, "scale": scale, "warmup": warmup, "steps": steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


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
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "iteration_cost.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args.families, args.methods, args.scale, args.warmup, args.steps, args.lightning_steps)
    result["argv"] = sys.argv[1:]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    md = table(result, args.methods)
    print(md)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
