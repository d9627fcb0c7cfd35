"""Score images with a CRBL checkpoint on DirectML, CUDA/ROCm or CPU.

    python inference_CRBL_pytorch_directml.py --weights crbl.pth --input photos/
    python inference_CRBL_pytorch_directml.py --weights crbl.pth --input test_CRBL.csv --image-dir images --output preds.csv
    python inference_CRBL_pytorch_directml.py --weights crbl.pth --input one.jpg --model-type crop --device cpu
    python inference_CRBL_pytorch_directml.py --weights crbl.pth --input mvtec/bottle/test --heatmaps maps/

--input is one image, a folder (recursive) or a CSV manifest (`image_path`, optional `impurity`).
A folder scan picks up every image format the installed Pillow (and OpenCV) reads; the files it
leaves out are counted by reason (--list-skipped names them all).
The output CSV (UTF-8 with BOM, so Excel shows Korean names) gets one row per input image, in
input order, written as it goes: image_path, score, prediction, label, error (why it was not
scored), note (what a decoder warned about a scored file). With labels it also writes
<output>_metrics.json and <output>_roc.png, _pr.png, _hist.png.
--heatmaps DIR writes an overlay per scored image (where the model sees the impurity) and the
columns peak_x, peak_y; where defect masks exist (a `mask_path` column, or MVTec AD's
ground_truth/ beside test/) the metrics add pixel AUROC, the pointing game and _heatmaps.png.
Exit status: 0 done; 1 some images failed and --strict was given; 2 user error; 130 interrupted.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import torch
    from torch.utils.data import DataLoader

    from dataset_pytorch_directml import (Sample, TestDataset, compute_metrics, describe_skipped,
                                          loader_workers, read_manifest, save_metric_plots,
                                          scan_folder)
    from fast_paths_pytorch_directml import prepare_for_inference
    from heatmaps_pytorch_directml import (CHECK_PEAKS, DEFAULT_HEATMAP_METHOD, HEATMAP_METHODS,
                                           HeatmapWriter, anomaly_maps, mvtec_mask,
                                           save_localisation_plot)
    from model_pytorch_directml import (MODEL_TYPE_THRESHOLDS, CRBLError, HelpFormatter,
                                        get_device, load_model)
except ModuleNotFoundError as exc:  # a Python without the requirements, e.g. outside the venv
    from setup_amd_gpu_directml import exit_missing_module
    exit_missing_module(exc)

OUTPUT_COLUMNS = ("image_path", "score", "prediction", "label", "error", "note")
HEATMAP_COLUMNS = ("peak_x", "peak_y")  # with --heatmaps: the map's peak in the image's pixels
# Images fetched at once without DataLoader workers (make_loader): each fetch has a fixed cost
# that small batches would otherwise pay per image; more than 8 gained nothing.
DECODE_AHEAD = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     usage="%(prog)s --weights PTH --input PATH [options]",
                                     formatter_class=HelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--weights", required=True, help="CRBL checkpoint (.pth) from training or "
                    "convert_h5_to_pth.py")
    io.add_argument("--input", required=True, help="an image, a folder (searched recursively) or "
                    "a CSV manifest with image_path and optional impurity/label")
    io.add_argument("--image-dir", default=None, help="folder the CSV's image_path values are "
                    "relative to (default: the CSV's own folder)")
    io.add_argument("--output", default="predictions.csv", help="output CSV; metrics and plots "
                    "go beside it when labels are known")
    decision = parser.add_argument_group("decision")
    decision.add_argument("--threshold", type=float, default=None, help="anomaly if score >= "
                          "threshold (default: the checkpoint's, chosen on validation; else 0.5)")
    decision.add_argument("--model-type", choices=sorted(MODEL_TYPE_THRESHOLDS), default=None,
                          help="use the original threshold preset (crop 0.01, full 0.5) "
                          "instead of the checkpoint's")
    heat = parser.add_argument_group("heatmaps (where the impurity is)")
    heat.add_argument("--heatmaps", metavar="DIR", default=None, help="write an overlay PNG per "
                      "scored image to DIR (its map, peak, score and verdict) and add peak_x, "
                      "peak_y to the CSV; with masks (mask_path column or MVTec ground_truth/) "
                      "the metrics add pixel AUROC and the pointing game")
    heat.add_argument("--heatmap-method", choices=HEATMAP_METHODS, default=DEFAULT_HEATMAP_METHOD,
                      help=f"evidence-checked: the evidence map with its {CHECK_PEAKS} strongest "
                      "peaks checked by blurring each out and scoring again (as many more "
                      "forwards a batch); "
                      "evidence: the gradient of what the head's weights read, its "
                      "normalisation held; gradient: the exact |d logit / d pixel|")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", default="auto", help="auto, dml[:N], cuda[:N], rocm or cpu")
    runtime.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    runtime.add_argument("--workers", type=int, default=-1, help="DataLoader processes decoding "
                         "images while the model runs; -1 = auto: min(8, cores - 1) for a GPU, "
                         "min(4, cores // 8) on CPU")
    runtime.add_argument("--fp16", action="store_true", help="half-precision backbones on CUDA/"
                         "ROCm/DirectML (bilinear pooling and head stay float32)")
    runtime.add_argument("--compile", action="store_true", help="torch.compile the backbones "
                         "and head (needs a C++ compiler on the CPU, Triton on CUDA; not DirectML); "
                         "the first run compiles for about a minute: for large jobs")
    runtime.add_argument("--strict", action="store_true", help="exit with status 1 when any "
                         "image could not be scored")
    runtime.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    runtime.add_argument("--list-skipped", action="store_true", help="name every file a folder "
                         "scan left out, with the reason (default: a count per reason and a few "
                         "names)")
    return parser.parse_args(argv)


def check_args(args) -> None:
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise CRBLError(f"--threshold {args.threshold} is outside [0, 1]; scores are probabilities")
    if args.batch_size < 1:
        raise CRBLError(f"--batch-size must be >= 1, got {args.batch_size}")
    if Path(args.output).is_dir():
        raise CRBLError(f"--output {args.output} is a folder; give a file name such as preds.csv")
    if not Path(args.input).exists():
        raise CRBLError(f"--input {args.input}: not found; give an image, a folder or a CSV file")
    if args.image_dir is not None and not is_manifest(args.input):
        raise CRBLError("--image-dir only applies when --input is a CSV manifest; drop it")
    if args.image_dir is not None and not Path(args.image_dir).is_dir():
        raise CRBLError(f"--image-dir {args.image_dir}: folder not found")
    if args.heatmaps is not None and Path(args.heatmaps).is_file():
        raise CRBLError(f"--heatmaps {args.heatmaps} is a file; give a folder for the overlays")
    if args.heatmaps is not None and args.compile:
        raise CRBLError("--compile and --heatmaps do not go together (the maps take a backward "
                        "pass the compiled plan does not have); leave one out")


def is_manifest(input_path: str) -> bool:
    return Path(input_path).is_file() and Path(input_path).suffix.lower() == ".csv"


def collect_samples(args) -> list[Sample]:
    """Samples in input order; nothing is decoded here."""
    source = Path(args.input)
    if is_manifest(args.input):
        samples = read_manifest(source, args.image_dir, masks=True)
    elif source.is_dir():
        samples, skipped = scan_folder(source)
        report_skipped(skipped, source, args.list_skipped)
        samples = [with_mvtec_truth(s) for s in samples]
    else:
        samples = [Sample(source, args.input, None)]
    if not samples:
        raise CRBLError(f"--input {source}: no images found (no file with an image extension "
                        "such as .png, .jpg, .tif, .bmp)")
    return samples


def with_mvtec_truth(sample: Sample) -> Sample:
    """An image of MVTec AD's test layout gets its label (good = 0) and defect mask."""
    truth = mvtec_mask(sample.path)
    return sample if truth is None else Sample(sample.path, sample.image_path, *truth)


