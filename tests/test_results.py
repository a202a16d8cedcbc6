"""The results layer on records the tests write: record contract, leaderboard, Pareto, paper tables, report, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg

import results
from results import __main__ as cli
from results import papers, pareto, report
from results.leaderboard import label
from results.record import SCHEMA_VERSION, RecordError, atomic_write

ROOT = Path(__file__).resolve().parents[1]
MICRO_INFO = {
    "subject_fidelity": {"higher_is_better": True, "description": "parsed subject match", "paper": None,
                         "analogue_of": "DINO/CLIP-I"},
    "prompt_fidelity": {"higher_is_better": True, "description": "prompt attributes satisfied", "paper": None,
                        "analogue_of": "CLIP-T"},
    "drift": {"higher_is_better": False, "description": "change on unrelated prompts", "paper": None,
              "analogue_of": None},
}
QUALITY = {"lora": 0.60, "oft": 0.70, "coft": 0.66, "boft": 0.68, "mobius": 0.72}
PARAMS = {"lora": 4096, "oft": 1536, "coft": 1536, "boft": 2304, "mobius": 2048}


def make_record(method="lora", seed=0, subject="glyph_a", sweep="sweep_a", status="success", coft=None,
                variant=None, budget=None, task="dreambooth", **extra) -> dict:
    """A schema-1 record of a micro run whose metrics depend on method, seed and subject (deterministically)."""
    name = "oft" if method == "coft" else method
    hparams = {"lr": 1e-3, "blocks": 4}
    if coft is not None:
        hparams["coft"] = coft
    config = {"method": {"name": name, **hparams}, "task": task, "subject": subject, "seed": seed}
    quality = QUALITY[method] + 0.01 * seed + (0.02 if subject == "glyph_b" else 0.0)
    record = {
        "schema": 1,
        "run": {"id": f"{sweep}-{method}-{subject}-{seed}", "status": status, "error": None, "config": config,
                "config_hash": results.config_hash(config), "seed": seed, "sweep": sweep,
                "created_at": "2025-01-01T00:00:00", "finished_at": "2025-01-01T00:05:00", "wall_seconds": 300.0},
        "task": {"name": task, "dataset": "micro", "subject": subject, "model": "micro"},
        "method": {"name": name, "variant": variant, "hparams": hparams, "budget": budget,
                   "trainable_params": PARAMS[method], "stored_params": PARAMS[method] * 2 if name == "oft"
                   else PARAMS[method], "adapter_bytes": PARAMS[method] * 4},
        "meta": {"python": "3.11", "git_commit": "abc123", "git_dirty": False, "model_fingerprint": "m",
                 "dataset_fingerprint": "d"},
    }
    if status == "success":
        record.update(
            train={"steps": 50, "seconds": 10.0 + PARAMS[method] / 1000, "peak_memory_mb": 500.0 + seed,
                   "memory_source": "rss", "loss_first": 1.0, "loss_last": 0.5, "loss_curve": [1.0, 0.5]},
            eval={"seconds": 2.0, "images": 16},
            metrics={"subject_fidelity": quality, "prompt_fidelity": 0.5 + quality / 10, "drift": 1 - quality},
            metric_info=MICRO_INFO,
            baseline={"metrics": {"subject_fidelity": 0.2 + 0.01 * seed, "prompt_fidelity": 0.4, "drift": 0.0}},
        )
    else:  # as the runner writes it: the base model was scored before training failed; no metric_info yet
        record["run"]["error"] = "RuntimeError: loss is NaN at step 12\nTraceback ..."
        record["baseline"] = {"metrics": {"subject_fidelity": 0.2 + 0.01 * seed}}
    record.update(extra)
    return record


def write_run(root: Path, record: dict, samples: bool = False) -> Path:
    run_dir = root / record["run"]["sweep"] / record["run"]["id"]
    if samples:
        (run_dir / "samples").mkdir(parents=True)
        mpimg.imsave(run_dir / "samples" / "grid.png", np.random.default_rng(0).random((8, 8, 3)))
        record = {**record, "samples": ["samples/grid.png"]}
    results.write_record(run_dir, record)
    return run_dir


@pytest.fixture
def runs(tmp_path) -> Path:
    """Two sweeps: lora, oft, coft over 2 subjects x 2 seeds, a failed boft; then mobius and a failed lora."""
    root = tmp_path / "runs"
    for method, coft in (("lora", None), ("oft", False), ("coft", True)):
        for subject in ("glyph_a", "glyph_b"):
            for seed in (0, 1):
                write_run(root, make_record(method, seed, subject, coft=coft), samples=seed == 0)
    write_run(root, make_record("boft", 0, status="failed"))
    for seed in (0, 1):
        write_run(root, make_record("mobius", seed, sweep="sweep_b", variant="boost"))
    write_run(root, make_record("lora", 2, sweep="sweep_b", status="failed"))
    return root


# ---------------------------------------------------------------- record contract

def test_config_hash_is_stable_and_order_free():
    a = results.config_hash({"b": 1, "a": {"y": [1, 2], "x": 0.5}})
    b = results.config_hash({"a": {"x": 0.5, "y": [1, 2]}, "b": 1})
    assert a == b and re.fullmatch(r"[0-9a-f]{16}", a)
    assert results.config_hash({"b": 2}) != results.config_hash({"b": 1})


def test_environment_lists_versions_git_and_host():
    env = results.environment()
    assert set(env["packages"]) == {"torch", "diffusers", "transformers", "peft"}
    assert env["python"].count(".") == 2 and env["cpu_count"] >= 1 and env["hostname"]
    assert "git_commit" in env and "git_dirty" in env and "gpu" in env
    json.dumps(env)  # it goes into record.json


def test_write_and_read_round_trip(tmp_path):
    record = make_record()
    del record["schema"]  # write_record fills in the current version
    path = results.write_record(tmp_path / "run", record)
    assert path == tmp_path / "run" / "record.json"
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temp file left behind
    [back] = results.read_records([tmp_path])
    assert back["schema"] == SCHEMA_VERSION and back["_path"] == str(tmp_path / "run")
    assert back["metrics"] == record["metrics"]
    table = results.write_table(tmp_path / "run", [{"prompt": "a", "score": 1.0}, {"prompt": "b", "extra": 2}])
    assert table.read_text().splitlines() == ["prompt,score,extra", "a,1.0,", "b,,2"]


def test_write_record_rejects_bad_records(tmp_path):
    bad = make_record()
    bad["run"]["status"] = "done"
    with pytest.raises(RecordError, match="run.status: 'done', allowed: success, failed"):
        results.write_record(tmp_path, bad)
    no_info = make_record()
    no_info["metric_info"] = {}
    with pytest.raises(RecordError, match="metric_info.subject_fidelity.higher_is_better"):
        results.write_record(tmp_path, no_info)
    with pytest.raises(RecordError, match="task: missing"):
        results.write_record(tmp_path, {k: v for k, v in make_record().items() if k != "task"})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_nan_metrics_are_written_as_null(tmp_path):
    record = make_record()
    record["metrics"]["drift"] = float("nan")
    path = results.write_record(tmp_path, record)
    assert json.loads(path.read_text())["metrics"]["drift"] is None


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    atomic_write(target, "old")

    def crash(*args):
        raise KeyboardInterrupt  # interrupted after the data was written, before the rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


KILLED_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("record", sys.argv[1])
record = importlib.util.module_from_spec(spec)
sys.modules["record"] = record  # its dataclasses look their module up
spec.loader.exec_module(record)
base = {"run": {"id": "r", "status": "running", "config_hash": "h", "seed": 0}, "task": {"name": "t"},
        "method": {"name": "m"}, "meta": {"pad": "x" * 200_000}}
print("ready", flush=True)
for i in range(10**9):
    base["run"]["step"] = i
    record.write_record(sys.argv[2], base)
"""


