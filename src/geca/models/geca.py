"""The Generative Cellular Automaton: one DiT block with 3×3 neighbourhood attention applied M times."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from geca.models.attention import packed_attention, runnable
from geca.models.base import CellState, Denoiser, DenoiserOutput
from geca.models.blocks import DIT_STYLE, GECA_STYLE, AdaLNBlock, BlockStyle, FinalLayer, adaln_zero_init, modulate
from geca.models.config import HEREDITY
from geca.models.embeddings import LabelEmbedder, TimestepEmbedder, sincos_2d
from geca.utils.hardware import quiet_compile


class NeighbourhoodBlock(AdaLNBlock):
    """The adaLN-Zero block on a grid of cells, each cell's query attending to its 3×3 window."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, attention: str, style: BlockStyle) -> None:
        super().__init__(dim, heads, mlp_hidden, style)
        self.attention = attention

    def mix(self, x: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """The attention's output before its projection: (B, H, W, D), or (N, D) at `cells` (flat into B·H·W)."""
        return packed_attention(self.qkv(x), self.heads, runnable(self.attention, x.device), cells)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mix(x))

    def at_cells(self, x: torch.Tensor, mod: tuple[torch.Tensor, ...], cells: torch.Tensor, images: torch.Tensor
                 ) -> torch.Tensor:
        """The block's output at `cells` only (N flat indices into B·H·W; `images`: each one's batch index), (N, D).

        Every cell still gives its keys and values to its neighbours; the projection and the MLP — most of the
        block's maths — run only where the result is used.
        """
        b, d = x.shape[0], x.shape[-1]
        # Per image, gathered per cell; the attention's shift and scale apply to every cell (their keys and values).
        gate_a, shift_m, scale_m, gate_m = (m.reshape(b, d).index_select(0, images) for m in mod[2:])  # 4 × (N, D)
        mixed = self.mix(modulate(self.norm1(x), *mod[:2]), cells)  # (N, D)
        x = x.reshape(-1, d).index_select(0, cells) + gate_a * self.proj(mixed)  # (N, D)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (N, D)


# The block as the authors published it, or as geca 0.1 built it (DiT's details), for runs trained with 0.1.
BLOCKS = {"published": GECA_STYLE, "v0.1": DIT_STYLE}