def report_skipped(skipped, source: Path, list_all: bool) -> None:
    """Every file the scan left out is accounted for: a count per reason, or each one."""
    if not skipped:
        return
    print(f"skipped {plural(len(skipped), 'file')} under {source} (not scored, no row):")
    if list_all:
        for path, reason in skipped:
            print(f"  {path}: {reason}")
    else:
        print(describe_skipped(skipped) + "\n  (--list-skipped names them all)")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def resolve_threshold(cli_threshold: float | None, meta: dict, model_type: str | None = None
                      ) -> tuple[float, str]:
    """Threshold and where it came from: --threshold, else --model-type preset, else the
    checkpoint's (chosen on validation), else 0.5."""
    if cli_threshold is not None:
        return float(cli_threshold), "--threshold"
    if model_type is not None:
        return MODEL_TYPE_THRESHOLDS[model_type], f"--model-type {model_type} preset"
    if meta.get("threshold") is not None:
        return float(meta["threshold"]), f"checkpoint ({meta.get('threshold_source') or 'stored'})"
    return 0.5, "default 0.5"


def compile_now(runner, device, batch_size: int) -> None:
    """--compile: compile now, on a black batch of batch_size (every forward is then padded to
    it), so a missing compiler stops before any output."""
    size = runner.model.config.image_size
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            runner(torch.zeros(batch_size, 3, size, size, device=device.device))
    except Exception as exc:  # inductor: no C++ compiler, no Triton, unsupported op...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CRBLError(f"--compile failed on {device.kind} ({type(exc).__name__}: {reason}); "
                        "torch.compile needs a C++ compiler on CPU and Triton on CUDA/ROCm: "
                        "install one or leave --compile out") from None
    seconds = time.perf_counter() - start
    print(f"compiled the backbones and head for batches of {batch_size} in {seconds:.0f} s")


