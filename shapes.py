"""The shapes world: a tiny text-to-image world with answers a program can check.

See SHAPES.md. Images are 32 x 32 RGB with one flat shape on black; captions name its colour,
its shape, both, or nothing. This file draws real samples, builds the world's CLIP text encoder
and tokenizer, and scores generated images (prompt accuracy, negative-prompt success, Frechet
distance).

    python shapes.py make-text-encoder out/shapes      # text_encoder/ and tokenizer/
    python shapes.py show out/real.png                 # a grid of 64 real samples
"""
import argparse
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import nasa

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
MIN_SIZE, MAX_SIZE = 10, 18
# Caption kinds and their probabilities; "" is the null prompt for classifier-free guidance.
CAPTION_KINDS = ("colour shape", "shape", "colour", "null")
CAPTION_PROBS = (0.7, 0.1, 0.1, 0.1)
# The four (prompt, negative prompt) pairs of the negative-prompt check (paper Table 7 protocol).
NEGATIVE_PAIRS = (("a circle", "red"), ("a square", "blue"),
                  ("a red shape", "circle"), ("a blue shape", "square"))

# -----------------------------------------------------------------------------
# Drawing the world


@dataclass
class Scene:
    """One real sample before rendering: what is drawn, where, and its caption."""
    shape: str
    colour: str
    size: int      # diameter, side, or base = height, in pixels
    cx: float      # centre of the bounding box, in pixels from the left edge
    cy: float      # centre of the bounding box, in pixels from the top edge
    caption: str