def test_kill_9_leaves_a_whole_record(tmp_path):
    """SIGKILL at arbitrary moments while records are rewritten: record.json always parses."""
    for delay in (0.05, 0.2, 0.45):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ROOT / "results" / "record.py"),
                                   str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "ready\n"
        try:
            writer.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            writer.kill()
        writer.wait()
        writer.stdout.close()
        if (tmp_path / "record.json").exists():
            assert json.loads((tmp_path / "record.json").read_text())["run"]["id"] == "r"
    assert results.read_records([tmp_path])[0]["run"]["step"] >= 0


def test_read_records_errors_are_one_line(tmp_path):
    with pytest.raises(RecordError, match="no records"):
        results.read_records([tmp_path])
    with pytest.raises(RecordError, match="no such file or directory"):
        results.read_records([tmp_path / "missing"])
    newer = make_record()
    newer["schema"] = SCHEMA_VERSION + 1
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "record.json").write_text(json.dumps(newer))
    with pytest.raises(RecordError) as e:
        results.read_records([tmp_path])
    assert str(tmp_path / "new" / "record.json") in str(e.value)
    assert f"schema {SCHEMA_VERSION + 1} is newer" in str(e.value) and f"({SCHEMA_VERSION})" in str(e.value)
    (tmp_path / "new" / "record.json").write_text('{"schema": 1, "run": ')
    with pytest.raises(RecordError, match=r"record.json: malformed JSON \(line 1"):
        results.read_records([tmp_path])


def test_read_records_ignores_temporary_files(tmp_path):
    write_run(tmp_path, make_record())
    (tmp_path / "sweep_a" / ".record.json.x1.tmp").write_text("{half")
    assert len(results.read_records([tmp_path, tmp_path / "sweep_a"])) == 1  # found twice, read once


def test_load_flattens_one_row_per_run(runs):
    df = results.load([runs])
    assert len(df) == 12 + 1 + 2 + 1
    assert {"metrics.subject_fidelity", "method.hparams.blocks", "run.sweep", "path"} <= set(df.columns)
    assert isinstance(df["run.config"].iloc[0], dict)
    assert set(df["run.sweep"]) == {"sweep_a", "sweep_b"}


