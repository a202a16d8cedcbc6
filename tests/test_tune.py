"""The tuning stage (bench/tune.py): search, pruning, the tuned-settings file and how runs use it."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench import CONF, tune
from bench.run import run_job
from results.record import read_records

SMOKE = ["experiment=smoke", "task.subjects=[checker]", "task.steps=2", "task.prompts_per_subject=1",
         "task.images_per_prompt=1", "task.drift_prompts=0", "task.prior_preservation=false"]


def config(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


class Task:
    objective = ("quality", "error")


INFO = {"quality": {"higher_is_better": True}, "error": {"higher_is_better": False}}


def test_objective_signs_each_metric_by_its_direction():
    assert tune.objective(Task, {"quality": 0.8, "error": 0.2}, INFO) == pytest.approx(0.3)
    with pytest.raises(KeyError, match="quality"):
        tune.objective(Task, {"error": 0.2}, INFO)


def fake_unit_runner(peak_lr: float, calls: list):
    """A run_unit stand-in whose score peaks at `peak_lr` (log scale), one unit a little worse than the other."""
    def run(cfg, unit, run_dir):
        calls.append((cfg.lr, unit))
        score = 1 - abs(math.log10(cfg.lr / peak_lr)) - (0.05 if unit == "b" else 0)
        run_dir.mkdir(parents=True, exist_ok=True)
        return {"_path": str(run_dir), "run": {"status": "success", "error": None},
                "metrics": {"quality": score, "error": 0.0}, "metric_info": INFO}
    return run


def test_study_finds_the_peak_prunes_and_writes_its_files(tmp_path):
    cfg = config("experiment=tune", "method=lora", f"tune.output={tmp_path}")
    assert cfg.tune.trials == 8
    center = tune.yaml_lr(cfg)
    calls = []
    best = tune.study(cfg, Task, ["a", "b"], "fp", 1000, tmp_path, fake_unit_runner(center * 3, calls))
    summary = json.loads((tmp_path / "study-lora.json").read_text())
    lrs = [t["lr"] for t in summary["trials"]]
    assert sorted(lrs) == pytest.approx([center * 10 ** (-1 + 2 * i / 7) for i in range(8)])  # the log grid
    assert lrs[0] == pytest.approx(center / 10 ** (1 / 7)) and lrs[1] == pytest.approx(center * 10)  # spread first
    ratio = summary["best"]["lr"] / (center * 3)
    assert 10 ** (-1 / 7) <= ratio <= 10 ** (1 / 7)  # within half a grid step of the peak
    assert best == pytest.approx(summary["best"]["value"])
    pruned = [t for t in summary["trials"] if t["state"].startswith("pruned")]
    assert pruned and all(len(t["running"]) == 1 for t in pruned)  # stopped after the first unit
    assert len(calls) == 2 * 8 - len(pruned)
    entry = yaml.safe_load((tmp_path / "tuned.yaml").read_text())["lora"]
    assert entry["lr"] == summary["best"]["lr"] and entry["study"] == "study-lora.json"
    assert entry["budget"] == cfg.method.budget and entry["steps"] == cfg.task.steps


def test_a_diverging_trial_is_a_bad_rate_not_a_broken_study(tmp_path):
    cfg = config("experiment=tune", "method=lora", f"tune.output={tmp_path}", "tune.trials=4")

    def run(cfg, unit, run_dir):
        ok = cfg.lr < tune.yaml_lr(cfg) * 5
        return {"_path": str(run_dir), "run": {"status": "success" if ok else "failed", "error": "Diverged: nan"},
                "metrics": {"quality": 1.0, "error": 0.0}, "metric_info": INFO}

    tune.study(cfg, Task, ["a"], "fp", 1000, tmp_path, run)
    states = [t["state"] for t in json.loads((tmp_path / "study-lora.json").read_text())["trials"]]
    assert "failed: Diverged: nan" in states and "complete" in states


def test_parallel_studies_keep_each_others_entries(tmp_path):
    for method in ("lora", "oft"):
        cfg = config("experiment=tune", f"method={method}", f"tune.output={tmp_path}", "tune.trials=3")
        tune.study(cfg, Task, ["a"], "fp", 1000, tmp_path, fake_unit_runner(tune.yaml_lr(cfg), []))
    assert set(yaml.safe_load((tmp_path / "tuned.yaml").read_text())) == {"lora", "oft"}
    table = tune.summary_table(tmp_path).splitlines()
    assert len(table) == 4 and table[2].startswith("| lora") and table[3].startswith("| oft")


def test_a_run_uses_a_tuned_entry_only_where_it_matches(tmp_path, caplog):
    path = tmp_path / "tuned.yaml"
    cfg = config("method=oft", f"tuned_lrs={path}")
    assert tune.learning_rate(cfg, "fp", 1000) == (tune.yaml_lr(cfg), "yaml")  # no file
    entry = {**tune.entry_key(cfg, "fp", 1000), "lr": 0.0123}
    path.write_text(yaml.safe_dump({"oft": entry}))
    assert tune.learning_rate(cfg, "fp", 1000) == (0.0123, f"tuned: {path}")
    assert tune.learning_rate(config("method=lora", f"tuned_lrs={path}"), "fp", 1000)[1] == "yaml"  # no entry
    for override in ("task.steps=7", "model.method_budget=60000", "task.guidance=2", "model.guidance=3",
                     "task.ddim_steps=25"):
        assert tune.learning_rate(config("method=oft", f"tuned_lrs={path}", override), "fp", 1000)[1] == "yaml"
    assert tune.learning_rate(cfg, "retrained weights", 1000)[1] == "yaml"
    assert tune.learning_rate(cfg, "fp", 999)[1] == "yaml"  # the budget chose another size
    assert "tuned for another" in caplog.text
    assert tune.learning_rate(config("method=oft", "tuned_lrs=null"), "fp", 1000) == (tune.yaml_lr(cfg), "yaml")


def test_tasks_sample_at_their_models_guidance_unless_told():
    assert [config(f"model={m}").task.guidance for m in ("micro", "sd15", "sdxl")] == [1.5, 7.5, 5.0]
    assert config("task=seg2img", "model.guidance=3").task.guidance == 3.0
    assert config("experiment=oft_table1").task.guidance == 7.5  # the paper's protocol


def test_the_default_reads_the_committed_file_of_its_model_and_task():
    cfg = config("task=seg2img")
    assert cfg.tuned_lrs == str(CONF / "tuned" / "micro-seg2img" / "tuned.yaml")
    assert config("experiment=tuned").tuned_lrs == "multirun/tune-dreambooth/tuned.yaml"
    assert config("experiment=tune").task.split == "validation"


@pytest.mark.slow
def test_tune_then_tuned_runs_say_where_their_lr_came_from(tmp_path):
    """The whole stage in-process on the micro model: a study on validation units, then a test run using it."""
    # experiment=tune replaces experiment=smoke, so the sampler a tuned lr is matched on is set for both runs here
    common = [*SMOKE, "task.ddim_steps=4", "method=lora", f"cache_dir={tmp_path / 'cache'}"]
    tuned = tmp_path / "tune"
    cfg = config(*common, "experiment=tune", "task.subjects=null", "tune.trials=2", "tune.units=1",
                 f"tune.output={tuned}")
    assert math.isfinite(run_job(cfg, job_dir=tmp_path / "tune-job"))
    entry = yaml.safe_load((tuned / "tuned.yaml").read_text())["lora"]
    trial_records = read_records([tmp_path / "tune-job"])
    from tasks.micro import subjects
    assert {r["task"]["subject"] for r in trial_records} <= set(subjects.VALIDATION)
    assert {r["method"]["lr_source"] for r in trial_records} == {"tuning trial 0", "tuning trial 1"}

    run_job(config(*common, f"tuned_lrs={tuned / 'tuned.yaml'}"), job_dir=tmp_path / "test-job")
    record, = read_records([tmp_path / "test-job"])
    assert record["task"]["subject"] not in subjects.VALIDATION
    assert record["method"]["lr"] == pytest.approx(entry["lr"])
    assert record["method"]["lr_source"] == f"tuned: {tuned / 'tuned.yaml'}"
    assert OmegaConf.create(record["run"]["config"]).lr == pytest.approx(entry["lr"])
