"""Kelly et al. (2020), TayNODE: regularise R_K = int ||d^K z/dt^K||^2 dt (``regularizers={"r2": 0.01}``).

* toy CNF (8 Gaussians, dopri5 1e-5, Hutchinson, T = 0.5): R_2 vs no regularisation vs RNODE, same seeds;
  evaluation NFE against test NLL, and the training time (the paper: fewer NFE at evaluation, slower training);
* the ``digits`` neural-ODE classifier (:mod:`classifier`): R_2 and R_3 vs none vs RNODE, evaluation NFE against
  test accuracy (the paper's MNIST classifier regularises R_3).
"""
from __future__ import annotations

import classifier as C
import harness as H

PAPER = "Kelly et al. (TayNODE)"


def run(scale, cache, progress, plots):
    toy = {"none": H.toy_arm(cache, scale, progress, "none"),
           "rnode": H.toy_arm(cache, scale, progress, "rnode", regularizers={"kinetic": 0.01,
                                                                             "jacobian_frobenius": 0.01}),
           "r2": H.toy_arm(cache, scale, progress, "r2", regularizers={"r2": 0.01})}
    clf = {k: C.arm(cache, scale, progress, None if k == "none" else k) for k in ("none", "r2", "r3", "rnode")}
    a, b, rn = toy["none"], toy["r2"], toy["rnode"]
    nfe = H.ratio(b.evals["eval"]["nfe"], a.evals["eval"]["nfe"])
    dnll = (b.evals["eval"]["nll"] - a.evals["eval"]["nll"]) / abs(a.evals["eval"]["nll"])
    slow = H.ratio(b.wall_s, a.wall_s)
    verdicts = [H.Verdict(
        PAPER, "toy CNF: R_2 vs none vs RNODE",
        "fewer evaluation NFE for a small loss increase; slower training with adaptive solvers",
        "MNIST FFJORD: NFE 149 -> 92 (-38%) for +0.6% bits/dim (RNODE 104); ~70% slower training",
        f"eval NFE {a.evals['eval']['nfe']} -> {b.evals['eval']['nfe']} (RNODE {rn.evals['eval']['nfe']}); test NLL "
        f"{a.evals['eval']['nll']:.3f} -> {b.evals['eval']['nll']:.3f} ({100 * dnll:+.1f}%); training x{slow:.2f}",
        H.grade(nfe <= 0.8 and dnll < 0.03, nfe < 0.95),
        f"reproduced: eval NFE <= 0.8x at < 3% NLL increase; partly: fewer NFE. {a.iters} iterations")]
    c0, c3 = clf["none"], clf["r3"]
    cn = H.ratio(c3["test_nfe"], c0["test_nfe"])
    dacc = c3["test_accuracy"] - c0["test_accuracy"]
    verdicts.append(H.Verdict(
        PAPER, "digits neural-ODE classifier: R_3 vs none",
        "speed regularisation lowers NFE throughout training without substantially changing the training error",
        "MNIST classifier: lower NFE during training at similar error (Fig. 3); Pal et al.'s table: TayNODE 80 vs "
        "304 test NFE",
        f"test NFE {c0['test_nfe']} -> {c3['test_nfe']} (R_2 {clf['r2']['test_nfe']}, RNODE {clf['rnode']['test_nfe']}); "
        f"train NFE {c0['mean_nfe_train']:.0f} -> {c3['mean_nfe_train']:.0f}; test accuracy "
        f"{c0['test_accuracy']:.3f} -> {c3['test_accuracy']:.3f}",
        H.grade(cn <= 0.8 and dacc > -0.02, cn < 0.95),
        "reproduced: test NFE <= 0.8x and accuracy within 2 points; partly: fewer NFE"))
    plots["taynode_toy"] = (H.plot_curves, (toy, "nfe", "TayNODE, toy CNF: forward NFE per iteration"))
    return {"toy": {"rows": [H.flow_row(r) for r in toy.values()]},
            "classifier": {"rows": [C.row(r) for r in clf.values()]}}, verdicts


def arms(scale) -> dict:
    return {**{f"toy {k}": scale.toy_iters for k in ("none", "rnode", "r2")},
            **{f"classifier {k}": scale.clf_iters for k in ("none", "r2", "r3", "rnode")}}
