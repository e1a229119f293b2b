"""The shapes world: a tiny text-to-image world with answers a program can check.

See SHAPES.md. Images are 32 x 32 RGB with one flat shape on black; captions name its colour,
its shape, both, or nothing. This file draws real samples, builds the world's CLIP text encoder
and tokenizer, trains the world's teacher, and scores generated images (prompt accuracy,
negative-prompt success, Frechet distance, diversity).

    python shapes.py make-text-encoder out/shapes      # text_encoder/ and tokenizer/
    python shapes.py show out/real.png                 # a grid of 64 real samples
    python shapes.py prompts out/prompts.txt           # the world's 27 distinct captions
    python shapes.py negatives out/negatives.txt       # NASA-T's negative prompts (train.py --nasa-train)
    python shapes.py train-teacher                     # the teacher, from scratch: runs/shapes_teacher/teacher
    python shapes.py train-teacher --arch shapes_dit --steps 4000 --out runs/shapes_dit_teacher  # the DiT
    python shapes.py evaluate                          # the shipped teacher and student, scored
    python shapes.py curve runs/a-s0 runs/a-s1 --last  # the students of train.py runs, scored
    python shapes.py sweep checkpoints/shapes_student  # negative-prompt success along NASA's scale
    python shapes.py sweep checkpoints/shapes_teacher --guidance cfg  # the teacher's own negative CFG
    python shapes.py losses checkpoints/shapes_teacher # denoising error per timestep, caption vs null
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

import cli
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
# The guidance sweep's eight pairs (`shapes.py sweep`): those four and four more, half of them removing
# a colour from a shape prompt, half a shape from a colour prompt.
SWEEP_PAIRS = NEGATIVE_PAIRS + (("a triangle", "green"), ("a circle", "yellow"),
                                ("a green shape", "triangle"), ("a yellow shape", "circle"))

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
# Diversity (SHAPES.md, "Diversity")

SPREAD_KEYS = ("centre_x", "centre_y", "size")


def shape_prompts():
    """The 3 prompts that name a shape and leave the colour unnamed: "a {shape}"."""
    return [f"a {shape}" for shape in SHAPES]


def colour_prompts():
    """The 6 prompts that name a colour and leave the shape unnamed: "a {colour} shape"."""
    return [f"a {colour} shape" for colour in COLOURS]


def world_captions():
    """The world's distinct non-null captions, sorted: 18 full, 3 shape-only, 6 colour-only."""
    return sorted({caption(kind, shape, colour) for kind in CAPTION_KINDS if kind != "null"
                   for shape in SHAPES for colour in COLOURS})


def negative_prompts():
    """NASA-T's negatives in this world (train.py --nasa-train --negative-prompts): the attribute
    words, each colour and each shape. SNOOPI v3 draws generic quality terms ("bad photo, low
    quality"), but this world has no quality to be bad at and its tokenizer knows only its own words;
    what a negative prompt does here is remove an attribute, as in NEGATIVE_PAIRS, so the student
    learns NASA against those words. train.py draws a negative per sample, not knowing the prompt
    (v3 states no pairing): for "a {colour} {shape}" captions 2 draws in 9 name an attribute the
    prompt names too; the colour or shape the prompt leaves unnamed is what the pairs test."""
    return list(COLOURS) + list(SHAPES)


def write_negatives(path):
    Path(path).write_text("\n".join(negative_prompts()) + "\n")


def write_prompts(path):
    """Write world_captions() one per line (the prompt file train.py's shapes preset reads)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(p + "\n" for p in world_captions()))


def images_per_prompt(n):
    """(images per full prompt, images per under-specified prompt) for n images per figure.

    The 18 full prompts get n // 18 each, as the accuracy figure always had (its numbers stay
    comparable); the 9 under-specified prompts get ceil(n / 9) each, so their figure holds at
    least n images."""
    return max(1, n // len(all_prompts())), -(-n // len(shape_prompts() + colour_prompts()))


def empty_share(images):
    """Share of images with no shape present (a generator stuck on black images scores 1)."""
    return float(np.mean([not classify(im)[0] for im in images]))


def histogram(images, attribute):
    """{"shares": {name: share}, "none": share} of one attribute ("colour" or "shape") of images.

    Shares are among the images with a shape present (NaN when none is); "none" is the share of
    images with no shape present."""
    labels = [classify(im) for im in images]
    present = [label for label in labels if label[0]]
    which, names = (1, COLOURS) if attribute == "colour" else (2, SHAPES)
    shares = {name: sum(label[which] == name for label in present) / len(present) if present else math.nan
              for name in names}
    return {"shares": shares, "none": 1 - len(present) / len(labels)}


def unnamed_attribute(prompt):
    """The attribute an under-specified prompt leaves open: "colour" for "a circle", else "shape"."""
    return "colour" if parse_prompt(prompt)[0] is None else "shape"


def world_histogram(prompt):
    """The real data's histogram for an under-specified prompt, exactly: colour and shape are drawn
    uniformly and independently of the caption."""
    names = COLOURS if unnamed_attribute(prompt) == "colour" else SHAPES
    return {"shares": {name: 1 / len(names) for name in names}, "none": 0.0}


def total_variation(p, q):
    """Half the sum of absolute differences of two histograms' shares: 0 alike, 1 disjoint."""
    return 0.5 * sum(abs(p[name] - q[name]) for name in p)


def tv_floor(histograms, count, draws=2000, seed=0):
    """{"colour": x, "shape": y}: the max TV (as compare() takes it) between two draws of `count`
    images each from the same histograms, median over `draws` pairs of draws. A generator that
    draws exactly its reference's histograms still reads about this much at this count: below it,
    a TV is sampling noise (the shipped teacher's, at 29 images per prompt, n=256: 0.24)."""
    rng = np.random.default_rng(seed)
    out = {}
    for attribute, prompts in (("colour", shape_prompts()), ("shape", colour_prompts())):
        shares = np.array([list(histograms[p]["shares"].values()) for p in prompts], np.float64)
        shares = shares[~np.isnan(shares).any(axis=1)]
        if not len(shares):
            out[attribute] = math.nan
            continue
        shares /= shares.sum(axis=1, keepdims=True)
        a = np.stack([rng.multinomial(count, q, size=draws) for q in shares], 1) / count  # (draws, prompts, names)
        b = np.stack([rng.multinomial(count, q, size=draws) for q in shares], 1) / count
        out[attribute] = float(np.median(0.5 * np.abs(a - b).sum(-1).max(-1)))
    return out


