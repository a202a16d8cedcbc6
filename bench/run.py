"""One experiment as a straight line: model -> attach method -> train -> sample -> evaluate -> record.

A Hydra job runs one (method, task, model, seed); the task splits it into units (DreamBooth: one per subject),
and each unit gets its own adapter, its own directory and its own `record.json`. A unit whose record already
says "success" with the same config hash is skipped, so a killed sweep resumes where it stopped; a unit that
fails (any exception: NaN loss, out of memory, a corrupt image naming its file, ...) is recorded as failed with its
one-line reason and the job goes on; SIGTERM/SIGINT record the unit in flight as interrupted (bench/faults.py).
The config is validated before any model loads (bench/validate.py).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import shutil
import time
import uuid
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import save_image

import methods
import results
import tasks
from results import record as records

from . import export, faults
from . import logger as loggers
from . import models, tune
from .faults import note_in_sweep
from .memory import PeakMemory
from .sample import generate
from .train import encode_examples, finetune
from .validate import UsageError, from_method_error, typed_keys
from .validate import check as check_config

log = logging.getLogger(__name__)
SWEEP_MANIFEST = "PEFTBENCH_SWEEP_MANIFEST"  # set by bench.callbacks: a file listing the records a sweep touched
VOLATILE = ("logger", "sweep_name", "cache_dir", "tuned_lrs", "lr_source", "tune", "threads")  # keys that do not change a result


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if precision not in ("fp32", "fp16", "bf16"):
        raise UsageError(f"precision: {precision!r}; allowed: fp32, fp16, bf16")
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def images_of(model, requests, cfg, device, encoder=None) -> torch.Tensor:
    """Sample the requests; with a control encoder each image is conditioned on its request's control image."""
    controls = torch.stack([r.control for r in requests]) if encoder is not None else None
    with autocast(device, cfg.precision):
        return generate(model, [r.prompt for r in requests], [r.seed for r in requests],
                        steps=cfg.task.ddim_steps, guidance=cfg.task.guidance, controls=controls, encoder=encoder)


def cached(path: Path, make):
    """torch-saved value at `path`, made once (atomic write, so a killed job leaves no half file)."""
    if path.exists():
        return torch.load(path, weights_only=True)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


def key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def model_fingerprint(model: models.Diffusion) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.unet.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(p.float().flatten()[:1024].numpy().tobytes())
    return h.hexdigest()[:16]


def run_job(cfg: DictConfig, job_dir: Path | None = None) -> float:
    """Run every unit of the task for this job's method and seed (with `tune.enabled`: the method's learning-rate
    study on the task's validation units); returns the objective, the mean over units (what sweepers optimise)."""
    job_dir = Path(job_dir or HydraConfig.get().runtime.output_dir)
    faults.install_signal_handlers()
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    try:
        check_config(cfg, overrides)  # every value, before any model loads (bench/validate.py)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        task = tasks.create(cfg.task)
        if cfg.method.name != "none" and cfg.method.name not in methods.available():
            raise UsageError(f"method.name: unknown {cfg.method.name!r}; available: {', '.join(methods.available())}")
        device = pick_device(cfg.device)
        model = models.load(cfg.model.path, device=device, name=cfg.model.name)
        units = task.units()
        info = attach_method(cfg, model.unet)  # validates the hyper-parameters before any work
        methods.detach(model.unet)
        if cfg.method.name != "none":
            if info["budget"] is not None:  # say so: the budget, not method.hparams, chose the size
                log.info("%s sized to method.budget=%d: %s, %d trainable parameters (method.budget=null: "
                         "method.hparams' size)", info["method"], info["budget"], info["hparams"],
                         info["trainable_params"])
    except (UsageError, tasks.TaskError, models.ModelNotFound, methods.MethodError) as e:
        discard_empty(job_dir)
        message = from_method_error(str(e), cfg, typed_keys(overrides)) if isinstance(e, methods.MethodError) else e
        raise UsageError(str(message)) from None
    fingerprint = model_fingerprint(model)

    def unit_record(unit_cfg: DictConfig, unit: str, run_dir: Path) -> dict:
        config = {k: v for k, v in OmegaConf.to_container(unit_cfg, resolve=True).items() if k != "hydra"}
        return records.read_record(run_unit(unit_cfg, config, task, unit, model, run_dir, job_dir))

    if cfg.get("tune") and cfg.tune.enabled:
        return tune.study(cfg, task, units, fingerprint, info["trainable_params"], job_dir, unit_record)
    lr, source = tune.learning_rate(cfg, fingerprint, info["trainable_params"])
    if cfg.method.name != "none":
        log.info("%s: lr %.3g (%s)", cfg.method.name, lr, source)
    cfg = tune.with_lr(cfg, lr, source)
    done = [unit_record(cfg, unit, job_dir / unit) for unit in units]
    scores = [tune.objective(task, r["metrics"], r["metric_info"]) for r in done if r["run"]["status"] == "success"]
    return sum(scores) / len(scores) if scores else math.nan


