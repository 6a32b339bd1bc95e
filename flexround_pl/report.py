"""What ``fit`` shows at the end: FP vs quantized, the round-to-nearest start, and (LMs) generations.

:func:`summary` turns a run's results into two small tables:

* the task metrics of the FP model, of round-to-nearest on the same grid and
  of the quantized model (with
  ``fp_agreement`` / ``fp_kl``: how close the quantized model stays to FP);
* per block, the reconstruction loss at initialization and at the end. At
  initialization every learned method (FlexRound with its division factors at
  1, AdaRound with its rounding at nearest) *is* round-to-nearest on the same
  grid, so the first column is RTN's loss on that block. It is not a
  standalone RTN model's loss: from the second block on, the block's inputs
  come from the earlier blocks as this run quantized them. The RTN model
  itself is the first table's ``rtn`` row (``model.evaluate_rtn``, on by
  default: one more evaluation of an RTN copy of the FP network).

:func:`greedy_samples` continues a few fixed prompts greedily, so a causal
LM's FP and quantized text can be read side by side (console and
``results.json["generations"]``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

#: Prompts for the side-by-side generations: plain encyclopedic openings (the demo data's register).
PROMPTS = (
    "The capital of France is",
    "Photosynthesis is the process by which",
    "The Second World War began in",
)
MAX_NEW_TOKENS = 24


def _cell(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4g}"


def metrics_table(fp: dict[str, float], quantized: dict[str, float], label: str,
                  rtn: Optional[dict[str, float]] = None, rtn_label: str = "RTN") -> list[str]:
    """FP, (the RTN baseline,) the quantized model: one row each, one column per metric."""
    names = list(dict.fromkeys([*fp, *(rtn or {}), *quantized]))
    rows = [["model", *names], ["FP", *(_cell(fp.get(n)) for n in names)]]
    if rtn is not None:
        rows.append([rtn_label, *(_cell(rtn.get(n)) for n in names)])
    rows.append([label, *(_cell(quantized.get(n)) for n in names)])
    return _markdown(rows)


#: Methods whose hard-rounded block at initialization is round-to-nearest on the run's grid.
RTN_AT_START = ("flexround", "adaround")


def block_table(blocks: Sequence[dict[str, Any]], method: str) -> list[str]:
    if any(b.get("loss_start") is None for b in blocks):  # reconstruction.validate_initial false
        rows = [["block", f"{method} loss (end)"]] + [[b["name"], f"{b['loss_end']:.4g}"] for b in blocks]
        rows.append(["sum", f"{sum(b['loss_end'] for b in blocks):.4g}"])
        return _markdown(rows)
    start = "RTN" if method in RTN_AT_START else "start"
    rows = [["block", f"{start} loss (start)", f"{method} loss (end)", f"{start} / end"]]
    for b in blocks:
        ratio = b["loss_start"] / b["loss_end"] if b["loss_end"] > 0 else float("inf")
        rows.append([b["name"], f"{b['loss_start']:.4g}", f"{b['loss_end']:.4g}", f"{ratio:.2f}x"])
    first, end = sum(b["loss_start"] for b in blocks), sum(b["loss_end"] for b in blocks)
    rows.append(["sum", f"{first:.4g}", f"{end:.4g}", f"{first / end:.2f}x" if end > 0 else "—"])
    return _markdown(rows)


def summary(results: dict[str, Any]) -> str:
    """The end-of-``fit`` report (markdown tables; see the module docstring for what RTN means here)."""
    method, bits = results["method"], results["w_bits"]
    a = f"A{results['a_bits']}" if results.get("a_bits") is not None else ""
    grid = f"W{bits}{a} {results['granularity']}"
    label = f"{method} {grid}"
    lines = ["", f"== summary: {results['model']} =="] + metrics_table(
        results["fp"], results["quantized"], label, results.get("rtn"), f"rtn {grid} (same grid)")
    blocks = results.get("blocks") or []
    if method != "rtn" and blocks and any(b.get("steps") for b in blocks):
        note = ("block reconstruction loss (MSE to the FP block's output on the calibration set), before and "
                "after training.")
        if method in RTN_AT_START:
            note += (f" Before training {method} is round-to-nearest on the same grid, so 'start' is RTN's loss on "
                     "that block, its inputs coming from the earlier blocks as quantized here.")
            if results.get("rtn") is None:
                note += " The RTN model itself was not evaluated (python -m flexround_pl compare --methods rtn ... runs it)."
        lines += ["", note] + block_table(blocks, method)
    for sample in results.get("generations") or []:
        lines += ["", f"prompt:    {sample['prompt']!r}", f"FP:        {sample['fp']!r}",
                  f"quantized: {sample['quantized']!r}"]
    return "\n".join(lines)


def _markdown(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return [fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows[1:])]


def can_generate(net: nn.Module) -> bool:
    """A causal LM that ``transformers`` can ``generate`` with (not an encoder or a CNN)."""
    check = getattr(net, "can_generate", None)
    return bool(check()) if callable(check) else False


@torch.no_grad()
def greedy_samples(net: nn.Module, tokenizer: Any, device: torch.device, prompts: Sequence[str] = PROMPTS,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy continuations (new text only) of each prompt; deterministic, so FP and quantized compare."""
    was_training = net.training
    net.eval()
    texts = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        if ids["input_ids"].shape[1] == 0:  # nothing of the prompt is in the vocabulary (tiny test tokenizers)
            texts.append("")
            continue
        out = net.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad)
        texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    net.train(was_training)
    return texts


def pair_samples(fp: Sequence[str], quantized: Sequence[str], prompts: Sequence[str] = PROMPTS) -> list[dict[str, str]]:
    return [{"prompt": p, "fp": f, "quantized": q} for p, f, q in zip(prompts, fp, quantized)]
