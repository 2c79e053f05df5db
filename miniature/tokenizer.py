"""Build a `CLIPTokenizer` from the real CLIP BPE vocabulary shipped in `open-clip-torch`.

`open-clip-torch` is not a runtime dependency (it pulls torchvision/timm and with them a
different torch build); the conversion ran once and its output lives in
`toolkit/assets/clip_tokenizer/`. To redo it:

    pip download --no-deps open-clip-torch -d /tmp/oc && cd /tmp/oc && unzip -o *.whl \
        open_clip/bpe_simple_vocab_16e6.txt.gz
    python -m miniature.tokenizer /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz out_dir
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from transformers import CLIPTokenizer

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
# CLIP's context length; a tokenizer built from files does not know it (defaults to 1e30).
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP reversible byte->unicode table (same as open_clip.tokenizer).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def convert_open_clip_bpe(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """Write vocab.json / merges.txt equivalent to open_clip's SimpleTokenizer."""
    with gzip.open(bpe_gz) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=MODEL_MAX_LENGTH
    )
    tok.save_pretrained(out)
    # vocab.json + merges.txt are what SD repos ship in tokenizer/; the fast tokenizer.json is
    # rebuilt from them on load, so it is not kept (3.6 MB).
    (out / "tokenizer.json").unlink(missing_ok=True)
    return out


def load_clip_tokenizer(path: str | Path = ASSET_DIR) -> CLIPTokenizer:
    """The shipped CLIP tokenizer (49408 tokens, context 77), via `from_pretrained`."""
    return CLIPTokenizer.from_pretrained(str(path), model_max_length=MODEL_MAX_LENGTH)


if __name__ == "__main__":
    convert_open_clip_bpe(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ASSET_DIR)