def spread(images, prompts):
    """{centre_x, centre_y, size}: the standard deviation over each prompt's images (from the
    foreground's bounding box, in image widths, as features()), averaged over the prompts.

    Per prompt, so a generator that puts each prompt at one fixed place scores 0 however the places
    differ between prompts. Only images with a shape present count; a prompt with fewer than two is
    left out, and the result is NaN when every prompt is."""
    feats = features(images)[:, -3:]
    present = np.array([classify(im)[0] for im in images], bool)
    prompts = np.asarray(prompts)
    sds = [feats[keep].std(axis=0, ddof=1) for keep in ((prompts == p) & present for p in dict.fromkeys(prompts))
           if keep.sum() >= 2]
    mean = np.mean(sds, axis=0) if sds else np.full(3, math.nan)
    return dict(zip(SPREAD_KEYS, map(float, mean)))


def _nan_stat(fn, values):
    """fn (max, mean) of the values that are not NaN; NaN when all are."""
    values = [v for v in values if not math.isnan(v)]
    return float(fn(values)) if values else math.nan


def _ratio(a, b):
    return a / b if b and not math.isnan(b) else math.nan


def compare(stats, reference):
    """How far a generator's diversity is from a reference's (the teacher's, or the world's).

    "tv": the total variation distance of each under-specified prompt's histogram; its max and mean
    over the colour-free prompts ("a circle": colour histograms, max_tv_colour) and over the
    shape-free ones ("a red shape": shape histograms, max_tv_shape), leaving out prompts where either
    side drew no shape at all (their "none" share shows it); "spread_ratio": spread over the
    reference's."""
    tv = {p: total_variation(h["shares"], reference["histograms"][p]["shares"])
          for p, h in stats["histograms"].items()}
    out = {"tv": tv}
    for attribute, prompts in (("colour", shape_prompts()), ("shape", colour_prompts())):
        out[f"max_tv_{attribute}"] = _nan_stat(max, [tv[p] for p in prompts])
        out[f"mean_tv_{attribute}"] = _nan_stat(np.mean, [tv[p] for p in prompts])
    out["spread_ratio"] = {k: _ratio(stats["spread"][k], reference["spread"][k]) for k in SPREAD_KEYS}
    return out

# -----------------------------------------------------------------------------
# Evaluation of generators


def world_reference(n, seed):
    """What every generator is scored against: n real images' features, n captions drawn from the
    caption distribution (the prompts of the Frechet distance), "real_fd" (a second real draw
    against the same images: the floor at this n) and the real data's diversity ("real")."""
    real, _ = sample_world(n, seed)
    _, captions = sample_world(n, seed + 1)
    real_feats = features(real)
    prompts = shape_prompts() + colour_prompts()
    return {"captions": captions, "real_feats": real_feats,
            "real_fd": frechet_distance(features(sample_world(n, seed + 2)[0]), real_feats),
            "real": {"empty_share": empty_share(real), "spread": spread(real, [""] * n),
                     "histograms": {p: world_histogram(p) for p in prompts}}}


def recording(generate):
    """(generate, list): the same generator, and a list of one flag per image it has returned since,
    True where no shape is present (the empty share over everything a generator made)."""
    empty = []

    def wrapped(*args):
        images = generate(*args)
        empty.extend(not classify(im)[0] for im in images)
        return images
    return wrapped, empty


def misses(images, prompts):
    """{"no shape": n, "colour": n, "shape": n, "both": n, "shapes": {"square as circle": n, ...}}:
    how the images that miss their prompt miss it (no shape present, the wrong colour, the wrong
    shape, or both), and which shape the check read in place of the prompted one."""
    out = {"no shape": 0, "colour": 0, "shape": 0, "both": 0, "shapes": {}}
    for image, prompt in zip(images, prompts, strict=True):
        present, colour, shape = classify(image)
        want_colour, want_shape = parse_prompt(prompt)
        wrong_colour, wrong_shape = want_colour not in (None, colour), want_shape not in (None, shape)
        if not present:
            out["no shape"] += 1
        elif wrong_colour or wrong_shape:
            out["both" if wrong_colour and wrong_shape else "colour" if wrong_colour else "shape"] += 1
        if present and wrong_shape:
            key = f"{want_shape} as {shape}"
            out["shapes"][key] = out["shapes"].get(key, 0) + 1
    return out


def per_prompt_accuracy(images, prompts):
    """{prompt: prompt accuracy over its images}, in the prompts' first-seen order."""
    prompts = np.asarray(prompts)
    return {p: prompt_accuracy(images[prompts == p], [p] * int((prompts == p).sum()))
            for p in dict.fromkeys(prompts.tolist())}


def score(generate, n, seed, reference):
    """One generator's numbers, without negative prompts (see evaluate for the counts and seeds)."""
    full_n, under_n = images_per_prompt(n)
    full = [p for p in all_prompts() for _ in range(full_n)]
    under = [p for p in shape_prompts() + colour_prompts() for _ in range(under_n)]
    full_images = generate(full, None, 0.0, seed + 3)
    fd_images = generate(reference["captions"], None, 0.0, seed + 4)
    under_images = generate(under, None, 0.0, seed + 9)
    accuracy = per_prompt_accuracy(full_images, full)
    worst = min(accuracy, key=accuracy.get)
    under_arr = np.asarray(under)
    return {"accuracy": prompt_accuracy(full_images, full),
            "fd": frechet_distance(features(fd_images), reference["real_feats"]),
            "per_prompt_accuracy": accuracy, "min_accuracy": accuracy[worst], "min_accuracy_prompt": worst,
            "misses": misses(full_images, full),
            "histograms": {p: histogram(under_images[under_arr == p], unnamed_attribute(p))
                           for p in shape_prompts() + colour_prompts()},
            "spread": spread(np.concatenate([full_images, under_images]), full + under)}


def evaluate(generate_teacher, generate_student, n=256, seed=0, nasa_scale=nasa.PAPER_ALPHA['shapes']):
    """Score generators on the world's checks; generate_teacher may be None.

    Each generator is called as generate(prompts, negative_prompts, nasa_scale, seed) and
    returns (N, 32, 32, 3) uint8; runs without a negative prompt pass None and scale 0. n is images
    per figure:
    - prompt accuracy, per prompt and over all: the 18 colour-and-shape prompts, n // 18 images
      each (seed + 3); "min_accuracy" is the worst prompt's ("min_accuracy_prompt");
    - Frechet distance: n prompts drawn from the caption distribution (seed + 4), against n real
      images; "real_fd", a second real draw against the same images, is the floor at this n;
    - diversity: the 9 under-specified prompts, ceil(n / 9) images each (seed + 9): "histograms",
      the colours drawn for "a circle" and the shapes drawn for "a red shape"; "spread", per prompt
      over these images and the accuracy figure's (see spread); "empty_share", over every image
      the generator made here, the negative-prompt rows' included; "vs_real" (and for the student
      "vs_teacher" when there is a teacher) compares the histograms and spreads (see compare);
    - negative prompts (student only): n // 4 images per pair (seeds + 5 to + 8), with the same
      seed with and without NASA, so that the two runs differ only by NASA.
    """
    reference = world_reference(n, seed)
    full_n, under_n = images_per_prompt(n)
    results = {"n": n, "nasa_scale": nasa_scale, "images_per_full_prompt": full_n,
               "images_per_underspecified_prompt": under_n, "real_fd": reference["real_fd"],
               "real": reference["real"]}
    for name, generate in (("teacher", generate_teacher), ("student", generate_student)):
        if generate is None:
            results[name] = None
            continue
        generate, empty = recording(generate)
        stats = score(generate, n, seed, reference)
        if name == "student":
            results["negative"] = [_negative_row(generate, prompt, negative, max(1, n // 4), seed + 5 + i, nasa_scale)
                                   for i, (prompt, negative) in enumerate(NEGATIVE_PAIRS)]
        results[name] = {**stats, "empty_share": float(np.mean(empty)), "vs_real": compare(stats, reference["real"])}
    if results["teacher"] is not None:
        results["student"]["vs_teacher"] = compare(results["student"], results["teacher"])
        results["tv_floor"] = tv_floor(results["teacher"]["histograms"], under_n)
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


def negative_sweep(generate, scales, n=64, seed=0, pairs=SWEEP_PAIRS):
    """Negative-prompt success against positive accuracy along one method's scale. For each scale,
    n images per pair, pair i at seed + i whatever the scale, so two scales differ only by the scale;
    per scale the mean and the minimum success over the pairs and the mean positive accuracy."""
    rows = []
    for scale in scales:
        per = [negative_success(generate([p] * n, [neg] * n, scale, seed + i), p, neg)
               for i, (p, neg) in enumerate(pairs)]
        success, accuracy = np.array(per, float).T
        rows.append({"scale": scale, "success": float(np.nanmean(success)), "min_success": float(np.nanmin(success)),
                     "accuracy": float(accuracy.mean()), "min_accuracy": float(accuracy.min()),
                     "pairs": [{"prompt": p, "negative": neg, "success": s_, "accuracy": a}
                               for (p, neg), (s_, a) in zip(pairs, per)]})
    return rows


LOSS_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def denoising_losses(checkpoints, n=256, seed=0, timesteps=LOSS_TIMESTEPS):
    """{checkpoint: {t: (with caption, with the null prompt)}}: each network's mse against its own
    target (eps or v) on the same n real images and noise at each t. Where a teacher denoises
    worse than another, and how much its prompt helps it there (the gap between the two)."""
    import torch.nn.functional as F

    import model as M
    import sample
    images, captions = sample_world(n, seed)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    result = {}
    for checkpoint in checkpoints:
        pipe = sample.load(checkpoint)
        if not isinstance(pipe.vae, M.PixelSpace) or pipe.denoiser.cfg.sample_size != IMAGE_SIZE:
            raise cli.UserError(f"{checkpoint} is not a model of this world (pixel space, {IMAGE_SIZE}x{IMAGE_SIZE})")
        c, cm, _ = pipe.text_encoder.encode(captions)
        u, um, _ = pipe.text_encoder.null()
        u, um = u.expand_as(c), None if um is None else um.expand_as(cm)
        row = {}
        for t in timesteps:
            tt = torch.full((n,), t)
            x_t, target = pipe.schedule.add_noise(x0, eps, tt), pipe.schedule.target(x0, eps, tt)
            row[t] = tuple(F.mse_loss(pipe.denoiser(x_t, tt, cc, mm)[:, :3], target).item()
                           for cc, mm in ((c, cm), (u, um)))
        result[str(checkpoint)] = row
    return result


def format_losses(losses):
    timesteps = next(iter(losses.values())).keys()
    lines = ["| checkpoint | " + " | ".join(f"t={t}" for t in timesteps) + " |", "|---" * (len(timesteps) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in row.values()) + " |"
              for name, row in losses.items()]
    return "\n".join(lines + ["(mse against the network's own target: with the caption / with the null prompt)"])


def format_sweep(rows, method):
    lines = [f"| {method} scale | mean success | min success | mean accuracy | min accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['scale']:g} | {_fmt(r['success'])} | {_fmt(r['min_success'])} | {_fmt(r['accuracy'])} "
              f"| {_fmt(r['min_accuracy'])} |" for r in rows]
    return "\n".join(lines)


def _fmt(value):
    """A score with three decimals; "n/a" for a missing model or an undefined rate."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _summary_row(label, row, against):
    """One row of the summary table: a generator's numbers, its TV against `against`'s histograms."""
    sd = row["spread"]
    tv = row.get(f"vs_{against}", {}) if against else {}
    return (f"| {label} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('min_accuracy'))}"
            f"{' (' + row['min_accuracy_prompt'] + ')' if 'min_accuracy_prompt' in row else ''} | "
            f"{_fmt(row.get('fd'))} | {_fmt(row['empty_share'])} | {_fmt(sd['centre_x'])} | "
            f"{_fmt(sd['centre_y'])} | {_fmt(sd['size'])} | {against or 'n/a'} | "
            f"{_fmt(tv.get('max_tv_colour'))} | {_fmt(tv.get('max_tv_shape'))} |")


def format_summary(results):
    """The summary table: one row per model (and the real data)."""
    lines = ["| model | accuracy | min prompt accuracy | FD to real | empty share | sd centre x | sd centre y "
             "| sd size | TV against | max TV colour | max TV shape |", "|---|" + "---|" * 10,
             _summary_row("real images, another draw", {**results["real"], "fd": results["real_fd"]}, None)]
    for name in ("teacher", "student"):
        row = results[name]
        if row is None:
            lines.append(f"| {name} |" + " n/a |" * 10)
        else:
            lines.append(_summary_row(name, row, "teacher" if "vs_teacher" in row else "real"))
    return lines


def format_histograms(results, attribute):
    """Teacher and student histograms of one attribute for the prompts that leave it unnamed."""
    names = COLOURS if attribute == "colour" else SHAPES
    prompts = shape_prompts() if attribute == "colour" else colour_prompts()
    lines = [f"| prompt | model | {' | '.join(names)} | none | TV |", "|---|---|" + "---|" * (len(names) + 2)]
    for prompt in prompts:
        for name in ("teacher", "student"):
            row = results[name]
            if row is None:
                continue
            h = row["histograms"][prompt]
            against = row.get("vs_teacher") or row["vs_real"]
            lines.append(f"| {prompt} | {name} | " + " | ".join(_fmt(h["shares"][k]) for k in names)
                         + f" | {_fmt(h['none'])} | {_fmt(against['tv'][prompt])} |")
    return lines


def format_report(results):
    """The results of evaluate() as plain-text markdown tables."""
    models = [name for name in ("teacher", "student") if results[name] is not None]
    lines = [f"Shapes-world evaluation (n={results['n']}: {results['images_per_full_prompt']} images per "
             f"colour-and-shape prompt, {results['images_per_underspecified_prompt']} per prompt that "
             "leaves the colour or the shape unnamed)", "", *format_summary(results), "",
             "TV: total variation distance between the histograms of the colours drawn for \"a circle\", "
             "\"a square\", \"a triangle\" (TV colour) or of the shapes drawn for \"a red shape\" ... "
             "(TV shape) and those of the model named (real: uniform); max over the prompts. sd: standard "
             "deviation over a prompt's images, in image widths, averaged over the prompts."]
    student = results["student"]
    if student is not None and "vs_teacher" in student:
        vs = student["vs_teacher"]
        ratio = vs["spread_ratio"]
        lines += ["", f"Student / teacher spread: centre x {_fmt(ratio['centre_x'])}, centre y "
                  f"{_fmt(ratio['centre_y'])}, size {_fmt(ratio['size'])}; mean TV against the teacher: "
                  f"colour {_fmt(vs['mean_tv_colour'])}, shape {_fmt(vs['mean_tv_shape'])}. "
                  + _floor_sentence(results["tv_floor"], results["images_per_underspecified_prompt"])]
    for name in models:
        m = results[name]["misses"]
        confusions = ", ".join(f"{k} {v}" for k, v in sorted(m["shapes"].items(), key=lambda kv: -kv[1]))
        lines += ["", f"Misses of the {name} on the colour-and-shape prompts: no shape {m['no shape']}, wrong colour "
                  f"{m['colour']}, wrong shape {m['shape']}, both {m['both']}"
                  + (f"; the shape read in place of the prompted one: {confusions}." if confusions else ".")]
    lines += ["", "Prompt accuracy per prompt:", "", f"| prompt | {' | '.join(models)} |",
              "|---|" + "---|" * len(models)]
    for prompt in all_prompts():
        lines.append(f"| {prompt} | " + " | ".join(_fmt(results[m]["per_prompt_accuracy"][prompt]) for m in models) + " |")
    for attribute, what in (("colour", "Colours drawn for the prompts that name no colour"),
                            ("shape", "Shapes drawn for the prompts that name no shape")):
        lines += ["", f"{what} (shares of the images with a shape present; none: share with no shape; TV: "
                  "the student's against the teacher's where there is one, the teacher's against the real "
                  "data's uniform):", "",
                  *format_histograms(results, attribute)]
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
# A small CLIP of the world, for evaluate.py's CLIP measures


def clip_caption(rng, colour, shape):
    """A true description of a scene, of one of five kinds: "a red circle", "a circle", "a red shape",
    and the bare words "red" and "circle", which negative prompts use."""
    kind = rng.integers(5)
    return [f"a {colour} {shape}", f"a {shape}", f"a {colour} shape", colour, shape][kind]


def train_clip(out="runs/shapes_clip", steps=800, batch_size=128, lr=2e-3, seed=0,
               text_folder="checkpoints/shapes_text", pool=20000):
    """Train a small transformers CLIPModel on the world's images and captions; writes it, with the
    world's tokenizer, to `out`, and returns its zero-shot accuracy on 512 fresh real images (the
    colour among six, the shape among three). A caption is true of every image it describes, so the
    contrastive targets spread over all of them (CLIP's loss with several positives)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    tokenizer = AutoTokenizer.from_pretrained(Path(text_folder) / "tokenizer")
    vocab = build_vocab()[0]
    eos = vocab["<|endoftext|>"]
    width = 64
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))
    scenes = sample_scenes(pool, seed)
    named_ids = {None: -1, **{c: i for i, c in enumerate(COLOURS)}, **{x: i for i, x in enumerate(SHAPES)}}
    attrs = np.array([(named_ids[s.colour], named_ids[s.shape]) for s in scenes])  # (pool, 2)
    images = torch.from_numpy(np.stack([render(s.shape, s.colour, s.size, s.cx, s.cy) for s in scenes]))
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1                   # (pool, 3, 32, 32) in [-1, 1]
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]  # CLIP's, which evaluate.py applies
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    pixels = ((images + 1) / 2 - mean) / std
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = rng.integers(pool, size=batch_size)
        captions = [clip_caption(rng, scenes[i].colour, scenes[i].shape) for i in idx]
        named = np.array([[named_ids[w] for w in parse_prompt(c)] for c in captions])  # (B, 2), -1: unnamed
        true = torch.from_numpy(((named[None, :, 0] < 0) | (named[None, :, 0] == attrs[idx, None, 0])) &
                                ((named[None, :, 1] < 0) | (named[None, :, 1] == attrs[idx, None, 1])))
        true = true.float()                                                   # [i, j]: caption j describes image i
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        logits = model(input_ids=ids, pixel_values=pixels[idx]).logits_per_image  # (B images, B captions)
        loss = (torch.sum(-true / true.sum(1, keepdim=True) * logits.log_softmax(1), 1).mean() +
                torch.sum(-true / true.sum(0, keepdim=True) * logits.log_softmax(0), 0).mean()) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    test = sample_scenes(512, seed + 1)
    test_px = torch.from_numpy(np.stack([render(s.shape, s.colour, s.size, s.cx, s.cy) for s in test]))
    test_px = ((test_px.permute(0, 3, 1, 2).float() / 255) - mean) / std
    acc = {}
    with torch.no_grad():
        for name, names, truth in (("colour", list(COLOURS), [s.colour for s in test]),
                                   ("shape", list(SHAPES), [s.shape for s in test])):
            ids = tokenizer(names, padding="max_length", max_length=tokenizer.model_max_length,
                            return_tensors="pt").input_ids
            got = model(input_ids=ids, pixel_values=test_px).logits_per_image.argmax(1)
            acc[name] = float(np.mean([names[g] == t for g, t in zip(got.tolist(), truth)]))
    return acc

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


