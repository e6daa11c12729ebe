"""Weighted prompt fragments -> 75-token chunks of ids and per-token weights, each a full text-encoder input.

Prompts of any length: the token ids are cut into chunks of max_length - 2 tokens (75 for CLIP), each wrapped in
the start and end tokens and padded as the tokenizer's config says (SD 1.x: the end token, SD 2.x: id 0), so each
chunk reads exactly as a short prompt does. As AUTOMATIC1111 does, a chunk that fills up within COMMA_BACKTRACK
tokens after a comma ends at that comma instead, and the words after it move to the next chunk whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .prompt_syntax import BREAK, Fragment
from .tokenizer import CLIPTokenizer

COMMA_BACKTRACK = 20  # A1111's default "comma padding backtrack"
COMMA = ",</w>"


@dataclass(frozen=True)
class Chunks:
    """ids int64 [chunks, max_length] and their weights float32 [chunks, max_length] (1 on start/end/padding)."""

    ids: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def plain(self) -> bool:
        return bool(np.all(self.weights == 1.0))

    def key(self) -> bytes:
        return self.ids.tobytes() + self.weights.tobytes()


class _Builder:
    """Collects (id, weight) pairs into chunks, closing one when it is full or at BREAK."""

    def __init__(self, tokenizer: CLIPTokenizer, backtrack: int):
        self.tok, self.size, self.backtrack = tokenizer, tokenizer.max_length - 2, backtrack
        self.comma = tokenizer.encoder.get(COMMA)
        self.rows: list[tuple[list[int], list[float]]] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1  # index in the open chunk of its last comma

    def add(self, token: int, weight: float) -> None:
        if token == self.comma:
            self.last_comma = len(self.ids)
        elif len(self.ids) == self.size and self.last_comma >= 0 and self.size - self.last_comma <= self.backtrack:
            cut = self.last_comma + 1
            moved = self.ids[cut:], self.weights[cut:]
            self.ids, self.weights = self.ids[:cut], self.weights[:cut]
            self.close()
            self.ids, self.weights = list(moved[0]), list(moved[1])
        if len(self.ids) == self.size:
            self.close()
        self.ids.append(token)
        self.weights.append(weight)

    def close(self) -> None:
        pad = self.size - len(self.ids)
        tok = self.tok
        self.rows.append(([tok.bos_id, *self.ids, tok.eos_id] + [tok.pad_id] * pad, [1.0, *self.weights, 1.0] + [1.0] * pad))
        self.ids, self.weights, self.last_comma = [], [], -1

    def finish(self) -> Chunks:
        if self.ids or not self.rows:
            self.close()
        return Chunks(np.array([r[0] for r in self.rows], dtype=np.int64),
                      np.array([r[1] for r in self.rows], dtype=np.float32))


def chunk(fragments: list[Fragment], tokenizer: CLIPTokenizer, backtrack: int = COMMA_BACKTRACK) -> Chunks:
    """Token chunks of the fragments (prompt_syntax.parse), each fragment tokenized on its own; BREAK ends a
    chunk. An empty prompt is one chunk holding just the start and end tokens."""
    builder = _Builder(tokenizer, backtrack)
    for fragment in fragments:
        if fragment is BREAK:
            builder.close()
            continue
        for token in tokenizer.encode(fragment.text):
            builder.add(token, fragment.weight)
    return builder.finish()


def pad_chunks(chunks: Chunks, count: int, tokenizer: CLIPTokenizer) -> Chunks:
    """`chunks` followed by empty-prompt chunks up to `count` (negative and positive prompt must match in length)."""
    extra = count - len(chunks)
    if extra <= 0:
        return chunks
    empty = chunk([Fragment("")], tokenizer)
    return Chunks(np.concatenate([chunks.ids, np.repeat(empty.ids, extra, axis=0)]),
                  np.concatenate([chunks.weights, np.repeat(empty.weights, extra, axis=0)]))
