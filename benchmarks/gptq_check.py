"""Reload a run's gptq (and awq) export with transformers + gptqmodel: dequantized weights vs fake_quant, greedy generation.

    TORCHDYNAMO_DISABLE=1 python benchmarks/gptq_check.py <run dir> gptq [awq]   (writes <run dir>/gptq_check.json)
"""
import json, sys, time, torch, transformers
run, fmts = sys.argv[1], sys.argv[2:]
tok = transformers.AutoTokenizer.from_pretrained(f"{run}/export/fake_quant")
fake = transformers.AutoModelForCausalLM.from_pretrained(f"{run}/export/fake_quant").eval()
ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
out = {}
for fmt in fmts:
    t = time.process_time()
    qc = transformers.GPTQConfig(bits=4, backend="torch") if fmt == "gptq" else transformers.AwqConfig(bits=4, backend="torch_awq")
    m = transformers.AutoModelForCausalLM.from_pretrained(f"{run}/export/{fmt}", device_map="cpu", dtype=torch.float32, quantization_config=qc).eval()
    worst, n, equal16 = 0.0, 0, 0
    for name, mod in m.named_modules():
        if hasattr(mod, "dequantize_weight") and name.startswith("model.layers"):
            w = mod.dequantize_weight().float().t()
            ref = fake.get_submodule(name).weight.float()
            worst = max(worst, float((w - ref).abs().max())); n += 1
            equal16 += int(torch.equal(w.half(), ref.half()))
    with torch.no_grad():
        g = m.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    out[fmt] = {"layers": n, "layers_equal_after_fp16_rounding": equal16, "max_abs_weight_diff": worst,
                "generation": tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True), "cpu_s": time.process_time() - t}
    print(fmt, json.dumps(out[fmt]), flush=True)
json.dump(out, open(f"{run}/gptq_check.json", "w"), indent=2)
