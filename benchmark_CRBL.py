"""Benchmark CRBL-PyTorch against its practical limit, the original Keras model, and itself.

    python benchmark_CRBL.py                                    # 128 and 224 px, batch 1/8/32
    python benchmark_CRBL.py --sizes 128 --batch-sizes 32 --repeats 9 --json bench.json
    python benchmark_CRBL.py --device cuda --amp --weights model.weights.h5 --batch-sizes 1 32 128

For each image size and batch size it reports, as ratios of speeds measured side by side:
(a) the CRBL forward pass vs its two EfficientNetB0 backbones alone, run as CRBL runs them (one
twin network on small CPU batches): the practical limit, what the head and input scaling cost;
(b) the CRBL forward vs the original Keras model under tf.function, same weights, inputs and
threads (when TensorFlow, tf-keras and efficientnet are installed, as in requirements-dev.txt);
(c) inference_CRBL_pytorch_directml.py end to end (PNG files -> CSV) in steady state (its
scoring loop, timed inside the run, after the first batch), and the whole run with its start-up
(model loading) included, vs the model-only forward on the same images; (d) a crop-model
training step vs a Keras train step;
(e) peak memory (resident-set high-water mark) of each side at inference and after training.
On a GPU it also checks parity: the GPU's probabilities vs the same model on the CPU (float32,
and float16 autocast with --amp), and reports --amp's speed-up over float32.

How: every (size, batch) gets two fresh worker processes, PyTorch and Keras (TensorFlow and torch
in one process can crash). The parent asks them in turn for one timed call of each variant,
round after round, rotating the order, so every ratio compares calls made under the same machine
load; it reports medians after warm-up. The Keras model is the original architecture with random
weights (tests/keras_reference.py builders); the PyTorch model is converted from it, and their
probabilities are compared as a check that both sides compute the same thing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from setup_amd_gpu_directml import exit_missing_module

try:
    import numpy as np
except ModuleNotFoundError as exc:  # a Python without the requirements, e.g. outside the venv
    exit_missing_module(exc)

# No torch import at the top: the Keras worker runs this file, and TensorFlow and torch in one
# process can crash. Parent and PyTorch worker import the model module where they need it.
ROOT = Path(__file__).resolve().parent
# Speed ratios (higher is better) and the memory ratio (lower is better) the project aims for.
TARGETS = {
    "forward_vs_backbones": (">=", 0.85),
    "forward_vs_keras": (">=", 1.0),
    "e2e_vs_forward": (">=", 0.8),
    "train_vs_keras_train": (">=", 1.0),
    "peak_memory_inference_vs_keras": ("<=", 1.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    # Not the model module's HelpFormatter: the Keras worker parses these too, without torch.
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], usage="%(prog)s [options]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("workload")
    g.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="image sizes (px)")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32],
                   help="batch sizes, each timed in fresh worker processes")
    g.add_argument("--device", default="cpu", help="PyTorch device: cpu, cuda[:N], dml[:N], auto")
    g.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0))
                   if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
                   help="CPU threads for both frameworks (torch.set_num_threads, TF intra/inter-op)")
    g.add_argument("--e2e-images", type=int, default=0,
                   help="images for the end-to-end run; 0 = max(256, 16 batches)")
    g.add_argument("--workers", type=int, nargs="+", default=[-1],
                   help="the end-to-end run's inference --workers (DataLoader processes; -1 = the "
                        "script's auto choice, none on a CPU with under 16 cores). Several values: "
                        "each also runs in a fresh process in every round, as a user runs it, and "
                        "its scoring loop is compared with the first value's round by round "
                        "(e2e_workers<N>_vs_workers<first>)")
    g.add_argument("--amp", action="store_true",
                   help="CUDA/ROCm: float16 autocast backbones (the head stays float32) for every "
                        "PyTorch variant, GradScaler in training, --fp16 in the inference script; "
                        "float32 is timed too")
    g.add_argument("--weights", help="benchmark this model (.pth checkpoint or Keras .h5) instead "
                                     "of random weights; the Keras side keeps its own weights")
    g = p.add_argument_group("measurement")
    g.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (median reported)")
    g.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    g.add_argument("--min-time", type=float, default=0.5,
                   help="a timed sample repeats a call faster than this (seconds, measured in the "
                        "warm-up) and reports the mean: one 30 ms batch-1 forward is mostly noise")
    g.add_argument("--no-keras", action="store_true", help="skip the Keras comparison")
    g.add_argument("--no-train", action="store_true", help="skip the training-step comparison")
    g.add_argument("--no-e2e", action="store_true", help="skip the inference-script run")
    g.add_argument("--compile", action="store_true",
                   help="also time CRBL with torch.compile'd backbones, as inference --compile "
                        "(CPU/CUDA; a minute of compiling per size and batch)")
    g.add_argument("--busy", type=int, default=0, metavar="N",
                   help="N processes busy-looping on the CPU during the measurement, as on a "
                        "machine that is not idle")
    g = p.add_argument_group("output")
    g.add_argument("--json", default="benchmark_CRBL.json", help="where to write all results")
    g.add_argument("--markdown", metavar="PATH", default=None,
                   help="also write the results as a Markdown table with the machine, the date "
                        "and this command (the README's performance table)")
    p.add_argument("--worker", choices=["torch", "keras"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args) -> None:
    from model_pytorch_directml import CRBLError
    if min(args.sizes) < 32:
        raise CRBLError(f"--sizes {min(args.sizes)} is too small; EfficientNetB0 needs >= 32 px")
    if (min(args.batch_sizes) < 1 or args.threads < 1 or args.repeats < 1 or args.warmup < 0
            or args.min_time < 0):
        raise CRBLError("--batch-sizes, --threads and --repeats must be >= 1, --warmup and "
                        "--min-time >= 0")
    if args.amp and args.device.split(":")[0] in ("cpu", "dml", "directml"):
        raise CRBLError(f"--amp needs a CUDA/ROCm GPU (float16 autocast); --device {args.device} "
                        "runs float32: leave --amp out")
    if min(args.workers) < -1:
        raise CRBLError(f"--workers {min(args.workers)}: give 0 or more processes, or -1 for auto")
    if args.weights and not Path(args.weights).is_file():
        raise CRBLError(f"--weights {args.weights}: no such file")
    if args.busy < 0:
        raise CRBLError(f"--busy {args.busy}: give 0 or more processes")


# --------------------------------------------------------------------------------------------
# Workers (separate processes): one timed sample per request line ("what" or "what xN")
# --------------------------------------------------------------------------------------------

def make_images(n: int, size: int, seed: int) -> np.ndarray:
    """Random RGB images of 6×6 flat blocks, (N,S,S,3) float32 in [0,1], identical for both
    frameworks. Not pixel noise: it drives features far out of range (see export_onnx)."""
    coarse = np.random.default_rng(seed).random((n, 6, 6, 3), dtype=np.float32)
    idx = np.minimum((np.arange(size) * 6) // size, 5)
    return np.ascontiguousarray(coarse[:, idx][:, :, idx])


def batch_images(size: int, batch: int) -> np.ndarray:
    """The timed batch: the same images in the PyTorch and Keras workers and the CPU reference."""
    return make_images(batch, size, seed=batch)


def peak_rss_mb() -> float | None:
    """This process's resident-set high-water mark so far (MB), where the OS tells it.

    Linux: VmHWM, the high-water mark of this program's own memory. Not ru_maxrss there: Linux
    carries it over from the parent through fork and exec, so a worker started by an 840 MB
    benchmark process reported at least 840 MB whatever it used itself."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:  # not Linux
        pass
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs kB
    except ImportError:  # Windows
        try:
            import psutil
            return psutil.Process().memory_info().peak_wset / 2**20
        except (ImportError, AttributeError):
            return None


