"""Generate the captioned world (deterministic by seed) into data/world/.

    python data/make_world.py                       # every split
    python data/make_world.py style/train style/test
    WORKERS=16 python data/make_world.py            # render in 16 processes (same files)
"""

import os
import sys
from pathlib import Path

from miniature.world import generate_all

if __name__ == "__main__":
    generate_all(Path(__file__).parent / "world", only=tuple(sys.argv[1:]) or None,
                 workers=int(os.environ.get("WORKERS", 1)))
