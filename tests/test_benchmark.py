"""benchmark_CRBL.py: a tiny real run (workers, interleaving, JSON, table); not a timed test."""
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import benchmark_CRBL

HAS_KERAS = all(importlib.util.find_spec(m) for m in ("tensorflow", "tf_keras", "efficientnet"))


def run(tmp_path, *extra) -> dict:
    out = tmp_path / "bench.json"
    argv = ["--sizes", "64", "--repeats", "1", "--warmup", "0", "--json", str(out), *extra]
    assert benchmark_CRBL.main(argv) == 0
    return json.loads(out.read_text())


def test_smoke_run_writes_every_measurement(tmp_path, capsys):
    report = run(tmp_path, "--batch-sizes", "2", "--e2e-images", "4", "--no-keras")
    assert report["machine"]["logical_cpus"] >= 1 and report["settings"]["threads"] >= 1
    (result,) = report["results"]
    assert (result["size"], result["batch"], result["e2e_images"]) == (64, 2, 4)
    assert result["device"].startswith("cpu") and result["torch_info"]["channels_last"]
    # batch 2 on 2 threads: the numba head ran, where numba is installed
    assert result["torch_info"]["fused_head"] == (importlib.util.find_spec("numba") is not None)
    assert set(result["images_per_s"]) == {"backbones", "forward", "forward_n", "e2e",
                                           "e2e_loop", "e2e_steady", "train"}
    seconds = result["seconds"]
    assert len(seconds["e2e_one_batch"]) == len(seconds["e2e_one_batch_loop"]) == 1
    # the scoring loop is timed inside each run: less than the run, start-up excluded
    for run_s, loop_s in (("e2e", "e2e_loop"), ("e2e_one_batch", "e2e_one_batch_loop")):
        assert 0 < seconds[loop_s][0] < seconds[run_s][0]
    assert all(v > 0 for v in result["images_per_s"].values())
    ratios = {k: v for k, v in result["ratios"].items() if v is not None}
    assert set(ratios) == {"forward_vs_backbones", "e2e_vs_forward", "e2e_with_startup_vs_forward"}
    assert all(v > 0 for v in ratios.values())
    # The PyTorch worker held the model and its activations: more than the interpreter.
    memory = result["peak_rss_mb"]
    assert memory["torch_after_train"] >= memory["torch_inference"] > 100
    table = capsys.readouterr().out
    assert "| 64 | 2 |" in table and "CRBL/backbones" in table


def test_end_to_end_runs_compare_dataloader_workers(tmp_path):
    """--workers 0 1: each value runs the script in a fresh process in every round (every image
    scored, checked there), and the second value's scoring loop is compared with the first's."""
    report = run(tmp_path, "--batch-sizes", "2", "--e2e-images", "4", "--no-keras", "--no-train",
                 "--workers", "0", "1")
    (result,) = report["results"]
    assert report["settings"]["workers"] == [0, 1]
    seconds = result["seconds"]
    assert len(seconds["e2e"]) == len(seconds["e2e_fresh_workers0"]) == len(seconds["e2e_fresh_workers1"]) == 1
    loops = seconds["e2e_fresh_workers0_loop"][0], seconds["e2e_fresh_workers1_loop"][0]
    assert 0 < loops[1] < seconds["e2e_fresh_workers1"][0]  # the loop, inside a whole new process
    assert result["ratios"]["e2e_workers1_vs_workers0"] == pytest.approx(loops[0] / loops[1])
    assert result["images_per_s"]["e2e_fresh_workers1_loop"] == pytest.approx(4 / loops[1])


@pytest.mark.skipif(not HAS_KERAS, reason="TensorFlow, tf-keras or efficientnet not installed")
def test_keras_side_uses_the_same_model(tmp_path):
    report = run(tmp_path, "--batch-sizes", "1", "--no-train", "--no-e2e")
    (result,) = report["results"]
    assert result["keras_info"]["tensorflow"] and result["keras_info"]["threads"][0] >= 1
    # PyTorch runs the Keras worker's weights, converted: same probabilities on the same images.
    assert result["max_abs_prob_diff_vs_keras"] < 1e-4
    assert result["images_per_s"]["keras_forward"] > 0 and result["ratios"]["forward_vs_keras"] > 0
    assert result["peak_rss_mb"]["keras_inference"] > 100


