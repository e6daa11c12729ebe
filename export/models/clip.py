"""CLIP text encoder (Radford et al. 2021): a pre-LayerNorm causal transformer over token ids."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig
from .layers import merge_heads, split_heads


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(f(x), self.heads) for f in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, states: list | None = None) -> torch.Tensor:
        """The last layer's output; `states` (a list), when given, collects the input and each layer's output."""
        for layer in self.layers:
            if states is not None:
                states.append(x)
            x = layer(x)
        if states is not None:
            states.append(x)
        return x


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def end_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the end token per row; old configs (eos id 2) rely on it being the largest id."""
        if self.cfg.eos_token_id == 2:
            return input_ids.argmax(dim=-1)
        return (input_ids == self.cfg.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, states: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.final_layer_norm(self.encoder(self.embeddings(input_ids), states))
        index = self.end_positions(input_ids)[:, None, None].expand(-1, 1, h.shape[-1])
        return h, h.gather(1, index).squeeze(1)


class CLIPTextModel(nn.Module):
    """token ids [B, T] -> (last_hidden_state [B, T, D], pooled [B, D])"""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_model(input_ids.long())

    def forward_all(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(last_hidden_state, pooled, hidden state 0 (embeddings), ..., hidden state L (before the final norm)),
        as transformers' output_hidden_states gives them: what clip skip reads."""
        states: list[torch.Tensor] = []
        hidden, pooled = self.text_model(input_ids.long(), states)
        return (hidden, pooled, *states)


class CLIPTextModelWithProjection(nn.Module):
    """token ids [B, T] -> (text_embeds [B, P]: the pooled output projected, last_hidden_state [B, T, D])

    SDXL's second text encoder (OpenCLIP ViT-bigG): the U-Net takes text_embeds as its pooled conditioning."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.text_model(input_ids.long())
        return self.text_projection(pooled), hidden

    def forward_all(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(text_embeds, last_hidden_state, hidden state 0, ..., hidden state L): transformers' output order."""
        states: list[torch.Tensor] = []
        hidden, pooled = self.text_model(input_ids.long(), states)
        return (self.text_projection(pooled), hidden, *states)