class TorchWorker:
    """The PyTorch side, through the scripts' own functions: the inference runner
    (prepare_for_inference), the inference script's run, the training script's step."""

    def __init__(self, args):
        import torch
        from model_pytorch_directml import CRBLError, get_device
        self.torch, self.args = torch, args
        torch.set_num_threads(args.threads)
        self.device = get_device(args.device)
        if args.amp and not self.device.cuda_like:
            raise CRBLError(f"--amp needs a CUDA/ROCm GPU; --device {args.device} gave {self.device}")
        self.amp = args.amp
        self.size, self.batch, self.workdir = args.size, args.batch, Path(args.workdir)
        self.checkpoint = Path(self.args.model_dir) / "crbl.pth"
        self.runner = self._runner(fp16=args.amp)
        self.runner_fp32 = self._runner() if args.amp else self.runner
        self.x = self._tensor(batch_images(self.size, self.batch))
        self.compiled = None

    def _runner(self, **options):
        """The checkpoint prepared as the inference script prepares it."""
        from fast_paths_pytorch_directml import prepare_for_inference
        from model_pytorch_directml import load_model
        model = load_model(self.checkpoint, self.device.device)
        # threads as the script chooses them: --threads, less the CPUs other processes keep busy
        return prepare_for_inference(model, self.device, batch_size=self.batch, **options)

    def _tensor(self, images: np.ndarray):
        x = self.torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device.device)
        # NHWC numpy viewed as NCHW is channels_last already; DirectML wants plain NCHW.
        return x.contiguous() if self.device.kind == "dml" else x

    def ready(self) -> dict:
        import torch
        from fast_paths_pytorch_directml import keep_freed_memory
        return {"device": str(self.device), "torch": torch.__version__, "amp": self.amp,
                "threads": torch.get_num_threads(), "plan": str(self.runner.plan),
                "channels_last": self.runner.model.channels_last,
                # the runner set it; asking again only reports whether it took
                "keep_freed_memory": keep_freed_memory() if self.device.kind == "cpu" else None}

    @property
    def fused_head(self) -> bool | None:
        """Whether the runner's plan runs the numba head (CPU only)."""
        return self.runner.plan.head == "numba" if self.device.kind == "cpu" else None

    @property
    def peak_gpu_mb(self) -> float | None:
        """CUDA/ROCm memory high-water mark of this process (tensors, not the CUDA context)."""
        cuda = self.torch.cuda
        return cuda.max_memory_allocated(self.device.device) / 2**20 if self.device.cuda_like \
            else None

    def sync(self, t) -> None:
        t.flatten()[0].item()  # waits for the device queue (CUDA, DirectML); no-op on CPU

    def run(self, what: str):
        torch, runner = self.torch, self.runner
        if what == "train":
            return self.train_step()
        with torch.inference_mode():
            if what == "forward":
                self.sync(runner(self.x))
            elif what == "forward_fp32":
                self.sync(self.runner_fp32(self.x))
            elif what == "backbones":  # the practical limit: both backbones, as CRBL runs them
                self.sync(runner.features(self.x)[1])  # (one twin network on small CPU batches)
            elif what == "compiled":
                self.sync(self.compiled_runner()(self.x))
            elif what == "forward_n":
                for chunk in self.e2e_tensors():
                    self.sync(runner(chunk))
            elif what.startswith("e2e_fresh_workers"):  # e.g. "e2e_fresh_workers2"
                return self.end_to_end(self.e2e_files(), self.args.e2e_images,
                                       int(what.removeprefix("e2e_fresh_workers")), fresh=True)
            elif what == "e2e":
                return self.end_to_end(self.e2e_files(), self.args.e2e_images)
            elif what == "e2e_one_batch":  # start-up and first-batch latency
                return self.end_to_end(self.workdir / "one_batch", self.batch)
            elif what in ("probs", "probs_amp"):
                chosen = runner if what == "probs_amp" else self.runner_fp32
                return torch.sigmoid(chosen(self.x)).flatten().tolist()
            else:
                raise ValueError(what)

    def compiled_runner(self):
        """The checkpoint prepared as inference --compile prepares it; the first call compiles
        (the warm-up rounds pay for it)."""
        if self.compiled is None:
            self.compiled = self._runner(fp16=self.amp, compile=True)
        return self.compiled

    def e2e_files(self) -> Path:
        """N PNG files in images/, and the first batch of them again in one_batch/ (a sibling:
        the script scans folders recursively, so a subfolder would be scored in the N run)."""
        folder = self.workdir / "images"
        if not folder.is_dir():
            from PIL import Image
            for sub in (folder, self.workdir / "one_batch"):
                sub.mkdir(parents=True)
            # Files twice the model size, like larger photos: decoding and resizing are timed.
            for i, img in enumerate(make_images(self.args.e2e_images, 2 * self.size, seed=7)):
                for sub in (folder, self.workdir / "one_batch") if i < self.batch else (folder,):
                    Image.fromarray((img * 255).astype(np.uint8)).save(sub / f"{i:05d}.png")
        return folder

    def e2e_tensors(self):
        self.e2e_files()
        if not hasattr(self, "_e2e_x"):
            from dataset_pytorch_directml import preprocess_image
            files = sorted((self.workdir / "images").glob("*.png"))
            x = np.stack([preprocess_image(f, self.size).permute(1, 2, 0).numpy() for f in files])
            self._e2e_x = [self._tensor(x[i:i + self.batch]) for i in range(0, len(x), self.batch)]
        return self._e2e_x

    def end_to_end(self, folder: Path, expected_images: int, workers: int | None = None,
                   fresh: bool = False) -> float:
        """Run the inference script on `folder`; returns the seconds of its scoring loop
        (decoding, resizing, forwards, CSV rows; DataLoader workers start inside it): the run less
        imports, model loading and folding, whose time varies by ~0.1 s from run to run.
        workers: its --workers, by default the first of the benchmark's --workers.
        fresh: in a new process, as a user runs it. DataLoader workers are forked processes: forked
        from this one, after many forwards, the first forward then copies every page the
        allocator reuses (copy-on-write; +0.32 s on a 0.11 s forward at 128 px, batch 32), a
        cost a fresh run, which forks before its first forward, does not have."""
        output = self.workdir / "predictions.csv"
        argv = ["--weights", str(self.checkpoint), "--input", str(folder), "--output", str(output),
                "--device", self.args.device, "--batch-size", str(self.batch), "--no-progress",
                "--workers", str(self.args.workers[0] if workers is None else workers)]
        argv += ["--fp16"] if self.amp else []
        if fresh:
            code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
                    "import benchmark_CRBL; print(benchmark_CRBL.scoring_loop_seconds(sys.argv[2:]))")
            done = subprocess.run([sys.executable, "-c", code, str(self.args.threads), *argv],
                                  cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"inference script failed:\n{done.stderr[-2000:]}")
            seconds = float(done.stdout.split()[-1])
        else:
            seconds = scoring_loop_seconds(argv)
        rows = len(output.read_text(encoding="utf-8-sig").splitlines()) - 1  # minus the header
        if rows != expected_images:  # the images/s figures assume exactly this many
            raise RuntimeError(f"the inference script scored {rows} images, expected {expected_images}")
        return seconds

    def train_step(self) -> None:
        torch = self.torch
        import train_CRBL_pytorch_directml as train
        if not hasattr(self, "optimizer"):
            from model_pytorch_directml import freeze_backbones, load_model
            self.train_model = train.prepare_for_training(load_model(self.checkpoint), self.device)
            freeze_backbones(self.train_model, "crop")
            self.train_model.train()
            # The training script's defaults: AdamW 1e-4 / 1e-6, smoothing 0.125, c0 = 0.88.
            params = [p for p in self.train_model.parameters() if p.requires_grad]
            self.optimizer = train.make_optimizer(params, 1e-4, 1e-6, self.device.kind)
            self.weights = train.class_weights_from_prior(0.88)
            self.labels = (torch.arange(self.batch) % 2).float().to(self.device.device)
            self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        _, loss = train.train_step(self.train_model, self.x, self.labels, self.optimizer,
                                   self.scaler, self.device, self.amp, 0.125, self.weights)
        self.sync(loss)