def test_user_weights_are_benchmarked(shared_fixture, tmp_path):
    """--weights: the Keras fixture, converted at the benchmarked size (64 px, not its 128)."""
    report = run(tmp_path, "--batch-sizes", "1", "--no-keras", "--no-train", "--no-e2e",
                 "--weights", str(shared_fixture[0]))
    (result,) = report["results"]
    assert result["images_per_s"]["forward"] > 0 and report["settings"]["weights"]


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "16"], "too small"),
    (["--batch-sizes", "0"], ">= 1"),
    (["--amp"], "--amp needs a CUDA/ROCm GPU"),
    (["--weights", "missing.weights.h5"], "missing.weights.h5: no such file"),
    (["--workers", "-2"], "--workers -2: give 0 or more processes, or -1 for auto"),
])
def test_bad_settings_are_one_line_errors(argv, message, tmp_path, capsys):
    assert benchmark_CRBL.main(argv + ["--json", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.json").exists()


class _FakeWorker:
    """Answers every request as if one call took `per_call` seconds; records the requests."""

    def __init__(self, per_call: float):
        self.per_call, self.requests = per_call, []

    def ask(self, request: str) -> dict:
        self.requests.append(request)
        return {"seconds": self.per_call}


def test_interleaved_repeats_fast_calls_until_min_time():
    fast, slow = _FakeWorker(0.03), _FakeWorker(2.0)
    times = benchmark_CRBL.interleaved({"fast": (fast, "forward"), "slow": (slow, "train")},
                                       warmup=2, repeats=3, min_time=0.5)
    assert times == {"fast": [0.03] * 3, "slow": [2.0] * 3}
    # the first warm-up round asks for one call; from then on a 30 ms call repeats 17 times
    assert fast.requests == ["forward x1"] + ["forward x17"] * 4
    assert slow.requests == ["train x1"] * 5
    # without warm-up nothing is known about the speed: single calls
    none = _FakeWorker(0.03)
    benchmark_CRBL.interleaved({"a": (none, "forward")}, warmup=0, repeats=2, min_time=0.5)
    assert none.requests == ["forward x1"] * 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's ru_maxrss quirk")
def test_worker_peak_memory_is_its_own():
    """A worker's peak is what it used, not its parent's: Linux carries ru_maxrss over through
    fork and exec (every worker of an 840 MB benchmark process reported >= 840 MB)."""
    ballast = np.ones(2**28, dtype=np.uint8)  # 256 MB resident in this, the parent, process
    out = subprocess.run([sys.executable, "-c", "import benchmark_CRBL; print(benchmark_CRBL.peak_rss_mb())"],
                         capture_output=True, text=True, check=True,
                         cwd=Path(benchmark_CRBL.__file__).parent)
    assert ballast.sum() == 2**28
    assert 5 < float(out.stdout) < 200  # the interpreter and numpy


def test_end_to_end_ratio_is_paired_by_round():
    """e2e/forward from each round's own three calls, then the median: a round where the
    machine ran everything 3× slower does not pull the ratio, a round with one slow call
    moves it only in that round."""
    # 4 images at batch 1: forward 0.1 s per image; the script 0.2 s start-up plus a scoring
    # loop of 0.125 s per image, so its steady state is 0.8× the forward, with start-up
    # 0.1·4 / 0.7 = 0.571×. The start-up does not enter the steady state: 0.15 s more of it in
    # the one-batch runs leaves that ratio as it is.
    rounds = [(1, 1, 1), (3, 3, 3), (1, 1.6, 1), (2, 2, 2), (1, 1, 1)]  # factors fwd, e2e, one
    times = {"forward_n": [0.4 * f for f, _, _ in rounds],
             "e2e": [0.7 * e for _, e, _ in rounds],
             "e2e_loop": [0.5 * e for _, e, _ in rounds],
             "e2e_one_batch": [(0.325 + 0.15) * o for _, _, o in rounds],
             "e2e_one_batch_loop": [0.125 * o for _, _, o in rounds]}
    ratios = benchmark_CRBL.summarise(times, {}, batch=1, n_e2e=4)["ratios"]
    assert ratios["e2e_vs_forward"] == pytest.approx(0.8)
    assert ratios["e2e_with_startup_vs_forward"] == pytest.approx(0.4 / 0.7)
    # The same samples as a difference and ratio of medians: 0.44, the slow e2e call's round.
    med = {name: statistics.median(ts) for name, ts in times.items()}
    assert (3 / (med["e2e_loop"] - med["e2e_one_batch_loop"])) / (4 / med["forward_n"]) < 0.45