def test_leaderboard_aggregates_ranks_and_counts_failures(runs):
    board = results.leaderboard(results.load([runs]))
    rows = {label(row): row for _, row in board.iterrows()}
    assert list(rows) == ["before fine-tuning", "mobius/boost (project formulation)", "oft (coft=False)",
                          "oft (coft=True)", "lora", "boft"]
    lora, oft = rows["lora"], rows["oft (coft=False)"]
    # lora: 2 subjects x 2 seeds, plus one failed lora run in the second sweep
    assert (lora["n"], lora["failed"]) == (4, 1)
    values = [0.60, 0.61, 0.62, 0.63]
    assert lora["subject_fidelity"] == pytest.approx(np.mean(values))
    assert lora["subject_fidelity_lo"] < np.mean(values) < lora["subject_fidelity_hi"]
    assert lora["n_subject_fidelity"] == 4 and rows["mobius/boost (project formulation)"]["n"] == 2
    # 2 units: no paired test can separate anything (smallest p = 0.5), so every method shares every rank
    assert set(board.loc[board["method"] != results.BASELINE, "rank_subject_fidelity"]) == {"1–4", ""}
    # Δ vs lora, paired on the same (subject, seed): oft is +0.10 on every pair
    assert oft["delta_subject_fidelity"] == pytest.approx(0.10) and oft["p_subject_fidelity"] == 1.0
    assert np.isnan(lora["delta_subject_fidelity"]) and board.attrs["reference"] == "lora"
    boft = rows["boft"]
    assert (boft["n"], boft["failed"]) == (0, 1) and np.isnan(boft["subject_fidelity"])
    assert boft["rank_subject_fidelity"] == ""
    # the base model: one per (task, subject, seed, model), shown first and not ranked
    base = board.iloc[0]
    # (seeds 0, 1 x 2 subjects, and seed 2 from the failed lora run; the other runs repeat these)
    assert base["method"] == results.BASELINE and base["n"] == 5 and base["rank_subject_fidelity"] == ""
    assert base["subject_fidelity"] == pytest.approx(0.2075) and base["n_prompt_fidelity"] == 4
    # stored vs effective parameters, costs (median over units of the per-unit median over seeds)
    assert (oft["trainable_params"], oft["stored_params"]) == (1536, 3072)
    assert lora["adapter_bytes"] == 4 * 4096 and lora["memory_source"] == "rss" and lora["lr"] == 1e-3
    assert lora["peak_memory_mb"] == 500.5 and lora["train_seconds"] == pytest.approx(10 + 4.096)


def test_bootstrap_ci_is_reproducible_and_degenerate_for_one_value():
    x = [0.1, 0.4, 0.35, 0.8, 0.55]
    assert results.bootstrap_ci(x) == results.bootstrap_ci(x)
    mean, low, high, n = results.bootstrap_ci(x)
    assert low < mean < high and n == 5 and mean == pytest.approx(0.44)
    assert results.bootstrap_ci([0.3, np.nan]) == (0.3, 0.3, 0.3, 1)


def test_leaderboard_by_sweep_and_chosen_metrics(runs):
    board = results.leaderboard(results.load([runs]), metrics=["drift"], by=["run.sweep"])
    assert "subject_fidelity" not in board and "rank_drift" in board
    lora = board[board["method"] == "lora"].set_index("run.sweep")
    assert lora.loc["sweep_a", "n"] == 4 and lora.loc["sweep_b", "failed"] == 1
    with pytest.raises(RecordError, match="unknown metric 'dino'; known: subject_fidelity, prompt_fidelity, drift"):
        results.leaderboard(results.load([runs]), metrics=["dino"])


def test_repeated_run_in_two_sweeps_counts_once(tmp_path, caplog):
    write_run(tmp_path, make_record("lora", 0, sweep="first"))
    write_run(tmp_path, make_record("lora", 0, sweep="second"))
    board = results.leaderboard([tmp_path])
    assert board.loc[board["method"] == "lora", "n"].item() == 1
    assert "counted once" in caplog.text


def test_markdown_shows_direction_ci_rank_and_failures(runs):
    text = results.to_markdown(results.leaderboard([runs]))
    header = text.splitlines()[0]
    assert "subject_fidelity ↑" in header and "drift ↓" in header and "failed" in header
    assert "before fine-tuning" in text and "stored 3.07k" in text and "16 KiB" in text
    assert re.search(r"\| 0\.615 \[0\.\d+, 0\.\d+\] +\| reference +\| 1–4 ", text)  # lora: mean [CI], rank
    assert re.search(r"\| \+0\.1 p=1 +\| 1–4 ", text)  # oft: Δ (the same on every pair: no CI), adjusted p
    assert "#" not in text  # no "#1" anywhere: ranks are ranges unless a test separates the methods
    assert "minimum detectable paired difference (80% power): subject_fidelity" in text
    assert "share a rank lo–hi" in text and "Holm-adjusted within each metric (up to 3 comparisons with lora" in text
    one = results.leaderboard([make_record("oft", coft=False)])  # one method: no reference, rank 1, no MDE
    text = results.to_markdown(one)
    assert re.search(r"\(n=1\) +\| +1 +\|", text) and "No reference method" in text and "minimum detectable" not in text


