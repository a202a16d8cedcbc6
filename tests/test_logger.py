"""W&B (bench/logger.py), offline: what one run per unit logs, read back from the offline run files."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bench import logger as loggers

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file (W&B's leveldb-log framing: a 7-byte file header, 32 KiB
    blocks, 7-byte record headers crc32/length/type with FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            yield record


def offline_run(folder: Path) -> dict:
    """{config, summary, group, name, artifacts} of the one offline run under `folder`."""
    files = list(folder.glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    run = {"config": {}, "summary": {}, "artifacts": {}}
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run["group"], run["name"] = r.run.run_group, r.run.display_name
            run["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            run["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "summary":
            run["summary"].update({u.key: json.loads(u.value_json) for u in r.summary.update if u.key})
        elif kind == "artifact":
            run["artifacts"][r.artifact.name] = (r.artifact.type, sorted(m.path for m in r.artifact.manifest.contents))
    return run


def test_run_config_shows_what_the_budget_chose_over_the_yaml():
    config = {"seed": 0, "method": {"name": "dora", "lr": 1e-4, "hparams": {"rank": 4, "alpha": None}}}
    record = {"run": {"id": "dora-x-s0-1", "config_hash": "abc", "sweep": "s"},
              "method": {"name": "dora", "hparams": {"rank": 3, "alpha": 3}, "budget": 100000, "sizing": "budget",
                         "trainable_params": 107184, "stored_params": 107184, "adapter_bytes": 0, "lr": 2e-4,
                         "lr_source": "tuned"}}
    shown = loggers.run_config(config, record)
    assert shown["method"]["hparams"] == {"rank": 3, "alpha": 3}
    assert shown["method"]["yaml_hparams"] == {"rank": 4, "alpha": None}
    assert (shown["method"]["lr"], shown["method"]["lr_source"]) == (2e-4, "tuned")
    assert shown["method"]["trainable_params"] == 107184 and shown["run_id"] == "dora-x-s0-1" and shown["seed"] == 0


def test_a_failing_tracker_call_is_logged_and_the_run_goes_on(caplog):
    class Broken(loggers.NullLogger):
        def log(self, values, step=None):
            raise RuntimeError("network down")

    tracker = loggers._Guarded(Broken())
    tracker.log({"loss": 1.0}, step=0)
    tracker.log({"loss": 1.0}, step=1)  # now a NullLogger: no second warning
    tracker.finish()
    assert caplog.text.count("W&B log failed (network down)") == 1


@pytest.mark.slow
def test_offline_dora_sweep_logs_the_budgets_rank_one_run_per_unit_in_its_run_directory(tmp_path):
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path / "wb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wb-data")}
    env.pop("WANDB_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "-m", "experiment=smoke", "method=dora",
                           "method.budget=100000", "logger=wandb", "sweep_name=wandbtest",
                           f"cache_dir={tmp_path}/cache"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "wandb").exists()  # not the current directory
    records = sorted((tmp_path / "multirun").rglob("record.json"))
    assert len(records) == 2  # the smoke preset's two units: one W&B run each, in its own run directory
    for path in records:
        record = json.loads(path.read_text())
        assert record["run"]["status"] == "success"
        assert record["method"]["hparams"]["rank"] == 3  # the budget's choice; the yaml says 4
        run = offline_run(path.parent / "wandb")
        assert run["name"] == record["run"]["id"] and run["group"] == "wandbtest"
        method = run["config"]["method"]
        assert method["hparams"] == record["method"]["hparams"] and method["yaml_hparams"]["rank"] == 4
        for key in ("budget", "sizing", "trainable_params", "stored_params", "lr", "lr_source"):
            assert method[key] == record["method"][key], key
        assert run["config"]["run_id"] == record["run"]["id"] and run["config"]["sweep"] == "wandbtest"
        for metric, value in record["baseline"]["metrics"].items():
            assert run["summary"][f"baseline/{metric}"] == value
        for metric, value in record["metrics"].items():
            assert run["summary"][metric] == value
        assert run["summary"]["trainable_params"] == record["method"]["trainable_params"]
        kind, files = run["artifacts"][f"adapter-{record['run']['id']}"]
        assert kind == "model"
        assert {"adapter.json", "adapter.safetensors", "peft/adapter_config.json",
                "diffusers/pytorch_lora_weights.safetensors"} <= set(files)
