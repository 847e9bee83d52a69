"""``fastode.plots`` is :mod:`fastode.apps.plots` (the applications live in :mod:`fastode.apps`), the same module
object: its names, and anything patched on it, are the same."""
import sys

from .apps import plots as _app

sys.modules[__name__] = _app
