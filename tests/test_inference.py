"""inference_CRBL_pytorch_directml.py end to end on small real files the tests write."""
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import read_rows

import inference_CRBL_pytorch_directml as inference
from fast_paths_pytorch_directml import InferenceRunner
from model_pytorch_directml import CRBLConfig, CRBLModel, save_checkpoint

SIZE = 64  # small model input keeps CPU runs at a few seconds


def run(*args):
    return inference.main([*map(str, args), "--device", "cpu", "--no-progress"])


def write_images(folder, names, seed=0, size=(48, 80)):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = CRBLModel(CRBLConfig(image_size=SIZE))
    with torch.no_grad():
        model.head.weight.mul_(3000)  # random init gives scores ~0.5 for all; spread them
    path = tmp_path_factory.mktemp("ckpt") / "crbl64.pth"
    save_checkpoint(path, model, threshold=0.42, threshold_source="validation F1")
    return path


GOOD = ["a.png", "sub/b.jpg", "검사 이미지.png", "with space.png", "sub/deeper/C.PNG"]


def make_bad_files(folder):
    """Every kind of bad input the issue lists; returns name -> expected words in `error`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is text, not a PNG")
    full = folder / "a.png"
    (folder / "truncated.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    (folder / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(64))  # Pillow can't read

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (folder / "bomb.png").write_bytes(  # header claims 20000 x 20000 pixels
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))
    return {"zero.png": "empty file", "text.png": "not an image", "truncated.png": "truncated",
            "photo.heic": "cannot read", "bomb.png": "decompression bomb"}


def test_fixture_scores_match_keras(fixture_pngs, tmp_path):
    pth, imgs, keras = fixture_pngs
    out = tmp_path / "preds.csv"
    assert run("--weights", pth, "--input", imgs, "--output", out,
               "--batch-size", 4, "--workers", 2) == 0
    rows = read_rows(out)
    assert [r["image_path"] for r in rows] == [f"{i}.png" for i in range(len(keras))]
    scores = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(scores, keras, atol=1e-4, rtol=0)


def test_compiled_model_matches_keras_with_padded_batches(fixture_pngs, tmp_path, capsys):
    """--compile on CPU: one batch shape; the short last batch (and a bad file) are padded."""
    pth, imgs, keras = fixture_pngs
    (imgs / "9_bad.png").write_text("not an image")
    out = tmp_path / "preds.csv"
    assert run("--weights", pth, "--input", imgs, "--output", out,
               "--batch-size", 3, "--workers", 0, "--compile") == 0
    assert "compiled the backbones and head for batches of 3" in capsys.readouterr().out
    rows = read_rows(out)
    assert rows[-1]["image_path"] == "9_bad.png" and "not an image" in rows[-1]["error"]
    scores = np.array([float(r["score"]) for r in rows[:-1]])
    np.testing.assert_allclose(scores, keras, atol=1e-4, rtol=0)


def test_compile_failure_is_one_line_error_before_any_output(checkpoint, tmp_path, monkeypatch,
                                                             capsys):
    def broken_compile(module, *args, **kwargs):  # as torch.compile fails at the first call
        def fail(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(traceback...)")
        module.forward = fail
    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    write_images(tmp_path / "imgs", ["a.png"])
    out = tmp_path / "preds.csv"
    assert run("--weights", checkpoint, "--input", tmp_path / "imgs", "--output", out, "--compile") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--compile failed on cpu" in err
    assert "No working C++ compiler" in err and "leave --compile out" in err
    assert not out.exists()


def test_mixed_folder_one_row_per_file_and_clean_scores(checkpoint, tmp_path, capsys):
    write_images(tmp_path / "clean", GOOD)
    write_images(tmp_path / "mixed", GOOD)
    bad = make_bad_files(tmp_path / "mixed")
    (tmp_path / "mixed" / "notes.txt").write_text("not listed: not an image extension")

    assert run("--weights", checkpoint, "--input", tmp_path / "clean",
               "--output", tmp_path / "clean.csv", "--batch-size", 4, "--workers", 0) == 0
    capsys.readouterr()
    assert run("--weights", checkpoint, "--input", tmp_path / "mixed",
               "--output", tmp_path / "mixed.csv", "--batch-size", 4, "--workers", 2) == 0
    out = capsys.readouterr().out
    assert f"{len(bad)} images could not be scored" in out

    clean = {r["image_path"]: r for r in read_rows(tmp_path / "clean.csv")}
    rows = read_rows(tmp_path / "mixed.csv")
    assert sorted(r["image_path"] for r in rows) == sorted(GOOD + list(bad))
    assert [r["image_path"] for r in rows] == \
        ["a.png", "bomb.png", "photo.heic", "sub/b.jpg", "sub/deeper/C.PNG", "text.png",
         "truncated.png", "with space.png", "zero.png", "검사 이미지.png"]  # sorted path parts
    for row in rows:
        name = row["image_path"]
        if name in bad:
            assert bad[name] in row["error"] and row["score"] == row["prediction"] == "", row
        else:
            assert row["error"] == "" and clean[name]["score"] != ""
            # Batches differ (bad files drop out), so allow float32 noise of other batch shapes.
            assert float(row["score"]) == pytest.approx(float(clean[name]["score"]), abs=1e-5)
            assert row["prediction"] == str(int(float(row["score"]) >= 0.42))
    assert len({r["score"] for r in clean.values()}) == len(GOOD)  # scores really differ

    assert run("--weights", checkpoint, "--input", tmp_path / "mixed", "--output",
               tmp_path / "strict.csv", "--strict", "--workers", 0) == 1
    assert len(read_rows(tmp_path / "strict.csv")) == len(rows)  # strict still finishes the run


def test_csv_manifest_with_labels_writes_metrics(checkpoint, tmp_path, capsys):
    names = [f"img_{i}.png" for i in range(8)]
    write_images(tmp_path / "images", names, seed=1)
    labels = [0, 1, 0, 1, 1, 0, 0, 1]
    lines = ["image_path,impurity"] + [f"{n},{y}" for n, y in zip(names, labels)] + ["gone.png,1"]
    manifest = tmp_path / "test_CRBL.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "preds.csv"
    assert run("--weights", checkpoint, "--input", manifest, "--image-dir", tmp_path / "images",
               "--output", out, "--threshold", 0.5) == 0
    printed = capsys.readouterr().out
    assert "threshold 0.5 from --threshold" in printed and "AUROC" in printed

    rows = read_rows(out)
    assert [r["image_path"] for r in rows] == names + ["gone.png"]
    assert [r["label"] for r in rows] == [str(y) for y in labels + [1]]
    assert "not found" in rows[-1]["error"] and rows[-1]["score"] == ""

    from dataset_pytorch_directml import compute_metrics
    scores = [float(r["score"]) for r in rows[:-1]]
    metrics = json.loads((tmp_path / "out" / "preds_metrics.json").read_text(encoding="utf-8"))
    expected = compute_metrics(labels, scores, 0.5)
    for key in ("accuracy", "precision", "recall", "f1", "auroc", "ap", "confusion_matrix", "n"):
        assert metrics[key] == expected[key], key  # CSV scores round-trip exactly
    assert metrics["threshold_source"] == "--threshold" and metrics["unscored_labelled_images"] == 1
    for suffix in ("roc", "pr", "hist"):
        assert (tmp_path / "out" / f"preds_{suffix}.png").stat().st_size > 1000


def test_threshold_sources(checkpoint, tmp_path, capsys):
    write_images(tmp_path / "imgs", ["x.png"])
    single = tmp_path / "imgs" / "x.png"
    assert run("--weights", checkpoint, "--input", single, "--output", tmp_path / "a.csv") == 0
    assert "threshold 0.42 (checkpoint (validation F1))" in capsys.readouterr().out
    assert read_rows(tmp_path / "a.csv")[0]["image_path"] == str(single)  # as given
    assert run("--weights", checkpoint, "--input", single, "--output", tmp_path / "b.csv",
               "--model-type", "crop") == 0
    assert "threshold 0.01 (--model-type crop preset)" in capsys.readouterr().out
    assert read_rows(tmp_path / "b.csv")[0]["prediction"] == "1"


class _Marker:
    """Unpickling this creates a file: proof that a payload was executed."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle case
