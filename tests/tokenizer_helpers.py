"""What the caller-side tests on the bundled SmolLM2 tokenizer share: its eos id, a sample text,
and its ids."""

from __future__ import annotations

EOS = 2  # <|im_end|>
TEXT = "Hello world! The quick brown fox jumps over the lazy dog."


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)
