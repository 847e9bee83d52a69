"""scikit-learn density sets (digits, breast cancer): split sizes, protocol, and the preprocessing
log-determinant against autograd Jacobians and finite differences."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer as sk_bc
from sklearn.datasets import load_digits as sk_digits

from fastode.data import Compose, LogOffset, Logit, Standardize, load_dataset, load_digits


def _autograd_logdet(transform, x):
    """log|det dz/dx| per sample from the full autograd Jacobian (float64)."""
    out = []
    for row in torch.as_tensor(x, dtype=torch.float64):
        jac = torch.autograd.functional.jacobian(lambda r: transform.forward(r[None])[0][0], row)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def _fd_logdet(transform, x, h=1e-6):
    """The same from central finite differences of the forward map."""
    x = np.asarray(x, dtype=np.float64)
    out = []
    for row in x:
        d = row.size
        jac = np.empty((d, d))
        for j in range(d):
            e = np.zeros(d)
            e[j] = h
            zp = transform.forward(torch.as_tensor((row + e)[None]))[0][0].numpy()
            zm = transform.forward(torch.as_tensor((row - e)[None]))[0][0].numpy()
            jac[:, j] = (zp - zm) / (2 * h)
        out.append(np.linalg.slogdet(jac)[1])
    return np.array(out)


def _rows_as_set(a):
    return sorted(map(tuple, np.asarray(a).round(6)))


@pytest.mark.parametrize("transform", ["standardize", "logit"])
def test_digits_split_and_protocol(transform):
    d = load_digits(transform=transform)
    assert d.sizes() == {"trn": 1457, "val": 161, "tst": 179}
    assert d.n_dims == 61 and d.bits_per_dim and d.headline_space == "data"
    assert [i for i in range(64) if i not in d.info["pixels_kept"]] == [0, 32, 39]
    assert d.trn.dtype == np.float32
    # mapping back gives dequantised levels: floor = the original images (a permutation of their rows),
    # noise in [0, 1)
    x = np.vstack([d.transform.inverse(torch.as_tensor(s, dtype=torch.float64)).numpy()
                   for s in (d.trn, d.val, d.tst)])
    levels = np.floor(x + 1e-6)
    frac = x - levels
    assert np.all(frac > -1e-4) and np.all(frac < 1 + 1e-4)
    raw = sk_digits().data[:, d.info["pixels_kept"]]
    assert _rows_as_set(levels) == _rows_as_set(raw)
    # rows are shuffled (not the sklearn order)
    assert not np.array_equal(levels[:50], raw[:50])
    if transform == "standardize":
        tv = np.vstack([d.trn, d.val]).astype(np.float64)
        np.testing.assert_allclose(tv.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(tv.std(0), 1, atol=1e-5)


def test_digits_is_deterministic_and_seeded():
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    np.testing.assert_array_equal(a.tst, b.tst)
    assert not np.array_equal(a.tst, c.tst)


def test_breast_cancer_split_and_protocol():
    d = load_dataset("breast_cancer")
    assert d.sizes() == {"trn": 462, "val": 51, "tst": 56}
    assert d.n_dims == 30 and not d.bits_per_dim
    x = np.vstack([d.transform.inverse(torch.as_tensor(s, dtype=torch.float64)).numpy()
                   for s in (d.trn, d.val, d.tst)])
    raw = sk_bc().data
    np.testing.assert_allclose(np.sort(x, axis=0), np.sort(raw, axis=0), rtol=1e-5, atol=1e-5)
    tv = np.vstack([d.trn, d.val]).astype(np.float64)
    np.testing.assert_allclose(tv.std(0), 1, atol=1e-5)


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_stored_logdet_matches_autograd_jacobian(name):
    d = load_dataset(name)
    x = d.transform.inverse(torch.as_tensor(d.tst[:4], dtype=torch.float64))
    want = _autograd_logdet(d.transform, x)
    np.testing.assert_allclose(d.logdet["tst"][:4], want.numpy(), rtol=1e-6, atol=1e-5)


def test_digits_logit_logdet_matches_autograd():
    d = load_digits(transform="logit")
    x = d.transform.inverse(torch.as_tensor(d.val[:3], dtype=torch.float64))
    np.testing.assert_allclose(d.logdet["val"][:3], _autograd_logdet(d.transform, x).numpy(), rtol=1e-6, atol=1e-5)


def _transforms():
    rng = np.random.RandomState(0)
    d = 4
    mu, s, c = rng.randn(d), rng.rand(d) + 0.5, rng.rand(d) + 0.1
    return {
        "standardize": (Standardize(mu, s), rng.randn(3, d)),
        "log": (LogOffset(c), rng.rand(3, d) * 5),
        "logit": (Logit(scale=17.0, alpha=0.05), rng.rand(3, d) * 17),
        "compose": (Compose([LogOffset(c), Standardize(mu, s)]), rng.rand(3, d) * 5),
    }


@pytest.mark.parametrize("key", ["standardize", "log", "logit", "compose"])
def test_transform_logdet_autograd_finite_differences_and_inverse(key):
    tf, x = _transforms()[key]
    z, logdet = tf.forward(torch.as_tensor(x))
    np.testing.assert_allclose(logdet.numpy(), _autograd_logdet(tf, x).numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(logdet.numpy(), _fd_logdet(tf, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tf.inverse(z).numpy(), x, rtol=1e-10, atol=1e-10)


def test_change_of_variables_gives_a_normalised_density():
    """A standard normal in model space, mapped back through Logit, integrates to one over the data box."""
    tf = Logit(scale=17.0, alpha=0.05)
    grid = (np.arange(20000) + 0.5) / 20000 * 17.0
    z, logdet = tf.forward(torch.as_tensor(grid[:, None]))
    log_px = -0.5 * z[:, 0] ** 2 - 0.5 * np.log(2 * np.pi) + logdet
    integral = float(torch.exp(log_px).sum()) * 17.0 / 20000
    # mass of N(0,1) inside the image of [0, 17] under the logit: |z| <= logit(0.95)
    from scipy.stats import norm
    zmax = np.log(0.95 / 0.05)
    assert abs(integral - (norm.cdf(zmax) - norm.cdf(-zmax))) < 1e-4


def test_bad_options():
    with pytest.raises(ValueError, match="standardize"):
        load_digits(transform="whiten")
    with pytest.raises(ValueError, match="tabular"):
        load_dataset("8gaussians")
    with pytest.raises(ValueError, match="constant"):
        Standardize([0.0], [0.0])
