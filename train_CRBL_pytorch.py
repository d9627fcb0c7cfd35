"""Train or fine-tune CRBL on CUDA or ROCm (else the CPU): the DirectML script's main
with DirectML left out of --device auto. Same flags, same output folder.

    python train_CRBL_pytorch.py --demo
    python train_CRBL_pytorch.py --data-dir mvtec/bottle --output-dir runs/bottle --device rocm
"""
from train_CRBL_pytorch_directml import main as directml_main

# ROCm builds of PyTorch answer to torch.cuda too, so "cuda" covers NVIDIA and AMD (ROCm).
AUTO_ORDER = ("cuda", "cpu")


def main(argv=None) -> int:
    return directml_main(argv, auto_order=AUTO_ORDER)


if __name__ == "__main__":
    raise SystemExit(main())
