"""The output-aware grid's range search, every candidate vs ``weight.search_stride 4``, on real SmolLM2 layers.

For the linear layers of the blocks given (default 0, 14, 29), ``H = 2 X^T X / n`` comes from the
FP model's inputs on 16 calibration windows of 256 tokens (the product uses the quantized model's
inputs; here only the search is compared, on realistic W and H). For W4 / W3 asymmetric, per
channel and group 64, it prints and writes (JSON) the layer output error ``e^T H e`` each search
finds and its CPU time, at one thread::

    python benchmarks/output_search.py --blocks 0 14 29 --out benchmarks/results/smollm2/output_search.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flexround_pl.data.language_modeling import LanguageModelingData
from flexround_pl.models.gguf import SmolLM2
from flexround_pl.quant.grid import GridConfig, UniformGrid


def input_hessians(model: torch.nn.Module, ids: torch.Tensor, blocks: list[int]) -> dict[str, torch.Tensor]:
    """``2 X^T X / n`` (float64) of the inputs of every linear layer in ``blocks``, over ``ids``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def accumulate(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n
               and int(n.split(".layers.")[1].split(".")[0]) in blocks]
    with torch.no_grad():
        for i in range(0, len(ids), 4):
            model(ids[i:i + 4])
    for h in handles:
        h.remove()
    return {n: 2 * sums[n] / counts[n] for n in sums}


def output_error(w: torch.Tensor, grid: UniformGrid, h: torch.Tensor, granularity: str, group_size: int) -> float:
    """``e^T H e`` of the grid's round-to-nearest weight, float64 (group: each group with its block of H)."""
    s, z, v = grid.step(), grid.zero_point, grid.group_view(w)
    e = (s * (torch.clamp(torch.round(v / s) + z, grid.qmin, grid.qmax) - z) - v).reshape(w.shape).double()
    if granularity == "channel":
        return float(((e @ h) * e).sum())
    total = 0.0
    for g in range(w.shape[1] // group_size):
        cols = slice(g * group_size, (g + 1) * group_size)
        total += float(((e[:, cols] @ h[cols, cols]) * e[:, cols]).sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", type=int, default=[0, 14, 29])
    parser.add_argument("--out", default="output_search.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = SmolLM2()
    model = source.load().eval()
    data = LanguageModelingData(source="wiki_summaries", seq_length=256, num_calibration=16, num_eval_windows=4)
    data.set_tokenizer(source.load_tokenizer())
    hessians = input_hessians(model, data.windows()["calibration"], args.blocks)
    modules = dict(model.named_modules())
    rows = []
    for bits in (4, 3):
        for granularity in ("channel", "group"):
            for name, h in hessians.items():
                w = modules[name].weight.detach().float()
                row = {"layer": name, "bits": bits, "gran": granularity}
                for stride in (1, 4):
                    cfg = GridConfig(bits=bits, symmetric=False, granularity=granularity, group_size=64,
                                     init="output", search_stride=stride)
                    start = time.process_time()
                    grid = UniformGrid(w, cfg, h.float())
                    row[f"cpu{stride}"] = time.process_time() - start
                    row[f"err{stride}"] = output_error(w, grid, h, granularity, 64)
                rows.append(row)
                print(f"W{bits} {granularity:7s} {name:40s} error x{row['err4'] / row['err1']:.5f}  "
                      f"CPU-s {row['cpu1']:.2f} -> {row['cpu4']:.2f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    for granularity in ("channel", "group"):
        ratios = sorted(r["err4"] / r["err1"] for r in rows if r["gran"] == granularity)
        cpu = (sum(r["cpu4"] for r in rows if r["gran"] == granularity)
               / sum(r["cpu1"] for r in rows if r["gran"] == granularity))
        print(f"{granularity}: stride-4 error / full-search error: min {ratios[0]:.4f}, median "
              f"{ratios[len(ratios) // 2]:.4f}, max {ratios[-1]:.4f} over {len(ratios)} layers; CPU {cpu:.2f}x")


if __name__ == "__main__":
    main()
