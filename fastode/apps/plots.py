"""PNG figures for density models (matplotlib, imported lazily; drawn on an Agg canvas, so no display and
no change to the user's pyplot backend).

* :func:`plot_density_2d` -- FFJORD's three panels on ``[low, high]^2``: data histogram, model density
  ``exp(log p)`` on a grid, histogram of model samples.
* :func:`plot_trajectory_2d` -- samples (and optionally the vector field) at several times of the flow.
* :func:`plot_image_samples` -- a grid of image samples (e.g. 8x8 digits).
* :func:`plot_curves` -- training loss / validation NLL / NFE against iteration.

The functions take arrays and callables, not models, so they do not depend on the flow classes.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

__all__ = ["plot_density_2d", "plot_trajectory_2d", "plot_image_samples", "plot_curves", "curves_figure", "density_grid",
           "new_figure", "save_figure", "points_panel", "density_panel"]


def new_figure(figsize):
    """A matplotlib ``Figure`` on an Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> str:
    """Save ``fig`` as PNG at ``path`` (creating the directory); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _square(ax, title):
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def points_panel(ax, points, low=-4.0, high=4.0, bins=150, title=""):
    """A 2-D histogram of ``points`` on ``[low, high]^2`` (square, no ticks)."""
    points = np.asarray(points, dtype=np.float64)
    ax.hist2d(points[:, 0], points[:, 1], bins=bins, range=[[low, high], [low, high]], cmap="inferno")
    _square(ax, title)


def density_panel(ax, density, low=-4.0, high=4.0, title=""):
    """A density grid from :func:`density_grid` on ``[low, high]^2`` (square, no ticks)."""
    ax.imshow(density, origin="lower", extent=(low, high, low, high), cmap="inferno")
    _square(ax, title)


def density_grid(log_prob_fn: Callable[[np.ndarray], np.ndarray], npts: int = 200, low: float = -4.0,
                 high: float = 4.0, chunk: int = 10000):
    """``(xs, ys, density)``: ``exp(log_prob_fn(points))`` on an ``npts x npts`` grid (rows = y)."""
    side = np.linspace(low, high, npts)
    xx, yy = np.meshgrid(side, side)
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)
    logp = np.concatenate([np.asarray(log_prob_fn(pts[i:i + chunk]), dtype=np.float64).reshape(-1)
                           for i in range(0, len(pts), chunk)])
    return side, side, np.exp(logp).reshape(npts, npts)


def plot_density_2d(path: str, data: np.ndarray, log_prob_fn: Callable | None = None,
                    samples: np.ndarray | None = None, npts: int = 200, low: float = -4.0, high: float = 4.0,
                    title: str | None = None) -> str:
    """Data / model density / samples panels (the panels whose inputs are None are left out)."""
    panels = [("data", data)]
    if log_prob_fn is not None:
        panels.append(("density", None))
    if samples is not None:
        panels.append(("samples", samples))
    fig = new_figure((4 * len(panels), 4))
    bins = min(npts, 200)
    for i, (kind, arr) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if kind == "density":
            density_panel(ax, density_grid(log_prob_fn, npts, low, high)[2], low, high, "model density")
        else:
            points_panel(ax, arr, low, high, bins, "data" if kind == "data" else "model samples")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_trajectory_2d(path: str, frames: Sequence[tuple], low: float = -4.0, high: float = 4.0,
                       title: str | None = None) -> str:
    """One panel per frame ``(t, points)`` or ``(t, points, velocity_fn)``: a histogram of the points at time
    ``t``; with ``velocity_fn(grid_points) -> velocities`` a 13x13 quiver of the vector field on top (as
    FFJORD's ``viz_toy``)."""
    n = len(frames)
    fig = new_figure((3 * n, 3.2))
    side = np.linspace(low, high, 13)
    gx, gy = np.meshgrid(side, side)
    grid = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float32)
    for i, frame in enumerate(frames):
        t, pts = frame[0], np.asarray(frame[1], dtype=np.float64)
        velocity_fn = frame[2] if len(frame) > 2 else None
        ax = fig.add_subplot(1, n, i + 1)
        points_panel(ax, pts, low, high, 100, f"t = {t:.3g}")
        if velocity_fn is not None:
            v = np.asarray(velocity_fn(grid), dtype=np.float64)
            ax.quiver(grid[:, 0], grid[:, 1], v[:, 0], v[:, 1], color="white", alpha=0.7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_image_samples(path: str, images: np.ndarray, shape: tuple[int, int], ncols: int = 10,
                       title: str | None = None) -> str:
    """A grid of images (each row of ``images`` reshaped to ``shape``)."""
    images = np.asarray(images, dtype=np.float64)
    nrows = int(np.ceil(len(images) / ncols))
    fig = new_figure((ncols * 0.8, nrows * 0.8 + (0.4 if title else 0)))
    for i, img in enumerate(images):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img.reshape(shape), cmap="gray_r")
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_curves(path: str, curves: dict[str, tuple[Sequence[float], Sequence[float]]],
                title: str | None = None) -> str:
    """One panel per named curve ``{name: (iterations, values)}``, saved as PNG at ``path``."""
    return save_figure(curves_figure(curves, title), path)


def curves_figure(curves: dict[str, tuple[Sequence[float], Sequence[float]]], title: str | None = None):
    """The figure of :func:`plot_curves` (panels without points are left out)."""
    items = [(k, v) for k, v in curves.items() if len(v[0])]
    fig = new_figure((4 * max(len(items), 1), 3.3))
    for i, (name, (xs, ys)) in enumerate(items):
        ax = fig.add_subplot(1, len(items), i + 1)
        # markers for short curves: a line through one point draws nothing (e.g. a single validation)
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=4)
        ax.set_xlabel("iteration")
        ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.set_layout_engine("constrained")  # keeps the suptitle clear of the panel titles
    return fig
