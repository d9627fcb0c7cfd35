"""Every script at the repo root answers --help: exit 0, option groups, defaults shown.

The list is fixed: a script that is expected but not written yet is skipped, not silently missed.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (
    "setup_amd_gpu_directml.py",
    "setup_amd_gpu_windows.py",
    "convert_h5_to_pth.py",
    "train_CRBL_pytorch_directml.py",
    "inference_CRBL_pytorch_directml.py",
    "train_CRBL_pytorch.py",
    "inference_CRBL_pytorch.py",
    "benchmark_CRBL.py",
)
STANDARD_SECTIONS = {"usage", "options", "optional arguments", "positional arguments"}


def help_problems(text: str) -> list[str]:
    """What a --help text lacks: an option group of our own, and defaults (ArgumentDefaultsHelpFormatter)."""
    headings = {m.group(1).split(" (")[0].lower()
                for m in re.finditer(r"^(\S[^\n]*?):\s*$", text, flags=re.M)}
    problems = []
    if not text.startswith("usage:"):
        problems.append("no usage line")
    if not headings - STANDARD_SECTIONS:
        problems.append("no option groups (only argparse's standard sections)")
    if "(default:" not in text:
        problems.append("no defaults shown (use argparse.ArgumentDefaultsHelpFormatter)")
    return problems


def test_help_problems_catches_a_flat_parser():
    flat = "usage: x.py [-h] [--a A]\n\noptions:\n  -h, --help  show this help\n  --a A       an option\n"
    assert help_problems(flat) == ["no option groups (only argparse's standard sections)",
                                   "no defaults shown (use argparse.ArgumentDefaultsHelpFormatter)"]
    good = flat + "\ndata:\n  --b B       b option (default: 3)\n"
    assert help_problems(good) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    path = ROOT / script
    if not path.is_file():
        pytest.skip(f"{script} not written yet")
    done = subprocess.run([sys.executable, str(path), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert help_problems(done.stdout) == [], done.stdout


def run_script(script, *argv, block_torch=False, cwd=ROOT):
    """The script as `python script argv`; block_torch: as a Python without torch installed."""
    if block_torch:  # `import torch` then raises ModuleNotFoundError, as without the package
        code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
        command = [sys.executable, "-c", code, str(ROOT / script), *map(str, argv)]
    else:
        command = [sys.executable, str(ROOT / script), *map(str, argv)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def option_blocks(text: str) -> dict[str, str]:
    """--help's text per option: its line and the indented lines that follow."""
    blocks, name = {}, None
    for line in text.splitlines():
        found = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if found:
            name = found.group(2)
            blocks[name] = line
        elif name and line.startswith("    "):
            blocks[name] += " " + line.strip()
        else:
            name = None
    return blocks


@pytest.mark.parametrize("script", SCRIPTS)
def test_usage_is_one_line_and_no_default_shown_twice(script):
    done = run_script(script, "--help")
    lines = done.stdout.splitlines()
    assert re.fullmatch(rf"usage: {re.escape(script)}( [\w.\- ]+)? \[options\]", lines[0]), lines[0]
    assert lines[1] == ""
    for name, block in option_blocks(done.stdout).items():
        assert block.count("(default") <= 1, block


def test_training_help_shows_every_default_and_what_demo_changes():
    blocks = option_blocks(run_script("train_CRBL_pytorch_directml.py", "--help").stdout)
    shown = {"--image-size": "(default: 128; 64 with --demo)", "--batch-size": "(default: 32; 16 with --demo)",
             "--lr": "(default: 0.0001)", "--weight-decay": "(default: 1e-06)",
             "--label-smoothing": "(default: 0.125)", "--lr-patience": "(default: 2)",
             "--min-lr": "(default: 1e-06)", "--min-delta": "(default: 1e-06)",
             "--output-dir": "(default: runs/crbl; runs/demo with --demo)", "--seed": "(default: 42)",
             "--epochs": "(default: 30; 4 with --demo)", "--model-type": "(default: crop; full with --demo)",
             "--class0-prior": "(default: 0.88; 0.5 with --demo)",
             "--image-dir": "(default: each CSV's own folder)"}
    for name, default in shown.items():
        assert default in blocks[name], blocks[name]
    demo = blocks["--demo"]
    assert "64 px images, batch 16, 4 epochs, --model-type full" in demo and "{" not in demo


def test_benchmark_help_shows_batch_sizes_default():
    blocks = option_blocks(run_script("benchmark_CRBL.py", "--help").stdout)
    assert "(default: [1, 8, 32])" in blocks["--batch-sizes"]


USER_ERRORS = [
    ("train_CRBL_pytorch_directml.py", ["--demo", "--epochs", "0"], "--epochs 0 is out of range"),
    ("train_CRBL_pytorch.py", ["--train-csv", "missing.csv"], "missing.csv: manifest CSV not found"),
    ("inference_CRBL_pytorch_directml.py", ["--weights", "x.pth", "--input", "missing"],
     "--input missing: not found"),
    ("inference_CRBL_pytorch.py", ["--weights", "x.pth", "--input", "missing"], "--input missing: not found"),
    ("convert_h5_to_pth.py", ["notes.txt", "out.pth"], "notes.txt: not an HDF5 file"),
    ("benchmark_CRBL.py", ["--sizes", "16"], "--sizes 16 is too small"),
    ("setup_amd_gpu_directml.py", ["--target", "nonsense"], "invalid choice: 'nonsense'"),
    ("setup_amd_gpu_windows.py", ["--no-such-option"], "unrecognized arguments: --no-such-option"),
]


@pytest.mark.parametrize("script,argv,message", USER_ERRORS, ids=[e[0] for e in USER_ERRORS])
def test_user_errors_exit_2_with_one_line(script, argv, message, tmp_path):
    (tmp_path / "notes.txt").write_text("not a Keras file")
    done = run_script(script, *argv, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout[-500:], done.stderr[-1500:])
    error_lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("script", [s for s in SCRIPTS if not s.startswith("setup_")])
def test_a_python_without_torch_gets_one_line(script):
    done = run_script(script, "--help" if script == "benchmark_CRBL.py" else "--version-x",
                      block_torch=True)
    if script == "benchmark_CRBL.py":  # parses its options before it needs torch
        done = run_script(script, "--no-keras", block_torch=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {sys.executable} (Python ")
    assert "has no module 'torch'" in done.stderr
    assert "-m pip install -r requirements_directml.txt" in done.stderr


def test_setup_check_without_torch_does_not_point_to_a_plan_it_did_not_print():
    done = run_script("setup_amd_gpu_directml.py", "--check", block_torch=True)
    assert "cannot import torch" in done.stdout and "above" not in done.stdout, done.stdout
    assert f"{Path(sys.executable).name} setup_amd_gpu_directml.py` prints the install plan" in done.stdout
