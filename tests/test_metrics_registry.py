"""The metric registry: directions, JSON-serialisable metadata, registration rules; no import of bench."""

import ast
import dataclasses
import json
import pathlib

import pytest

import tasks.metrics as metrics
from tasks.metrics import METRICS, MetricInfo, register_metric

PAPER_METRICS = {
    "dino": True,
    "clip_i": True,
    "clip_t": True,
    "lpips_diversity": True,
    "drift": False,
    "fid": False,
    "mIoU": True,
    "mAcc": True,
    "aAcc": True,
    "edge_IoU": True,
    "edge_F1": True,
    "landmark_error": False,
}


def test_registry_holds_the_papers_metrics_with_their_direction():
    assert {name: METRICS[name].higher_is_better for name in PAPER_METRICS} == PAPER_METRICS


def test_metric_info_round_trips_through_json():
    records = {name: dataclasses.asdict(info) for name, info in METRICS.items()}
    assert {name: MetricInfo(**fields) for name, fields in json.loads(json.dumps(records)).items()} == METRICS


def test_register_metric_adds_an_analogue_and_rejects_conflicts(monkeypatch):
    monkeypatch.setattr(metrics, "METRICS", dict(METRICS))
    info = MetricInfo(True, "fraction of subject attributes read back", analogue_of="dino")
    assert register_metric("example_subject_fidelity", info) is info
    assert metrics.METRICS["example_subject_fidelity"] == info
    same = MetricInfo(True, "fraction of subject attributes read back", None, "dino")
    register_metric("example_subject_fidelity", same)  # the same info again: a no-op
    with pytest.raises(ValueError, match="example_subject_fidelity: metric already registered"):
        register_metric("example_subject_fidelity", MetricInfo(False, "fraction of subject attributes read back"))
    with pytest.raises(ValueError, match="analogue_of='nope' is not a registered metric"):
        register_metric("micro_other", MetricInfo(True, "x", analogue_of="nope"))
    with pytest.raises(ValueError, match="expected a MetricInfo"):
        register_metric("micro_dict", {"higher_is_better": True})
    assert "example_subject_fidelity" not in METRICS  # the real registry was untouched


def test_metrics_package_never_imports_bench():
    package = pathlib.Path(metrics.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name == "bench" or name.startswith("bench.") for name in names), source.name