@pytest.mark.parametrize("kind", ["pickle_payload_zip", "pickle_payload_raw", "truncated",
                                  "random", "keras_h5", "missing"])
def test_bad_weights_refused_before_any_image(checkpoint, tmp_path, capsys, monkeypatch, kind):
    write_images(tmp_path / "imgs", ["x.png"])
    marker = tmp_path / "PWNED"
    weights = tmp_path / "w.pth"
    if kind == "pickle_payload_zip":
        torch.save({"format": "crbl-pytorch", "config": {}, "x": _Marker(str(marker))}, weights)
    elif kind == "pickle_payload_raw":
        weights.write_bytes(pickle.dumps({"state_dict": _Marker(str(marker))}))
    elif kind == "truncated":
        weights.write_bytes(checkpoint.read_bytes()[:100_000])
    elif kind == "random":
        weights.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "keras_h5":
        weights.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(2000))

    def no_image_reads(*a, **k):
        raise AssertionError("an image was read before the weights were checked")
    monkeypatch.setattr("dataset_pytorch_directml.load_rgb_uint8", no_image_reads)
    out = tmp_path / "preds.csv"
    assert run("--weights", weights, "--input", tmp_path / "imgs", "--output", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(weights) in err and len(err.splitlines()) == 1
    expected = {"pickle_payload_zip": "refused", "keras_h5": "convert_h5_to_pth.py", "missing": "not found"}
    assert expected.get(kind, "checkpoint") in err
    assert not marker.exists()
    assert not out.exists()


def test_rows_are_written_as_it_goes(checkpoint, tmp_path, monkeypatch, capsys):
    names = [f"{i}.png" for i in range(6)]
    write_images(tmp_path / "imgs", names)
    real_forward, calls = InferenceRunner.__call__, []

    def interrupted_forward(runner, x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the third batch
        return real_forward(runner, x)
    monkeypatch.setattr(InferenceRunner, "__call__", interrupted_forward)
    out = tmp_path / "preds.csv"
    assert run("--weights", checkpoint, "--input", tmp_path / "imgs", "--output", out,
               "--batch-size", 2, "--workers", 0) == 130
    assert "interrupted" in capsys.readouterr().err
    rows = read_rows(out)
    assert [r["image_path"] for r in rows] == names[:4] and all(r["score"] for r in rows)


@pytest.mark.parametrize("batch", [1, 3])
def test_small_batches_are_decoded_ahead_and_scored_as_asked(checkpoint, tmp_path, monkeypatch,
                                                             batch):
    names = [f"{i:02d}.png" for i in range(11)]
    write_images(tmp_path / "imgs", names)
    (tmp_path / "imgs" / "05.png").write_text("not a PNG")  # an error row among decoded-ahead ones
    fetched, forwarded = [], []
    real_getitems, real_forward = inference.TestDataset.__getitems__, InferenceRunner.__call__

    def getitems(self, indices):
        fetched.append(len(indices))
        return real_getitems(self, indices)

    def forward(runner, x):
        forwarded.append(len(x))
        return real_forward(runner, x)
    monkeypatch.setattr(inference.TestDataset, "__getitems__", getitems)
    monkeypatch.setattr(InferenceRunner, "__call__", forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for workers in (0, 1):  # a worker process fetches batch by batch (its calls go uncounted)
            assert run("--weights", checkpoint, "--input", tmp_path / "imgs", "--output",
                       tmp_path / f"w{workers}.csv", "--batch-size", batch, "--workers", workers) == 0
    finally:
        torch.set_num_threads(threads)
    fetch = batch * -(-inference.DECODE_AHEAD // batch)  # whole batches, >= DECODE_AHEAD images
    assert fetched == [fetch, len(names) - fetch]
    # the model saw the batches asked for, less the unreadable image, in both runs
    asked = [len(names[i:i + batch]) - (i <= 5 < i + batch) for i in range(0, len(names), batch)]
    assert forwarded == [n for n in asked if n] * 2
    ahead, one_by_one = read_rows(tmp_path / "w0.csv"), read_rows(tmp_path / "w1.csv")
    assert [r["image_path"] for r in ahead] == names and ahead == one_by_one  # same bits
    assert "not an image" in ahead[5]["error"]
    assert all(r["score"] for r in ahead[:5] + ahead[6:])


def test_user_errors_are_one_line(checkpoint, tmp_path, capsys):
    write_images(tmp_path / "imgs", ["x.png"])
    cases = [("--input", tmp_path / "nope"), ("--input", tmp_path / "imgs", "--threshold", 2),
             ("--input", tmp_path / "imgs", "--image-dir", tmp_path),
             ("--input", tmp_path / "imgs", "--output", tmp_path)]
    for case in cases:
        assert run("--weights", checkpoint, "--output", tmp_path / "o.csv", *case) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1


def odd_folder(folder):
    """A folder of odd files: name -> expected start of `error` ("" = scored; the note then
    starts with the value after "note:")."""
    import odd_files
    odd_files.tga_and_ico(folder)
    odd_files.newly_scanned(folder / "formats")
    odd_files.jpeg_with_bad_exif(folder / "exif.jpg")
    odd_files.png_with_bad_text_crc(folder / "crc.png")
    (folder / "jp2k.tif").write_bytes(odd_files.tiff_bytes(34712))
    (folder / "page.jpg").write_text("<html><body>moved</body></html>")
    (folder / "empty.bmp").write_bytes(b"")
    expected = {"a.tga": "", "b.ico": "", "exif.jpg": "note:Tag data larger than file",
                "crc.png": "note:libpng warning: tEXt: CRC error",
                "jp2k.tif": "TIFF with JPEG 2000 compression, which Pillow does not support",
                "page.jpg": "not an image: the file is an HTML page", "empty.bmp": "empty file"}
    expected.update({f"formats/{name}": "" for name in odd_files.newly_scanned(folder, dry=True)})
    return expected


def test_odd_folder_same_verdicts_in_any_order_and_with_workers(checkpoint, tmp_path, capfd):
    """Every file of an odd folder gets its verdict whatever the order it is read in and
    whether DataLoader workers read it; decoder messages land in rows, not on the terminal."""
    expected = odd_folder(tmp_path / "odd")
    assert run("--weights", checkpoint, "--input", tmp_path / "odd", "--output",
               tmp_path / "sorted.csv", "--workers", 0) == 0
    out, err = capfd.readouterr()
    assert err == ""  # no libpng/libtiff line, no Python warning
    assert "scored 18 of 21 images" in out and "2 scored images got a decoder warning" in out
    assert "3 images could not be scored (see the 'error' column):" in out
    assert "1 × not an image: the file is an HTML page (e.g. page.jpg)" in out
    rows = {r["image_path"]: r for r in read_rows(tmp_path / "sorted.csv")}
    assert sorted(rows) == sorted(expected)

    shuffled = sorted(expected, key=lambda name: hash(name[::-1]) % 1000)[::-1]
    (tmp_path / "shuffled.csv").write_text(
        "image_path\n" + "".join(f"odd/{name}\n" for name in shuffled), encoding="utf-8")
    for workers in (0, 2):
        assert run("--weights", checkpoint, "--input", tmp_path / "shuffled.csv", "--output",
                   tmp_path / f"shuffled{workers}.csv", "--workers", workers) == 0
        assert capfd.readouterr().err == ""
        again = {r["image_path"][4:]: r for r in read_rows(tmp_path / f"shuffled{workers}.csv")}
        assert list(again) == shuffled
        for name, want in expected.items():
            row, first = again[name], rows[name]
            assert (row["error"], row["note"]) == (first["error"], first["note"]), name
            assert float(row["score"] or 0) == pytest.approx(float(first["score"] or 0), abs=1e-5)
            if want.startswith("note:") or not want:
                assert row["score"] != "" and row["note"].startswith(want[5:]), (name, row)
            else:
                assert row["score"] == "" and row["error"].startswith(want), (name, row)


def test_skipped_files_are_counted_and_listed(checkpoint, tmp_path, capsys):
    write_images(tmp_path / "in", ["a.png"])
    for name in ("notes.txt", "model.h5", "data.csv", ".DS_Store", "._a.png", ".git/HEAD"):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    assert run("--weights", checkpoint, "--input", tmp_path / "in", "--output",
               tmp_path / "p.csv") == 0
    out = capsys.readouterr().out
    assert f"skipped 6 files under {tmp_path / 'in'} (not scored, no row):" in out
    assert "  2 × hidden file (e.g. .DS_Store, ._a.png)" in out
    assert "  1 × .h5: a HDF5 file, which Pillow identifies but cannot decode here (e.g. model.h5)" in out
    assert "  1 × hidden folder, not searched (e.g. .git/)" in out
    assert "  1 × .txt: not an image extension (e.g. notes.txt)" in out
    assert "(--list-skipped names them all)" in out and "scored 1 of 1 image in" in out
    assert run("--weights", checkpoint, "--input", tmp_path / "in", "--output",
               tmp_path / "p.csv", "--list-skipped") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:7] == [
        "  .git/: hidden folder, not searched", "  .DS_Store: hidden file", "  ._a.png: hidden file",
        "  data.csv: .csv: not an image extension",
        "  model.h5: .h5: a HDF5 file, which Pillow identifies but cannot decode here",
        "  notes.txt: .txt: not an image extension"]


def test_one_unscored_image_is_singular(checkpoint, tmp_path, capsys):
    write_images(tmp_path / "in", ["a.png"])
    (tmp_path / "in" / "b.png").write_text("text")
    assert run("--weights", checkpoint, "--input", tmp_path / "in", "--output",
               tmp_path / "p.csv") == 0
    out = capsys.readouterr().out
    assert "1 image could not be scored (see the 'error' column):" in out
    assert "  1 × not an image: the file is a text file (e.g. b.png)" in out