def scoring_loop_seconds(argv: list[str]) -> float:
    """The inference script's steps on argv (its run()); the seconds its scoring loop took."""
    import inference_CRBL_pytorch_directml as inference
    result = inference.run(inference.parse_args(argv))
    if result.exit_code != 0:
        raise RuntimeError(f"inference script exited with {result.exit_code}")
    return result.scoring_seconds


class Unavailable(Exception):
    """The Keras stack is not installed: the comparison is skipped, the benchmark goes on."""


class KerasWorker:
    def __init__(self, args):
        sys.path.insert(0, str(ROOT / "tests"))
        try:
            import tensorflow as tf
            from keras_reference import bilinear, build_qubvel, synthetic_images
        except ImportError as exc:
            raise Unavailable(f"Keras comparison skipped ({exc}); install requirements-dev.txt "
                            "or pass --no-keras") from None
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        if args.device == "cpu":
            tf.config.set_visible_devices([], "GPU")
        self.tf, self.batch = tf, args.batch
        weights = Path(args.model_dir) / "keras.weights.h5"
        # The first worker of a size calibrates BN statistics (features in a realistic range)
        # and saves the weights; the timed ones load them, calibrating just one image.
        calib = synthetic_images(1 if weights.is_file() else 16, args.size, seed=1) / 255.0
        keras, _, inp, (b1, b2) = build_qubvel(args.size, calib.astype("float32"),
                                               np.random.default_rng(0))
        z = keras.layers.Lambda(bilinear, name="lambda")([b1(inp), b2(inp)])
        pred = keras.layers.Dense(1, activation="sigmoid", name="predictions")(
            keras.layers.Dropout(0.5)(z))
        self.model = keras.Model(inp, pred)
        if weights.is_file():
            self.model.load_weights(str(weights))
        else:
            self.model.save_weights(str(weights))
        self.model.compile(optimizer=keras.optimizers.Adam(1e-4, weight_decay=1e-6),
                           loss=keras.losses.BinaryCrossentropy(label_smoothing=0.125))
        self.infer = tf.function(lambda x: self.model(x, training=False))
        self.x = tf.constant(batch_images(args.size, args.batch))
        self.y = tf.constant((np.arange(args.batch) % 2).astype("float32")[:, None])
        c0 = 0.88
        self.class_weight = {0: 1 / (2 * c0), 1: 1 / (2 * (1 - c0))}  # the original's weights

    def ready(self) -> dict:
        import tf_keras
        tf = self.tf
        return {"tensorflow": tf.__version__, "keras": f"tf-keras {tf_keras.__version__}",
                "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                            tf.config.threading.get_inter_op_parallelism_threads()],
                "devices": [d.device_type for d in tf.config.get_visible_devices()]}

    def run(self, what: str):
        if what == "forward":
            self.infer(self.x).numpy()
        elif what == "train":
            self.model.train_on_batch(self.x, self.y, class_weight=self.class_weight)
        elif what == "probs":
            return self.infer(self.x).numpy().flatten().tolist()
        else:
            raise ValueError(what)


