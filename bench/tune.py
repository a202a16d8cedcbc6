"""Learning rates tuned per method before methods are compared: the study, and the tuned settings test runs use.

`python -m bench -m experiment=tune method=lora,oft task=dreambooth` runs one study per method (one Hydra job each):

- search space: lr log-uniform over `tune.decades` decades (default 2) centred on the yaml's value
  c = method.lr × task.lr_scale, i.e. [c/10, 10c];
- units: the task's validation split (`task.split=validation`: micro's validation subjects, a fixed DreamBench
  subject split, held-out controllable scenes), never its test units; the first `tune.units` of them;
- trials: `tune.trials` (default 8) points of a log-spaced grid over that range, visited spread-out first (the point
  nearest the centre, the far end, the near end, then the middles of the widest gaps), with fixed seeds. In one
  dimension a grid of n points puts the best one within 10^(d/(2(n-1))) of the optimum (1.39x for 8 trials over
  2 decades); TPE's 8 trials do not promise that (3 random starts, 5 guided: 2.4x off a known peak in
  tests/test_tune.py when it was tried);
- objective: the mean of the task's objective metrics (`task.objective`; DreamBooth: subject and prompt fidelity,
  so a rate that copies the training images is not rewarded), each signed by higher_is_better, over the units;
- pruning: a trial reports its running mean after each unit, and Optuna's median pruner stops a trial whose
  running mean is below the median of the earlier trials after the same units (the units come in the same order).

Optuna is used directly, not through hydra-optuna-sweeper: the sweeper (1.2.0, the newest) requires optuna < 3 and
runs each trial as a whole Hydra job, which cannot report an intermediate score, so nothing could be pruned.

Each study writes `study-<method>.json` (every trial's lr, score, state, seconds, records) and its best setting into
`tuned.yaml` in the sweep directory. A run reads its lr from `tuned_lrs` (default: the committed file for its model
and task under `conf/tuned/`; `experiment=tuned`: the sweep's fresh one; `tuned_lrs=null`: the yaml's), only where
the entry was tuned for the same budget, steps, model weights and sampler (guidance, DDIM steps, object guidance:
the objective is measured on its images), and its record says where the lr came from.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from results.record import atomic_write, exclusive

from .sample import sampler_setting

log = logging.getLogger(__name__)
MATCH = ("task", "model", "model_fingerprint", "budget", "trainable_params", "steps", "guidance",
         "ddim_steps", "object_guidance")  # a tuned entry's scope: what the objective was measured under


def yaml_lr(cfg: DictConfig) -> float:
    """The untuned learning rate: the method's paper value times the task's scale."""
    return float(cfg.method.lr) * float(cfg.task.lr_scale)


def entry_key(cfg: DictConfig, fingerprint: str, trainable: int) -> dict:
    """What a tuned lr was tuned for: task, model weights, budget, the size the budget chose, steps, and the
    sampler the objective's images came from (guidance, DDIM steps, object guidance)."""
    return {"task": f"{cfg.task.name}/{cfg.model.name}", "model": cfg.model.path, "model_fingerprint": fingerprint,
            "budget": cfg.method.get("budget"), "trainable_params": trainable, "steps": int(cfg.task.steps),
            "guidance": float(cfg.task.guidance), "ddim_steps": int(cfg.task.ddim_steps),
            "object_guidance": sampler_setting(cfg)[2]}


