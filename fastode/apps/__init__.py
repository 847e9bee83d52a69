"""The command-line applications, one floor above the library: ``fastode train`` (:mod:`fastode.apps.train`, a CNF
density model's training run), ``fastode demo`` (:mod:`fastode.apps.demo`, the main job) and their figures
(:mod:`fastode.apps.plots`). They use the library's public API only; the library never imports them.
``fastode.train``, ``fastode.demo`` and ``fastode.plots`` stay importable (and ``python -m fastode.train`` runnable)
as aliases of these modules.
"""
