"""The scripts on the emulated DirectML device under torch 2.4.1 (torch-directml's pin).

Each test starts tests/dml_emulated.py with the interpreter of a torch 2.4.1 virtual environment
(CRBL_DML_PYTHON; `bash .ci/run` builds one and sets it) and ../shared/dml/stub first on its
PYTHONPATH, so `import torch_directml` loads the emulator: torch 2.4.1's real dispatcher with
kernels for exactly the ops torch-directml 0.2.5.dev240914 registers, and a recording CPU
fallback for every other op. What it tells: which ops a phase would send to the CPU, how many
device->host transfers it makes, the numbers (computed on the CPU). What it cannot: DirectML
speed and driver bugs. CPU references run in this process (the main torch).
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SHARED, read_rows, recalibrated_statistics

import inference_CRBL_pytorch_directml as inference
from model_pytorch_directml import load_checkpoint

STUB = SHARED / "dml" / "stub"
EMULATOR_VERSION = "0.2.5.dev240914"


@pytest.fixture(scope="module")
def dml_python():
    python = os.environ.get("CRBL_DML_PYTHON")
    if not STUB.is_dir():
        pytest.skip("../shared/dml not present (only CI and developers have the emulator)")
    if not python:
        if os.environ.get("CI"):
            pytest.fail("CRBL_DML_PYTHON is not set: .ci/run must build the torch 2.4.1 venv")
        pytest.skip("CRBL_DML_PYTHON not set: a torch 2.4.1 venv's python (bash .ci/run builds "
                    "one; see README 'Tests')")
    return python


def emulate(dml_python, tmp_path, *args, expect_exit=0):
    """Run tests/dml_emulated.py; returns (its JSON report, stdout + stderr)."""
    out = tmp_path / f"dml-{len(list(tmp_path.glob('dml-*.json')))}.json"
    env = dict(os.environ, PYTHONPATH=str(STUB), PYTHONHASHSEED="0")
    env.pop("DML_EMULATOR_REPORT", None)
    proc = subprocess.run([dml_python, str(ROOT / "tests" / "dml_emulated.py"), str(out),
                           *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    report = json.loads(out.read_text())
    assert report["exit"] == expect_exit, text[-3000:]
    return report, text


def assert_no_fallback(report):
    fallbacks = {phase: p["fallback_where"] for phase, p in report["phases"].items()
                 if p["fallback"]}
    assert fallbacks == {}, f"ops DirectML would run on the CPU: {fallbacks}"


def cpu_scores(weights, csv_path, tmp_path):
    """{image_path: probability} from the inference script on the CPU (this process's torch)."""
    out = tmp_path / "cpu.csv"
    assert inference.main(["--weights", str(weights), "--input", str(csv_path), "--output",
                           str(out), "--device", "cpu", "--no-progress"]) == 0
    return {r["image_path"]: float(r["score"]) for r in read_rows(out)}


@pytest.mark.parametrize("model_type", ["crop", "full"])
def test_training_on_dml_has_no_cpu_fallback_and_one_read_per_epoch(dml_python, tmp_path,
                                                                     model_type):
    steps = 3
    run_dir = tmp_path / "run"
    report, text = emulate(dml_python, tmp_path, "script", "train_CRBL_pytorch_directml.py",
                           "--demo", "--device", "dml", "--epochs", 1, "--steps-per-epoch",
                           steps, "--model-type", model_type, "--recalibrate-bn",
                           "--output-dir", run_dir, "--no-progress")
    phases = report["phases"]
    assert_no_fallback(report)
    assert "runs aten::" not in text  # CpuFallbackNotice said nothing
    # --demo's --init none calibrates the BatchNorms, --recalibrate-bn again before validation
    # (crop: its trainable ones; full has none); a step, validation, the threshold:
    assert phases["calibrate_batchnorm"]["calls"] == 2
    for phase in ("train_one_epoch", "validate", "choose_threshold"):
        assert phases[phase]["calls"] == 1, phase
    for phase in ("calibrate_batchnorm", "train_one_epoch", "validate"):
        assert phases[phase]["native"] > 100, phase  # they did run on the device
    # Loss and scores are read from the device once per epoch (no progress bar): at most one
    # device->host transfer per training step, here one for all three.
    assert phases["train_one_epoch"]["to_host"] == 1
    assert phases["validate"]["to_host"] == 1
    # Validation on DirectML scores as the CPU does: its scores against the inference script's
    # on the CPU for the checkpoint it saved.
    val = {r["image_path"]: float(r["score"]) for r in read_rows(run_dir / "val_predictions.csv")}
    cpu = cpu_scores(run_dir / "best.pth", run_dir / "data" / "test.csv", tmp_path)
    assert len(val) == len(cpu) == 48
    assert max(abs(val[k] - cpu[k]) for k in val) <= 1e-5
    if model_type == "crop":  # the statistics it saved are its last weights' on the CPU too
        saved = load_checkpoint(run_dir / "last.pth")["state_dict"]
        used, cpu = recalibrated_statistics(run_dir / "last.pth", [
            "--demo", "--model-type", model_type, "--recalibrate-bn", "--output-dir", run_dir])
        assert used > 0
        for name, value in cpu.items():
            # float rounding of another layout only: stale statistics are off by up to ~0.9 here
            torch.testing.assert_close(saved[name], value, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("model_type", ["crop", "full"])
def test_a_training_step_on_dml_equals_the_cpu(dml_python, converted_fixture, model_type):
    pth, _, _ = converted_fixture
    report, _ = emulate(dml_python, pth.parent, "step", pth,
                        SHARED / "fixtures" / "crbl_k2_128_reference.npz", model_type)
    assert_no_fallback(report)
    assert report["phases"]["step_dml"]["to_host"] == 0  # two whole steps without one sync
    cpu, dml = report["step"]["cpu"], report["step"]["dml"]
    assert (cpu["optimizer"], dml["optimizer"]) == ("AdamW", "AdamWWithoutLerp")
    np.testing.assert_allclose(dml["losses"], cpu["losses"], rtol=1e-5)
    # After two Adam steps: Adam moves every weight by ~lr at first whatever its gradient's
    # size, so rounding-level gradient differences can move a few weights the other way.
    diff = np.abs(np.array(dml["probs"]) - np.array(cpu["probs"])).max()
    assert diff <= 1e-3, diff
    assert np.ptp(cpu["probs"]) > 0.1  # the fixture's images are told apart


@pytest.fixture(scope="module")
def fixture_on_disk(tmp_path_factory):
    """The Keras fixture's 8 images as PNGs with a CSV, and its Keras probabilities."""
    ref_path = SHARED / "fixtures" / "crbl_k2_128_reference.npz"
    if not ref_path.is_file():
        pytest.skip("../shared/fixtures not present")
    ref = np.load(ref_path)
    folder = tmp_path_factory.mktemp("fixture")
    rows = []
    for i, img in enumerate(ref["images_uint8"]):
        Image.fromarray(img).save(folder / f"{i}.png")
        rows.append(f"{i}.png")
    (folder / "images.csv").write_text("image_path\n" + "\n".join(rows) + "\n")
    return folder, dict(zip(rows, ref["prob"][:, 0].tolist()))


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_convert_and_inference_on_dml_match_keras_and_cpu(dml_python, fixture_on_disk, tmp_path,
                                                          fp16):
    folder, keras = fixture_on_disk
    pth = tmp_path / "crbl.pth"
    report, text = emulate(dml_python, tmp_path, "script", "convert_h5_to_pth.py",
                           SHARED / "fixtures" / "crbl_k2_128.weights.h5", pth, "--model-type",
                           "crop")  # the converter itself runs under torch 2.4.1
    out = tmp_path / "dml.csv"
    report, text = emulate(dml_python, tmp_path, "script", "inference_CRBL_pytorch_directml.py",
                           "--weights", pth, "--input", folder / "images.csv", "--output", out,
                           "--device", "dml", "--batch-size", 4, "--no-progress",
                           *(["--fp16"] if fp16 else []))
    assert_no_fallback(report)
    phases = report["phases"]
    assert phases["score_to_csv"]["calls"] == 1
    assert phases["score_to_csv"]["to_host"] <= 2  # one read per batch of 4, for the CSV rows
    dml = {r["image_path"]: float(r["score"]) for r in read_rows(out)}
    cpu = cpu_scores(pth, folder / "images.csv", tmp_path)
    assert len(dml) == 8
    tolerance = 2e-3 if fp16 else 1e-5  # float16 backbones: ~3 significant digits
    assert max(abs(dml[k] - keras[k]) for k in dml) <= tolerance
    assert max(abs(dml[k] - cpu[k]) for k in dml) <= tolerance
    if fp16:
        assert max(abs(dml[k] - cpu[k]) for k in dml) > 0  # it really ran in float16


def test_batchnorm_statistics_not_updated_on_dml_stop_training(dml_python, tmp_path):
    """microsoft/DirectML #364, emulated: the device's BatchNorm drops its update."""
    report, text = emulate(dml_python, tmp_path, "--drop-bn-update", "script",
                           "train_CRBL_pytorch_directml.py", "--demo", "--device", "dml",
                           "--epochs", 1, "--steps-per-epoch", 2, "--model-type", "crop",
                           "--output-dir", tmp_path / "run", "--no-progress", expect_exit=2)
    error = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error) == 1, text[-2000:]
    assert "BatchNorm running statistics" in error[0] and "#364" in error[0]
    assert f"torch-directml {EMULATOR_VERSION}" in error[0] and "--model-type full" in error[0]
    assert "backbone1.body.blocks.4" in error[0]  # the crop model's first trainable BatchNorm
    assert report["phases"]["train_one_epoch"]["calls"] == 1
    assert not (tmp_path / "run" / "last.pth").exists()  # stopped before the epoch ended


def test_batchnorm_check_passes_when_statistics_move(dml_python, tmp_path):
    # The full model's BatchNorms are all frozen: nothing to check, training goes on even
    # with the broken kernel.
    emulate(dml_python, tmp_path, "--drop-bn-update", "script", "train_CRBL_pytorch_directml.py",
            "--demo", "--device", "dml", "--epochs", 1, "--steps-per-epoch", 1,
            "--model-type", "full", "--output-dir", tmp_path / "run", "--no-progress")
    assert (tmp_path / "run" / "last.pth").exists()


def test_cpu_fallback_notice_names_each_op_once(dml_python, tmp_path):
    report, _ = emulate(dml_python, tmp_path, "fallback-notice")
    notice = report["notice"]
    assert notice["seen"] == ["aten::lerp.Scalar_out"]
    assert len(notice["said"]) == 1 and "aten::lerp.Scalar_out on the CPU" in notice["said"][0]
    assert notice["value"] == [1.25] * 4
    assert report["phases"]["none"]["fallback"] == {"lerp.Scalar_out": 3}


@pytest.mark.parametrize("missing", [None, "softplus.out"])
def test_setup_check_runs_a_training_step_and_lists_fallbacks(dml_python, tmp_path, missing):
    args = ["--cpu-fallback", missing] if missing else []
    report, text = emulate(dml_python, tmp_path, *args, "script", "setup_amd_gpu_directml.py",
                           "--check", "--device", "dml")
    assert report["phases"]["run_crbl"]["calls"] == 1
    line = next(l for l in text.splitlines() if "DirectML CPU fallbacks" in l)
    assert "CRBL training step (crop model" in text and "CRBL forward (2 images)" in text
    if missing is None:
        assert line.endswith(": none")
        assert_no_fallback(report)
    else:
        assert line.endswith(": aten::softplus.out")
        assert "[warning] this torch-directml runs aten::softplus.out on the CPU" in text


def test_emulator_refuses_another_torch(dml_python):
    """The leg really runs torch 2.4.1, the version torch-directml pins."""
    code = "import torch, torch_directml; print(torch.__version__, torch_directml.__version__)"
    out = subprocess.run([dml_python, "-c", code], env=dict(os.environ, PYTHONPATH=str(STUB)),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.startswith("2.4.1") and EMULATOR_VERSION in out
