"""One experiment as a straight line: load -> attach -> baseline -> train -> evaluate -> write.

A Hydra job runs one (method, task, model, seed); the task splits it into units (DreamBooth: one per subject),
and each unit gets its own adapter, its own directory and its own `record.json`. A unit whose record already
says "success" with the same config hash is skipped, so a killed sweep resumes where it stopped; a unit that
fails (any exception: NaN loss, out of memory, a corrupt image naming its file, ...) is recorded as failed with its
one-line reason and the job goes on; SIGTERM/SIGINT record the unit in flight as interrupted (bench/faults.py).
The config is validated before any model loads (bench/validate.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

import methods
import results
import tasks
from results import record as records

from . import device as devices
from . import faults
from . import logger as loggers
from . import method as run_method
from . import models, tune
from .faults import note_in_sweep
from .memory import PeakMemory
from .attention import ObjectGuidance
from .sample import generate, sampler_setting
from .train import encode_examples, finetune
from .validate import UsageError, from_method_error, typed_keys
from .validate import check as check_config

log = logging.getLogger(__name__)
VOLATILE = ("logger", "sweep_name", "cache_dir", "tuned_lrs", "lr_source", "tune", "threads")  # keys that do not change a result


@dataclass
class Job:
    """What every unit of a job shares: its config, the task, the loaded model and the method."""
    cfg: DictConfig
    task: tasks.Task
    model: models.Diffusion
    method: run_method.AdapterMethod | run_method.NoMethod
    fingerprint: str  # of the model's weights: retrained weights under the same path are another config
    data_fingerprint: str  # of the task's data (DreamBench: its images), hashed once per job
    job_dir: Path


@dataclass
class Baseline:
    """The base model on a unit's requests: the leaderboard's "before fine-tuning" row and the drift reference."""
    images: torch.Tensor
    drift_images: torch.Tensor | None
    metrics: dict


def run_job(cfg: DictConfig, job_dir: Path | None = None) -> float:
    """Run every unit of the task for this job's method and seed (with `tune.enabled`: the method's learning-rate
    study on the task's validation units); returns the objective, the mean over units (what sweepers optimise)."""
    job_dir = Path(job_dir or HydraConfig.get().runtime.output_dir)
    faults.install_signal_handlers()
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    job, trainable = load(cfg, job_dir, overrides)

    def unit_record(unit_cfg: DictConfig, unit: str, run_dir: Path) -> dict:
        return run_unit(replace(job, cfg=unit_cfg), unit, run_dir)

    units = job.task.units()
    if cfg.get("tune") and cfg.tune.enabled:
        return tune.study(cfg, job.task, units, job.fingerprint, trainable, job_dir, unit_record)
    lr, source = tune.learning_rate(cfg, job.fingerprint, trainable)
    if job.method.trains_adapter:
        log.info("%s: lr %.3g (%s)", cfg.method.name, lr, source)
    cfg = tune.with_lr(cfg, lr, source)
    done = [unit_record(cfg, unit, job_dir / unit) for unit in staggered(units)]
    scores = [tune.objective(job.task, r["metrics"], r["metric_info"]) for r in done if r["run"]["status"] == "success"]
    return sum(scores) / len(scores) if scores else math.nan


def load(cfg: DictConfig, job_dir: Path, overrides: list[str]) -> tuple[Job, int]:
    """Validate the config, build the task, load the model and check that the method attaches (then detach it);
    returns the job and the method's trainable-parameter count. Bad input is one UsageError line, and the job
    directory is removed when nothing was recorded in it."""
    try:
        check_config(cfg, overrides)  # every value, before any model loads (bench/validate.py)
        jobs = parallel_jobs()
        torch.set_num_threads(devices.threads(cfg.get("threads"), jobs))
        log.info("torch threads: %d (threads=%s, %d job(s) side by side)", torch.get_num_threads(), cfg.get("threads"),
                 jobs)
        task = tasks.create(cfg.task)
        method = run_method.for_config(cfg)
        model = models.load(cfg.model.path, device=devices.pick(cfg.device), name=cfg.model.name)
        summary = method.attach(model.unet)  # validates the hyper-parameters before any work
        method.detach(model.unet)
        method.describe(summary)
    except (UsageError, tasks.TaskError, models.ModelNotFound, methods.MethodError) as e:
        discard_empty(job_dir)
        message = from_method_error(str(e), cfg, typed_keys(overrides)) if isinstance(e, methods.MethodError) else e
        raise UsageError(str(message)) from None
    job = Job(cfg, task, model, method, model_fingerprint(model), task.fingerprint(), job_dir)
    return job, summary["trainable_params"]


