"""FFJORD toy generators: exact agreement with an independent re-statement of FFJORD's formulas (same seeds,
same generators), plus statistical sanity checks of the shapes of the densities."""
import numpy as np
import pytest
import sklearn.datasets
from sklearn.utils import shuffle as sk_shuffle

from fastode.data import TOY_DATASETS, ToySampler, inf_train_gen, toy_sample

S = 1 / np.sqrt(2)


# ----- independent re-statement of FFJORD's lib/toy_data.py (rng = the RandomState argument, G = the global
# NumPy generator that FFJORD uses for sklearn's random_state=None and for np.random.*) -----

def ref_8gaussians(rng, G, n):
    centres = 4.0 * np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [S, S], [S, -S], [-S, S], [-S, -S]])
    out = np.empty((n, 2))
    for i in range(n):
        noise = rng.randn(2)
        k = rng.randint(8)
        out[i] = 0.5 * noise + centres[k]
    return out.astype(np.float32) / np.float32(1.414)


def ref_pinwheel(rng, G, n):
    m = n // 5
    f = rng.randn(5 * m, 2) * np.array([0.3, 0.1])
    f[:, 0] += 1.0
    angle = np.repeat(2 * np.pi * np.arange(5) / 5, m) + 0.25 * np.exp(f[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    rotated = np.stack([f[:, 0] * c + f[:, 1] * s, -f[:, 0] * s + f[:, 1] * c], axis=1)
    return 2 * rotated[rng.permutation(5 * m)]


def ref_2spirals(rng, G, n):
    m = n // 2
    t = np.sqrt(G.rand(m, 1)) * 3 * np.pi          # 540 degrees
    ux, uy = G.rand(m, 1), G.rand(m, 1)
    arm = np.hstack([-np.cos(t) * t + 0.5 * ux, np.sin(t) * t + 0.5 * uy])
    x = np.vstack([arm, -arm]) / 3
    return x + 0.1 * G.randn(2 * m, 2)


def ref_checkerboard(rng, G, n):
    x1 = 4 * G.rand(n) - 2
    u = G.rand(n)
    k = G.randint(0, 2, n)
    x2 = u - 2 * k + np.mod(np.floor(x1), 2)
    return 2 * np.stack([x1, x2], axis=1)


def ref_rings(rng, G, n):
    counts = [n // 4, n // 4, n // 4, n - 3 * (n // 4)]
    pts = []
    for radius, m in zip([1.0, 0.75, 0.5, 0.25], counts):
        a = 2 * np.pi * np.arange(m) / m
        pts.append(np.stack([np.cos(a), np.sin(a)], 1) * radius)
    x = sk_shuffle(np.vstack(pts) * 3.0, random_state=rng)
    return (x + 0.08 * rng.randn(*x.shape)).astype(np.float32)


def ref_swissroll(rng, G, n):
    # (FFJORD casts to float32 before scaling; the scaling then rounds in float32)
    return sklearn.datasets.make_swiss_roll(n, noise=1.0, random_state=G)[0][:, [0, 2]].astype(np.float32) / 5


def ref_circles(rng, G, n):
    return 3 * sklearn.datasets.make_circles(n, factor=0.5, noise=0.08, random_state=G)[0].astype(np.float32)


def ref_moons(rng, G, n):
    x = sklearn.datasets.make_moons(n, noise=0.1, random_state=G)[0].astype(np.float32)
    return 2 * x + np.array([-1.0, -0.2])


REFS = {"8gaussians": ref_8gaussians, "pinwheel": ref_pinwheel, "2spirals": ref_2spirals,
        "checkerboard": ref_checkerboard, "rings": ref_rings, "swissroll": ref_swissroll,
        "circles": ref_circles, "moons": ref_moons}


def test_all_cli_datasets_have_a_reference():
    assert set(REFS) == set(TOY_DATASETS)


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("n", [7, 100])
def test_matches_restated_formulas(name, n):
    seed = 1234
    # FFJORD's call: the global generator seeded, rng a seeded RandomState
    np.random.seed(seed)
    got = inf_train_gen(name, np.random.RandomState(seed), n)
    got_again = inf_train_gen(name, np.random.RandomState(seed + 1), n)
    # the reference sees two independent generators in the same starting states
    ref_rng, ref_global = np.random.RandomState(seed), np.random.RandomState(seed)
    want = REFS[name](ref_rng, ref_global, n)
    want_again = REFS[name](np.random.RandomState(seed + 1), ref_global, n)
    assert got.dtype == want.dtype, name
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_again, want_again, rtol=1e-12, atol=1e-12)


def test_dtypes_are_ffjords():
    want = {"swissroll": np.float32, "circles": np.float32, "rings": np.float32, "8gaussians": np.float32,
            "moons": np.float64, "pinwheel": np.float64, "2spirals": np.float64, "checkerboard": np.float64}
    for name, dt in want.items():
        assert inf_train_gen(name, np.random.RandomState(0), 10).dtype == dt, name


def test_sizes_follow_ffjord_rounding():
    assert inf_train_gen("pinwheel", np.random.RandomState(0), 103).shape == (100, 2)
    assert inf_train_gen("2spirals", np.random.RandomState(0), 103).shape == (102, 2)
    assert inf_train_gen("rings", np.random.RandomState(0), 103).shape == (103, 2)


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="8gaussians"):
        inf_train_gen("nine_gaussians", np.random.RandomState(0), 10)
    with pytest.raises(ValueError):
        ToySampler("nope")


@pytest.mark.parametrize("name", ["moons", "8gaussians", "checkerboard"])
def test_sampler_is_ffjord_after_seeding_and_leaves_global_state_alone(name):
    np.random.seed(99)
    before = np.random.get_state()[1].copy()
    sampler = ToySampler(name, seed=5)
    a1, a2 = sampler(50), sampler(50)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.random.seed(5)
    rng = np.random.RandomState(5)
    b1, b2 = inf_train_gen(name, rng, 50), inf_train_gen(name, rng, 50)
    np.testing.assert_array_equal(a1, b1.astype(np.float32))
    np.testing.assert_array_equal(a2, b2.astype(np.float32))
    # state_dict round trip continues the same stream
    state = sampler.state_dict()
    c = sampler(20)
    other = ToySampler(name, seed=0)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other(20), c)