def serve(args) -> int:
    """Worker main: build, say ready, then answer one JSON line per request line on stdin."""
    channel, sys.stdout = sys.stdout, sys.stderr  # library prints must not corrupt the channel

    def send(obj) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    try:
        worker = (TorchWorker if args.worker == "torch" else KerasWorker)(args)
    except Exception as exc:  # CRBLError from the model module, or Unavailable
        if type(exc).__name__ not in ("CRBLError", "Unavailable"):
            raise
        send({"error": str(exc), "unavailable": isinstance(exc, Unavailable)})
        return 2
    send({"ready": worker.ready(), "peak_rss_mb": peak_rss_mb()})
    for line in sys.stdin:
        what = line.strip()
        if what == "quit":
            break
        if what == "memory":
            send({"peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": getattr(worker, "peak_gpu_mb", None),
                  "fused_head": getattr(worker, "fused_head", None)})
            continue
        what, _, calls = what.partition(" x")
        calls = int(calls or 1)
        start = time.perf_counter()
        for _ in range(calls):
            value = worker.run(what)
        send({"seconds": (time.perf_counter() - start) / calls, "value": value})
    return 0


# --------------------------------------------------------------------------------------------
# Parent: start workers, interleave their calls, summarise
# --------------------------------------------------------------------------------------------

