"""Butcher tableaus: the only place in fastode where Runge-Kutta coefficients are written down.

Every tableau is validated when this module is imported (:func:`validate`):

* ``a`` is strictly lower triangular (row ``i`` has ``i`` entries) and its row sums equal ``c``;
* ``sum(b) == 1``; ``sum(b_err) == 0`` (``b_err = b - b_hat``, the embedded method is consistent too);
* an FSAL tableau's last row of ``a`` equals ``b`` and its last node is ``c = 1``;
* the dense output reproduces ``b`` at ``theta = 1`` and is consistent (``sum_i b_i(theta) == theta``);
* ``c_mid`` (torchdiffeq's quartic-interpolant midpoint weights) sums to 1/2.

Order conditions (every rooted tree up to the method's order) are checked by the test-suite
(``tests/test_tableaus.py``), together with numerical convergence slopes.

Conventions (DESIGN.md, "Contract: tableaus"): ``b_i(theta) = sum_k dense[i][k] * theta**(k+1)``; the
interpolated solution is ``y(t0 + theta*dt) = y0 + dt * sum_i b_i(theta) k_i``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["ButcherTableau", "TABLEAUS", "get_tableau", "tableau_tensors", "validate", "dense_weights"]

Row = Tuple[float, ...]


@dataclass(frozen=True)
class ButcherTableau:
    name: str
    c: Row                                  # s nodes
    a: Tuple[Row, ...]                      # s rows; row i has i entries (strictly lower triangular)
    b: Row                                  # s weights of the propagated solution
    b_err: Optional[Row]                    # s weights of the error estimate (b - b_hat); None for fixed-step
    order: int                              # order used in step-size control (torchdiffeq's .order)
    fsal: bool                              # last stage is f(t1, y1)
    c_mid: Optional[Row]                    # torchdiffeq's quartic-interpolant midpoint weights
    dense: Optional[Tuple[Row, ...]]        # b_i(theta) = sum_k dense[i][k] * theta**(k+1)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None


def _t(x) -> Row:
    return tuple(float(v) for v in x)


def _expand(*factors) -> np.ndarray:
    """Coefficients (ascending powers) of the product of polynomials given in ascending-power form."""
    p = np.array([1.0])
    for f in factors:
        p = np.polynomial.polynomial.polymul(p, np.asarray(f, dtype=np.float64))
    return p


def _dense_from_ascending(polys) -> Tuple[Row, ...]:
    """Dense rows from b_i(theta) given as ascending coefficient arrays with a zero constant term."""
    deg = max(len(p) for p in polys) - 1
    rows = []
    for p in polys:
        p = np.concatenate([np.asarray(p, dtype=np.float64), np.zeros(deg + 1 - len(p))])
        assert abs(p[0]) == 0.0
        rows.append(_t(p[1:]))
    return tuple(rows)


# ------------------------------------------------------------------------------------------------- dopri5
# Dormand & Prince (1980) RK5(4)7M; error weights from Shampine (1986)'s alternative embedded 4th-order
# solution (as torchdiffeq), dense output: the 4th-order continuous extension (Shampine 1986 / Hairer's
# DOPRI5, the same polynomials as scipy's RK45).
_DP5_B = (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0)
_DP5_BHAT_SHAMPINE = (1951 / 21600, 0, 22642 / 50085, 451 / 720, -12231 / 42400, 649 / 6300, 1 / 60)
DOPRI5 = ButcherTableau(
    name="dopri5",
    c=_t((0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1, 1)),
    a=(
        (),
        _t((1 / 5,)),
        _t((3 / 40, 9 / 40)),
        _t((44 / 45, -56 / 15, 32 / 9)),
        _t((19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729)),
        _t((9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656)),
        _t(_DP5_B[:6]),
    ),
    b=_t(_DP5_B),
    b_err=_t(b - bh for b, bh in zip(_DP5_B, _DP5_BHAT_SHAMPINE)),
    order=5,
    fsal=True,
    c_mid=_t(x / 2 for x in (6025192743 / 30085553152, 0, 51252292925 / 65400821598, -2691868925 / 45128329728,
                             187940372067 / 1594534317056, -1776094331 / 19743644256, 11237099 / 235043384)),
    dense=(
        _t((1, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432)),
        _t((0, 0, 0, 0)),
        _t((0, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799)),
        _t((0, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072)),
        _t((0, 127303824393 / 49829197408, -318862633887 / 49829197408, 701980252875 / 199316789632)),
        _t((0, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844)),
        _t((0, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423)),
    ),
)

# ------------------------------------------------------------------------------------------------- dopri8
# Prince & Dormand (1981) RK8(7)13M (the coefficients torchdiffeq uses), 13 stages + the FSAL stage.
_DP8_C = (0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821, 13 / 20,
          1201146811 / 1299019798, 1, 1, 1)
_DP8_B = (14005451 / 335480064, 0, 0, 0, 0, -59238493 / 1068277825, 181606767 / 758867731,
          561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299, 118820643 / 751138087,
          -528747749 / 2220607170, 1 / 4, 0)
_DP8_BHAT = (13451932 / 455176623, 0, 0, 0, 0, -808719846 / 976000145, 1757004468 / 5645159321,
             656045339 / 265891186, -3867574721 / 1518517206, 465885868 / 322736535, 53011238 / 667516719,
             2 / 45, 0, 0)
_DP8_A = (
    (),
    (1 / 18,),
    (1 / 48, 1 / 16),
    (1 / 32, 0, 3 / 32),
    (5 / 16, 0, -75 / 64, 75 / 64),
    (3 / 80, 0, 0, 3 / 16, 3 / 20),
    (29443841 / 614563906, 0, 0, 77736538 / 692538347, -28693883 / 1125000000, 23124283 / 1800000000),
    (16016141 / 946692911, 0, 0, 61564180 / 158732637, 22789713 / 633445777, 545815736 / 2771057229,
     -180193667 / 1043307555),
    (39632708 / 573591083, 0, 0, -433636366 / 683701615, -421739975 / 2616292301, 100302831 / 723423059,
     790204164 / 839813087, 800635310 / 3783071287),
    (246121993 / 1340847787, 0, 0, -37695042795 / 15268766246, -309121744 / 1061227803, -12992083 / 490766935,
     6005943493 / 2108947869, 393006217 / 1396673457, 123872331 / 1001029789),
    (-1028468189 / 846180014, 0, 0, 8478235783 / 508512852, 1311729495 / 1432422823, -10304129995 / 1701304382,
     -48777925059 / 3047939560, 15336726248 / 1032824649, -45442868181 / 3398467696, 3065993473 / 597172653),
    (185892177 / 718116043, 0, 0, -3185094517 / 667107341, -477755414 / 1098053517, -703635378 / 230739211,
     5731566787 / 1027545527, 5232866602 / 850066563, -4093664535 / 808688257, 3962137247 / 1805957418,
     65686358 / 487910083),
    (403863854 / 491063109, 0, 0, -5068492393 / 434740067, -411421997 / 543043805, 652783627 / 914296604,
     11173962825 / 925320556, -13158990841 / 6184727034, 3936647629 / 1978049680, -160528059 / 685178525,
     248638103 / 1413531060, 0),
    _DP8_B[:13],
)
# Continuous extension used by torchdiffeq for dopri8's midpoint (b_i(theta) = theta * p_i(theta), p_i of
# degree 5, listed from theta**5 down to theta**0), stages 0, 5..13; the others are 0.
_DP8_DENSE_DESC = {
    0: (-6.3448349392860401388, 22.1396504998094068976, -30.0610568289666450593, 19.9990069333683970610,
        -6.6910181737837595697, 1.0),
    5: (-39.6107919852202505218, 116.4422149550342161651, -121.4999627731334642623, 52.2273532792945524050,
        -7.6142658045872677172, 0.0),
    6: (20.3761213808791436958, -67.1451318825957197185, 83.1721004639847717481, -46.8919164181093621583,
        10.7281392630428866124, 0.0),
    7: (7.3347098826795362023, -16.5672243527496524646, 9.5724507555993664382, -0.1890893225010595467,
        0.5526637063753648783, 0.0),
    8: (32.8801774352459155182, -89.9916014847245016028, 87.8406057677205645007, -35.7075975946222072821,
        4.2186562625665153803, 0.0),
    9: (-10.1588990526426760954, 22.6237489648532849093, -17.4152107770762969005, 6.2736448083240352160,
        -0.6627209125361597559, 0.0),
    10: (-12.5401268098782561200, 32.2362340167355370113, -28.5903289514790976966, 10.3160881272450748458,
         -1.2636789001135462218, 0.0),
    11: (29.5553001484516038033, -82.1020315488359848644, 81.6630950584341412934, -34.7650769866611817349,
         5.4106037898590422230, 0.0),
    12: (-41.7923486424390588923, 116.2662185791119533462, -114.9375291377009418170, 47.7457971078225540396,
         -7.0321379067945741781, 0.0),
    13: (20.3006925822100825485, -53.9020777466385396792, 50.2558364226176017553, -19.0082099341608028453,
         2.3537586759714983486, 0.0),
}


def _dp8_c_mid() -> Row:
    # evaluated exactly as torchdiffeq does (same operation order, hence the same float64 values)
    h = 1 / 2
    out = [0.0] * 14
    for i, (p5, p4, p3, p2, p1, p0) in _DP8_DENSE_DESC.items():
        v = p5 * (h ** 5) + p4 * (h ** 4) + p3 * (h ** 3) + p2 * (h ** 2) + p1 * h
        if p0:
            v = v + p0
        out[i] = v / (1 / h)
    return tuple(out)


DOPRI8 = ButcherTableau(
    name="dopri8",
    c=_t(_DP8_C),
    a=tuple(_t(r) for r in _DP8_A),
    b=_t(_DP8_B),
    b_err=_t(b - bh for b, bh in zip(_DP8_B, _DP8_BHAT)),
    order=8,
    fsal=True,
    c_mid=_dp8_c_mid(),
    dense=tuple(_t(tuple(reversed(_DP8_DENSE_DESC[i]))) if i in _DP8_DENSE_DESC else _t((0.0,) * 6)
                for i in range(14)),
)

# -------------------------------------------------------------------------------------------------- tsit5
# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying
# assumption". Propagates the 5th-order solution (FSAL). Error weights with the corrected sign of the last
# entry (OrdinaryDiffEq.jl #1654, diffrax #98). Dense output: the paper's 4th-order continuous extension.
_TS5_B = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
          2.324710524099774, 0.0)
_TS5_BERR = (0.00178001105222577714, 0.0008164344596567469, -0.007880878010261995, 0.1447110071732629,
             -0.5823571654525552, 0.45808210592918697, -1 / 66)
# b_i(theta) in the paper's factored form (ascending-power factors)
_TS5_DENSE = _dense_from_ascending([
    -1.0530884977290216 * _expand([0, 1], [-1.3299890189751412, 1], [0.7139816917074209, -1.4364028541716351, 1]),
    0.1017 * _expand([0, 0, 1], [1.2949852507374631, -2.1966568338249754, 1]),
    2.490627285651252793 * _expand([0, 0, 1], [1.57803468208092486, -2.38535645472061657, 1]),
    -16.54810288924490272 * _expand([-1.21712927295533244, 1], [-0.61620406037800089, 1], [0, 0, 1]),
    47.37952196281928122 * _expand([-1.203071208372362603, 1], [-0.658047292653547382, 1], [0, 0, 1]),
    -34.87065786149660974 * _expand([-1.2, 1], [-0.666666666666666667, 1], [0, 0, 1]),
    2.5 * _expand([-1, 1], [-0.6, 1], [0, 0, 1]),
])
TSIT5 = ButcherTableau(
    name="tsit5",
    c=_t((0, 0.161, 0.327, 0.9, 0.9800255409045097, 1, 1)),
    a=(
        (),
        _t((0.161,)),
        _t((-0.008480655492356989, 0.335480655492357)),
        _t((2.8971530571054935, -6.359448489975075, 4.3622954328695815)),
        _t((5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525)),
        _t((5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838)),
        _t(_TS5_B[:6]),
    ),
    b=_t(_TS5_B),
    b_err=_t(_TS5_BERR),
    order=5,
    fsal=True,
    c_mid=None,  # filled below from the dense output at theta = 1/2
    dense=_TS5_DENSE,
)

# ------------------------------------------------------------------------------------ low-order adaptive
BOSH3 = ButcherTableau(
    name="bosh3",
    c=_t((0, 1 / 2, 3 / 4, 1)),
    a=((), _t((1 / 2,)), _t((0, 3 / 4)), _t((2 / 9, 1 / 3, 4 / 9))),
    b=_t((2 / 9, 1 / 3, 4 / 9, 0)),
    b_err=_t((2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8)),
    order=3,
    fsal=True,
    c_mid=_t((0, 0.5, 0, 0)),
    dense=None,
)

# Runge-Kutta-Fehlberg 2(1): the propagated solution is 2nd order; the last stage sits at the 1st-order
# point, so it is NOT a true FSAL pair (the adaptive loop still reuses that stage as the next f0, as
# torchdiffeq does; see fastode.solvers.rk_adaptive).
FEHLBERG2 = ButcherTableau(
    name="fehlberg2",
    c=_t((0, 1 / 2, 1)),
    a=((), _t((1 / 2,)), _t((1 / 256, 255 / 256))),
    b=_t((1 / 512, 255 / 256, 1 / 512)),
    b_err=_t((-1 / 512, 0, 1 / 512)),
    order=2,
    fsal=False,
    c_mid=_t((0, 0.5, 0)),
    dense=None,
)

# Heun/Euler 2(1) (the last stage sits at the Euler point: not a true FSAL pair, same reuse as fehlberg2).
ADAPTIVE_HEUN = ButcherTableau(
    name="adaptive_heun",
    c=_t((0, 1)),
    a=((), _t((1,))),
    b=_t((0.5, 0.5)),
    b_err=_t((0.5, -0.5)),
    order=2,
    fsal=False,
    c_mid=_t((0.5, 0)),
    dense=None,
)

# ------------------------------------------------------------------------------------------ fixed grid
EULER = ButcherTableau("euler", _t((0,)), ((),), _t((1,)), None, 1, False, None, None)
MIDPOINT = ButcherTableau("midpoint", _t((0, 1 / 2)), ((), _t((1 / 2,))), _t((0, 1)), None, 2, False, None, None)
HEUN2 = ButcherTableau("heun2", _t((0, 1)), ((), _t((1,))), _t((1 / 2, 1 / 2)), None, 2, False, None, None)
HEUN3 = ButcherTableau("heun3", _t((0, 1 / 3, 2 / 3)), ((), _t((1 / 3,)), _t((0, 2 / 3))), _t((1 / 4, 0, 3 / 4)),
                       None, 3, False, None, None)
# Kutta's 3/8 rule: what torchdiffeq calls 'rk4'
RK4 = ButcherTableau("rk4", _t((0, 1 / 3, 2 / 3, 1)), ((), _t((1 / 3,)), _t((-1 / 3, 1)), _t((1, -1, 1))),
                     _t((1 / 8, 3 / 8, 3 / 8, 1 / 8)), None, 4, False, None, None)
RK4_CLASSIC = ButcherTableau("rk4_classic", _t((0, 1 / 2, 1 / 2, 1)), ((), _t((1 / 2,)), _t((0, 1 / 2)), _t((0, 0, 1))),
                             _t((1 / 6, 1 / 3, 1 / 3, 1 / 6)), None, 4, False, None, None)


def dense_weights(tab: ButcherTableau, theta) -> tuple:
    """``(b_1(theta), ..., b_s(theta))`` from ``tab.dense`` (Horner in theta).

    ``theta`` is a Python float or a 0-dim tensor (a differentiable output time); a stage whose row is all zeros
    gets the Python float ``0.0`` either way, so that stage combinations skip it."""
    if tab.dense is None:
        raise ValueError(f"tableau {tab.name!r} has no dense output")
    out = []
    for row in tab.dense:
        if all(r == 0 for r in row):
            out.append(0.0)
            continue
        v = 0.0
        for coef in reversed(row):
            v = (v + coef) * theta
        out.append(v)
    return tuple(out)


TSIT5 = ButcherTableau(**{**TSIT5.__dict__, "c_mid": dense_weights(TSIT5, 0.5)})

TABLEAUS: Dict[str, ButcherTableau] = {
    t.name: t for t in (DOPRI8, DOPRI5, TSIT5, BOSH3, FEHLBERG2, ADAPTIVE_HEUN, EULER, MIDPOINT, HEUN2, HEUN3, RK4,
                        RK4_CLASSIC)
}


def validate(tab: ButcherTableau, tol: float = 1e-13) -> None:
    """Raise ``ValueError`` if ``tab`` is inconsistent (see the module docstring)."""
    s = len(tab.c)

    def fail(msg):
        raise ValueError(f"tableau {tab.name!r}: {msg}")

    if len(tab.a) != s or len(tab.b) != s:
        fail(f"c has {s} nodes but a has {len(tab.a)} rows and b {len(tab.b)} weights")
    for i, row in enumerate(tab.a):
        if len(row) != i:
            fail(f"row {i} of a has {len(row)} entries, expected {i} (strictly lower triangular)")
        if abs(sum(row) - tab.c[i]) > tol * max(1.0, sum(abs(x) for x in row)):
            fail(f"row {i} of a sums to {sum(row)!r}, but c[{i}] = {tab.c[i]!r}")
    if abs(sum(tab.b) - 1.0) > tol:
        fail(f"sum(b) = {sum(tab.b)!r} != 1")
    if tab.b_err is not None:
        if len(tab.b_err) != s:
            fail(f"b_err has {len(tab.b_err)} entries, expected {s}")
        if abs(sum(tab.b_err)) > tol * max(1.0, sum(abs(x) for x in tab.b_err)) * 10:
            fail(f"sum(b_err) = {sum(tab.b_err)!r} != 0")
    if tab.fsal:
        if tab.c[-1] != 1.0 or any(abs(x - y) > 0 for x, y in zip(tab.a[-1], tab.b[:-1])) or tab.b[-1] != 0.0:
            fail("fsal=True requires c[-1] == 1, a[-1] == b[:-1] and b[-1] == 0")
    if tab.c_mid is not None:
        if len(tab.c_mid) != s:
            fail(f"c_mid has {len(tab.c_mid)} entries, expected {s}")
        if abs(sum(tab.c_mid) - 0.5) > 1e-12:
            fail(f"sum(c_mid) = {sum(tab.c_mid)!r} != 1/2")
    if tab.dense is not None:
        if len(tab.dense) != s:
            fail(f"dense has {len(tab.dense)} rows, expected {s}")
        at1 = dense_weights(tab, 1.0)
        for i, (x, y) in enumerate(zip(at1, tab.b)):
            if abs(x - y) > 1e-12:
                fail(f"dense output at theta=1 gives b_{i} = {x!r}, but b_{i} = {y!r}")
        for theta in (0.25, 0.5, 0.75):
            if abs(sum(dense_weights(tab, theta)) - theta) > 1e-12:
                fail(f"dense output is inconsistent at theta={theta}: sum_i b_i(theta) != theta")


for _tab in TABLEAUS.values():
    validate(_tab)
del _tab


def get_tableau(name: str) -> ButcherTableau:
    try:
        return TABLEAUS[name]
    except KeyError:
        raise ValueError(f"no tableau named {name!r}; available: {', '.join(TABLEAUS)}") from None


@functools.lru_cache(maxsize=None)
def _tensors(name, dtype, device):
    tab = TABLEAUS[name]
    s = tab.stages
    a = torch.zeros(s, s, dtype=torch.float64)
    for i, row in enumerate(tab.a):
        if row:
            a[i, :i] = torch.tensor(row, dtype=torch.float64)
    c = torch.tensor(tab.c, dtype=torch.float64)
    b = torch.tensor(tab.b, dtype=torch.float64)
    be = None if tab.b_err is None else torch.tensor(tab.b_err, dtype=torch.float64)
    conv = lambda x: None if x is None else x.to(dtype=dtype, device=device)
    return conv(c), conv(a), conv(b), conv(be)


def tableau_tensors(tab: ButcherTableau, dtype: torch.dtype, device) -> tuple:
    """``(c[s], a[s, s], b[s], b_err[s] or None)`` as tensors of ``dtype`` on ``device`` (cached)."""
    if TABLEAUS.get(tab.name) is not tab:
        raise ValueError(f"tableau_tensors caches by name; {tab.name!r} is not the registered tableau")
    return _tensors(tab.name, dtype, torch.device(device))
