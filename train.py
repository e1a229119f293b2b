"""
Distill a multi-step teacher into a one-step student with PG-SB (SNOOPI's Proper Guidance
SwiftBrush; the objective and the step are in vsd.py).

    python train.py                                          # the shapes world, on the CPU
    python train.py --preset shapes_pgsb                     # the same with PG-SB as the paper has it
    torchrun --nproc_per_node=8 train.py --preset sd21 --teacher CKPT --prompts prompts.txt

The same script runs alone and under torchrun (NCCL on CUDA, gloo on the CPU); --batch-size is the
global batch, split over the ranks.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
import model as M
import vsd
from vsd import option


@dataclass
class TrainConfig(vsd.VSDConfig):
    teacher: str = option('', 'teacher checkpoint folder (convert.py output); the student starts as its copy')
    prompts: str = option('', 'text file, one prompt per line')
    nasa_train: bool = option(False, "NASA-T (SNOOPI v3): the student generates with NASA against a negative prompt per sample, at alpha ~ U(0, nasa_alpha_max) drawn each iteration; the frozen teacher's CFG puts the negative in the unconditional slot; the LoRA teacher gets none")
    negative_prompts: str = option('', 'for --nasa-train: text file, one negative prompt per line; each rank draws its own per sample')
    nasa_alpha_max: float = option(1.0, "for --nasa-train: the upper end of the student's NASA scale (SNOOPI v3: 1)")
    out: str = option('runs/shapes', 'output folder: checkpoints, log.jsonl, validation grids, student/')
    steps: int = option(2000, 'training steps')
    batch_size: int = option(32, 'global batch size, split over the ranks')
    lr_student: float = option(1e-6, 'student learning rate')
    lr_lora: float = option(1e-3, 'LoRA teacher learning rate')
    lora_rank: int = option(64, 'LoRA rank')
    lora_alpha: float = option(128.0, 'LoRA scaling numerator: the update is scaled by alpha / rank')
    lora_targets: str = option('to_q,to_v', 'comma-separated names of the linear or convolution layers that get LoRA adapters')
    lr_schedule: str = option('constant', 'constant, or cosine: decay to zero after the warm-up')
    warmup: int = option(0, "steps over which the student's learning rate rises linearly from 0 (0: none, or cosine's 2%)")
    weight_decay: float = option(0.0, 'AdamW weight decay')
    grad_clip: float = option(1.0, 'gradient norm clipping (0: off)')
    ema: float = option(0.0, 'EMA decay of the student weights (0: no EMA)')
    grad_checkpointing: bool = option(None, "recompute the student's activations in its backward pass, to save memory; unset: on with CUDA (the plan's default, README), off on the CPU, where time, not memory, limits a run")
    frozen_bf16: bool = option(True, "with CUDA, hold the frozen networks' weights in bf16: the teacher's base, the VAE's and CLIP's linear and convolution weights (hold_bf16: the same numbers under autocast), the text encoders whole; the trained ones (student, LoRA adapters) stay fp32, and the CPU keeps fp32 throughout")
    channels_last: bool = option(False, 'convolution weights and activations in NHWC order (faster convolutions on CPUs)')
    clip: str = option('', 'CLIP folder (transformers CLIPModel) for the clamped CLIP loss')
    real_images: str = option('', "for --gan-weight: safetensors file whose 'images' tensor holds real images, uint8 (N, H, W, 3) at the student's image size (python shapes.py real-images OUT writes the shapes world's)")
    lr_gan: float = option(1e-3, "learning rate of the GAN term's classifier head (the LoRA teacher's layers under it learn at --lr-lora)")
    save_every: int = option(500, 'write a resumable checkpoint every N steps')
    keep: int = option(2, 'keep the last K checkpoints')
    log_every: int = option(10, 'append losses and kappa to log.jsonl every N steps')
    val_every: int = option(500, 'write a validation grid every N steps (0: off)')
    val_prompts: str = option('', "'|'-separated prompts for the validation grid ('' : the preset's)")
    resume: bool = option(False, 'continue from the latest checkpoint in --out')
    fsdp: bool = option(False, "under torchrun: shard the student's weights, gradients and AdamW moments over the ranks with torch's FSDP (fully_shard, one unit per block: fsdp_units); the LoRA adapters stay replicated under DDP; checkpoints are gathered whole")
    seed: int = option(0, 'random seed')
    device: str = option('', "device ('' : cuda if available, else cpu)")


# What every shapes-world preset shares. The attention-only LoRA of the paper cannot follow the student
# at 32x32, where this UNet has no attention: LoRA on the ResNet convolutions too. Memory is not what
# limits a CPU run: no recomputation in the LoRA teacher's backward.
SHAPES_WORLD = dict(teacher='checkpoints/shapes_teacher', prompts='checkpoints/shapes_prompts.txt', out='runs/shapes',
                    steps=600, batch_size=16, lora_rank=16, lora_alpha=32.0, lora_targets='to_q,to_v,conv1,conv2',
                    lora_updates=3, lora_grad_checkpointing=False, save_every=50, val_every=50,
                    val_prompts='a red circle|a green square|a blue triangle|a yellow circle|a magenta square|a cyan triangle')

PRESETS = {  # the paper's hyperparameters (SNOOPI Table 6); command-line flags override them
    'sd15': dict(steps=60000, batch_size=64, kappa_max=4.0, clip_weight=0.1,
                 val_prompts='a photo of a cat|a portrait of an astronaut|a bowl of fruit|a city at night'),
    'sd21': dict(steps=40000, batch_size=64, kappa_max=4.0, clip_weight=0.1,
                 val_prompts='a photo of a cat|a portrait of an astronaut|a bowl of fruit|a city at night'),
    # PixArt's alphas_cumprod[999] is ~4e-5: x0 = (z - sigma eps) / alpha would amplify the student's
    # error 150-fold, so the student starts lower, as public one-step PixArt students do.
    'pixart_alpha_512': dict(steps=60000, batch_size=64, kappa_max=3.0, clip_weight=0.1, student_t=400,
                             val_prompts='a photo of a cat|a portrait of an astronaut|a bowl of fruit|a city at night'),
    # SDXL base as the teacher (1024 px, its pooled text and size ids cached with the prompts). SNOOPI's
    # Table 6 trains no SDXL student: these are its SD2.1 values, the teacher's CFG range being alike.
    'sdxl': dict(steps=40000, batch_size=64, kappa_max=4.0, clip_weight=0.1,
                 val_prompts='a photo of a cat|a portrait of an astronaut|a bowl of fruit|a city at night'),
    # The shapes student (README, "The shapes world"). PG-SB's random kappa on both teachers falls into
    # black phases here and draws one image per prompt, so the shipped recipe keeps the random kappa on
    # the frozen teacher only and takes DMD2's parts for the rest: an unguided LoRA teacher with the native
    # loss and a fast rate on fresh samples, DMD's weighting, the regression term on 4x4 block means of
    # 768 teacher pairs, and an EMA of the student.
    'shapes': dict(SHAPES_WORLD, lr_student=2e-4, warmup=50, ema=0.99, lr_lora=3e-2, lora_loss='native',
                   lora_fresh=True, lora_kappa=1.0, vsd_weight='dmd', regression_weight=1.0, regression_pairs=768,
                   regression_steps=10, regression_pool=4),
    # PG-SB as the paper has it, random kappa on both teachers with SwiftBrush's LoRA loss: the shapes
    # preset until the recipe above replaced it, and the one the README's earlier runs add flags to.
    'shapes_pgsb': dict(SHAPES_WORLD, lr_student=1e-4, lr_lora=3e-3, lora_loss='swiftbrush'),
}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', default='shapes', choices=sorted(PRESETS),
                   help='hyperparameter preset (default: shapes); flags below override it')
    for f in fields(TrainConfig):
        flag = '--' + f.name.replace('_', '-')
        default = f'default: {f.default!r}'
        if f.name in PRESETS['shapes']:
            default += f"; the shapes preset's: {PRESETS['shapes'][f.name]!r}"
        text = f"{f.metadata['help']} ({default})".replace('%', '%%')  # argparse formats help with %
        if f.type is bool or f.type == 'bool':
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=type(f.default), default=None, help=text)
    args = p.parse_args(argv)
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None and k != 'preset'}}
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg


# The range of every number (cli.number's arguments); each float is also checked for being finite.
RANGES = {
    'steps': dict(low=1), 'batch_size': dict(low=1), 'lr_student': dict(low=0, low_open=True),
    'lr_lora': dict(low=0, low_open=True), 'lora_rank': dict(low=1), 'lora_alpha': dict(low=0, low_open=True),
    'warmup': dict(low=0), 'weight_decay': dict(low=0), 'grad_clip': dict(low=0), 'ema': dict(low=0, high=1, high_open=True),
    'save_every': dict(low=1), 'keep': dict(low=1), 'log_every': dict(low=1), 'val_every': dict(low=0),
    'seed': dict(low=0, high=2 ** 31 - 1), 'kappa_min': dict(low=0), 'kappa_fixed': dict(low=0), 'lora_kappa': dict(low=0), 't_min': dict(low=0), 't_anneal': dict(low=0),
    'null_prob': dict(low=0, high=1), 'lora_updates': dict(low=1), 'clip_weight': dict(low=0),
    'clip_tau': dict(low=-1, high=1), 'clip_warmup': dict(low=0), 'nasa_alpha_max': dict(low=0),
    'regression_weight': dict(low=0), 'regression_pairs': dict(low=1), 'regression_steps': dict(low=1),
    'regression_cfg': dict(low=0), 'regression_decay': dict(low=0), 'regression_pool': dict(low=1),
    'gan_weight': dict(low=0), 'gan_d_weight': dict(low=0), 'gan_t_max': dict(low=0), 'lr_gan': dict(low=0, low_open=True),
}


def check_config(cfg):
    """Every choice and number, before anything loads (timesteps against the schedule: in main)."""
    flag = lambda name: '--' + name.replace('_', '-')
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            cli.number(flag(f.name), value, **RANGES.get(f.name, {}))
    choices = {'random_kappa': sorted(vsd.RANDOM_KAPPA), 'lora_loss': list(vsd.LORA_LOSSES), 'vsd_weight': list(vsd.VSD_WEIGHTS),
               'lr_schedule': ['constant', 'cosine']}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise cli.UserError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    cli.number('--kappa-max', cfg.kappa_max, low=cfg.kappa_min, fix='kappa is drawn from [kappa_min, kappa_max]')
    cli.number('--t-max', cfg.t_max, low=cfg.t_min, fix='VSD draws t from [t_min, t_max]')
    if cfg.gan_t_max:
        cli.number('--gan-t-max', cfg.gan_t_max, low=cfg.t_min, high=cfg.t_max,
                   fix='the GAN term draws t from [t_min, gan_t_max]')
    if cfg.t_anneal:
        cli.number('--t-anneal-max', cfg.t_anneal_max, low=cfg.t_min, high=cfg.t_max,
                   fix='the annealed timesteps lie within [t_min, t_max]')
    if cfg.nasa_train and not cfg.negative_prompts:
        raise cli.UserError("--nasa-train needs --negative-prompts FILE (one negative prompt per line)")
    if cfg.negative_prompts and not cfg.nasa_train:
        raise cli.UserError("--negative-prompts applies to --nasa-train (pass --nasa-train, or drop --negative-prompts)")
    if cfg.gan_weight > 0 and not cfg.real_images:
        raise cli.UserError("--gan-weight needs --real-images FILE (real images for its classifier; python shapes.py "
                            "real-images OUT writes the shapes world's)")
    if cfg.real_images and not cfg.gan_weight > 0:
        raise cli.UserError("--real-images applies to the GAN term (pass --gan-weight W > 0, or drop --real-images)")
    if cfg.clip_weight > 0 and not cfg.clip:
        cli.warn('train.py', f"--clip-weight {cfg.clip_weight} without --clip: no CLIP loss (pass --clip DIR for it)")
    if cfg.device:
        cli.device('--device', cfg.device)
    if cfg.fsdp and cfg.ema > 0:
        raise cli.UserError("--fsdp with --ema is not supported (the EMA would need the whole student on every rank): drop one")


# -----------------------------------------------------------------------------
# Distributed set-up: `python train.py` is a world of one


def setup_distributed(device_arg):
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        rank, world, local = int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(device_arg or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda':
        device = torch.device('cuda', local)
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return ddp, rank, world, device


def all_reduce_mean(x, world):
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def ranks_agree(tensors, device):
    """True when every rank holds exactly rank 0's values: DDP should keep the replicas in step;
    checked once, at the end of a run, and written to the log."""
    same = True
    for t in tensors:
        ref = t.detach().clone()
        dist.broadcast(ref, 0)
        same &= torch.equal(ref, t.detach())
    flag = torch.tensor(float(same), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


FSDP_UNITS = ('resnets', 'transformer_blocks', 'downsamplers', 'upsamplers')


def shard_student(student):
    """The student sharded in place with torch's FSDP (fully_shard): each unit, then the rest."""
    from torch.distributed.fsdp import fully_shard
    for unit in fsdp_units(student):
        fully_shard(unit)
    fully_shard(student)
    return student


class UnitInputs(torch.autograd.Function):
    """The identity on a unit's inputs, one autograd node for all of them, as fully_shard puts on each
    unit it shards (see unit_boundaries)."""

    @staticmethod
    def forward(ctx, *inputs):
        return inputs

    @staticmethod
    def backward(ctx, *grads):
        return grads


def unit_boundaries(student):
    """The student's FSDP units (fsdp_units) made autograd boundaries as fully_shard makes them, for DDP:
    the gradient of an input a unit uses twice (a ResNet block's: its norm and its shortcut) is then
    summed inside the unit before a use outside it (a skip connection) is added, as under --fsdp, so
    the two sum every gradient in the same order and train the same weights to the bit."""
    def pre_forward(unit, args):
        wanted = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]
        if not wanted or not torch.is_grad_enabled():
            return None
        args = list(args)
        for i, a in zip(wanted, UnitInputs.apply(*(args[i] for i in wanted))):
            args[i] = a
        return tuple(args)
    for unit in fsdp_units(student):
        unit.register_forward_pre_hook(pre_forward)


def fsdp_units(net):
    """The blocks --fsdp shards one by one (each gathered for its own forward and backward): every
    ResNet block, transformer block, down- and upsampler; the rest (embeddings, the attention
    projections, the input and output layers) is the root's."""
    return [m for name, group in net.named_modules() if name.rsplit('.', 1)[-1] in FSDP_UNITS
            and isinstance(group, torch.nn.ModuleList) for m in group]


