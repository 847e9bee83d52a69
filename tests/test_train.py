"""The training command end to end on tiny runs: report JSON, checkpoints, exact resume, plots, early
stopping, tabular NLL spaces, TO-FLOW / multilevel options, and the console entry points."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastode import train as T

TINY = ["--dims", "8-8", "--method", "rk4", "--step-size", "0.25", "--toy-val-size", "64", "--toy-test-size", "64",
        "--test-batch-size", "64", "--batch-size", "32", "--plot-npts", "16", "--no-progress", "--threads", "1"]


def run(tmp, *extra, name="run"):
    save = os.path.join(tmp, name)
    args = T.parse_args(["--save", save] + TINY + list(extra))
    report = T.train(args)
    return save, report


def _png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_toy_report_checkpoint_plots(tmp_path):
    save, report = run(tmp_path, "--data", "8gaussians", "--niters", "4", "--val-every", "2", "--T-mode", "fixed")
    on_disk = json.load(open(os.path.join(save, "report.json")))
    assert on_disk["iterations"] == 4 and on_disk["dataset"] == "8gaussians"
    for key in ("test_nll", "test_nll_model_space", "train_nfe_forward_mean", "train_nfe_backward_mean",
                "eval_nfe_per_batch", "time_per_iteration_s_median", "inverse_error", "T", "versions", "config"):
        assert key in on_disk, key
    assert math.isfinite(on_disk["test_nll"]) and on_disk["test_nll_unit"] == "nats"
    assert on_disk["train_nfe_forward_mean"] == 8  # rk4, two steps of 0.25 on [0, 0.5]
    assert on_disk["inverse_error"] < 1e-3
    assert [v["iteration"] for v in on_disk["history"]["val"]] == [2, 4]
    ck = torch.load(os.path.join(save, "checkpoint.pt"), weights_only=False)
    assert ck["iteration"] == 4
    assert os.path.exists(os.path.join(save, "best.pt"))
    for png in ("density.png", "trajectory.png", "curves.png"):
        assert _png(os.path.join(save, png)), png
    assert sorted(os.path.basename(p) for p in on_disk["plots"]) == ["curves.png", "density.png", "trajectory.png"]


def _params(save, which="checkpoint.pt"):
    return torch.load(os.path.join(save, which), weights_only=False)["model"]


def test_resume_continues_from_the_saved_iteration(tmp_path):
    common = ["--data", "moons", "--val-every", "2", "--trace", "hutchinson", "--no-plot"]
    straight, rep_a = run(tmp_path, *common, "--niters", "4", name="straight")
    part, _ = run(tmp_path, *common, "--niters", "2", name="resumed")
    assert torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)["iteration"] == 2
    resumed, rep_b = run(tmp_path, *common, "--niters", "4", "--resume", "auto", name="resumed")
    assert rep_b["iterations"] == 4
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # the resumed run did only the remaining iterations and kept the history of the first part
    ck = torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=False)
    assert ck["history"]["iteration"] == [0, 1, 2, 3]
    assert rep_a["test_nll"] == pytest.approx(rep_b["test_nll"], abs=1e-9)


def test_resume_refuses_a_different_model(tmp_path):
    save, _ = run(tmp_path, "--data", "moons", "--niters", "1", "--no-plot")
    args = T.parse_args(["--save", save] + TINY + ["--data", "moons", "--niters", "2", "--resume", "auto",
                                                    "--dims", "16-16", "--no-plot"])
    with pytest.raises(ValueError, match="dims"):
        T.train(args)


def test_early_stopping(tmp_path):
    # lr 0: the validation NLL never improves after the first check, so patience 1 stops at the third check
    _, report = run(tmp_path, "--data", "8gaussians", "--niters", "50", "--val-every", "1", "--patience", "1",
                    "--lr", "0", "--no-plot")
    assert report["stopped_early"] and report["iterations"] == 3 and report["best_iteration"] == 1


def test_tabular_breast_cancer_data_space_nll(tmp_path):
    _, report = run(tmp_path, "--data", "breast_cancer", "--niters", "2", "--val-every", "2", "--no-plot",
                    "--trace", "hutchinson")
    from fastode.data import load_breast_cancer

    ld = load_breast_cancer().logdet["tst"].mean()
    assert report["test_size"] == 56 and report["n_dims"] == 30
    assert report["test_nll_data_space"] == pytest.approx(report["test_nll_model_space"] - ld, rel=1e-9)
    assert report["test_nll"] == report["test_nll_data_space"]


def test_tabular_digits_bits_per_dim_and_sample_plot(tmp_path):
    save, report = run(tmp_path, "--data", "digits", "--niters", "1", "--val-every", "1")
    assert report["n_dims"] == 61
    assert report["test_bits_per_dim"] == pytest.approx(report["test_nll"] / (61 * math.log(2)))
    assert _png(os.path.join(save, "samples.png"))


def test_regularisers_and_end_time_modes(tmp_path):
    _, report = run(tmp_path, "--data", "8gaussians", "--niters", "2", "--no-plot", "--trace", "hutchinson",
                    "--kinetic", "0.01", "--jacobian-frobenius", "0.01", "--T-mode", "alternate", "--T-lr", "0.05")
    assert report["T"][0] != pytest.approx(0.5)
    assert report["config"]["kinetic"] == 0.01
    _, report = run(tmp_path, "--data", "8gaussians", "--niters", "2", "--no-plot", "--T-mode", "fixed", name="fixed")
    assert report["T"] == [0.5]


def test_multilevel_refines_the_training_grid(tmp_path):
    save, report = run(tmp_path, "--data", "8gaussians", "--niters", "4", "--no-plot", "--multilevel", "0.5,0.25",
                       "--T-mode", "fixed")
    ck = torch.load(os.path.join(save, "checkpoint.pt"), weights_only=False)
    # the first two iterations use h = 0.5 (one RK4 step: 4 evaluations), the last two h = 0.25 (8)
    assert ck["history"]["nfe_forward"] == [4, 4, 8, 8]
    assert report["eval_solver"] == ["rk4(h=0.25)"]


def test_bad_arguments():
    with pytest.raises(SystemExit):
        T.parse_args(["--dims", "64-x"])
    with pytest.raises(SystemExit):
        T.parse_args(["--multilevel", "0.5", "--method", "dopri5"])
    with pytest.raises(SystemExit):
        T.parse_args(["--error-reg", "local"])
    args = T.parse_args(["--batch-size", "33"])
    args.niters = 0
    with pytest.raises(ValueError, match="divisible|multiples"):
        T.BatchSource(args, T.DistInfo(0, 2)).batch(0)


def test_batch_source_is_deterministic_and_sharded():
    args = T.parse_args(["--data", "breast_cancer", "--batch-size", "8"])
    one = T.BatchSource(args, T.DistInfo(0, 1))
    r0, r1 = T.BatchSource(args, T.DistInfo(0, 2)), T.BatchSource(args, T.DistInfo(1, 2))
    for itr in (0, 5, 57, 58):  # 462 // 8 = 57 iterations per epoch: 57 starts a new permutation
        np.testing.assert_array_equal(np.vstack([r0.batch(itr), r1.batch(itr)]), one.batch(itr))
    np.testing.assert_array_equal(one.batch(3), T.BatchSource(args, T.DistInfo(0, 1)).batch(3))


def test_entry_points():
    import shutil

    console = shutil.which("fastode")
    for cmd in ([sys.executable, "-m", "fastode.train", "--help"],
                [console, "demo", "--help"] if console else [sys.executable, "-m", "fastode", "demo", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "usage" in out.stdout


def test_main_command_runs(tmp_path):
    from fastode.__main__ import main

    assert main(["train", "--save", str(tmp_path / "m"), "--data", "circles", "--niters", "1", "--no-plot"] + TINY) == 0
    assert os.path.exists(tmp_path / "m" / "report.json")


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint"])
def test_gradient_modes_train(tmp_path, gradient):
    _, report = run(tmp_path, "--data", "8gaussians", "--niters", "2", "--no-plot", "--T-mode", "fixed",
                    "--gradient", gradient, name=gradient)
    assert report["train_nfe_forward_mean"] == 8
    # direct differentiates the stored solve; checkpoint recomputes the stages of each step, the continuous
    # adjoint re-solves backwards: both evaluate f during backward
    assert (report["train_nfe_backward_mean"] > 0) == (gradient != "direct")
    assert math.isfinite(report["test_nll"])
