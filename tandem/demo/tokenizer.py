"""Builds the demo world's CLIP tokenizer offline from the grammar's vocabulary.

Every grammar word becomes one token; any other lowercase text still tokenizes (into letters),
so the tokenizer never fails on user input. Deterministic: the same files every run.

    python -m tandem.demo.tokenizer OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import string
import tempfile
from pathlib import Path

from tandem.demo.grammar import vocabulary

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
ALPHABET = string.ascii_lowercase + string.digits + ".,'-"
# Grammar prompts are 10 words; 16 leaves room for a start and end token and small variations.
MAX_LENGTH = 16


def _train_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # larger than needed: training stops once every word is one token
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(words)] * 4, trainer)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.model.save(tmp)
        vocab = json.loads(Path(tmp, "vocab.json").read_text())
        lines = Path(tmp, "merges.txt").read_text().splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
    # Single characters at a word's end, so that any word of the alphabet tokenizes.
    for char in ALPHABET:
        vocab.setdefault(f"{char}</w>", len(vocab))
    return vocab, merges  # type: ignore[return-value]


def build_tokenizer(out_dir: str | Path):
    """Writes a CLIPTokenizer for the demo grammar to `out_dir` and returns it."""
    from transformers import CLIPTokenizer

    vocab, merges = _train_bpe(vocabulary())
    # transformers' stub says str | list[str]; the tokenizer takes merge pairs as well.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)  # type: ignore[arg-type]
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    build_tokenizer(args.out_dir)
    print(f"wrote tokenizer to {args.out_dir}")


if __name__ == "__main__":
    main()