def pipe_sampler(pipe, steps=1, cfg=1.0, layers=None, nag=None):
    """A generate callable for evaluate() from a loaded model.Pipeline, through sample.py; `layers`
    restricts NASA to some cross-attention layers (as sample.py --nasa-layers). nag: (tau, alpha) to
    steer with NAG in place of NASA, the callable's scale then being NAG's (1: off)."""
    import sample

    def generate(prompts, negative_prompts, nasa_scale, seed):
        negative = None
        if negative_prompts:
            assert len(set(negative_prompts)) == 1, "one negative prompt per call"
            negative = negative_prompts[0]
        steer = nasa.NAG(nasa_scale, *nag) if nag is not None and negative is not None else None
        images = sample.generate(pipe, prompts, negative, nasa_scale, seed=seed, steps=steps, cfg=cfg,
                                 layers=layers, nag=steer)
        return sample.to_uint8(images)
    return generate


def sampler(checkpoint, steps=1, cfg=1.0, layers=None, nag=None):
    """pipe_sampler of a checkpoint folder (read by sample.load)."""
    import sample
    return pipe_sampler(sample.load(checkpoint), steps, cfg, layers, nag)


def run_students(run, last=False):
    """[(step, folder)] of what `curve` scores in a folder: a train.py run's checkpoints/step-N (every
    one, or the newest with last); without checkpoints/, its final student/; or the folder itself
    when it is a checkpoint folder (denoiser.safetensors). step is None for a final student."""
    run = Path(run)
    ckpts = sorted(run.glob("checkpoints/step-???????"))
    if ckpts:
        return [(int(c.name[len("step-"):]), c) for c in (ckpts[-1:] if last else ckpts)]
    for folder in (run / "student", run):
        if (folder / "denoiser.safetensors").is_file():
            return [(None, folder)]
    raise cli.UserError(f"{run} holds no checkpoints/step-N, no student/ and no denoiser.safetensors: "
                        "pass a train.py output folder or a checkpoint folder")


