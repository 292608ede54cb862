"""Naming and checking tasks: every bad input is a ConfigError naming the file and key (no Ray).

User task modules are written into a temporary directory that the test puts
first on sys.path, the way a project root is.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from deqray.config import ConfigError, Experiment, load_config
from deqray.tasks import load_task, shipped_tasks
from deqray.tasks.base import missing_methods
from deqray.tasks.registry import runtime_env_for

ROOT = Path(__file__).resolve().parents[1]
DEBLUR = "examples.deblur.task:DeblurTask"

GOOD_MODULE = """
from dataclasses import dataclass
from deqray.config import DataSection
from deqray.tasks import Task

@dataclass
class MyData(DataSection):
    source: str = "mine"

class Complete(Task):
    name = "complete"
    data_section = MyData
    def model_config(self, exp): return None
    def metrics(self, exp): return []
    def plan(self, exp, batching): raise NotImplementedError
    def datasets(self, run): raise NotImplementedError
    def train_batches(self, shard, run, device): return []
    def eval_batches(self, shard, run, device): return []
    def loss(self, model, batch, state, *, pretrain, jac_loss): raise NotImplementedError
    def eval_step(self, model, batch, state, *, sradius): raise NotImplementedError
    def summarize(self, sums): return {}

class Partial(Task):
    data_section = MyData
    def model_config(self, exp): return None
    def metrics(self, exp): return []

class NotATask:
    def model_config(self, exp): return None

class BadSection(Complete):
    data_section = dict

class Refuses(Complete):
    def __init__(self):
        raise RuntimeError("needs a GPU")

not_a_class = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    pkg = tmp_path / "mytasks"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(textwrap.dedent(GOOD_MODULE))
    (pkg / "broken.py").write_text("raise ValueError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mytasks"
    for name in [m for m in sys.modules if m.startswith("mytasks")]:
        del sys.modules[name]


def test_shipped_tasks_load_by_name():
    assert shipped_tasks() == ["language_model", "image_classification", "segmentation"]
    for name in shipped_tasks():
        task = load_task(name)
        assert task.name == name and missing_methods(type(task)) == []


def test_a_complete_user_task_loads_and_its_package_is_shipped_to_ray(user_module):
    task = load_task(f"{user_module}.good:Complete")
    assert task.name == "complete"
    env = runtime_env_for(f"{user_module}.good:Complete")
    assert env == {"py_modules": [str(Path(sys.modules[user_module].__file__).parent)]}
    assert runtime_env_for("language_model") == {}


@pytest.mark.parametrize(
    "path, message",
    [
        ("mytasks.good:Partial", "does not implement the Task interface: missing plan, datasets,"),
        ("mytasks.good:NotATask", "is not a deqray.tasks.Task subclass; methods of the interface"),
        ("mytasks.good:BadSection", "data_section must be a dataclass subclassing"),
        ("mytasks.good:Refuses", "Refuses() failed: RuntimeError: needs a GPU"),
        ("mytasks.good:not_a_class", "is not a class but int"),
        ("mytasks.good:Complet", "has no 'Complet' (did you mean 'Complete'?)"),
        ("mytasks.nothere:Complete", "cannot import 'mytasks.nothere'"),
        ("mytasks.broken:Complete", "importing 'mytasks.broken' failed: ValueError: broken"),
        ("languge_model", "unknown task 'languge_model' (did you mean 'language_model'?)"),
    ],
)
def test_bad_task_names_are_clear_errors_naming_the_file(user_module, tmp_path, path, message):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"task": path, "optim": {"steps": 1}}))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    text = str(e.value)
    assert text.startswith(f"{f}: task: "), text
    assert message in text, text


def test_the_missing_methods_are_named_with_their_signatures(user_module):
    with pytest.raises(ConfigError) as e:
        load_task(f"{user_module}.good:Partial")
    text = str(e.value)
    for name in ("plan", "datasets", "train_batches", "eval_batches", "loss", "eval_step"):
        assert name in text
    assert "loss(self, model" in text  # the signature to write


def test_a_model_or_data_section_that_does_not_fit_the_task():
    exp = str(ROOT / "examples/deblur/experiment.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'model.chanels'.*did you mean 'channels'"):
        load_config(exp, ["model.chanels=8"])
    with pytest.raises(ConfigError, match=r"model.channels: expected int, got 'wide'"):
        load_config(exp, ["model.channels=wide"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.tgt_len'.*\(task examples.deblur"):
        load_config(exp, ["data.tgt_len=16"])
    with pytest.raises(ConfigError, match="data.source: this task generates its data"):
        load_config(exp, ["data.source=markov"])
    # a shipped task given another task's model or embedded data
    with pytest.raises(
        ConfigError, match="model: preset 'deq-transformer-tiny' is a deq_transformer"
    ):
        Experiment.from_dict(
            {
                "task": "image_classification",
                "model": {"preset": "deq-transformer-tiny"},
                "optim": {"steps": 1},
            }
        )
    with pytest.raises(
        ConfigError, match="the embedded 'markov' set belongs to task 'language_model'"
    ):
        Experiment.from_dict(
            {"task": "image_classification", "data": {"source": "markov"}, "optim": {"steps": 1}}
        )


def test_without_a_task_key_the_model_decides():
    def task_of(model):
        return Experiment.from_dict({"model": model, "optim": {"steps": 1}}).get_task().name

    assert task_of({}) == "language_model"  # the default
    assert task_of({"preset": "deq-transformer-wt103"}) == "language_model"
    assert task_of({"preset": "mdeq-cifar-tiny"}) == "image_classification"
    assert task_of({"preset": "mdeq-cityscapes-small"}) == "segmentation"
    assert task_of({"preset": "mdeq-cifar-tiny", "task": "segmentation"}) == "segmentation"


def test_no_branch_on_the_kind_of_task_outside_the_task_modules():
    """What knows which problem is being learned lives in deqray/tasks (and the models and
    data it joins), never in config, train or tune: the grep of the issue finds nothing."""
    import re

    pattern = re.compile(
        r"^\s*(if|elif)\b.*\b(lm|family|task\.name|task_name)\b"
        r"|\bif (not )?(lm|family)\b"
        r"|\b(lm|family)\b *[!=]="
        r"|[!=]= *\"(lm|vision|segmentation|classification|language_model|image_classification)\""
        r"|DEQTransformerConfig|MDEQConfig|\bfamily_of\b|\"family\""
    )
    hits = []
    for sub in ("config.py", "train", "tune", "cli.py", "demo.py"):
        for path in sorted((ROOT / "deqray").glob(sub if sub.endswith(".py") else f"{sub}/*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == []
