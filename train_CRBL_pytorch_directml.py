"""Train or fine-tune CRBL on your images, on DirectML, CUDA/ROCm or CPU.

    python train_CRBL_pytorch_directml.py --demo
    python train_CRBL_pytorch_directml.py --train-csv train_CRBL.csv --val-csv test_CRBL.csv --image-dir images --init imagenet --weights-dir weights
    python train_CRBL_pytorch_directml.py --data-dir mvtec/bottle --output-dir runs/bottle --device dml
    python train_CRBL_pytorch_directml.py --resume runs/bottle --epochs 40
    torchrun --nproc_per_node 2 train_CRBL_pytorch_directml.py --data-dir mvtec/bottle --device cuda

Defaults reproduce the original Keras recipe (../shared/ORIGINAL_MODEL.md): 128 px, batch 32 with
half normal images, class-weighted BCE (c0 = 0.88) with label smoothing 0.125, Adam 1e-4 with
weight decay 1e-6, ReduceLROnPlateau and early stopping on the validation loss, 30 epochs, the
crop model's freezing (Keras layers[:150] of each backbone frozen), seed 42.
The output folder gets best.pth, last.pth, history.csv, train_config.json, curves.png and
val_predictions.csv (the best epoch's validation scores).
Exit status: 0 done; 2 user error (one line says what to fix); 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from dataset_pytorch_directml import (ClassBalancedBatchSampler, TestDataset, TrainDataset,
                                          check_labelled, compute_metrics, discover_image_folder,
                                          loader_workers, make_demo_dataset, preprocess_image,
                                          read_manifest, stratified_split, train_augmentation,
                                          verify_images)
    from fast_paths_pytorch_directml import keep_freed_memory, prepare_for_inference
    from model_pytorch_directml import (MODEL_TYPE_THRESHOLDS, PRETRAINED_TAGS, CRBLConfig,
                                        CRBLError, CRBLModel, HelpFormatter, autocast,
                                        find_local_weights, freeze_backbones, frozen_batchnorms,
                                        get_device, load_checkpoint, model_from_checkpoint,
                                        place_model, save_checkpoint)
    from train_memory_pytorch_directml import use_lean_head
except ModuleNotFoundError as exc:  # a Python without the requirements, e.g. outside the venv
    from setup_amd_gpu_directml import exit_missing_module
    exit_missing_module(exc)

# What --demo changes when the flag is not given, so the whole loop runs in minutes on a 2-core
# CPU: small images, the head alone on fixed backbones (--model-type full), and no class weights,
# since with them Adam first raises every score alike and needs hundreds of steps to separate.
DEMO_DEFAULTS = {"output_dir": "runs/demo", "image_size": 64, "batch_size": 16, "epochs": 4,
                 "init": "none", "model_type": "full", "class0_prior": 0.5}
DEMO_IMAGES = {"train_per_class": 48, "test_per_class": 24, "size": 128}
# Monitored values for --best-metric, and whether lower is better.
# Training steps between two reads of the running loss for the progress bar (each a device sync).
LOG_EVERY = 10
BEST_METRICS = {"val_loss": True, "val_auroc": False, "val_ap": False, "val_f1": False}
# Options that describe where this run writes or starts from: never taken over by --resume.
NOT_RESUMED = ("resume", "output_dir")


def demo_default(key: str) -> str:
    """Help text for an option whose default --demo changes."""
    return f"(default: %(default)s; {DEMO_DEFAULTS[key]} with --demo)"


def demo_in_words() -> str:
    d = DEMO_DEFAULTS
    return (f"{d['image_size']} px images, batch {d['batch_size']}, {d['epochs']} epochs, "
            f"--model-type {d['model_type']} (the head alone learns), --class0-prior "
            f"{d['class0_prior']} (no class weights), --init imagenet if both pretrained "
            f"backbones are on disk (never downloads) else none, output in {d['output_dir']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [options]",
                                     formatter_class=HelpFormatter)
    add_data_options(parser.add_argument_group("data (one of --train-csv, --data-dir, --demo)"))
    add_model_options(parser.add_argument_group("model"))
    add_optimisation_options(parser.add_argument_group("optimisation"))
    add_runtime_options(parser.add_argument_group("runtime and output"))
    return parser


def add_data_options(data) -> None:
    data.add_argument("--train-csv", help="manifest with image_path (relative to --image-dir) and "
                      "impurity or label (0 normal, 1 anomaly)")
    data.add_argument("--val-csv", help="validation manifest (same format); without it "
                      "--val-split of the training data is held out")
    data.add_argument("--image-dir", help="folder the CSV image_path values are relative to "
                      "(default: each CSV's own folder)")
    data.add_argument("--data-dir", help="folder of class folders (good/normal/ok/0/class_0 = "
                      "normal, any other name = anomaly), train/ + test/ of those, or an MVTec AD "
                      "category (train/good, test/<defect>)")
    data.add_argument("--val-split", type=float, default=0.2, help="held-out fraction when no "
                      "validation set is given (stratified, seeded)")
    data.add_argument("--class0-ratio", type=float, default=0.5, help="fraction of normal images "
                      "in every training batch")
    data.add_argument("--steps-per-epoch", type=int, default=0, help="batches per epoch; 0 = "
                      "ceil(training images / batch size)")
    data.add_argument("--no-augment", action="store_true", help="no flips/affine/colour jitter")
    data.add_argument("--demo", action="store_true", help="write a small synthetic defect data set "
                      "(textures with scratches, blobs and stains) to <output-dir>/data and train "
                      f"on it in minutes on a CPU; options not given then default to: {demo_in_words()}")


def add_model_options(model) -> None:
    model.add_argument("--init", default="imagenet", help="imagenet (the two pretrained "
                       "backbones of the original), none (random), or a CRBL .pth to fine-tune "
                       "(its image size and normalisation win) (default: %(default)s; with --demo: "
                       "imagenet if both backbones are on disk, else none)")
    model.add_argument("--weights-dir", help="folder with the backbone files "
                       f"{PRETRAINED_TAGS['imagenet']}.safetensors and "
                       f"{PRETRAINED_TAGS['noisy-student']}.safetensors (offline --init imagenet)")
    model.add_argument("--model-type", choices=sorted(MODEL_TYPE_THRESHOLDS), default="crop",
                       help="crop: Keras layers[:150] of each backbone frozen; full: both "
                       "backbones frozen, only the head trains " + demo_default("model_type"))
    model.add_argument("--trainable-from", type=int, default=None, help="first trainable Keras "
                       "layer index of each backbone (overrides --model-type; 150 = crop)")
    model.add_argument("--image-size", type=int, default=128, help="square input size in pixels "
                       "(images are resized to it) " + demo_default("image_size"))


def add_optimisation_options(optim) -> None:
    optim.add_argument("--epochs", type=int, default=30, help="total epochs (a resumed run "
                       "continues up to this number) " + demo_default("epochs"))
    optim.add_argument("--batch-size", type=int, default=32, help="images per training step "
                       + demo_default("batch_size"))
    optim.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    optim.add_argument("--weight-decay", type=float, default=1e-6, help="AdamW's decoupled "
                       "weight decay (Keras' weight_decay)")
    optim.add_argument("--class0-prior", type=float, default=0.88, help="class weights "
                       "w0 = 1/(2·c0), w1 = 1/(2·(1-c0)) as in the original; 0.5 = unweighted "
                       + demo_default("class0_prior"))
    optim.add_argument("--label-smoothing", type=float, default=0.125, help="targets move "
                       "towards 0.5 by this much (Keras BinaryCrossentropy label_smoothing)")
    optim.add_argument("--lr-factor", type=float, default=0.5, help="ReduceLROnPlateau factor")
    optim.add_argument("--lr-patience", type=int, default=2, help="epochs without val_loss "
                       "improvement before the learning rate is multiplied by --lr-factor")
    optim.add_argument("--min-lr", type=float, default=1e-6, help="the learning rate never "
                       "drops below this")
    optim.add_argument("--early-stop-patience", type=int, default=10, help="epochs without "
                       "val_loss improvement before stopping; 0 = never stop early")
    optim.add_argument("--min-delta", type=float, default=1e-6, help="smallest val_loss "
                       "decrease that counts as an improvement for early stopping")
    optim.add_argument("--recalibrate-bn", action="store_true", help="before each validation, "
                       "set the trainable BatchNorm layers' running statistics from up to 128 "
                       "training images: with Keras's momentum 0.99 they lag weights that change "
                       "fast (a low --trainable-from), and validation, best.pth, the learning "
                       "rate and early stopping all read them")
    optim.add_argument("--best-metric", choices=sorted(BEST_METRICS), default="val_loss",
                       help="what best.pth is chosen on")
    optim.add_argument("--threshold-rule", choices=("f1", "youden"), default="f1",
                       help="decision threshold chosen on validation: best F1 or Youden's J")


def add_runtime_options(run) -> None:
    run.add_argument("--output-dir", default="runs/crbl", help="folder for checkpoints, history, "
                     "plots and predictions " + demo_default("output_dir"))
    run.add_argument("--resume", help="output folder or .pth of an earlier run: continue it "
                     "exactly (model, optimiser, scheduler, early stopping, epoch); flags given "
                     "now override the stored ones")
    run.add_argument("--device", default="auto", help="auto, dml[:N], cuda[:N], rocm or cpu")
    run.add_argument("--amp", action="store_true", help="mixed precision on CUDA/ROCm "
                     "(ignored on DirectML and CPU)")
    run.add_argument("--workers", type=int, default=-1, help="DataLoader processes; -1 = auto: "
                     "min(8, cores - 1) for a GPU, min(4, cores // 8) on CPU. Results do not "
                     "depend on it")
    run.add_argument("--seed", type=int, default=42, help="seeds the split, batches, "
                     "augmentation, dropout and the head's initial weights: same seed, same run")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    # Which flags the user typed: --resume and --demo only fill in the others.
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(probe.parse_args(argv)))
    return args


# --------------------------------------------------------------------------------------------
# Setup: options, data, model
# --------------------------------------------------------------------------------------------

def resolve_options(args) -> dict | None:
    """Apply --resume (stored options) or --demo defaults; returns the resume checkpoint."""
    resume = None
    if args.resume:
        path = Path(args.resume)
        path = path / "last.pth" if path.is_dir() else path
        resume = load_checkpoint(path)
        if "train_args" not in resume or "optimizer" not in resume:
            raise CRBLError(f"--resume {path}: not a training checkpoint (no optimiser state); "
                            "use it with --init to fine-tune from it instead")
        for key, value in resume["train_args"].items():
            if key not in args.given and key not in NOT_RESUMED and key != "given":
                setattr(args, key, value)
        if "output_dir" not in args.given:
            args.output_dir = str(path.parent)
        resume["path"] = str(path)
    elif args.demo:
        for key, value in DEMO_DEFAULTS.items():
            if key not in args.given:
                setattr(args, key, value)
    check_options(args)
    return resume


def check_options(args) -> None:
    sources = [name for name, value in (("--train-csv", args.train_csv),
                                        ("--data-dir", args.data_dir), ("--demo", args.demo)) if value]
    if len(sources) != 1:
        raise CRBLError(f"give exactly one data source: --train-csv, --data-dir or --demo "
                        f"(got {', '.join(sources) or 'none'})")
    if args.val_csv and not args.train_csv:
        raise CRBLError("--val-csv goes with --train-csv; with --data-dir use test/ folders")
    for name, value, ok in (("--epochs", args.epochs, args.epochs >= 1),
                            ("--batch-size", args.batch_size, args.batch_size >= 2),
                            ("--image-size", args.image_size, args.image_size >= 32),
                            ("--val-split", args.val_split, 0 < args.val_split < 1),
                            ("--class0-prior", args.class0_prior, 0 < args.class0_prior < 1),
                            ("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing < 1),
                            ("--lr", args.lr, args.lr > 0)):
        if not ok:
            raise CRBLError(f"{name} {value} is out of range; see --help")


def load_data(args) -> dict:
    """Training and validation samples, labelled, split, every image decoded once."""
    data_dir = args.data_dir
    if args.demo:
        data_dir = Path(args.output_dir) / "data"
        if not (data_dir / "test.csv").is_file():  # a resumed demo reuses its images
            counts = make_demo_dataset(data_dir, seed=args.seed, **DEMO_IMAGES)
            print(f"demo: wrote {counts['train']} training and {counts['test']} test images "
                  f"({DEMO_IMAGES['size']} px textures; defects: scratch, blob, stain, with masks) "
                  f"to {data_dir}")
    where_train = where_val = None
    if args.train_csv:
        train = read_manifest(args.train_csv, args.image_dir, require_label=True)
        val = read_manifest(args.val_csv, args.image_dir, require_label=True) if args.val_csv else None
        source = f"{args.train_csv}" + (f" + {args.val_csv}" if args.val_csv else ", split")
        where_train = lambda i: f"{args.train_csv} row {i + 2}"  # noqa: E731 (row 1 = header)
        where_val = lambda i: f"{args.val_csv} row {i + 2}"  # noqa: E731
    else:
        train, val, source = discover_image_folder(data_dir)
        if not train:
            raise CRBLError(f"--data-dir {data_dir}: no images found; expected "
                            "<dir>/good/*.png and <dir>/<defect>/*.png, or MVTec <dir>/train/good "
                            "and <dir>/test/<defect>")
    noted: list[str] = []  # usable images a decoder warned about (e.g. a bad EXIF block)
    train, bad = verify_images(train, "training images", where_train,
                               progress=not args.no_progress, noted=noted)
    if val is not None:
        val, bad_val = verify_images(val, "validation images", where_val,
                                     progress=not args.no_progress, noted=noted)
        bad += bad_val
    if bad:
        print(f"warning: {len(bad)} unreadable images left out: " + "; ".join(bad[:10])
              + (" ..." if len(bad) > 10 else ""))
    if noted:
        print(f"note: {len(noted)} image{'s' if len(noted) > 1 else ''} kept although a decoder "
              f"warned (all in train_config.json): " + "; ".join(noted[:3])
              + (" ..." if len(noted) > 3 else ""))
    check_labelled(train, "training data")
    if val is None:
        train, val = stratified_split(train, args.val_split, args.seed)
    check_labelled(val, "validation data")
    return {"train": train, "val": val, "source": source, "unreadable": bad, "decoder_notes": noted}


def build_model(args, resume: dict | None) -> tuple[CRBLModel, dict]:
    """The model as --init (or the resumed run) says, frozen as --model-type says."""
    torch.manual_seed(args.seed)  # the head (and --init none backbones) start the same every run
    if resume is not None:
        model = model_from_checkpoint(resume, resume["path"])
    elif args.init == "none":
        model = CRBLModel(CRBLConfig(image_size=args.image_size))
    elif args.init == "imagenet":
        model = CRBLModel(CRBLConfig(image_size=args.image_size), pretrained=True,
                          weights_dir=args.weights_dir)
    else:
        model = model_from_checkpoint(load_checkpoint(args.init), args.init)
        if "image_size" in args.given and args.image_size != model.config.image_size:
            print(f"note: --image-size {args.image_size} ignored: {args.init} was built for "
                  f"{model.config.image_size} px")
    args.image_size = model.config.image_size
    freezing = freeze_backbones(model, args.model_type, args.trainable_from)
    return model, freezing


@torch.no_grad()
def calibrate_batchnorm(model: CRBLModel, samples, args, device, max_images: int = 128,
                        trainable_only: bool = False) -> int:
    """Set BatchNorm running statistics from training images: every layer's for --init none,
    the trainable layers' before each validation with --recalibrate-bn.

    With random weights and unit running statistics the activations shrink layer after layer
    (to ~1e-7 at the top: the bilinear vector is then mostly its 1e-12 epsilon), so frozen
    layers would pass on nothing to learn from. While fine-tuning, Keras's momentum 0.99 keeps
    the statistics of weights many steps old, and validation reads them. One batch of the same
    seeded calibration images each time: averaging small-batch variances would miss the spread
    between batches, and the error grows with depth. Weights are not changed, and training's
    own steps use batch statistics, so each step's update is the same; what validation reads
    changes, and with it what the learning-rate schedule and early stopping decide. Returns the
    number of images used (0 when every BatchNorm is frozen).
    """
    frozen = set(frozen_batchnorms(model)) if trainable_only else set()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m not in frozen]
    if not norms:  # --model-type full: every BatchNorm is frozen
        return 0
    g = torch.Generator().manual_seed(args.seed)
    subset = [samples[i] for i in torch.randperm(len(samples), generator=g)[:max_images].tolist()]
    images = torch.stack([preprocess_image(s.path, args.image_size) for s in subset])
    momenta = [m.momentum for m in norms]
    model.eval()  # no drop-path; only the BatchNorms below collect statistics
    for m in norms:
        m.momentum = 1.0  # running statistics := this batch's
        m.train()
    model.features(to_device(images, device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()
    return len(subset)


def demo_init_choice(args) -> None:
    """--demo trains from scratch unless both pretrained backbones are already on disk."""
    if not args.demo or args.resume or "init" in args.given:
        return
    found = all(find_local_weights(tag, args.weights_dir) for tag in PRETRAINED_TAGS.values())
    args.init = "imagenet" if found else "none"
    print(f"demo: --init {args.init} ("
          + ("pretrained backbones found locally" if found else "no pretrained backbones in "
             "--weights-dir or CRBL_WEIGHTS_DIR, and the demo never downloads") + f"); "
          f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, --model-type "
          f"{args.model_type}, --class0-prior {args.class0_prior}: small and quick on a CPU, "
          "the head learns in a few dozen steps")


# --------------------------------------------------------------------------------------------
# Loss, threshold, early stopping
# --------------------------------------------------------------------------------------------

def crbl_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float,
              class_weights: tuple[float, float] | None = None) -> torch.Tensor:
    """Keras BinaryCrossentropy(label_smoothing) with fit(class_weight): mean of w_y · BCE.

    Keras smooths binary targets towards 0.5 (y·(1-s) + s/2) and divides the weighted sum by
    the batch size, not by the sum of the weights.
    """
    targets = labels * (1.0 - smoothing) + 0.5 * smoothing
    x = logits.flatten()
    # TensorFlow's sigmoid_cross_entropy_with_logits, which Keras computes for a sigmoid output:
    # max(x, 0) - x·t + log(1 + exp(-|x|)). Written out because F.binary_cross_entropy_with_logits
    # runs log_sigmoid, which torch-directml lacks (a CPU round trip every step); these ops and
    # their gradients are native there.
    loss = torch.relu(x) - x * targets + F.softplus(-x.abs())
    if class_weights is not None:
        loss = loss * torch.where(labels > 0.5, class_weights[1], class_weights[0])
    return loss.mean()


def class_weights_from_prior(c0: float) -> tuple[float, float]:
    # The original: w_k = (c0 + c1) / (2·c_k) with c1 = 1 - c0 (0.568 and 4.17 for c0 = 0.88).
    return 1.0 / (2.0 * c0), 1.0 / (2.0 * (1.0 - c0))


def choose_threshold(labels, scores, rule: str) -> float:
    """Threshold (anomaly if score >= threshold) maximising F1 or Youden's J on validation.

    Returned as the midpoint between the best cut and the next lower validation score: the same
    validation decisions, with a margin on both sides for new images.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    cuts = np.unique(s)  # ascending
    order = np.argsort(s, kind="stable")
    below = np.searchsorted(s[order], cuts, side="left")  # images scored under each cut
    positives_below = np.concatenate([[0], np.cumsum(y[order])])[below]
    tp = y.sum() - positives_below
    fp = (len(y) - below) - tp
    if rule == "f1":
        quality = 2 * tp / np.maximum(2 * tp + fp + (y.sum() - tp), 1)
    else:
        quality = tp / max(y.sum(), 1) - fp / max(len(y) - y.sum(), 1)
    best = int(np.argmax(quality))  # ties: the lowest cut, i.e. the higher recall
    lower = cuts[best - 1] if best > 0 else 0.0
    middle = lower + (cuts[best] - lower) / 2
    return float(middle if middle > lower else cuts[best])


class EarlyStopping:
    """Keras EarlyStopping(monitor='val_loss', min_delta, patience): stop after `patience` epochs
    without the loss falling below best - min_delta."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.wait = math.inf, 0

    def step(self, value: float) -> bool:
        """Record one epoch; True when training should stop."""
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
        else:
            self.wait += 1
        return self.patience > 0 and self.wait >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = float(state["best"]), int(state["wait"])


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------

def init_distributed(args, auto_order) -> tuple:
    """(device, rank, world size). Under torchrun (WORLD_SIZE > 1) every process trains on its
    own share of each batch with DistributedDataParallel: NCCL on CUDA/ROCm, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return get_device(args.device, auto_order), 0, 1
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = get_device(args.device, auto_order)
    if device.kind == "dml":
        raise CRBLError("DirectML has no collective-communication backend: run one process, or "
                        "use torchrun with --device cuda (CUDA/ROCm) or --device cpu")
    if args.demo:
        raise CRBLError("--demo runs in one process; start it without torchrun")
    if device.cuda_like:
        device = get_device(f"cuda:{local_rank}", auto_order)
        torch.cuda.set_device(device.device)
    dist.init_process_group("nccl" if device.cuda_like else "gloo")
    if rank != 0:  # one voice: only rank 0 prints, shows progress and writes files
        args.no_progress = True
        # Not by replacing builtins.print: libraries check it (numba's import fails on a lambda).
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # errors still go to stderr
    return device, rank, world


def gather_epoch(result: dict, world: int) -> dict:
    """Training loss, labels and scores of all processes (each trained on its own share)."""
    if world == 1:
        return result
    import torch.distributed as dist
    parts = [None] * world
    dist.all_gather_object(parts, (result["loss"] * len(result["labels"]), result["labels"], result["scores"]))
    labels = [y for _, ys, _ in parts for y in ys]
    return {"loss": sum(t for t, _, _ in parts) / len(labels), "labels": labels,
            "scores": [x for _, _, xs in parts for x in xs]}


def seed_epoch(seed: int, epoch: int) -> None:
    # Every RNG restarts from (seed, epoch): a run resumed at an epoch boundary continues
    # bit for bit without storing RNG states.
    value = seed * 1_000_003 + epoch
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


class CpuFallbackNotice:
    """A safety net for ops a torch-directml release lacks: DirectML runs them on the CPU with a
    UserWarning at every call. Say so once per op (`say`), remember them in `seen` (the order
    they were met) and keep going. Training has none today; this catches a future release."""

    def __init__(self, device_kind: str, say=print):
        self.active, self.seen, self.say = device_kind == "dml", [], say

    @contextlib.contextmanager
    def __call__(self):
        if not self.active:
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            text = str(w.message)
            if "fall back" in text and "CPU" in text:
                op = text.split("'")[1] if text.count("'") >= 2 else text[:80]
                if op not in self.seen:
                    self.seen.append(op)
                    self.say(f"note: DirectML runs {op} on the CPU (no DirectML kernel); training "
                             "continues, a little slower")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class AdamWWithoutLerp(torch.optim.AdamW):
    """torch.optim.AdamW's update (decoupled weight decay, no amsgrad) written with mul_/add_/
    addcmul_/addcdiv_, for DirectML: torch's version moves the first moment with lerp_, which
    torch-directml lacks (microsoft/DirectML #604, #675), and on a plain DirectML tensor it
    picks the foreach path, none of whose _foreach_* ops DirectML has either: every step would
    copy every trainable tensor to the CPU and back. Equal to torch.optim.AdamW within float
    rounding; the same state dict, so a run resumes on any device."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize") or group.get("capturable"):
                raise ValueError("AdamWWithoutLerp implements plain AdamW only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # as torch: the step count a CPU tensor, the moments like p
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                step = state["step"].item()  # a CPU tensor: no device sync
                p.mul_(1 - lr * wd)
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)  # = lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
        return loss


def make_optimizer(params, lr: float, weight_decay: float, device_kind: str):
    # Keras >= 2.11 optimizers apply weight_decay decoupled from the gradient: AdamW.
    optimizer = AdamWWithoutLerp if device_kind == "dml" else torch.optim.AdamW
    return optimizer(params, lr=lr, weight_decay=weight_decay)


class BatchNormWatch:
    """microsoft/DirectML #364: BatchNorm running statistics that never move in training on
    DirectML, so the trained model would be evaluated with its starting statistics. After the
    first training step (one device read, once per run) a trainable BatchNorm's running mean
    and variance must have moved; if not, stop and say so. Only on DirectML."""

    def __init__(self, model: torch.nn.Module, device_kind: str):
        frozen = {id(m) for m in frozen_batchnorms(model)}
        self.name, self.layer = next(
            ((name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
             and m.track_running_stats and id(m) not in frozen), (None, None)) \
            if device_kind == "dml" else (None, None)
        if self.layer is not None:
            self.before = (self.layer.running_mean.clone(), self.layer.running_var.clone())

    def check(self) -> None:
        if self.layer is None:
            return
        layer, self.layer = self.layer, None  # once
        if torch.equal(layer.running_mean, self.before[0]) and torch.equal(layer.running_var,
                                                                           self.before[1]):
            raise CRBLError(
                f"DirectML did not update the BatchNorm running statistics of {self.name} in "
                f"training (torch-directml {directml_version()}, microsoft/DirectML #364); fix: "
                "update torch-directml and the GPU driver, or train with --model-type full "
                "(its BatchNorm layers are frozen) or on --device cpu")


def directml_version() -> str:
    """The module's own version (the emulator has no package metadata), else the installed
    package's, as setup_amd_gpu_directml reads it."""
    from setup_amd_gpu_directml import package_version
    try:
        import torch_directml
    except Exception:  # DirectML ran a step, so this is not expected; the message still stands
        torch_directml = None
    return (getattr(torch_directml, "__version__", None) or package_version("torch-directml")
            or "version unknown")


def prepare_for_training(model: CRBLModel, device) -> CRBLModel:
    """The model on its device in its fastest memory layout, with training's memory-saving head
    (train_memory_pytorch_directml). On the CPU glibc keeps freed memory: every step's
    activations would otherwise land on fresh pages the kernel must fault in."""
    if device.kind == "cpu":
        keep_freed_memory()
    return use_lean_head(place_model(model, device.device))


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    # The model converts inputs to its memory layout itself (channels_last except on DirectML).
    return x.to(device.device, non_blocking=device.cuda_like)


# --------------------------------------------------------------------------------------------
# One epoch
# --------------------------------------------------------------------------------------------

def train_one_epoch(model, loader, optimizer, scaler, device, args, epoch, fallback,
                    bn_watch=None) -> dict:
    from tqdm import tqdm
    model.train()  # frozen BatchNorms stay in eval (CRBLModel.train)
    weights = class_weights_from_prior(args.class0_prior)
    # Losses and logits stay on the device and are read once, at the end of the epoch (and every
    # LOG_EVERY steps for the progress bar): each read is a device->host sync that drains the
    # GPU's queue.
    loss_sum, labels, logits_seen = 0.0, [], []
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs} train", unit="batch", leave=False,
               disable=args.no_progress, file=sys.stderr)
    for step, (images, targets) in enumerate(bar, 1):
        labels += targets.int().tolist()  # the loader's CPU tensor
        images, targets = to_device(images, device), to_device(targets, device)
        with fallback():
            logits, loss = train_step(model, images, targets, optimizer, scaler, device,
                                      args.amp, args.label_smoothing, weights)
        loss_sum = loss_sum + loss.detach() * len(targets)
        logits_seen.append(logits.detach().flatten())
        if step == 1 and bn_watch is not None:
            bn_watch.check()
        if not args.no_progress and step % LOG_EVERY == 0:
            bar.set_postfix(loss=f"{float(loss_sum) / len(labels):.4f}")
    loss_sum, scores = read_once(loss_sum, torch.sigmoid(torch.cat(logits_seen)))
    return {"loss": loss_sum.item() / len(labels), "labels": labels, "scores": scores.tolist()}


def train_step(model, images: torch.Tensor, targets: torch.Tensor, optimizer, scaler, device,
               amp: bool, smoothing: float, class_weights) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch on the device; returns (logits, loss), still there."""
    with autocast(device.kind, enabled=amp):  # the head stays float32 itself
        logits = model(images).float()
    loss = crbl_loss(logits, targets, smoothing, class_weights)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


def read_once(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors on the CPU in one device->host transfer (one sync instead of one each)."""
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors]).cpu()
    return list(flat.split([t.numel() for t in tensors]))


@torch.no_grad()
def validate(model, loader, device, args, epoch) -> dict:
    """Validation loss (label smoothing, no class weights: Keras applies class_weight to training
    only) and scores, computed exactly as the inference script does; logits are read from the
    device once, at the end."""
    from tqdm import tqdm
    # The model's weights keep changing: nothing folded or joined, and its threads kept as they
    # are (results on the CPU must not depend on what else the machine runs).
    runner = prepare_for_inference(model, device, fp16=args.amp, batch_size=args.batch_size,
                                   fold=False, threads=torch.get_num_threads())
    samples = loader.dataset.samples
    labels, logits_seen = [], []
    for images, indices, errors in tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs} val",
                                        unit="batch", leave=False, disable=args.no_progress,
                                        file=sys.stderr):
        for index, error in zip(indices.tolist(), errors):
            if error:  # every file was decoded before training: it changed since
                raise CRBLError(f"{samples[index].path}: {error} (the file changed during training)")
        logits_seen.append(runner(to_device(images, device)).flatten())
        labels += [samples[i].label for i in indices.tolist()]
    logits, = read_once(torch.cat(logits_seen))
    loss = crbl_loss(logits, torch.tensor(labels, dtype=torch.float32), args.label_smoothing)
    return {"loss": loss.item(), "labels": labels, "scores": torch.sigmoid(logits).tolist()}


def epoch_row(epoch, lr, train, val, threshold, seconds) -> dict:
    """One history.csv row: metrics at 0.5 (like Keras), the threshold and F1 there."""
    row = {"epoch": epoch + 1, "lr": lr}
    for prefix, result in (("train", train), ("val", val)):
        m = compute_metrics(result["labels"], result["scores"], 0.5)
        row[f"{prefix}_loss"] = result["loss"]
        for key in ("accuracy", "precision", "recall", "f1", "auroc", "ap"):
            row[f"{prefix}_{key}"] = m[key]
    row["threshold"] = threshold
    row["val_f1_at_threshold"] = compute_metrics(val["labels"], val["scores"], threshold)["f1"]
    row["seconds"] = seconds
    return row


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def write_history(history: list[dict], out_dir: Path) -> None:
    with open(out_dir / "history.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def plot_curves(history: list[dict], out_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    panels = (("loss", ("train_loss", "val_loss")), ("AUROC / AP", ("train_auroc", "val_auroc", "val_ap")),
              ("F1", ("train_f1", "val_f1", "val_f1_at_threshold")), ("learning rate", ("lr",)))
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(epochs, [np.nan if row[key] is None else row[key] for row in history],
                    marker="o", label=key)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no half epochs
        ax.legend()
    rates = {row["lr"] for row in history}
    if len(rates) > 1:  # ReduceLROnPlateau halves it: steps read best on a log scale
        axes.flat[3].set_yscale("log")
    else:  # a flat line says little without its value
        axes.flat[3].set_title(f"learning rate (constant {rates.pop():.2g})")
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)


def write_val_predictions(samples, val: dict, threshold: float, out_dir: Path) -> None:
    with open(out_dir / "val_predictions.csv", "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.writer(f)
        writer.writerow(("image_path", "score", "prediction", "label"))
        for sample, score in zip(samples, val["scores"]):
            writer.writerow((sample.image_path, repr(score), int(score >= threshold), sample.label))


def write_config(args, argv, model, data, device, freezing, out_dir: Path) -> None:
    config = {
        "args": train_args(args),
        "model_config": model.config.to_dict(),
        "data": {"source": data["source"], "train_images": len(data["train"]),
                 "train_anomalies": sum(s.label for s in data["train"]),
                 "val_images": len(data["val"]), "val_anomalies": sum(s.label for s in data["val"]),
                 "unreadable_left_out": data["unreadable"],
                 "decoder_notes": data["decoder_notes"]},
        "freezing": freezing,
        "device": str(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": [Path(__file__).name, *argv],
    }
    (out_dir / "train_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def train_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "given"}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def make_loaders(data, args, device, rank: int = 0, world: int = 1
                 ) -> tuple[DataLoader, DataLoader, ClassBalancedBatchSampler]:
    transform = None if args.no_augment else train_augmentation(args.image_size)
    sampler = ClassBalancedBatchSampler([s.label for s in data["train"]], args.batch_size,
                                        args.class0_ratio, args.steps_per_epoch or None, args.seed,
                                        rank=rank, world_size=world)
    common = loader_workers(args.workers, device)
    # Persistent workers: no process start-up per epoch; they hold no epoch state (the sampler
    # runs in this process and sends each draw's augmentation seed).
    common["persistent_workers"] = common["num_workers"] > 0
    train_loader = DataLoader(TrainDataset(data["train"], args.image_size, transform),
                              batch_sampler=sampler, **common)
    val_loader = DataLoader(TestDataset(data["val"], args.image_size), batch_size=args.batch_size,
                            shuffle=False, **common)
    return train_loader, val_loader, sampler


def fit(args, model, device, data, resume, rank: int = 0, world: int = 1) -> tuple[dict, list[dict]]:
    """The epoch loop; returns the best epoch ({metric, value, epoch}) and the history rows.

    With several processes, every one validates the whole validation set (same weights, same
    scores), so the scheduler and early stopping decide alike everywhere without messages.
    """
    train_loader, val_loader, sampler = make_loaders(data, args, device, rank, world)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.device.index] if device.cuda_like else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args.lr, args.weight_decay, device.kind)
    # Keras ReduceLROnPlateau compares with an absolute min_delta of 1e-4.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=args.lr_factor, patience=args.lr_patience,
        min_lr=args.min_lr, threshold=1e-4, threshold_mode="abs")
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp)
    stopper = EarlyStopping(args.early_stop_patience, args.min_delta)
    lower_is_better = BEST_METRICS[args.best_metric]
    history, best, start = [], None, 0
    if resume is not None:
        history, best, start = restore(resume, optimizer, scheduler, scaler, stopper)
        if resume["stopped_early"]:
            print("that run had stopped early; nothing more to train")
            return best, history
    fallback = CpuFallbackNotice(device.kind)
    bn_watch = BatchNormWatch(model, device.kind)
    for epoch in range(start, args.epochs):
        seed_epoch(args.seed + 1_000 * rank, epoch)  # own dropout masks per process
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train = gather_epoch(train_one_epoch(net, train_loader, optimizer, scaler, device, args,
                                             epoch, fallback, bn_watch), world)
        if args.recalibrate_bn:
            calibrate_batchnorm(model, data["train"], args, device, trainable_only=True)
        val = validate(model, val_loader, device, args, epoch)
        threshold = choose_threshold(val["labels"], val["scores"], args.threshold_rule)
        row = epoch_row(epoch, lr, train, val, threshold, time.perf_counter() - started)
        history.append(row)
        scheduler.step(val["loss"])
        stop = stopper.step(val["loss"])
        value = row[args.best_metric]
        improved = best is None or (value < best["value"] if lower_is_better else value > best["value"])
        if improved:
            best = {"metric": args.best_metric, "value": value, "epoch": epoch + 1}
        state = {"epoch": epoch + 1, "train_args": train_args(args), "history": history,
                 "optimizer": to_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "early_stopping": stopper.state_dict(),
                 "best": best, "stopped_early": stop, "metrics": row}
        if rank == 0:
            save_epoch(model, state, val, threshold, improved, data, args)
        print(epoch_summary(row, improved))
        if stop:
            print(f"early stopping: val_loss has not improved by {args.min_delta} for "
                  f"{args.early_stop_patience} epochs")
            break
    return best, history


def restore(resume: dict, optimizer, scheduler, scaler, stopper) -> tuple[list, dict, int]:
    """--resume: the optimiser, scheduler, scaler and early stopping as that run left them;
    returns its history, best epoch and last epoch."""
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    if resume["scaler"]:  # empty when that run had no --amp
        scaler.load_state_dict(resume["scaler"])
    stopper.load_state_dict(resume["early_stopping"])
    print(f"resumed {resume['path']} after epoch {resume['epoch']}")
    return list(resume["history"]), resume["best"], int(resume["epoch"])


def save_epoch(model, state: dict, val: dict, threshold: float, improved: bool, data: dict,
               args) -> None:
    """last.pth (and best.pth with its validation scores when the epoch improved), history.csv
    and curves.png."""
    out_dir, epoch = Path(args.output_dir), state["epoch"]
    source = f"validation {args.threshold_rule} ({len(val['labels'])} images, epoch {epoch})"
    save = dict(threshold=threshold, threshold_source=source, model_type=args.model_type,
                provenance={"script": Path(__file__).name, "init": args.init,
                            "data": data["source"]}, **state)
    save_checkpoint(out_dir / "last.pth", model, **save)
    if improved:
        save_checkpoint(out_dir / "best.pth", model, **save)
        write_val_predictions(data["val"], val, threshold, out_dir)
    write_history(state["history"], out_dir)
    plot_curves(state["history"], out_dir)


def to_cpu(obj):
    """Tensors anywhere in a (nested) state dict, on the CPU: DirectML tensors do not load back."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def epoch_summary(row: dict, improved: bool) -> str:
    """The epoch's line. F1 is the one at the threshold this epoch chose on validation, the
    one its checkpoint would use (history.csv also has the F1 at 0.5, as Keras reports)."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return (f"epoch {row['epoch']}: train loss {fmt(row['train_loss'])} AUROC "
            f"{fmt(row['train_auroc'])} | val loss {fmt(row['val_loss'])} AUROC "
            f"{fmt(row['val_auroc'])} AP {fmt(row['val_ap'])}, F1 "
            f"{fmt(row['val_f1_at_threshold'])} at the threshold chosen this epoch "
            f"({row['threshold']:.4g}) | lr {row['lr']:.2g} | {row['seconds']:.0f} s"
            + ("  * best" if improved else ""))


def main(argv=None, auto_order: tuple[str, ...] = ("dml", "cuda", "cpu")) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    try:
        resume = resolve_options(args)
        device, rank, world = init_distributed(args, auto_order)
        if args.amp and not device.cuda_like:
            print(f"note: --amp ignored on {device.kind} (autocast needs CUDA/ROCm); float32")
            args.amp = False
        demo_init_choice(args)
        data = load_data(args)
        model, freezing = build_model(args, resume)
        model = prepare_for_training(model, device)
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.init == "none" and resume is None:
            used = calibrate_batchnorm(model, data["train"], args, device)
            print(f"--init none: BatchNorm statistics set from {used} training images "
                  "(random weights otherwise make the activations vanish)")
        if rank == 0:
            write_config(args, argv, model, data, device, freezing, out_dir)
        print(f"device {device}; {len(data['train'])} training / {len(data['val'])} validation "
              f"images ({data['source']}); {args.image_size} px; {freezing['trainable']:,} "
              f"trainable parameters (Keras layers >= {freezing['trainable_from']}); output {out_dir}"
              + (f"; {world} processes (DistributedDataParallel), batch {args.batch_size} each" if world > 1 else ""))
        started = time.perf_counter()
        best, history = fit(args, model, device, data, resume, rank, world)
        if world > 1:
            torch.distributed.destroy_process_group()
        best_row = history[best["epoch"] - 1]
        print(f"done in {time.perf_counter() - started:.0f} s; best {best['metric']} "
              f"{best['value']:.4f} at epoch {best['epoch']} (val AUROC "
              f"{best_row['val_auroc']:.4f}, threshold {best_row['threshold']:.4g}): "
              f"{out_dir / 'best.pth'}")
        return 0
    except CRBLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the last finished epoch is in {Path(args.output_dir) / 'last.pth'}; "
              f"continue with --resume {args.output_dir}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
