"""Tag-style captions (what kohya users have: ``1girl, red hair, smiling, outdoors``).

Each step sees the tags in a new order, the first ``keep_tokens`` kept in place (a trigger word,
a character name), and each other tag dropped with probability ``dropout``. The draws come from
a generator seeded with (seed, epoch, item), so a resumed run sees the same captions as an
uninterrupted one, and they are independent of the image augmentation's draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TagPolicy:
    """Args:
        shuffle: shuffle the tags after the first ``keep_tokens``.
        keep_tokens: leading tags that keep their place (and are never dropped).
        dropout: probability of dropping each other tag.
        separator: what separates tags.
    """

    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0
    separator: str = ","

    @property
    def varies(self) -> bool:
        """Captions change from step to step (the text-embedding cache cannot hold them)."""
        return self.shuffle or self.dropout > 0


def tag_caption(caption: str, policy: TagPolicy, rng: np.random.Generator) -> str:
    """The caption this step trains on; unchanged when the policy does nothing."""
    if not policy.varies or not caption:
        return caption
    tags = [t.strip() for t in caption.split(policy.separator) if t.strip()]
    head, tail = tags[: policy.keep_tokens], tags[policy.keep_tokens:]
    if policy.dropout > 0:
        tail = [t for t, u in zip(tail, rng.random(len(tail))) if u >= policy.dropout]
    if policy.shuffle:
        tail = [tail[i] for i in rng.permutation(len(tail))]
    return f"{policy.separator} ".join(head + tail)