def render(shape, colour, size, cx, cy):
    """Draw one flat shape whose bounding box is [cx - size/2, cx + size/2) x (same in y).

    A pixel is filled when its centre lies inside the shape. With an integer size and a
    pixel-aligned box (what sample_world draws) the box is filled edge to edge, so the
    area-over-box check of SHAPES.md sees 1.0 for squares, 0.78..0.82 for circles and
    0.50..0.60 for triangles at every size from 10 to 18, far from its 0.65 and 0.9 cut-offs.
    """
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5  # pixel centres
    half = size / 2
    if shape == "square":
        mask = (np.abs(x - cx) < half) & (np.abs(y - cy) < half)
    elif shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    elif shape == "triangle":
        # Upright: row r below the apex (r = 0, 1, ...) spans (r + 1) / 2 either side of the
        # axis; measuring to the row's bottom edge rather than its centre keeps a full-width
        # apex row for even sizes, so the height is exactly the size, as is the base.
        top = cy - half
        mask = (y > top) & (y < cy + half) & (np.abs(x - cx) <= (y + 0.5 - top) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    image[mask] = COLOURS[colour]
    return image


def sample_scenes(n, seed):
    """Draw n scenes: shape, colour, integer size and a position keeping the shape inside."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        # Pixel-aligned top-left corner, uniform over the positions that keep the box inside.
        x0, y0 = rng.integers(0, IMAGE_SIZE - size + 1, size=2)
        kind = CAPTION_KINDS[rng.choice(len(CAPTION_KINDS), p=CAPTION_PROBS)]
        scenes.append(Scene(shape, colour, size, x0 + size / 2, y0 + size / 2,
                            caption(kind, shape, colour)))
    return scenes


def caption(kind, shape, colour):
    """The caption of one kind ("colour shape", "shape", "colour" or "null") for a scene."""
    return {"colour shape": f"a {colour} {shape}", "shape": f"a {shape}",
            "colour": f"a {colour} shape", "null": ""}[kind]


def sample_world(n, seed):
    """n real images (n, 32, 32, 3) uint8 and their captions, deterministic from the seed."""
    scenes = sample_scenes(n, seed)
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, s in enumerate(scenes):
        images[i] = render(s.shape, s.colour, s.size, s.cx, s.cy)
    return images, [s.caption for s in scenes]


def all_prompts():
    """The 18 fully specified prompts "a {colour} {shape}"."""
    return [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]


def parse_prompt(prompt):
    """(colour, shape) named by a prompt or a negative prompt; None where it names none."""
    words = prompt.lower().split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape

# -----------------------------------------------------------------------------
# Checks (SHAPES.md, "What a program can check")


def _foreground(image):
    """Boolean (32, 32) mask of pixels whose largest channel exceeds 100."""
    return np.asarray(image).max(axis=-1) > 100


def classify(image):
    """(present, colour, shape) of one image; colour and shape are None without foreground."""
    image = np.asarray(image)
    mask = _foreground(image)
    area = int(mask.sum())
    if area == 0:
        return False, None, None
    median = np.median(image[mask].astype(np.float64), axis=0)
    palette = np.array(list(COLOURS.values()), np.float64)
    colour = list(COLOURS)[int(np.argmin(((palette - median) ** 2).sum(axis=1)))]
    ys, xs = np.nonzero(mask)
    fill = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill >= 0.65 else "triangle"
    return 40 <= area <= 400, colour, shape


def _matches(label, colour, shape):
    """Whether a classify() label is present and has the named colour and shape (None: any)."""
    present, got_colour, got_shape = label
    return present and colour in (None, got_colour) and shape in (None, got_shape)


def prompt_accuracy(images, prompts):
    """Share of images whose shape is present and matches what its prompt names."""
    hits = [_matches(classify(im), *parse_prompt(p)) for im, p in zip(images, prompts, strict=True)]
    return float(np.mean(hits))


def negative_success(images, prompt, negative):
    """(success rate, positive accuracy) for images generated from prompt with a negative prompt.

    Success: among images whose shape is present and matches the prompt, the share that lacks
    what the negative names ("a circle" / "red": circles that are not red). NaN when no image
    matches the prompt. Positive accuracy: the share of all images that match the prompt.
    """
    labels = [classify(im) for im in images]
    positive = np.array([_matches(l, *parse_prompt(prompt)) for l in labels], bool)
    negated = np.array([_matches(l, *parse_prompt(negative)) for l in labels], bool)
    success = float(np.mean(~negated[positive])) if positive.any() else math.nan
    return success, float(np.mean(positive))


def features(images):
    """(n, 12) features: colour one-hot (6), shape one-hot (3), centre x, centre y, size.

    One-hots are zero where no shape is present. Centre and size come from the foreground's
    bounding box (size: its longer side), divided by the image size so all features are O(1).
    """
    out = np.zeros((len(images), len(COLOURS) + len(SHAPES) + 3))
    for i, image in enumerate(images):
        present, colour, shape = classify(image)
        if present:
            out[i, list(COLOURS).index(colour)] = 1
            out[i, len(COLOURS) + SHAPES.index(shape)] = 1
        ys, xs = np.nonzero(_foreground(image))
        if len(xs):
            box = (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1)
            out[i, -3:] = ((box[0] + box[1]) / 2, (box[2] + box[3]) / 2,
                           max(box[1] - box[0], box[3] - box[2]))
            out[i, -3:] /= IMAGE_SIZE
    return out


def _sqrt_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(feats_a, feats_b, ridge=1e-6):
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula).

    tr(sqrt(A B)) equals tr(sqrt(A^1/2 B A^1/2)), whose argument is symmetric PSD, so two
    eigen-decompositions replace scipy's general sqrtm. The ridge keeps constant features
    (a generator that always draws red) from making the covariances singular.
    """
    mu_a, mu_b = feats_a.mean(axis=0), feats_b.mean(axis=0)
    eye = ridge * np.eye(feats_a.shape[1])
    cov_a = np.cov(feats_a, rowvar=False) + eye
    cov_b = np.cov(feats_b, rowvar=False) + eye
    root_a = _sqrt_psd(cov_a)
    cross = np.trace(_sqrt_psd(root_a @ cov_b @ root_a))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)

# -----------------------------------------------------------------------------
# Evaluation of generators


