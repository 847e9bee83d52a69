"""Du et al. (2022), TO-FLOW: the end time T as an optimisation variable, updated by coordinate descent with the
temporal regularisation alpha |T| and the clip T in [t0 + eps, 2 T0 - t0 - eps]
(:class:`fastode.flows.EndTimeOptimizer`, Adam lr 1e-2, alpha = 0.1, eps = 0.1, T0 = 0.5: the paper's settings).

Toy CNF (8 Gaussians, 64-64-64 tanh, dopri5 1e-5, Hutchinson): TO-FLOW vs a fixed T = 0.5 vs FFJORD's jointly
learned T (``learn_T=True``, T = s^2 in the same Adam as the weights). TO-FLOW is the paper's Algorithm 1: one
solve per iteration, the weights updated by their optimiser and T by its own (``mode="joint"``: the same backward);
the variant with a separate coordinate-descent solve for T (``mode="alternate"``, theta frozen) is reported too.
Reported: NFE per iteration (all solves counted), total training time, final test NLL, the trajectory of T.
"""
from __future__ import annotations

import harness as H

PAPER = "Du et al. (TO-FLOW)"


def run(scale, cache, progress, plots):
    arms = {"fixed T": H.toy_arm(cache, scale, progress, "none"),
            "FFJORD joint T": H.toy_arm(cache, scale, progress, "ffjord T", learn_T=True),
            "TO-FLOW": H.toy_arm(cache, scale, progress, "toflow", learn_T=True, T_parametrization="linear",
                                 t_opt_kwargs=dict(lr=1e-2, alpha=0.1, eps=0.1, mode="joint")),
            "TO-FLOW, coordinate descent": H.toy_arm(cache, scale, progress, "toflow alternate", learn_T=True,
                                                     T_parametrization="linear",
                                                     t_opt_kwargs=dict(lr=1e-2, alpha=0.1, eps=0.1, mode="alternate"))}
    fixed, joint, tof, _alt = arms.values()
    verdicts = []
    for base_name, base in (("FFJORD joint T", joint), ("fixed T", fixed)):
        t = H.ratio(tof.wall_s, base.wall_s)
        dnll = tof.evals["eval"]["nll"] - base.evals["eval"]["nll"]
        verdicts.append(H.Verdict(
            PAPER, f"toy CNF: TO-FLOW vs {base_name}", "fewer NFE and 23.7-41.7% less total training time at "
            "comparable likelihood", "MNIST: NFE 397 vs 751, 46.4 vs 79.6 h, 1.026 vs 1.017 bits/dim (FFJORD)",
            f"NFE/iter {tof.mean_nfe:.0f} vs {base.mean_nfe:.0f}; training {tof.wall_s:.1f} vs {base.wall_s:.1f} s "
            f"({100 * (1 - t):+.0f}% time saved); test NLL {tof.evals['eval']['nll']:.3f} vs "
            f"{base.evals['eval']['nll']:.3f}; final T {tof.T[-1]:.3f} (vs {base.T[-1]:.3f})",
            H.grade(t <= 0.85 and dnll < 0.05, t < 1.0),
            "reproduced: >= 15% less training time and NLL within 0.05 nats; partly: any time saved"))
    plots["toflow_T"] = (H.plot_curves, (arms, "T", "TO-FLOW: the end time during training"))
    plots["toflow_nfe"] = (H.plot_curves, (arms, "nfe", "TO-FLOW: forward NFE per iteration"))
    rows = []
    for r in arms.values():
        row = H.flow_row(r)
        row["final_T"] = r.T[-1]
        rows.append(row)
    return {"toy": {"rows": rows}}, verdicts


def arms(scale) -> dict:
    return {f"toy {k}": scale.toy_iters for k in ("none", "ffjord T", "toflow", "toflow alternate")}
