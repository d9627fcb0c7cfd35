"""CUDA/ROCm: parity with CPU and Keras, mixed precision, training and inference on the GPU.

Skipped without a GPU (CI has none). On a GPU machine, with ../shared beside the clone or
CRBL_SHARED_DIR pointing at a copy:  python -m pytest -q -s tests/test_cuda.py
"""
import csv

import numpy as np
import pytest
import torch

import inference_CRBL_pytorch_directml as inference
import model_pytorch_directml as M
import train_CRBL_pytorch_directml as train_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA/ROCm GPU")


def probs(model, images_uint8: np.ndarray, device, amp: bool = False) -> np.ndarray:
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(255).to(device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        return torch.sigmoid(model(x)).float().flatten().cpu().numpy()


def test_gpu_float32_matches_cpu_and_keras(converted_fixture):
    pth, images, keras = converted_fixture
    device = M.get_device("cuda")
    cpu = probs(M.load_model(pth, "cpu"), images, "cpu")
    model = M.load_model(pth, device.device)
    assert model.channels_last
    gpu = probs(model, images, device.device)
    amp = probs(model, images, device.device, amp=True)
    torch.backends.cudnn.allow_tf32 = True  # what torch does by default, for the record
    try:
        tf32 = probs(model, images, device.device)
    finally:
        torch.backends.cudnn.allow_tf32 = False
    print(f"\n{device}: max |dprob| float32 GPU vs CPU {np.abs(gpu - cpu).max():.2e}, "
          f"vs Keras {np.abs(gpu - keras).max():.2e}; TF32 convolutions vs Keras "
          f"{np.abs(tf32 - keras).max():.2e}; AMP float16 vs Keras {np.abs(amp - keras).max():.2e}")
    assert np.abs(gpu - cpu).max() <= 1e-4 and np.abs(gpu - keras).max() <= 1e-4
    # Mixed precision is the opt-in speed mode: close, not bit-level parity; never NaN.
    assert np.isfinite(amp).all() and np.abs(amp - keras).max() <= 2e-2


def training_step(pth, device: str, dtype: torch.dtype, images: np.ndarray) -> list[torch.Tensor]:
    """Loss and gradients (head, two trainable backbone convs) of one crop-model step, dropout
    off (its masks differ per device), every op in `dtype` (the float32 head bypassed for
    the float64 reference)."""
    model = M.load_model(pth, device).to(dtype)
    M.freeze_backbones(model, "crop")
    model.eval()  # frozen BN as in training, dropout off; gradients still flow
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device, dtype).div(255)
    labels = torch.tensor([0.0, 1.0] * (len(images) // 2), device=device, dtype=torch.float64)
    loss = train_script.crbl_loss(model.head(model.pool(*model.features(x))).double(), labels,
                                  0.125, train_script.class_weights_from_prior(0.88))
    loss.backward()
    params = (model.head.weight, model.backbone1.body.conv_head.weight,
              model.backbone2.body.blocks[6][0].conv_pw.weight)
    return [loss.detach().cpu()] + [p.grad.double().cpu() for p in params]


def test_gpu_training_step_matches_cpu(converted_fixture):
    """Loss and head gradient: GPU within 1e-4 of the CPU. Backbone gradients pass through the
    signed square root, whose derivative 1/(2·sqrt(|phi| + 1e-12)) magnifies rounding near
    phi = 0 on any device (CPU float32 is ~10% off float64 there): the GPU must be no further
    from a float64 reference than the CPU's own float32."""
    pth, images, _ = converted_fixture
    ref = training_step(pth, "cpu", torch.float64, images)
    cpu = training_step(pth, "cpu", torch.float32, images)
    gpu = training_step(pth, "cuda", torch.float32, images)
    for i, (r, c, g) in enumerate(zip(ref, cpu, gpu)):
        err_cpu, err_gpu = ((c - r).norm() / r.norm()).item(), ((g - r).norm() / r.norm()).item()
        print(f"\ntensor {i}: relative L2 error vs float64: CPU {err_cpu:.1e}, GPU {err_gpu:.1e}")
        if i < 2:  # loss, head gradient
            assert (g - c).abs().max().item() <= 1e-4 * max(c.abs().max().item(), 1.0)
        assert err_gpu <= 2 * err_cpu + 1e-5


def test_demo_trains_with_amp_and_inference_runs_fp16(tmp_path, capsys):
    out = tmp_path / "demo"
    assert train_script.main(["--demo", "--output-dir", str(out), "--device", "cuda", "--amp",
                              "--no-progress"]) == 0
    with open(out / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert all(np.isfinite(float(row["train_loss"])) for row in history)
    assert max(float(row["val_auroc"]) for row in history) >= 0.8
    capsys.readouterr()
    preds = tmp_path / "preds.csv"
    assert inference.main(["--weights", str(out / "best.pth"), "--input", str(out / "data" / "test.csv"),
                           "--output", str(preds), "--device", "cuda", "--fp16", "--no-progress"]) == 0
    assert "cuda" in capsys.readouterr().out
    with open(preds, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["score"] and not r["error"] for r in rows)


def test_fixture_pngs_through_the_script_on_gpu(fixture_pngs, tmp_path):
    pth, imgs, keras = fixture_pngs
    for extra, tolerance in (([], 1e-4), (["--fp16"], 2e-2)):
        out = tmp_path / f"preds{len(extra)}.csv"
        assert inference.main(["--weights", str(pth), "--input", str(imgs),
                               "--output", str(out), "--device", "cuda", "--batch-size", "4",
                               "--no-progress", *extra]) == 0
        with open(out, newline="", encoding="utf-8-sig") as f:
            scores = np.array([float(r["score"]) for r in csv.DictReader(f)])
        assert np.abs(scores - keras).max() <= tolerance
