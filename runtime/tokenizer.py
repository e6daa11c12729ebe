"""CLIP byte-level BPE tokenizer in plain Python, matching transformers' slow CLIPTokenizer without ftfy."""

from __future__ import annotations

import json
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

START, END = "<|startoftext|>", "<|endoftext|>"
# CLIP's merges.txt holds more merges than its vocabulary uses; transformers keeps only these.
MAX_MERGES = 49152 - 256 - 2
# The contraction alternatives of CLIP's word pattern; `re.I` folds like the `regex` package does ("'ſ" too).
_CONTRACTION = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d", re.IGNORECASE)
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read."""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's table of printable stand-ins for the 256 byte values (so BPE never sees spaces or controls)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def clean_text(text: str) -> str:
    """Text clean-up of transformers' CLIPTokenizer when ftfy is absent (BERT's BasicTokenizer, no accent stripping)."""
    out = []
    for ch in text:
        if ch in "\t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif ord(ch) == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue  # controls, format characters, unassigned code points, NUL
        elif _is_cjk(ch):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = unicodedata.normalize("NFC", "".join(out)).split()
    return " ".join(w.lower() for w in words)


def _char_class(ch: str) -> str:
    """" " space, "L" letter, "N" number, "P" anything else, "" matched by no branch of the pattern."""
    if ch.isspace():
        return " "
    cat = unicodedata.category(ch)[0]
    if cat in "LN":
        return cat
    # Case-insensitive matching puts a non-letter whose case fold is a letter (U+0345) outside
    # [^\s\p{L}\p{N}] as well as outside [\p{L}]: the `regex` package skips it like a space.
    if any(unicodedata.category(c)[0] == "L" for c in ch.casefold()):
        return ""
    return "P"


def split_words(text: str) -> list[str]:
    """CLIP's pattern `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`."""
    words, i, n = [], 0, len(text)
    while i < n:
        if text.startswith(START, i) or text.startswith(END, i):
            word = START if text.startswith(START, i) else END
        elif m := _CONTRACTION.match(text, i):
            word = m.group()
        else:
            kind = _char_class(text[i])
            if kind in (" ", ""):
                i += 1
                continue
            j = i + 1
            if kind != "N":  # letters and "other" symbols form runs; every digit is its own word
                while j < n and _char_class(text[j]) == kind:
                    j += 1
            word = text[i:j]
        words.append(word)
        i += len(word)
    return words


def _token_spec(value) -> dict:
    """A special token as a tokenizer config writes it: a string or {"content": ..., "lstrip": ..., ...}."""
    if isinstance(value, dict):
        if "content" not in value:
            raise TokenizerError(f"special token entry without 'content': {value!r}")
        return value
    return {"content": str(value)}


