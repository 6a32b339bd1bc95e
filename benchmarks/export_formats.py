"""Reload a finished run's export formats with their ordinary loaders and evaluate them like the run.

For each ``<run dir>/export/<format>/`` the model is loaded the way a user
would load it (transformers; + gptqmodel for gptq / awq, + compressed-tensors,
transformers' GGUF loader), dropped into the run's own evaluation (same data
module, same windows, same perplexity code) and compared with the run's
``results.json``. A short greedy generation from each reloaded model is shown
beside the FP model's. Writes ``<run dir>/export_eval.json``.

    TORCHDYNAMO_DISABLE=1 python benchmarks/export_formats.py --run runs/x [--formats gptq gguf] [--prompt "..."]

(``TORCHDYNAMO_DISABLE=1``: gptqmodel's torch kernel otherwise recompiles per input shape on CPU.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def load_format(fmt: str, directory: str, dtype: torch.dtype = torch.float32):
    """``fmt``'s model the way a user loads it; gptq / awq through gptqmodel's pure-torch kernels in ``dtype``."""
    import transformers

    auto = transformers.AutoModelForCausalLM
    if fmt == "gguf":
        return auto.from_pretrained(directory, gguf_file="model.gguf", dtype=torch.float32)
    if fmt == "gptq":
        bits = json.load(open(os.path.join(directory, "config.json")))["quantization_config"]["bits"]
        return auto.from_pretrained(directory, device_map="cpu", dtype=dtype,
                                    quantization_config=transformers.GPTQConfig(bits=bits, backend="torch"))
    if fmt == "awq":
        return auto.from_pretrained(directory, device_map="cpu", dtype=dtype,
                                    quantization_config=transformers.AwqConfig(bits=4, backend="torch_awq"))
    if fmt == "compressed_tensors":
        return auto.from_pretrained(directory, quantization_config=transformers.CompressedTensorsConfig(
            run_compressed=False))
    return auto.from_pretrained(directory)


def generate(net, tokenizer, prompt: str, tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = net.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False, use_cache=True,
                           pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--formats", nargs="*", default=None, help="default: every directory under <run>/export")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--generate", nargs="*", default=["fp", "fake_quant", "gptq", "gguf"],
                        help="whose greedy text to show (fp: the run's FP model); --generate with no name: none")
    parser.add_argument("--windows", type=int, default=None,
                        help="evaluate only the first N eval windows (gptqmodel's CPU kernels are slow); the run's "
                             "own number then covers other windows, so compare with fake_quant on the same N")
    parser.add_argument("--gptq_dtype", default="float32", choices=["float32", "float16"],
                        help="compute dtype of the gptq / awq models (float16 matmuls are very slow on CPU)")
    args = parser.parse_args()

    from flexround_pl import pipeline
    from flexround_pl.cli import FlexRoundCLI

    run = os.path.abspath(args.run)
    windows = ["--data.init_args.num_eval_windows", str(args.windows)] if args.windows else []
    cli = FlexRoundCLI(args=["--config", os.path.join(run, "config.yaml"), *windows], run=False)
    model, datamodule = cli.model, cli.datamodule
    settings = pipeline.TrainerSettings(cli.config["trainer"].as_dict(), require_max_steps=False)
    pipeline.prepare(model, datamodule)
    tokenizer = model.source.load_tokenizer()
    results = json.load(open(os.path.join(run, "results.json")))
    formats = args.formats or sorted(os.listdir(os.path.join(run, "export")))

    fp_net = model.net
    fp = pipeline.evaluate(model, datamodule, settings, reference=True)
    out_path = os.path.join(run, f"export_eval_{args.windows}w.json" if args.windows else "export_eval.json")
    report = json.load(open(out_path)) if os.path.isfile(out_path) else {"formats": {}, "generation": {}}
    report.update(run=run, fp=fp, run_quantized=results["quantized"], windows=args.windows)
    report["generation"]["prompt"] = args.prompt
    if "fp" in args.generate:
        report["generation"]["fp"] = generate(fp_net, tokenizer, args.prompt, args.tokens)
    for fmt in formats:
        directory = os.path.join(run, "export", fmt)
        start = time.process_time()
        net = load_format(fmt, directory, getattr(torch, args.gptq_dtype)).eval()
        net.config.use_cache = False
        model.net = net
        wall = time.time()
        metrics = pipeline.evaluate(model, datamodule, settings)
        wall = time.time() - wall
        from flexround_pl.export.directory import directory_nbytes

        entry = {"metrics": metrics, "size_mb": directory_nbytes(directory) / 2**20,
                 "cpu_seconds_load_eval": time.process_time() - start, "eval_wall_s": wall}
        if not args.windows:  # the run's number is over all its windows
            entry["perplexity_minus_run"] = metrics["perplexity"] - results["quantized"]["perplexity"]
        if fmt in args.generate:
            entry["generation"] = generate(net, tokenizer, args.prompt, args.tokens)
        if fmt in ("gptq", "awq"):
            entry["dtype"] = args.gptq_dtype
        report["formats"][fmt] = entry
        print(f"{fmt}: {json.dumps(entry)}", flush=True)
        with open(out_path, "w") as f:  # after every format: a long run keeps what it measured
            json.dump(report, f, indent=2)
        del net
        model.net = fp_net
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