def staggered(units: list[str]) -> list[str]:
    """The units starting at the k-th for the sweep's k-th job: jobs that run side by side then start on different
    units, and each samples its first unit's baseline instead of all of them waiting for one job to sample it."""
    k = OmegaConf.select(HydraConfig.get(), "job.num", default=0) if HydraConfig.initialized() else 0
    k = (k or 0) % max(1, len(units))
    return units[k:] + units[:k]


def parallel_jobs() -> int:
    """How many jobs of this sweep run side by side on this machine: the local launcher's n_jobs, else 1."""
    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    return int(launcher.get("n_jobs") or 1) if "joblib" in str(launcher.get("_target_", "")).lower() else 1


def discard_empty(job_dir: Path) -> None:
    """Remove a job directory that holds only Hydra's bookkeeping, so bad input leaves nothing half-written."""
    if job_dir.exists() and not any(job_dir.rglob("record.json")):
        shutil.rmtree(job_dir, ignore_errors=True)


def model_fingerprint(model: models.Diffusion) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.unet.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(p.float().flatten()[:1024].numpy().tobytes())
    return h.hexdigest()[:16]


def unit_config(job: Job, unit: str) -> dict:
    """A unit's config: the job's, minus what cannot change its result, with the unit in place of the subject list
    (a subject's run has the same hash whichever other subjects its job ran) and the model's weight fingerprint."""
    config = {k: v for k, v in OmegaConf.to_container(job.cfg, resolve=True).items()
              if k != "hydra" and k not in VOLATILE}
    config["task"] = {k: v for k, v in config["task"].items() if k != "subjects"}
    config["unit"] = unit
    config["model"] = {**config["model"], "fingerprint": job.fingerprint}
    return config


def run_unit(job: Job, unit: str, run_dir: Path) -> dict:
    """One unit, start to record; returns its record. Skipped when a successful record of the same config exists.
    Whatever happens, the unit ends with a record: failed (any exception, with its one-line reason; the job goes on)
    or interrupted (SIGTERM/SIGINT; then the process exits). bench/faults.py."""
    config = unit_config(job, unit)
    config_hash = records.config_hash(config)
    record_path = run_dir / records.RECORD_NAME
    old = faults.previous_record(record_path)  # None when absent or unreadable (then redone, with a warning)
    if old and old["run"]["status"] == "success" and old["run"]["config_hash"] == config_hash:
        log.info("%s: already recorded (%s), skipping", unit, config_hash)
        note_in_sweep(record_path)
        return old
    cfg = job.cfg
    run = records.RunPart(f"{cfg.method.name}-{unit}-s{cfg.seed}-{config_hash[:8]}", config, config_hash, cfg.seed,
                          cfg.sweep_name)
    part = records.TaskPart(job.task.name, getattr(job.task, "dataset", None), unit, cfg.model.name)
    stub = records.new_record(run, part, {"name": cfg.method.name})
    faults.guard(record_path, stub, cleanup=lambda: job.method.detach(job.model.unet),
                 attempt=lambda: attempt(job, unit, run_dir, stub))
    return records.read_record(record_path)


def attempt(job: Job, unit: str, run_dir: Path, stub: dict) -> None:
    """baseline -> attach -> train -> evaluate -> write; an exception propagates to faults.guard, which completes
    the running record as failed (or interrupted) after detaching the method."""
    cfg, model = job.cfg, job.model
    torch.manual_seed(cfg.seed)
    requests, drift_requests = job.task.eval_requests(unit, cfg.seed), job.task.drift_requests(cfg.seed)
    baseline = sample_baseline(job, unit, requests, drift_requests)
    data = job.task.train_set(unit)
    prior = prior_examples(job, data) if job.method.trains_adapter else None
    summary = job.method.attach(model.unet)
    record = {**stub, "run": dict(stub["run"]), "method": method_part(cfg, summary),
              "baseline": {"metrics": baseline.metrics},
              "meta": {**records.environment(), "model_fingerprint": job.fingerprint,
                       "dataset_fingerprint": job.data_fingerprint}}
    records.write_record(run_dir, record)
    note_in_sweep(run_dir / records.RECORD_NAME)
    tracker = loggers.create(cfg.logger, record["run"]["id"], record["run"]["config"],
                             tags=[cfg.method.name, job.task.name, cfg.model.name], record=record, run_dir=run_dir)
    start = time.perf_counter()
    try:
        images, drift_images, sample_seconds = train(job, record, data, prior, requests, drift_requests, baseline,
                                                     tracker)
        if job.method.trains_adapter:
            record["method"]["adapter_bytes"] = job.method.save(model.unet, run_dir / "adapter")
            tracker.artifact(run_dir / "adapter", record["run"]["id"], record["method"])
        evaluate(job, unit, record, requests, images, baseline.drift_images, drift_images, sample_seconds, run_dir,
                 tracker)
        write(record, run_dir, start, tracker)
    finally:  # the tracker gets its summary (in write) before it is finished
        job.method.detach(model.unet)
        tracker.finish(failed=record["run"]["status"] != "success")


