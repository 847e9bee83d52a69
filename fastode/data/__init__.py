"""Datasets for density models.

* :mod:`fastode.data.toy` -- FFJORD's eight 2-D toy densities, reproduced exactly (``inf_train_gen``), and a
  seeded :class:`ToySampler`.
* :mod:`fastode.data.tabular` -- scikit-learn's ``digits`` (61-D) and ``breast_cancer`` (30-D) with a
  MAF-style split and preprocessing whose log-determinant is kept (NLL in the data space), and loaders for
  the MAF benchmark files (MINIBOONE, POWER, GAS, HEPMASS, BSDS300) from a local directory.
* :mod:`fastode.data.preprocess` -- the bijective transforms (standardise, log, logit) with exact log-dets.

``load_dataset(name)`` loads any tabular set by name; ``DATASETS`` lists every name the training command
accepts.
"""
from .preprocess import Compose, Logit, LogOffset, Standardize, Transform
from .tabular import (
    MAF_FILES,
    TABULAR_LOADERS,
    TabularData,
    default_data_root,
    dequantize,
    gas_clean,
    hepmass_preprocess,
    load_breast_cancer,
    load_bsds300,
    load_digits,
    load_gas,
    load_hepmass,
    load_miniboone,
    load_power,
    maf_split,
)
from .toy import EXTRA_TOY_DATASETS, TOY_DATASETS, ToySampler, inf_train_gen, toy_sample

#: Every dataset name the training command accepts.
DATASETS = TOY_DATASETS + tuple(TABULAR_LOADERS)


def is_toy(name: str) -> bool:
    return name in TOY_DATASETS or name in EXTRA_TOY_DATASETS


def load_dataset(name: str, root=None, **kwargs) -> TabularData:
    """Load the tabular dataset ``name`` (one of ``TABULAR_LOADERS``); ``root`` is the MAF data directory
    (only the MAF sets read files); other keyword arguments go to the loader."""
    if name not in TABULAR_LOADERS:
        hint = " (a 2-D toy set: use ToySampler / inf_train_gen)" if is_toy(name) else ""
        raise ValueError(f"unknown tabular dataset {name!r}{hint}; choose one of {tuple(TABULAR_LOADERS)}")
    loader = TABULAR_LOADERS[name]
    if name in MAF_FILES:
        return loader(root, **kwargs)
    return loader(**kwargs)


__all__ = [
    "DATASETS", "TOY_DATASETS", "EXTRA_TOY_DATASETS", "MAF_FILES", "TABULAR_LOADERS",
    "TabularData", "ToySampler", "Transform", "Standardize", "LogOffset", "Logit", "Compose",
    "inf_train_gen", "toy_sample", "is_toy", "load_dataset", "default_data_root", "dequantize", "maf_split",
    "gas_clean", "hepmass_preprocess",
    "load_digits", "load_breast_cancer", "load_miniboone", "load_power", "load_gas", "load_hepmass",
    "load_bsds300",
]
