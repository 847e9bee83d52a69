"""FFJORD's 2-D toy densities, reproduced exactly (``lib/toy_data.py::inf_train_gen``).

Same formulas, same constants, same random-number usage: the generators that FFJORD drives with the
``rng`` argument (8gaussians, pinwheel, rings, line, cos) draw from ``rng`` in the same order, and the ones
that FFJORD drives with NumPy's *global* generator (swissroll, circles, moons through scikit-learn with
``random_state=None``; 2spirals and checkerboard through ``np.random``) draw from the global generator.
Output dtypes are FFJORD's too (float32 for swissroll/circles/rings/8gaussians, float64 for the others:
moons becomes float64 when FFJORD adds a float64 offset).

The one deliberate difference: FFJORD silently falls back to 8gaussians for an unknown name; here that is a
``ValueError`` listing the names.

:class:`ToySampler` makes a seeded, self-contained stream: it owns a ``RandomState`` for ``rng`` *and* its
own copy of the global generator's state, which it swaps in around each call, so a run is reproducible
without disturbing (or being disturbed by) other users of ``np.random``. With seed ``s`` it yields exactly
what FFJORD yields after ``np.random.seed(s); rng = np.random.RandomState(s)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["TOY_DATASETS", "EXTRA_TOY_DATASETS", "inf_train_gen", "ToySampler", "toy_sample"]

#: The datasets FFJORD's ``train_toy.py`` offers on its command line.
TOY_DATASETS = ("swissroll", "8gaussians", "pinwheel", "circles", "moons", "2spirals", "checkerboard", "rings")
#: Also in ``inf_train_gen`` but not offered by FFJORD's command line.
EXTRA_TOY_DATASETS = ("line", "cos")


def _swissroll(rng, n):
    import sklearn.datasets
    x = sklearn.datasets.make_swiss_roll(n_samples=n, noise=1.0)[0]
    x = x.astype("float32")[:, [0, 2]]
    x /= 5
    return x


def _circles(rng, n):
    import sklearn.datasets
    x = sklearn.datasets.make_circles(n_samples=n, factor=.5, noise=0.08)[0]
    x = x.astype("float32")
    x *= 3
    return x


def _rings(rng, n):
    from sklearn.utils import shuffle
    n4 = n3 = n2 = n // 4
    n1 = n - n4 - n3 - n2
    # endpoint=False so that the first point of a circle is not also its last
    lin4 = np.linspace(0, 2 * np.pi, n4, endpoint=False)
    lin3 = np.linspace(0, 2 * np.pi, n3, endpoint=False)
    lin2 = np.linspace(0, 2 * np.pi, n2, endpoint=False)
    lin1 = np.linspace(0, 2 * np.pi, n1, endpoint=False)
    # FFJORD takes the radius-0.75 x coordinates from the n4 grid (equal to the n3 grid, since n3 == n4)
    xs = np.hstack([np.cos(lin4), np.cos(lin4) * 0.75, np.cos(lin2) * 0.5, np.cos(lin1) * 0.25])
    ys = np.hstack([np.sin(lin4), np.sin(lin3) * 0.75, np.sin(lin2) * 0.5, np.sin(lin1) * 0.25])
    x = np.vstack([xs, ys]).T * 3.0
    x = shuffle(x, random_state=rng)
    x = x + rng.normal(scale=0.08, size=x.shape)
    return x.astype("float32")


def _moons(rng, n):
    import sklearn.datasets
    x = sklearn.datasets.make_moons(n_samples=n, noise=0.1)[0]
    x = x.astype("float32")
    return x * 2 + np.array([-1, -0.2])


_R = 1.0 / np.sqrt(2)
# (order matters: the index drawn by rng.randint(8) selects from this list)
_EIGHT_CENTERS = [(1, 0), (-1, 0), (0, 1), (0, -1), (_R, _R), (_R, -_R), (-_R, _R), (-_R, -_R)]


def _eight_gaussians(rng, n):
    scale = 4.0
    centers = [(scale * a, scale * b) for a, b in _EIGHT_CENTERS]
    points = []
    for _ in range(n):  # per point: two normals, then the centre index (FFJORD's draw order)
        p = rng.randn(2) * 0.5
        cx, cy = centers[rng.randint(8)]
        p[0] += cx
        p[1] += cy
        points.append(p)
    x = np.array(points, dtype="float32").reshape(n, 2)
    x /= 1.414
    return x


def _pinwheel(rng, n):
    radial_std, tangential_std = 0.3, 0.1
    num_classes = 5
    per_class = n // 5
    rate = 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    feats = rng.randn(num_classes * per_class, 2) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    labels = np.repeat(np.arange(num_classes), per_class)
    ang = rads[labels] + rate * np.exp(feats[:, 0])
    rot = np.reshape(np.stack([np.cos(ang), -np.sin(ang), np.sin(ang), np.cos(ang)]).T, (-1, 2, 2))
    return 2 * rng.permutation(np.einsum("ti,tij->tj", feats, rot))


def _two_spirals(rng, n):
    m = n // 2
    t = np.sqrt(np.random.rand(m, 1)) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(t) * t + np.random.rand(m, 1) * 0.5
    d1y = np.sin(t) * t + np.random.rand(m, 1) * 0.5
    x = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y)))) / 3
    x += np.random.randn(*x.shape) * 0.1
    return x


def _checkerboard(rng, n):
    x1 = np.random.rand(n) * 4 - 2
    x2_ = np.random.rand(n) - np.random.randint(0, 2, n) * 2
    x2 = x2_ + (np.floor(x1) % 2)
    return np.concatenate([x1[:, None], x2[:, None]], 1) * 2


def _line(rng, n):
    x = rng.rand(n) * 5 - 2.5
    return np.stack((x, x), 1)


def _cos(rng, n):
    x = rng.rand(n) * 5 - 2.5
    return np.stack((x, np.sin(x) * 2.5), 1)


_GENERATORS = {
    "swissroll": _swissroll,
    "circles": _circles,
    "rings": _rings,
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "line": _line,
    "cos": _cos,
}


def inf_train_gen(data: str, rng: np.random.RandomState | None = None, batch_size: int = 200) -> np.ndarray:
    """One batch of the toy density ``data`` (FFJORD's ``inf_train_gen``, same signature and draws).

    pinwheel returns ``5 * (batch_size // 5)`` points and 2spirals ``2 * (batch_size // 2)``, as in FFJORD.
    """
    try:
        gen = _GENERATORS[data]
    except (KeyError, TypeError):
        raise ValueError(f"unknown toy dataset {data!r}; choose one of {TOY_DATASETS + EXTRA_TOY_DATASETS}") from None
    if rng is None:
        rng = np.random.RandomState()
    return gen(rng, int(batch_size))


class ToySampler:
    """Seeded stream of toy batches, exactly FFJORD's ``inf_train_gen`` after seeding both of its generators.

    ``ToySampler(name, seed)(n)`` returns the next batch as float32. The global NumPy generator is only
    borrowed during the call (its previous state is restored afterwards).
    """

    def __init__(self, name: str, seed: int = 0):
        if name not in _GENERATORS:
            inf_train_gen(name)  # raises the ValueError with the list of names
        self.name = name
        self.seed = int(seed)
        self.rng = np.random.RandomState(self.seed)
        saved = np.random.get_state()
        try:
            np.random.seed(self.seed)
            self._global_state = np.random.get_state()
        finally:
            np.random.set_state(saved)

    def __call__(self, n: int) -> np.ndarray:
        saved = np.random.get_state()
        try:
            np.random.set_state(self._global_state)
            x = inf_train_gen(self.name, self.rng, n)
            self._global_state = np.random.get_state()
        finally:
            np.random.set_state(saved)
        return np.asarray(x, dtype=np.float32)

    def state_dict(self) -> dict:
        """Both generator states, for checkpoints (restore with :meth:`load_state_dict`)."""
        return {"name": self.name, "seed": self.seed, "rng": self.rng.get_state(), "global": self._global_state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self._global_state = state["global"]


def toy_sample(name: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points of ``name`` from a fresh :class:`ToySampler` with ``seed`` (a fixed evaluation set)."""
    return ToySampler(name, seed)(n)