def student_pipe(skeleton, run, folder):
    """The pipeline of one scored student: a checkpoint folder loads whole; a training checkpoint's
    student weights (their EMA where the run keeps one) go into the teacher's pipeline, sampled in
    one step from the start timestep the run's final student records (the last one without it)."""
    import sample
    from safetensors.torch import load_file
    if (folder / "denoiser.safetensors").is_file():
        return sample.load(folder)
    state = load_file(str(folder / "state.safetensors"))
    prefix = "ema." if any(k.startswith("ema.") for k in state) else "student."
    skeleton.denoiser.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    record = Path(run, "student", "schedule.json")
    skeleton.student_t = json.loads(record.read_text()).get("student_t") if record.is_file() else None
    return skeleton


def scored(generate, n, seed, reference, teacher=None):
    """score() of one generator with its empty share, compared with the world and the teacher."""
    generate, empty = recording(generate)
    stats = score(generate, n, seed, reference)
    stats["empty_share"] = float(np.mean(empty))
    stats["vs_real"] = compare(stats, reference["real"])
    if teacher is not None:
        stats["vs_teacher"] = compare(stats, teacher)
    return stats


def curve_settings(teacher, n, seed, teacher_steps, teacher_cfg):
    """What a curve's teacher numbers depend on, as its JSON records them (and --teacher-from checks)."""
    return {"n": n, "seed": seed, "teacher_path": str(Path(teacher).resolve()), "teacher_steps": teacher_steps,
            "teacher_cfg": teacher_cfg}


def training_curves(teacher, runs, n=256, seed=0, teacher_steps=25, teacher_cfg=3.0, last=False, teacher_scores=None):
    """{"teacher": its numbers, "runs": {run: [point, ...]}}: score() of each student of each run
    (see run_students), one step, with the same prompts and seeds as evaluate (the paper's Figure 2
    protocol, with the diversity numbers). Each point also carries "step" and "vs_teacher". The
    teacher (DDIM, teacher_steps steps, CFG teacher_cfg) is sampled once, however many points, or
    not at all when teacher_scores holds its numbers from an earlier curve with the same settings."""
    import sample
    reference = world_reference(n, seed)
    found = {run: run_students(run, last) for run in runs}  # a bad folder fails before any sampling
    if teacher_scores is None:
        teacher_scores = scored(sampler(teacher, teacher_steps, teacher_cfg), n, seed, reference)
    result = {**curve_settings(teacher, n, seed, teacher_steps, teacher_cfg), "teacher": teacher_scores, "runs": {}}
    result["tv_floor"] = tv_floor(result["teacher"]["histograms"], images_per_prompt(n)[1])
    skeleton = sample.load(teacher)
    for run, students in found.items():
        result["runs"][run] = [{"step": step, **scored(pipe_sampler(student_pipe(skeleton, run, folder)), n, seed,
                                                       reference, result["teacher"])}
                               for step, folder in students]
    return result


