"""train_CRBL_pytorch_directml.py on small synthetic data the tests write (CPU, 32-64 px)."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import read_rows, recalibrated_statistics

import inference_CRBL_pytorch_directml as inference
import train_CRBL_pytorch_directml as train_script
from dataset_pytorch_directml import (ClassBalancedBatchSampler, Sample, TrainDataset,
                                      make_demo_dataset, verify_images)
from model_pytorch_directml import (CRBLConfig, CRBLError, CRBLModel, frozen_batchnorms,
                                    load_checkpoint, save_checkpoint)

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # OpenMP threads wait for each other at every op: on a shared 2-core box a 2-thread training
    # step took 15 s where 1 thread took 1.4 s (measured). One thread keeps this file quick.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(*args) -> int:
    return train_script.main([*map(str, args), "--device", "cpu", "--no-progress"])


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image_path", "impurity"), *rows])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """train/{good,defect} 8 + 8 images, test/{good,defect} 4 + 4."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    make_demo_dataset(root, train_per_class=8, test_per_class=4, size=48, seed=1)
    return root


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """A random CRBL checkpoint with calibrated (non-default) BatchNorm statistics."""
    torch.manual_seed(0)
    model = CRBLModel(CRBLConfig(image_size=SIZE))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.momentum = 1.0
    model.eval()
    for m in norms:
        m.train()
    with torch.no_grad():
        model.features(torch.rand(16, 3, SIZE, SIZE))
    path = tmp_path_factory.mktemp("init") / "init.pth"
    save_checkpoint(path, model.eval())
    return path


