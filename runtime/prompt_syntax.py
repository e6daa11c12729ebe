"""AUTOMATIC1111's prompt attention syntax: `(text)`, `[text]`, `(text:1.3)`, escapes and BREAK -> weighted text.

The rules, which most Stable Diffusion tools copy:
- `(text)` multiplies the attention of its text by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies it by w
  (so at the top level it sets w); nesting multiplies, so `((text))` is 1.21.
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters (a lone backslash is dropped).
- The forgiving part: a bracket that is never closed applies to the rest of the prompt; a closing bracket with no
  open one is literal text, as is a `:` that does not start `:number)`.
- `BREAK` (the upper-case word) ends the current 75-token chunk; the next text starts a new one. (Inside brackets
  too: A1111 scales its marker there and so reads it as the word "BREAK".) A `:1.2.3)`, which A1111 fails on, is
  literal text followed by `)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

UP, DOWN = 1.1, 1 / 1.1
SYNTAXES = ("a1111", "none")

# one alternative per kind of piece; group 1 is the number of a `:w)` weight closer
_PIECE = re.compile(r"""
    \\[()\[\]\\]                # an escaped bracket or backslash
  | \\                          # a lone backslash
  | [(\[]                       # an opening bracket
  | :\s*([+-]?[.\d]+)\s*\)      # `:1.3)` closes a round bracket with its weight
  | [)\]]                       # a closing bracket
  | [^\\()\[\]:]+               # plain text
  | :                           # a colon that is not a weight
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text and its attention weight."""

    text: str
    weight: float = 1.0


BREAK = Fragment("BREAK", -1.0)  # a chunk boundary, never text (its weight cannot come from the syntax's rules)
_BREAK_PIECE: list = ["BREAK", -1.0]  # its stand-in while parsing (compared by identity, never scaled)


def parse(prompt: str, syntax: str = "a1111") -> list[Fragment]:
    """Prompt -> fragments in order, with BREAK between chunks; runs of equal weight are joined.

    syntax "none": the whole prompt as one fragment of weight 1 (parentheses are plain text)."""
    if syntax not in SYNTAXES:
        raise ValueError(f"unknown prompt syntax {syntax!r}: choose {' or '.join(SYNTAXES)}")
    if syntax == "none":
        return [Fragment(prompt)]
    pieces: list[list] = []  # [text, weight]; mutable so that a closing bracket can scale what it encloses
    rounds: list[int] = []  # where in `pieces` each open bracket began
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not _BREAK_PIECE:
                piece[1] *= factor

    for m in _PIECE.finditer(prompt):
        token, number = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif number is not None and rounds:
            if _is_number(number):
                scale(rounds.pop(), float(number))
            else:  # `:1.2.3)`: literal text, then an ordinary `)`
                _add_text(pieces, token[:token.rindex(")")])
                scale(rounds.pop(), UP)
        elif token == ")" and rounds:
            scale(rounds.pop(), UP)
        elif token == "]" and squares:
            scale(squares.pop(), DOWN)
        else:
            _add_text(pieces, token)
    for start in rounds:  # unclosed brackets reach to the end of the prompt
        scale(start, UP)
    for start in squares:
        scale(start, DOWN)
    return _join(pieces)


def _add_text(pieces: list[list], text: str) -> None:
    for k, part in enumerate(_BREAK.split(text)):
        if k:
            pieces.append(_BREAK_PIECE)
        pieces.append([part, 1.0])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join(pieces: list[list]) -> list[Fragment]:
    """Neighbouring text of equal weight as one fragment; empty text dropped; at least one fragment."""
    out: list[Fragment] = []
    for piece in pieces:
        if piece is _BREAK_PIECE:
            out.append(BREAK)
        elif not piece[0]:
            continue
        elif out and out[-1] is not BREAK and out[-1].weight == piece[1]:
            out[-1] = Fragment(out[-1].text + piece[0], out[-1].weight)
        else:
            out.append(Fragment(piece[0], piece[1]))
    return out or [Fragment("")]