def merge_pair(symbols: list[str] | tuple[str, ...], pair: tuple[str, str]) -> list[str]:
    """Join every non-overlapping occurrence of `pair`, left to right (one BPE merge)."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


class CLIPTokenizer:
    """Prompts -> int64 ids (N, max_length): start token, BPE ids, end token, padding."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, pad_token: str = END,
                 max_length: int = 77, bos_token: str = START, eos_token: str = END, unk_token: str = END,
                 added_tokens: dict[str, dict] | None = None):
        self.encoder = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = byte_to_unicode()
        self.max_length = max_length
        # Added/special tokens are cut out of the text before clean-up (transformers' trie split).
        self.added: dict[str, dict] = dict(added_tokens or {})
        for tok in (bos_token, eos_token, unk_token, pad_token):
            self.added.setdefault(tok, {"content": tok})
        self.unk_id = self._id(unk_token)
        self.bos_id = self._id(bos_token)
        self.eos_id = self._id(eos_token)
        self.pad_id = self._id(pad_token)
        self.cache: dict[str, list[str]] = {}
        names = sorted(self.added, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    @classmethod
    def from_dir(cls, path: str | Path) -> "CLIPTokenizer":
        """Read vocab.json, merges.txt and (if present) tokenizer_config.json / special_tokens_map.json."""
        folder = Path(path)
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
        except (OSError, json.JSONDecodeError) as err:
            raise TokenizerError(f"cannot read CLIP tokenizer files in {folder}: {err}") from None
        merges = []
        for line in lines[1:MAX_MERGES + 1]:  # line 0 is the "#version" header
            pair = tuple(line.split())
            if len(pair) != 2:
                raise TokenizerError(f"bad line in {folder / 'merges.txt'}: {line!r}")
            merges.append(pair)
        config = _read_json(folder / "tokenizer_config.json")
        added = {}
        for idx, entry in (config.get("added_tokens_decoder") or {}).items():
            spec = _token_spec(entry)
            added[spec["content"]] = spec
            vocab[spec["content"]] = int(idx)  # added tokens take precedence over vocab.json
        if "added_tokens_decoder" not in config:  # older folders: special_tokens_map.json overrides tokenizer_config.json
            config.update(_read_json(folder / "special_tokens_map.json"))
        names = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
        for key, default in names.items():
            spec = _token_spec(config.get(key) or default)
            names[key] = spec["content"]
            added.setdefault(spec["content"], spec)
        for extra in config.get("additional_special_tokens") or []:
            spec = _token_spec(extra)
            added.setdefault(spec["content"], spec)
        max_length = int(config.get("model_max_length") or 77)
        if max_length > 10_000:  # transformers' "no limit" sentinel: CLIP text encoders take 77
            max_length = 77
        return cls(vocab, merges, max_length=max_length, added_tokens=added, **names)

    def _id(self, token: str) -> int:
        """Id of a token the tokenizer cannot work without (start, end, padding, unknown)."""
        if token not in self.encoder:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return self.encoder[token]

    def bpe(self, word: str) -> list[str]:
        """Merge the byte symbols of one pre-token by merge rank (lowest first), the last symbol ending in '</w>'."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
        self.cache[word] = symbols
        return symbols

    def _encode_plain(self, text: str) -> list[int]:
        ids = []
        for word in split_words(clean_text(text)):
            if word in (START, END):  # the pattern keeps these whole (they can appear after clean-up)
                pieces = [word]
            else:
                pieces = self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8")))
            ids.extend(self.encoder.get(p, self.unk_id) for p in pieces)
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without start/end tokens and untruncated."""
        pieces = self._added_re.split(text)
        for k in range(1, len(pieces), 2):  # odd entries are the added tokens; honour their strip flags
            spec = self.added[pieces[k]]
            if spec.get("lstrip"):
                pieces[k - 1] = pieces[k - 1].rstrip()
            if spec.get("rstrip"):
                pieces[k + 1] = pieces[k + 1].lstrip()
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.extend(self.encoder.get(t, self.unk_id) for t in self.vectors(piece))
            elif piece:
                ids.extend(self._encode_plain(piece))
        return ids

    def vectors(self, token: str) -> list[str]:
        """An added token and the `token_1`, `token_2`, ... that follow it: a multi-vector textual-inversion
        embedding is one token per vector, and naming the first names them all (diffusers' convention)."""
        out, k = [token], 1
        while f"{token}_{k}" in self.added:
            out.append(f"{token}_{k}")
            k += 1
        return out

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Prompts -> int64 array (N, max_length): start, ids, end, then padding; over-long prompts are cut."""
        if isinstance(prompts, str):
            prompts = [prompts]
        keep = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TokenizerError(f"prompt must be a string, got {type(prompt).__name__}")
            ids = self.encode(prompt)
            if len(ids) > keep:
                warnings.warn(f"prompt {row} is {len(ids) - keep} tokens too long for CLIP "
                              f"({self.max_length} positions); the extra tokens were dropped", stacklevel=2)
                ids = ids[:keep]
            seq = [self.bos_id, *ids, self.eos_id]
            out[row, :len(seq)] = seq
        return out


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data