@pytest.fixture(scope="module")
def resume_runs(tiny_data, init_checkpoint, tmp_path_factory):
    """2 epochs in one run (0 workers), and 1 epoch (2 workers) + resume to 2."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--data-dir", tiny_data, "--init", init_checkpoint, "--batch-size", 8]
    assert train(*common, "--epochs", 2, "--output-dir", root / "full", "--workers", 0) == 0
    assert train(*common, "--epochs", 1, "--output-dir", root / "part", "--workers", 2) == 0
    first_epoch = load_checkpoint(root / "part" / "last.pth")
    assert train("--resume", root / "part", "--epochs", 2) == 0
    return root / "full", root / "part", first_epoch


# --------------------------------------------------------------------------------------------
# Units: sampler, loss, threshold
# --------------------------------------------------------------------------------------------

def test_sampler_batches_hold_the_class_ratio():
    labels = [0] * 10 + [1] * 3
    for ratio, batch, n0 in ((0.5, 8, 4), (0.25, 8, 2), (0.75, 4, 3)):
        sampler = ClassBalancedBatchSampler(labels, batch, ratio, seed=7)
        batches = list(sampler)
        assert len(batches) == math.ceil(13 / batch) == len(sampler)
        for b in batches:
            assert len(b) == batch and sum(labels[i] == 0 for i, _ in b) == n0
        # each class is a shuffled list used up before it repeats: 10 normals never repeat early
        zeros = [i for b in batches for i, _ in b if labels[i] == 0]
        assert len(set(zeros)) == min(len(zeros), 10)
    sampler = ClassBalancedBatchSampler(labels, 8, 0.5, num_batches=5, seed=7)
    assert len(list(sampler)) == 5
    again = ClassBalancedBatchSampler(labels, 8, 0.5, num_batches=5, seed=7)
    assert list(again) == list(sampler)  # seeded
    again.set_epoch(1)
    assert list(again) != list(sampler)  # another epoch, another draw


def test_sampler_and_augmentation_do_not_depend_on_workers(tiny_data):
    from dataset_pytorch_directml import discover_image_folder, train_augmentation
    samples = discover_image_folder(tiny_data)[0]
    dataset = TrainDataset(samples, SIZE, train_augmentation(SIZE))
    results = []
    for workers in (0, 2):
        sampler = ClassBalancedBatchSampler([s.label for s in samples], 4, 0.5, seed=3)
        sampler.set_epoch(2)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
        results.append([(x.clone(), y.clone()) for x, y in loader])
    for (x0, y0), (x2, y2) in zip(*results):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
        assert int((y0 == 0).sum()) == 2  # 2 normal + 2 anomalies in each batch of 4


def test_loss_is_keras_weighted_smoothed_bce():
    logits, labels = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 1.0])
    w0, w1 = train_script.class_weights_from_prior(0.88)
    assert (w0, w1) == pytest.approx((0.5682, 4.1667), abs=1e-4)
    expected = []
    for z, y in zip(logits.tolist(), labels.tolist()):
        t = y * (1 - 0.125) + 0.0625
        p = 1 / (1 + math.exp(-z))
        expected.append((w1 if y else w0) * -(t * math.log(p) + (1 - t) * math.log(1 - p)))
    loss = train_script.crbl_loss(logits, labels, 0.125, (w0, w1))
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)  # / batch size, as Keras


def test_loss_matches_torch_bce_with_logits_at_extreme_logits():
    # Keras's formula written out (no log_sigmoid, which DirectML lacks): stable where a naive
    # log(sigmoid) is not, and its gradient is sigmoid(x) - t.
    logits = torch.tensor([-120.0, -30.0, -1e-3, 1e-3, 4.0, 30.0, 120.0], requires_grad=True)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    loss = train_script.crbl_loss(logits, labels, 0.125)
    targets = labels * 0.875 + 0.0625
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logits.grad, (torch.sigmoid(logits.detach()) - targets) / 7,
                               rtol=1e-6, atol=1e-9)


def test_adamw_without_lerp_equals_torch_adamw():
    """DirectML's optimiser against torch.optim.AdamW on the CPU: same updates within float
    rounding over steps with changing gradients and a learning-rate change, same state dict."""
    torch.manual_seed(0)
    shapes = [(64, 3, 3, 3), (64,), (1, 4096)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    start = [p.detach().clone() for p in ours]
    opt = train_script.make_optimizer(ours, 1e-3, 1e-2, "dml")
    ref_opt = train_script.make_optimizer(ref, 1e-3, 1e-2, "cpu")
    assert type(opt).__name__ == "AdamWWithoutLerp" and type(ref_opt) is torch.optim.AdamW
    for step in range(12):
        if step == 6:
            for o in (opt, ref_opt):
                o.param_groups[0]["lr"] = 5e-4  # as ReduceLROnPlateau does
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape) * (10.0 ** (step % 3 - 4))  # tiny to ordinary gradients
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q, p0 in zip(ours, ref, start):
        assert (p - p0).abs().mean() > 1e-3  # the weights moved (~lr a step)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # float rounding
    state, ref_state = opt.state_dict(), ref_opt.state_dict()
    assert state["param_groups"] == ref_state["param_groups"]
    for i in range(len(shapes)):
        assert set(state["state"][i]) == set(ref_state["state"][i]) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["state"][i]["step"].item() == ref_state["state"][i]["step"].item() == 12
        torch.testing.assert_close(state["state"][i]["exp_avg_sq"], ref_state["state"][i]["exp_avg_sq"])
    # A run resumes on another device: each optimiser loads the other's state.
    opt.load_state_dict(ref_state)
    ref_opt.load_state_dict(state)


def test_read_once_returns_every_tensor_from_one_copy():
    loss, scores = train_script.read_once(torch.tensor(2.5), torch.tensor([[0.1], [0.9]]))
    assert loss.tolist() == [2.5] and scores.tolist() == pytest.approx([0.1, 0.9])


def test_threshold_rules():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    # best F1 cuts at 0.35 (tp 2, fp 1): the midpoint to the next lower score, 0.1
    assert train_script.choose_threshold(labels, scores, "f1") == pytest.approx(0.225)
    assert train_script.choose_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9], "youden") == pytest.approx(0.45)


# --------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------

def test_resume_equals_uninterrupted_training(resume_runs):
    full_dir, part_dir, first_epoch = resume_runs
    full, resumed = load_checkpoint(full_dir / "last.pth"), load_checkpoint(part_dir / "last.pth")
    assert full["epoch"] == resumed["epoch"] == 2 and first_epoch["epoch"] == 1
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    state_a, state_b = full["optimizer"]["state"], resumed["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert all(torch.equal(state_a[i][k], state_b[i][k]) for k in state_a[i])
    assert full["scheduler"] == resumed["scheduler"]
    assert full["early_stopping"] == resumed["early_stopping"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(full["history"]) == strip(resumed["history"])
    assert len(read_rows(part_dir / "history.csv")) == 2
    # and the second epoch really trained
    changed = [k for k, v in first_epoch["state_dict"].items() if not torch.equal(v, full["state_dict"][k])]
    assert "head.weight" in changed


def test_crop_freezing_matches_keras_layer_150(resume_runs, init_checkpoint):
    full_dir, _, _ = resume_runs
    before = load_checkpoint(init_checkpoint)["state_dict"]
    after = load_checkpoint(full_dir / "last.pth")["state_dict"]
    model = CRBLModel(CRBLConfig(image_size=SIZE))
    counts = train_script.freeze_backbones(model, "crop")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    # Keras layer 150 = block5c_se_expand = timm blocks.4.2.se.conv_expand: from there on
    # (the rest of blocks.4.2, blocks.5, blocks.6, conv_head, bn2) trains, plus the head.
    def expected_trainable(name):
        if name.startswith("head."):
            return True
        body = name.split(".body.", 1)[1]
        return (body.startswith(("blocks.4.2.se.conv_expand.", "blocks.4.2.conv_pwl.", "blocks.4.2.bn3.",
                                 "blocks.5.", "blocks.6.", "conv_head.", "bn2.")))
    assert trainable == {n for n, _ in model.named_parameters() if expected_trainable(n)}
    assert "backbone1.body.blocks.4.2.se.conv_reduce.weight" not in trainable
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)

    for name, value in before.items():
        module = name.rsplit(".", 1)[0]
        frozen = not any(n.startswith(module + ".") for n in trainable)
        if frozen:  # frozen weights and frozen BatchNorm statistics: bit for bit unchanged
            assert torch.equal(value, after[name]), name
        elif name.endswith(("weight", "bias")):
            assert not torch.equal(value, after[name]), name
    # trainable BatchNorms did update their statistics (they run in training mode)
    assert not torch.equal(before["backbone1.body.bn2.running_var"], after["backbone1.body.bn2.running_var"])
    assert torch.equal(before["backbone1.body.blocks.4.2.bn2.running_var"],
                       after["backbone1.body.blocks.4.2.bn2.running_var"])


def test_recalibrate_bn_sets_the_trainable_statistics_and_nothing_else(tiny_data, init_checkpoint,
                                                                      tmp_path):
    common = ["--data-dir", tiny_data, "--init", init_checkpoint, "--batch-size", 8,
              "--workers", 0]
    assert train(*common, "--epochs", 2, "--output-dir", tmp_path / "plain") == 0
    assert train(*common, "--epochs", 2, "--recalibrate-bn", "--output-dir", tmp_path / "recal") == 0
    init, plain, recal = (load_checkpoint(p)["state_dict"] for p in (
        init_checkpoint, tmp_path / "plain" / "last.pth", tmp_path / "recal" / "last.pth"))
    model = CRBLModel(CRBLConfig(image_size=SIZE))
    train_script.freeze_backbones(model, "crop")
    frozen = {name for name, m in model.named_modules() if m in set(frozen_batchnorms(model))}
    for name, value in recal.items():
        if name.endswith(("running_mean", "running_var")):
            if name.rsplit(".", 1)[0] in frozen:  # frozen layers keep the Keras statistics
                assert torch.equal(value, init[name]) and torch.equal(value, plain[name]), name
            else:
                assert not torch.equal(value, plain[name]), name
        elif not name.endswith("num_batches_tracked"):
            # each step's update is the same (the learning rate could first change after a
            # third epoch without improvement, --lr-patience 2)
            assert torch.equal(value, plain[name]), name
    # the statistics are the last weights' on the seeded calibration images
    used, fresh = recalibrated_statistics(tmp_path / "plain" / "last.pth",
                                          common + ["--recalibrate-bn", "--output-dir", tmp_path / "x"])
    assert used == 16  # every training image (at most 128)
    for name, value in fresh.items():
        assert torch.equal(value, recal[name]), name
    # and a resumed run recalibrates as the uninterrupted one did
    assert train(*common, "--epochs", 1, "--recalibrate-bn", "--output-dir", tmp_path / "part") == 0
    assert train("--resume", tmp_path / "part", "--epochs", 2) == 0
    resumed = load_checkpoint(tmp_path / "part" / "last.pth")["state_dict"]
    for name, value in recal.items():
        assert torch.equal(value, resumed[name]), name


def test_demo_learns_and_inference_reproduces_validation_scores(tmp_path, capsys):
    out = tmp_path / "demo"
    assert train("--demo", "--epochs", 2, "--output-dir", out) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["args"]["image_size"] == 64 and config["args"]["model_type"] == "full"
    history = read_rows(out / "history.csv")
    assert len(history) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    for line, row in zip(lines, history, strict=True):  # the F1 the chosen threshold gives
        assert (f"F1 {float(row['val_f1_at_threshold']):.4f} at the threshold chosen this epoch "
                f"({float(row['threshold']):.4g})") in line
    assert float(history[-1]["val_auroc"]) >= 0.9
    assert float(history[1]["val_loss"]) < float(history[0]["val_loss"])  # still learning
    assert (out / "curves.png").stat().st_size > 10_000

    best = load_checkpoint(out / "best.pth")
    assert best["threshold_source"].startswith("validation f1")
    assert best["config"]["image_size"] == 64 and best["model_type"] == "full"
    val = {r["image_path"]: r for r in read_rows(out / "val_predictions.csv")}
    assert len(val) == 48

    preds = tmp_path / "preds.csv"
    assert inference.main(["--weights", str(out / "best.pth"), "--input", str(out / "data" / "test.csv"),
                           "--output", str(preds), "--device", "cpu", "--no-progress"]) == 0
    rows = read_rows(preds)
    assert {r["image_path"] for r in rows} == set(val)
    for r in rows:
        assert float(r["score"]) == pytest.approx(float(val[r["image_path"]]["score"]), abs=1e-5)
        assert r["prediction"] == val[r["image_path"]]["prediction"]
    metrics = json.loads(preds.with_name("preds_metrics.json").read_text())
    assert metrics["threshold"] == pytest.approx(best["threshold"])
    assert metrics["auroc"] == pytest.approx(float(history[int(best["best"]["epoch"]) - 1]["val_auroc"]), abs=1e-6)


def test_csv_without_validation_set_is_split_stratified(tiny_data, tmp_path):
    out = tmp_path / "csv"
    assert train("--train-csv", tiny_data / "train.csv", "--init", "none", "--image-size", SIZE,
                 "--model-type", "full", "--epochs", 1, "--batch-size", 4, "--output-dir", out) == 0
    data = json.loads((out / "train_config.json").read_text())["data"]
    # 16 images, 8 anomalies: --val-split 0.2 holds out 4, half of them anomalies
    assert (data["train_images"], data["train_anomalies"]) == (12, 6)
    assert (data["val_images"], data["val_anomalies"]) == (4, 2)
    val = read_rows(out / "val_predictions.csv")
    assert sorted(r["label"] for r in val) == ["0", "0", "1", "1"]
    assert all(r["image_path"].startswith("train/") for r in val)
    assert len(read_rows(out / "history.csv")) == 1


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, before any training
# --------------------------------------------------------------------------------------------

@pytest.fixture
def images(tiny_data):
    return tiny_data / "train"


def csv_case(tmp_path, rows):
    path = tmp_path / "train.csv"
    write_csv(path, rows)
    return ["--train-csv", path]


@pytest.mark.parametrize("case,message", [
    ("one_class", "none is anomaly (1)"),
    ("missing", "train.csv row 3"),
    ("bad_label", "must be 0 (normal) or 1 (anomaly)"),
    ("empty_dir", "no images found"),
    ("loose_images", "lie outside class folders"),
    ("two_sources", "exactly one data source"),
])
def test_bad_input_is_one_line_error(case, message, tmp_path, images, capsys):
    good = [(f"good/{i:03d}.png", 0) for i in range(4)]
    bad = [(f"defect/{name}", 1) for name in sorted(p.name for p in (images / "defect").iterdir())[:4]]
    if case == "one_class":
        args = csv_case(tmp_path, good) + ["--image-dir", images]
    elif case == "missing":
        args = csv_case(tmp_path, [good[0], ("good/nope.png", 0)] + bad) + ["--image-dir", images]
    elif case == "bad_label":
        args = csv_case(tmp_path, good + [("defect/x.png", 2)]) + ["--image-dir", images]
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args = ["--data-dir", tmp_path / "empty"]
    elif case == "loose_images":
        (tmp_path / "loose").mkdir()
        (tmp_path / "loose" / "x.png").write_bytes((images / "good" / "000.png").read_bytes())
        args = ["--data-dir", tmp_path / "loose"]
    else:
        args = ["--demo", "--data-dir", images]
    assert train(*args, "--output-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "out" / "last.pth").exists()


def test_folder_layouts(tmp_path, images):
    from dataset_pytorch_directml import discover_image_folder
    png = (images / "good" / "000.png").read_bytes()

    def put(*names):
        for name in names:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(png)
    # MVTec AD: train/ has only good images, so train/ and test/ are pooled; masks are ignored
    put("mvtec/train/good/0.png", "mvtec/train/good/1.png", "mvtec/test/good/2.png",
        "mvtec/test/scratch/3.png", "mvtec/test/hole/4.png", "mvtec/ground_truth/scratch/3_mask.png")
    train, val, how = discover_image_folder(tmp_path / "mvtec")
    assert val is None and "MVTec" in how
    assert {(s.image_path, s.label) for s in train} == {
        ("train/good/0.png", 0), ("train/good/1.png", 0), ("test/good/2.png", 0),
        ("test/scratch/3.png", 1), ("test/hole/4.png", 1)}
    # class folders: normal names in any case, every other folder is an anomaly
    put("classes/OK/a.png", "classes/Normal/b.png", "classes/class_0/c.png", "classes/0/d.png",
        "classes/dent/e.png", "classes/1/f.png")
    train, val, _ = discover_image_folder(tmp_path / "classes")
    assert val is None and sorted(s.label for s in train) == [0, 0, 0, 0, 1, 1]
    assert {s.image_path: s.label for s in train}["dent/e.png"] == 1


def test_unreadable_images_warn_a_few_refuse_many(tmp_path, images):
    samples = [Sample(p, p.name, 0) for p in sorted((images / "good").iterdir())]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    kept, bad = verify_images(samples * 3 + [Sample(broken, "broken.png", 1)], "train", progress=False)
    assert len(kept) == 24 and len(bad) == 1 and "broken.png" in bad[0]
    with pytest.raises(CRBLError, match="2 of 10 images are unreadable"):
        verify_images(samples + [Sample(broken, "b1", 1), Sample(broken, "b2", 1)], "train",
                      progress=False)


def test_decoder_warnings_on_training_images_are_reported_not_printed(tiny_data, tmp_path, capfd):
    """A usable training image a decoder warns about (libpng: a chunk's CRC) is kept; the
    warning is summed up in one note line and kept in train_config.json, not on stderr."""
    import shutil

    import odd_files
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)  # the fixture is shared: change a copy
    first = (data / "train.csv").read_text().splitlines()[1].split(",")[0]
    odd_files.png_with_bad_text_crc(data / first)
    out = tmp_path / "run"
    capfd.readouterr()
    assert train("--train-csv", data / "train.csv", "--init", "none", "--image-size", SIZE,
                 "--model-type", "full", "--epochs", 1, "--batch-size", 4, "--output-dir", out) == 0
    stdout, stderr = capfd.readouterr()
    assert "libpng" not in stderr
    note = f"{data / 'train.csv'} row 2: libpng warning: tEXt: CRC error"
    assert f"note: 1 image kept although a decoder warned (all in train_config.json): {note}" in stdout
    assert json.loads((out / "train_config.json").read_text())["data"]["decoder_notes"] == [note]


def test_plots_name_their_numbers_and_use_whole_epochs(tmp_path, monkeypatch):
    """ROC/PR titles carry AUROC/AP; the curves' epoch axis has whole epochs only; the
    learning-rate panel is log-scaled when the rate changed, else says it was constant."""
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, roc_auc_score

    from dataset_pytorch_directml import save_metric_plots
    from train_CRBL_pytorch_directml import plot_curves
    saved = []

    def record(fig, path, **kwargs):
        fig.canvas.draw()
        saved.append({Path(path).name: [(ax.get_title(), ax.get_yscale(), list(ax.get_xticks()))
                                        for ax in fig.axes]})
    monkeypatch.setattr(Figure, "savefig", record)
    labels, scores = [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    save_metric_plots(labels, scores, 0.5, tmp_path / "p")
    titles = {name: panels[0][0] for item in saved for name, panels in item.items()}
    assert titles["p_roc.png"] == f"ROC (AUROC {roc_auc_score(labels, scores):.4f}, 6 images)"
    assert titles["p_pr.png"] == (f"Precision-recall (AP {average_precision_score(labels, scores):.4f}, "
                                  "3 anomalies)")
    keys = ("train_loss", "val_loss", "train_auroc", "val_auroc", "val_ap", "train_f1", "val_f1",
            "val_f1_at_threshold")
    for rates, scale, lr_title in (([1e-4, 1e-4, 5e-5], "log", "learning rate"),
                                   ([1e-4] * 3, "linear", "learning rate (constant 0.0001)")):
        saved.clear()
        plot_curves([dict(dict.fromkeys(keys, 0.5), epoch=e + 1, lr=lr) for e, lr in enumerate(rates)],
                    tmp_path)
        panels = saved[0]["curves.png"]
        assert panels[3][:2] == (lr_title, scale)
        for _, _, ticks in panels:
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
