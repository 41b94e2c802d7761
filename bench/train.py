"""bench/train: what `wbs-dist train` costs over a bare PyTorch loop, same model, batch and input.

  bare    forward + backward + Adam on tensors already in memory (no loading, no checkpoints)
  train   FoldTrainer.train_epoch(): the DALI loader, padding masks, DDP-ready loss, periodic
          checkpoints, TensorBoard; samples/s of the epoch's training part (validation excluded)
Target (issue 4): overhead <= 5 %. The two are interleaved (bare, train, bare) so a busy machine
affects both alike; the bare figure is the mean of its two runs.

    .venv/bin/python bench/train.py [--model resnet18] [--store bench/out/loader/store-100.zarr]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from machine import machine  # bench/machine.py (bench scripts run from bench/ on sys.path)


def bare(model_name: str, channels: int, h: int, w: int, batch: int, steps: int) -> float:
    from wbs_dist.train.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, channels, "none", input_size=(h, w))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, channels, h, w)
    y = torch.randint(0, 2, (batch,)).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(2):                                   # warm-up
        opt.zero_grad(); loss_fn(model(x).view(-1), y).backward(); opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x).view(-1), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--store", type=Path, default=Path("bench/out/loader/store-100.zarr"),
                    help="a store with folds (bench/loader.py makes this one)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench/out/train"))
    args = ap.parse_args()
    from wbs_dist.config import Config, Size
    from wbs_dist.data.store import Store
    from wbs_dist.train.trainer import FoldTrainer

    st = Store.open(args.store)
    h, w = st.train_size
    k = int(st.root["folds"].attrs["k"])
    run_dir = tempfile.mkdtemp(prefix="wbs-bench-train-")
    cfg = Config(store=str(args.store), train_size=Size(h, w), model=args.model, weights="none",
                 epochs=1, batch_size=args.batch, folds=k, run_dir=run_dir, num_workers=0, checkpoint_every=200)
    trainer = FoldTrainer(cfg, fold=0)
    trainer.open(preemption=False)
    steps = trainer.steps_per_epoch
    rate_bare_1 = bare(args.model, trainer.train_index.channels, h, w, args.batch, steps)
    row = trainer.train_epoch()
    trainer.close()
    rate_bare_2 = bare(args.model, trainer.train_index.channels, h, w, args.batch, steps)
    rate_bare = (rate_bare_1 + rate_bare_2) / 2
    rate_train = row["samples_per_s"]
    overhead = rate_bare / rate_train - 1
    print(f"\n# bench/train on {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# {args.model}, input {trainer.train_index.channels} x {h} x {w}, batch {args.batch}, {steps} steps")
    print(f"{'':10}{'samples/s':>11}")
    print(f"{'bare':10}{rate_bare:11.2f}   (runs: {rate_bare_1:.2f}, {rate_bare_2:.2f})")
    print(f"{'train':10}{rate_train:11.2f}")
    print(f"# overhead of wbs-dist train: {100 * overhead:+.1f} % (target <= 5 %)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps({
        "machine": machine(), "model": args.model, "input": [trainer.train_index.channels, h, w],
        "batch": args.batch, "steps": steps, "bare_samples_per_s": rate_bare, "train_samples_per_s": rate_train,
        "overhead": overhead}, indent=1))


if __name__ == "__main__":
    main()
