"""Data-to-text (WebNLG layout) and BLEU: parsing, batches, BLEU by hand, and fit end to end on tiny GPT-2."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from flexround_pl.data.webnlg import DataToTextData, Entry, linearize, read_webnlg
from flexround_pl.evaluate.generation import GenerationMetrics, GenerationSettings

from conftest import new_tiny_tokenizer as tiny_tokenizer  # noqa: E402

#: five entries, words from the tiny tokenizer's vocabulary; (triples, references)
ENTRIES = [
    ([("river_north", "city", "old_king")], ["the river is north of the old city .", "a river of the north ."]),
    ([("queen", "music", "blue"), ("queen", "war", "small_city")], ["the queen was in a small city ."]),
    ([("mountain", "west", "city")], ["the mountain is west of the city .", "west of the city , a mountain ."]),
    ([("king", "science", "new")], ["the new king of science ."]),
    ([("alpha", "beta", "\"gamma delta\"")], ["alpha and beta , gamma delta ."]),
]


def write_xml(path, entries=ENTRIES) -> str:
    """The WebNLG challenge XML layout (``<lex>`` with plain text, one ignored Russian text)."""
    parts = ['<?xml version="1.0" ?>\n<benchmark>\n  <entries>']
    for i, (triples, texts) in enumerate(entries, 1):
        parts.append(f'    <entry category="Test" eid="Id{i}" size="{len(triples)}">')
        parts.append("      <originaltripleset><otriple>ignored | ignored | ignored</otriple></originaltripleset>")
        parts.append("      <modifiedtripleset>")
        parts += [f"        <mtriple>{s} | {p} | {o}</mtriple>" for s, p, o in triples]
        parts.append("      </modifiedtripleset>")
        parts += [f'      <lex comment="good" lid="Id{j}">{t}</lex>' for j, t in enumerate(texts, 1)]
        parts.append('      <lex comment="good" lid="IdR" lang="ru">не английский</lex>')
        parts.append("    </entry>")
    parts.append("  </entries>\n</benchmark>\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return str(path)


def write_json(path, entries=ENTRIES) -> str:
    """The WebNLG JSON layout (``{"entries": [{"1": {...}}]}``)."""
    records = [
        {str(i): {
            "category": "Test", "size": str(len(triples)), "xml_id": f"Id{i}",
            "modifiedtripleset": [{"subject": s, "property": p, "object": o} for s, p, o in triples],
            "lexicalisations": [{"comment": "good", "lex": t, "xml_id": f"Id{j}", "lang": ""}
                                for j, t in enumerate(texts, 1)],
        }}
        for i, (triples, texts) in enumerate(entries, 1)
    ]
    path.write_text(json.dumps({"entries": records}))
    return str(path)


def write_hub_rows(path, entries=ENTRIES) -> str:
    """JSON Lines of rows of the hub dataset ``web_nlg``."""
    rows = [
        {"category": "Test", "size": len(triples), "eid": f"Id{i}",
         "modified_triple_sets": {"mtriple_set": [[f"{s} | {p} | {o}" for s, p, o in triples]]},
         "lex": {"comment": ["good"] * len(texts), "lid": [f"Id{j}" for j in range(len(texts))], "text": texts,
                 "lang": [""] * len(texts)}}
        for i, (triples, texts) in enumerate(entries, 1)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


EXPECTED = [Entry(tuple(t), tuple(x)) for t, x in ENTRIES]


def test_the_three_webnlg_layouts_read_the_same_entries(tmp_path):
    assert read_webnlg(write_xml(tmp_path / "a.xml")) == EXPECTED  # the Russian text is dropped
    assert read_webnlg(write_json(tmp_path / "a.json")) == EXPECTED
    assert read_webnlg(write_hub_rows(tmp_path / "a.jsonl")) == EXPECTED
    for sub, part in (("1triples", ENTRIES[:2]), ("2triples", ENTRIES[2:])):  # the corpus's folder layout
        (tmp_path / "dir" / sub).mkdir(parents=True)
        write_xml(tmp_path / "dir" / sub / "Test.xml", part)
    assert read_webnlg(str(tmp_path / "dir")) == EXPECTED  # files in sorted path order

def test_linearize_reads_underscores_as_spaces_and_drops_quotes():
    assert linearize(EXPECTED[1].triples) == "queen : music : blue | queen : war : small city"
    assert linearize(EXPECTED[4].triples) == "alpha : beta : gamma delta"


@pytest.mark.parametrize("content, message", [
    ("<benchmark><entries><entry>", "is not valid XML"),
    ("<benchmark><entries></entries></benchmark>", "has no entry with both triples and texts"),
    ("<benchmark><entries><entry><modifiedtripleset><mtriple>a | b</mtriple></modifiedtripleset>"
     "<lex>x</lex></entry></entries></benchmark>", "is not 'subject | property | object'"),
])
def test_malformed_webnlg_files_are_named_in_the_error(tmp_path, content, message):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_webnlg(str(path))


def _data(tmp_path, **kw) -> DataToTextData:
    args = dict(source="files", train_file=write_xml(tmp_path / "train.xml"), eval_file=write_json(tmp_path / "e.json"),
                max_length=16, num_calibration=6, batch_size=4, eval_batch_size=2, max_new_tokens=6)
    args.update(kw)
    data = DataToTextData(**args)
    data.set_tokenizer(tiny_tokenizer())
    data.setup("fit")
    return data


def test_calibration_is_seeded_training_pairs_right_padded_and_eval_is_left_padded_prompts(tmp_path):
    data = _data(tmp_path)
    tok = tiny_tokenizer()
    pairs = data.calibration_pairs()
    assert len(pairs) == 6 and pairs == _data(tmp_path).calibration_pairs()  # seeded
    all_pairs = {(linearize(e.triples) + " =", t) for e in EXPECTED for t in e.texts}
    assert set(pairs) <= all_pairs
    batches = list(data.calibration_dataloader())
    assert [b["input_ids"].shape for b in batches] == [torch.Size([4, 16]), torch.Size([2, 16])]
    first = batches[0]
    ids = tok(f"{pairs[0][0]} {pairs[0][1]}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = min(len(ids), 16)
    assert first["input_ids"][0, :n].tolist() == ids[:n] and first["attention_mask"][0].sum() == n
    assert first["attention_mask"][0, :n].all()  # right padding

    evaluation = list(data.val_dataloader())
    assert sum(len(b["references"]) for b in evaluation) == 5
    b = evaluation[0]
    assert b["references"] == [list(EXPECTED[0].texts), list(EXPECTED[1].texts)]
    prompt = tok(linearize(EXPECTED[0].triples) + " =", add_special_tokens=False)["input_ids"]
    width = b["input_ids"].shape[1]
    assert b["input_ids"][0, width - len(prompt):].tolist() == prompt  # left padding: prompts end together
    assert b["attention_mask"][0].sum() == len(prompt) and b["attention_mask"][:, -1].all()


class _FixedGenerator(torch.nn.Module):
    """``generate`` returns each prompt followed by fixed token ids (what a model would have decoded)."""

    def __init__(self, continuation: list[int]) -> None:
        super().__init__()
        self.continuation = torch.tensor(continuation)

    def generate(self, input_ids, attention_mask, **kw):
        return torch.cat([input_ids, self.continuation.expand(len(input_ids), -1)], dim=1)


def test_bleu_of_a_fixed_pair_equals_the_hand_computation():
    tok = tiny_tokenizer()
    hypothesis = "the old king of the north was at war"
    reference = "the old king of the south was at war with the queen"
    metrics = GenerationMetrics(tok)
    prompt = torch.tensor([tok("river =", add_special_tokens=False)["input_ids"]])
    continuation = tok(hypothesis, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    metrics.update_generation(_FixedGenerator(continuation), {
        "input_ids": prompt, "attention_mask": torch.ones_like(prompt), "references": [[reference]],
    })
    assert metrics.predictions == [hypothesis]  # prompt cut, EOS dropped
    # Clipped n-gram precisions counted by hand: 8/9, 6/8, 4/7, 2/6; hypothesis 9 words, reference 12.
    brevity = math.exp(1 - 12 / 9)
    expected = 100 * brevity * (8 / 9 * 6 / 8 * 4 / 7 * 2 / 6) ** 0.25
    scores = metrics.compute()
    assert scores["bleu"] == pytest.approx(expected, rel=1e-5)  # 42.77
    # TER: 1 substitution (north -> south) + 3 insertions over 12 reference words
    assert scores["ter"] == pytest.approx(100 * 4 / 12, rel=1e-5)
    import sacrebleu  # the eval extra
    assert sacrebleu.corpus_bleu([hypothesis], [[reference]], smooth_method="none").score == pytest.approx(expected)


def test_generation_settings_are_validated():
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        GenerationSettings(num_beams=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        DataToTextData(source="files", train_file=__file__, eval_file=__file__, max_new_tokens=0)


def _greedy(model, prompt_ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by hand: argmax of the full forward at each step, no KV cache, no padding."""
    ids = list(prompt_ids)
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    return ids[len(prompt_ids):]