def read_tuned(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def learning_rate(cfg: DictConfig, fingerprint: str, trainable: int) -> tuple[float | None, str]:
    """(lr, source) for this run: the tuned entry of its method when one matches, else the yaml's value."""
    if cfg.method.name == "none":
        return None, "none"
    path = cfg.get("tuned_lrs")
    if not path:
        return yaml_lr(cfg), "yaml"
    entry = read_tuned(Path(path)).get(cfg.method.name)
    if entry is None:
        log.info("%s: no tuned learning rate in %s; using the yaml's %.3g", cfg.method.name, path, yaml_lr(cfg))
        return yaml_lr(cfg), "yaml"
    wanted = entry_key(cfg, fingerprint, trainable)
    differ = [k for k in MATCH if entry.get(k) != wanted[k]]
    if differ:
        log.warning("%s: the tuned learning rate in %s was tuned for another %s (%s, this run %s); using the yaml's "
                    "%.3g", cfg.method.name, path, "/".join(differ), [entry.get(k) for k in differ],
                    [wanted[k] for k in differ], yaml_lr(cfg))
        return yaml_lr(cfg), "yaml"
    return float(entry["lr"]), f"tuned: {path}"


def with_lr(cfg: DictConfig, lr: float | None, source: str) -> DictConfig:
    """A copy of the job config with the run's `lr` (part of the config hash) and `lr_source` (not)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.lr, cfg.lr_source = lr, source
    return cfg


def objective(task, metrics: dict, info: dict) -> float:
    """Mean of the task's objective metrics, each signed so that higher is better."""
    values = []
    for name in task.objective:
        if name not in metrics:
            raise KeyError(f"tuning objective {name!r} not among the run's metrics {sorted(metrics)}")
        values.append(metrics[name] if info[name]["higher_is_better"] else -metrics[name])
    return float(sum(values) / len(values))


def grid(low: float, high: float, n: int) -> list[float]:
    """n log-spaced points from low to high, ordered so that each next point is the farthest from those before it
    (starting at the centre), so early trials span the range and the median pruner compares like with like."""
    points = [low * (high / low) ** (i / (n - 1)) for i in range(n)] if n > 1 else [math.sqrt(low * high)]
    order = [(n - 1) // 2]
    while len(order) < n:
        order.append(max((i for i in range(n) if i not in order), key=lambda i: min(abs(i - j) for j in order)))
    return [points[i] for i in order]


def study(cfg: DictConfig, task, units: list[str], fingerprint: str, trainable: int, job_dir: Path,
          run_unit) -> float:
    """Tune this job's method: returns the best trial's objective; writes the study summary and tuned.yaml.

    `run_unit(cfg, unit, run_dir) -> record` trains and scores one unit with `cfg.lr` (bench.run)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = cfg.tune
    units = units[: spec.units] if spec.get("units") else units
    center = yaml_lr(cfg)
    low, high = center / 10 ** (spec.decades / 2), center * 10 ** (spec.decades / 2)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    opt = optuna.create_study(direction="maximize", pruner=pruner)
    for lr in grid(low, high, int(spec.trials)):
        opt.enqueue_trial({"lr": lr})
    trials = []

    def trial_fn(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", low, high, log=True)
        row = {"number": trial.number, "lr": lr, "value": None, "running": [], "state": "running", "records": []}
        trials.append(row)
        start = time.perf_counter()
        trial_cfg = with_lr(cfg, lr, f"tuning trial {trial.number}")
        try:
            for step, unit in enumerate(units):
                record = run_unit(trial_cfg, unit, job_dir / f"trial{trial.number}" / unit)
                row["records"].append(str(Path(record["_path"]).relative_to(job_dir)))
                if record["run"]["status"] != "success":  # a diverged rate is a bad rate, not a broken study
                    row["state"] = "failed: " + str(record["run"]["error"])
                    return -math.inf
                row["running"].append(objective(task, record["metrics"], record["metric_info"]))
                value = sum(row["running"]) / len(row["running"])
                trial.report(value, step)
                if step < len(units) - 1 and trial.should_prune():
                    row["state"] = f"pruned after {step + 1} of {len(units)} units"
                    raise optuna.TrialPruned()
            row["state"], row["value"] = "complete", value
            return value
        finally:
            row["seconds"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    opt.optimize(trial_fn, n_trials=int(spec.trials))
    search = {"low": low, "high": high, "yaml_lr": center, "log_uniform": True}
    return save_study(cfg, task, units, fingerprint, trainable, trials, search, time.perf_counter() - start)


def save_study(cfg: DictConfig, task, units: list[str], fingerprint: str, trainable: int, trials: list[dict],
               search: dict, seconds: float) -> float:
    """Write study-<method>.json (every trial) and the best lr into tuned.yaml; returns the best objective."""
    finished = [t for t in trials if t["value"] is not None]
    if not finished:
        raise RuntimeError(f"{cfg.method.name}: no tuning trial finished ({[t['state'] for t in trials]})")
    best = max(finished, key=lambda t: t["value"])
    summary = {
        **entry_key(cfg, fingerprint, trainable), "method": cfg.method.name, "objective": list(task.objective),
        "units": units, "split": cfg.task.get("split", "test"), "seed": cfg.seed, "search": search,
        "sampler": "log-spaced grid, spread-out order", "pruner": "median (after each unit, 3 startup trials)",
        "trials": trials, "best": {"lr": best["lr"], "value": best["value"], "number": best["number"]},
        "best_at_edge": best["lr"] in (search["low"], search["high"]), "wall_seconds": round(seconds, 1),
    }
    out = Path(cfg.tune.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    study_file = out / f"study-{cfg.method.name}.json"
    atomic_write(study_file, json.dumps(summary, indent=1))
    entry = {**entry_key(cfg, fingerprint, trainable), "lr": best["lr"], "score": round(best["value"], 4),
             "yaml_lr": search["yaml_lr"], "study": study_file.name}
    _update_yaml(out / "tuned.yaml", cfg.method.name, entry)
    log.info("%s: best lr %.3g (objective %.4f, trial %d of %d%s); %s", cfg.method.name, best["lr"], best["value"],
             best["number"], len(trials), ", at the edge of the range" if summary["best_at_edge"] else "", study_file)
    return float(best["value"])


def _update_yaml(path: Path, method: str, entry: dict) -> None:
    """Set one method's entry in tuned.yaml; parallel studies (one per method) take a lock to read-modify-write."""
    with exclusive(path.with_name(".tuned.lock")):
        data = read_tuned(path)
        data[method] = entry
        header = ("# Learning rates tuned per method on validation units (bench/tune.py), one entry per method:\n"
                  "# written by `python -m bench -m experiment=tune method=... task=...`; study-<method>.json holds\n"
                  "# every trial. A run uses an entry only where task, model weights, budget, steps and sampler match.\n")
        atomic_write(path, header + yaml.safe_dump(OmegaConf.to_container(OmegaConf.create(data)), sort_keys=True))


def summary_table(output: Path) -> str:
    """The tuned learning rates of the studies in `output` as Markdown: one row per method, with its trials."""
    import pandas as pd

    rows = []
    for method, entry in sorted(read_tuned(output / "tuned.yaml").items()):
        study = json.loads((output / entry["study"]).read_text())
        states = [t["state"].split(" ")[0].rstrip(":") for t in study["trials"]]
        rows.append({"method": method, "yaml lr": f"{entry['yaml_lr']:.3g}", "tuned lr": f"{entry['lr']:.3g}",
                     "objective": entry["score"], "trials": len(states), "pruned": states.count("pruned"),
                     "failed": states.count("failed"), "at range edge": "yes" if study["best_at_edge"] else "",
                     "minutes": round(study["wall_seconds"] / 60, 1)})
    return pd.DataFrame(rows).to_markdown(index=False) if rows else "no study finished"