def make_loader(samples, image_size: int, args, device) -> DataLoader:
    """Batches of decoded images for model_batches. Without worker processes (the CPU default)
    each batch is decoded in one thread per torch thread between two forwards; small batches are
    then fetched several at a time, at least DECODE_AHEAD images (or one per thread), because a
    fetch has a fixed cost: the DataLoader step, the hand-off to the threads, and the OpenMP
    threads that keep their cores for a while after a forward."""
    workers = loader_workers(args.workers, device)
    fetch = args.batch_size
    if not workers["num_workers"]:
        fetch *= math.ceil(max(DECODE_AHEAD, torch.get_num_threads()) / args.batch_size)
    return DataLoader(TestDataset(samples, image_size, notes=True), batch_size=fetch, shuffle=False,
                      **workers)


def model_batches(loader: DataLoader, batch_size: int):
    """The loader's batches split into forwards of batch_size images (the model sees the
    batches it was asked for; each image's probability does not depend on its batch anyway)."""
    for images, indices, errors, notes in loader:
        for start in range(0, len(indices), batch_size):
            end = start + batch_size
            yield images[start:end], indices[start:end], errors[start:end], notes[start:end]


def score_to_csv(runner, samples, args, device, threshold, heatmaps: HeatmapWriter | None = None
                 ) -> tuple[list[float | None], list[str], list[str]]:
    """Score every sample, appending its CSV row batch by batch; returns scores (None where
    the image failed), error reasons and decoder notes. With heatmaps, each scored image also
    gets its overlay and the row its peak."""
    from tqdm import tqdm
    scores: list[float | None] = [None] * len(samples)
    errors: list[str] = [""] * len(samples)
    notes: list[str] = [""] * len(samples)
    peaks: list[tuple[int, int] | None] = [None] * len(samples)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    loader = make_loader(samples, runner.model.config.image_size, args, device)
    with open(output, "w", newline="", encoding="utf-8-sig") as f, \
            tqdm(total=len(samples), unit="img", disable=args.no_progress, file=sys.stderr) as bar, \
            torch.inference_mode():
        writer = csv.writer(f)
        writer.writerow(OUTPUT_COLUMNS + (HEATMAP_COLUMNS if heatmaps else ()))
        for images, indices, batch_errors, batch_notes in model_batches(loader, args.batch_size):
            good = [i for i, err in enumerate(batch_errors) if not err]
            if good:
                x = images[good].to(device.device, non_blocking=device.cuda_like)
                probs, maps = score_batch(runner, x, args.heatmap_method if heatmaps else None,
                                          threshold)
                for i, p, heatmap in zip(good, probs.tolist(), maps):
                    index = int(indices[i])
                    scores[index] = p
                    if heatmaps:
                        peaks[index] = heatmaps.add(samples[index], p, heatmap.numpy())
            for index, err, note in zip(indices.tolist(), batch_errors, batch_notes):
                errors[index], notes[index] = err, note
                row = output_row(samples[index], scores[index], threshold, err, note)
                writer.writerow(row + (list(peaks[index] or ("", "")) if heatmaps else []))
            f.flush()  # a crash or Ctrl-C keeps every finished batch
            bar.update(len(indices))
    return scores, errors, notes


