"""``fastode.train`` is :mod:`fastode.apps.train` (the applications live in :mod:`fastode.apps`), the same module
object: its names, and anything patched on it, are the same. ``python -m fastode.train`` runs it."""
import sys

from .apps import train as _app

if __name__ == "__main__":
    sys.exit(_app.main())
sys.modules[__name__] = _app
