"""MAF-format loaders (MINIBOONE, POWER, GAS, HEPMASS, BSDS300) on small generated files of the published
formats, against the MAF preprocessing re-stated here."""
import builtins
import os

import numpy as np
import pytest

from fastode.data import MAF_FILES, gas_clean, load_dataset


def _write(root, name, i=0):
    path = os.path.join(root, MAF_FILES[name][i])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _split(a):
    nt = int(0.1 * len(a))
    rest = a[:-nt]
    nv = int(0.1 * len(rest))
    return rest[:-nv], rest[-nv:], a[-nt:]


def test_miniboone(tmp_path):
    rng = np.random.RandomState(0)
    data = rng.randn(230, 43) * rng.rand(43) * 10 + rng.randn(43)
    np.save(_write(tmp_path, "miniboone"), data)
    d = load_dataset("miniboone", root=tmp_path)
    assert d.sizes() == {"trn": 187, "val": 20, "tst": 23} and d.n_dims == 43
    trn, val, tst = _split(data)  # no shuffle
    tv = np.vstack([trn, val])
    mu, s = tv.mean(0), tv.std(0)
    np.testing.assert_allclose(d.trn, (trn - mu) / s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.tst, (tst - mu) / s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.logdet["tst"], -np.log(s).sum())
    assert d.headline_space == "model"


def test_power(tmp_path):
    rng = np.random.RandomState(1)
    data = rng.rand(300, 8) * np.arange(1, 9)
    np.save(_write(tmp_path, "power"), data)
    d = load_dataset("power", root=tmp_path)
    assert d.n_dims == 6 and d.sizes() == {"trn": 243, "val": 27, "tst": 30}
    # MAF: RandomState(42) shuffles the rows, then draws voltage, gap and sub-metering noise in that order
    r = np.random.RandomState(42)
    perm_data = data.copy()
    r.shuffle(perm_data)
    kept = perm_data[:, [0, 2, 4, 5, 6, 7]]          # columns 1 and 3 dropped
    volt = 0.01 * r.rand(300, 1)
    gap = 0.001 * r.rand(300, 1)
    sm = r.rand(300, 3)
    noisy = kept + np.hstack([gap, volt, sm, np.zeros((300, 1))])
    trn, val, tst = _split(noisy)
    tv = np.vstack([trn, val])
    np.testing.assert_allclose(d.val, (val - tv.mean(0)) / tv.std(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.tst, (tst - tv.mean(0)) / tv.std(0), rtol=1e-5, atol=1e-5)


def _hepmass_csv(path, header, rows):
    with open(path, "w") as fh:
        fh.write(",".join(header) + "\n")
        for row in rows:
            fh.write(",".join(repr(float(v)) for v in row) + "\n")


def test_hepmass(tmp_path):
    rng = np.random.RandomState(2)
    names = ["# label", "f0", "f1", "f2", "f3", "mass"]
    n_tr, n_te = 120, 60
    train = rng.randn(n_tr, 6)
    train[:, 0] = (rng.rand(n_tr) < 0.7).astype(float)         # labels
    train[:, 2] = rng.randint(0, 3, n_tr)                        # discrete: smallest value occurs > 5 times
    train[:, 3] = np.where(rng.rand(n_tr) < 0.5, 7.0, rng.randn(n_tr))  # repeats a large value only: kept
    test = np.hstack([rng.randn(n_te, 6), rng.randn(n_te, 1)])   # one extra trailing column ("messed up")
    test[:, 0] = (rng.rand(n_te) < 0.5).astype(float)
    _hepmass_csv(_write(tmp_path, "hepmass", 0), names, train)
    _hepmass_csv(_write(tmp_path, "hepmass", 1), names + ["extra"], test)
    d = load_dataset("hepmass", root=tmp_path)
    # re-statement: positives only, label dropped, test's last column dropped, train mean / sample std
    tr = train[train[:, 0] == 1][:, 1:]
    te = test[test[:, 0] == 1][:, 1:-1]
    mu, s = tr.mean(0), tr.std(0, ddof=1)
    tr, te = (tr - mu) / s, (te - mu) / s
    keep = [0, 2, 3, 4]                                          # f1 (column index 1) has a repeated minimum
    assert d.info["columns"] == ["f0", "f2", "f3", "mass"]
    n_val = int(0.1 * len(tr))
    np.testing.assert_allclose(d.trn, tr[:-n_val][:, keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.val, tr[-n_val:][:, keep], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.tst, te[:, keep], rtol=1e-5, atol=1e-5)


def test_gas_clean():
    rng = np.random.RandomState(3)
    n = 500
    base = rng.randn(n, 4)
    cols = ["Time", "Meth", "Eth", "s1", "s2", "s3", "s4", "s5"]
    values = np.hstack([rng.rand(n, 3), base, base[:, :1] * 2 + 0.01 * rng.randn(n, 1)])  # s5 ~ s1
    out, kept = gas_clean(values, cols)
    # s1 and s5 correlate > 0.98: MAF drops the first such column (s1)
    assert kept == ["s2", "s3", "s4", "s5"]
    want = values[:, [4, 5, 6, 7]]
    np.testing.assert_allclose(out, (want - want.mean(0)) / want.std(0, ddof=1))


def _block_import(monkeypatch, name):
    real = builtins.__import__

    def fake(mod, *a, **k):
        if mod == name or mod.startswith(name + "."):
            raise ImportError(f"No module named {name!r}")
        return real(mod, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_gas_pickle_needs_pandas(tmp_path, monkeypatch):
    with open(_write(tmp_path, "gas"), "wb") as fh:
        fh.write(b"not read")
    _block_import(monkeypatch, "pandas")
    with pytest.raises(ImportError, match="pandas"):
        load_dataset("gas", root=tmp_path)


def test_gas_pickle_roundtrip(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.RandomState(4)
    frame = pd.DataFrame(rng.randn(200, 6), columns=["Time", "Meth", "Eth", "a", "b", "c"])
    frame.to_pickle(_write(tmp_path, "gas"))
    d = load_dataset("gas", root=tmp_path)
    vals = frame[["a", "b", "c"]].to_numpy()
    vals = (vals - vals.mean(0)) / vals.std(0, ddof=1)
    trn, val, tst = _split(vals)
    np.testing.assert_allclose(d.tst, tst, rtol=1e-5, atol=1e-5)


def test_bsds300_needs_h5py(tmp_path, monkeypatch):
    with open(_write(tmp_path, "bsds300"), "wb") as fh:
        fh.write(b"\x89HDF\r\n\x1a\n")
    _block_import(monkeypatch, "h5py")
    with pytest.raises(ImportError, match="h5py"):
        load_dataset("bsds300", root=tmp_path)


def test_bsds300_roundtrip(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.RandomState(5)
    arrays = {k: rng.randn(n, 63).astype(np.float32) for k, n in (("train", 30), ("validation", 10), ("test", 12))}
    with h5py.File(_write(tmp_path, "bsds300"), "w") as f:
        for k, v in arrays.items():
            f[k] = v
    d = load_dataset("bsds300", root=tmp_path)
    np.testing.assert_array_equal(d.val, arrays["validation"])
    assert d.n_dims == 63


@pytest.mark.parametrize("name", sorted(MAF_FILES))
def test_missing_file_names_the_path(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=MAF_FILES[name][0].split("/")[0]):
        load_dataset(name, root=tmp_path)
