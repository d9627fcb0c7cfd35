"""train_memory_pytorch_directml.py: training's memory-saving head against the reference
(BilinearPooling, Dropout, Linear): the same values and gradients, the same checkpoints."""
import pytest
import torch

import model_pytorch_directml as mp
from conftest import chunk_as_on_a_gpu
import train_memory_pytorch_directml as tm
from model_pytorch_directml import BilinearPooling, CRBLConfig, CRBLModel


@pytest.fixture(params=["cpu", "cuda"])
def chunking(request, monkeypatch):
    """Chunks of phi as on the CPU (a few MB) and as on a GPU (the whole batch)."""
    if request.param == "cuda":
        chunk_as_on_a_gpu(monkeypatch, tm)
    return request.param


def test_lean_pooling_equals_the_reference_at_full_width(chunking):
    """1280 channels: values and gradients of the in-place signed sqrt and normalisation."""
    torch.manual_seed(4)
    c = mp.NUM_FEATURES
    a = torch.randn(3, c, 2, 2, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, c, 2, 2, dtype=torch.double, requires_grad=True)
    a.data[1, 5] = 0  # phi == 0 rows: TF's gradient of sign there is 0
    g = torch.randn(3, c * c, dtype=torch.double)
    ours = tm.LeanBilinearPooling()(a, b)
    ref = BilinearPooling()(a, b)
    assert torch.allclose(ours, ref, atol=1e-12)
    for x, y in zip(torch.autograd.grad((ours * g).sum(), (a, b)),
                    torch.autograd.grad((ref * g).sum(), (a, b))):
        assert torch.allclose(x, y, atol=1e-9)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_linear_equals_dropout_then_linear(p, monkeypatch):
    """Linear(Dropout(p)(z)) with the same mask: values and all gradients."""
    torch.manual_seed(6)
    z = torch.randn(3, 50, dtype=torch.double, requires_grad=True)
    head = tm.DropoutLinear(50, 1, p=p, dtype=torch.double).train()
    masks = []
    keep = tm._keep_mask
    monkeypatch.setattr(tm, "_keep_mask", lambda *a: masks.append(keep(*a)) or masks[-1])
    ours = head(z)
    mask = masks[0].double()
    ref = torch.nn.functional.linear(z * mask / (1 - p), head.weight, head.bias)
    assert torch.allclose(ours, ref, atol=1e-12)
    g = torch.randn(3, 1, dtype=torch.double)
    params = (z, head.weight, head.bias)
    for x, y in zip(torch.autograd.grad((ours * g).sum(), params),
                    torch.autograd.grad((ref * g).sum(), params)):
        assert torch.allclose(x, y, atol=1e-12)
    assert 0 < mask.mean() < 1  # a real mask, not all kept or all dropped
    head.eval()  # no dropout outside training: the plain Linear
    assert torch.equal(head(z), torch.nn.functional.linear(z, head.weight, head.bias))


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_keep_mask_is_unbiased_and_seeded(p):
    torch.manual_seed(7)
    mask = tm._keep_mask(4, 100_003, p, torch.device("cpu"))
    assert mask.shape == (4, 100_003) and mask.dtype == torch.uint8 and mask.max() == 1
    assert abs(mask.double().mean().item() - (1 - p)) < 0.005
    # every bit position of the random bytes is used (no stuck bit in the p = 0.5 path)
    per_position = mask[:, :100_000].reshape(4, -1, 8).double().mean(dim=(0, 1))
    assert (per_position - (1 - p)).abs().max() < 0.01
    torch.manual_seed(7)
    assert torch.equal(mask, tm._keep_mask(4, 100_003, p, torch.device("cpu")))


def test_lean_head_trains_the_reference_model_and_keeps_its_checkpoint(monkeypatch):
    """use_lean_head: the same Parameters and state-dict keys, and a training step's loss and
    gradients equal the reference model's with the same dropout mask."""
    torch.manual_seed(1)
    reference = CRBLModel(CRBLConfig(image_size=64, drop_path_rate=0.0))
    reference.head.weight.data.mul_(3000)
    lean = CRBLModel(CRBLConfig(image_size=64, drop_path_rate=0.0))
    lean.load_state_dict(reference.state_dict())
    head_weight = lean.head.weight
    tm.use_lean_head(lean)
    assert lean.head.weight is head_weight and isinstance(lean.head, tm.DropoutLinear)
    assert list(lean.state_dict()) == list(reference.state_dict())
    masks = []
    keep = tm._keep_mask
    monkeypatch.setattr(tm, "_keep_mask", lambda *a: masks.append(keep(*a)) or masks[-1])
    x = torch.rand(2, 3, 64, 64)
    loss = lean.train()(x).square().sum()
    mask = masks[0].float()
    reference.train()
    ref_logits = reference.head(reference.pool(*reference.features(x)) * mask / 0.5)
    ref_loss = ref_logits.square().sum()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=0)  # float32 sums of 1280² terms
    loss.backward()
    ref_loss.backward()
    grads = {n: p.grad for n, p in lean.named_parameters()}
    overall = max(float(p.grad.abs().max()) for p in reference.parameters())
    compared = 0
    for name, p in reference.named_parameters():
        scale = float(p.grad.abs().max())
        if scale < 1e-6 * overall:  # float32 noise of cancelling terms, not a gradient
            continue
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-4 * scale, msg=name)
        compared += 1
    assert compared > 0.9 * len(grads)  # (random BatchNorms leave a few gradients at ~0)
