"""The ``fastode`` command: ``fastode train ...`` (or ``python -m fastode train ...``) and ``fastode demo``.

* ``train`` -- train a CNF density model (:mod:`fastode.apps.train`; ``fastode train --help``).
* ``demo``  -- the main-job demo: a small CNF on built-in 2-D data trained with fastode and with torchdiffeq
  from the same weights, noise and solver; speed and NLL side by side (:mod:`fastode.apps.demo`).
"""
from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = {
    "train": ("fastode.apps.train", "train a CNF density model"),
    "demo": ("fastode.apps.demo", "train a small CNF with fastode vs torchdiffeq and compare speed"),
}


def _usage() -> str:
    lines = ["usage: fastode <command> [options]", "", "commands:"]
    lines += [f"  {name:<8}{help_}" for name, (_mod, help_) in COMMANDS.items()]
    lines += ["", "`fastode <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no command is a usage mistake (as argparse treats a missing required argument)
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        import fastode

        print(f"fastode {fastode.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastode: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
