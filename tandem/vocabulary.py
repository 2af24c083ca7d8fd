"""What words a pack's text encoder was trained on (torch-free: checked before any model loads).

A pack may declare them in its manifest (`vocabulary`: the words; `aliases`: words read as
others, e.g. "an" -> "a"). A prompt outside them still runs, but its image follows only the
words the pack knows, so the CLI warns once, naming the unknown words. Packs without a
vocabulary (real Stable Diffusion packs) get no warning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_WORD = re.compile(r"[a-z0-9']+")


def words(prompt: str) -> list[str]:
    """The prompt's words as a CLIP tokenizer sees them (lower case, punctuation dropped)."""
    return _WORD.findall(prompt.lower())


def apply_aliases(prompt: str, aliases: Mapping[str, str]) -> str:
    """`prompt` with each alias word replaced (whole words, any case); unchanged without aliases."""
    if not aliases:
        return prompt
    return re.sub(r"[A-Za-z0-9']+", lambda m: aliases.get(m.group(0).lower(), m.group(0)), prompt)


def unknown_words(prompt: str, vocabulary: Sequence[str]) -> list[str]:
    """Words of `prompt` outside `vocabulary`, first occurrence order; [] when no vocabulary."""
    if not vocabulary:
        return []
    known = set(vocabulary)
    return list(dict.fromkeys(w for w in words(prompt) if w not in known))