# -----------------------------------------------------------------------------
# Prompts: encoded once, cached as safetensors, each rank its own shard


def read_prompts(path, flag='--prompts', what='prompt'):
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise cli.UserError(f"{what} file {path} not found (pass {flag} FILE, one {what} per line)") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise cli.UserError(f"{what} file {path} is not a text file (pass a UTF-8 file, one {what} per line)") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise cli.UserError(f"{what} file {path} holds no {what}s (one per line)")
    return prompts


def cache_prompts(text_encoder, prompts, path, batch=64):
    """Encode `prompts` and the null prompt (TextEncoder.null) once; later runs read the file.
    Returns (prompts, context, mask or None, pooled or None, (null, null mask or None, null pooled
    or None)); the pooled text is SDXL's (its size ids are added by the caller, see sdxl_cond)."""
    if not path.is_file():
        long = text_encoder.too_long(prompts)
        if long:
            cli.warn('train.py', f"{len(long)} prompts are longer than the text encoder's {text_encoder.max_length} "
                                 f"tokens and are cut (the first: '{long[0][0][:40]}...', {long[0][1]} tokens)")
        ctx, masks, pooled = [], [], []
        for i in range(0, len(prompts), batch):
            c, m, p = float_states(text_encoder.encode(prompts[i:i + batch]))
            ctx.append(c.cpu())
            masks.append(m.cpu() if m is not None else torch.ones(c.shape[:2], dtype=torch.bool))
            pooled += [p.cpu()] if p is not None else []
        null, null_mask, null_pooled = float_states(text_encoder.null())
        tensors = {'context': torch.cat(ctx), 'mask': torch.cat(masks), 'null': null.cpu(),
                   'null_mask': (null_mask if null_mask is not None else torch.ones(null.shape[:2], dtype=torch.bool)).cpu()}
        if pooled:
            tensors.update(pooled=torch.cat(pooled), null_pooled=null_pooled.cpu())
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path) + '.tmp', metadata={'prompts': json.dumps(prompts), 'masked': str(text_encoder.is_t5)})
        os.replace(str(path) + '.tmp', path)
    with safe_open(str(path), 'pt') as f:
        masked = f.metadata()['masked'] == 'True'
        prompts = json.loads(f.metadata()['prompts'])
    t = load_file(str(path))
    return (prompts, t['context'], t['mask'] if masked else None, t.get('pooled'),
            (t['null'], t['null_mask'] if masked else None, t.get('null_pooled')))