def score_batch(runner, x: torch.Tensor, heatmap_method: str | None, threshold: float
                ) -> tuple[torch.Tensor, torch.Tensor | list]:
    """Probabilities of a batch on the CPU and, given a method, its heatmaps (one read each);
    evidence-checked checks the peaks of the images flagged at the threshold."""
    if heatmap_method is None:
        return torch.sigmoid(runner(x)).flatten().cpu(), [None] * len(x)
    result = anomaly_maps(runner, x, heatmap_method, check_from=threshold)
    return torch.sigmoid(result.logits).cpu(), result.maps.float().cpu()


def output_row(sample: Sample, score: float | None, threshold: float, error: str, note: str = ""
               ) -> list:
    label = "" if sample.label is None else sample.label
    if score is None:
        return [sample.image_path, "", "", label, error, ""]
    return [sample.image_path, repr(score), int(score >= threshold), label, "", note]


def report_metrics(samples, scores, threshold, threshold_source, args,
                   heatmaps: HeatmapWriter | None = None) -> None:
    """Metrics on the labelled, successfully scored images: printed, JSON and PNG plots; with
    heatmaps and masks also the localisation metrics and a few overlays."""
    pairs = [(s.label, p) for s, p in zip(samples, scores) if s.label is not None and p is not None]
    if not pairs:
        return
    labels, probs = zip(*pairs)
    metrics = compute_metrics(labels, probs, threshold)
    metrics["threshold_source"] = threshold_source
    metrics["weights"] = str(args.weights)
    metrics["unscored_labelled_images"] = sum(s.label is not None for s in samples) - len(pairs)
    prefix = Path(args.output).with_suffix("")
    plots = save_metric_plots(labels, probs, threshold, prefix)
    if heatmaps and heatmaps.localisation.masks:
        metrics.update(heatmap_method=args.heatmap_method, **heatmaps.localisation.metrics())
        if heatmaps.examples:
            plots.append(save_localisation_plot(heatmaps.examples, prefix))
    json_path = prefix.with_name(prefix.name + "_metrics.json")
    json_path.write_text(json.dumps(metrics, indent=2), encoding="utf-8")

    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"  # AUROC/AP need both classes
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    print(f"metrics on {metrics['n']} labelled images ({metrics['positives']} anomalies): "
          f"accuracy {fmt(metrics['accuracy'])}, precision {fmt(metrics['precision'])}, "
          f"recall {fmt(metrics['recall'])}, F1 {fmt(metrics['f1'])}, AUROC {fmt(metrics['auroc'])}, "
          f"AP {fmt(metrics['ap'])}")
    print(f"confusion matrix (rows true 0/1, columns predicted 0/1): [[{tn}, {fp}], [{fn}, {tp}]]")
    if "pixel_auroc" in metrics:
        print(f"localisation ({args.heatmap_method} maps): pixel AUROC {fmt(metrics['pixel_auroc'])} "
              f"over {metrics['pixel_metric_images']} images, pointing game "
              f"{fmt(metrics['pointing_game'])} over {metrics['pointing_game_images']} anomalous "
              "images with masks")
    print(f"wrote {json_path} and {', '.join(p.name for p in plots)}")


