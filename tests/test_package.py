"""Packaging promises: the core imports no Ray, the demo runs, README and CI agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_does_not_import_ray():
    code = "import sys, deqray, deqray.core, deqray.demo; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_demo_fits_and_prints_solver_statistics():
    from deqray.cli import main

    lines: list[str] = []
    import deqray.demo as demo

    result = demo.run(steps=60, pretrain_steps=10, log_every=20, print_fn=lines.append)
    text = "\n".join(lines)
    assert "fwd_steps" in text and "bwd_steps" in text and "spectral radius" in text
    assert result.final_metrics["fwd_converged"] > 0.9
    assert result.test_acc > 0.8  # 3 classes: chance is 1/3
    assert main.__module__ == "deqray.cli"


def test_cli_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "deqray.cli", "demo", "--steps", "30", "--width", "16"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert "eval: train acc" in out.stdout


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    blocks = [b.strip() for b in readme_commands()]
    assert len(blocks) == 2, blocks
    main_cmd, test_cmd = blocks
    assert "deqray" in main_cmd and "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci


def test_torch_pins_are_the_pair_that_imports_together():
    deps = re.findall(r'^\s+"([^"]+)",', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
    assert any(d.startswith("ray[default,train,tune,data]==2.60") for d in deps)
    import torch
    import torchvision

    assert torch.__version__.startswith("2.14.1")
    assert torchvision.__version__.startswith("0.29.1")
    from torchvision.ops import nms  # fails when torch and torchvision do not match

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
