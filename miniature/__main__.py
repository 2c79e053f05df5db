"""``python -m miniature <overrides>``: the toolkit's entry with the miniature's configs on Hydra's
search path (``miniature/conf``: the pretrain tasks, their experiments and callbacks)."""

import sys

from miniature import SEARCHPATH
from toolkit.cli import entry

if __name__ == "__main__":
    sys.argv[1:] = [SEARCHPATH, *sys.argv[1:]]
    entry()
