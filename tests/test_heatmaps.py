"""Heatmaps: the maps point at the defect, masks are found and read, the metrics and overlays
are written, the demo's task defeats a contrast-only map, DirectML runs the maps natively."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_rows
from test_directml_emulated import assert_no_fallback, dml_python, emulate  # noqa: F401

import inference_CRBL_pytorch_directml as inference
from dataset_pytorch_directml import (_demo_shape, _demo_texture, make_demo_dataset,
                                      preprocess_image, read_manifest)
from heatmaps_pytorch_directml import (CHECK_FLOOR, CHECK_RADIUS, HEATMAP_METHODS, Localisation,
                                       anomaly_maps, checked_peaks, gaussian_blur, head_gradients,
                                       hits_mask, mvtec_mask, overlay_path, peak)
from model_pytorch_directml import CRBLError, load_model

WIDTH, HEIGHT = 192, 144  # not square: peaks are scaled back to each image's own pixels


def fixed_task(folder, count=10, seed=3):
    """count textured images, each with one dark blob anywhere, their masks and a CSV with
    mask_path, plus two normal images (empty mask_path)."""
    rng = np.random.default_rng(seed)
    material = {"colour": np.array([130.0, 120.0, 110.0]), "angle": 0.7, "period": 6.0}
    rows = []
    for i in range(count + 2):
        img = _demo_texture(rng, WIDTH, material)[:HEIGHT]
        mask_path = ""
        if i < count:
            cx, cy = rng.uniform(0.15, 0.85) * WIDTH, rng.uniform(0.15, 0.85) * HEIGHT
            cover = _demo_shape(rng, WIDTH, "blob", cx, cy)[:HEIGHT]
            img = img - cover[:, :, None] * 70
            mask_path = f"masks/{i}.png"
            (folder / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray((cover > 0.5).astype(np.uint8) * 255).save(folder / mask_path)
        Image.fromarray(img.clip(0, 255).round().astype(np.uint8)).save(folder / f"{i}.png")
        rows.append((f"{i}.png", int(i < count), mask_path))
    with open(folder / "task.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_path", "impurity", "mask_path"), *rows])
    return folder / "task.csv"


def pointing_game(maps, masks):
    return np.mean([hits_mask(m, *peak(h, WIDTH, HEIGHT), WIDTH, HEIGHT)
                    for h, m in zip(maps, masks)])


def test_maps_point_at_the_defect_and_a_wrong_map_fails(converted_fixture, tmp_path):
    """The evidence map of the converted fixture. (Its random weights score nothing in
    particular, so the default's check, which keeps the peak whose removal lowers the score,
    has nothing to go by here: test_checked_peaks_... tests it with a scorer that does.)"""
    pth = converted_fixture[0]
    task = fixed_task(tmp_path)
    out = tmp_path / "preds.csv"
    assert inference.main([str(a) for a in (
        "--weights", pth, "--input", task, "--output", out, "--device", "cpu",
        "--heatmaps", tmp_path / "maps", "--heatmap-method", "evidence", "--batch-size", 4,
        "--no-progress")]) == 0
    metrics = json.loads((tmp_path / "preds_metrics.json").read_text())
    assert metrics["pointing_game"] >= 0.8 and metrics["pointing_game_images"] == 10
    assert metrics["pixel_auroc"] >= 0.85 and metrics["pixel_metric_images"] == 12
    assert (tmp_path / "preds_heatmaps.png").is_file()
    rows = read_rows(out)
    assert all(Image.open(overlay_path(tmp_path / "maps", r["image_path"])).size
               == (WIDTH, HEIGHT) for r in rows)
    # The same maps from Python (the model, not the script's folded runner: float rounding
    # apart); the CSV's peaks are theirs, in the image's pixels, up to a near tie.
    samples = read_manifest(task, masks=True)[:10]
    model = load_model(pth)
    x = torch.stack([preprocess_image(s.path, 128) for s in samples])
    maps = anomaly_maps(model, x, "evidence").maps.numpy()
    for r, h in zip(rows, maps):
        x_at, y_at = int(r["peak_x"]), int(r["peak_y"])
        assert peak(h, WIDTH, HEIGHT) == (x_at, y_at) or \
            h[y_at * 128 // HEIGHT, x_at * 128 // WIDTH] >= 0.98 * h.max()
    masks = [np.asarray(Image.open(s.mask_path)) > 0 for s in samples]
    assert pointing_game(maps, masks) >= 0.8
    for wrong in (maps[:, :, ::-1], maps[:, ::-1, :], maps.transpose(0, 2, 1),
                  np.ones_like(maps)):
        assert pointing_game(wrong, masks) <= 0.5


@pytest.mark.parametrize("method", HEATMAP_METHODS)
def test_maps_from_the_runner_equal_the_models(converted_fixture, method):
    from fast_paths_pytorch_directml import prepare_for_inference
    from model_pytorch_directml import get_device
    pth, images, _ = converted_fixture
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255
    plain = anomaly_maps(load_model(pth), x, method)
    runner = prepare_for_inference(load_model(pth), get_device("cpu"), batch_size=4)
    with torch.inference_mode():  # as the script calls it
        fast = anomaly_maps(runner, x, method)
    assert torch.allclose(fast.logits, plain.logits, atol=1e-5)
    assert plain.maps.shape == (4, 128, 128) and (plain.maps >= 0).all()
    # folded BatchNorm changes float32 rounding only: each runner peak is a peak of the plain
    # map too (up to a near tie, as the random fixture's exact gradient has one)
    assert ((fast.maps - plain.maps).abs().max() <= 0.05 * plain.maps.max())
    for fast_map, plain_map in zip(fast.maps.numpy(), plain.maps.numpy()):
        x_at, y_at = peak(fast_map, 128, 128)
        assert plain_map[y_at, x_at] >= 0.98 * plain_map.max()


@pytest.mark.parametrize("exact", (True, False))
def test_closed_form_head_gradients_equal_autograd(converted_fixture, exact):
    """exact: d logit / d features as autograd takes it through BilinearPooling and the head;
    the evidence: the same with the L2 normaliser held (detached)."""
    model = load_model(converted_fixture[0]).eval()
    x = torch.from_numpy(converted_fixture[1][:3]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        a, b = model.features(x)
    a[:, 7] = 0  # a channel that never fires: phi is exactly 0 on its row
    a_leaf, b_leaf = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    phi = model.pool.outer(a_leaf, b_leaf).flatten(1)
    y = torch.sign(phi) * torch.sqrt(phi.abs() + model.pool.eps)
    norm = y.norm(dim=1, keepdim=True)
    logit = model.head(y / (norm if exact else norm.detach()))[:, 0]
    want_a, want_b = torch.autograd.grad(logit.sum(), (a_leaf, b_leaf))
    logits, grad_a, grad_b = head_gradients(model, a, b, exact=exact)
    with torch.no_grad():
        assert torch.equal(logits, model.head(model.pool(a, b))[:, 0])
    for got, want in ((grad_a, want_a), (grad_b, want_b)):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # the silent channel gets no gradient (not 1 / sqrt(eps)), the others do
    assert grad_a[:, 7].abs().max() == 0 < grad_a.abs().max() and torch.isfinite(grad_b).all()


def test_checked_peaks_keep_the_peak_whose_removal_lowers_the_score():
    """A map whose strongest peak is on a harmless mark and a weaker one on the defect: the
    check moves the peak to the defect. A normal image, where blurring any spot barely moves
    the score, keeps no more than a little of its map anywhere."""
    size = 64
    x = torch.full((2, 3, size, size), 0.5)
    x[0, :, 44:50, 24:30] = 0.1   # the defect (image 0)
    x[1, :, 44:50, 24:30] = 0.49  # a faint spot in the same place (image 1, normal)
    x[:, :, 10:16, 40:46] = 0.9   # a bright mark on both

    def model(images):  # a toy scorer: how dark the defect's place is
        return 10 * (0.5 - images[:, :, 44:50, 24:30].mean((1, 2, 3))).view(-1, 1)
    maps = torch.zeros(2, 1, size, size)
    maps[:, 0, 13, 43] = 1.0  # the strongest peak, on the mark
    maps[:, 0, 47, 27] = 0.6  # a weaker one, on the defect
    maps = gaussian_blur(maps, 2)[:, 0]
    assert peak(maps[0].numpy(), size, size) == (43, 13)
    out = checked_peaks(model, x, model(x).flatten(), maps)
    assert out.shape == maps.shape and (out >= 0).all()
    x_at, y_at = peak(out[0].numpy(), size, size)
    assert 24 <= x_at < 30 and 44 <= y_at < 50
    torch.testing.assert_close(out[0, 13, 43], maps[0, 13, 43] * CHECK_FLOOR)  # the mark
    assert (out[1] <= 0.2 * maps[1]).all()  # a drop of ~0.1 logit counts a tenth of one of 1


def test_checked_peaks_lie_two_radii_apart():
    """The disks blurred out never overlap: a second peak within two radii of the first is
    skipped (blurring it would blur part of the first)."""
    size = 64
    radius = size * CHECK_RADIUS
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    disks = []

    def model(images):  # records where each check changed the image
        disks.extend((images != x).any(1))
        return torch.zeros(len(images), 1)
    maps = torch.zeros(1, 1, size, size)
    maps[0, 0, 20, 20] = 1.0
    maps[0, 0, 20, 20 + int(1.5 * radius)] = 0.9  # more than one radius away, less than two
    maps[0, 0, 50, 50] = 0.5
    checked_peaks(model, x, torch.zeros(1), gaussian_blur(maps, 1)[:, 0])
    assert len(disks) == 3 and disks[0][20, 20] and disks[1][50, 50]
    for i in range(3):
        for j in range(i):
            assert not (disks[i] & disks[j]).any()


def test_check_from_checks_the_flagged_images_only(converted_fixture):
    model = load_model(converted_fixture[0])
    x = torch.from_numpy(converted_fixture[1][:4]).permute(0, 3, 1, 2).float() / 255
    every = anomaly_maps(model, x, "evidence-checked")
    evidence = anomaly_maps(model, x, "evidence")
    scores = torch.sigmoid(every.logits)
    ordered = scores.sort().values
    threshold = float(ordered[1] + ordered[2]) / 2  # flags 2 of 4
    some = anomaly_maps(model, x, "evidence-checked", check_from=threshold)
    flagged = scores >= threshold
    assert int(flagged.sum()) == 2 and torch.equal(some.logits, every.logits)
    torch.testing.assert_close(some.maps[flagged], every.maps[flagged])
    torch.testing.assert_close(some.maps[~flagged], evidence.maps[~flagged] * CHECK_FLOOR)


def test_peak_is_in_the_original_images_pixels():
    heatmap = np.zeros((4, 4))
    heatmap[1, 3] = 1  # column 3 of 4, row 1 of 4
    assert peak(heatmap, 400, 100) == (350, 37)
    assert peak(heatmap, 4, 4) == (3, 1)


def test_localisation_metrics():
    score = Localisation()
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    good_map = np.where(mask, 1.0, 0.1)
    score.add(good_map, mask, (2, 3), 8, 8)             # peak inside the mask
    score.add(good_map, mask, (7, 7), 8, 8)             # outside
    score.add(np.full((8, 8), 0.05), None, (0, 0), 8, 8)  # a normal image: all pixels normal
    m = score.metrics()
    assert m["pointing_game"] == 0.5 and m["pointing_game_images"] == 2
    assert m["pixel_auroc"] == 1.0 and m["pixel_metric_images"] == 3


def test_mask_path_column_and_its_errors(tmp_path):
    make_demo_dataset(tmp_path, train_per_class=3, test_per_class=3, size=64, seed=2)
    assert all(s.mask_path is None for s in  # training reads it and ignores the column
               read_manifest(tmp_path / "test.csv", require_label=True))
    samples = read_manifest(tmp_path / "test.csv", require_label=True, masks=True)
    assert [s.mask_path is not None for s in samples] == [False] * 3 + [True] * 3
    assert all(np.asarray(Image.open(s.mask_path)).any() for s in samples[3:])
    bad = tmp_path / "bad.csv"
    bad.write_text("image_path,impurity,mask_path\ntest/good/000.png,1,nowhere.png\n")
    with pytest.raises(CRBLError, match=r"bad.csv row 2: column 'mask_path' names .*nowhere.png"):
        read_manifest(bad, masks=True)
    assert len(read_manifest(bad, require_label=True)) == 1  # training: the column is ignored


def test_mvtec_layout_gives_labels_and_masks(tmp_path):
    for rel in ("bottle/test/good/000.png", "bottle/test/broken/000.png",
                "bottle/test/broken/001.png", "bottle/ground_truth/broken/000_mask.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 255).save(tmp_path / rel)
    test = tmp_path / "bottle" / "test"
    assert mvtec_mask(test / "good" / "000.png") == (0, None)
    assert mvtec_mask(test / "broken" / "000.png") == \
        (1, tmp_path / "bottle" / "ground_truth" / "broken" / "000_mask.png")
    assert mvtec_mask(test / "broken" / "001.png") == (1, None)  # no mask file: no ground truth
    assert mvtec_mask(tmp_path / "elsewhere.png") is None


def test_demo_marks_defeat_a_contrast_only_map(tmp_path):
    """With marks, each image carries harmless marks as contrasty as its defect: a map of
    contrast alone rarely points at the defect, so a high pointing game there means the model
    learned."""
    make_demo_dataset(tmp_path, train_per_class=1, test_per_class=24, size=128, seed=0, marks=2)
    samples = [s for s in read_manifest(tmp_path / "test.csv", masks=True) if s.label == 1]
    x = torch.stack([preprocess_image(s.path, 128) for s in samples])
    contrast = gaussian_blur((x - gaussian_blur(x, 8)).norm(dim=1, keepdim=True), 2)[:, 0]
    masks = [np.asarray(Image.open(s.mask_path)) > 0 for s in samples]
    hits = [hits_mask(m, *peak(h, 128, 128), 128, 128) for h, m in zip(contrast.numpy(), masks)]
    assert np.mean(hits) <= 0.5
    for m in masks:  # defects smaller than a quarter of the image side
        rows, cols = np.nonzero(m)
        assert np.ptp(rows) <= 128 / 4 + 6 and np.ptp(cols) <= 128 / 4 + 6


@pytest.mark.parametrize("args, message", [
    (["--heatmaps", "FILE"], "is a file; give a folder"),
    (["--heatmaps", "maps", "--compile"], "--compile and --heatmaps do not go together"),
])
def test_heatmap_option_errors(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("x")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    args = [str(tmp_path / a) if a in ("FILE", "maps") else a for a in args]
    assert inference.main(["--weights", "x.pth", "--input", str(tmp_path / "a.png"), *args]) == 2
    assert message in capsys.readouterr().err


def test_heatmaps_on_dml_have_no_cpu_fallback(dml_python, converted_fixture, tmp_path):
    pth = converted_fixture[0]
    task = fixed_task(tmp_path, count=4)
    # a threshold that flags half of the images: evidence-checked checks those only
    assert inference.main([str(a) for a in ("--weights", pth, "--input", task, "--output",
                                            tmp_path / "plain.csv", "--no-progress")]) == 0
    scores = sorted(float(r["score"]) for r in read_rows(tmp_path / "plain.csv"))
    assert scores[3] - scores[2] > 1e-4  # no near tie: DirectML and the CPU flag alike
    threshold = (scores[2] + scores[3]) / 2
    for method in HEATMAP_METHODS:
        out = tmp_path / f"{method}.csv"
        args = ("--weights", pth, "--input", task, "--output", out, "--heatmaps",
                tmp_path / method, "--heatmap-method", method, "--batch-size", 6,
                "--threshold", threshold, "--no-progress")
        report, _ = emulate(dml_python, tmp_path, "script", "inference_CRBL_pytorch_directml.py",
                            *args, "--device", "dml")
        assert_no_fallback(report)
        assert report["phases"]["score_to_csv"]["to_host"] <= 2  # probabilities and maps
        assert inference.main([*map(str, args), "--output", str(tmp_path / "cpu.csv"),
                               "--device", "cpu"]) == 0
        dml, cpu = read_rows(out), read_rows(tmp_path / "cpu.csv")
        assert sum(int(r["prediction"]) for r in dml) == 3  # half checked, half not
        assert max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(dml, cpu)) <= 1e-5
        assert [(a["peak_x"], a["peak_y"]) for a in dml] == [(b["peak_x"], b["peak_y"]) for b in cpu]
