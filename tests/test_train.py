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


# --- the command's rough edges: defaults, one-line errors, Ctrl-C, spaces, threads, paths, --help ----------

@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_defaults_fit_every_builtin_tabular_set(name):
    """The default --batch-size fits the set (breast_cancer has 462 training rows, fewer than 1000)."""
    args = T.parse_args(["--data", name])
    src = T.BatchSource(args, T.DistInfo(0, 1))
    assert 0 < args.batch_size <= len(src.trn) and args.batch_size == min(1000, len(src.trn))
    assert len(src.batch(0)) == args.batch_size
    assert any("--batch-size" in d for d in args.defaulted)
    # an explicit size that does not fit is one clear error, not a crash mid-run
    args = T.parse_args(["--data", name, "--batch-size", "100000"])
    with pytest.raises(T.UsageError, match="larger than the .* training set"):
        T.BatchSource(args, T.DistInfo(0, 1))


def _one_line_error(capsys, argv, pattern):
    from fastode.__main__ import main

    try:
        rc = main(["train"] + argv)
    except SystemExit as exc:  # argparse's own exit (after printing one line)
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "Traceback" not in err[0] and err[0].startswith("fastode train: error:"), err
    assert __import__("re").search(pattern, err[0]), err[0]


def test_user_mistakes_get_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["--method", "RK4"], "did you mean 'rk4'")
    _one_line_error(capsys, ["--eval-method", "dopri"], "unknown method 'dopri'")
    _one_line_error(capsys, ["--resume", str(tmp_path / "missing.pt")], "no such file")
    _one_line_error(capsys, ["--data", "power", "--data-root", str(tmp_path), "--save", str(tmp_path / "p"),
                             "--no-progress"], "power")
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["--device", "cuda", "--save", str(tmp_path / "c")], "CUDA is not available")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _one_line_error(capsys, ["--resume", str(bad), "--save", str(tmp_path / "b"), "--no-progress"] + TINY,
                    "not a readable checkpoint")


def test_fastode_without_a_command_is_a_usage_error(capsys):
    from fastode.__main__ import main

    assert main([]) == 2 and "usage" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_fixed_grid_method_without_step_size_gets_a_default():
    args = T.parse_args(["--method", "rk4"])
    assert args.step_size == T.DEFAULT_FIXED_STEP and any("--step-size" in d for d in args.defaulted)
    args = T.parse_args(["--eval-method", "midpoint"])
    assert args.step_size is None and args.eval_step_size == T.DEFAULT_FIXED_STEP
    assert T.parse_args(["--method", "rk4", "--step-size", "0.1"]).step_size == 0.1


