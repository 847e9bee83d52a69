"""Tabular density-estimation data: two sets that ship with scikit-learn (offline) and the MAF benchmark
loaders (MINIBOONE, POWER, GAS, HEPMASS, BSDS300) reading the published files from a local directory.

All loaders return a :class:`TabularData` whose ``trn``/``val``/``tst`` arrays are in *model space* (what the
flow sees). Where the preprocessing is a bijection with a known Jacobian it is kept as ``transform`` and the
per-sample ``log|det dz/dx|`` of every split is stored, so that NLLs can be stated in the data space:
``NLL_data = NLL_model - logdet``.

Split protocol (MAF, Papamakarios et al. 2017, ``datasets/*.py``): test = the last ``int(0.1 N)`` rows,
validation = the last ``int(0.1 N')`` rows of the remaining ``N'``, training = the rest; statistics for
standardisation from train + validation. The MAF loaders are line-by-line ports of MAF's preprocessing (which
FFJORD copied), including its quirks (noted where they occur).

scikit-learn sets (this module's own protocol, documented in each loader):

* ``digits`` (1797 8x8 images, integer levels 0..16): drop the 3 pixels that are 0 in every image (D = 61),
  shuffle rows with ``RandomState(seed)``, dequantise once with ``+ U(0, 1)`` from the same generator, MAF
  split, then standardise (default) or logit. The data-space NLL is in nats over the dequantised levels
  (unit-width bins): an upper bound on the discrete NLL of the integer images' 61 pixels; bits/dim = NLL /
  (61 ln 2).
* ``breast_cancer`` (569 x 30, positive and heavy-tailed): shuffle with ``RandomState(seed)``, MAF split,
  ``log(x + c)`` with ``c_j`` = half the smallest positive value of column j in train + val, then
  standardise. The data-space NLL is in the raw feature units.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .preprocess import Compose, LogOffset, Logit, Standardize, Transform

__all__ = [
    "TabularData",
    "maf_split",
    "dequantize",
    "load_digits",
    "load_breast_cancer",
    "load_miniboone",
    "load_power",
    "load_gas",
    "load_hepmass",
    "load_bsds300",
    "gas_clean",
    "hepmass_preprocess",
    "MAF_FILES",
    "default_data_root",
]

#: Files each MAF loader reads, relative to the data root (the layout of MAF's ``data.tar.gz``).
MAF_FILES = {
    "miniboone": ("miniboone/data.npy",),
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
_MAF_SOURCE = ("the preprocessed MAF data (Papamakarios et al. 2017; https://zenodo.org/record/1161203, "
               "data.tar.gz), unpacked so that the root holds miniboone/, power/, gas/, hepmass/, BSDS300/")


@dataclass
class TabularData:
    """Train / validation / test arrays of one density-estimation dataset.

    ``trn``, ``val``, ``tst``: float32 ``(N, D)`` arrays in model space.
    ``logdet``: split name -> float64 ``(N,)`` array of ``log|det dz/dx|`` of ``transform`` (None when
    the loader keeps no data-space map).
    ``nll_space``: what the data-space NLL means (or, without a transform, which space NLLs are in).
    ``bits_per_dim``: report bits/dim (image data).
    ``headline_space``: ``"data"`` or ``"model"``, the space of the headline test NLL (``"model"`` for the
    MAF sets, whose published numbers are in MAF's normalised space).
    """

    name: str
    trn: np.ndarray
    val: np.ndarray
    tst: np.ndarray
    transform: Transform | None = None
    logdet: dict | None = None
    nll_space: str = "model space"
    bits_per_dim: bool = False
    info: dict = field(default_factory=dict)
    headline_space: str = "data"

    @property
    def n_dims(self) -> int:
        return int(self.trn.shape[1])

    def sizes(self) -> dict:
        return {"trn": len(self.trn), "val": len(self.val), "tst": len(self.tst)}

    def mean_logdet(self, split: str) -> float:
        """Mean ``log|det dz/dx|`` over ``split`` (0 when there is no data-space map)."""
        if self.logdet is None:
            return 0.0
        key = {"train": "trn", "validation": "val", "test": "tst"}.get(split, split)
        return float(np.mean(self.logdet[key]))


def maf_split(data: np.ndarray):
    """MAF's split: test = last ``int(0.1 N)`` rows; validation = last ``int(0.1 N')`` of the remaining N'."""
    n_test = int(0.1 * data.shape[0])
    tst = data[-n_test:]
    rest = data[0:-n_test]
    n_val = int(0.1 * rest.shape[0])
    val = rest[-n_val:]
    trn = rest[0:-n_val]
    return trn, val, tst


