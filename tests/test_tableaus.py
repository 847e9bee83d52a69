"""Butcher tableaus: validation at import, order conditions on every rooted tree, dense-output orders."""
import functools
import itertools

import numpy as np
import pytest
import torch

from fastode import tableaus as T

# (order of b, order of the embedded b_hat = b - b_err or None, order of the dense output or None)
EXPECTED = {
    "dopri8": (8, 7, 5),   # torchdiffeq's dopri8 continuous extension is 5th order (not 7th)
    "dopri5": (5, 4, 4),
    "tsit5": (5, 4, 4),
    "bosh3": (3, 2, None),
    "fehlberg2": (2, 1, None),
    "adaptive_heun": (2, 1, None),
    "euler": (1, None, None),
    "midpoint": (2, None, None),
    "heun2": (2, None, None),
    "heun3": (3, None, None),
    "rk4": (4, None, None),
    "rk4_classic": (4, None, None),
}


@functools.lru_cache(None)
def trees(n):
    """Rooted trees with n nodes, as sorted tuples of child subtrees."""
    if n == 1:
        return ((),)

    def parts(rem, maxo):
        if rem == 0:
            yield []
            return
        for o in range(min(rem, maxo), 0, -1):
            for rest in parts(rem - o, o):
                yield [o] + rest

    out = set()
    for p in parts(n - 1, n - 1):
        for combo in itertools.product(*[trees(o) for o in p]):
            out.add(tuple(sorted(combo)))
    return tuple(sorted(out))


def _order(t):
    return 1 + sum(_order(c) for c in t)


def _gamma(t):
    g = _order(t)
    for c in t:
        g *= _gamma(c)
    return g


def _residuals(tab, weights, p, theta=1.0):
    """max over trees of order p of |weights . g(t) - theta^p / gamma(t)|."""
    s = tab.stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        A[i, :len(row)] = row
    w = np.asarray(weights, dtype=np.float64)

    @functools.lru_cache(None)
    def g(t):
        v = np.ones(s)
        for c in t:
            v = v * (A @ g(c))
        return v

    return max(abs(w @ g(t) - theta ** p / _gamma(t)) for t in trees(p))


def _order_of(tab, weights, theta=1.0, pmax=10):
    for p in range(1, pmax + 1):
        if _residuals(tab, weights, p, theta) > 1e-12:
            return p - 1
    return pmax


def test_tree_counts():
    assert [len(trees(n)) for n in range(1, 9)] == [1, 1, 2, 4, 9, 20, 48, 115]


def test_all_methods_present():
    assert set(T.TABLEAUS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_order_conditions(name):
    tab = T.TABLEAUS[name]
    p, p_hat, p_dense = EXPECTED[name]
    assert _order_of(tab, tab.b) == p
    if p_hat is None:
        assert tab.b_err is None
    else:
        b_hat = [b - e for b, e in zip(tab.b, tab.b_err)]
        assert _order_of(tab, b_hat) == p_hat
    if p_dense is None:
        assert tab.dense is None
    else:
        for theta in (0.2, 0.5, 0.9):
            assert _order_of(tab, T.dense_weights(tab, theta), theta) == p_dense


@pytest.mark.parametrize("name", list(EXPECTED))
def test_structure(name):
    tab = T.TABLEAUS[name]
    T.validate(tab)
    assert tab.order == EXPECTED[name][0]
    for i, row in enumerate(tab.a):
        assert len(row) == i
        assert sum(row) == pytest.approx(tab.c[i], abs=1e-14)
    if tab.c_mid is not None:
        assert sum(tab.c_mid) == pytest.approx(0.5, abs=1e-14)
    c, a, b, be = T.tableau_tensors(tab, torch.float32, "cpu")
    assert a.shape == (tab.stages, tab.stages) and c.dtype == torch.float32
    assert (be is None) == (tab.b_err is None)


def test_torchdiffeq_coefficients_identical():
    pytest.importorskip("torchdiffeq")
    from torchdiffeq._impl import bosh3, dopri5, dopri8, fehlberg2, adaptive_heun
    for mod_tab, mid, name in [(dopri5._DORMAND_PRINCE_SHAMPINE_TABLEAU, dopri5.DPS_C_MID, "dopri5"),
                               (dopri8._DOPRI8_TABLEAU, dopri8._C_mid, "dopri8"),
                               (bosh3._BOGACKI_SHAMPINE_TABLEAU, bosh3._BS_C_MID, "bosh3"),
                               (fehlberg2._FEHLBERG2_TABLEAU, fehlberg2._FE_C_MID, "fehlberg2"),
                               (adaptive_heun._ADAPTIVE_HEUN_TABLEAU, adaptive_heun._AH_C_MID, "adaptive_heun")]:
        tab = T.TABLEAUS[name]
        assert list(tab.c[1:]) == mod_tab.alpha.tolist()
        for row, beta in zip(tab.a[1:], mod_tab.beta):
            assert list(row) == beta.tolist()
        assert list(tab.b) == mod_tab.c_sol.tolist()
        assert list(tab.b_err) == mod_tab.c_error.tolist()
        assert list(tab.c_mid) == mid.tolist()


def test_dopri5_uses_shampine_error_weights():
    tab = T.TABLEAUS["dopri5"]
    b_hat = [b - e for b, e in zip(tab.b, tab.b_err)]
    assert b_hat[-1] == pytest.approx(1 / 60) and b_hat[0] == pytest.approx(1951 / 21600)


def test_tsit5_is_fifth_order_and_propagates_the_fifth_order_solution():
    tab = T.TABLEAUS["tsit5"]
    assert tab.fsal and tab.a[-1] == tab.b[:-1]
    assert _order_of(tab, tab.b) == 5


def test_validate_rejects_bad_tableaus():
    good = T.TABLEAUS["rk4"]
    bad_rows = T.ButcherTableau(**{**good.__dict__, "a": ((), (0.3,), (-1 / 3, 1), (1, -1, 1))})
    with pytest.raises(ValueError, match="row 1"):
        T.validate(bad_rows)
    bad_b = T.ButcherTableau(**{**good.__dict__, "b": (0.2, 0.3, 0.3, 0.1)})
    with pytest.raises(ValueError, match="sum\\(b\\)"):
        T.validate(bad_b)
    d5 = T.TABLEAUS["dopri5"]
    bad_err = T.ButcherTableau(**{**d5.__dict__, "b_err": (1.0,) + d5.b_err[1:]})
    with pytest.raises(ValueError, match="b_err"):
        T.validate(bad_err)
    bad_dense = T.ButcherTableau(**{**d5.__dict__, "dense": ((0.5, 0, 0, 0),) + d5.dense[1:]})
    with pytest.raises(ValueError, match="dense"):
        T.validate(bad_dense)
    with pytest.raises(ValueError, match="no tableau"):
        T.get_tableau("rk45")