def float_states(encoded):
    """A text encoder's (states, mask, pooled) with the states in fp32, whatever the encoder's dtype."""
    c, m, p = encoded
    return c.float(), m, None if p is None else p.float()


def sdxl_cond(net, vae, pooled):
    """SDXL's added conditioning for pooled text embeddings, the size ids those of the square image
    the student draws (its sample_size latents, decoded); None for networks without it."""
    if pooled is None or getattr(net.cfg, 'addition_embed', None) is None:
        return None
    size = net.cfg.sample_size * (2 ** (len(vae.cfg.channels) - 1) if isinstance(vae, M.VAE) else 1)
    return M.sdxl_added(pooled, size, size)


# -----------------------------------------------------------------------------
# Checkpoints: safetensors, written atomically, the last K kept


def optimizer_tensors(opt, prefix):
    sd = opt.state_dict()
    tensors = {f'{prefix}.{pid}.{k}': v if torch.is_tensor(v) else torch.tensor(v)
               for pid, state in sd['state'].items() for k, v in state.items()}
    return tensors, json.dumps(sd['param_groups'])


def shard_like(held, whole_tensor):
    """A whole tensor as `held` (a parameter or its state) holds it: under FSDP this rank's shard of it
    (a DTensor placed as `held`), cut from the whole every rank has read; otherwise as it is."""
    if hasattr(held, 'device_mesh') and whole_tensor.shape == held.shape:
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(whole_tensor.to(held.device), held.device_mesh, held.placements, src_data_rank=None)
    return whole_tensor


def load_optimizer(opt, tensors, groups, prefix):
    params = [p for g in opt.param_groups for p in g['params']]
    state = {}
    for key, v in tensors.items():
        if key.startswith(prefix + '.'):
            pid, k = key[len(prefix) + 1:].split('.', 1)  # the prefix itself holds a dot
            state.setdefault(int(pid), {})[k] = shard_like(params[int(pid)], v)
    opt.load_state_dict({'state': state, 'param_groups': json.loads(groups)})


def save_training_state(out, step, trained, opts, generator, keep, rank=0, world=1):
    """checkpoints/step-N/state.safetensors: trained weights, optimizer moments, every rank's random
    state, step. Under torchrun every rank calls it: an FSDP student's shards are gathered whole, each
    rank's random state is sent to rank 0, and rank 0 writes."""
    tensors, meta = {}, {'step': str(step), 'ranks': str(world)}

    def put(key, v):
        v = vsd.whole(v.detach())  # an FSDP shard: every rank takes part in gathering it
        if rank == 0:
            tensors[key] = v.cpu().contiguous()
    for name, module in trained.items():
        for k, v in module.state_dict().items():
            if name != 'teacher' or 'lora_' in k:
                put(f'{name}.{k}', v)
    for name, opt in opts.items():
        t, meta[f'opt.{name}'] = optimizer_tensors(opt, f'opt.{name}')
        for k, v in t.items():
            put(k, v)
    rngs = [generator.get_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, generator.get_state())
    if rank != 0:
        return
    tensors.update({rng_key(r): state for r, state in enumerate(rngs)})
    root = Path(out) / 'checkpoints'
    tmp = root / f'step-{step:07d}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed here before
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / 'state.safetensors'), metadata=meta)
    M.swap_into_place(tmp, root / f'step-{step:07d}')  # a crash before this leaves the older ones intact
    for old in sorted(root.glob('step-???????'))[:-keep]:
        shutil.rmtree(old)


def rng_key(rank):
    return 'rng' if rank == 0 else f'rng.{rank}'


def read_training_state(path, trained, opts):
    """(tensors, metadata) of a training checkpoint, checked whole against this run before any of it
    is applied: every tensor there and finite, every shape this run's."""
    tensors, meta = M.read_safetensors(path)
    M.check_finite(tensors, path)
    for name, module in trained.items():
        want = {k: v.shape for k, v in module.state_dict().items() if name != 'teacher' or 'lora_' in k}
        got = {k[len(name) + 1:]: v.shape for k, v in tensors.items() if k.startswith(name + '.')}
        if want != got:
            diff = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
            raise M.CheckpointError(f"{path} does not hold this run's {name} ({diff[0]} differs): it was written by "
                                    "a run with other settings")
    ranks = int(meta.get('ranks', 1))
    if 'step' not in meta or any(rng_key(r) not in tensors for r in range(ranks)) or \
            any(f'opt.{name}' not in meta for name in opts):
        raise M.CheckpointError(f"{path} lacks the step, the random state or an optimizer: it is not a training checkpoint")
    return tensors, meta


def load_training_state(out, trained, opts, generator, script='train.py', rank=0, world=1):
    """Resume from the newest checkpoint in out/checkpoints that reads whole, saying which it passed over.
    Every rank reads it whole; under FSDP each keeps its shards."""
    root = Path(out) / 'checkpoints'
    ckpts = sorted(root.glob('step-???????'))
    if not ckpts:
        raise cli.UserError(f"--resume: {root} holds no checkpoint to resume from (drop --resume to start at step 0)")
    for ckpt in reversed(ckpts):
        try:
            tensors, meta = read_training_state(ckpt / 'state.safetensors', trained, opts)
        except M.CheckpointError as e:
            cli.warn(script, f"passing over {ckpt.name}: {cli.one_line(e)}")
            continue
        ranks = int(meta.get('ranks', 1))
        if ranks != world:  # each rank has its own prompts and random state
            raise cli.UserError(f"--resume: {ckpt} was written by a training on {ranks} rank(s), this one runs on "
                                f"{world} (resume it on {ranks})")
        for name, module in trained.items():
            held = module.state_dict()
            module.load_state_dict({k[len(name) + 1:]: shard_like(held[k[len(name) + 1:]], v) for k, v in tensors.items()
                                    if k.startswith(name + '.')},
                                   strict=name != 'teacher')  # the teacher's base weights come from --teacher
        for name, opt in opts.items():
            load_optimizer(opt, tensors, meta[f'opt.{name}'], f'opt.{name}')
        generator.set_state(tensors[rng_key(rank)])
        if ckpt != ckpts[-1]:
            cli.warn(script, f"resuming from {ckpt}, the newest checkpoint that reads whole")
        return int(meta['step'])
    raise cli.UserError(f"--resume: none of the {len(ckpts)} checkpoints in {root} reads whole (start again without "
                        "--resume, in a new --out)")


