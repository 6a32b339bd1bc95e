"""``python -m flexround_pl compare`` on a tiny BERT: table, JSON, PNGs; finished runs are reused."""

from __future__ import annotations

import json
import os

from flexround_pl.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_compare_writes_table_json_and_plots_and_reuses_finished_runs(tmp_path, tiny_bert_dir, capsys, write_config):
    cfg = write_config(tmp_path, tiny_bert_dir)
    out = tmp_path / "cmp"
    args = ["compare", "--config", cfg, "--methods", "rtn", "flexround", "--bits", "4", "3", "--out", str(out),
            "--", "--trainer.max_steps", "4", "--export", "false"]
    assert main(args) == 0

    summary = json.loads((out / "compare.json").read_text())
    assert summary["overrides"] == ["--trainer.max_steps", "4", "--export", "false"]
    assert [(r["method"], r["w_bits"]) for r in summary["rows"]] == [("rtn", 4), ("flexround", 4), ("rtn", 3),
                                                                    ("flexround", 3)]
    for row in summary["rows"]:  # each row is its run's own results.json
        results = json.loads((out / f"{row['method']}_w{row['w_bits']}" / "results.json").read_text())
        assert row["quantized"] == results["quantized"] and row["blocks"] == results["blocks"]
        assert results["max_steps"] == 4
    table = (out / "compare.md").read_text().splitlines()
    assert table[0].startswith("| method | W | A | granularity | steps/block | lr | FP accuracy | accuracy |")
    flex3 = summary["rows"][3]
    assert table[5].startswith(f"| flexround | 3 | 16 | tensor | 4 | 0.003 | {flex3['fp']['accuracy']:.4f} | "
                               f"{flex3['quantized']['accuracy']:.4f} | {flex3['quantized']['fp_agreement']:.4f} |")
    for png in ("metric_vs_bits.png", "loss_curves_w4.png", "loss_curves_w3.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png

    stamps = {p: os.stat(out / p / "results.json").st_mtime_ns for p in ("rtn_w4", "flexround_w3")}
    capsys.readouterr()
    assert main(args) == 0  # everything finished: nothing runs again
    printed = capsys.readouterr().out
    assert printed.count("finished before, reused") == 4 and "$ python -m flexround_pl fit" not in printed
    assert stamps == {p: os.stat(out / p / "results.json").st_mtime_ns for p in stamps}


def test_compare_refuses_bad_methods_and_runs_made_with_other_settings(tmp_path, tiny_bert_dir, capsys, write_config):
    cfg = write_config(tmp_path, tiny_bert_dir)
    out = tmp_path / "cmp"
    assert main(["compare", "--config", cfg, "--methods", "rtn", "magic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flexround_pl: error: ") and "'magic'" in err[0]
    assert not out.exists()  # checked before any run

    base = ["compare", "--config", cfg, "--methods", "rtn", "--bits", "4", "--out", str(out), "--"]
    assert main(base + ["--trainer.max_steps", "2", "--export", "false"]) == 0
    capsys.readouterr()
    assert main(base + ["--trainer.max_steps", "3", "--export", "false"]) == 2
    err = capsys.readouterr().err
    assert "holds a run made with other settings" in err and "--trainer.max_steps 2" in err
    assert main(["compare", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.yaml' does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["compare", "--config", cfg, "--bits", "x"]) == 2
    assert capsys.readouterr().err.startswith("flexround_pl: error: argument --bits: invalid int value: 'x'")