def attach_method(cfg, unet) -> dict:
    """Attach the configured method to the UNet's target modules; returns the registry's summary."""
    if cfg.method.name == "none":
        return {"method": "none", "variant": None, "hparams": {}, "trainable_params": 0, "stored_params": 0,
                "budget": None, "sizing": "none"}
    if cfg.method.get("module"):  # a method that lives elsewhere registers itself when imported (once)
        methods.import_module(str(cfg.method.module))
    return methods.attach(unet, cfg.method.name, target_modules=list(cfg.target_modules),
                          budget=cfg.method.get("budget"), variant=cfg.method.get("variant"),
                          **OmegaConf.to_container(cfg.method.hparams))


def discard_empty(job_dir: Path) -> None:
    """Remove a job directory that holds only Hydra's bookkeeping, so bad input leaves nothing half-written."""
    if job_dir.exists() and not any(job_dir.rglob("record.json")):
        shutil.rmtree(job_dir, ignore_errors=True)


def run_unit(cfg, config, task, unit, model, run_dir: Path, job_dir: Path) -> Path:
    # A unit's config: the job's, minus what cannot change its result; the subject list is replaced by the unit,
    # so a subject's run has the same hash whichever other subjects its job ran.
    unit_config = {k: v for k, v in config.items() if k not in VOLATILE}
    unit_config["task"] = {k: v for k, v in unit_config["task"].items() if k != "subjects"}
    unit_config["unit"] = unit
    # retrained weights under the same model.path must not be skipped as done: the weights are part of the hash
    fingerprints = {"model": model_fingerprint(model), "dataset": task.fingerprint()}
    unit_config["model"] = {**unit_config["model"], "fingerprint": fingerprints["model"]}
    config_hash = records.config_hash(unit_config)
    record_path = run_dir / "record.json"
    old = faults.previous_record(record_path)  # None when absent or unreadable (then redone, with a warning)
    if old and old["run"]["status"] == "success" and old["run"]["config_hash"] == config_hash:
        log.info("%s: already recorded (%s), skipping", unit, config_hash)
        note_in_sweep(record_path)
        return record_path
    # Whatever happens from here, the unit ends with a record: failed (any exception, with its one-line reason; the
    # job goes on) or interrupted (SIGTERM/SIGINT; then the process exits). bench/faults.py.
    stub = faults.stub_record(f"{cfg.method.name}-{unit}-s{cfg.seed}-{config_hash[:8]}", unit_config, config_hash,
                              cfg, task, unit)
    return faults.guard(record_path, stub, cleanup=lambda: methods.detach(model.unet), attempt=lambda: _attempt(
        cfg, task, unit, model, run_dir, unit_config, config_hash, fingerprints, record_path))