# -----------------------------------------------------------------------------
# The output folder: one training at a time, leftovers of a killed one tidied


def alive(holder):
    """Whether the process named in a lock file ('host pid') still runs; on another host, assume it does."""
    try:
        host, pid = holder.split()
        pid = int(pid)
    except ValueError:
        return False  # a lock cut short by a kill
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock(out):
    """out/train.lock, holding this host and process: a second training of the same --out stops here.
    A lock whose process is gone (killed) is taken over. Returns the lock's path, to release."""
    path = Path(out) / 'train.lock'
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = path.read_text().strip()
            if alive(holder):
                raise cli.UserError(f"--out {out} is in use by another training (process {holder}, see {path}): "
                                    "wait for it to end, or pass another --out") from None
            cli.warn('train.py', f"taking over {path}: its training ({holder or 'unknown'}) is gone")
            path.unlink(missing_ok=True)
            continue
        os.write(fd, me.encode())
        os.close(fd)
        return path
    raise cli.UserError(f"--out {out}: another training is taking {path} at this moment (pass another --out)")


def unlock(path):
    if path.is_file() and path.read_text().strip() == f"{socket.gethostname()} {os.getpid()}":
        path.unlink()


def tidy(out):
    """Leftovers of a killed training: a half-written checkpoint goes, a student save is completed or undone."""
    root = Path(out) / 'checkpoints'
    steps = sorted({p.name[:len('step-0000000')] for p in root.glob('step-???????*')})
    for folder in [root / name for name in steps] + [Path(out) / 'student']:
        done = M.finish_interrupted_save(folder)
        if done:
            cli.warn('train.py', done)


# -----------------------------------------------------------------------------
# Training


@torch.no_grad()
def validation_grid(student, pipe, text, path, start_t, seed=0):
    """One image per prompt from fixed noise, written as a PNG row; text: the prompts' encoder outputs."""
    from sample import save_grid
    c, m, pooled = text
    cfg = student.cfg
    g = torch.Generator(c.device).manual_seed(seed)
    z = torch.randn(len(c), cfg.in_channels, cfg.sample_size, cfg.sample_size, device=c.device, generator=g)
    x0 = vsd.student_generate(student, pipe.schedule, z, c.to(z.dtype), m, start_t, sdxl_cond(student, pipe.vae, pooled))
    save_grid(pipe.vae.decode(x0.to(next(student.parameters()).dtype)), path, nrow=len(c))


@torch.no_grad()
def teacher_pairs(teacher, schedule, ctx, ctx_mask, ctx_added, null, cfg, rank, path, batch=64):
    """DMD's regression pairs: noises z and the teacher's DDIM images x0 from them (with guidance), on
    prompts drawn from this rank's shard; written once to `path` and read back on resume."""
    if path.is_file():
        tensors = load_file(str(path))
        return {k: tensors.get(k) for k in ('z', 'x0', 'context', 'mask', 'added')}
    from sample import ddim
    g = torch.Generator().manual_seed(10_000 + cfg.seed * 1000 + rank)
    idx = torch.randint(len(ctx), (cfg.regression_pairs,), generator=g)
    c = teacher.cfg
    z = torch.randn(cfg.regression_pairs, c.in_channels, c.sample_size, c.sample_size, generator=g)
    pick = lambda x: None if x is None else x[idx]
    pairs = {'z': z, 'context': ctx[idx], 'mask': pick(ctx_mask), 'added': pick(ctx_added)}
    device, x0 = null[0].device, []
    for i in tqdm(range(0, len(z), batch), desc='teacher pairs', disable=rank != 0):
        cond = tuple(None if v is None else v[i:i + batch].to(device) for v in (pairs['context'], pairs['mask'], pairs['added']))
        x0.append(ddim(teacher, schedule, z[i:i + batch].to(device), cond, null, cfg.regression_steps, cfg.regression_cfg).cpu())
    pairs['x0'] = torch.cat(x0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in pairs.items() if v is not None}, str(path))
    return pairs


def read_real_images(path):
    """The --real-images file's 'images': uint8 (N, H, W, 3), checked before the slow loads."""
    if not Path(path).is_file():
        raise cli.UserError(f"--real-images {path} not found (python shapes.py real-images OUT writes the shapes "
                            "world's)")
    images = M.read_safetensors(path)[0].get('images')
    if images is None or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = 'no images tensor' if images is None else f"images {images.dtype} {tuple(images.shape)}"
        raise cli.UserError(f"--real-images {path} holds {got}: it needs 'images', uint8 (N, H, W, 3)")
    return images


