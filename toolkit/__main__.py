"""``python -m toolkit ...``: the same as the ``toolkit`` command and ``python run.py`` (toolkit/cli.py)."""

from toolkit.cli import entry

entry()
