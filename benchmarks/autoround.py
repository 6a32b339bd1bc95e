"""Peer comparison (issue 7): Intel AutoRound on SmolLM2-135M, same data and evaluation as FlexRound.

Runs AutoRound (SignRound: signed-gradient descent on a rounding offset ``V``
plus min / max clipping scales, block by block) on the offline SmolLM2-135M
model of ``configs/smollm2_wiki.yaml`` with

* the **same calibration token windows** as our run: the ``[num_calibration,
  seq_length]`` token ids of :class:`flexround_pl.data.language_modeling.LanguageModelingData`
  (``wiki_summaries``, seed 0, split seed 0), handed to AutoRound as a list of
  pre-tokenized samples (no text, no re-tokenization, no AutoRound dataset);
* the same number of samples, iterations per block and samples per step;
* the **same evaluation**: our evaluation windows scored by
  :class:`flexround_pl.evaluate.metrics.PerplexityMetrics`, float32, so the
  perplexity is directly comparable to ``results.json["quantized"]["perplexity"]`` of

      python -m flexround_pl fit --config configs/smollm2_wiki.yaml \\
          --data.init_args.seq_length T --data.init_args.num_calibration N \\
          --data.init_args.num_eval_windows E --trainer.max_steps ITERS \\
          --model.reconstruction.batch_size B \\
          --model.quant.weight.granularity group --model.quant.weight.group_size G

  (for ``--group_size -1``, per output channel, leave out the two ``granularity`` /
  ``group_size`` overrides: per-channel is the config's own granularity).

AutoRound's data path, for the record: each window is one item
``{"input_ids": [1, T], "attention_mask": ones}``; AutoRound zeroes the last
column of that mask (a workaround so the mask is never all ones) and leaves the
last position out of its block-output MSE, so it fits on ``T - 1`` positions
per window while our reconstruction uses all ``T``; every step draws
``batch_size`` windows from a reshuffled cycle over the ``N`` windows.

It writes a JSON (FP and quantized perplexity, quantization wall / CPU
seconds, peak RSS, the settings AutoRound actually resolved) and prints a
one-row markdown table.

Install (a separate venv that reuses the system torch / transformers; auto-round
is installed without its dependencies so it cannot replace them; every module
it imports -- accelerate, datasets, numpy, py-cpuinfo, pydantic, requests,
tqdm, transformers, torch -- is already in the main environment)::

    python -m venv --system-site-packages /tmp/arvenv
    /tmp/arvenv/bin/pip install --no-deps auto-round==0.16.1
    /tmp/arvenv/bin/python -c "import auto_round; print(auto_round.__version__)"

Run (from the repository root)::

    PYTHONPATH=$PWD /tmp/arvenv/bin/python benchmarks/autoround.py --bits 4 --group_size 64 \\
        --iters 50 --num_calibration 32 --seq_length 256 --batch_size 4 --num_eval_windows 32 \\
        --out benchmarks/results/smollm2/autoround_w4.json

AutoRound settings (``auto_round.AutoRound`` with a ``SignRoundConfig``, the usage 0.16.1 recommends;
passing ``bits=`` / ``iters=`` ... directly to ``AutoRound`` resolves to the same config, with warnings)::

    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    ar = AutoRound(model, tokenizer=tokenizer,
                   alg_configs=SignRoundConfig(iters=ITERS, lr=None, bits=B, group_size=G, sym=False),
                   nsamples=N, seqlen=T, batch_size=BS,
                   dataset=[{"input_ids": ids[i:i+1], "attention_mask": ones}, ...],   # our N windows
                   device_map="cpu", amp=False, enable_torch_compile=False, low_cpu_mem_usage=False, seed=SEED)
    model, layer_config = ar.quantize()   # fake-quantizes the model in place (qdq weights); no export

Overridden AutoRound defaults: ``sym`` (default True: W4A16 is symmetric; we
use asymmetric like our config), ``group_size`` (default 128, which does not
divide SmolLM2's input size 576: AutoRound would zero-pad the last group of
each row to 128), ``iters`` (200), ``nsamples`` (128), ``seqlen`` (2048),
``batch_size`` (8), ``dataset`` (``NeelNanda/pile-10k`` from the hub),
``device_map`` (0 = first accelerator), ``amp`` (True: on CPU the model is cast
to bfloat16 for tuning; here float32, as our ``precision: 32-true``; ``--amp``
restores it), ``enable_torch_compile`` (True on Linux; ``--torch_compile``
restores it), ``low_cpu_mem_usage`` (True; irrelevant for a dense model on
CPU), ``seed`` (42). Kept defaults: ``lr = 1/iters`` unless ``--lr``,
``minmax_lr = lr``, linear lr decay to 0, ``enable_minmax_tuning``,
``enable_quanted_input`` (each block sees the quantized previous blocks),
best-loss parameters restored, ``nblocks=1``, fp16 scales, lm_head and
embeddings not quantized (the same layers our run keeps in FP).

Exit status 2 with one ``error:`` line for bad input (e.g. a group size that
does not divide every layer's input size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
from typing import Any, Optional

import torch


def _die(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4, help="weight bits (2..8; default 4)")
    p.add_argument("--group_size", type=int, default=64,
                   help="input elements per scale: a divisor of every layer's input size (SmolLM2: 576 and 1536, "
                        "so a divisor of 192), -1 per output channel, 0 per tensor (default 64)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric, like our config)")
    p.add_argument("--iters", type=int, default=100, help="tuning iterations per block (our trainer.max_steps)")
    p.add_argument("--lr", type=float, default=None, help="SignRound lr (default: AutoRound's 1/iters)")
    p.add_argument("--num_calibration", type=int, default=128, help="calibration windows = AutoRound nsamples")
    p.add_argument("--seq_length", type=int, default=512, help="tokens per window = AutoRound seqlen")
    p.add_argument("--batch_size", type=int, default=4,
                   help="windows per tuning step (our model.reconstruction.batch_size; AutoRound batch_size)")
    p.add_argument("--num_eval_windows", type=int, default=32, help="evaluation windows (0: all)")
    p.add_argument("--eval_batch_size", type=int, default=2, help="evaluation windows per forward")
    p.add_argument("--data_seed", type=int, default=0, help="calibration window offsets (our data.init_args.seed)")
    p.add_argument("--split_seed", type=int, default=0, help="wiki_summaries article split (our split_seed)")
    p.add_argument("--seed", type=int, default=0, help="AutoRound's seed (its sample order per step)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--amp", action="store_true", help="AutoRound's CPU default: tune in bfloat16 (default: float32)")
    p.add_argument("--torch_compile", action="store_true", help="AutoRound's default torch.compile (default: off)")
    p.add_argument("--skip_fp", action="store_true", help="do not evaluate the FP model")
    p.add_argument("--out", default="benchmarks/results/smollm2/autoround.json", help="JSON output path")
    a = p.parse_args(argv)
    if not 2 <= a.bits <= 8:
        _die(f"--bits must be from 2 to 8, got {a.bits}")
    if a.group_size < -1:
        _die(f"--group_size must be -1 (per channel), 0 (per tensor) or positive, got {a.group_size}")
    for name in ("iters", "num_calibration", "batch_size", "eval_batch_size"):
        if getattr(a, name) < 1:
            _die(f"--{name} must be >= 1, got {getattr(a, name)}")
    if a.seq_length < 2:
        _die(f"--seq_length must be >= 2, got {a.seq_length}")
    if a.num_eval_windows < 0:
        _die(f"--num_eval_windows must be >= 0 (0: all), got {a.num_eval_windows}")
    if a.lr is not None and not a.lr > 0:
        _die(f"--lr must be > 0, got {a.lr}")
    if a.threads is not None and a.threads < 1:
        _die(f"--threads must be >= 1, got {a.threads}")
    return a


# ----------------------------------------------------------------------------- model and data (ours)


def load_model() -> torch.nn.Module:
    """The FP SmolLM2-135M exactly as our pipeline prepares it (fp32, eval, no KV cache)."""
    from flexround_pl.models.adapter import find_architecture
    from flexround_pl.models.gguf import SmolLM2

    net = SmolLM2().load()
    arch = find_architecture(net)
    if arch.prepare is not None:
        net = arch.prepare(net)
    return net.eval()


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The Linear layers inside the decoder blocks (what both tools quantize)."""
    return {
        f"model.layers.{i}.{n}": m
        for i, layer in enumerate(model.model.layers)
        for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def check_group_size(model: torch.nn.Module, group_size: int) -> None:
    sizes = sorted({m.in_features for m in block_linears(model).values()})
    if group_size <= 0:
        return
    bad = [s for s in sizes if s % group_size]
    if bad:
        g = math.gcd(*sizes)
        ok = [d for d in range(1, g + 1) if g % d == 0]
        _die(
            f"--group_size {group_size} does not divide the layer input sizes {bad} (all: {sizes}); our FlexRound "
            f"group granularity needs a divisor (AutoRound would zero-pad the last group). Use one of {ok}, "
            "-1 (per channel) or 0 (per tensor)"
        )


def make_data(args: argparse.Namespace, tokenizer: Any):
    from flexround_pl.data.language_modeling import LanguageModelingData

    dm = LanguageModelingData(
        source="wiki_summaries",
        seq_length=args.seq_length,
        num_calibration=args.num_calibration,
        num_eval_windows=args.num_eval_windows or None,
        eval_batch_size=args.eval_batch_size,
        seed=args.data_seed,
        split_seed=args.split_seed,
    )
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm


@torch.no_grad()
def perplexity(model: torch.nn.Module, dm) -> float:
    """Our evaluation: ``model(**batch).logits`` into :class:`PerplexityMetrics`, as ``PTQModel`` does."""
    metrics = dm.metrics()
    model.eval()
    for batch in dm.val_dataloader():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        metrics.update(logits.float(), batch)
    return metrics.compute()["perplexity"]


# ----------------------------------------------------------------------------- checks


@torch.no_grad()
def check_quantized(model: torch.nn.Module, fp_state: dict[str, torch.Tensor], bits: int, group_size: int) -> dict:
    """Every block Linear changed and has at most 2**bits distinct values per quantization group."""
    layers = block_linears(model)
    worst, unchanged, too_many, changed_frac = 0, [], [], []
    grid_err: Optional[float] = None  # stays None if AutoRound left no per-layer scale / zp to check against
    code_range = [None, None]
    for name, m in layers.items():
        w = m.weight.detach().float()
        fp = fp_state[f"{name}.weight"].float()
        if torch.equal(w, fp):
            unchanged.append(name)
        changed_frac.append((w != fp).float().mean().item())
        out_f, in_f = w.shape
        g = in_f if group_size == -1 else (w.numel() if group_size == 0 else group_size)
        groups = w.reshape(-1, g)
        s = groups.sort(dim=1).values
        n_unique = (s[:, 1:] != s[:, :-1]).sum(dim=1) + 1
        worst = max(worst, int(n_unique.max()))
        if int(n_unique.max()) > 2**bits:
            too_many.append(name)
        scale, zp = getattr(m, "scale", None), getattr(m, "zp", None)  # set by AutoRound's unwrapper
        if isinstance(scale, torch.Tensor) and isinstance(zp, torch.Tensor) and group_size != 0:
            codes = groups / scale.float().reshape(-1, 1) + zp.float().reshape(-1, 1)
            grid_err = max(grid_err or 0.0, float((codes - codes.round()).abs().max()))
            lo, hi = int(codes.round().min()), int(codes.round().max())
            code_range = [lo if code_range[0] is None else min(lo, code_range[0]),
                          hi if code_range[1] is None else max(hi, code_range[1])]
    return {
        "layers": len(layers),
        "unchanged_layers": unchanged,
        "layers_over_2^bits_values": too_many,
        "max_unique_values_per_group": worst,
        "mean_fraction_of_weights_changed": sum(changed_frac) / max(len(changed_frac), 1),
        "max_distance_from_integer_grid": grid_err,  # |W / scale + zp - round(.)| with AutoRound's scale, zp
        "integer_code_range": code_range,  # expected within [0, 2**bits - 1] (asymmetric)
    }


# ----------------------------------------------------------------------------- main


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def table(r: dict) -> str:
    head = ["tool", "W", "group", "sym", "iters", "samples x tokens", "batch", "lr", "FP ppl", "quantized ppl",
            "quantize wall (s)", "quantize CPU (s)", "peak RSS (MB)"]
    fp = r["fp"].get("perplexity")
    cells = [
        f"{r['tool']} {r['tool_version']}", str(r["bits"]), "channel" if r["group_size"] == -1 else str(r["group_size"]),
        "sym" if r["sym"] else "asym", str(r["iters"]), f"{r['nsamples']} x {r['seq_length']}", str(r["batch_size"]),
        f"{r['lr']:.3g}", "-" if fp is None else f"{fp:.4f}", f"{r['quantized']['perplexity']:.4f}",
        f"{r['quantize_wall_seconds']:.0f}", f"{r['quantize_cpu_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}",
    ]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |"])


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.bits == 8 and not args.sym:
        # auto-round refuses W8 asymmetric because its default *export* format cannot serve it; nothing is
        # exported here (the fake-quantized weights are evaluated in memory), so skip that export-only check.
        os.environ.setdefault("AR_ALLOW_W8_ASYM", "1")
    try:
        import auto_round
        from auto_round import AutoRound
        from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    except ImportError as e:
        _die(f"auto-round is not importable ({e}); install it as in this script's docstring")
    try:
        import flexround_pl  # noqa: F401
    except ImportError as e:
        _die(f"flexround_pl is not importable ({e}); run from the repository root with PYTHONPATH=$PWD")

    start_all = time.perf_counter()
    from flexround_pl.models.gguf import SmolLM2

    try:
        tokenizer = SmolLM2().load_tokenizer()
        model = load_model()
    except ValueError as e:
        _die(str(e))
    check_group_size(model, args.group_size)
    try:
        dm = make_data(args, tokenizer)
    except ValueError as e:
        _die(str(e))
    windows = dm.windows()
    cal, ev = windows["calibration"], windows["eval"]
    print(f"[autoround] calibration {tuple(cal.shape)}, eval {tuple(ev.shape)} token windows", flush=True)

    result: dict[str, Any] = {"fp": {}}
    if not args.skip_fp:
        t = time.perf_counter()
        result["fp"] = {"perplexity": perplexity(model, dm)}
        result["fp_eval_seconds"] = time.perf_counter() - t
        print(f"[autoround] FP perplexity {result['fp']['perplexity']:.4f}", flush=True)
    fp_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # Our exact calibration windows, one pre-tokenized sample each (mask all ones, as our cache uses; AutoRound
    # zeroes its last column in place, hence fresh tensors). One row per item: AutoRound guesses the batch
    # dimension from the first item (batch dim 1 if its size exceeds batch_size), so batches must not be bigger.
    dataset = [{"input_ids": row[None].clone(), "attention_mask": torch.ones_like(row[None])} for row in cal]

    kwargs: dict[str, Any] = dict(
        tokenizer=tokenizer,
        nsamples=args.num_calibration,
        seqlen=args.seq_length,
        batch_size=args.batch_size,
        dataset=dataset,
        device_map="cpu",
        amp=args.amp,
        enable_torch_compile=args.torch_compile,
        low_cpu_mem_usage=False,
        seed=args.seed,
    )

    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        # lr=None: AutoRound's default 1/iters (minmax_lr follows lr).
        alg = SignRoundConfig(iters=args.iters, lr=args.lr, bits=args.bits, group_size=args.group_size, sym=args.sym)
        ar = AutoRound(model, alg_configs=alg, **kwargs)
    except (ValueError, NotImplementedError, TypeError) as e:
        _die(f"AutoRound rejected the settings: {e}")
    qmodel, layer_config = ar.quantize()
    quant_wall, quant_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(f"[autoround] quantized in {quant_wall:.1f} s wall, {quant_cpu:.1f} s CPU", flush=True)

    qc = ar.quantize_config
    resolved = {k: getattr(qc, k, None) for k in ("bits", "group_size", "sym", "data_type", "iters", "lr",
                                                  "minmax_lr", "enable_minmax_tuning", "enable_quanted_input",
                                                  "not_use_best_mse", "nblocks", "gradient_accumulate_steps")}
    cal_ctx, model_ctx, comp_ctx = (getattr(ar, n, None) for n in ("calibration_context", "model_context",
                                                                    "compress_context"))
    resolved.update(nsamples=getattr(cal_ctx, "nsamples", None), seqlen=getattr(cal_ctx, "seqlen", None),
                    batch_size=getattr(cal_ctx, "batch_size", None), amp=getattr(model_ctx, "amp", None),
                    amp_dtype=str(getattr(model_ctx, "amp_dtype", None)),
                    enable_torch_compile=getattr(comp_ctx, "enable_torch_compile", None))
    resolved = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in resolved.items()}
    want = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym}
    as_asked = [n for n, c in (layer_config or {}).items() if all(c.get(k) == v for k, v in want.items())]
    resolved["layers_with_requested_scheme"] = len(as_asked)
    peak_quant = peak_rss_mb()

    qmodel = qmodel.float()  # float32 already unless --amp (bf16 tuning): evaluate in float32 like ours
    checks = check_quantized(qmodel, fp_state, args.bits, args.group_size)
    if checks["unchanged_layers"] or checks["layers_over_2^bits_values"]:
        print(f"[autoround] quantization check failed: {json.dumps(checks)}", file=sys.stderr)
        sys.exit(1)

    # Evaluate the quantized weights in a freshly loaded model (no AutoRound wrappers or hooks left).
    q_state = {k: v.detach().float() for k, v in qmodel.state_dict().items()}
    del ar, qmodel, model
    fresh = load_model()
    missing, unexpected = fresh.load_state_dict(q_state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        _die(f"quantized state does not fit the model: missing {missing}, unexpected {unexpected}", 1)
    t = time.perf_counter()
    result["quantized"] = {"perplexity": perplexity(fresh, dm)}
    q_eval = time.perf_counter() - t
    print(f"[autoround] quantized perplexity {result['quantized']['perplexity']:.4f}", flush=True)

    result = {
        "tool": "auto-round",
        "tool_version": getattr(auto_round, "__version__", "unknown"),
        "model": SmolLM2().describe(),
        "bits": args.bits,
        "group_size": args.group_size,
        "sym": args.sym,
        "iters": args.iters,
        "nsamples": args.num_calibration,
        "seq_length": args.seq_length,
        "batch_size": args.batch_size,
        "lr": resolved["lr"],
        "num_eval_windows": int(ev.shape[0]),
        "data": {"source": "wiki_summaries", "seed": args.data_seed, "split_seed": args.split_seed,
                 "calibration_tokens_equal_pad_id": int((cal == tokenizer.pad_token_id).sum())
                 if tokenizer.pad_token_id is not None else 0},
        **result,
        "quantize_wall_seconds": quant_wall,
        "quantize_cpu_seconds": quant_cpu,
        "quantized_eval_seconds": q_eval,
        "total_wall_seconds": time.perf_counter() - start_all,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_after_quantize": peak_quant,
        "threads": torch.get_num_threads(),
        "autoround_resolved": resolved,
        "quantization_check": checks,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(table(result))
    print(f"[autoround] wrote {args.out}")


if __name__ == "__main__":
    main()
