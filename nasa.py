"""
NASA, Negative-Away Steer Attention (SNOOPI, arXiv 2412.02687): training-free negative prompts for
one-step models. In each cross-attention layer the same queries attend to the positive prompt and
to the negative prompt, and the negative result is subtracted:

    Z_NASA = Attn(Q, K+, V+) - alpha * Attn(Q, K-, V-)

The network is handed both prompts stacked on a pair dimension, context (B, 2, L, C) and mask
(B, 2, L) (see `pair`); every cross-attention layer then receives keys and values (B, 2, L, D),
projected by its own to_k/to_v, and the processor below does both attentions in one call. The DiT's
caption projection is applied per token, so the negative T5 states go through it as well, each
prompt with its own mask.
"""
import torch

from model import attention

# NASA scale alpha per backbone (SNOOPI, Table 8).
PAPER_ALPHA = {
    'sd15': 0.04,              # PG-SB SD1.5 (DMD2-SD1.5 also 0.04)
    'sd21': 0.30,              # PG-SB SD2.1
    'sd_turbo': 0.30,          # SwiftBrush v2 / SD-Turbo family (SBv2 0.30)
    'pixart_alpha_512': 0.80,  # PG-SB PixArt-alpha (DMD-PixArt: 0.45)
    'shapes': 0.30,            # this project's shapes world: the best of a sweep (README)
}


def default_alpha(denoiser):
    """The paper's alpha for a network, recognised by its architecture."""
    cfg = denoiser.cfg
    if cfg.in_channels == 3:                       # pixel space: the shapes world
        return PAPER_ALPHA['shapes']
    if not hasattr(cfg, 'context_dim'):            # a DiT
        return PAPER_ALPHA['pixart_alpha_512']
    return PAPER_ALPHA['sd15' if cfg.context_dim == 768 else 'sd21']


class NASA:
    """Cross-attention processor computing Z+ - alpha Z-. With alpha == 0 it attends to the
    positive prompt alone, exactly as plain attention would."""

    def __init__(self, alpha):
        if alpha < 0:
            raise ValueError(f"NASA scale must be >= 0, got {alpha}: it weights a subtraction")
        self.alpha = alpha

    def __call__(self, attn, q, k, v, mask=None):
        # q: (B, N, D); k, v: (B, 2, L, D), positive then negative; mask: (B, 2, L) or None
        if self.alpha == 0:
            return attention(q, k[:, 0], v[:, 0], attn.heads, None if mask is None else mask[:, 0])
        B, _, L, D = k.shape
        q2 = q[:, None].expand(-1, 2, -1, -1).reshape(2 * B, -1, D)  # the same queries for both prompts
        m2 = None if mask is None else mask.reshape(2 * B, L)
        z = attention(q2, k.reshape(2 * B, L, D), v.reshape(2 * B, L, D), attn.heads, m2)
        z = z.unflatten(0, (B, 2))                                    # (B, 2, N, D)
        return z[:, 0] - self.alpha * z[:, 1]


def cross_attention_layers(model):
    return {name: m for name, m in model.named_modules() if getattr(m, 'is_cross', False)}


def enable(model, alpha, layers=None):
    """Put NASA in every cross-attention layer of `model` (UNet or DiT), or in those whose name
    contains one of `layers` (e.g. ['up_blocks'] or ['transformer_blocks.3.']). The other
    cross-attention layers still receive the stacked context and attend to the positive half."""
    found = cross_attention_layers(model)
    chosen = {name for name in found if layers is None or any(s in name for s in layers)}
    if not chosen:  # checked before any layer changes, so a bad name leaves the model as it was
        raise ValueError(f"no cross-attention layer matches {layers}: names look like "
                         f"{next(iter(found), '(none)')}")
    on, off = NASA(alpha), NASA(0.0)
    for name, module in found.items():
        module.processor = on if name in chosen else off
    return len(chosen)


def disable(model):
    for module in cross_attention_layers(model).values():
        module.processor = None


def pair(pos, neg, pos_mask=None, neg_mask=None):
    """Stack positive and negative text states (B, L, C) into the (B, 2, L, C) context NASA reads."""
    if neg.shape[0] == 1 and pos.shape[0] > 1:  # one negative prompt for the whole batch
        neg = neg.expand(pos.shape[0], -1, -1)
        neg_mask = None if neg_mask is None else neg_mask.expand(pos.shape[0], -1)
    context = torch.stack([pos, neg], dim=1)
    mask = None if pos_mask is None else torch.stack([pos_mask, neg_mask], dim=1)
    return context, mask