def varied_gpt2(directory=None):
    """A tiny random GPT-2 whose greedy outputs vary (untied head, wider init; the default init repeats a token)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_positions=64, n_embd=32, n_layer=2, n_head=2, vocab_size=48, bos_token_id=1, eos_token_id=1,
        initializer_range=0.2, tie_word_embeddings=False, use_cache=False,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    if directory is not None:
        model.save_pretrained(str(directory))
        tiny_tokenizer().save_pretrained(str(directory))
    return model


def test_fit_reports_the_bleu_of_greedy_generations_for_fp_and_quantized(tmp_path):
    """BLEU on a 5-example file; the FP number equals SacreBLEU on a hand-decoded greedy output."""
    from flexround_pl.cli import main

    import sacrebleu  # the eval extra
    tok, fp = tiny_tokenizer(), varied_gpt2(tmp_path / "gpt2")
    steps = 6
    hyps = [tok.decode(_greedy(fp, tok(linearize(e.triples) + " =", add_special_tokens=False)["input_ids"], steps,
                               tok.eos_token_id), skip_special_tokens=True).strip() for e in EXPECTED]
    # References: the FP model's own first words for three entries (BLEU strictly between 0 and 100)
    entries = [(t, [" ".join(h.split()[:4] + ["river", "city"])] + x if i < 3 else x)
               for i, ((t, x), h) in enumerate(zip(ENTRIES, hyps))]
    refs = [r for _, r in entries]
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(3)]
    expected = sacrebleu.corpus_bleu(hyps, streams, smooth_method="none").score
    assert 0 < expected < 100

    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 5, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"), "logger": False},
        "model": {
            "source": {"class_path": "flexround_pl.models.HFModel",
                       "init_args": {"name_or_path": str(tmp_path / "gpt2"), "task": "causal-lm"}},
            "quant": {"method": "flexround", "weight": {"bits": 3, "granularity": "channel"}},
            "reconstruction": {"lr": 0.003, "batch_size": 2, "eval_batch_size": 4, "evaluations": 1},
        },
        "data": {"class_path": "flexround_pl.data.webnlg.DataToTextData", "init_args": {
            "source": "files", "train_file": write_xml(tmp_path / "train.xml"),
            "eval_file": write_json(tmp_path / "eval.json", entries), "max_length": 24, "num_calibration": 8,
            "batch_size": 4, "eval_batch_size": 2, "max_new_tokens": steps}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "c.yaml")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["calibration_samples"] == 7  # every (triples, text) pair of the training file
    assert results["fp"]["bleu"] == pytest.approx(expected, rel=1e-6)  # batched, left-padded, KV cache
    assert 0 <= results["quantized"]["bleu"] <= 100 and 0 <= results["quantized"]["ter"]
    assert 0 < results["quantized"]["fp_agreement"] <= 1


def test_data_to_text_refuses_a_classifier_up_front(tmp_path, tiny_bert_dir, refused):
    from flexround_pl.cli import main

    config = {
        "trainer": {"accelerator": "cpu", "max_steps": 2, "default_root_dir": str(tmp_path / "run"), "logger": False},
        "model": {"source": {"class_path": "flexround_pl.models.HFModel", "init_args": {"name_or_path": tiny_bert_dir}}},
        "data": {"class_path": "flexround_pl.data.webnlg.DataToTextData", "init_args": {
            "source": "files", "train_file": write_xml(tmp_path / "t.xml"), "eval_file": write_xml(tmp_path / "e.xml")}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "c.yaml")]) == 2
    refused("flexround_pl: error: data-to-text generates text with a causal language model")
    assert not (tmp_path / "run").exists()


def test_the_hub_source_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = DataToTextData(source="hub", hub_name="webnlg-challenge/web_nlg")
    with pytest.raises(ValueError, match=r"could not load webnlg-challenge/web_nlg .* use source: files"):
        data.setup("fit")


@pytest.mark.parametrize("family, num_beams", [("gpt2", 1), ("gpt2", 3), ("llama", 1), ("llama", 3)])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tmp_path, family, num_beams):
    """Left padding must not change what is generated (position ids follow the mask), greedy and beam."""
    from test_causal_lm import tiny_causal_lm

    model = varied_gpt2() if family == "gpt2" else tiny_causal_lm("llama")
    data = _data(tmp_path, eval_batch_size=5, num_beams=num_beams, max_new_tokens=5)
    metrics = data.metrics()
    (batch,) = list(data.val_dataloader())
    batched = metrics.generate(model, batch["input_ids"], batch["attention_mask"])
    single = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = ids[mask.bool()][None]
        single += metrics.generate(model, ids, torch.ones_like(ids))
    assert batched == single and any(batched)


def test_llama_with_per_token_8bit_activations_fits_and_validate_reproduces_its_bleu(tmp_path):
    """Generation through quantized activations and the KV cache; the saved checkpoint generates the same."""
    from flexround_pl.cli import FlexRoundCLI, main
    from conftest import new_tiny_tokenizer
    from test_causal_lm import _save_tiny

    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"), "logger": False},
        "model": {
            "source": {"class_path": "flexround_pl.models.HFModel",
                       "init_args": {"name_or_path": _save_tiny("llama", tmp_path, new_tiny_tokenizer()), "task": "causal-lm"}},
            "quant": {"weight": {"bits": 4, "granularity": "channel"},
                      "activation": {"bits": 8, "granularity": "token"}},
            "reconstruction": {"batch_size": 2, "eval_batch_size": 4, "evaluations": 1},
        },
        "data": {"class_path": "flexround_pl.data.webnlg.DataToTextData", "init_args": {
            "source": "files", "train_file": write_xml(tmp_path / "train.xml"),
            "eval_file": write_hub_rows(tmp_path / "eval.jsonl"), "max_length": 24, "num_calibration": 6,
            "batch_size": 3, "eval_batch_size": 2, "max_new_tokens": 5, "num_beams": 2}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "c.yaml")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["quantized"]) == {"bleu", "ter", "fp_agreement"}
    val = FlexRoundCLI(args=["validate", "--config", str(tmp_path / "run" / "config.yaml")])
    assert val.results["quantized"] == results["quantized"]
