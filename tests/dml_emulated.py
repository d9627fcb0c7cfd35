"""Run CRBL code on the emulated DirectML device (../shared/dml) and write what ran, phase by
phase, to a JSON file: the ops DirectML would send to the CPU and the device->host transfers.

Runs under torch 2.4.1 (torch-directml's pin) with ../shared/dml/stub first on PYTHONPATH;
tests/test_directml_emulated.py starts it so, in a subprocess:

    python tests/dml_emulated.py OUT.json script train_CRBL_pytorch_directml.py --demo --device dml
    python tests/dml_emulated.py OUT.json step CRBL.pth IMAGES.npz crop
    python tests/dml_emulated.py OUT.json fallback-notice
    python tests/dml_emulated.py OUT.json --drop-bn-update script train_CRBL_pytorch_directml.py ...
    python tests/dml_emulated.py OUT.json --cpu-fallback softplus.out script setup_amd_gpu_directml.py --check

A phase is a call of one of the scripts' functions named in PHASES; everything else counts under
"none". --drop-bn-update makes the device's BatchNorm drop its running-statistics update
(microsoft/DirectML #364); --cpu-fallback OP takes OP's DirectML kernel away, as a torch-directml
release without it would.
"""
from __future__ import annotations

import collections
import copy
import functools
import importlib
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch_directml  # noqa: E402  (the emulator: the stub must be first on PYTHONPATH)
import fakedml  # noqa: E402  (loaded by the stub)

PHASES = {
    "train_CRBL_pytorch_directml": ("calibrate_batchnorm", "train_one_epoch", "validate",
                                    "choose_threshold", "save_checkpoint"),
    "inference_CRBL_pytorch_directml": ("load_model", "prepare_for_inference", "score_to_csv"),
    "setup_amd_gpu_directml": ("run_crbl",),
}
CALLS = collections.Counter()


