"""The Generative Cellular Automaton: one DiT block with 3×3 neighbourhood attention applied M times."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from geca.models.attention import neighbourhood_attention
from geca.models.base import CellState, Denoiser, DenoiserOutput
from geca.models.embeddings import LabelEmbedder, TimestepEmbedder, adaln_zero_init, modulate, sincos_2d


class NeighbourhoodBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning; attention over each cell's 3×3 window."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, attention: str) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.attention = attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, dim))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        q, k, v = self.qkv(x).view(b, h, w, 3, self.heads, d // self.heads).permute(3, 0, 4, 1, 2, 5)
        out = neighbourhood_attention(q, k, v, impl=self.attention)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, h, w, d))

    def forward(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
        x = x + gate_a * self.attend(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class GeCA(Denoiser):
    """Cell state per pix-cell, channel order C_in | C_γ | C_out | C_h (method.md §2)."""

    has_cell_state = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        resolution: int,
        hidden_size: int,
        heads: int,
        mlp_hidden: int,
        hidden_channels: int,
        nca_steps: int,
        pos_channels: int = 16,
        update_prob: float = 0.5,
        learn_sigma: bool = True,
        label_dropout: float = 0.1,
        attention: str = "fast",
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.resolution = resolution
        self.learn_sigma = learn_sigma
        self.hidden_channels = hidden_channels
        self.nca_steps = nca_steps
        self.update_prob = update_prob
        self.checkpointing = checkpointing
        self.register_buffer("pos", sincos_2d(resolution, resolution, pos_channels), persistent=False)
        cell_dim = in_channels + pos_channels + self.out_channels + hidden_channels
        self.embed = nn.Linear(cell_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, label_dropout)
        self.block = NeighbourhoodBlock(hidden_size, heads, mlp_hidden, attention)
        self.block_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final = nn.Linear(hidden_size, self.out_channels + hidden_channels)
        self.initialize()

    def initialize(self) -> None:
        adaln_zero_init(self, self.t_embedder, (self.block_ada[-1], self.final_ada[-1], self.final))

    def seed(self, batch: int, height: int, width: int, device: torch.device) -> CellState:
        """C_out zero except the centre cell ~ N(0, 1); C_h zero."""
        out = torch.zeros(batch, height, width, self.out_channels, device=device)
        out[:, height // 2, width // 2] = torch.randn(batch, self.out_channels, device=device)
        return CellState(out=out, hidden=torch.zeros(batch, height, width, self.hidden_channels, device=device))

    def _step(self, fixed: torch.Tensor, out: torch.Tensor, hidden: torch.Tensor,
              block_mod: tuple[torch.Tensor, ...], final_mod: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        tokens = self.embed(torch.cat([fixed, out, hidden], dim=-1))
        tokens = self.block(tokens, block_mod)
        shift, scale = final_mod
        update = self.final(modulate(self.final_norm(tokens), shift, scale)).float()
        # Stochastic update: each cell (all its channels together) fires with probability p.
        fire = (torch.rand(*out.shape[:3], 1, device=out.device) < self.update_prob).to(update.dtype)
        update = update * fire
        return out + update[..., : out.shape[-1]], hidden + update[..., out.shape[-1]:]

    def grow(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor | None = None,
             carry: CellState | None = None, steps: int | None = None) -> Iterator[CellState]:
        """Yield the cell state after each of the M updates (M = `steps`, default the trained value)."""
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"input has {c} channels, the model expects {self.in_channels}")
        if (h, w) != tuple(self.pos.shape[:2]):
            self.pos = sincos_2d(h, w, self.pos.shape[-1]).to(x.device)
        cond = self.t_embedder(t) + self.y_embedder(y, null)
        block_mod = tuple(m[:, None, None] for m in self.block_ada(cond).chunk(6, dim=-1))
        final_mod = tuple(m[:, None, None] for m in self.final_ada(cond).chunk(2, dim=-1))
        fixed = torch.cat([x.permute(0, 2, 3, 1), self.pos.to(x.dtype).expand(b, h, w, -1)], dim=-1)
        state = self.seed(b, h, w, x.device)
        if carry is not None:
            state = CellState(out=state.out if carry.out is None else carry.out,
                              hidden=state.hidden if carry.hidden is None else carry.hidden)
        out, hidden = state.out, state.hidden
        for _ in range(self.nca_steps if steps is None else steps):
            if self.checkpointing and torch.is_grad_enabled():
                out, hidden = checkpoint(self._step, fixed, out, hidden, block_mod, final_mod, use_reentrant=False)
            else:
                out, hidden = self._step(fixed, out, hidden, block_mod, final_mod)
            yield CellState(out=out, hidden=hidden)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor | None = None,
                carry: CellState | None = None, steps: int | None = None) -> DenoiserOutput:
        states = list(self.grow(x, t, y, null, carry, steps))
        if not states:
            raise ValueError("GeCA needs at least one NCA step")
        return DenoiserOutput(output=states[-1].out.permute(0, 3, 1, 2), state=states[-1])