class GeCA(Denoiser):
    """Cell state per pix-cell, channel order C_in | C_γ | C_out | C_h (paper §2.1)."""

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
        attention: str = "auto",
        checkpointing: bool = False,
        block: str = "published",
        heredity: str = "off",
        skip_idle: bool = True,
        compile_step: bool = False,
    ) -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown GeCA block {block!r}; choose from {', '.join(BLOCKS)}")
        if heredity not in HEREDITY:
            raise ValueError(f"unknown heredity {heredity!r}; choose from {', '.join(HEREDITY)}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.resolution = resolution
        self.learn_sigma = learn_sigma
        self.hidden_channels = hidden_channels
        self.nca_steps = nca_steps
        self.update_prob = update_prob
        self.checkpointing = checkpointing
        self.skip_idle = skip_idle
        self.compile_step = compile_step
        self.pos_channels = pos_channels
        self.register_buffer("pos", sincos_2d(resolution, resolution, pos_channels), persistent=False)
        cell_dim = in_channels + pos_channels + self.out_channels + hidden_channels
        self.embed = nn.Linear(cell_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, label_dropout)
        self.block = NeighbourhoodBlock(hidden_size, heads, mlp_hidden, attention, BLOCKS[block])
        self.block_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.final = FinalLayer(hidden_size, self.out_channels + hidden_channels)
        # Along a raw GHG chain |C_h| grows without bound (a state training never shows); normalising what is
        # carried and learning how much of it enters keeps it in range. No biases: a zero carry enters as zero, so
        # a fresh seed and "nothing inherited" are the same state.
        self.heredity = heredity
        self.inherit_gate = nn.Sequential(nn.LayerNorm(hidden_channels, bias=False),
                                          nn.Linear(hidden_channels, hidden_channels, bias=False)
                                          ) if heredity == "gated" else None
        self.initialize()

    def initialize(self) -> None:
        zero = [self.block_ada[-1], self.final.ada[-1], self.final.linear]
        if self.inherit_gate is not None:
            zero.append(self.inherit_gate[-1])
        adaln_zero_init(self, self.t_embedder, zero)

    @property
    def ghg_default(self) -> str:
        """`hidden` (the paper's GHG) for a model trained to inherit; `none` for one that never saw a carried C_h."""
        return "hidden" if self.heredity == "gated" else "none"

    def inherit(self, seed: CellState, carry: CellState | None) -> CellState:
        """The state a call starts from: the seed, with what the previous reverse step handed over."""
        if carry is None:
            return seed
        hidden = seed.hidden
        if carry.hidden is not None:
            gate = self.inherit_gate
            hidden = carry.hidden if gate is None else seed.hidden + gate(carry.hidden.to(seed.hidden.dtype))
        return CellState(out=seed.out if carry.out is None else carry.out, hidden=hidden)

    def seed(self, batch: int, height: int, width: int, device: torch.device) -> CellState:
        """C_out zero except the centre cell ~ N(0, 1); C_h zero."""
        out = torch.zeros(batch, height, width, self.out_channels, device=device)
        out[:, height // 2, width // 2] = torch.randn(batch, self.out_channels, device=device)
        return CellState(out=out, hidden=torch.zeros(batch, height, width, self.hidden_channels, device=device))

    def positions(self, height: int, width: int) -> torch.Tensor:
        """C_γ of an H×W grid, (H, W, pos_channels): the trained grid's buffer, or computed for another size."""
        if (height, width) == tuple(self.pos.shape[:2]):
            return self.pos
        return sincos_2d(height, width, self.pos_channels).to(self.pos.device)

    def _step(self, fixed: torch.Tensor, state: torch.Tensor, fire: torch.Tensor, block_mod: tuple[torch.Tensor, ...],
              final_mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        b, h, w, s = state.shape
        tokens = fixed + F.linear(state, self.embed.weight[:, -s:])  # (B, H, W, D)
        if not self.skip_idle or torch.compiler.is_compiling():  # compiled, a cell count per call would recompile
            update = self.final(self.block(tokens, block_mod), *final_mod).float()  # (B, H, W, |C_out| + |C_h|)
            return state + update * fire
        # An idle cell's update is discarded: compute it only where a cell fires (half the maths at p = 0.5).
        cells = fire.flatten().nonzero().squeeze(1)  # (N,) flat indices into B·H·W
        images = cells // (h * w)  # (N,)
        tokens = self.block.at_cells(tokens, block_mod, cells, images)  # (N, D)
        shift, scale = (m.reshape(b, -1).index_select(0, images) for m in final_mod)  # 2 × (N, D)
        update = self.final(tokens, shift, scale).float()  # (N, |C_out| + |C_h|)
        return state.reshape(-1, s).index_add(0, cells, update).view(b, h, w, s)

    def grow(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor | None = None,
             carry: CellState | None = None, nca_steps: int | None = None) -> Iterator[CellState]:
        """Yield the cell state after each of the M updates (M = `nca_steps`, default the trained value)."""
        b, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"input has {c} channels, the model expects {self.in_channels}")
        cond = self.t_embedder(t) + self.y_embedder(y, null)  # (B, D)
        block_mod = tuple(m[:, None, None] for m in self.block_ada(cond).chunk(6, dim=-1))  # 6 × (B, 1, 1, D)
        final_mod = tuple(m[:, None, None] for m in self.final.modulation(cond))  # 2 × (B, 1, 1, D)
        pos = self.positions(h, w).to(x.dtype).expand(b, h, w, -1)  # (B, H, W, |C_γ|)
        fixed = torch.cat([x.permute(0, 2, 3, 1), pos], dim=-1)  # C_in | C_γ: (B, H, W, C + |C_γ|)
        # C_in and C_γ never change: their share of the cell embedding is computed once per call, not per step.
        fixed = F.linear(fixed, self.embed.weight[:, : fixed.shape[-1]], self.embed.bias)  # (B, H, W, D)
        start = self.inherit(self.seed(b, h, w, x.device), carry)
        state = torch.cat([start.out, start.hidden], dim=-1)  # C_out | C_h: (B, H, W, |C_out| + |C_h|)
        step = functools.partial(_compiled_step(), self) if self.compile_step else self._step
        for _ in range(self.nca_steps if nca_steps is None else nca_steps):
            # Stochastic update: each cell (all its channels together) fires with probability p. Drawn outside the
            # step so that a compiled step fires the same cells as an eager one (inductor has its own random stream).
            fire = torch.rand(b, h, w, 1, device=x.device) < self.update_prob  # (B, H, W, 1)
            if self.checkpointing and torch.is_grad_enabled():
                state = checkpoint(step, fixed, state, fire, block_mod, final_mod, use_reentrant=False)
            else:
                state = step(fixed, state, fire, block_mod, final_mod)
            yield CellState(out=state[..., : self.out_channels], hidden=state[..., self.out_channels :])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null: torch.Tensor | None = None,
                carry: CellState | None = None, nca_steps: int | None = None) -> DenoiserOutput:
        last = deque(self.grow(x, t, y, null, carry, nca_steps), maxlen=1)  # keeps only the final state
        if not last:
            raise ValueError("GeCA needs at least one NCA step")
        return DenoiserOutput(output=last[0].out.permute(0, 3, 1, 2), state=last[0])  # output (B, |C_out|, H, W)


@functools.cache
def _compiled_step() -> Callable[..., torch.Tensor]:
    """One NCA step (every cell's update) under torch.compile: a few fused kernels instead of dozens of launches,
    reused by all M steps. Dynamo compiles a graph per kind of call (the first step, whose state needs no gradient;
    the EMA copy's frozen weights; no-grad sampling; a new batch size); past its limit of 8 it runs eagerly."""
    quiet_compile()
    return torch.compile(GeCA._step)
