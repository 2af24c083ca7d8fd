"""CLIP's tokenizer for true-size packs, built offline.

Stable Diffusion's tokenizer is CLIP's byte-level BPE: 256 byte symbols, the same 256 at a word's
end (`</w>`), 48,894 merges, then `<|startoftext|>` and `<|endoftext|>` (49,408 ids, 77 tokens).
Nothing may be fetched from a hub here, so:
- the real vocabulary when a package on this machine ships CLIP's BPE file (open_clip's
  `bpe_simple_vocab_16e6.txt.gz`, or any copy named by TANDEM_CLIP_BPE): the same ids as
  `openai/clip-vit-large-patch14`'s tokenizer;
- otherwise a stand-in with CLIP's ids and sizes but no merges: every character is one token, so a
  prompt's token count differs from CLIP's while every tensor the models see has its real shape.
`write_clip_tokenizer` says which one it wrote.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

VOCAB_SIZE = 49408
MAX_LENGTH = 77
MERGES = VOCAB_SIZE - 2 * 256 - 2
START, END = "<|startoftext|>", "<|endoftext|>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map of the 256 bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def find_clip_bpe() -> Path | None:
    """CLIP's BPE merges file, where this machine has one: TANDEM_CLIP_BPE, else open_clip's copy
    (located without importing the package)."""
    named = os.environ.get("TANDEM_CLIP_BPE")
    if named:
        return Path(named)
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / BPE_FILE
        if path.is_file():
            return path
    return None


def _base_symbols() -> list[str]:
    base = list(bytes_to_unicode().values())
    return base + [symbol + "</w>" for symbol in base]


def clip_vocabulary(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab and merges as CLIP's own SimpleTokenizer builds them from its BPE file."""
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:MERGES + 1]]
    if len(merges) != MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(f"{bpe_path}: not CLIP's BPE file ({len(merges)} merges, expected {MERGES})")
    symbols = _base_symbols() + ["".join(pair) for pair in merges] + [START, END]
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: not CLIP's BPE file ({len(vocab)} distinct symbols, expected {VOCAB_SIZE})")
    return vocab, merges  # type: ignore[return-value]


def standin_vocabulary() -> dict[str, int]:
    """CLIP's ids without its merges: the byte symbols, unused fillers, then the two specials at
    CLIP's own ids (49406, 49407)."""
    symbols = _base_symbols() + [f"<|unused{i}|>" for i in range(MERGES)] + [START, END]
    return {symbol: i for i, symbol in enumerate(symbols)}


def write_clip_tokenizer(out_dir: Path, bpe_path: Path | None = None) -> str:
    """Writes a CLIPTokenizer to `out_dir`; returns what it is (the real vocabulary or the
    stand-in), for the pack's manifest and the CLI."""
    from transformers import CLIPTokenizer

    bpe_path = bpe_path or find_clip_bpe()
    if bpe_path is not None:
        vocab, merges = clip_vocabulary(bpe_path)
        what = f"CLIP BPE (real vocabulary, from {bpe_path.name})"
    else:
        vocab, merges = standin_vocabulary(), []
        what = "stand-in: CLIP's 49,408 ids without its merges (one token a character); no package here ships CLIP's BPE"
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH,  # type: ignore[arg-type]
                              bos_token=START, eos_token=END, pad_token=END, unk_token=END)
    if len(tokenizer) != VOCAB_SIZE:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids, expected {VOCAB_SIZE}")
    tokenizer.save_pretrained(str(out_dir))
    return what
