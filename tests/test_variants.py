"""train_CRBL_pytorch.py / inference_CRBL_pytorch.py: the DirectML scripts' main with
--device auto limited to CUDA/ROCm > CPU."""
import importlib
import sys
import types

import pytest
import torch

VARIANTS = (("inference_CRBL_pytorch", "inference_CRBL_pytorch_directml"),
            ("train_CRBL_pytorch", "train_CRBL_pytorch_directml"))


def load_variant(name: str, base: str):
    pytest.importorskip(base)  # the DirectML script may not be written yet
    return importlib.import_module(name)


@pytest.mark.parametrize("name, base", VARIANTS)
def test_variant_passes_argv_and_cuda_first_order(monkeypatch, name, base):
    variant = load_variant(name, base)
    seen = []
    monkeypatch.setattr(variant, "directml_main", lambda argv, auto_order: seen.append((argv, auto_order)) or 7)
    assert variant.main(["--device", "auto"]) == 7
    assert seen == [(["--device", "auto"], ("cuda", "cpu"))]


@pytest.fixture(scope="module")
def tiny_checkpoint_and_image(tmp_path_factory):
    from PIL import Image
    tmp_path = tmp_path_factory.mktemp("variants")
    from model_pytorch_directml import CRBLConfig, CRBLModel, save_checkpoint
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "tiny.pth", CRBLModel(CRBLConfig(image_size=32)), threshold=0.5)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40), (120, 60, 30)).save(tmp_path / "images" / "a.png")
    return tmp_path


@pytest.mark.parametrize("module, device_kind", [("inference_CRBL_pytorch_directml", "dml"),
                                                 ("inference_CRBL_pytorch", "cpu")])
def test_auto_device_with_directml_present(monkeypatch, capsys, tiny_checkpoint_and_image, module, device_kind):
    """A (fake) DirectML device is available: the DirectML script takes it, the variant does not."""
    load_variant("inference_CRBL_pytorch", "inference_CRBL_pytorch_directml")
    fake = types.ModuleType("torch_directml")
    fake.device_count, fake.device_name = (lambda: 1), (lambda i=0: "fake DirectML GPU")
    fake.device = lambda i=0: torch.device("cpu")  # tensors really stay on the CPU
    monkeypatch.setitem(sys.modules, "torch_directml", fake)
    root = tiny_checkpoint_and_image
    code = importlib.import_module(module).main([
        "--weights", str(root / "tiny.pth"), "--input", str(root / "images"),
        "--output", str(root / f"{module}.csv"), "--workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and f"device {device_kind} (" in out
    assert (root / f"{module}.csv").is_file()
