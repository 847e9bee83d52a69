"""`fastode demo`: both trainers start from the same weights and see the same data / noise / solver (their
losses agree), and a tiny run writes its JSON and PNG."""
import json
import os

import pytest
import torch

from fastode import demo


TINY = ["--dims", "8-8", "--method", "rk4", "--step-size", "0.25", "--test-size", "100", "--npts", "10",
        "--no-progress", "--batch-size", "20"]


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_pair_is_the_same_model_and_training(trace):
    # with the same gradient mode (discretise-optimise) both stacks compute the same iterations
    args = demo.build_parser().parse_args(TINY + ["--trace", trace, "--kinetic", "0.1", "--baseline-gradient",
                                                  "direct"])
    fast, base = demo.build_pair(args)
    assert type(fast.blocks[0].dynamics).__name__ == "ConcatSquashMLP"
    assert isinstance(base.blocks[0].dynamics, demo.PlainConcatSquash)
    for (k1, v1), (k2, v2) in zip(fast.state_dict().items(), base.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    trainers = [demo.Trainer("fastode", fast, args), demo.Trainer("torchdiffeq", base, args)]
    x = torch.randn(20, 2)
    for itr in range(3):
        for tr in trainers:
            tr.step(x, itr)
    f, b = trainers
    assert f.nfe_f == b.nfe_f
    for lf, lb in zip(f.losses, b.losses):
        assert lf == pytest.approx(lb, rel=1e-4, abs=1e-4)
    for pf, pb in zip(fast.parameters(), base.parameters()):
        torch.testing.assert_close(pf, pb, rtol=1e-4, atol=1e-5)


def test_adjoint_baseline_first_iteration_matches():
    """FFJORD's odeint_adjoint: the same forward (loss) as fastode, plus a backward re-solve (its gradient is
    the continuous adjoint's, so later iterations drift apart)."""
    args = demo.build_parser().parse_args(TINY)
    fast, base = demo.build_pair(args)
    trainers = [demo.Trainer("fastode", fast, args), demo.Trainer("torchdiffeq", base, args)]
    x = torch.randn(20, 2)
    for tr in trainers:
        tr.step(x, 0)
    f, b = trainers
    assert f.losses[0] == pytest.approx(b.losses[0], rel=1e-5)
    assert b.nfe_b[0] > 0 and f.nfe_b[0] == 0  # the adjoint re-solves backwards; direct does not


def test_demo_writes_json_and_png(tmp_path):
    out = tmp_path / "demo"
    assert demo.main(TINY + ["--niters", "2", "--out", str(out)]) == 0
    rep = json.load(open(out / "demo.json"))
    for side in ("fastode", "torchdiffeq"):
        for key in ("time_per_iteration_s_median", "nfe_forward_mean", "nfe_backward_mean", "test_nll_nats",
                    "inverse_error"):
            assert key in rep[side], (side, key)
    assert rep["fastode"]["test_nll_nats"] == pytest.approx(rep["torchdiffeq"]["test_nll_nats"], abs=1e-3)
    assert rep["speedup_time_per_iteration_median"] > 0
    with open(out / "demo.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out / "demo.png") > 1000