def dequantize(levels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Uniform dequantisation ``x = k + u``, ``u ~ U(0, 1)`` (one ``rng.rand`` call of the array's shape).

    A continuous density p on the dequantised data bounds the discrete model from below:
    ``log P(k) = log int_[0,1)^D p(k + u) du >= E_u log p(k + u)``, so the continuous NLL in these units is an
    upper bound on the discrete NLL.
    """
    return levels + rng.rand(*levels.shape)


def _finish(name, trn, val, tst, transform, nll_space, bits_per_dim=False, info=None,
            headline_space="data") -> TabularData:
    """Apply ``transform`` (if any) to the three data-space splits and package them."""
    if transform is None:
        return TabularData(name, trn.astype(np.float32), val.astype(np.float32), tst.astype(np.float32),
                           None, None, nll_space, bits_per_dim, info or {}, headline_space)
    out, logdet = {}, {}
    for key, x in (("trn", trn), ("val", val), ("tst", tst)):
        z, ld = transform.forward(x)
        out[key] = z.numpy().astype(np.float32)
        logdet[key] = ld.numpy().astype(np.float64)
    return TabularData(name, out["trn"], out["val"], out["tst"], transform, logdet, nll_space, bits_per_dim,
                       info or {}, headline_space)


def _train_val_standardize(trn, val, ddof=0) -> Standardize:
    tv = np.vstack((trn, val))
    return Standardize(tv.mean(axis=0), tv.std(axis=0, ddof=ddof))


# ---------------------------------------------------------------------------------------------------------
# scikit-learn sets (ship with scikit-learn: no download)
# ---------------------------------------------------------------------------------------------------------

def load_digits(seed: int = 42, transform: str = "standardize", alpha: float = 1e-6) -> TabularData:
    """scikit-learn's 8x8 digits as a 61-D density-estimation set (a small BSDS300 analogue).

    Protocol: keep the 61 pixels that are not 0 in every one of the 1797 images (pixels 0, 32 and 39 are
    dropped; a property of the fixed public dataset, not of the split); ``rng = RandomState(seed)``;
    ``rng.shuffle`` the rows; dequantise with ``+ rng.rand`` (drawn once, so validation and test are
    fixed); MAF split (1457 / 161 / 179); then

    * ``transform="standardize"``: z-score with train + validation mean and std;
    * ``transform="logit"``: ``Logit(scale=17, alpha)`` (levels + noise lie in [0, 17)).

    NLLs in the data space are in nats over the dequantised levels (unit-width bins); ``bits_per_dim`` is
    set, with D = 61.
    """
    from sklearn.datasets import load_digits as _sk_digits

    raw = _sk_digits().data.astype(np.float64)
    keep = np.flatnonzero(raw.max(axis=0) > raw.min(axis=0))
    x = raw[:, keep]
    rng = np.random.RandomState(seed)
    rng.shuffle(x)
    x = dequantize(x, rng)
    trn, val, tst = maf_split(x)
    if transform == "standardize":
        tf = _train_val_standardize(trn, val)
    elif transform == "logit":
        tf = Logit(scale=17.0, alpha=alpha)
    else:
        raise ValueError(f"digits transform must be 'standardize' or 'logit', got {transform!r}")
    space = (f"nats over dequantised digit levels (unit-width bins; upper bound on the discrete NLL of the "
             f"{len(keep)} non-constant pixels); bits/dim = nats / ({len(keep)} ln 2)")
    return _finish("digits", trn, val, tst, tf, space, bits_per_dim=True,
                   info={"seed": seed, "transform": transform, "pixels_kept": keep.tolist(), "image_shape": [8, 8]})


def load_breast_cancer(seed: int = 42) -> TabularData:
    """scikit-learn's breast-cancer features as a 30-D density-estimation set (a small MINIBOONE analogue).

    Protocol: ``RandomState(seed).shuffle`` the 569 rows; MAF split (462 / 51 / 56); ``z = (log(x + c) -
    mu) / s`` with ``c_j`` = half the smallest positive value of column j in train + validation (6 columns
    contain exact zeros) and mu, s the train + validation mean and std of ``log(x + c)``. NLLs in the data
    space are in nats in the raw feature units.
    """
    from sklearn.datasets import load_breast_cancer as _sk_bc

    x = _sk_bc().data.astype(np.float64)
    rng = np.random.RandomState(seed)
    rng.shuffle(x)
    trn, val, tst = maf_split(x)
    tv = np.vstack((trn, val))
    c = 0.5 * np.array([col[col > 0].min() for col in tv.T])
    log_tf = LogOffset(c)
    ltv = np.log(tv + c)
    tf = Compose([log_tf, Standardize(ltv.mean(axis=0), ltv.std(axis=0))])
    return _finish("breast_cancer", trn, val, tst, tf, "nats in the raw breast-cancer feature units",
                   info={"seed": seed})


# ---------------------------------------------------------------------------------------------------------
# MAF benchmark sets from local files
# ---------------------------------------------------------------------------------------------------------

def default_data_root() -> str:
    """``$FASTODE_DATA_ROOT``, else ``./data``."""
    return os.environ.get("FASTODE_DATA_ROOT", os.path.join(os.getcwd(), "data"))


def _path(root, name, i=0) -> str:
    root = default_data_root() if root is None else os.fspath(root)
    path = os.path.join(root, MAF_FILES[name][i])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: expected {path!r}. Set root= (or --data-root, or $FASTODE_DATA_ROOT) "
                                f"to the directory holding {_MAF_SOURCE}.")
    return path


def _require(module: str, dataset: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{dataset}: reading {what} needs the Python package '{module}', which is not "
                          f"installed; install it with `pip install {module}`.") from None


_MAF_SPACE = "MAF-normalised space (the convention of MAF/FFJORD tables)"


def load_miniboone(root=None) -> TabularData:
    """MINIBOONE from ``miniboone/data.npy`` (MAF's outlier-cleaned 43 columns): MAF split without shuffling,
    z-score with train + validation statistics (numpy ``std``, ddof 0)."""
    data = np.load(_path(root, "miniboone"))
    trn, val, tst = maf_split(data)
    tf = _train_val_standardize(trn, val)
    return _finish("miniboone", trn, val, tst, tf, _MAF_SPACE + "; data space: MAF's 43 columns",
                   headline_space="model")


def load_power(root=None) -> TabularData:
    """POWER from ``power/data.npy``: ``rng = RandomState(42)``; shuffle; drop columns 3 and 1; add MAF's
    jitter (drawn in MAF's order: voltage ``0.01 U``, gap ``0.001 U``, sub-metering ``U`` x3; time 0;
    stacked as gap, voltage, sub-metering, time); MAF split; z-score with train + validation statistics."""
    data = np.load(_path(root, "power")).astype(np.float64)
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    time_noise = np.zeros((n, 1))
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, time_noise))
    trn, val, tst = maf_split(data)
    tf = _train_val_standardize(trn, val)
    return _finish("power", trn, val, tst, tf, _MAF_SPACE + "; data space: the 6 jittered MAF columns",
                   headline_space="model")


def gas_clean(values: np.ndarray, columns) -> tuple[np.ndarray, list]:
    """MAF's GAS cleaning on a plain array: drop ``Meth``, ``Eth``, ``Time``; then, while some column has a
    correlation > 0.98 with another, drop the first such column; finally z-score with the sample std
    (ddof 1, pandas' default). Returns ``(data, kept column names)``."""
    columns = list(columns)
    values = np.asarray(values, dtype=np.float64)
    for name in ("Meth", "Eth", "Time"):
        if name not in columns:
            raise ValueError(f"gas: column {name!r} missing; columns are {columns}")
        i = columns.index(name)
        values = np.delete(values, i, axis=1)
        del columns[i]

    def counts(v):
        return (np.corrcoef(v, rowvar=False) > 0.98).sum(axis=1)

    b = counts(values)
    while np.any(b > 1):
        i = int(np.where(b > 1)[0][0])
        values = np.delete(values, i, axis=1)
        del columns[i]
        b = counts(values)
    values = (values - values.mean(axis=0)) / values.std(axis=0, ddof=1)
    return values, columns


def load_gas(root=None) -> TabularData:
    """GAS from ``gas/ethylene_CO.pickle`` (a pickled pandas DataFrame, so reading it needs pandas):
    :func:`gas_clean`, then MAF split (no shuffle). MAF standardises *before* splitting, over all rows."""
    path = _path(root, "gas")
    pd = _require("pandas", "gas", "ethylene_CO.pickle (a pickled pandas DataFrame)")
    frame = pd.read_pickle(path)
    values, cols = gas_clean(frame.to_numpy(dtype=np.float64), list(frame.columns))
    trn, val, tst = maf_split(values)
    return _finish("gas", trn, val, tst, None, _MAF_SPACE, info={"columns": [str(c) for c in cols]},
                   headline_space="model")


def _read_csv(path) -> tuple[list, np.ndarray]:
    """A numeric CSV with one header row, like ``pandas.read_csv(path, index_col=False)``: header names
    (an empty name becomes ``'Unnamed: i'``) and a float64 array (empty fields are NaN)."""
    with open(path) as fh:
        header = fh.readline().rstrip("\r\n").split(",")
    names = [h.strip() or f"Unnamed: {i}" for i, h in enumerate(header)]
    values = np.genfromtxt(path, delimiter=",", skip_header=1, dtype=np.float64, ndmin=2)
    if values.shape[1] != len(names):
        raise ValueError(f"{path}: header has {len(names)} fields but rows have {values.shape[1]}")
    return names, values


def hepmass_preprocess(train_names, train, test_names, test):
    """MAF's HEPMASS preprocessing on arrays read from the two CSV files.

    Keep rows whose first column (the label) is 1 and drop that column; drop the last column of the test
    file (MAF: "because the data set is messed up!"); align test columns to train columns by name (as
    pandas does); z-score both with the *training* mean and sample std (ddof 1); drop every feature whose
    smallest value occurs more than 5 times in the training set (MAF's ``Counter`` check, which looks at
    the count of the smallest value, not the largest count); validation = the last ``int(0.1 N)`` training
    rows. Returns ``(trn, val, tst, kept feature names)``.
    """
    train_names, test_names = list(train_names), list(test_names)
    trn = train[train[:, 0] == 1][:, 1:]
    tst = test[test[:, 0] == 1][:, 1:-1]
    trn_names, tst_names = train_names[1:], test_names[1:-1]
    if sorted(trn_names) != sorted(tst_names):
        raise ValueError(f"hepmass: after MAF's column drops the test columns {tst_names} do not match the "
                         f"training columns {trn_names}")
    tst = tst[:, [tst_names.index(n) for n in trn_names]]
    mu = trn.mean(axis=0)
    s = trn.std(axis=0, ddof=1)
    trn = (trn - mu) / s
    tst = (tst - mu) / s
    remove = []
    for i, feature in enumerate(trn.T):
        c = Counter(feature)
        smallest_value_count = np.array([v for _, v in sorted(c.items())])[0]
        if smallest_value_count > 5:
            remove.append(i)
    keep = [i for i in range(trn.shape[1]) if i not in remove]
    trn, tst = trn[:, keep], tst[:, keep]
    n_val = int(trn.shape[0] * 0.1)
    val = trn[-n_val:]
    trn = trn[0:-n_val]
    return trn, val, tst, [trn_names[i] for i in keep]


def load_hepmass(root=None) -> TabularData:
    """HEPMASS from ``hepmass/1000_train.csv`` and ``hepmass/1000_test.csv`` (read with numpy; pandas is
    not needed): :func:`hepmass_preprocess`."""
    tr_names, tr = _read_csv(_path(root, "hepmass", 0))
    te_names, te = _read_csv(_path(root, "hepmass", 1))
    trn, val, tst, names = hepmass_preprocess(tr_names, tr, te_names, te)
    return _finish("hepmass", trn, val, tst, None, _MAF_SPACE, info={"columns": names}, headline_space="model")


def load_bsds300(root=None) -> TabularData:
    """BSDS300 patches from ``BSDS300/BSDS300.hdf5`` (datasets ``train``, ``validation``, ``test``, used as
    given; reading HDF5 needs h5py)."""
    path = _path(root, "bsds300")
    h5py = _require("h5py", "bsds300", "BSDS300.hdf5")
    with h5py.File(path, "r") as f:
        trn, val, tst = (np.asarray(f[k][:]) for k in ("train", "validation", "test"))
    return _finish("bsds300", trn, val, tst, None, "the patch space of MAF's BSDS300 file (as MAF/FFJORD report)",
                   headline_space="model")


TABULAR_LOADERS: dict[str, Callable[..., TabularData]] = {
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
    "miniboone": load_miniboone,
    "power": load_power,
    "gas": load_gas,
    "hepmass": load_hepmass,
    "bsds300": load_bsds300,
}
