"""PNG plots of a comparison (``python -m flexround_pl compare``): metric vs bits, per-block loss curves.

* ``loss_curves_w<bits>.png``: one panel per block, training loss per step for
  each learned method (log scale, from the run's TensorBoard logs, tags
  ``block_NN/loss``), RTN's block loss as a dashed line. AdaRound trains a
  relaxed rounding, so its curve is the soft loss, not the hard one;
* ``metric_vs_bits.png``: the task metric (accuracy / perplexity / top1) and
  ``fp_agreement`` against bit-width, one line per method, FP dashed.

Rows are ``results.json`` dicts with their ``run_dir``. matplotlib renders
off-screen (the Agg backend): no display needed.
"""

from __future__ import annotations

import glob
import math
import os
from collections import defaultdict

COLORS = {"rtn": "tab:gray", "adaround": "tab:orange", "flexround": "tab:blue", "nupes": "tab:green",
          "gptq": "tab:red", "lrq": "tab:purple", "autoround": "tab:brown"}


def _model_name(row: dict) -> str:
    return row.get("model", "").split(" (")[0][:80]


def loss_curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``block_NN`` -> [(step, loss)] from every TensorBoard event file of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.endswith("/loss"):
                curves[tag.split("/")[0]] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(rows: list[dict], bits: int, out: str) -> str:
    plt = _pyplot()

    rows = [r for r in rows if r["w_bits"] == bits]
    n = max(len(r["blocks"]) for r in rows)
    cols = min(6, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.2 * nrows), squeeze=False)
    for r in rows:
        color = COLORS.get(r["method"])
        curves = {} if r["method"] == "rtn" else loss_curves(r["run_dir"])
        for i, block in enumerate(r["blocks"]):
            ax = axes[i // cols][i % cols]
            curve = curves.get(f"block_{i:02d}")
            if r["method"] == "rtn":
                ax.axhline(block["loss_end"], color=color, ls="--", lw=1, label="rtn")
            elif curve:
                steps, values = zip(*curve)
                # AdaRound trains a relaxed (soft) rounding: its curve is not the hard-rounded loss
                label = "adaround (soft loss)" if r["method"] == "adaround" else r["method"]
                ax.plot(steps, values, color=color, lw=1, label=label)
            ax.set_title(block["name"].split(".")[-1] if len(r["blocks"]) > 12 else block["name"], fontsize=7)
            ax.set_yscale("log")
            ax.tick_params(labelsize=6)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle(f"W{bits}: block reconstruction loss per step ({_model_name(rows[0])})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    path = os.path.join(out, f"loss_curves_w{bits}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_vs_bits(rows: list[dict], out: str) -> str:
    plt = _pyplot()

    metric = next(iter(rows[0]["fp"]), None) or next(iter(rows[0]["quantized"]))
    panels = [metric] + (["fp_agreement"] if any("fp_agreement" in r["quantized"] for r in rows) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    for ax, name in zip(axes[0], panels):
        for method, rs in by_method.items():
            rs = sorted((r for r in rs if name in r["quantized"]), key=lambda r: r["w_bits"])
            if rs:
                ax.plot([r["w_bits"] for r in rs], [r["quantized"][name] for r in rs], "o-",
                        color=COLORS.get(method), label=method)
        if name in rows[0]["fp"]:
            ax.axhline(rows[0]["fp"][name], color="black", ls="--", lw=1, label="FP")
        if name == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("weight bits")
        ax.set_ylabel(name)
        ax.set_xticks(sorted({r["w_bits"] for r in rows}))
        ax.legend(fontsize=8)
    fig.suptitle(_model_name(rows[0]), fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "metric_vs_bits.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