def test_ctrl_c_saves_a_checkpoint_and_resume_says_where(tmp_path, capsys, monkeypatch):
    import fastode.flows as F

    real, calls = F.density_loss, {"n": 0}

    def interrupted(*a, **k):  # Ctrl-C during the forward pass of the fourth iteration
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(F, "density_loss", interrupted)
    save = str(tmp_path / "ci")
    args = T.parse_args(["--save", save, "--data", "moons", "--niters", "50", "--no-plot"] + TINY)
    with pytest.raises(KeyboardInterrupt):
        T.train(args)
    out = capsys.readouterr().out
    assert "interrupted after 3 of 50 iterations" in out and "--resume auto" in out
    ck = torch.load(os.path.join(save, "checkpoint.pt"), weights_only=False)
    assert ck["iteration"] == 3
    monkeypatch.setattr(F, "density_loss", real)
    args = T.parse_args(["--save", save, "--data", "moons", "--niters", "5", "--no-plot", "--resume", "auto"] + TINY)
    report = T.train(args)
    assert "resumed from" in capsys.readouterr().out and report["iterations"] == 5
    # main() turns the interrupt into exit code 130 (after the checkpoint message)
    monkeypatch.setattr(F, "density_loss", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert T.main(["--save", str(tmp_path / "ci3"), "--data", "moons", "--niters", "5", "--no-plot"] + TINY) == 130


def test_validation_and_test_nll_in_the_same_space(tmp_path):
    """digits: the headline test NLL is in data space, and so is the validation NLL printed and reported."""
    from fastode.data import load_digits

    _, report = run(tmp_path, "--data", "digits", "--niters", "2", "--val-every", "1", "--no-plot",
                    "--trace", "hutchinson", "--batch-size", "64")
    tab = load_digits()
    for v in report["history"]["val"]:
        assert v["nll"] == pytest.approx(v["nll_model_space"] - tab.mean_logdet("val"), rel=1e-12)
    assert report["headline_space"].endswith("data space")
    assert report["test_nll"] == pytest.approx(report["test_nll_model_space"] - tab.mean_logdet("test"), rel=1e-9)
    assert report["val_nll_best"] == pytest.approx(min(v["nll"] for v in report["history"]["val"]))


def test_threads_and_solve_path_are_reported(tmp_path, capsys):
    args = T.parse_args(["--save", str(tmp_path / "tp"), "--data", "moons", "--niters", "1", "--no-plot"]
                        + [a for a in TINY if a not in ("--threads", "1")])
    report = T.train(args)
    out = capsys.readouterr().out
    assert report["threads"]["per_process"] == 1 and "2-D toy data" in report["threads"]["why"]
    assert torch.get_num_threads() == 1 and "1 thread(s)" in out
    import fastode.cpp as fc

    expected = "cpp_grid" if fc.available() else "odeint"
    assert [p["engine"] for p in report["solve_path"]] == [expected]
    assert f"solve path: {expected}" in out
    # the exact trace with Jacobian-Frobenius misses the fused path, and says why
    args = T.parse_args(["--save", str(tmp_path / "tp2"), "--data", "moons", "--niters", "1", "--no-plot",
                         "--trace", "exact", "--jacobian-frobenius", "0.01"] + TINY)
    report = T.train(args)
    path = report["solve_path"][0]
    assert path["engine"] == "odeint" and path["skipped"][0][0] == "cpp_grid"
    assert "trace='exact'" in path["skipped"][0][1]
    assert "cpp_grid not taken: regulariser" in capsys.readouterr().out


def test_help_lists_defaults_once_and_the_valid_methods():
    text = " ".join(T.build_parser().format_help().split())
    assert "(default: None)" not in text and "(default: (" not in text
    assert "--dims DIMS hidden widths of the concatsquash MLP (default: 64-64-64)" in text
    for opt, default in (("--niters", "10000"), ("--atol", "1e-05"), ("--rtol", "1e-05"), ("--lr", "0.001"),
                         ("--dtype", "float32")):
        assert __import__("re").search(rf"{opt} \S+ .*?\(default: {__import__('re').escape(default)}\)", text), opt
    assert "default 0.5 for toy, 1.0 tabular" in text and "default 0.5 for toy, 1.0 tabular) (default" not in text
    listed = text.split("--method METHOD ODE method:")[1][:300]
    assert "rk4, rk4_classic" in listed and "..." not in listed


def test_curves_plot_single_validation_point_and_title_clear(tmp_path):
    from fastode import plots

    fig = plots.curves_figure({"training loss": ([0, 1, 2], [3.0, 2.0, 1.5]), "validation NLL": ([2], [1.4])},
                              title="moons")
    fig.canvas.draw()
    axes = fig.get_axes()
    line = axes[1].get_lines()[0]
    assert line.get_marker() not in (None, "None", "") and len(line.get_xdata()) == 1
    r = fig.canvas.get_renderer()
    sup = fig._suptitle.get_window_extent(r)
    for ax in axes:
        assert sup.y0 >= ax.title.get_window_extent(r).y1 - 0.5  # the figure title sits above every panel title
    assert _png(plots.plot_curves(str(tmp_path / "c.png"), {"a": ([0], [1.0])}, title="t"))