def real_latents(images, path, vae, size, device, batch=64):
    """Real images in the student's space: in [-1, 1], through the VAE's encoder (its posterior mean; the
    identity for pixel-space models), at the student's size or a clean error."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = torch.cat([vae.encode(x[i:i + batch].to(device), generator=False).float()
                             for i in range(0, len(x), batch)])
    if latents.shape[-1] != size or latents.shape[-2] != size:
        raise cli.UserError(f"--real-images {path}: its {images.shape[2]}x{images.shape[1]} images make "
                            f"{latents.shape[-1]}x{latents.shape[-2]} latents, the student draws {size}x{size} "
                            "(write the images at the student's image size)")
    return latents


def make_gan(cfg, teacher, real, null, device):
    """DMD2's GAN term (vsd.GAN): its classifier head on the LoRA teacher's --gan-layer, sized by a probe
    forward, and the real images (latents) it draws from."""
    layer = cfg.gan_layer or vsd.bottleneck(teacher)
    try:
        probe = vsd.layer_features(teacher, layer, real[:1], torch.zeros(1, dtype=torch.long, device=device),
                                   tuple(None if u is None else u[:1] for u in null))
    except (AttributeError, ValueError) as e:
        raise cli.UserError(f"--gan-layer {layer}: {cli.one_line(e)} (name a module of the teacher, such as "
                            f"{vsd.bottleneck(teacher)})") from None
    channels = probe.shape[1] if probe.ndim == 4 else probe.shape[-1]
    draw = lambda n, g: real[torch.randint(len(real), (n,), generator=g, device=device)]  # real is on the device
    return vsd.GAN(layer, channels, draw).to(device)


def whole_student(student, device):
    """An unsharded copy of an FSDP student (every rank gathers it; rank 0 uses it)."""
    state = {k: vsd.whole(v.detach()) for k, v in student.state_dict().items()}
    plain = M.build(student.cfg).to(device)
    plain.load_state_dict(state)
    return plain


def hold_bf16(net):
    """A frozen network's linear and convolution weights (and biases) held in bf16, where bf16 autocast
    would cast them at every use: half the memory, the same numbers under autocast. The rest (norms,
    embeddings, PixArt's scale-shift tables: a small share) stays fp32; trainable layers (the LoRA
    adapters) are left alone."""
    for m in net.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not any(p.requires_grad for p in m.parameters()):
            m.to(torch.bfloat16)
    return net


def adamw(params, device, **options):
    """AdamW, fused on CUDA: one kernel for the whole update, where the multi-tensor AdamW (CUDA's
    default) holds a full-size temporary (its second moments' square root: 4 bytes a parameter, at the
    step's peak for SD2.1, README's plan). On the CPU torch's default, one tensor at a time."""
    return torch.optim.AdamW(params, **{'fused': device.type == 'cuda', **options})


def lr_factor(schedule, step, steps, warmup=None):
    """Multiplier of the base learning rate at a step: a linear warm-up over `warmup` steps (cosine's
    default: the first 2%), then 1 (constant) or a cosine decay to zero (cosine)."""
    if warmup is None:
        warmup = steps // 50 if schedule == 'cosine' else 0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == 'constant':
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def lerp_ema(ema, net, decay, step):
    """EMA of the weights; the decay warms up so the random initial weights are forgotten early."""
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters()):
            e.lerp_(p.detach(), 1 - decay)


@cli.script('train.py')
def main(argv=None):
    cfg = parse_args(argv)
    if not cfg.teacher:
        raise cli.UserError("--teacher CKPT is required (a folder written by convert.py)")
    if not cfg.prompts:
        raise cli.UserError("--prompts FILE is required (one prompt per line)")
    prompts = read_prompts(cfg.prompts)  # before the slow loads
    negatives = read_prompts(cfg.negative_prompts, '--negative-prompts', 'negative prompt') if cfg.nasa_train else None
    real = read_real_images(cfg.real_images) if cfg.gan_weight > 0 else None
    out = Path(cfg.out)
    cli.not_an_input('--out', out, [('the teacher', cfg.teacher), ('the prompt file', cfg.prompts),
                                    ('the negative prompt file', cfg.negative_prompts)])
    ddp, rank, world, device = setup_distributed(cfg.device)
    if ddp and cfg.gan_weight > 0:
        raise cli.UserError("--gan-weight runs in one process for now (its classifier reads the LoRA teacher outside "
                            "DDP): run python train.py, or drop --gan-weight under torchrun")
    if cfg.batch_size % world:
        raise cli.UserError(f"--batch-size {cfg.batch_size} does not split over {world} ranks (pass a multiple of {world})")
    cli.writable_folder('--out', out)
    has_checkpoints = any((out / 'checkpoints').glob('step-???????'))
    if cfg.resume and not has_checkpoints:
        raise cli.UserError(f"--resume: {out / 'checkpoints'} holds no checkpoint to resume from (drop --resume to "
                            "start at step 0)")
    if not cfg.resume and has_checkpoints:
        raise cli.UserError(f"--out {out} already holds the checkpoints of a training (pass --resume to continue it, "
                            "or another --out)")
    lock_path = lock(out) if rank == 0 else None
    try:
        train(cfg, prompts, out, ddp, rank, world, device, negatives, real)
    finally:
        if lock_path:
            unlock(lock_path)


