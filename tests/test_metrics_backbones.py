"""Backbone specs: local paths, cached hub ids, and one-line errors naming the config field."""

import pathlib
import pickle
import shutil

import pytest
from huggingface_hub import constants

from tasks.metrics.backbones import MetricBackboneError, loading, require_file, resolve_backbone

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: pathlib.Path, repo_id: str, source: pathlib.Path) -> pathlib.Path:
    """Lay `source`'s files out as the Hugging Face cache does for `repo_id` at revision main; return the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_local_path_names_the_field(tmp_path):
    missing = tmp_path / "x" / "y"
    with pytest.raises(MetricBackboneError) as err:
        resolve_backbone(str(missing), "metrics.dino")
    assert one_line(err) == f"metrics.dino: {missing} does not exist"
    assert isinstance(err.value, ValueError) and err.value.field == "metrics.dino"
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)  # survives a worker process boundary


@pytest.mark.parametrize("spec", ["./weights/dino", "../dino", "~/no-such-dir-peftbench", "a/b/c"])
def test_path_like_specs_that_do_not_exist_are_missing_paths(spec):
    with pytest.raises(MetricBackboneError) as err:
        resolve_backbone(spec, "metrics.dino")
    assert one_line(err) == f"metrics.dino: {spec} does not exist"


@pytest.mark.parametrize("spec", [None, "", "  "])
def test_no_spec_is_an_error(spec):
    with pytest.raises(MetricBackboneError, match=r"^metrics.clip: no backbone given"):
        resolve_backbone(spec, "metrics.clip")


def test_existing_path_resolves_to_its_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "dino").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_backbone("dino", "metrics.dino") == str(tmp_path / "dino")


def test_uncached_hub_id_offline_fails_at_once(offline_cache):
    with pytest.raises(MetricBackboneError) as err:
        resolve_backbone("facebook/dino-vits16", "metrics.dino")
    message = one_line(err)
    assert message.startswith("metrics.dino: facebook/dino-vits16 is neither a local path nor a hub id in the")
    assert "HF_HUB_OFFLINE=1" in message


def test_cached_hub_id_offline_resolves_to_the_snapshot(offline_cache, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    snapshot = fake_hub_cache(offline_cache, "peftbench/tiny", source)
    assert resolve_backbone("peftbench/tiny", "metrics.dino") == str(snapshot)
    with pytest.raises(MetricBackboneError, match="neither a local path"):  # cached, but not the file this loader needs
        resolve_backbone("peftbench/tiny", "metrics.clip.model_name", marker="open_clip_config.json")


def test_hub_id_online_is_passed_to_the_loader(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert resolve_backbone("facebook/dino-vits16", "metrics.dino") == "facebook/dino-vits16"


def test_require_file(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert require_file(str(weights), "metrics.clip.pretrained") == str(weights)
    with pytest.raises(MetricBackboneError, match=r"^metrics.clip.pretrained: .* is not a file$"):
        require_file(str(tmp_path), "metrics.clip.pretrained")
    with pytest.raises(MetricBackboneError, match=r"^metrics.clip.pretrained: .* does not exist$"):
        require_file(str(tmp_path / "nope.bin"), "metrics.clip.pretrained")


def test_loading_turns_a_loader_failure_into_one_line():
    with pytest.raises(MetricBackboneError) as err:
        with loading("metrics.segformer", "/models/seg"):
            raise OSError("/models/seg does not appear to have a file named config.json.\nCheckout the docs.")
    assert one_line(err) == (
        "metrics.segformer: cannot load /models/seg: /models/seg does not appear to have a file named config.json."
    )
    assert isinstance(err.value.__cause__, OSError)
