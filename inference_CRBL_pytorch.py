"""Score images with a CRBL checkpoint on CUDA or ROCm (else the CPU): the DirectML script's main
with DirectML left out of --device auto. Same flags, same outputs.

    python inference_CRBL_pytorch.py --weights runs/demo/best.pth --input runs/demo/data/test.csv --output runs/demo/preds.csv
    python inference_CRBL_pytorch.py --weights crbl.pth --input photos/ --device rocm
"""
from inference_CRBL_pytorch_directml import main as directml_main

# ROCm builds of PyTorch answer to torch.cuda too, so "cuda" covers NVIDIA and AMD (ROCm).
AUTO_ORDER = ("cuda", "cpu")


def main(argv=None) -> int:
    return directml_main(argv, auto_order=AUTO_ORDER)


if __name__ == "__main__":
    raise SystemExit(main())