def evaluate(generate_teacher, generate_student, n=256, seed=0, nasa_scale=nasa.PAPER_ALPHA['shapes']):
    """Score generators on the world's checks; generate_teacher may be None.

    Each generator is called as generate(prompts, negative_prompts, nasa_scale, seed) and
    returns (N, 32, 32, 3) uint8; runs without a negative prompt pass None and scale 0.
    Prompt accuracy uses the 18 colour-and-shape prompts, n // 18 images each. The Frechet
    distance uses n prompts drawn from the caption distribution, against n real images;
    "real_fd", a second real draw against the same images, is the floor at this n. Negative
    prompts (student only) use n // 4 images per pair, with the same seed with and without
    NASA, so that the two runs differ only by NASA.
    """
    real, _ = sample_world(n, seed)
    _, captions = sample_world(n, seed + 1)
    real_feats = features(real)
    results = {"n": n, "nasa_scale": nasa_scale,
               "real_fd": frechet_distance(features(sample_world(n, seed + 2)[0]), real_feats)}
    prompts = [p for p in all_prompts() for _ in range(max(1, n // len(all_prompts())))]
    for name, generate in (("teacher", generate_teacher), ("student", generate_student)):
        results[name] = None if generate is None else {
            "accuracy": prompt_accuracy(generate(prompts, None, 0.0, seed + 3), prompts),
            "fd": frechet_distance(features(generate(captions, None, 0.0, seed + 4)), real_feats),
        }
    results["negative"] = [_negative_row(generate_student, prompt, negative, max(1, n // 4),
                                         seed + 5 + i, nasa_scale)
                           for i, (prompt, negative) in enumerate(NEGATIVE_PAIRS)]
    return results


def _negative_row(generate, prompt, negative, n, seed, nasa_scale):
    """Negative-prompt success and prompt accuracy for one pair, without and with NASA."""
    without = generate([prompt] * n, None, 0.0, seed)
    with_nasa = generate([prompt] * n, [negative] * n, nasa_scale, seed)
    success_without, accuracy_without = negative_success(without, prompt, negative)
    success_with, accuracy_with = negative_success(with_nasa, prompt, negative)
    return {"prompt": prompt, "negative": negative,
            "success_without": success_without, "success_with": success_with,
            "accuracy_without": accuracy_without, "accuracy_with": accuracy_with}


def _fmt(value):
    """A score with three decimals; "n/a" for a missing model or an undefined rate."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def format_report(results):
    """The results of evaluate() as plain-text markdown tables."""
    lines = [f"Shapes-world evaluation (n={results['n']})", "",
             "| model | prompt accuracy | Frechet distance to real |", "|---|---|---|",
             f"| real images, another draw | n/a | {_fmt(results['real_fd'])} |"]
    for name in ("teacher", "student"):
        row = results[name] or {}
        lines.append(f"| {name} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('fd'))} |")
    lines += ["", f"Negative prompts, student (NASA scale {results['nasa_scale']}):", "",
              "| prompt | negative | success w/o NASA | success with NASA "
              "| accuracy w/o NASA | accuracy with NASA |", "|---|---|---|---|---|---|"]
    for r in results["negative"]:
        lines.append(f"| {r['prompt']} | {r['negative']} | {_fmt(r['success_without'])} | "
                     f"{_fmt(r['success_with'])} | {_fmt(r['accuracy_without'])} | "
                     f"{_fmt(r['accuracy_with'])} |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# Text encoder and tokenizer, in a Stable Diffusion checkpoint's folder layout


def world_words():
    """Every word a caption can use."""
    return ["a", *COLOURS, *SHAPES, "shape"]


def _bpe(word, ranks):
    """Apply BPE merges (pair -> rank) to a word the way CLIP does; returns its tokens."""
    tokens = list(word[:-1]) + [word[-1] + "</w>"]
    while len(tokens) > 1:
        pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(tokens, tokens[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        tokens[i:i + 2] = [tokens[i] + tokens[i + 1]]
    return tokens


def build_vocab():
    """(vocab, merges) of a CLIP BPE tokenizer that turns each world word into one token.

    Letters and letter + "</w>" cover any lowercase word, so unknown words split into letters
    instead of failing. Each world word then gets merges joining its leftover pieces left to
    right; a merge is only added when the merges so far leave the word in pieces, and later
    merges rank lower, so they never change how an earlier word splits.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [*letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in world_words():
        tokens = _bpe(word, {pair: r for r, pair in enumerate(merges)})
        while len(tokens) > 1:
            merges.append((tokens[0], tokens[1]))
            vocab.append(tokens[0] + tokens[1])
            tokens[:2] = [tokens[0] + tokens[1]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # last, as in CLIP's own vocabulary
    return {token: i for i, token in enumerate(dict.fromkeys(vocab))}, merges


def make_text_encoder(out_dir, seed=0, hidden_size=64):
    """Write out_dir/tokenizer/ and out_dir/text_encoder/ (a random, small CLIPTextModel)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    vocab, merges = build_vocab()
    tok_dir = os.path.join(out_dir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    # vocab.json + merges.txt are what a real checkpoint ships and what every CLIPTokenizer
    # version reads; save_pretrained then adds tokenizer.json and tokenizer_config.json.
    with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=1)
    with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    max_length = 8  # "<|startoftext|> a red circle <|endoftext|>" and padding
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=max_length)
    tokenizer.save_pretrained(tok_dir)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
        projection_dim=hidden_size, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    with torch.random.fork_rng(devices=[]):  # seeded weights, caller's RNG untouched
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    model.save_pretrained(os.path.join(out_dir, "text_encoder"), safe_serialization=True)
    return tokenizer, model


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts):
    """(n, 8, hidden) text embeddings, padded to max length as Stable Diffusion pipelines do."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state

# -----------------------------------------------------------------------------
# Command line


def save_grid(images, path, scale=4):
    """Save images (n, 32, 32, 3) as a square grid PNG, upscaled without smoothing."""
    from PIL import Image
    side = math.ceil(math.sqrt(len(images)))
    step = IMAGE_SIZE + 1  # a grey line between cells, so touching shapes stay apart
    grid = np.full((side * step - 1, side * step - 1, 3), 64, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, side)
        grid[r * step:r * step + IMAGE_SIZE, c * step:c * step + IMAGE_SIZE] = image
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(path)


def sampler(checkpoint, steps=1, cfg=1.0, layers=None):
    """A generate callable for evaluate(), from a checkpoint folder, through sample.py; `layers`
    restricts NASA to some cross-attention layers (as sample.py --nasa-layers)."""
    import sample
    pipe = sample.load(checkpoint)

    def generate(prompts, negative_prompts, nasa_scale, seed):
        negative = None
        if negative_prompts:
            assert len(set(negative_prompts)) == 1, "one negative prompt per call"
            negative = negative_prompts[0]
        images = sample.generate(pipe, prompts, negative, nasa_scale, seed=seed, steps=steps, cfg=cfg,
                                 layers=layers)
        return sample.to_uint8(images)
    return generate


def training_curve(teacher, run, n=256, seed=0):
    """[(step, Frechet distance to real, prompt accuracy)] for every checkpoint a train.py run kept
    (the paper's Figure 2 protocol): the student weights at each step (their EMA where the run keeps
    one), sampled in one step from the start timestep the run's final student records."""
    import sample
    from safetensors.torch import load_file
    pipe = sample.load(teacher)
    record = Path(run, "student", "schedule.json")
    pipe.student_t = json.loads(record.read_text()).get("student_t") if record.is_file() else None
    _, captions = sample_world(n, seed + 1)
    real_feats = features(sample_world(n, seed)[0])
    prompts = [p for p in all_prompts() for _ in range(max(1, n // len(all_prompts())))]
    curve = []
    for ckpt in sorted(Path(run, "checkpoints").glob("step-???????")):
        state = load_file(str(ckpt / "state.safetensors"))
        prefix = "ema." if any(k.startswith("ema.") for k in state) else "student."
        pipe.denoiser.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        fd = frechet_distance(features(sample.to_uint8(sample.generate(pipe, captions, seed=seed + 4))), real_feats)
        accuracy = prompt_accuracy(sample.to_uint8(sample.generate(pipe, prompts, seed=seed + 3)), prompts)
        curve.append((int(ckpt.name[len("step-"):]), fd, accuracy))
    return curve


def format_curves(curves):
    """Markdown tables of Frechet distance and prompt accuracy over steps, one column per group of
    runs: runs named NAME-sSEED are one group, shown as mean +- standard deviation over seeds."""
    groups = {}
    for run, curve in curves.items():
        name = re.sub(r"-s\d+$", "", Path(run).name)
        groups.setdefault(name, []).append({step: (fd, acc) for step, fd, acc in curve})
    steps = sorted({step for runs in groups.values() for c in runs for step in c})
    lines = []
    for title, k in (("Frechet distance to real", 0), ("prompt accuracy", 1)):
        head = " | ".join(f"{name} ({len(runs)} run{'s' * (len(runs) > 1)})" for name, runs in groups.items())
        lines += ["", f"{title}:", "", f"| step | {head} |", "|---|" + "---|" * len(groups)]
        for step in steps:
            cells = []
            for runs in groups.values():
                values = [c[step][k] for c in runs if step in c]
                cell = "n/a" if not values else _fmt(float(np.mean(values)))
                if len(values) > 1:
                    cell += f" +- {np.std(values):.3f}"
                cells.append(cell)
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-text-encoder", help="write OUT/text_encoder and OUT/tokenizer",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    make.add_argument("out", help="checkpoint folder to write into")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    make.add_argument("--hidden-size", type=int, default=64, help="width of the text encoder")
    show = commands.add_parser("show", help="write a grid of 64 real samples to OUT.png",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    show.add_argument("out", help="PNG file to write")
    show.add_argument("--seed", type=int, default=0, help="seed of the samples")
    ev = commands.add_parser("evaluate", help="score a teacher and a one-step student on the world's checks",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ev.add_argument("--teacher", default="checkpoints/shapes_teacher", help="teacher checkpoint ('' to skip)")
    ev.add_argument("--student", default="checkpoints/shapes_student", help="one-step student checkpoint")
    ev.add_argument("--teacher-steps", type=int, default=25, help="DDIM steps for the teacher")
    ev.add_argument("--teacher-cfg", type=float, default=3.0, help="guidance scale for the teacher")
    ev.add_argument("--nasa-scale", type=float, default=nasa.PAPER_ALPHA["shapes"],
                    help="NASA alpha for the negative-prompt rows")
    ev.add_argument("--nasa-layers", default="",
                    help="comma-separated substrings of the cross-attention layers NASA acts in ('': all)")
    ev.add_argument("--n", type=int, default=256, help="images per figure")
    ev.add_argument("--seed", type=int, default=0, help="seed of the evaluation")
    ev.add_argument("--json", default="", help="also write the results to this JSON file")
    cur = commands.add_parser("curve", help="Frechet distance and prompt accuracy over the steps of train.py runs (Figure 2)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cur.add_argument("runs", nargs="+", help="train.py output folders (their checkpoints/ are read)")
    cur.add_argument("--teacher", default="checkpoints/shapes_teacher", help="the teacher the runs started from")
    cur.add_argument("--n", type=int, default=256, help="images per point")
    cur.add_argument("--seed", type=int, default=0, help="seed of the evaluation (as in evaluate)")
    cur.add_argument("--json", default="", help="also write the curves to this JSON file")
    args = parser.parse_args(argv)
    if args.command == "curve":
        curves = {run: training_curve(args.teacher, run, args.n, args.seed) for run in args.runs}
        print(format_curves(curves))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(curves, f, indent=2)
    elif args.command == "evaluate":
        torch.manual_seed(args.seed)
        teacher = sampler(args.teacher, args.teacher_steps, args.teacher_cfg) if args.teacher else None
        layers = args.nasa_layers.split(",") if args.nasa_layers else None
        results = evaluate(teacher, sampler(args.student, layers=layers), n=args.n, seed=args.seed,
                           nasa_scale=args.nasa_scale)
        print(format_report(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    elif args.command == "make-text-encoder":
        make_text_encoder(args.out, seed=args.seed, hidden_size=args.hidden_size)
        print(f"wrote {args.out}/text_encoder and {args.out}/tokenizer")
    else:
        images, captions = sample_world(64, args.seed)
        save_grid(images, args.out)
        print(f"wrote {args.out}; captions, row by row:\n" + " | ".join(captions))


if __name__ == "__main__":
    main()