def method_part(cfg: DictConfig, summary: dict) -> dict:
    """The record's `method`: the registry's summary of what was attached (sizes as resolved) and the lr used."""
    return {"name": cfg.method.name, **{k: summary.get(k) for k in ("variant", "hparams", "budget", "sizing")},
            "trainable_params": summary["trainable_params"], "stored_params": summary["stored_params"],
            "adapter_bytes": 0, "lr": cfg.lr, "lr_source": cfg.lr_source}


def sample_baseline(job: Job, unit: str, requests, drift_requests) -> Baseline:
    """The base model on the unit's requests, without any control (cached per weights, data and sampler). The drift
    requests are the same for every unit, so their images are sampled once per sweep, not once per unit."""
    cfg, model = job.cfg, job.model
    sampler = (*sampler_setting(cfg), cfg.precision, str(model.device))
    cache = Path(cfg.cache_dir) / "baseline"
    base_key = key(job.fingerprint, job.data_fingerprint, [(r.prompt, r.seed) for r in requests], *sampler)
    images = cached(cache / f"{base_key}.pt", lambda: images_of(model, requests, cfg))
    drift_key = key(job.fingerprint, [(r.prompt, r.seed) for r in drift_requests], *sampler)
    drift = cached(cache / f"{drift_key}-drift.pt", lambda: images_of(model, drift_requests, cfg)) \
        if drift_requests else None
    return Baseline(images, drift, job.task.score(unit, requests, images, None, None).metrics)