def train(cfg, prompts, out, ddp, rank, world, device, negatives=None, real=None):
    if rank == 0:
        tidy(out)
    B = cfg.batch_size // world
    torch.manual_seed(cfg.seed)  # the same initial weights (LoRA included) on every rank
    cuda = device.type == 'cuda'
    autocast = (lambda: torch.autocast('cuda', torch.bfloat16)) if cuda else contextlib.nullcontext
    frozen_bf16 = cuda and cfg.frozen_bf16

    # --- set-up: teacher, student (a copy of the teacher), prompts, LoRA teacher, optimizers
    pipe = M.load_checkpoint(cfg.teacher, device)
    if real is not None:  # the GAN term's real images in the student's space, through the VAE while it is fp32
        real = real_latents(real, cfg.real_images, pipe.vae, pipe.denoiser.cfg.sample_size, device)
    if frozen_bf16:
        hold_bf16(pipe.denoiser)
        hold_bf16(pipe.vae)
        pipe.text_encoder.to(torch.bfloat16)  # run once, outside autocast: all of it (its states are cached in fp32)
    T = pipe.schedule.T
    cli.number('--t-max', cfg.t_max, low=cfg.t_min, high=T - 1, fix=f"the teacher's schedule has {T} timesteps")
    cli.number('--student-t', cfg.student_t, low=-T, high=T - 1, fix=f"-1 is the last of the teacher's {T} timesteps")
    student = M.load_checkpoint(cfg.teacher, device, text=False).denoiser.train()
    teacher = pipe.denoiser.requires_grad_(False)
    digest = hashlib.sha1(json.dumps([cfg.teacher, prompts]).encode()).hexdigest()[:12]
    if getattr(teacher.cfg, 'addition_embed', None) and pipe.text_encoder.model_2 is None:
        raise cli.UserError(f"{cfg.teacher} is an SDXL UNet with one text encoder: it needs text_encoder_2/ "
                            "and tokenizer_2/ as well (convert it with --text-encoder DIR of an SDXL diffusers folder)")
    shard, ctx, ctx_mask, pooled, null = cache_prompts(pipe.text_encoder, prompts[rank::world],
                                                       out / 'prompt_cache' / f'{digest}-{rank}-of-{world}.safetensors')
    ctx_added = sdxl_cond(teacher, pipe.vae, pooled)  # SDXL: pooled text + size ids, per prompt
    null = (*null[:2], sdxl_cond(teacher, pipe.vae, null[2]))
    if negatives:  # NASA-T: the negatives cached beside the prompts, each rank a shard (each the whole list, if few)
        digest_neg = hashlib.sha1(json.dumps([cfg.teacher, negatives]).encode()).hexdigest()[:12]
        neg_shard, neg_ctx, neg_mask, neg_pooled, _ = cache_prompts(
            pipe.text_encoder, negatives[rank::world] if len(negatives) >= world else negatives,
            out / 'prompt_cache' / f'{digest_neg}-negatives-{rank}-of-{world}.safetensors')
        neg_added = sdxl_cond(teacher, pipe.vae, neg_pooled)
    val_text = None
    if rank == 0 and cfg.val_every:  # the validation prompts encoded once too
        val_text = float_states(pipe.text_encoder.encode((cfg.val_prompts or 'a red circle|a blue square').split('|')))
    pipe.text_encoder = None  # the text encoders (T5-XXL for PixArt) leave memory once the prompts are encoded
    null = tuple(x.to(device) if x is not None else None for x in null)
    pairs = None
    if cfg.regression_weight > 0:  # before the adapters: the frozen teacher draws them
        if cfg.regression_pool > student.cfg.sample_size:
            raise cli.UserError(f"--regression-pool {cfg.regression_pool} is larger than the student's "
                                f"{student.cfg.sample_size}x{student.cfg.sample_size} images: use at most "
                                f"{student.cfg.sample_size}")
        with autocast():
            pairs = teacher_pairs(teacher, pipe.schedule, ctx, ctx_mask, ctx_added, null, cfg, rank,
                                  out / 'prompt_cache' / f'{digest}-pairs-{cfg.regression_pairs}-{cfg.regression_steps}-'
                                  f'{cfg.regression_cfg:g}-{cfg.seed}-{rank}-of-{world}.safetensors')
    try:
        lora_params = vsd.add_lora(teacher, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(',')))
    except ValueError as e:
        raise cli.UserError(f"{e} (see --lora-targets)") from None
    student.requires_grad_(True)
    student.grad_checkpointing = cuda if cfg.grad_checkpointing is None else cfg.grad_checkpointing
    if cfg.channels_last:  # 4-D weights in NHWC order: every convolution then runs channels-last
        for net in (student, teacher):
            net.to(memory_format=torch.channels_last)
    sharded = cfg.fsdp and ddp
    if sharded:  # before the optimizer: it holds the shards
        shard_student(student)
    elif ddp:
        unit_boundaries(student)
    gan = make_gan(cfg, teacher, real, null, device) if real is not None else None
    lora_groups = [{'params': lora_params}] + ([{'params': list(gan.parameters()), 'lr': cfg.lr_gan}] if gan else [])
    opts = {'student': adamw(student.parameters(), device, lr=cfg.lr_student, weight_decay=cfg.weight_decay),
            'lora': adamw(lora_groups, device, lr=cfg.lr_lora, weight_decay=cfg.weight_decay)}
    trained = {'student': student, 'teacher': teacher}  # what a checkpoint holds (of the teacher: its adapters)
    if gan is not None:
        trained['gan'] = gan
    ema = None
    if cfg.ema > 0:
        ema = M.build(student.cfg).to(device).requires_grad_(False)
        ema.load_state_dict(student.state_dict())
        trained['ema'] = ema
    generator = torch.Generator(device).manual_seed(cfg.seed * 1000 + rank)
    step = 0
    if cfg.resume:
        step = load_training_state(out, trained, opts, generator, rank=rank, world=world)
    # DDP's buckets hold the gradients (4 bytes a parameter) for the whole run: the gradients are views into them
    student_ddp = DDP(student, gradient_as_bucket_view=True) if ddp and not sharded else student
    teacher_ddp = DDP(teacher) if ddp else teacher
    clip_loss = None
    if cfg.clip and cfg.clip_weight > 0:
        clip_loss = vsd.ClampedCLIPLoss(cfg.clip, cfg.clip_tau).to(device)
        if frozen_bf16:
            hold_bf16(clip_loss.clip)

    def extra_terms(x0, texts):
        """SwiftBrush v2's clamped CLIP loss, through the decoder, its weight ramped up over --clip-warmup;
        DMD's regression onto the teacher's pairs (the same noise, the same prompt)."""
        term, values = 0.0, {}
        if clip_loss is not None:
            value = clip_loss(pipe.vae.decode(x0), texts)
            term, values['clip'] = cfg.clip_weight * min(1.0, (step + 1) / max(cfg.clip_warmup, 1)) * value, value.detach()
        weight = cfg.regression_weight * (max(0.0, 1 - step / cfg.regression_decay) if cfg.regression_decay else 1.0)
        if pairs is not None and weight > 0:  # past --regression-decay the student no longer draws the pairs
            idx = torch.randint(len(pairs['z']), (B,), generator=generator, device=device).cpu()
            cond = tuple(None if pairs[k] is None else pairs[k][idx].to(device) for k in ('context', 'mask', 'added'))
            # the raw module: the step's one DDP forward is the VSD sample's; one backward syncs both
            x0_student = vsd.student_generate(student, pipe.schedule, pairs['z'][idx].to(device), *cond[:2],
                                              cfg.student_t, cond[2])
            value = vsd.regression_loss(x0_student, pairs['x0'][idx].to(device), cfg.regression_pool)
            term, values['regression'] = term + weight * value, value.detach()
        return term, values

    def draw():
        """A batch of the student's noise and of this rank's prompts (NASA-T: and negatives, see vsd.pgsb_step)."""
        idx = torch.randint(len(shard), (B,), generator=generator, device=device).cpu()
        z = torch.randn(B, student.cfg.in_channels, student.cfg.sample_size, student.cfg.sample_size,
                        device=device, generator=generator)
        cond = (ctx[idx].to(device), ctx_mask[idx].to(device) if ctx_mask is not None else None,
                ctx_added[idx].to(device) if ctx_added is not None else None)
        if not negatives:
            return z, cond, [shard[i] for i in idx]
        # NASA-T: a negative prompt per sample from this rank's own draw, and this iteration's NASA scale
        nidx = torch.randint(len(neg_shard), (B,), generator=generator, device=device).cpu()
        negative = (neg_ctx[nidx].to(device), neg_mask[nidx].to(device) if neg_mask is not None else None,
                    neg_added[nidx].to(device) if neg_added is not None else None)
        alpha = cfg.nasa_alpha_max * torch.rand((), generator=generator, device=device).item()
        return z, cond, [shard[i] for i in idx], negative, alpha

    # --- the loop: one PG-SB step (vsd.pgsb_step), then logging, validation grids, checkpoints
    log = open(out / 'log.jsonl', 'a') if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc='PG-SB')
    while step < cfg.steps:
        t0 = time.time()
        # of the step alone: --resume needs no scheduler state; the warm-up is the student's
        opts['student'].param_groups[0]['lr'] = cfg.lr_student * lr_factor(cfg.lr_schedule, step, cfg.steps, cfg.warmup or None)
        opts['lora'].param_groups[0]['lr'] = cfg.lr_lora * lr_factor(cfg.lr_schedule, step, cfg.steps)
        info, kappa = vsd.pgsb_step(student_ddp, teacher_ddp, pipe.schedule, opts, draw, null, vsd.at_step(cfg, step),
                                    generator, autocast, cfg.grad_clip, extra_terms if clip_loss or pairs else None, gan)
        if ema is not None:
            lerp_ema(ema, student, cfg.ema, step)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            info = {k: all_reduce_mean(v.float().clone(), world).item() for k, v in info.items()}
            info['kappa_mean'] = kappa.mean().item()
            bad = {k: v for k, v in info.items() if not math.isfinite(v)}
            if bad:  # nothing diverged is logged or saved: the last checkpoint stays the newest
                raise cli.UserError(f"step {step}: the training diverged ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                                    f"checkpoints before it are kept (lower --lr-student or --lr-lora, then --resume)")
            if log:
                log.write(json.dumps({'step': step, **info, 'kappa': [round(k, 4) for k in kappa.tolist()],
                                      'sec': round(time.time() - t0, 3)}) + '\n')
                log.flush()
                bar.set_postfix({k: f'{v:.4f}' for k, v in info.items()})
        if cfg.val_every and step % cfg.val_every == 0 and (rank == 0 or sharded):
            plain = whole_student(student, device) if sharded else (ema or student)  # every rank gathers
            if rank == 0:
                (out / 'val').mkdir(parents=True, exist_ok=True)
                plain.eval()
                with autocast():  # the VAE's weights may be bf16
                    validation_grid(plain, pipe, val_text, out / 'val' / f'step-{step:07d}.png', cfg.student_t)
                plain.train()
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_training_state(out, step, trained, opts, generator, cfg.keep, rank, world)
        if ddp:
            dist.barrier()  # no rank runs ahead of a checkpoint being written
    bar.close()

    # --- the end: check that the ranks agree, write the student
    if ddp:
        same = ranks_agree([vsd.whole(v) for m in trained.values() for v in m.state_dict().values()], device)
        if log:
            log.write(json.dumps({'step': step, 'ranks_identical': same}) + '\n')
            log.flush()
    final = whole_student(student, device) if sharded else (ema or student)
    if rank == 0:
        vae = pipe.vae
        if frozen_bf16 and isinstance(vae, M.VAE):  # the teacher's own fp32 weights, not those held in bf16
            vae = M.load_module(Path(cfg.teacher) / 'vae.safetensors')
        M.save_checkpoint(out / 'student', final.eval(), vae, pipe.schedule,
                          text_folder=cfg.teacher, student_t=cfg.student_t)
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
