"""Pal et al. (2023): local error regularisation -- one embedded step from a sampled t_reg, unbiased
(``t_reg ~ U[0, T)``) or biased (a random accepted step start) -- against the global error regulariser
(``sum_j E_j |dt_j|`` over every accepted step) and no regularisation; weight 1 for each.

* toy CNF (8 Gaussians, dopri5 1e-5, Hutchinson, T = 0.5; ``regularizers={"local_error": 1.0}`` etc.);
* the ``digits`` neural-ODE classifier (:mod:`classifier`).
Reported: training time, NFE in training (the regulariser's own evaluations included), NFE at evaluation,
test NLL or accuracy.
"""
from __future__ import annotations

import classifier as C
import harness as H

PAPER = "Pal et al. (local regularisation)"
ARMS = ("none", "local_error", "local_error_biased", "global_error")


def run(scale, cache, progress, plots):
    toy = {k: H.toy_arm(cache, scale, progress, k, **({} if k == "none" else {"regularizers": {k: 1.0}}))
           for k in ARMS}
    clf = {k: C.arm(cache, scale, progress, None if k == "none" else k) for k in ARMS}
    verdicts = []
    a = toy["none"]
    for k in ARMS[1:]:
        b = toy[k]
        nfe = H.ratio(b.evals["eval"]["nfe"], a.evals["eval"]["nfe"])
        t = H.ratio(b.wall_s, a.wall_s)
        dnll = b.evals["eval"]["nll"] - a.evals["eval"]["nll"]
        verdicts.append(H.Verdict(
            PAPER, f"toy CNF: {k} vs none", "fewer NFE at evaluation (faster prediction); the local variants "
            "train about as fast as no regularisation, the global one slower",
            "MNIST NODE: test NFE x0.62 (unbiased) / x0.60 (biased); training 1.1x faster (unbiased), 2x slower "
            "(biased); no CNF experiment in the paper",
            f"eval NFE {a.evals['eval']['nfe']} -> {b.evals['eval']['nfe']} (x{nfe:.2f}); training x{t:.2f}; "
            f"train NFE {a.mean_nfe:.0f} -> {b.mean_nfe:.0f}; test NLL {a.evals['eval']['nll']:.3f} -> "
            f"{b.evals['eval']['nll']:.3f}",
            H.grade(nfe <= 0.8 and dnll < 0.1, nfe < 0.95),
            "reproduced: eval NFE <= 0.8x at NLL within 0.1 nats; partly: fewer eval NFE"))
    c0 = clf["none"]
    for k in ARMS[1:]:
        c = clf[k]
        nfe = H.ratio(c["test_nfe"], c0["test_nfe"])
        t = H.ratio(c["train_s"], c0["train_s"])
        dacc = c["test_accuracy"] - c0["test_accuracy"]
        verdicts.append(H.Verdict(
            PAPER, f"digits classifier: {k} vs none", "fewer test NFE at about the same accuracy",
            "MNIST NODE: test NFE 304 -> 188 (unbiased) / 183 (biased), accuracy 97.6 -> 97.5%",
            f"test NFE {c0['test_nfe']} -> {c['test_nfe']} (x{nfe:.2f}); training x{t:.2f}; accuracy "
            f"{c0['test_accuracy']:.3f} -> {c['test_accuracy']:.3f}",
            H.grade(nfe <= 0.8 and dacc > -0.02, nfe < 0.95),
            "reproduced: test NFE <= 0.8x and accuracy within 2 points; partly: fewer test NFE"))
    plots["pal_toy"] = (H.plot_curves, (toy, "nfe", "Pal et al., toy CNF: forward NFE per iteration"))
    return {"toy": {"rows": [H.flow_row(r) for r in toy.values()]},
            "classifier": {"rows": [C.row(r) for r in clf.values()]}}, verdicts


def arms(scale) -> dict:
    return {**{f"toy {k}": scale.toy_iters for k in ARMS}, **{f"classifier {k}": scale.clf_iters for k in ARMS}}