def train(job: Job, record: dict, data, prior, requests, drift_requests, baseline: Baseline, tracker):
    """Fine-tune the attached adapter (and the task's control encoder, if any) on the unit's data, then sample the
    evaluation and drift requests; returns (images, drift images, sampling seconds). With `method=none` and no
    control encoder there is nothing to train: the base model's images are the run's."""
    cfg, model = job.cfg, job.model
    encoder = job.task.control_encoder(model)
    if not job.method.trains_adapter and encoder is None:
        return baseline.images, baseline.drift_images, 0.0
    if encoder is not None:
        record["method"]["extra_trainable"] = {"control_encoder": sum(p.numel() for p in encoder.parameters())}
    instance = encode_examples(model, data.images, data.prompts, data.control)
    params, optimizers = make_optimizers(cfg, model, encoder)
    with PeakMemory(model.device) as memory:
        result = finetune(model, instance, prior, optimizers, params, steps=cfg.task.steps,
                          batch_size=cfg.task.batch_size, seed=cfg.seed, grad_clip=cfg.task.grad_clip,
                          prior_weight=cfg.task.get("prior_weight", 1.0), precision=cfg.precision,
                          encoder=encoder, on_step=lambda step, loss: tracker.log({"loss": loss}, step=step))
    stride = max(1, len(result.losses) // 200)
    record["train"] = {"steps": result.steps, "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
                       "peak_memory_mb": memory.mb,
                       "memory_source": memory.source, "loss_first": result.losses[0],
                       "loss_last": result.losses[-1], "loss_curve": result.losses[::stride]}
    sample_start = time.perf_counter()
    if encoder is None:  # one pass for both: a micro sampling step costs per UNet call more than per image
        both = images_of(model, requests + drift_requests, cfg)
        images, drift_images = both[:len(requests)], both[len(requests):] if drift_requests else None
    else:  # the drift requests are sampled without the control
        images = images_of(model, requests, cfg, encoder)
        drift_images = images_of(model, drift_requests, cfg) if drift_requests else None
    return images, drift_images, time.perf_counter() - sample_start


def make_optimizers(cfg: DictConfig, model, encoder) -> tuple[list, list]:
    """(trainable parameters, optimisers): the registry's optimiser over the adapter at `cfg.lr` (with the
    method's `lr_multipliers`), and a control encoder's own AdamW at the task's lr, identical for every method."""
    params = methods.trainable_parameters(model.unet)  # none with method=none (the control encoder alone)
    multipliers = OmegaConf.to_container(cfg.method.lr_multipliers) if cfg.method.get("lr_multipliers") else None
    optimizers = [methods.optimizer(model.unet, lr=cfg.lr, weight_decay=cfg.method.weight_decay,
                                    lr_multipliers=multipliers)] if params else []
    if encoder is not None:
        encoder.to(model.device)
        params = params + list(encoder.parameters())
        optimizers.append(torch.optim.AdamW(encoder.parameters(), lr=cfg.task.control_lr))
    return params, optimizers


def evaluate(job: Job, unit: str, record: dict, requests, images, drift_base, drift_images, sample_seconds: float,
             run_dir: Path, tracker) -> None:
    """Score the samples with the task's metrics; write the per-prompt table and the sample grid."""
    eval_start = time.perf_counter()
    scores = job.task.score(unit, requests, images, drift_base, drift_images)
    record["eval"] = {"seconds": sample_seconds + time.perf_counter() - eval_start, "images": len(images)}
    record["metrics"], record["metric_info"] = scores.metrics, scores.info
    records.write_table(run_dir, scores.rows)
    grid = run_dir / "samples.png"
    per_row = max(1, job.cfg.task.images_per_prompt)
    save_image(torch.nn.functional.interpolate(images, scale_factor=max(1, 128 // images.shape[-1]),
                                               mode="nearest"), grid, nrow=per_row * 2, padding=1)
    record["samples"] = [grid.name]
    record["run"]["status"] = "success"
    tracker.image("samples", grid)
    tracker.table("per_prompt", scores.rows)


def write(record: dict, run_dir: Path, start: float, tracker) -> None:
    record["run"]["finished_at"] = records.now()
    record["run"]["wall_seconds"] = time.perf_counter() - start
    records.write_record(run_dir, record)
    tracker.summary(results.run_summary(record))  # the leaderboard's metric and cost names
    log.info("%s: %s %s", record["run"]["id"], record["run"]["status"], record.get("metrics", ""))


def images_of(model, requests, cfg, encoder=None) -> torch.Tensor:
    """Sample the requests; with a control encoder each image is conditioned on its request's control image."""
    controls = torch.stack([r.control for r in requests]) if encoder is not None else None
    with devices.autocast(model.device, cfg.precision):
        return generate(model, [r.prompt for r in requests], [r.seed for r in requests], steps=cfg.task.ddim_steps,
                        guidance=cfg.task.guidance, controls=controls, encoder=encoder,
                        object_guidance=ObjectGuidance.from_config(cfg.task.get("object_guidance")))


def prior_examples(job: Job, data):
    """DreamBooth's class images: generated once by the base model (before any adapter) and cached."""
    if not data.prior_prompt:
        return None
    cfg, model, n = job.cfg, job.model, job.cfg.task.class_images
    class_key = key(job.fingerprint, data.prior_prompt, n, *sampler_setting(cfg))
    class_images = cached(Path(cfg.cache_dir) / "class_images" / f"{class_key}.pt", lambda: generate(
        model, [data.prior_prompt] * n, list(range(n)), steps=cfg.task.ddim_steps, guidance=cfg.task.guidance,
        object_guidance=ObjectGuidance.from_config(cfg.task.get("object_guidance"))))
    return encode_examples(model, class_images, [data.prior_prompt] * n)


def key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def cached(path: Path, make):
    """torch-saved value at `path`, made once (written atomically, so a killed job leaves no half file). Jobs that
    run side by side need the same base-model samples at the same time: a lock lets one make them while the others
    wait for the file instead of sampling it again."""
    if not path.exists():
        with records.exclusive(path.with_name(f".{path.name}.lock")):
            if not path.exists():
                value = make()
                buffer = io.BytesIO()
                torch.save(value, buffer)
                records.atomic_write(path, buffer.getvalue())
                return value  # the maker does not read back what it just wrote
    return torch.load(path, weights_only=True)
