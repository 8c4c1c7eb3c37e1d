import torch
from torch import nn

from worker.kernels.qk_norm_rope import rotate_partial


class PartialRotaryEmbedding(nn.Module):
    """NeoX-style rotary embedding on the first `rotary_dim` dims of each head."""

    def __init__(self, head_dim: int, rotary_dim: int, base: float, max_position: int):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """positions [T]; query [T, H, D]; key [T, H_kv, D] -> rotated copies."""
        cos, sin = self.cos_sin[positions].chunk(2, dim=-1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotate_partial(x, cos, sin, self.rotary_dim)
