"""Run by tests/test_train.py under torchrun: one rank of a DDP fold; dumps this rank's final weights."""

import sys
from pathlib import Path

import torch

from wbs_dist.config import load_config
from wbs_dist.train.ddp import detect
from wbs_dist.train.trainer import FoldTrainer

if __name__ == "__main__":
    config, out, *overrides = sys.argv[1:]
    trainer = FoldTrainer(load_config(Path(config), overrides), fold=0)
    trainer.run()
    torch.save(trainer.model.state_dict(), Path(out) / f"rank{detect().rank}.pt")
