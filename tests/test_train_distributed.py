"""Multi-process training: the distributed balanced sampler and a 2-process gloo run on the CPU."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_pytorch_directml import ClassBalancedBatchSampler, make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_distributed_shares_are_disjoint_and_balanced():
    labels = [0] * 30 + [1] * 10
    samplers = [ClassBalancedBatchSampler(labels, 8, 0.5, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(samplers[0]) == len(samplers[1]) == 3  # ceil(40 / (8 · 2)): the data once in total
    seen = []
    for sampler in samplers:
        sampler.set_epoch(4)
        indices = [i for batch in sampler for i, _ in batch]
        for batch in sampler:
            assert sum(labels[i] == 0 for i, _ in batch) == 4  # class-0 fraction in every batch
        seen.append(set(indices))
    assert not seen[0] & seen[1]  # each rank its own share
    # the shares change with the epoch, identically on every rank
    again = ClassBalancedBatchSampler(labels, 8, 0.5, seed=3, rank=0, world_size=2)
    again.set_epoch(4)
    assert {i for batch in again for i, _ in batch} == seen[0]
    again.set_epoch(5)
    assert {i for batch in again for i, _ in batch} != seen[0]


def test_too_few_images_for_the_processes():
    from model_pytorch_directml import CRBLError
    with pytest.raises(CRBLError, match="class 1 images: 3 process"):
        ClassBalancedBatchSampler([0, 0, 0, 1, 1], 4, 0.5, rank=0, world_size=3)


def test_two_process_gloo_training(tmp_path):
    data = tmp_path / "data"
    make_demo_dataset(data, train_per_class=8, test_per_class=4, size=48, seed=1)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_CRBL_pytorch_directml.py"), "--data-dir", str(data),
           "--output-dir", str(out), "--device", "cpu", "--image-size", "32", "--batch-size", "4",
           "--epochs", "2", "--init", "none", "--no-augment", "--workers", "0", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 processes (DistributedDataParallel)" in proc.stdout
    assert proc.stdout.count("epoch 1:") == 1  # only rank 0 speaks
    with open(out / "history.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    checkpoint = torch.load(out / "last.pth", weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] == 2
    # 16 training images, 2 ranks × batch 4: 2 steps per rank per epoch; the loss in history
    # is over both ranks' images.
    assert np.isfinite(float(rows[-1]["train_loss"]))
    head = checkpoint["state_dict"]["head.weight"]
    assert torch.isfinite(head).all() and head.abs().sum() > 0
