"""
The networks: the Stable Diffusion UNet family, the PixArt-alpha DiT, the SD VAE, the noise
schedule and the text encoders, written out in full so that nothing of the method hides in a
library.

Module names follow the diffusers-format checkpoints these networks load, so converting one is a
key-for-key copy (convert.py holds the three renames). The only extension point is
`Attention.processor` on cross-attention layers: nasa.py plugs its negative-prompt attention in
there, and nothing else in this file knows about guidance, distillation or negative prompts.
"""
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint
from safetensors.torch import load_file, save_file

from cli import UserError, one_line

# -----------------------------------------------------------------------------
# Attention, shared by every self- and cross-attention in the UNet, the DiT and the VAE


def attention(q, k, v, heads, mask=None):
    """Multi-head attention. q: (..., N, heads*d); k, v: (..., L, heads*d); mask: (..., L) bool,
    True where a key may be attended to. Any number of leading batch dims."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(-3, -2) for t in (q, k, v))  # (..., h, N or L, d)
    if mask is not None:
        mask = mask[..., None, None, :]  # (..., 1, 1, L): same for every head and query
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (..., h, N, d)
    return out.transpose(-3, -2).flatten(-2)  # (..., N, h*d)


class Attention(nn.Module):
    """Self-attention (context=None) or cross-attention to a text context.

    `processor`, None by default, is the one extension point: when set on a cross-attention layer,
    it is called as processor(self, q, k, v, mask) in place of `attention`, with k and v already
    projected from whatever context the network was given (nasa.py uses this).
    """

    def __init__(self, dim, heads, context_dim=None, qkv_bias=False):
        super().__init__()
        self.heads, self.is_cross = heads, context_dim is not None
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)
        self.processor = None

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.processor is not None:
            return self.to_out(self.processor(self, q, k, v, mask))
        return self.to_out(attention(q, k, v, self.heads, mask))


class FeedForward(nn.Module):
    """GEGLU (SD) or tanh-GELU (PixArt) MLP with 4x expansion."""

    def __init__(self, dim, gated):
        super().__init__()
        self.gated = gated
        self.proj_in = nn.Linear(dim, 4 * dim * (2 if gated else 1))
        self.proj_out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        if self.gated:
            x, gate = self.proj_in(x).chunk(2, dim=-1)
            return self.proj_out(x * F.gelu(gate))
        return self.proj_out(F.gelu(self.proj_in(x), approximate='tanh'))


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, cos first. t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# -----------------------------------------------------------------------------
# Stable Diffusion UNet: one parametric class for SD1.5, SD2.1 (base and 768), SD-Turbo, shapes


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    channels: tuple = (320, 640, 1280, 1280)     # per resolution level
    attn_levels: tuple = (True, True, True, False)  # which levels have spatial transformers
    heads: tuple = (8, 8, 8, 8)                 # attention heads per level (SD2: head dim 64)
    layers_per_block: int = 2
    context_dim: int = 768                      # text encoder width
    linear_proj: bool = False                   # SD2 projects in/out of transformers linearly
    norm_groups: int = 32
    sample_size: int = 64                       # default latent size (image size / 8)
    transformer_depth: tuple = 1                # transformer blocks per spatial transformer: one, or per level
    mid_depth: int = 1                          # ... in the mid block
    addition_embed: str = None                  # 'text_time' (SDXL): pooled text + size/crop ids join the timestep
    addition_time_dim: int = 256                # sinusoid width of each of SDXL's 6 size/crop ids
    pooled_dim: int = 0                         # width of the pooled text embedding (SDXL: 1280)

    def depth(self, level):
        d = self.transformer_depth
        return d[level] if isinstance(d, (tuple, list)) else d


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, cout) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim, gated=True)

    def forward(self, x, context, mask=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, context_dim, linear_proj, groups, depth=1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        proj = (lambda: nn.Linear(ch, ch)) if linear_proj else (lambda: nn.Conv2d(ch, ch, 1))
        self.proj_in, self.proj_out, self.linear_proj = proj(), proj(), linear_proj
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, heads, context_dim) for _ in range(depth)])

    def _proj(self, layer, x):
        """1x1 conv and linear are the same map; apply either to (B, HW, C). A 1x1 conv wrapped in an
        adapter (vsd.LoRA, whose down projection is a conv too) runs as a conv on (B, C, HW, 1)."""
        if isinstance(layer, nn.Conv2d):
            return F.linear(x, layer.weight[:, :, 0, 0], layer.bias)
        if self.linear_proj:
            return layer(x)
        return layer(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)

    def forward(self, x, context, mask=None):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self._proj(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        h = self._proj(self.proj_out, h)
        return x + h.transpose(1, 2).unflatten(2, (H, W))  # (B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # the VAE pads asymmetrically: right and bottom only
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


# Nearest 2x upsampling then a 3x3 conv, folded into a stride-2 transposed conv with a 4x4 kernel:
# output row 2i+a sees input rows (i-1, i) through kernel rows (0, 1+2) when a = 0, and rows
# (i, i+1) through kernel rows (0+1, 2) when a = 1. In conv_transpose2d(stride=2, padding=1) input
# row j reaches output row 2j - 1 + k through tap k, so tap k takes these 3x3 kernel rows:
UPSAMPLE_FOLD = torch.tensor([[0., 0., 1.],   # k = 0: row 2 (a = 1, input row i+1)
                              [0., 1., 1.],   # k = 1: rows 1+2 (a = 0, input row i)
                              [1., 1., 0.],   # k = 2: rows 0+1 (a = 1, input row i)
                              [1., 0., 0.]])  # k = 3: row 0 (a = 0, input row i-1)


class FoldedUpsample(Upsample):
    """The same function as Upsample, computed as one transposed conv of the input (UPSAMPLE_FOLD):
    16 multiply-adds per channel pair and input pixel instead of 36, and no upsampled copy of the
    input. It pays on the VAE decoder's large maps (2.5 of the 3.3 TFLOP of a one-step 512x512
    image); on the UNet's small maps with 1280 channels the 16/9 larger folded weight costs more
    than it saves."""

    def forward(self, x):
        fold, w = UPSAMPLE_FOLD.to(x.device), self.conv.weight
        w = torch.einsum('kr,ls,oirs->iokl', fold, fold, w.float()).to(w.dtype)  # (Cin, Cout, 4, 4)
        return F.conv_transpose2d(x, w, self.conv.bias, stride=2, padding=1)


class Level(nn.Module):
    """One resolution level of the UNet: resnets, each optionally followed by a spatial
    transformer, then a down- or up-sampler. (`downsamplers`/`upsamplers` are lists of one, as
    in the checkpoints.)"""

    def __init__(self, in_chs, cout, emb_dim, heads, cfg, attn, down=False, up=False, depth=1):
        super().__init__()
        g = cfg.norm_groups
        self.resnets = nn.ModuleList([ResBlock(c, cout, emb_dim, g, 1e-5) for c in in_chs])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(cout, heads, cfg.context_dim, cfg.linear_proj, g, depth) for _ in in_chs] if attn else [])
        if down:
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def layer(self, i, x, emb, context, mask):
        x = self.resnets[i](x, emb)
        return self.attentions[i](x, context, mask) if len(self.attentions) else x


def run(module, fn, *args):
    """fn(*args), recomputed in the backward pass when the module has gradient checkpointing on."""
    if getattr(module, 'grad_checkpointing', False) and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg, self.grad_checkpointing = cfg, False
        C, L, emb_dim = cfg.channels, cfg.layers_per_block, 4 * cfg.channels[0]
        self.conv_in = nn.Conv2d(cfg.in_channels, C[0], 3, padding=1)
        self.time_embedding = TimestepMLP(C[0], emb_dim)
        if cfg.addition_embed == 'text_time':  # SDXL: pooled text (pooled_dim) + 6 ids, each a sinusoid
            self.add_embedding = TimestepMLP(cfg.pooled_dim + 6 * cfg.addition_time_dim, emb_dim)
        elif cfg.addition_embed is not None:
            raise ValueError(f"unknown addition_embed {cfg.addition_embed!r}: expected None or 'text_time'")
        # Build the down path while keeping a stack of skip-connection widths, which the up path pops.
        ch, skips = C[0], [C[0]]
        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(C):
            last = i == len(C) - 1
            self.down_blocks.append(Level([ch] + [cout] * (L - 1), cout, emb_dim, cfg.heads[i], cfg,
                                          cfg.attn_levels[i], down=not last, depth=cfg.depth(i)))
            ch = cout
            skips += [cout] * (L + (not last))
        self.mid_block = Level([ch, ch], ch, emb_dim, cfg.heads[-1], cfg, attn=False)
        self.mid_block.attentions.append(SpatialTransformer(ch, cfg.heads[-1], cfg.context_dim, cfg.linear_proj,
                                                            cfg.norm_groups, cfg.mid_depth))
        self.up_blocks = nn.ModuleList()
        for i, cout in enumerate(reversed(C)):
            level = len(C) - 1 - i
            in_chs = []
            for _ in range(L + 1):
                in_chs.append(ch + skips.pop())
                ch = cout
            self.up_blocks.append(Level(in_chs, cout, emb_dim, cfg.heads[level], cfg, cfg.attn_levels[level],
                                        up=level > 0, depth=cfg.depth(level)))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, C[0], eps=1e-5)
        self.conv_out = nn.Conv2d(C[0], cfg.out_channels, 3, padding=1)

    def text_time(self, added):
        """SDXL's added conditioning: the pooled text, then each size/crop id as a sinusoid."""
        if added is None or added.shape[-1] != self.cfg.pooled_dim + 6:
            raise ValueError(f"this UNet needs `added`: the pooled text embedding ({self.cfg.pooled_dim}) and 6 "
                             f"size/crop ids, concatenated; got {None if added is None else tuple(added.shape)}")
        pooled, ids = added[:, :-6], added[:, -6:]
        ids = timestep_embedding(ids.flatten(), self.cfg.addition_time_dim).reshape(len(added), -1)  # (B, 6*256)
        return torch.cat([pooled.float(), ids], dim=-1)

    def forward(self, x, t, context, mask=None, added=None):
        """x: (B, in, H, W) noisy input; t: (B,) timesteps; context: (B, L, context_dim) text
        embeddings; added (SDXL): the pooled text embedding and the 6 size/crop ids, concatenated
        (B, pooled_dim + 6) (see `sdxl_added`). Returns the network output of shape (B, out, H, W)."""
        emb = self.time_embedding(timestep_embedding(t, self.cfg.channels[0]).to(x.dtype))
        if self.cfg.addition_embed is not None:
            emb = emb + self.add_embedding(self.text_time(added).to(x.dtype))
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                x = run(self, block.layer, i, x, emb, context, mask)
                skips.append(x)
            if hasattr(block, 'downsamplers'):
                x = block.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block.resnets[0](x, emb)
        x = self.mid_block.attentions[0](x, context, mask)
        x = self.mid_block.resnets[1](x, emb)
        for block in self.up_blocks:
            for i in range(len(block.resnets)):
                x = run(self, block.layer, i, torch.cat([x, skips.pop()], dim=1), emb, context, mask)
            if hasattr(block, 'upsamplers'):
                x = block.upsamplers[0](x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# -----------------------------------------------------------------------------
# PixArt-alpha DiT


@dataclass
class DiTConfig:
    in_channels: int = 4
    out_channels: int = 8             # learned sigma: the first in_channels are the prediction
    depth: int = 28
    heads: int = 16
    head_dim: int = 72
    patch_size: int = 2
    caption_channels: int = 4096      # T5-v1.1-XXL width
    sample_size: int = 64             # latent size the positions were trained at
    interpolation_scale: float = 1.0  # PixArt stretches positions for larger models
    size_conditioning: bool = False   # the 1024 model embeds resolution and aspect ratio

    @property
    def dim(self):
        return self.heads * self.head_dim


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def sincos_2d(dim, h, w, base_size, interpolation_scale):
    """PixArt's fixed 2-D positions, (h*w, dim): sin-cos of the column, then of the row,
    with coordinates measured in units of the training grid (base_size) / interpolation_scale."""
    def axis(n, d):
        pos = torch.arange(n, dtype=torch.float64) / (n / base_size) / interpolation_scale
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (n, d)
    col = axis(w, dim // 2)[None, :, :].expand(h, w, dim // 2)
    row = axis(h, dim // 2)[:, None, :].expand(h, w, dim // 2)
    return torch.cat([col, row], dim=-1).reshape(h * w, dim).float()


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        p, cfg = self.cfg.patch_size, self.cfg
        pos = sincos_2d(cfg.dim, x.shape[-2] // p, x.shape[-1] // p, cfg.sample_size // p, cfg.interpolation_scale)
        return self.proj(x).flatten(2).transpose(1, 2) + pos.to(x)  # (B, N, D)


class AdaLNSingle(nn.Module):
    """PixArt's adaLN-single: one timestep MLP shared by all blocks, giving 6 modulation vectors
    (each block adds its own learned table). The 1024 model adds size embeddings."""

    def __init__(self, dim, size_conditioning):
        super().__init__()
        self.timestep_embedder = TimestepMLP(256, dim)
        if size_conditioning:
            self.resolution_embedder = TimestepMLP(256, dim // 3)
            self.aspect_ratio_embedder = TimestepMLP(256, dim // 3)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t, resolution=None, aspect_ratio=None):
        emb = self.timestep_embedder(timestep_embedding(t, 256))  # (B, D)
        if hasattr(self, 'resolution_embedder'):
            B = t.shape[0]
            res = self.resolution_embedder(timestep_embedding(resolution.flatten(), 256)).reshape(B, -1)
            ar = self.aspect_ratio_embedder(timestep_embedding(aspect_ratio.flatten(), 256)).reshape(B, -1)
            emb = emb + torch.cat([res, ar], dim=1)
        return self.linear(F.silu(emb)), emb  # (B, 6D) block modulation, (B, D) for the final layer


class CaptionProjection(nn.Module):
    def __init__(self, cin, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate='tanh'))


class DiTBlock(nn.Module):
    """Self-attention and MLP modulated by adaLN-single; cross-attention with no norm, no gate."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn1 = Attention(D, cfg.heads, qkv_bias=True)
        self.attn2 = Attention(D, cfg.heads, context_dim=D, qkv_bias=True)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(D, gated=False)
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D ** 0.5)

    def forward(self, x, t6, context, mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table[None] + t6).chunk(6, dim=1)
        x = x + gate1 * self.attn1(modulate(self.norm1(x), shift1, scale1))
        x = x + self.attn2(x, context, mask)
        return x + gate2 * self.ff(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg, self.grad_checkpointing = cfg, False
        D = cfg.dim
        self.pos_embed = PatchEmbed(cfg)
        self.adaln_single = AdaLNSingle(D, cfg.size_conditioning)
        self.caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D ** 0.5)
        self.proj_out = nn.Linear(D, cfg.patch_size ** 2 * cfg.out_channels)

    def forward(self, x, t, context, mask=None, resolution=None, aspect_ratio=None):
        """x: (B, C, H, W); t: (B,); context: (B, L, caption_channels) T5 states; mask: (B, L) bool.
        The 1024 model also takes resolution (B, 2) as (height, width) and aspect_ratio (B, 1).
        Returns (B, out_channels, H, W)."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        if self.cfg.size_conditioning and resolution is None:  # default: the image's own size
            resolution = torch.tensor([[H * 8.0, W * 8.0]], device=x.device).expand(B, 2)
            aspect_ratio = torch.tensor([[H / W]], device=x.device).expand(B, 1)
        x = self.pos_embed(x)                                     # (B, N, D)
        t6, t_emb = self.adaln_single(t, resolution, aspect_ratio)
        t6 = t6.to(x.dtype).unflatten(1, (6, -1))                 # (B, 6, D)
        context = self.caption_projection(context)
        for block in self.transformer_blocks:
            x = run(self, block, x, t6, context, mask)
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None].to(x.dtype)).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, N, p*p*out)
        return rearrange(x, 'b (h w) (p q c) -> b c (h p) (w q)', h=H // p, p=p, q=p)


# -----------------------------------------------------------------------------
# VAE (AutoencoderKL)


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215


class VAEAttention(Attention):
    """Single-head self-attention over all pixels, with its own GroupNorm and residual."""

    def __init__(self, ch, groups):
        super().__init__(ch, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)

    def forward(self, x):
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        return x + super().forward(h).transpose(1, 2).unflatten(2, x.shape[2:])


class VAEMid(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, 0, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAELevel(nn.Module):
    def __init__(self, in_chs, cout, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(c, cout, 0, groups, 1e-6) for c in in_chs])
        if down:
            self.downsamplers = nn.ModuleList([Downsample(cout, padding=0)])
        if up:
            self.upsamplers = nn.ModuleList([FoldedUpsample(cout)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for sampler in getattr(self, 'downsamplers', []) or getattr(self, 'upsamplers', []):
            x = sampler(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        C, L, g = cfg.channels, cfg.layers_per_block, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, C[0], 3, padding=1)
        ins = (C[0],) + tuple(C[:-1])
        self.down_blocks = nn.ModuleList([VAELevel([cin] + [cout] * (L - 1), cout, g, down=i < len(C) - 1)
                                          for i, (cin, cout) in enumerate(zip(ins, C))])
        self.mid_block = VAEMid(C[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, C[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(C[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        C, L, g = tuple(reversed(cfg.channels)), cfg.layers_per_block, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, C[0], 3, padding=1)
        self.mid_block = VAEMid(C[0], g)
        ins = (C[0],) + C[:-1]
        self.up_blocks = nn.ModuleList([VAELevel([cin] + [cout] * L, cout, g, up=i < len(C) - 1)
                                        for i, (cin, cout) in enumerate(zip(ins, C))])
        self.conv_norm_out = nn.GroupNorm(g, C[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(C[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """Images in [-1, 1] <-> latents already multiplied by the scaling factor."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x, generator=None):
        """Samples the posterior; generator=False returns its mean."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        if generator is not False:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn(mean.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean * self.cfg.scaling_factor

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z / self.cfg.scaling_factor))


class PixelSpace(nn.Module):
    """The 'VAE' of pixel-space models (the shapes world): the identity on [-1, 1] images."""

    def encode(self, x, generator=None):
        return x

    def decode(self, z):
        return z


# -----------------------------------------------------------------------------
# Noise schedule


@dataclass
class Schedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = 'scaled_linear'  # or 'linear'
    prediction_type: str = 'epsilon'      # or 'v_prediction', 'sample' (x0), 'flow' (rectified flow)


PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample', 'flow')


class NoiseSchedule(nn.Module):
    """Variance-preserving forward process x_t = alpha_t x0 + sigma_t eps, alpha_t^2 = alphas_cumprod[t],
    and the conversions between the network output (eps or v), x0 and eps."""

    def __init__(self, s: Schedule):
        super().__init__()
        if s.beta_schedule == 'scaled_linear':
            betas = torch.linspace(s.beta_start ** 0.5, s.beta_end ** 0.5, s.num_train_timesteps, dtype=torch.float64) ** 2
        elif s.beta_schedule == 'linear':
            betas = torch.linspace(s.beta_start, s.beta_end, s.num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta_schedule {s.beta_schedule!r}: expected 'scaled_linear' or 'linear'")
        if s.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {s.prediction_type!r}: expected one of {PREDICTION_TYPES}")
        self.config = s
        self.register_buffer('alphas_cumprod', torch.cumprod(1 - betas, 0).float(), persistent=False)

    @property
    def T(self):
        return self.config.num_train_timesteps

    def alpha_sigma(self, t, ndim=4):
        """alpha_t and sigma_t for integer timesteps t (B,), shaped to broadcast over (B, ...)."""
        a = self.alphas_cumprod[t].reshape(-1, *([1] * (ndim - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0, eps, t):
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return alpha.to(x0.dtype) * x0 + sigma.to(x0.dtype) * eps

    def x0_eps(self, out, x_t, t):
        """(x0, eps) from the network output at x_t."""
        kind = self.config.prediction_type
        if kind == 'flow':  # rectified flow (InstaFlow): x_t = s eps + (1 - s) x0, s = t / T, out = v = x0 - eps
            s = (t.to(x_t.dtype) / self.T).reshape(-1, *([1] * (x_t.ndim - 1)))
            return x_t + s * out, x_t - (1 - s) * out
        alpha, sigma = (s.to(x_t.dtype) for s in self.alpha_sigma(t, x_t.ndim))
        if kind == 'epsilon':
            return (x_t - sigma * out) / alpha, out
        if kind == 'sample':
            return out, (x_t - alpha * out) / sigma
        return alpha * x_t - sigma * out, sigma * x_t + alpha * out  # v = alpha eps - sigma x0

    def target(self, x0, eps, t):
        """What the network is trained to output."""
        if self.config.prediction_type == 'epsilon':
            return eps
        if self.config.prediction_type == 'sample':
            return x0
        if self.config.prediction_type == 'flow':
            raise ValueError("a rectified-flow network is not trained by this project's objective")
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return alpha.to(x0.dtype) * eps - sigma.to(x0.dtype) * x0


# -----------------------------------------------------------------------------
# Text encoders (transformers)


class TextEncoder(nn.Module):
    """A checkpoint's tokenizer and text model, loaded from its text_encoder/ and tokenizer/ folders.

    CLIP (SD): last_hidden_state; a checkpoint that uses the penultimate layer (SD2) ships a text
    encoder truncated by one layer, so its own config selects the layer. No mask: SD attends to
    padding. T5 (PixArt): 120 tokens and their attention mask, which the DiT uses.
    SDXL (text_encoder_2/ and tokenizer_2/ beside them): CLIP ViT-L and OpenCLIP bigG, each one's
    penultimate hidden states, concatenated (768 + 1280 = 2048); the pooled vector is the second
    encoder's projected output (`encode`).
    """

    def __init__(self, folder):
        super().__init__()
        import transformers
        folder = Path(folder)
        for sub in ('text_encoder', 'tokenizer'):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"{folder} has no {sub}/ folder: a checkpoint needs its text encoder and tokenizer")
        model_type = json.loads((folder / 'text_encoder' / 'config.json').read_text()).get('model_type', '')
        self.is_t5 = model_type.startswith('t5')
        model_cls = transformers.T5EncoderModel if self.is_t5 else transformers.CLIPTextModel
        transformers.utils.logging.disable_progress_bar()  # stderr stays for warnings and errors
        self.model = model_cls.from_pretrained(folder / 'text_encoder').requires_grad_(False).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder / 'tokenizer')
        self.max_length = 120 if self.is_t5 else self.tokenizer.model_max_length
        self.model_2 = self.tokenizer_2 = None
        if (folder / 'text_encoder_2').is_dir() or (folder / 'tokenizer_2').is_dir():
            for sub in ('text_encoder_2', 'tokenizer_2'):
                if not (folder / sub).is_dir():
                    raise FileNotFoundError(f"{folder} has no {sub}/ folder: an SDXL checkpoint needs both text "
                                            "encoders and both tokenizers")
            self.model_2 = transformers.CLIPTextModelWithProjection.from_pretrained(
                folder / 'text_encoder_2').requires_grad_(False).eval()
            self.tokenizer_2 = transformers.AutoTokenizer.from_pretrained(folder / 'tokenizer_2')

    @property
    def dim(self):
        if self.model_2 is not None:
            return self.model.config.hidden_size + self.model_2.config.hidden_size
        return self.model.config.hidden_size if not self.is_t5 else self.model.config.d_model

    def too_long(self, prompts):
        """[(prompt, its token count)] of the prompts the tokenizer cuts at max_length."""
        ids = self.tokenizer(list(prompts), truncation=False, verbose=False).input_ids
        return [(p, len(i)) for p, i in zip(prompts, ids) if len(i) > self.max_length]

    def _ids(self, tokenizer, prompts, max_length, device):
        return tokenizer(list(prompts), padding='max_length', max_length=max_length, truncation=True,
                         return_tensors='pt').to(device)

    @torch.no_grad()
    def encode(self, prompts):
        """list of n prompts -> (embeddings (n, L, dim), mask (n, L) bool or None for CLIP, pooled
        (n, pooled dim) for SDXL or None)."""
        device = next(self.model.parameters()).device
        tok = self._ids(self.tokenizer, prompts, self.max_length, device)
        if self.is_t5:
            mask = tok.attention_mask.bool()
            return self.model(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state, mask, None
        if self.model_2 is None:
            return self.model(tok.input_ids).last_hidden_state, None, None
        h1 = self.model(tok.input_ids, output_hidden_states=True).hidden_states[-2]
        out = self.model_2(self._ids(self.tokenizer_2, prompts, self.tokenizer_2.model_max_length, device).input_ids,
                           output_hidden_states=True)
        return torch.cat([h1, out.hidden_states[-2]], dim=-1), None, out.text_embeds  # (n, 77, 2048), (n, 1280)

    def forward(self, prompts):
        """list of n prompts -> (embeddings (n, L, dim), mask (n, L) bool, or None for CLIP)."""
        return self.encode(prompts)[:2]

    @torch.no_grad()
    def null(self):
        """The unconditional input of classifier-free guidance, as `encode` returns it for one prompt.
        SD and PixArt: the empty prompt, encoded. SDXL: zeros for the sequence and the pooled vector,
        as SDXL base's pipeline does for an absent negative prompt (diffusers' StableDiffusionXLPipeline,
        force_zeros_for_empty_prompt=True in stabilityai/stable-diffusion-xl-base-1.0's model_index.json;
        the original trainer dropped the text by zeroing its embeddings)."""
        if self.model_2 is None:
            return self.encode([''])
        w = next(self.model_2.parameters())
        zeros = torch.zeros(1, self.max_length, self.dim, device=w.device, dtype=w.dtype)
        return zeros, None, torch.zeros(1, self.model_2.config.projection_dim, device=w.device, dtype=w.dtype)


def sdxl_added(pooled, height, width, crop=(0, 0), original=None):
    """SDXL's added conditioning (B, pooled + 6): the pooled text embedding and the size/crop ids
    (original height, width, crop top, left, target height, width), in pixels. original: the
    training image's size the model is asked to imitate; None: the target size."""
    oh, ow = original or (height, width)
    ids = torch.tensor([oh, ow, crop[0], crop[1], height, width], dtype=pooled.dtype, device=pooled.device)
    return torch.cat([pooled, ids.expand(len(pooled), 6)], dim=-1)


# -----------------------------------------------------------------------------
# Presets and the project's checkpoint files


PRESETS = {
    'sd15': UNetConfig(),
    'sd21': UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True),
    'sd21_768': UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, sample_size=96),
    'sd_turbo': UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True),
    'tiny_unet': UNetConfig(channels=(32, 64), attn_levels=(False, True), heads=(2, 2), layers_per_block=1,
                            context_dim=32, sample_size=16),
    'shapes': UNetConfig(in_channels=3, out_channels=3, channels=(32, 64, 64), attn_levels=(False, True, True),
                         heads=(4, 4, 4), layers_per_block=1, context_dim=64, norm_groups=8, sample_size=32),
    # SDXL base (and SDXL-Turbo, DMD2, Lightning, Hyper-SD): no attention at the first level, 1/2/10
    # transformer blocks per level and 10 in the mid block, 64-wide heads, 2048-wide context (CLIP-L + bigG).
    'sdxl': UNetConfig(channels=(320, 640, 1280), attn_levels=(False, True, True), heads=(5, 10, 20),
                       context_dim=2048, linear_proj=True, sample_size=128, transformer_depth=(1, 2, 10),
                       mid_depth=10, addition_embed='text_time', pooled_dim=1280),
    'sdxl_turbo': UNetConfig(channels=(320, 640, 1280), attn_levels=(False, True, True), heads=(5, 10, 20),
                             context_dim=2048, linear_proj=True, sample_size=64, transformer_depth=(1, 2, 10),
                             mid_depth=10, addition_embed='text_time', pooled_dim=1280),  # SDXL at 512 px
    'tiny_sdxl': UNetConfig(channels=(32, 64), attn_levels=(False, True), heads=(2, 2), layers_per_block=1,
                            context_dim=64, linear_proj=True, sample_size=16, transformer_depth=(1, 2), mid_depth=2,
                            addition_embed='text_time', addition_time_dim=8, pooled_dim=32),
    'pixart_alpha_512': DiTConfig(),
    'pixart_alpha_1024': DiTConfig(sample_size=128, interpolation_scale=2.0, size_conditioning=True),
    'tiny_dit': DiTConfig(depth=2, heads=2, head_dim=16, caption_channels=32, sample_size=16),
    # The shapes world's second backbone: a pixel-space DiT on 32x32x3 in 4x4 patches (64 tokens),
    # cross-attending to the world's 64-wide CLIP text states; no learned sigma. About the UNet's
    # size (1.8M weights); 2x2 patches at width 64 (0.46M) denoised worse at every t and took twice
    # as long per step.
    'shapes_dit': DiTConfig(in_channels=3, out_channels=3, depth=6, heads=4, head_dim=32, patch_size=4,
                            caption_channels=64, sample_size=32),
    'sd_vae': VAEConfig(),
    'sdxl_vae': VAEConfig(scaling_factor=0.13025),  # SD's layout; the SDXL VAE overflows in float16
    'tiny_vae': VAEConfig(channels=(32, 64), layers_per_block=1),
}
SCHEDULES = {
    'sd': Schedule(),
    'sd_v': Schedule(prediction_type='v_prediction'),
    'pixart': Schedule(beta_start=1e-4, beta_end=0.02, beta_schedule='linear'),
}
ARCHS = {UNetConfig: (UNet, 'unet'), DiTConfig: (DiT, 'dit'), VAEConfig: (VAE, 'vae')}


def build(cfg):
    """The network for a config (UNetConfig, DiTConfig or VAEConfig)."""
    return ARCHS[type(cfg)][0](cfg)


def save_module(module, path):
    """Weights to safetensors, with the architecture and config in the file's metadata."""
    cls, arch = ARCHS[type(module.cfg)]
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={'arch': arch, 'config': json.dumps(asdict(module.cfg))})


class CheckpointError(UserError):
    """A checkpoint file or folder that cannot be used; the message names it and what it looked like."""


def looks_like(path):
    """What a file that is not a readable safetensors file looks like, in a few words."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(64)
    if size == 0:
        return 'an empty file'
    if head.startswith(b'version https://git-lfs'):
        return 'a Git LFS pointer, not the weights (run git lfs pull)'
    if head[:2] == b'PK' or head[:1] == b'\x80':
        return 'a torch pickle (convert it with convert.py)'
    n = int.from_bytes(head[:8], 'little') if len(head) >= 8 else 0
    if head[8:9] != b'{':
        kind = 'text' if head.isascii() else 'binary data'
        return f"{size} bytes of {kind} starting {head[:16]!r}, not safetensors"
    if 8 + n > size:
        return f"a truncated safetensors file ({size} bytes; its header alone needs {8 + n})"
    try:
        with open(path, 'rb') as f:
            f.seek(8)
            header = json.loads(f.read(n))
        end = 8 + n + max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
    except (ValueError, KeyError, TypeError):
        return f"a safetensors file whose header is damaged ({size} bytes)"
    if end > size:
        return f"a truncated safetensors file ({size} of its {end} bytes)"
    return f"a damaged safetensors file ({size} bytes)"


def read_safetensors(path):
    """(tensors, metadata) of a safetensors file, or a CheckpointError naming what the file looked like."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception:  # safetensors raises its own error types, and OSError for a missing file
        if not Path(path).is_file():
            raise CheckpointError(f"{path} is missing (the checkpoint folder is incomplete: write it again)") from None
        raise CheckpointError(f"{path} cannot be read: it is {looks_like(path)} (write it again, or use another "
                              "checkpoint)") from None


def check_finite(tensors, path):
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or infinity ({', '.join(bad[:2])}"
                              f"{', ...' if len(bad) > 2 else ''}): the weights are damaged, perhaps by a diverged "
                              "training (use an earlier checkpoint)")


def config_from_metadata(path, meta=None):
    if meta is None:
        meta = read_safetensors(path)[1]
    kinds = {arch: cfg_cls for cfg_cls, (_, arch) in ARCHS.items()}
    if meta.get('arch') not in kinds:
        raise CheckpointError(f"{path} carries no network config in its metadata: was it written by convert.py or "
                              "train.py? (convert a downloaded model with convert.py)")
    cfg = json.loads(meta['config'])
    return kinds[meta['arch']](**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def load_module(path, device='cpu', dtype=torch.float32):
    """A network saved by save_module, loaded strictly; its weights must be finite."""
    state, meta = read_safetensors(path)
    cfg = config_from_metadata(path, meta)
    check_finite(state, path)
    with torch.device('meta'):  # no random init of weights about to be overwritten
        module = build(cfg)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the {type(cfg).__name__} in its own metadata: "
                              f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e} "
                              "(write it again with convert.py)") from None
    return module.to(device=device, dtype=dtype)


@dataclass
class Pipeline:
    """Everything one checkpoint folder holds: the denoiser, the VAE (or pixel space), the noise
    schedule and the text encoder."""
    denoiser: nn.Module
    vae: nn.Module
    schedule: NoiseSchedule
    text_encoder: TextEncoder = None
    student_t: int = None  # a one-step student's start timestep; None for a multi-step model
    student_noise: str = 'unit'  # 'sigma': its noise is scaled by sigma at the start (vsd.student_generate)


STUDENT_NOISE = ('unit', 'sigma')  # how a one-step model's start noise is scaled (Pipeline.student_noise)


def finish_interrupted_save(folder):
    """Completes or undoes a save_checkpoint that was killed. The new folder (.tmp) is whole once the
    old one has moved aside (.old), so with both and no folder the save is completed; a .tmp alone is
    a partial write and goes; an .old beside a whole folder is what was left to delete.
    Returns what it did, in words, or None."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + '.tmp'), folder.with_name(folder.name + '.old')
    done = None
    if not folder.exists() and tmp.is_dir() and old.is_dir():
        tmp.rename(folder)
        done = f"completed the interrupted save of {folder}"
    elif not folder.exists() and old.is_dir():
        old.rename(folder)
        done = f"restored {folder} from {old.name}, left by an interrupted save"
    for leftover in (tmp, old):
        if leftover.is_dir():
            shutil.rmtree(leftover)
            done = done or f"removed {leftover.name}, left by an interrupted save of {folder}"
    return done


TEXT_PARTS = ('text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2')  # SDXL has the last two


def save_checkpoint(folder, denoiser, vae, schedule, text_folder=None, student_t=None, student_noise='unit'):
    """The project's checkpoint folder: denoiser.safetensors, vae.safetensors (none in pixel space),
    schedule.json, text_encoder/ + tokenizer/ copied from text_folder (transformers' layout) and, for
    a one-step student, the timestep it starts from (in schedule.json).
    Written beside the target and renamed into place, so a failed save leaves the old one whole."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file: a checkpoint folder would replace it (pass another path)")
    finish_interrupted_save(folder)
    tmp = folder.with_name(folder.name + '.tmp')
    tmp.mkdir(parents=True)
    save_module(denoiser, tmp / 'denoiser.safetensors')
    if isinstance(vae, VAE):
        save_module(vae, tmp / 'vae.safetensors')
    meta = {} if student_t is None else {'student_t': student_t if 0 <= student_t <= schedule.T else student_t % schedule.T}
    if student_noise != 'unit':
        meta['student_noise'] = student_noise
    (tmp / 'schedule.json').write_text(json.dumps({**asdict(schedule.config), **meta}, indent=2))
    if text_folder is not None:
        for sub in TEXT_PARTS:
            if sub in TEXT_PARTS[:2] or (Path(text_folder) / sub).is_dir():
                shutil.copytree(Path(text_folder) / sub, tmp / sub)
    swap_into_place(tmp, folder)


def swap_into_place(tmp, folder):
    """folder.tmp, written whole, becomes folder; the one it replaces moves aside to folder.old first.
    A kill anywhere leaves what finish_interrupted_save completes or undoes."""
    old = folder.with_name(folder.name + '.old')
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def read_schedule(folder):
    """(Schedule, student_t or None, student_noise) from a checkpoint folder's schedule.json."""
    path = Path(folder) / 'schedule.json'
    try:
        sched = json.loads(path.read_text())
        student_t, noise = sched.pop('student_t', None), sched.pop('student_noise', 'unit')
        schedule = Schedule(**sched)
        NoiseSchedule(schedule)  # its fields are checked here
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no schedule.json (the checkpoint folder is incomplete: write it "
                              "again with convert.py)") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a schedule this project reads: {str(e).splitlines()[0]} (write it "
                              "again with convert.py)") from None
    if student_t is not None and not (isinstance(student_t, int) and 0 <= student_t <= schedule.num_train_timesteps):
        raise CheckpointError(f"{path}: student_t={student_t!r} is not a timestep of the schedule (0 to "
                              f"{schedule.num_train_timesteps}; write it again with convert.py)")
    if noise not in STUDENT_NOISE:
        raise CheckpointError(f"{path}: student_noise={noise!r} is not one of {', '.join(STUDENT_NOISE)} (write it "
                              "again with convert.py)")
    return schedule, student_t, noise


def check_parts(folder, denoiser, vae, text_dim=None):
    """The denoiser fits the VAE's latents and the text encoder's width (a file from another model
    would fail deep inside a matmul otherwise)."""
    cfg = denoiser.cfg
    latent = vae.cfg.latent_channels if isinstance(vae, VAE) else 3
    what = 'vae.safetensors' if isinstance(vae, VAE) else 'pixel space (no vae.safetensors)'
    if cfg.in_channels != latent:
        raise CheckpointError(f"{folder}: denoiser.safetensors takes {cfg.in_channels} channels but {what} has "
                              f"{latent}: the two come from different models (convert the model again)")
    width = cfg.context_dim if isinstance(cfg, UNetConfig) else cfg.caption_channels
    if text_dim is not None and width != text_dim:
        raise CheckpointError(f"{folder}: denoiser.safetensors reads {width}-wide text embeddings but text_encoder/ "
                              f"gives {text_dim}: the two come from different models (convert the model again)")


def load_checkpoint(folder, device='cpu', dtype=torch.float32, text=True):
    """A folder written by save_checkpoint (convert.py and train.py write them)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} not found: pass a folder written by convert.py or train.py")
    if not (folder / 'denoiser.safetensors').is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder (no denoiser.safetensors): "
                              "convert a downloaded model with `python convert.py SRC OUT` first")
    schedule, student_t, noise = read_schedule(folder)
    denoiser = load_module(folder / 'denoiser.safetensors', device, dtype).eval()
    vae_path = folder / 'vae.safetensors'
    vae = load_module(vae_path, device, dtype).eval() if vae_path.is_file() else PixelSpace()
    check_parts(folder, denoiser, vae)
    text_encoder = None
    if text:
        try:
            text_encoder = TextEncoder(folder).to(device)
        except (OSError, ValueError) as e:  # FileNotFoundError, transformers' errors on a broken folder
            if isinstance(e, FileNotFoundError):
                raise CheckpointError(one_line(e)) from None
            raise CheckpointError(f"{folder}: its text encoder cannot be loaded: {one_line(e)} (copy text_encoder/ "
                                  "and tokenizer/ again from the model it came with)") from None
        check_parts(folder, denoiser, vae, text_encoder.dim)
    return Pipeline(denoiser, vae, NoiseSchedule(schedule).to(device), text_encoder, student_t, noise)