def in_phase(name: str, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        CALLS[name] += 1
        outer, fakedml.REC.phase = fakedml.REC.phase, name
        try:
            return fn(*args, **kwargs)
        finally:
            fakedml.REC.phase = outer
    return run


def phase_report() -> dict:
    rec, out = fakedml.REC, {}
    for phase in sorted(set(rec.calls) | set(rec.to_host) | set(CALLS)):
        calls = rec.calls.get(phase, {})
        out[phase] = {
            "calls": CALLS.get(phase, 0),
            "native": sum(n for (kind, _), n in calls.items() if kind == "native"),
            "fallback": {op: n for (kind, op), n in calls.items() if kind != "native"},
            "fallback_where": {op: dict(c) for op, c in rec.where.get(phase, {}).items()},
            "to_host": rec.to_host.get(phase, 0)}
    return out


def replace_kernel(op: str, kernel) -> None:
    """Register `kernel` for `op` on PrivateUse1 in place of the emulator's own."""
    torch.library._impls.discard(f"aten/{op}/PrivateUse1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
        fakedml._LIB.impl(op, kernel, "PrivateUse1")


def drop_bn_update() -> None:
    native = fakedml._make_kernel("native_batch_norm", "native")

    def dropping(input, weight, bias, running_mean, running_var, training, momentum, eps):
        keep = [t.clone() if t is not None else None for t in (running_mean, running_var)]
        return native(input, weight, bias, *keep, training, momentum, eps)
    replace_kernel("native_batch_norm", dropping)


def run_script(script: str, argv: list[str]) -> int:
    module = importlib.import_module(Path(script).stem)
    for name in PHASES.get(module.__name__, ()):
        setattr(module, name, in_phase(name, getattr(module, name)))
    sys.argv = [script, *argv]
    try:
        return int(module.main(argv) or 0)
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)


def train_step_parity(pth: str, images_npz: str, model_type: str) -> dict:
    """Two training steps of the same model and batch on the CPU (torch.optim.AdamW) and on
    DirectML (the training script's optimiser there), then the probabilities of the trained
    models: what a DirectML user's fine-tuning computes against the CPU's."""
    import numpy as np
    import model_pytorch_directml as mp
    import train_CRBL_pytorch_directml as train
    import train_memory_pytorch_directml as tm
    images = torch.from_numpy(np.load(images_npz)["images_uint8"]).permute(0, 3, 1, 2) / 255.0
    labels = torch.tensor([float(i % 2) for i in range(len(images))])
    base = mp.load_model(pth, "cpu")
    mp.freeze_backbones(base, model_type)
    # The dropout mask from one CPU generator on both devices (the CPU draws it from bytes):
    masks = {}

    def same_mask(n, d, p, device):
        if (n, d) not in masks:
            g = torch.Generator().manual_seed(len(masks))
            masks[(n, d)] = (torch.rand(n, d, generator=g) >= p).to(torch.uint8)
        return masks[(n, d)].to(device)
    tm._keep_mask = same_mask
    result = {}
    for kind, device in (("cpu", torch.device("cpu")), ("dml", torch_directml.device())):
        masks.clear()
        # Both in DirectML's memory layout (NCHW): in channels_last the CPU's sums round
        # differently, and Adam's first steps move a weight by ~lr whatever its gradient's size,
        # so a rounding-level gradient of the other sign moves it the other way.
        model = tm.use_lean_head(copy.deepcopy(base).to(device)).train()  # as in training
        optimizer = train.make_optimizer([p for p in model.parameters() if p.requires_grad],
                                         1e-4, 1e-6, kind)
        x, y = images.to(device), labels.to(device)
        fakedml.REC.phase = f"step_{kind}"
        losses, info = [], mp.DeviceInfo(device, kind, kind)
        scaler = torch.amp.GradScaler("cuda", enabled=False)  # as training builds it without --amp
        for seed in (1, 2):
            torch.manual_seed(seed)  # drop path draws the same numbers on both
            _, loss = train.train_step(model, x, y, optimizer, scaler, info, amp=False,
                                       smoothing=0.125, class_weights=(0.568, 4.17))
            losses.append(loss.detach())
        fakedml.REC.phase = "none"
        with torch.no_grad():
            probs = torch.sigmoid(model.eval()(x)).flatten()
        result[kind] = {"losses": [float(v) for v in losses], "probs": probs.cpu().tolist(),
                        "optimizer": type(optimizer).__name__}
    return result


def fallback_notice() -> dict:
    """CpuFallbackNotice on the device's real dispatch path: an op without a DirectML kernel."""
    import train_CRBL_pytorch_directml as train
    said = []
    notice = train.CpuFallbackNotice("dml", say=said.append)
    x = torch.ones(4).to(torch_directml.device())
    for _ in range(3):
        with notice():
            y = x.lerp(x * 2, 0.25)  # lerp.Scalar_out: not in torch-directml's op table
    return {"seen": notice.seen, "said": said, "value": y.cpu().tolist()}


def main(argv: list[str]) -> int:
    out, argv = Path(argv[0]), argv[1:]
    while argv[0].startswith("--"):
        if argv[0] == "--drop-bn-update":
            drop_bn_update()
            argv = argv[1:]
        elif argv[0] == "--cpu-fallback":
            replace_kernel(argv[1], fakedml._make_kernel(argv[1], "FALLBACK"))
            argv = argv[2:]
        else:
            raise SystemExit(f"dml_emulated.py: unknown option {argv[0]}")
    check, args = argv[0], argv[1:]
    report = {"exit": 0}
    if check == "script":
        report["exit"] = run_script(args[0], args[1:])
    elif check == "step":
        report["step"] = train_step_parity(*args)
    elif check == "fallback-notice":
        report["notice"] = fallback_notice()
    else:
        raise SystemExit(f"unknown check {check}")
    report["phases"] = phase_report()
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
