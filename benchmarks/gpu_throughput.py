"""Training throughput of the papers' presets on one GPU (bf16 autocast).

    PYTHONPATH=. python benchmarks/gpu_throughput.py --out results.json

* `deq-transformer-wt103`: tokens/s of a training step (forward, implicit
  backward, AdamW step), batch of `--lm-batch` segments of tgt_len tokens
  with memory, in pretrain mode and in DEQ mode (the preset's f_thres /
  b_thres), random tokens over the full 267,735-word vocabulary.
* `mdeq-imagenet-small`: images/s of a training step at 224 px, batch
  `--img-batch`, in pretrain and in DEQ mode.
Each figure: median over `--steps` timed steps after 3 warm-up steps, with
the peak GPU memory of the run and the solver's steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deqray.models import build


def timed_steps(step, steps):
    for _ in range(3):
        info = step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        info = step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    return statistics.median(walls), info


def lm(batch, steps):
    torch.manual_seed(0)
    model = build("deq-transformer-wt103").cuda().train()
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    L = cfg.tgt_len
    rows = []
    for pretrain in (True, False):
        mems = [None]
        torch.cuda.reset_peak_memory_stats()

        def step(pretrain=pretrain, mems=mems):
            tokens = torch.randint(0, cfg.vocab_size, (batch, L + 1), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(tokens[:, :-1], tokens[:, 1:], mems[0], pretrain=pretrain)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            mems[0] = out.mems
            return out.info

        wall, info = timed_steps(step, steps)
        m = info.metrics()
        rows.append(
            dict(
                model="deq-transformer-wt103",
                mode="pretrain" if pretrain else "deq",
                batch=batch,
                tokens_per_s=batch * L / wall,
                step_ms=wall * 1e3,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                fwd_nstep=m["fwd_nstep"],
                bwd_nstep=m.get("bwd_nstep"),
            )
        )
        print(rows[-1], flush=True)
    return rows


def vision(batch, steps):
    torch.manual_seed(0)
    model = build("mdeq-imagenet-small").cuda().train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rows = []
    for pretrain in (True, False):
        torch.cuda.reset_peak_memory_stats()

        def step(pretrain=pretrain):
            x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
            y = torch.randint(0, 1000, (batch,), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, info = model(x, pretrain=pretrain)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return info

        wall, info = timed_steps(step, steps)
        m = info.metrics()
        rows.append(
            dict(
                model="mdeq-imagenet-small",
                mode="pretrain" if pretrain else "deq",
                batch=batch,
                images_per_s=batch / wall,
                step_ms=wall * 1e3,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                fwd_nstep=m["fwd_nstep"],
                bwd_nstep=m.get("bwd_nstep"),
            )
        )
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--img-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    report["lm"] = lm(args.lm_batch, args.steps)
    torch.cuda.empty_cache()
    report["vision"] = vision(args.img_batch, args.steps)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