# ----- statistical sanity: the densities have the advertised shapes -----

N = 4000


def test_8gaussians_clusters():
    x = toy_sample("8gaussians", N, seed=0).astype(np.float64)
    centres = 4.0 / 1.414 * np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [S, S], [S, -S], [-S, S], [-S, -S]])
    d = np.linalg.norm(x[:, None, :] - centres[None], axis=-1)
    nearest = d.argmin(1)
    counts = np.bincount(nearest, minlength=8) / N
    assert np.all(np.abs(counts - 1 / 8) < 0.03)
    resid = x - centres[nearest]
    assert np.allclose(resid.std(0), 0.5 / 1.414, rtol=0.06)


def test_checkerboard_occupies_black_squares():
    x = toy_sample("checkerboard", N, seed=0) / 2
    assert np.all((x >= -2) & (x < 2))
    assert np.all((np.floor(x[:, 0]) + np.floor(x[:, 1])) % 2 == 0)


def test_circles_and_rings_radii():
    r = np.linalg.norm(toy_sample("circles", N, seed=0), axis=1)
    assert abs(np.mean(r > 2.25) - 0.5) < 0.02
    assert abs(np.median(r[r > 2.25]) - 3.0) < 0.1 and abs(np.median(r[r < 2.25]) - 1.5) < 0.1
    r = np.linalg.norm(toy_sample("rings", N, seed=0), axis=1)
    ring = np.abs(r[:, None] - np.array([3.0, 2.25, 1.5, 0.75])[None]).argmin(1)
    assert np.all(np.abs(np.bincount(ring, minlength=4) / N - 0.25) < 0.02)


def test_pinwheel_spirals_moons_swissroll_ranges():
    p = toy_sample("pinwheel", N, seed=0)
    assert np.allclose(p.mean(0), 0, atol=0.1)
    assert 1.5 < np.median(np.linalg.norm(p, axis=1)) < 3.0
    s = toy_sample("2spirals", N, seed=0)
    assert np.allclose(s.mean(0), 0, atol=0.1) and np.abs(s).max() < 4.0
    m = toy_sample("moons", N, seed=0)
    assert np.allclose(m.mean(0), [0.0, 0.3], atol=0.1) and np.abs(m).max() < 4.0
    w = toy_sample("swissroll", N, seed=0)
    assert np.abs(w).max() < 4.0 and w.std() > 1.0
