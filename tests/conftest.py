"""Shared test fixtures: repo root on sys.path, the ../shared fixture, small helpers."""
import csv
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the clone; CRBL_SHARED_DIR points elsewhere (e.g. a copy on a GPU machine).
SHARED = Path(os.environ.get("CRBL_SHARED_DIR") or ROOT.parent / "shared")
FIXTURES = SHARED / "fixtures"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def shared_fixture():
    """Paths of the Keras reference fixture; skips cleanly in a user's clone without ../shared."""
    h5 = FIXTURES / "crbl_k2_128.weights.h5"
    ref = FIXTURES / "crbl_k2_128_reference.npz"
    if not (h5.is_file() and ref.is_file()):
        pytest.skip("../shared/fixtures not present (only CI and developers have it)")
    return h5, ref


@pytest.fixture
def converted_fixture(shared_fixture, tmp_path):
    """The Keras fixture converted at 128 px: (checkpoint path, its 8 images uint8 NHWC, Keras
    probabilities)."""
    import numpy as np
    from convert_h5_to_pth import convert
    h5, ref_path = shared_fixture
    convert(h5, tmp_path / "crbl.pth", image_size=128)
    ref = np.load(ref_path)
    return tmp_path / "crbl.pth", ref["images_uint8"], ref["prob"][:, 0]


@pytest.fixture
def fixture_pngs(converted_fixture, tmp_path):
    """converted_fixture plus its images saved as imgs/0.png ... imgs/7.png."""
    from PIL import Image
    pth, images, probs = converted_fixture
    (tmp_path / "imgs").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "imgs" / f"{i}.png")
    return pth, tmp_path / "imgs", probs


def chunk_as_on_a_gpu(monkeypatch, module) -> None:
    """Make `module`'s chunks of phi as large as on a GPU (the whole batch at once) on the CPU,
    so that path's arithmetic is tested here too."""
    import torch
    import model_pytorch_directml as mp
    chunk = mp.rows_per_chunk
    monkeypatch.setattr(module, "rows_per_chunk", lambda total, per_item, device:
                        chunk(total, per_item, torch.device("cuda")))


def read_rows(path):
    """The rows of a CSV the scripts wrote (UTF-8 with a byte-order mark) as dicts."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def recalibrated_statistics(checkpoint, argv) -> tuple[int, dict]:
    """The BatchNorm running statistics --recalibrate-bn sets for a checkpoint's weights, on the
    CPU: the training script's own calibration run again for the run that `argv` started (give
    its data and freezing flags). Returns (images used, {name: statistics})."""
    import train_CRBL_pytorch_directml as train_script
    from model_pytorch_directml import get_device, load_checkpoint, model_from_checkpoint
    args = train_script.parse_args([str(a) for a in argv])
    train_script.resolve_options(args)
    payload = load_checkpoint(checkpoint)
    model = model_from_checkpoint(payload, checkpoint)
    args.image_size = model.config.image_size
    train_script.freeze_backbones(model, args.model_type, args.trainable_from)
    model = train_script.prepare_for_training(model, get_device("cpu"))  # as training runs it
    used = train_script.calibrate_batchnorm(model, train_script.load_data(args)["train"], args,
                                            get_device("cpu"), trainable_only=True)
    return used, {k: v for k, v in model.state_dict().items()
                  if k.endswith(("running_mean", "running_var"))}