def _attempt(cfg, task, unit, model, run_dir, unit_config, config_hash, fingerprints, record_path) -> Path:
    device = model.device
    cache = Path(cfg.cache_dir)
    torch.manual_seed(cfg.seed)
    requests = task.eval_requests(unit, cfg.seed)
    drift_requests = task.drift_requests(cfg.seed)

    # Before fine-tuning: the base model on the same requests, without any control (cached; it is the
    # leaderboard's baseline row).
    base_key = key(fingerprints["model"], fingerprints["dataset"], [(r.prompt, r.seed) for r in requests],
                   [(r.prompt, r.seed) for r in drift_requests], cfg.task.ddim_steps, cfg.task.guidance,
                   cfg.precision, str(device))
    base_images = cached(cache / "baseline" / f"{base_key}.pt", lambda: images_of(model, requests, cfg, device))
    drift_base = cached(cache / "baseline" / f"{base_key}-drift.pt",
                        lambda: images_of(model, drift_requests, cfg, device)) if drift_requests else None
    baseline = task.score(unit, requests, base_images, None, None)
    data = task.train_set(unit)
    prior = prior_examples(cfg, data, model, cache) if cfg.method.name != "none" else None

    method_cfg = cfg.method
    summary = attach_method(cfg, model.unet)

    created = now()
    record = {
        "schema": records.SCHEMA_VERSION,
        "run": {"id": f"{method_cfg.name}-{unit}-s{cfg.seed}-{config_hash[:8]}", "status": "running", "error": None,
                "config": unit_config, "config_hash": config_hash, "seed": cfg.seed, "sweep": cfg.sweep_name,
                "created_at": created, "finished_at": None, "wall_seconds": None},
        "task": {"name": task.name, "dataset": task.dataset, "subject": unit, "model": cfg.model.name},
        "method": {"name": method_cfg.name, "variant": summary.get("variant"), "hparams": summary["hparams"],
                   "budget": summary.get("budget"), "sizing": summary.get("sizing"), "trainable_params": summary["trainable_params"],
                   "stored_params": summary["stored_params"], "adapter_bytes": 0, "lr": cfg.lr,
                   "lr_source": cfg.lr_source},
        "baseline": {"metrics": baseline.metrics},
        "meta": {**records.environment(), "model_fingerprint": fingerprints["model"],
                 "dataset_fingerprint": fingerprints["dataset"]},
    }
    records.write_record(run_dir, record)
    note_in_sweep(record_path)
    tracker = loggers.create(cfg.logger, record["run"]["id"], unit_config,
                             tags=[method_cfg.name, task.name, cfg.model.name], record=record, run_dir=run_dir)
    start = time.perf_counter()
    try:
        encoder = task.control_encoder(model)
        if method_cfg.name == "none" and encoder is None:  # the base model itself
            images, drift_adapted, train, sample_seconds = base_images, drift_base, None, 0.0
        else:  # an adapter, or with method=none the control encoder alone (its reference row)
            if encoder is not None:
                record["method"]["extra_trainable"] = {"control_encoder": sum(p.numel() for p in encoder.parameters())}
            images, drift_adapted, train, sample_seconds = train_and_sample(
                cfg, data, prior, model, requests, drift_requests, encoder, tracker)
            if method_cfg.name != "none":
                record["method"]["adapter_bytes"] = methods.save(model.unet, run_dir / "adapter")
                export.write_formats(model.unet, run_dir / "adapter")  # peft's and diffusers' formats beside it
                tracker.artifact(run_dir / "adapter", record["run"]["id"], record["method"])
        eval_start = time.perf_counter()
        scores = task.score(unit, requests, images, drift_base, drift_adapted)
        record["eval"] = {"seconds": sample_seconds + time.perf_counter() - eval_start, "images": len(images)}
        if train is not None:
            record["train"] = train
        record["metrics"], record["metric_info"] = scores.metrics, scores.info
        records.write_table(run_dir, scores.rows)
        grid = run_dir / "samples.png"
        per_row = max(1, cfg.task.images_per_prompt)
        save_image(torch.nn.functional.interpolate(images, scale_factor=max(1, 128 // images.shape[-1]),
                                                   mode="nearest"), grid, nrow=per_row * 2, padding=1)
        record["samples"] = [grid.name]
        record["run"]["status"] = "success"
        tracker.image("samples", grid)
        tracker.table("per_prompt", scores.rows)
    except Exception as e:  # any fault (divergence, out of memory, bad data naming its file, ...): the sweep goes on
        record["run"]["status"] = "failed"
        record["run"]["error"] = faults.reason(e)
        log.error("%s failed: %s", record["run"]["id"], record["run"]["error"])
    finally:
        if method_cfg.name != "none":
            methods.detach(model.unet)
    record["run"]["finished_at"] = now()
    record["run"]["wall_seconds"] = time.perf_counter() - start
    records.write_record(run_dir, record)
    tracker.summary(results.run_summary(record))  # the leaderboard's metric and cost names
    tracker.finish(failed=record["run"]["status"] != "success")
    log.info("%s: %s %s", record["run"]["id"], record["run"]["status"], record.get("metrics", ""))
    return record_path


def prior_examples(cfg, data, model, cache):
    """DreamBooth's class images: generated once by the base model (before any adapter) and cached."""
    if not data.prior_prompt:
        return None
    n = cfg.task.class_images
    class_key = key(model_fingerprint(model), data.prior_prompt, n, cfg.task.ddim_steps, cfg.task.guidance)
    class_images = cached(cache / "class_images" / f"{class_key}.pt", lambda: generate(
        model, [data.prior_prompt] * n, list(range(n)), steps=cfg.task.ddim_steps, guidance=cfg.task.guidance))
    return encode_examples(model, class_images, [data.prior_prompt] * n)


def train_and_sample(cfg, data, prior, model, requests, drift_requests, encoder, tracker):
    """Fine-tune the attached adapter (and the task's control encoder, if any) on the unit's data, then sample
    the evaluation and drift requests."""
    device = model.device
    instance = encode_examples(model, data.images, data.prompts, data.control)
    params = methods.trainable_parameters(model.unet)  # none with method=none (the control encoder alone)
    optimizers = [methods.optimizer(model.unet, lr=cfg.lr, weight_decay=cfg.method.weight_decay)] if params else []
    if encoder is not None:  # identical for every method: its own AdamW at the task's learning rate
        encoder.to(device)
        params = params + list(encoder.parameters())
        optimizers.append(torch.optim.AdamW(encoder.parameters(), lr=cfg.task.control_lr))
    with PeakMemory(device) as memory:
        result = finetune(model, instance, prior, optimizers, params, steps=cfg.task.steps,
                          batch_size=cfg.task.batch_size, seed=cfg.seed, grad_clip=cfg.task.grad_clip,
                          prior_weight=cfg.task.get("prior_weight", 1.0), precision=cfg.precision,
                          encoder=encoder, on_step=lambda step, loss: tracker.log({"loss": loss}, step=step))
    sample_start = time.perf_counter()
    images = images_of(model, requests, cfg, device, encoder)
    drift_adapted = images_of(model, drift_requests, cfg, device) if drift_requests else None
    sample_seconds = time.perf_counter() - sample_start
    stride = max(1, len(result.losses) // 200)
    train = {"steps": result.steps, "seconds": result.seconds, "peak_memory_mb": memory.mb,
             "memory_source": memory.source, "loss_first": result.losses[0], "loss_last": result.losses[-1],
             "loss_curve": result.losses[::stride]}
    return images, drift_adapted, train, sample_seconds
