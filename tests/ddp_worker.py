"""Run by tests/test_ddp.py under torchrun: train with the settings in argv[1] (JSON), stop
at step argv[2] (0: at the end), and save each rank's parameters as argv[3]/rank<N>.pt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lm.train import TrainConfig, Trainer, barrier, process_group

config = TrainConfig.from_dict(json.loads(sys.argv[1]))
stop_at = int(sys.argv[2]) or None
with process_group(config):
    trainer = Trainer(config, progress=False)
    trainer.train(stop_at)
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(params, Path(sys.argv[3]) / f"rank{trainer.rank}.pt")
    barrier()
    del trainer