def _mean_sd(values):
    """mean +- standard deviation over seeds; the mean alone for one value; n/a for none."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    return _fmt(float(np.mean(values))) + (f" +- {np.std(values):.3f}" if len(values) > 1 else "")


CURVE_COLUMNS = (  # (heading, the value of a point)
    ("FD", lambda p: p["fd"]), ("accuracy", lambda p: p["accuracy"]),
    ("min prompt accuracy", lambda p: p["min_accuracy"]), ("empty share", lambda p: p["empty_share"]),
    ("sd x / teacher", lambda p: p["vs_teacher"]["spread_ratio"]["centre_x"]),
    ("sd y / teacher", lambda p: p["vs_teacher"]["spread_ratio"]["centre_y"]),
    ("sd size / teacher", lambda p: p["vs_teacher"]["spread_ratio"]["size"]),
    ("max TV colour", lambda p: p["vs_teacher"]["max_tv_colour"]),
    ("max TV shape", lambda p: p["vs_teacher"]["max_tv_shape"]))


def _floor_sentence(floor, count):
    return (f"Two draws of the teacher's own histograms, {count} images per prompt, differ by a max TV of "
            f"{_fmt(floor['colour'])} (colour) and {_fmt(floor['shape'])} (shape), median of 2000: "
            "TVs below that are sampling noise.")


def format_curves(curves):
    """training_curves() as markdown: the teacher's numbers, then one row per group of runs and step.
    Runs named NAME-sSEED are one group, shown as mean +- standard deviation over seeds; a final
    student (no step) is shown as step "final". TV is against the teacher's histograms."""
    t = curves["teacher"]
    lines = [f"Teacher ({curves['teacher_steps']} DDIM steps, CFG {curves['teacher_cfg']}, n={curves['n']}): "
             f"FD {_fmt(t['fd'])}, accuracy {_fmt(t['accuracy'])}, min prompt accuracy "
             f"{_fmt(t['min_accuracy'])} ({t['min_accuracy_prompt']}), empty share {_fmt(t['empty_share'])}, "
             f"sd centre x / y / size {_fmt(t['spread']['centre_x'])} / {_fmt(t['spread']['centre_y'])} / "
             f"{_fmt(t['spread']['size'])}, max TV against the real data: colour "
             f"{_fmt(t['vs_real']['max_tv_colour'])}, shape {_fmt(t['vs_real']['max_tv_shape'])}. "
             + _floor_sentence(curves["tv_floor"], images_per_prompt(curves["n"])[1]), ""]
    groups = {}
    for run, points in curves["runs"].items():
        groups.setdefault(re.sub(r"-s\d+$", "", Path(run).name), []).append({p["step"]: p for p in points})
    lines += ["| run | step | " + " | ".join(h for h, _ in CURVE_COLUMNS) + " | worst prompt |",
              "|---|---|" + "---|" * (len(CURVE_COLUMNS) + 1)]
    for name, runs in groups.items():
        label = f"{name} ({len(runs)} run{'s' * (len(runs) > 1)})"
        steps = sorted({s for c in runs for s in c}, key=lambda s: (s is None, s or 0))
        for step in steps:
            points = [c[step] for c in runs if step in c]
            worst = sorted({p["min_accuracy_prompt"] for p in points})
            lines.append(f"| {label} | {'final' if step is None else step} | "
                         + " | ".join(_mean_sd([value(p) for p in points]) for _, value in CURVE_COLUMNS)
                         + f" | {' / '.join(worst)} |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# Training the world's teacher


TEACHER_ARCHS = ("shapes", "shapes_dit")  # model.PRESETS: the world's UNet and its pixel-space DiT


def train_teacher(out="runs/shapes_teacher", steps=2400, batch_size=32, lr=1e-3, ema=0.999, seed=0,
                  text_encoder="checkpoints/shapes_text", prediction_type="v_prediction", save_every=500,
                  log_every=10, resume=False, device="", arch="shapes"):
    """Train the shapes UNet (arch 'shapes') or DiT ('shapes_dit') from scratch on real samples by
    plain denoising; write out/teacher.

    The network's own target (v for a v network), no null-prompt dropout (the null caption is 10% of
    the world's), AdamW with a 2% warm-up then cosine decay to zero, gradients clipped at 1, an EMA
    of the weights (0: none) saved as the teacher. out/checkpoints hold resumable states, out/log.jsonl
    the losses. Step s trains on sample_world(batch_size, seed * 10**7 + s).
    """
    import hashlib
    import time

    from tqdm import tqdm

    import model as M
    import vsd
    from train import cache_prompts, lerp_ema, load_training_state, lr_factor, save_training_state
    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)  # the initial weights
    net = M.build(M.PRESETS[arch]).to(device)
    schedule = M.NoiseSchedule(M.Schedule(prediction_type=prediction_type)).to(device)
    prompts = world_captions() + [""]
    digest = hashlib.sha1(json.dumps([str(text_encoder), prompts]).encode()).hexdigest()[:12]
    prompts, ctx, _, _, null = cache_prompts(M.TextEncoder(text_encoder).to(device), prompts,
                                          out / "prompt_cache" / f"{digest}-0-of-1.safetensors")
    null = (null[0].to(device), None)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    trained = {"student": net}  # the names train.py's checkpoints use, so its teacher runs resume here
    ema_net = None
    if ema > 0:
        ema_net = M.build(net.cfg).to(device).requires_grad_(False)
        ema_net.load_state_dict(net.state_dict())
        trained["ema"] = ema_net
    generator = torch.Generator(device).manual_seed(seed * 1000)
    step = load_training_state(out, trained, {"student": opt}, generator, "shapes.py") if resume else 0
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    bar = tqdm(total=steps, initial=step, desc="teacher")
    with open(out / "log.jsonl", "a") as log:
        while step < steps:
            t0 = time.time()
            for group in opt.param_groups:  # a function of the step alone: --resume needs no scheduler state
                group["lr"] = lr * lr_factor("cosine", step, steps)
            # train.py's teacher mode drew caption indices here and then used the images' own captions;
            # the draw stays so the generator's stream, and the shipped teacher, are as train.py made them.
            torch.randint(len(prompts), (batch_size,), generator=generator, device=device)
            images, captions = sample_world(batch_size, seed=seed * 10**7 + step)
            x0 = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
            c = ctx[[prompts.index(p) for p in captions]].to(device)
            with autocast:
                loss = vsd.denoising_loss(net, schedule, x0, (c, None), null, 0.0, loss="native", generator=generator)
            vsd.optimizer_step(opt, loss, grad_clip=1.0)
            if ema_net is not None:
                lerp_ema(ema_net, net, ema, step)
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                log.write(json.dumps({"step": step, "loss": loss.item(), "sec": round(time.time() - t0, 3)}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % save_every == 0 or step == steps:
                save_training_state(out, step, trained, {"student": opt}, generator, keep=2)
    bar.close()
    M.save_checkpoint(out / "teacher", (ema_net or net).eval(), M.PixelSpace(), schedule, text_folder=text_encoder)
    return out / "teacher"

# -----------------------------------------------------------------------------
# Command line


@cli.script("shapes.py")
def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, summary):
        return commands.add_parser(name, help=summary, description=summary,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    make = command("make-text-encoder", "write OUT/text_encoder and OUT/tokenizer")
    make.add_argument("out", help="checkpoint folder to write into")
    make.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    make.add_argument("--hidden-size", type=int, default=64, help="width of the text encoder")
    show = command("show", "write a grid of 64 real samples to OUT.png")
    show.add_argument("out", help="PNG file to write")
    show.add_argument("--seed", type=int, default=0, help="seed of the samples")
    prompts = command("prompts", "write the world's distinct non-null captions to OUT, one per line, sorted")
    prompts.add_argument("out", help="text file to write")
    negs = command("negatives", "write NASA-T's negative prompts of the world to OUT, one per line: each colour "
                                "and each shape (for train.py --nasa-train --negative-prompts OUT)")
    negs.add_argument("out", help="text file to write")
    real = command("real-images", "write n real images of the world to OUT, a safetensors file whose 'images' "
                                  "tensor is uint8 (n, 32, 32, 3) (for train.py --gan-weight --real-images OUT)")
    real.add_argument("out", help="safetensors file to write")
    real.add_argument("--n", type=int, default=4096, help="images")
    real.add_argument("--seed", type=int, default=1, help="seed of the images")
    tt = command("train-teacher", "train the world's teacher from scratch (plain denoising); writes OUT/teacher")
    tt.add_argument("--out", default="runs/shapes_teacher", help="output folder: checkpoints/, log.jsonl, teacher/")
    tt.add_argument("--steps", type=int, default=2400, help="training steps")
    tt.add_argument("--batch-size", type=int, default=32, help="real images per step")
    tt.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (2%% warm-up, cosine decay to 0)")
    tt.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights, saved as the teacher (0: none)")
    tt.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the noise and the images")
    tt.add_argument("--text-encoder", default="checkpoints/shapes_text", help="folder with text_encoder/ and tokenizer/")
    tt.add_argument("--prediction-type", default="v_prediction", choices=["v_prediction", "epsilon"],
                    help="what the network predicts (v: a one-step student reads x0 without dividing by alpha_T)")
    tt.add_argument("--save-every", type=int, default=500, help="write a resumable checkpoint every N steps")
    tt.add_argument("--log-every", type=int, default=10, help="append the loss to log.jsonl every N steps")
    tt.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    tt.add_argument("--device", default="", help="device ('': cuda if available, else cpu)")
    tt.add_argument("--arch", default="shapes", help=f"the network, one of {', '.join(TEACHER_ARCHS)} "
                                                     "(model.py presets: the UNet, the pixel-space DiT)")
    tc = command("train-clip", "train a small CLIP of the world for evaluate.py --clip (one thread: minutes)")
    tc.add_argument("--out", default="runs/shapes_clip", help="folder to write the CLIPModel and tokenizer to")
    tc.add_argument("--steps", type=int, default=800, help="training steps")
    tc.add_argument("--batch-size", type=int, default=128, help="images (and captions) per step")
    tc.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine decay to 0)")
    tc.add_argument("--seed", type=int, default=0, help="seed of the weights and the images")
    tc.add_argument("--text-encoder", default="checkpoints/shapes_text", help="folder whose tokenizer/ is used")
    ev = command("evaluate", "score a teacher and a one-step student on the world's checks")
    ev.add_argument("--teacher", default="checkpoints/shapes_teacher", help="teacher checkpoint ('' to skip)")
    ev.add_argument("--student", default="checkpoints/shapes_student", help="one-step student checkpoint")
    ev.add_argument("--teacher-steps", type=int, default=25, help="DDIM steps for the teacher")
    ev.add_argument("--teacher-cfg", type=float, default=3.0, help="guidance scale for the teacher")
    ev.add_argument("--nasa-scale", type=float, default=nasa.PAPER_ALPHA["shapes"],
                    help="NASA alpha for the negative-prompt rows")
    layer_list = lambda v: v.split(",") if v else None  # argparse applies it to the '' default too
    ev.add_argument("--nasa-layers", default="", type=layer_list,
                    help="comma-separated substrings of the cross-attention layers NASA acts in ('': all)")
    ev.add_argument("--n", type=int, default=256,
                    help="images per figure: n // 18 per colour-and-shape prompt, ceil(n / 9) per prompt that "
                         "leaves the colour or the shape unnamed, n captions for the Frechet distance, n // 4 "
                         "per negative-prompt pair")
    ev.add_argument("--seed", type=int, default=0, help="seed of the evaluation")
    ev.add_argument("--json", default="", help="also write the results to this JSON file")
    sw = command("sweep", "negative-prompt success against positive accuracy of a one-step student, along "
                           "NASA's or NAG's scale, on eight pairs (shapes.SWEEP_PAIRS); or of a teacher along "
                           "its CFG scale, the negative prompt in the unconditional slot (what NASA-T distils)")
    sw.add_argument("student", help="one-step student checkpoint (--guidance cfg: a teacher)")
    sw.add_argument("--guidance", default="nasa", choices=["nasa", "nag", "cfg"], help="the negative guidance swept")
    sw.add_argument("--scales", default="", help="comma-separated scales ('': NASA 0,0.1,0.2,0.3,0.5,0.8; "
                                                "NAG 1,1.5,2,3,5,8; CFG 1,2,3,4.5,7.5; the first is off in all)")
    sw.add_argument("--steps", type=int, default=10, help="DDIM steps of --guidance cfg")
    sw.add_argument("--nag-tau", type=float, default=2.5, help="NAG's bound on the norm ratio")
    sw.add_argument("--nag-alpha", type=float, default=0.375, help="NAG's blend with the positive features")
    sw.add_argument("--nasa-layers", default="", type=layer_list,
                    help="comma-separated substrings of the cross-attention layers NASA or NAG acts in ('': all)")
    sw.add_argument("--n", type=int, default=64, help="images per pair and scale")
    sw.add_argument("--seed", type=int, default=0, help="seed of the sweep (pair i at seed + i)")
    sw.add_argument("--json", default="", help="also write the rows to this JSON file")
    los = command("losses", "each checkpoint's denoising error on real images at a few timesteps, with the "
                             "caption and with the null prompt (where a teacher is weak, and what its prompt buys)")
    los.add_argument("checkpoints", nargs="+", help="checkpoint folders of this world (teachers or students)")
    los.add_argument("--n", type=int, default=256, help="real images, the same for every checkpoint and timestep")
    los.add_argument("--seed", type=int, default=0, help="seed of the images and the noise")
    cur = command("curve", "prompt accuracy, Frechet distance and diversity of the students of train.py runs "
                           "(Figure 2), against the teacher's")
    cur.add_argument("runs", nargs="+", help="train.py output folders (their checkpoints/, else their student/), "
                                             "or checkpoint folders")
    cur.add_argument("--teacher", default="checkpoints/shapes_teacher",
                     help="the teacher the runs started from: the reference, sampled once")
    cur.add_argument("--teacher-steps", type=int, default=25, help="DDIM steps for the teacher")
    cur.add_argument("--teacher-cfg", type=float, default=3.0, help="guidance scale for the teacher")
    cur.add_argument("--last", action="store_true", help="score only each run's newest checkpoint")
    cur.add_argument("--teacher-from", default="",
                     help="an earlier curve's --json: take the teacher's numbers from it instead of sampling the "
                          "teacher again (the same --teacher, --n, --seed, --teacher-steps and --teacher-cfg)")
    cur.add_argument("--n", type=int, default=256, help="images per figure (as in evaluate)")
    cur.add_argument("--seed", type=int, default=0, help="seed of the evaluation (as in evaluate)")
    cur.add_argument("--json", default="", help="also write the curves to this JSON file")
    args = parser.parse_args(argv)
    check_args(args)
    if args.command == "curve":
        curves = training_curves(args.teacher, args.runs, args.n, args.seed, args.teacher_steps,
                                 args.teacher_cfg, args.last, args.teacher_scores)
        print(format_curves(curves))
        _write_json(args.json, curves)
    elif args.command == "evaluate":
        torch.manual_seed(args.seed)
        teacher = sampler(args.teacher, args.teacher_steps, args.teacher_cfg) if args.teacher else None
        results = evaluate(teacher, sampler(args.student, layers=args.nasa_layers), n=args.n, seed=args.seed,
                           nasa_scale=args.nasa_scale)
        print(format_report(results))
        _write_json(args.json, results)
    elif args.command == "losses":
        print(format_losses(denoising_losses(args.checkpoints, args.n, args.seed)))
    elif args.command == "sweep":
        if args.guidance == "cfg":  # the scale is CFG's: (1 - kappa) eps(y-) + kappa eps(y), over DDIM steps
            import sample
            pipe = sample.load(args.student)
            generate = lambda prompts, negs, kappa, seed: pipe_sampler(pipe, args.steps, kappa)(prompts, negs, 0.0, seed)
        else:
            generate = sampler(args.student, layers=args.nasa_layers,
                               nag=(args.nag_tau, args.nag_alpha) if args.guidance == "nag" else None)
        rows = negative_sweep(generate, args.scales, args.n, args.seed)
        print(format_sweep(rows, args.guidance))
        _write_json(args.json, rows)
    elif args.command == "train-clip":
        acc = train_clip(args.out, args.steps, args.batch_size, args.lr, args.seed, args.text_encoder)
        print(f"wrote {args.out}; zero-shot accuracy on 512 real images: colour {acc['colour']:.3f}, "
              f"shape {acc['shape']:.3f}")
    elif args.command == "train-teacher":
        folder = train_teacher(args.out, args.steps, args.batch_size, args.lr, args.ema, args.seed,
                               args.text_encoder, args.prediction_type, args.save_every, args.log_every,
                               args.resume, args.device, args.arch)
        print(f"wrote {folder}")
    elif args.command == "negatives":
        write_negatives(args.out)
        print(f"wrote {len(negative_prompts())} negative prompts to {args.out}")
    elif args.command == "real-images":
        from safetensors.torch import save_file
        images, _ = sample_world(args.n, args.seed)
        save_file({"images": torch.from_numpy(images)}, args.out)
        print(f"wrote {args.n} real images to {args.out}")
    elif args.command == "prompts":
        write_prompts(args.out)
        print(f"wrote {len(world_captions())} prompts to {args.out}")
    elif args.command == "make-text-encoder":
        make_text_encoder(args.out, seed=args.seed, hidden_size=args.hidden_size)
        print(f"wrote {args.out}/text_encoder and {args.out}/tokenizer")
    else:
        images, captions = sample_world(64, args.seed)
        save_grid(images, args.out)
        print(f"wrote {args.out}; captions, row by row:\n" + " | ".join(captions))


def earlier_teacher(args):
    """The teacher's numbers in the curve JSON args.teacher_from, when it was scored as args asks."""
    path = Path(args.teacher_from)
    try:
        earlier = json.loads(path.read_text())
        problem = "" if isinstance(earlier, dict) and "teacher" in earlier else "no teacher numbers in it"
    except (OSError, ValueError) as e:
        problem = str(e)
    if problem:
        raise cli.UserError(f"--teacher-from {path}: not a curve JSON ({problem}); pass a file written by curve --json")
    wanted = curve_settings(args.teacher, args.n, args.seed, args.teacher_steps, args.teacher_cfg)
    for key, value in wanted.items():
        if earlier.get(key) != value:
            raise cli.UserError(f"--teacher-from {path} scored the teacher with {key} {earlier.get(key)!r}, this "
                                f"curve asks for {value!r}: pass the same settings, or leave out --teacher-from")
    return earlier["teacher"]


def check_args(args):
    """Numbers, devices and the paths to read and write, before any sampling or training."""
    cli.number("--seed", getattr(args, "seed", None), low=0, high=2 ** 31 - 1)
    if args.command in ("evaluate", "curve"):
        cli.number("--n", args.n, low=len(all_prompts()),
                   fix=f"each of the {len(all_prompts())} colour-and-shape prompts needs an image")
        cli.number("--teacher-steps", args.teacher_steps, low=1)
        cli.number("--teacher-cfg", args.teacher_cfg)
        reads = [("the teacher", args.teacher)] + ([("the student", args.student)] if args.command == "evaluate"
                                                   else [("a run", r) for r in args.runs])
        for what, path in reads:
            if path and not Path(path).exists():
                raise cli.UserError(f"{what} {path} not found (pass a checkpoint folder"
                                    f"{' or a train.py output folder' if what == 'a run' else ''})")
        if args.json:
            cli.not_an_input("--json", args.json, reads)
            cli.writable_file("--json", args.json)
    if args.command == "evaluate":
        cli.number("--nasa-scale", args.nasa_scale, low=0)
    if args.command == "sweep":
        cli.number("--n", args.n, low=1)
        if not Path(args.student).exists():
            raise cli.UserError(f"the student {args.student} not found (pass a checkpoint folder)")
        default = {"nasa": "0,0.1,0.2,0.3,0.5,0.8", "nag": "1,1.5,2,3,5,8", "cfg": "1,2,3,4.5,7.5"}[args.guidance]
        try:
            args.scales = [float(v) for v in (args.scales or default).split(",")]
        except ValueError:
            raise cli.UserError(f"--scales {args.scales!r} must be comma-separated numbers (e.g. 0,0.2,0.5)") from None
        off = {"nag": "NAG's scale is 1 when off", "cfg": "at CFG 1 the negative prompt has no weight"}
        for v in args.scales:
            cli.number("--scales", v, low=0 if args.guidance == "nasa" else 1, fix=off.get(args.guidance, ""))
        if args.guidance == "cfg":
            cli.number("--steps", args.steps, low=2, fix="CFG needs a multi-step teacher; one step is the student's")
            if args.nasa_layers:
                raise cli.UserError("--nasa-layers applies to NASA and NAG in one step; drop it with --guidance cfg")
        if args.guidance == "nag":
            cli.number("--nag-tau", args.nag_tau, low=0, low_open=True)
            cli.number("--nag-alpha", args.nag_alpha, low=0, high=1)
        if args.json:
            cli.writable_file("--json", args.json)
    if args.command == "losses":
        cli.number("--n", args.n, low=1)
        for path in args.checkpoints:
            if not Path(path).is_dir():
                raise cli.UserError(f"checkpoint {path} not found (pass a checkpoint folder)")
    if args.command == "curve":
        for run in args.runs:
            run_students(run, args.last)
        args.teacher_scores = earlier_teacher(args) if args.teacher_from else None
    if args.command == "train-teacher":
        if args.arch not in TEACHER_ARCHS:
            raise cli.UserError(f"--arch must be one of {', '.join(TEACHER_ARCHS)}, got {args.arch!r}")
        for flag, value, rule in [("--steps", args.steps, dict(low=1)), ("--batch-size", args.batch_size, dict(low=1)),
                                  ("--lr", args.lr, dict(low=0, low_open=True)),
                                  ("--ema", args.ema, dict(low=0, high=1, high_open=True)),
                                  ("--save-every", args.save_every, dict(low=1)),
                                  ("--log-every", args.log_every, dict(low=1))]:
            cli.number(flag, value, **rule)
        if args.device:
            cli.device("--device", args.device)
        if not (Path(args.text_encoder) / "text_encoder").is_dir():
            raise cli.UserError(f"--text-encoder {args.text_encoder} has no text_encoder/ folder (write one with "
                                "`python shapes.py make-text-encoder DIR`)")
        cli.not_an_input("--out", args.out, [("the text encoder", args.text_encoder)])
        cli.writable_folder("--out", args.out)
        has = any(Path(args.out, "checkpoints").glob("step-???????"))
        if args.resume and not has:
            raise cli.UserError(f"--resume: {args.out}/checkpoints holds no checkpoint (drop --resume to start at step 0)")
        if has and not args.resume:
            raise cli.UserError(f"--out {args.out} already holds a training's checkpoints (pass --resume, or another --out)")
    if args.command == "make-text-encoder":
        cli.number("--hidden-size", args.hidden_size, low=4, fix="a multiple of the text encoder's 4 heads")
        if args.hidden_size % 4:
            raise cli.UserError(f"--hidden-size {args.hidden_size} must be a multiple of the text encoder's 4 heads")
        cli.writable_folder("OUT", args.out)
    if args.command == "show":
        from PIL import Image
        if Path(args.out).suffix.lower() not in Image.registered_extensions():
            raise cli.UserError(f"OUT {args.out} does not end in an image format Pillow writes (end it with .png)")
        cli.writable_file("OUT", args.out)
    if args.command in ("prompts", "negatives"):
        cli.writable_file("OUT", args.out)
    if args.command == "real-images":
        cli.number("--n", args.n, low=1)
        cli.writable_file("OUT", args.out)


def _write_json(path, results):
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