def test_run_summary_uses_leaderboard_names():
    summary = results.run_summary(make_record("oft", coft=False))
    assert set(summary) == {"subject_fidelity", "prompt_fidelity", "drift", "trainable_params", "stored_params",
                            "adapter_bytes", "train_seconds", "peak_memory_mb"}
    board = results.leaderboard([make_record("oft", coft=False)])
    assert set(summary) <= set(board.columns)


def simulated_sweep(effects: dict, units: int = 8, seeds: int = 3, budget=None, seed: int = 1) -> list[dict]:
    """Records of methods whose subject_fidelity is a subject's difficulty plus the method's effect plus noise."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0.5, 0.1, units)
    records = []
    for method, effect in effects.items():
        for u in range(units):
            for s in range(seeds):
                value = float(difficulty[u] + effect + rng.normal(0, 0.01))
                record = make_record(method, s, f"subject_{u}", budget=budget,
                                     metrics={"subject_fidelity": value, "drift": 1 - value},
                                     metric_info={k: MICRO_INFO[k] for k in ("subject_fidelity", "drift")},
                                     baseline={"metrics": {"subject_fidelity": float(difficulty[u] - 0.3)}})
                records.append(record)
    return records


def test_tied_ranks_on_the_board():
    # 8 subjects: oft clearly best, lora and boft indistinguishable
    board = results.leaderboard(simulated_sweep({"lora": 0.0, "oft": 0.2, "boft": 0.0}), resamples=1000)
    ranks = dict(zip(board["method"], board["rank_subject_fidelity"]))
    assert ranks["oft"] == "1" and ranks["lora"] == ranks["boft"] == "2–3" and ranks[results.BASELINE] == ""
    assert dict(zip(board["method"], board["rank_drift"]))["oft"] == "1"  # lower drift is better
    oft = board[board["method"] == "oft"].iloc[0]
    assert oft["delta_subject_fidelity"] == pytest.approx(0.2, abs=0.01)
    assert oft["delta_subject_fidelity_lo"] < oft["delta_subject_fidelity"] < oft["delta_subject_fidelity_hi"]
    assert oft["delta_subject_fidelity_hi"] - oft["delta_subject_fidelity_lo"] < 0.03
    assert oft["p_subject_fidelity"] == pytest.approx(2 * 2 / 2 ** 8)  # Holm within the metric: 2 rows vs lora
    # two indistinguishable methods share 1–2
    board = results.leaderboard(simulated_sweep({"lora": 0.0, "oft": 0.0}), resamples=1000)
    assert set(board["rank_subject_fidelity"]) == {"1–2", ""}
    text = results.to_markdown(board)
    assert "#1" not in text and "minimum detectable paired difference (80% power): subject_fidelity" in text
    assert "with 8 units" in text


STABLE = ["task", "dataset", "model", "method", "variant", "budget", "setting", "n", "failed", "lr", "lr_source",
          *[c for m in ("subject_fidelity", "drift") for c in
            (m, f"{m}_lo", f"{m}_hi", f"n_{m}", f"delta_{m}", f"delta_{m}_lo", f"delta_{m}_hi", f"p_{m}", f"rank_{m}")],
          "trainable_params", "stored_params", "extra_params", "adapter_bytes", "train_seconds", "train_cpu_seconds",
          "peak_memory_mb",
          "memory_source", "under_budget"]


def test_csv_columns_and_integer_types(tmp_path, capsys):
    for record in simulated_sweep({"lora": 0.0, "oft": 0.1}, units=3, seeds=2):
        write_run(tmp_path / "runs", record)
    code, _, _ = run_cli("leaderboard", tmp_path / "runs", "--csv", tmp_path / "b.csv", capsys=capsys)
    assert code == 0
    text = (tmp_path / "b.csv").read_text()
    assert text.splitlines()[0].split(",") == STABLE
    csv = pd.read_csv(tmp_path / "b.csv")
    raw = pd.read_csv(tmp_path / "b.csv", dtype=str)
    for column in ("n", "failed", "trainable_params", "stored_params", "adapter_bytes", "n_subject_fidelity"):
        assert raw[column].dropna().str.fullmatch(r"\d+").all(), column  # 4096, not 4096.0
    lora = csv[csv["method"] == "lora"].iloc[0]
    assert re.search(r"^dreambooth,micro,micro,lora,,,,6,0,0\.001,,", text, re.M)  # ints written without ".0"
    assert ",4096,4096,,16384," in text and lora["rank_subject_fidelity"] == "1–2"
    oft = csv[csv["method"] == "oft"].iloc[0]
    # 3 units: smallest p 2/2^3; one row vs lora per metric, so Holm leaves it
    assert oft["delta_subject_fidelity"] == pytest.approx(0.1, abs=0.03) and oft["p_subject_fidelity"] == 0.25


def test_reference_choice(tmp_path, capsys):
    records = simulated_sweep({"lora": 0.0, "oft": 0.1, "boft": 0.05}, units=3, seeds=2)
    board = results.leaderboard(records, reference="oft", resamples=500)
    lora = board[board["method"] == "lora"].iloc[0]
    assert board.attrs["reference"] == "oft" and lora["delta_subject_fidelity"] == pytest.approx(-0.1, abs=0.03)
    none = results.leaderboard(records, reference=None, resamples=500)
    assert none["delta_subject_fidelity"].isna().all() and none["p_drift"].isna().all()
    assert "Δ" not in results.display(none).columns.str.cat()
    no_lora = results.leaderboard([r for r in records if r["method"]["name"] != "lora"], resamples=500)
    assert no_lora.attrs["reference"] is None  # no lora: no reference unless asked
    for record in records:
        write_run(tmp_path, record)
    code, out, err = run_cli("leaderboard", tmp_path, "--reference", "dora", capsys=capsys)
    assert code == 2 and "unknown reference method 'dora'; methods with successful runs: boft, lora, oft" in err
    code, out, _ = run_cli("leaderboard", tmp_path, "--no-reference", capsys=capsys)
    assert code == 0 and "vs lora" not in out and "No reference method" in out
    code, out, _ = run_cli("leaderboard", tmp_path, "--reference", "boft", capsys=capsys)
    assert code == 0 and "Δ subject_fidelity vs boft" in out


def test_latex_escapes_every_text_cell(tmp_path, capsys):
    assert results.leaderboard.__module__ == "results.leaderboard"
    from results.leaderboard import latex_escape
    assert latex_escape("a_b #1 50% R&D ↑ ↓ 1–3 —") == r"a\_b \#1 50\% R\&D $\uparrow$ $\downarrow$ 1--3 ---"
    records = simulated_sweep({"lora": 0.0, "oft": 0.1}, units=3, seeds=2)
    for record in records:
        if record["method"]["name"] == "oft":
            record["method"]["variant"] = "v_1 50% & #2"
        write_run(tmp_path / "runs", record)
    code, _, _ = run_cli("leaderboard", tmp_path / "runs", "--latex", tmp_path / "b.tex", capsys=capsys)
    tex = (tmp_path / "b.tex").read_text()
    assert code == 0 and r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"subject\_fidelity $\uparrow$" in tex and r"drift $\downarrow$" in tex and "1--2" in tex
    body = tex[tex.index(r"\toprule"):tex.index(r"\bottomrule")]
    cells = [c for line in body.splitlines()[1:] if line.endswith(r"\\")
             for c in re.split(r"(?<!\\) & ", line.removesuffix(r"\\"))]
    assert r"oft/v\_1 50\% \& \#2" in cells
    for char in "_#%&":
        assert not any(re.search(rf"(?<!\\){re.escape(char)}", c) for c in cells), char  # every one escaped
    assert "↑" not in tex and "–" not in tex and "Δ" not in tex
    assert re.search(r"0\.\d+ \[0\.\d+, 0\.\d+\]", body)  # mean [lo, hi]


def test_under_budget_is_flagged_in_every_table(tmp_path, capsys):
    records = simulated_sweep({"lora": 0.0, "mobius": 0.0}, units=2, seeds=1, budget=4096)
    board = results.leaderboard(records, resamples=200)
    flags = dict(zip(board["method"], board["under_budget"]))
    assert flags == {results.BASELINE: False, "lora": False, "mobius": True}  # 2048 < 0.9 * 4096; lora 4096
    for record in records:
        write_run(tmp_path / "runs", record)
    code, out, _ = run_cli("leaderboard", tmp_path / "runs", "--csv", tmp_path / "b.csv", "--latex",
                           tmp_path / "b.tex", "--html", tmp_path / "b.html", capsys=capsys)
    assert code == 0 and "under budget: 2.05k" in out and out.count("under budget: ") == 1 + 1  # cell + note
    csv = pd.read_csv(tmp_path / "b.csv").set_index("method")
    assert csv.loc["mobius", "under_budget"] and not csv.loc["lora", "under_budget"]
    assert "under budget: 2.05k" in (tmp_path / "b.tex").read_text()
    assert "under budget: 2.05k" in (tmp_path / "b.html").read_text()
    # Möbius is the project's formulation wherever it is named
    assert "mobius (project formulation) budget=4.1k" in out
    assert "mobius (project formulation)" in (tmp_path / "b.tex").read_text()
    # lr and where it came from
    records[0]["method"]["lr"], records[0]["method"]["lr_source"] = 1e-3, "tuned: study-lora.json"
    assert "0.001 (tuned)" in results.to_markdown(results.leaderboard(records[:1], resamples=200))


def test_cli_validity(tmp_path, capsys):
    for record in simulated_sweep({"lora": 0.0, "oft": 0.2, "boft": 0.0}, units=8, seeds=2):
        write_run(tmp_path, record)
    code, out, _ = run_cli("validity", tmp_path, "--metrics", "subject_fidelity", capsys=capsys)
    assert code == 0 and "| task" in out and "subject_fidelity" in out and "drift" not in out.split("\n\n")[0]
    table = results.validity([tmp_path], metrics=["subject_fidelity"])
    row = table.iloc[0]
    assert (row["methods"], row["units"], row["pairs separated"]) == (3, 8, "2/3")
    assert row["between/within"] > 1 and row["rank stability (W)"] > 0.5
    assert row["MDE (80% power)"] == pytest.approx(
        results.stats.mde(row["MDE (80% power)"] / results.stats.mde(1.0, 8).value, 8).value)
    few = results.validity(simulated_sweep({"lora": 0.0, "oft": 0.2}, units=4, seeds=2))
    assert few["pairs separated"].eq("0/1").all() and few["note"].str.contains(r"smallest p = 2/2\^4").all()


def test_sweep_end_prints_the_board(tmp_path, monkeypatch, capsys):
    """bench's Hydra callback: the same Markdown board, also with a single method."""
    callbacks = pytest.importorskip("bench.callbacks")
    from bench.faults import SWEEP_MANIFEST

    paths = [write_run(tmp_path / "multirun", r) / "record.json"
             for r in simulated_sweep({"oft": 0.0}, units=2, seeds=2, budget=4096)]
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("\n".join(map(str, paths)))
    monkeypatch.setenv(SWEEP_MANIFEST, str(manifest))
    callbacks.Leaderboard().on_multirun_end(config=None)
    out = capsys.readouterr().out
    assert "before fine-tuning" in out and "| oft" in out and "under budget: 1.54k" in out
    assert "No reference method" in out and "Full tables: python -m results leaderboard" in out
    for record in simulated_sweep({"lora": 0.0}, units=2, seeds=2, budget=4096):
        paths.append(write_run(tmp_path / "multirun", record) / "record.json")
    manifest.write_text("\n".join(map(str, paths)))
    callbacks.Leaderboard().on_multirun_end(config=None)
    out = capsys.readouterr().out
    assert "Δ subject_fidelity vs lora" in out and "minimum detectable paired difference" in out
    assert "rank subject_fidelity" in out and "| lr " in out