def summarize(samples, scores, errors, notes, threshold, threshold_source, seconds, args) -> int:
    scored = [p for p in scores if p is not None]
    failed = len(samples) - len(scored)
    anomalies = sum(p >= threshold for p in scored)
    print(f"scored {len(scored)} of {plural(len(samples), 'image')} in {seconds:.1f} s "
          f"({len(samples) / max(seconds, 1e-9):.1f} images/s)")
    print(f"threshold {threshold:g} from {threshold_source}: {anomalies} "
          f"{'anomaly' if anomalies == 1 else 'anomalies'}, {len(scored) - anomalies} normal")
    print(f"wrote {args.output}")
    noted = sum(bool(n) for n in notes)
    if noted:
        print(f"{plural(noted, 'scored image')} got a decoder warning (see the 'note' column)")
    if failed:
        causes: dict[str, list[str]] = {}
        for sample, error in zip(samples, errors):
            if error:
                causes.setdefault(error_kind(error), []).append(sample.image_path)
        print(f"{plural(failed, 'image')} could not be scored (see the 'error' column):")
        for kind, paths in sorted(causes.items(), key=lambda item: -len(item[1])):
            print(f"  {len(paths)} × {kind} (e.g. {', '.join(paths[:3])})")
    return 1 if failed and args.strict else 0


def error_kind(error: str) -> str:
    """An error reason without its details (file-specific numbers and decoder messages)."""
    return error.split(" [decoder said:")[0].split(" (")[0].split(";")[0]


@dataclass
class Run:
    exit_code: int
    scoring_seconds: float | None = None  # the scoring loop: decoding, forwards, CSV rows


def run(args, auto_order: tuple[str, ...] = ("dml", "cuda", "cpu")) -> Run:
    """The script's steps for parsed arguments (main's; the benchmark times the loop here)."""
    try:
        check_args(args)
        device = get_device(args.device, auto_order)
        # The weights are loaded (and a bad file refused) before any image is read.
        model = load_model(args.weights, device.device)
        threshold, threshold_source = resolve_threshold(args.threshold, model.meta, args.model_type)
        samples = collect_samples(args)
        if args.fp16 and device.kind == "cpu":
            print("note: --fp16 ignored on CPU (no float16 speed-up there); running float32")
        batch = min(args.batch_size, len(samples))
        runner = prepare_for_inference(model, device, fp16=args.fp16, batch_size=batch,
                                       compile=args.compile)
        if args.compile:
            compile_now(runner, device, batch)
        print(f"device {device}; {len(samples)} images at {model.config.image_size} px; "
              f"threshold {threshold:g} ({threshold_source}); {runner.plan}")
        start = time.perf_counter()
        heatmaps = HeatmapWriter(args.heatmaps, samples, threshold) if args.heatmaps else None
        scores, errors, notes = score_to_csv(runner, samples, args, device, threshold, heatmaps)
        seconds = time.perf_counter() - start
        report_metrics(samples, scores, threshold, threshold_source, args, heatmaps)
        return Run(summarize(samples, scores, errors, notes, threshold, threshold_source, seconds,
                             args), seconds)
    except CRBLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return Run(2)
    except KeyboardInterrupt:
        print(f"interrupted: the rows finished so far are in {args.output}", file=sys.stderr)
        return Run(130)


def main(argv=None, auto_order: tuple[str, ...] = ("dml", "cuda", "cpu")) -> int:
    return run(parse_args(argv), auto_order).exit_code


if __name__ == "__main__":
    raise SystemExit(main())