class Worker:
    """A worker process and its request/answer pipe."""

    def __init__(self, kind: str, size: int, batch: int, e2e_images: int, workdir: Path, args):
        workdir.mkdir(exist_ok=True)
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
        self.kind, self.log = kind, tempfile.TemporaryFile("w+")
        command = ([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                    "--size", str(size), "--batch", str(batch), "--workdir", str(workdir),
                    "--model-dir", str(workdir.parent),
                    "--device", args.device, "--threads", str(args.threads),
                    "--e2e-images", str(e2e_images), "--workers", *map(str, args.workers)]
                   + (["--amp"] if args.amp else []))
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=ROOT)
        self.info = self.ask(None)

    def ask(self, request: str | None) -> dict:
        if request is not None:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            raise RuntimeError(f"{self.kind} worker died (exit {self.proc.returncode}):\n{tail}")
        answer = json.loads(line)
        if "error" in answer:
            from model_pytorch_directml import CRBLError
            self.proc.wait()
            raise (Unavailable if answer["unavailable"] else CRBLError)(answer["error"])
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask_quit()
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
        self.log.close()

    def ask_quit(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def interleaved(variants: dict[str, tuple[Worker, str]], warmup: int, repeats: int,
                min_time: float = 0.0, values: dict[str, list] | None = None
                ) -> dict[str, list[float]]:
    """Seconds per call of each variant: rounds of one sample each, order rotated every round.
    A sample repeats a call that the warm-up found faster than min_time, and is the mean.
    `values`, if given, collects what each timed sample's (last) call returned."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    calls = dict.fromkeys(names, 1)
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            worker, request = variants[name]
            answer = worker.ask(f"{request} x{calls[name]}")
            seconds = answer["seconds"]
            if r < warmup:
                calls[name] = max(1, min(100, round(min_time / max(seconds, 1e-6))))
            else:
                times[name].append(seconds)
                if values is not None:
                    values.setdefault(name, []).append(answer["value"])
    return times


def make_model_files(size: int, model_dir: Path, args, notes: list[str]) -> None:
    """keras.weights.h5 (the original architecture, random weights) and crbl.pth converted from
    it, once per size: every batch size runs the same weights, and no timed worker's peak memory
    includes building or converting them. Without Keras: a random PyTorch model. --weights: the
    user's model, set to this image size (the inference script resizes to the model's size)."""
    from convert_h5_to_pth import convert
    model_dir.mkdir()
    if not args.no_keras:
        try:
            Worker("keras", size, 1, 0, model_dir / "build", args).close()  # builds, saves, quits
        except Unavailable as exc:
            notes.append(str(exc))
            args.no_keras = True
    if args.weights and Path(args.weights).suffix.lower() == ".pth":
        from model_pytorch_directml import load_model, save_checkpoint
        model = load_model(args.weights)
        model.config.image_size = size
        save_checkpoint(model_dir / "crbl.pth", model, threshold=model.meta.get("threshold"))
    elif args.weights:
        convert(args.weights, model_dir / "crbl.pth", image_size=size)
    elif (model_dir / "keras.weights.h5").is_file():
        convert(model_dir / "keras.weights.h5", model_dir / "crbl.pth", image_size=size)
    else:
        import torch
        from model_pytorch_directml import CRBLConfig, CRBLModel, save_checkpoint
        torch.manual_seed(0)
        save_checkpoint(model_dir / "crbl.pth", CRBLModel(CRBLConfig(image_size=size)))


def bench_config(size: int, batch: int, model_dir: Path, args) -> dict:
    """All measurements for one (size, batch), in fresh worker processes."""
    # Enough images for a steady e2e figure: whole runs less a one-batch run gave 0.75-0.77 of the
    # forward over 64 images at 224 px batch 1 and 0.87 over 256, and 0.73-0.96 over 8 batches of
    # 32 at 128 px, whose loop ran at 0.91; the loop is now timed inside each run (end_to_end).
    n_e2e = math.ceil((args.e2e_images or max(256, 16 * batch)) / batch) * batch
    workdir = model_dir / f"batch{batch}"
    workers: list[Worker] = []
    try:
        keras = None
        if not args.no_keras:
            keras = Worker("keras", size, batch, n_e2e, workdir, args)
            workers.append(keras)
        torch_w = Worker("torch", size, batch, n_e2e, workdir, args)
        workers.append(torch_w)
        result = {"size": size, "batch": batch, "device": torch_w.info["ready"]["device"],
                  "torch_info": torch_w.info["ready"],
                  "keras_info": keras.info["ready"] if keras else None}
        times, memory = measure(torch_w, keras, args, result, model_dir / "crbl.pth")
    finally:
        for worker in workers:
            worker.close()
    result.update(summarise(times, memory, batch, n_e2e))
    result["ratios"].update(result.pop("workers_vs_first", {}))
    return result


def measure(torch_w: Worker, keras: Worker | None, args, result: dict, checkpoint: Path
            ) -> tuple[dict, dict]:
    inference = {"backbones": (torch_w, "backbones"), "forward": (torch_w, "forward")}
    if keras:
        inference["keras_forward"] = (keras, "forward")
    if args.compile:
        inference["compiled"] = (torch_w, "compiled")
    if args.amp:
        inference["forward_fp32"] = (torch_w, "forward_fp32")
    # Peak memory of plain inference: one forward each, before torch.compile's compiler runs.
    for worker in (torch_w, keras) if keras else (torch_w,):
        worker.ask("forward")
    answer = torch_w.ask("memory")
    result["torch_info"]["fused_head"] = answer["fused_head"]
    memory = {"torch_inference": answer["peak_rss_mb"], "torch_gpu_inference": answer["peak_gpu_mb"],
              "keras_inference": keras.ask("memory")["peak_rss_mb"] if keras else None}
    times = interleaved(inference, args.warmup, args.repeats, args.min_time)
    # Parity checks, before any training step changes the weights.
    probs = torch_w.ask("probs")["value"]
    if keras and not args.weights:
        diff = np.subtract(probs, keras.ask("probs")["value"])
        result["max_abs_prob_diff_vs_keras"] = float(np.abs(diff).max())
    if not result["device"].startswith("cpu"):
        cpu = cpu_probs(checkpoint, result["size"], result["batch"])
        result["max_abs_prob_diff_vs_cpu"] = float(np.abs(np.subtract(probs, cpu)).max())
        if args.amp:
            amp = torch_w.ask("probs_amp")["value"]
            result["max_abs_prob_diff_amp_vs_cpu"] = float(np.abs(np.subtract(amp, cpu)).max())
    if not args.no_e2e:  # one warm-up: the inference script's first run imports its modules
        loops: dict[str, list] = {}  # the seconds of each run's scoring loop
        # Several --workers: each a fresh run of the script in every round (end_to_end).
        fresh = {f"e2e_fresh_workers{w}": (torch_w, f"e2e_fresh_workers{w}")
                 for w in (args.workers if len(args.workers) > 1 else [])}
        times.update(interleaved({"forward_n": (torch_w, "forward_n"), "e2e": (torch_w, "e2e"),
                                  "e2e_one_batch": (torch_w, "e2e_one_batch"), **fresh}, 1,
                                 args.repeats, values=loops))
        times["e2e_loop"], times["e2e_one_batch_loop"] = loops["e2e"], loops["e2e_one_batch"]
        first = f"e2e_fresh_workers{args.workers[0]}"
        for name in fresh:  # whole scoring loops, worker start-up included, round by round
            times[f"{name}_loop"] = loops[name]
            if name != first:
                result.setdefault("workers_vs_first", {})[
                    f"e2e_workers{name.removeprefix('e2e_fresh_workers')}_vs_workers"
                    f"{args.workers[0]}"] = statistics.median(
                    a / b for a, b in zip(loops[first], loops[name]))
    if not args.no_train:
        train = {"train": (torch_w, "train")}
        if keras:
            train["keras_train"] = (keras, "train")
        times.update(interleaved(train, args.warmup, args.repeats, args.min_time))
        answer = torch_w.ask("memory")
        memory["torch_after_train"], memory["torch_gpu_after_train"] = (answer["peak_rss_mb"],
                                                                        answer["peak_gpu_mb"])
        memory["keras_after_train"] = keras.ask("memory")["peak_rss_mb"] if keras else None
    return times, memory


def cpu_probs(checkpoint: Path, size: int, batch: int) -> list[float]:
    """The benchmark batch through the same checkpoint on the CPU (float32): the GPU's reference."""
    import torch
    from model_pytorch_directml import load_model
    x = torch.from_numpy(batch_images(size, batch)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        return torch.sigmoid(load_model(checkpoint, "cpu")(x)).flatten().tolist()


def summarise(times: dict, memory: dict, batch: int, n_e2e: int) -> dict:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    per_call_images = {"forward_n": n_e2e, "e2e": n_e2e, "e2e_loop": n_e2e}
    per_call_images.update({name: n_e2e for name in med if name.startswith("e2e_fresh_workers")})
    ips = {name: per_call_images.get(name, batch) / s for name, s in med.items()
           if name not in ("e2e_one_batch", "e2e_one_batch_loop")}
    # e2e ratios are taken round by round (a round's three calls run back to back), then the
    # median: a ratio of medians from different rounds carries the machine's drift between
    # rounds (±10 % here) into it twice.
    paired = {}
    if "e2e" in times:
        forward = times["forward_n"]
        paired["e2e_with_startup_vs_forward"] = statistics.median(
            fwd / e2e for e2e, fwd in zip(times["e2e"], forward))
        if n_e2e > batch:
            # The script's steady state: the images after the first batch, in its scoring loop
            # (start-up excluded), whose first batch the one-batch run measures.
            steady = [(n_e2e - batch) / max(loop - one, 1e-9)
                      for loop, one in zip(times["e2e_loop"], times["e2e_one_batch_loop"])]
            ips["e2e_steady"] = statistics.median(steady)
            paired["e2e_vs_forward"] = statistics.median(
                rate * fwd / n_e2e for rate, fwd in zip(steady, forward))

    def ratio(a, b):  # speed of a relative to b
        return ips[a] / ips[b] if a in ips and b in ips else None

    ratios = {"forward_vs_backbones": ratio("forward", "backbones"),
              "forward_vs_keras": ratio("forward", "keras_forward"),
              "compiled_vs_forward": ratio("compiled", "forward"),
              "compiled_vs_keras": ratio("compiled", "keras_forward"),
              "amp_vs_fp32": ratio("forward", "forward_fp32"),
              "e2e_vs_forward": paired.get("e2e_vs_forward"),
              "e2e_with_startup_vs_forward": paired.get("e2e_with_startup_vs_forward"),
              "train_vs_keras_train": ratio("train", "keras_train"),
              "peak_memory_inference_vs_keras": (memory["torch_inference"] / memory["keras_inference"]
                                                 if memory.get("keras_inference") else None)}
    met = {}
    for name, (op, bound) in TARGETS.items():
        if ratios.get(name) is not None:
            met[name] = ratios[name] >= bound if op == ">=" else ratios[name] <= bound
    return {"images_per_s": ips, "median_s": med, "ratios": ratios, "targets_met": met,
            "peak_rss_mb": memory, "e2e_images": n_e2e, "seconds": times}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def load_average() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine() -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"platform": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def fmt(value, pattern="{:.2f}") -> str:
    return "—" if value is None else pattern.format(value)


def table(results: list[dict]) -> str:
    rows = ["| px | batch | CRBL img/s | backbones img/s | CRBL/backbones | Keras img/s | CRBL/Keras "
            "| compiled CRBL/Keras | e2e/forward (with start-up) | train img/s | Keras train img/s "
            "| train/Keras | peak MB inference (torch/Keras) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ips, rat, mem = r["images_per_s"], r["ratios"], r["peak_rss_mb"]
        rows.append(
            f"| {r['size']} | {r['batch']} | {fmt(ips.get('forward'), '{:.1f}')} "
            f"| {fmt(ips.get('backbones'), '{:.1f}')} | {fmt(rat['forward_vs_backbones'])} "
            f"| {fmt(ips.get('keras_forward'), '{:.1f}')} | {fmt(rat['forward_vs_keras'])} "
            f"| {fmt(rat['compiled_vs_keras'])} "
            f"| {fmt(rat['e2e_vs_forward'])} ({fmt(rat['e2e_with_startup_vs_forward'])}) "
            f"| {fmt(ips.get('train'), '{:.1f}')} "
            f"| {fmt(ips.get('keras_train'), '{:.1f}')} | {fmt(rat['train_vs_keras_train'])} "
            f"| {fmt(mem.get('torch_inference'), '{:.0f}')} / {fmt(mem.get('keras_inference'), '{:.0f}')} |")
    if any(r.get("max_abs_prob_diff_vs_cpu") is not None for r in results):
        rows += ["", "| px | batch | float32 img/s | AMP img/s | AMP/float32 | max abs Δprob vs CPU "
                 "(float32 / AMP) | peak GPU MB (inference / training) |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            ips, mem = r["images_per_s"], r["peak_rss_mb"]
            fp32 = ips.get("forward_fp32", None if r["torch_info"]["amp"] else ips.get("forward"))
            amp = ips.get("forward") if r["torch_info"]["amp"] else None
            rows.append(
                f"| {r['size']} | {r['batch']} | {fmt(fp32, '{:.1f}')} | {fmt(amp, '{:.1f}')} "
                f"| {fmt(r['ratios']['amp_vs_fp32'])} | {fmt(r.get('max_abs_prob_diff_vs_cpu'), '{:.1e}')}"
                f" / {fmt(r.get('max_abs_prob_diff_amp_vs_cpu'), '{:.1e}')} "
                f"| {fmt(mem.get('torch_gpu_inference'), '{:.0f}')} / "
                f"{fmt(mem.get('torch_gpu_after_train'), '{:.0f}')} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve(args)
    try:
        from model_pytorch_directml import CRBLError
    except ModuleNotFoundError as exc:
        exit_missing_module(exc)
    try:
        check_args(args)
        report = {"command": "python benchmark_CRBL.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "date": time.strftime("%Y-%m-%d"),
                  "machine": machine(), "load_average_before": load_average(), "notes": [],
                  "settings": {k: v for k, v in vars(args).items()
                               if k not in ("worker", "size", "batch", "workdir", "model_dir")},
                  "targets": {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()}, "results": []}
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="crbl-bench-") as tmp, busy_processes(args.busy):
            for size in args.sizes:
                make_model_files(size, Path(tmp) / f"{size}px", args, report["notes"])
                for batch in args.batch_sizes:
                    result = bench_config(size, batch, Path(tmp) / f"{size}px", args)
                    report["results"].append(result)
                    Path(args.json).write_text(json.dumps(report, indent=2))  # partial results survive
                    print(f"{size} px, batch {batch} on {result['device']}: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in result["ratios"].items() if v is not None),
                          file=sys.stderr, flush=True)
        report["load_average_after"] = load_average()
        report["wall_s"] = round(time.perf_counter() - started, 1)
        Path(args.json).write_text(json.dumps(report, indent=2))
    except CRBLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"device: {report['results'][0]['device']}; threads {args.threads}; load average "
          f"{report['load_average_before']} -> {report['load_average_after']}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(table(report["results"]))
    print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report), encoding="utf-8")
        print(f"wrote {args.markdown}")
    return 0


@contextlib.contextmanager
def busy_processes(n: int):
    """n processes spinning in a Python loop until the block ends: a machine that is not idle."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def markdown(report: dict) -> str:
    """The results as the README shows them: what ran where and when, then the table."""
    m, settings = report["machine"], report["settings"]
    busy = f", {settings['busy']} busy-looping processes beside it" if settings["busy"] else ""
    return (f"Measured {report['date']} on {m['cpu']} ({m['logical_cpus']} logical CPUs, "
            f"{m['platform']}), Python {m['python']}, torch {report['results'][0]['torch_info']['torch']}"
            f", {settings['threads']} threads{busy}:\n`{report['command']}`\n\n"
            + table(report["results"]) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