# ---------------------------------------------------------------- Pareto

def test_pareto_front():
    on = pareto.front([1, 2, 3, 4, 2], [0.5, 0.7, 0.6, 0.9, 0.7], higher_is_better=True)
    assert on.tolist() == [True, True, False, True, True]
    assert pareto.front([1, 2], [0.5, 0.4], higher_is_better=False).tolist() == [True, True]


def test_pareto_plot_files(runs, tmp_path):
    board = results.leaderboard([runs])
    pts = pareto.points(board, "subject_fidelity", "params")
    front = set(pts.loc[pts["on_front"], "label"])
    assert front == {"oft (coft=False)", "mobius/boost (project formulation)"}
    svg = pareto.save(pareto.plot(board, "subject_fidelity", "params"), tmp_path / "front.svg")
    assert "<svg" in svg.read_text() and "mobius/boost (project formulation)" in svg.read_text()
    png = pareto.save(pareto.plot(board, "drift", "memory"), tmp_path / "front.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RecordError, match="must be one of .png, .svg"):
        pareto.save(pareto.plot(board, "drift", "time"), tmp_path / "front.jpg")


# ---------------------------------------------------------------- paper tables

def _papers_md_tables() -> dict[str, list[list[str]]]:
    """The Markdown tables of shared/papers.md, keyed by the line that introduces each."""
    text = (ROOT.parent / "shared" / "papers.md").read_text()
    tables, title = {}, None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                tables.setdefault(title, []).append(cells)
        elif line.strip():
            title = line
    return tables


def _number(text: str):
    return None if text == "—" else float(text.rstrip("M"))


@pytest.mark.skipif(not (ROOT.parent / "shared" / "papers.md").is_file(), reason="shared/papers.md not beside")
def test_paper_files_hold_the_published_numbers():
    tables = {title.split(" — ")[0].split(" (")[0]: rows for title, rows in _papers_md_tables().items() if title}
    by_method = {"OFT Table 1": "oft_table1", "BOFT Table 6": "boft_table6"}
    for title, name in by_method.items():  # methods are rows in papers.md too
        header, *body = tables[title]
        paper = papers.load_paper(name)
        published = papers.published(paper).set_index("method").astype(object)
        published = published.where(published.notna(), None)
        columns = [c["name"] for c in paper["columns"]]
        for row in body:
            assert [published.loc[row[0], c] for c in columns] == [_number(v) for v in row[1:]], (name, row)
    transposed = {"OFT Table 2": ("oft_table2", 2), "BOFT Table 9": ("boft_table9", 2),
                  "OFT Table 3": ("oft_table3", 1)}
    for title, (name, keys) in transposed.items():  # tasks x metrics are rows in papers.md
        header, *body = tables[title]
        published = papers.published(papers.load_paper(name)).set_index("method")
        methods = header[keys:]
        if name == "oft_table3":
            methods = [m if m == "ControlNet" else f"OFT {m}" for m in methods]
        for row in body:
            column = " ".join(row[:keys]) if keys == 2 else {"trainable params": "trainable params (M)"}.get(row[0],
                                                                                                             row[0])
            assert [published.loc[m, column] for m in methods] == [_number(v) for v in row[keys:]], (name, row)
    for name in papers.available():
        paper = papers.load_paper(name)
        assert paper["citation"] and paper["table"] and " et al." in paper["citation"]


def test_paper_view_labels_micro_analogues(runs):
    text = papers.render(papers.load_paper("oft_table1"), results.load([runs]))
    assert text.startswith("OFT Table 1") and "Qiu et al." in text and "NeurIPS 2023, Table 1" in text
    header = text.splitlines()[2]
    assert "DINO (paper)" in header and "micro analogue of DINO: subject_fidelity" in header
    assert "micro analogue of CLIP-I: subject_fidelity" in header  # analogue_of "DINO/CLIP-I" names both
    assert "micro analogue of CLIP-T: prompt_fidelity" in header
    assert "DINO (measured)" not in header  # the analogue is never passed off as DINO
    table = papers.compare(papers.load_paper("oft_table1"), results.load([runs])).set_index("method")
    assert table.loc["COFT", "measured as"] == "oft {coft=True}" and table.loc["COFT", "n"] == 4
    assert table.loc["COFT", "micro analogue of DINO: subject_fidelity"].startswith("0.675 [")
    assert table.loc["OFT", "micro analogue of DINO: subject_fidelity"].startswith("0.715 [")
    assert table.loc["LoRA", "DINO (paper)"] == 0.613 and table.loc["real images", "measured as"] == "—"
    assert "analogues of the paper's metric" in text


def test_paper_view_uses_the_real_metric_when_recorded(tmp_path):
    record = make_record("lora")
    record["metrics"]["dino"] = 0.61
    record["metric_info"] = {**MICRO_INFO, "dino": {"higher_is_better": True, "description": "DINO ViT-S/16",
                                                    "paper": "OFT", "analogue_of": None}}
    table = papers.compare(papers.load_paper("oft_table1"), [record]).set_index("method")
    assert table.loc["LoRA", "DINO (measured)"] == "0.61 (n=1)"


def test_paper_view_for_control_tasks(tmp_path):
    """OFT Table 2: real metrics by name, micro analogues by analogue_of, the base model as the "SD" row."""
    info = {"mIoU": {"higher_is_better": True, "description": "parsed mIoU", "paper": "OFT Table 2 (S2I)",
                     "analogue_of": None},
            "keypoint_error": {"higher_is_better": False, "description": "parsed keypoints", "paper": None,
                               "analogue_of": "landmark error (OFT Table 2, L2F)"}}
    records = []
    for r, miou in ((2, 30.0), (4, 25.0)):
        records.append(make_record("oft", task="seg2img", coft=False, metrics={"mIoU": miou}, metric_info=info,
                                   baseline={"metrics": {"mIoU": 5.0}}))
        records[-1]["method"]["hparams"]["blocks"] = r
    records.append(make_record("lora", task="landmark2img", metrics={"keypoint_error": 3.5}, metric_info=info,
                               baseline={"metrics": {"keypoint_error": 9.0}}))
    table = papers.compare(papers.load_paper("oft_table2"), records)
    assert list(table.columns[5:9]) == ["C2I IoU (paper)", "C2I F1 (paper)", "S2I mIoU (paper)", "S2I mIoU (measured)"]
    assert "micro analogue of L2F error: keypoint_error" in table.columns
    rows = table.set_index(["method", "measured as"])
    assert rows.loc[("SD", "before fine-tuning"), "S2I mIoU (measured)"] == "5 (n=1)"
    assert rows.loc[("SD", "before fine-tuning"), "micro analogue of L2F error: keypoint_error"] == "9 (n=1)"
    assert rows.loc[("OFT", "oft (blocks=2) {coft=False}"), "S2I mIoU (measured)"] == "30 (n=1)"
    assert rows.loc[("LoRA", "lora"), "micro analogue of L2F error: keypoint_error"] == "3.5 (n=1)"
    by_blocks = papers.compare(papers.load_paper("oft_table3"), records).set_index("method")
    assert by_blocks.loc["OFT r=4", "mIoU (measured)"] == "25 (n=1)"
    assert by_blocks.loc["OFT r=4", "trainable params (M) (measured)"] == "0.001536"
    assert by_blocks.loc["OFT r=8", "measured as"] == "—"


def test_paper_tables_listed_and_published_alone():
    assert papers.available() == ["boft_table6", "boft_table9", "delora_table2", "delora_table3", "hra_table4_control",
                                  "hra_table4_subject", "oft_table1", "oft_table2", "oft_table3"]
    text = papers.render(papers.load_paper("boft_table6"))
    assert "Liu et al." in text and "| BOFT m=4, r=8" in text and "5.667" in text


# ---------------------------------------------------------------- report

def test_report_is_self_contained(runs, tmp_path):
    path = report.write(results.load([runs]), tmp_path / "report.html")
    html = path.read_text()
    for section in ("Leaderboard", "Critical-difference diagrams", "Validity", "Parameters and quality",
                    "Pareto fronts", "Failed runs", "Samples"):
        assert f"<h2>{section}</h2>" in html
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "loss is NaN at step 12" in html and "mobius/boost (project formulation)" in html
    # sample grids (lora, oft, coft); plots: 3 metrics against params, the first against memory and time;
    # a critical-difference diagram per metric (mobius left out: it lacks glyph_b)
    assert html.count("<figure>") == 3 + 5 + 3 and "<td>abc123</td>" in html
    assert "Left out (missing blocks): mobius/boost (project formulation)" in html
    for metric in ("subject_fidelity", "prompt_fidelity", "drift"):
        for suffix in ("png", "svg"):
            assert (tmp_path / f"report-cd-dreambooth-micro-micro-{metric.replace('_', '-')}.{suffix}").is_file()


# ---------------------------------------------------------------- CLI

def run_cli(*args, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_leaderboard(runs, tmp_path, capsys):
    code, out, err = run_cli("leaderboard", runs, "--metrics", "subject_fidelity,drift", "--csv",
                             tmp_path / "b.csv", "--html", tmp_path / "b.html", capsys=capsys)
    assert code == 0 and "| task" in out and "subject_fidelity ↑" in out and "prompt_fidelity" not in out
    assert "2 run(s) did not succeed" in out and "loss is NaN at step 12" in out
    csv = pd.read_csv(tmp_path / "b.csv")
    assert {"subject_fidelity", "subject_fidelity_lo", "rank_drift", "trainable_params"} <= set(csv.columns)
    assert "<table" in (tmp_path / "b.html").read_text()


def test_cli_pareto_paper_report(runs, tmp_path, capsys):
    code, out, _ = run_cli("pareto", runs, "--x", "params", "--y", "subject_fidelity", "-o", tmp_path / "p.png",
                           capsys=capsys)
    assert code == 0 and "Pareto front (subject_fidelity vs params): " in out and (tmp_path / "p.png").is_file()
    code, out, _ = run_cli("paper", "--list", capsys=capsys)
    assert code == 0 and "oft_table1: OFT Table 1" in out and len(out.splitlines()) == 9
    code, out, _ = run_cli("paper", "oft_table1", runs, capsys=capsys)
    assert code == 0 and "micro analogue of DINO" in out
    code, out, _ = run_cli("report", runs, "-o", tmp_path / "r.html", capsys=capsys)
    assert code == 0 and (tmp_path / "r.html").is_file()


@pytest.mark.parametrize("case, expected", [
    ("empty", "no records (record.json) found under"),
    ("newer", "is newer than this results package reads (1)"),
    ("metric", "unknown metric 'dino'; known: subject_fidelity, prompt_fidelity, drift"),
    ("paper", "unknown paper table 'oft_table9'; available: boft_table6"),
    ("format", "plot format must be one of .png, .svg"),
])
def test_cli_bad_input_is_one_line_exit_2(case, expected, runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    newer = tmp_path / "newer"
    (newer / "run").mkdir(parents=True)
    (newer / "run" / "record.json").write_text(json.dumps({**make_record(), "schema": 2}))
    argv = {
        "empty": ["leaderboard", empty],
        "newer": ["leaderboard", runs, newer],
        "metric": ["leaderboard", runs, "--metrics", "dino"],
        "paper": ["paper", "oft_table9", runs],
        "format": ["pareto", runs, "--y", "drift", "-o", tmp_path / "p.jpg"],
    }[case]
    code, out, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1 and out == ""


@pytest.mark.slow
def test_cli_module_exits_2_without_traceback(tmp_path):
    """End to end: a fresh `python -m results` process prints the one line (test_cli_bad_input_...: in-process)."""
    done = subprocess.run([sys.executable, "-m", "results", "leaderboard", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"python -m results: error: no records (record.json) found under {tmp_path}"


# ---------------------------------------------------------------- notebook

@pytest.mark.slow
def test_notebook_runs_on_records(runs, monkeypatch):
    """End to end: the notebook in a Jupyter kernel of its own (a process start, seconds)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PEFTBENCH_RUNS", str(runs))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(ROOT / "notebooks" / "leaderboard.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "subject_fidelity ↑" in text and "before fine-tuning" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
