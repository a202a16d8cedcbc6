"""The task registry: every task module registers itself and is found by discovery; `create` picks the micro or the
real dataset's class by `task.root`."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tasks
from tasks import registry

CONF = Path(__file__).resolve().parent.parent / "conf" / "task"


@pytest.fixture
def isolated():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_every_task_yaml_has_a_registered_task_and_every_task_a_yaml():
    assert tasks.available() == sorted(p.stem for p in CONF.glob("*.yaml"))


def test_discovery_imports_the_task_modules_only():
    found = tasks.discover()
    assert {"dreambooth", "controllable"} <= set(found)
    assert not set(found) & registry.INFRASTRUCTURE


@pytest.mark.parametrize("name", ["seg2img", "canny2img", "landmark2img", "dreambooth"])
def test_each_task_has_a_micro_and_a_real_class_under_its_name(name):
    micro, real = registry._REGISTRY[(name, False)], registry._REGISTRY[(name, True)]
    assert micro is not real and micro.name == real.name == name
    assert micro.dataset == "micro" and real.dataset != "micro"
    assert micro.objective and real.objective  # what learning-rate tuning optimises, per dataset


def test_create_picks_the_dataset_by_root_and_names_what_is_missing(isolated):
    @tasks.register("toy")
    class Toy:
        dataset = "micro"

        def __init__(self, cfg):
            self.cfg = cfg

    assert isinstance(tasks.create(OmegaConf.create({"name": "toy", "root": None})), Toy)
    with pytest.raises(tasks.TaskError, match="task.root: '/data': toy has no real dataset"):
        tasks.create(OmegaConf.create({"name": "toy", "root": "/data"}))
    with pytest.raises(tasks.TaskError, match="task.name: unknown task 'nope'; available: canny2img, dreambooth"):
        tasks.create(OmegaConf.create({"name": "nope"}))


def test_another_class_under_a_taken_name_is_an_error(isolated):
    with pytest.raises(tasks.TaskError, match="'seg2img' .* is registered twice"):
        @tasks.register("seg2img")
        class Other:
            pass
