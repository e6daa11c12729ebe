"""Textual inversion (Gal et al. 2022): learned token vectors added to the text encoder and its tokenizer.

Files read: AUTOMATIC1111's `.pt` ({"string_to_param": {"*": [n, dim]}, "name": ...}) and `.safetensors`
({"emb_params": [n, dim]}), named after the file stem by default; diffusers' `learned_embeds.bin` /
`.safetensors` ({token: [dim] or [n, dim]}), named by their key. An embedding of n vectors becomes the tokens
`tok`, `tok_1`, ..., `tok_{n-1}` (diffusers' convention); a prompt naming `tok` gets all n (the runtime tokenizer
and diffusers both expand it). SDXL embeddings (clip_l/clip_g) are refused: SD 1.x/2.x only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sdonnx.model import sha256


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding: its prompt token and vectors [n, dim]."""

    path: Path
    token: str
    vectors: torch.Tensor

    @property
    def tokens(self) -> list[str]:
        return [self.token] + [f"{self.token}_{k}" for k in range(1, len(self.vectors))]

    def record(self) -> dict:
        """sdonnx.json's entry for it."""
        return {"file": self.path.name, "token": self.token, "vectors": len(self.vectors),
                "sha256": sha256(self.path)}


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """'file.pt' or 'file.pt:TOKEN' -> (path, token or None); a colon inside a path (C:\\...) is kept."""
    path, sep, token = spec.rpartition(":")
    if sep and path and token and not any(c in token for c in "/\\"):
        return Path(path), token
    return Path(spec), None


def read_embedding(path: Path, token: str | None = None) -> Embedding:
    """The embedding in `path`, named `token` (default: the stem of an A1111 file, the key of a diffusers one)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file not found: {path}")
    data = _load(path)
    if "clip_g" in data or "clip_l" in data:
        raise EmbeddingError(f"{path.name} is an SDXL embedding (clip_l/clip_g); only SD 1.x/2.x embeddings are "
                             "supported")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"{path.name}: string_to_param should hold one tensor")
        name, vectors = path.stem, next(iter(params.values()))
    elif "emb_params" in data:  # A1111 .safetensors
        name, vectors = path.stem, data["emb_params"]
    elif len(data) == 1:  # diffusers: {token: vectors}
        name, vectors = next(iter(data.items()))
    else:
        raise EmbeddingError(f"{path.name} is not a textual-inversion embedding (no string_to_param, emb_params "
                             "or single token)")
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise EmbeddingError(f"{path.name}: the embedding is not a [vectors, dim] tensor")
    token = token or str(name)
    if not token.strip() or any(c.isspace() for c in token):
        raise EmbeddingError(f"{path.name}: token {token!r} must be one word (give it as FILE:TOKEN)")
    return Embedding(path, token, vectors.detach().reshape(-1, vectors.shape[-1]).float())


def _load(path: Path) -> dict:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EmbeddingError(f"cannot read embedding {path.name}: {first}") from None
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name} does not hold a dictionary of tensors")
    return data


def check_unique(embeddings: list[Embedding]) -> None:
    """No token given twice (a multi-vector embedding's `tok_1`, ... included)."""
    seen: dict[str, Path] = {}
    for emb in embeddings:
        for tok in emb.tokens:
            if tok in seen:
                raise EmbeddingError(f"token {tok!r} is given twice ({seen[tok].name} and {emb.path.name})")
            seen[tok] = emb.path


def tokenizer_tokens(tokenizer_dir: Path) -> dict[str, int]:
    """Every token the tokenizer folder knows, with its id: vocab.json and the config's added tokens."""
    vocab = json.loads((Path(tokenizer_dir) / "vocab.json").read_text(encoding="utf-8"))
    config = _read_config(Path(tokenizer_dir))
    for idx, entry in (config.get("added_tokens_decoder") or {}).items():
        vocab[entry["content"] if isinstance(entry, dict) else str(entry)] = int(idx)
    return vocab


def add_to_model(text_encoder: torch.nn.Module, embeddings: list[Embedding], tokenizer_dir: Path) -> dict[str, int]:
    """Append the vectors to the token embedding matrix; returns {token: id} for the tokenizer."""
    known = tokenizer_tokens(tokenizer_dir)
    table = text_encoder.text_model.embeddings.token_embedding
    rows, dim = table.weight.shape
    size = max(known.values()) + 1
    if size != rows:
        raise EmbeddingError(f"the tokenizer has {size} tokens but the text encoder {rows} token rows: "
                             "cannot add embeddings")
    ids: dict[str, int] = {}
    for emb in embeddings:
        if emb.vectors.shape[1] != dim:
            raise EmbeddingError(f"{emb.path.name}: vectors of {emb.vectors.shape[1]} values, but this text encoder's "
                                 f"are {dim} (an embedding for another model family?)")
        for tok in emb.tokens:
            if tok in known or f"{tok}</w>" in known:  # as a whole word it would take over that word
                raise EmbeddingError(f"{emb.path.name}: token {tok!r} is already in the tokenizer's vocabulary "
                                     "(name another one with FILE:TOKEN)")
            ids[tok] = size + len(ids)
    vectors = torch.cat([e.vectors for e in embeddings]).to(table.weight.dtype)
    grown = torch.nn.Embedding(rows + len(vectors), dim)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([table.weight, vectors]))
    text_encoder.text_model.embeddings.token_embedding = grown
    return ids


def write_tokens(tokenizer_dir: Path, ids: dict[str, int]) -> None:
    """Add the tokens to tokenizer_config.json's added_tokens_decoder, which our tokenizer and transformers' read.

    A config without added_tokens_decoder takes special_tokens_map.json's names first: both readers let that file
    override the config only while the config has no added_tokens_decoder."""
    folder = Path(tokenizer_dir)
    config = _read_config(folder)
    if "added_tokens_decoder" not in config:
        special = folder / "special_tokens_map.json"
        if special.is_file():
            names = json.loads(special.read_text(encoding="utf-8"))
            config.update({k: v for k, v in names.items() if k.endswith("_token")})
        config["added_tokens_decoder"] = {}
    for tok, idx in ids.items():
        config["added_tokens_decoder"][str(idx)] = {"content": tok, "lstrip": False, "normalized": True,
                                                    "rstrip": False, "single_word": False, "special": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _read_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

