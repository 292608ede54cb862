"""Training throughput of the reference-size presets under Ray Train on one GPU.

    PYTHONPATH=. python benchmarks/gpu_train.py --out gpu_train.json

Runs `deqray.train.fit` (one worker, one GPU, bf16 autocast) for
`deq-transformer-wt103` (batch 14 x 150 tokens, the released script's
per-GPU batch) and `mdeq-imagenet-small` (batch 32 at 224 px, per GPU), on
embedded data of the right shape: a Markov corpus over the full 267,735-word
vocabulary, and the digits upsampled to 224 px (throughput does not depend
on what the pixels show). Each run takes `--steps` steps: the first half
pretraining, the second half DEQ mode, with a report at the end of each,
and the figures are each interval's tokens/s or images/s as the loop
measured them (optimiser steps only) and from the report timestamps
(everything, data included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile


def run(name, overrides, steps, root):
    from deqray.train.driver import fit, read_metrics

    half = steps // 2
    result = fit(
        {"optim": {"steps": steps}},
        [
            *overrides,
            f"optim.steps={steps}",
            f"train.pretrain_steps={half}",
            f"train.eval_every={half}",
            "train.eval_batches=2",
            "train.log_every=10",
            f"data.cache={root}/data",
            "scaling.gpus_per_worker=1",
        ],
        workers=1,
        storage=f"{root}/runs",
        verbose=True,
    )
    rows = read_metrics(result.path)
    out = {"status": result.return_value["status"]}
    for row, phase in zip(rows, ("pretrain", "deq"), strict=False):
        out[phase] = {
            "items_per_s": row["items_per_s"],
            "step_time_s": row["step_time"],
            "fwd_nstep": row.get("fwd_nstep"),
            "bwd_nstep": row.get("bwd_nstep"),
        }
    if len(rows) == 2:
        items = steps - half
        per_step = rows[1]["items_per_s"] * rows[1]["step_time"]
        out["deq"]["wall_items_per_s"] = items * per_step / (rows[1]["time"] - rows[0]["time"])
    print(name, json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="gpu_train.json")
    args = ap.parse_args()
    import ray
    import torch

    root = tempfile.mkdtemp(prefix="deqray-gpu-train-")
    ray.init(include_dashboard=False)
    try:
        results = {
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "lm": run(
                "deq-transformer-wt103",
                [
                    "model.preset=deq-transformer-wt103",
                    "data.source=markov",
                    "data.options={vocab_size: 267735, tokens: 3000000}",
                    "data.tgt_len=150",
                    "optim.batch_size=14",
                    "optim.lr=0.00025",
                    "optim.clip_grad_norm=0.25",
                ],
                args.steps,
                root,
            ),
            "vision": run(
                "mdeq-imagenet-small",
                [
                    "model.preset=mdeq-imagenet-small",
                    "data.source=digits",
                    "data.image_size=224",
                    "data.decode_actors=4",
                    "optim.batch_size=32",
                    "optim.name=sgd",
                    "optim.lr=0.05",
                ],
                args.steps,
                root,
            ),
        }
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop("RAY_ADDRESS", None)


if __name__ == "__main__":
    main()
