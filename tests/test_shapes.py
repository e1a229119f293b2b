"""Tests of the shapes world (shapes.py) against SHAPES.md."""
import json
import math
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cli  # noqa: E402
import shapes  # noqa: E402
from shapes import COLOURS, IMAGE_SIZE, SHAPES, classify, parse_prompt, render  # noqa: E402


def draw(rng, shape, colour):
    """A real-looking image of the given shape and colour at a random size and position."""
    size = int(rng.integers(10, 19))
    x0, y0 = rng.integers(0, IMAGE_SIZE - size + 1, size=2)
    return render(shape, colour, size, x0 + size / 2, y0 + size / 2)


def ideal_generator(prompts, negative_prompts, nasa_scale, seed):
    """Draws what the prompt names; unnamed attributes avoid the negative prompt when NASA is on."""
    rng = np.random.default_rng(seed)
    images = []
    for i, prompt in enumerate(prompts):
        colour, shape = parse_prompt(prompt)
        avoid = (None, None)
        if negative_prompts is not None and nasa_scale > 0:
            avoid = parse_prompt(negative_prompts[i])
        colours = [colour] if colour else [c for c in COLOURS if c != avoid[0]]
        shape_names = [shape] if shape else [s for s in SHAPES if s != avoid[1]]
        images.append(draw(rng, shape_names[rng.integers(len(shape_names))],
                           colours[rng.integers(len(colours))]))
    return np.stack(images)


def red_circle_generator(prompts, negative_prompts, nasa_scale, seed):
    """Ignores its prompts and always draws a red circle."""
    rng = np.random.default_rng(seed)
    return np.stack([draw(rng, "circle", "red") for _ in prompts])


# -----------------------------------------------------------------------------
# The world


def test_sample_world_is_deterministic_from_the_seed():
    images_a, captions_a = shapes.sample_world(64, seed=3)
    images_b, captions_b = shapes.sample_world(64, seed=3)
    images_c, _ = shapes.sample_world(64, seed=4)
    assert images_a.dtype == np.uint8 and images_a.shape == (64, 32, 32, 3)
    assert np.array_equal(images_a, images_b) and captions_a == captions_b
    assert not np.array_equal(images_a, images_c)


def test_caption_mix_and_captions_describe_the_scene():
    scenes = shapes.sample_scenes(4000, seed=0)
    kinds = Counter()
    for s in scenes:
        expected = {f"a {s.colour} {s.shape}": "both", f"a {s.shape}": "shape",
                    f"a {s.colour} shape": "colour", "": "null"}
        assert s.caption in expected, s
        kinds[expected[s.caption]] += 1
    for kind, share in (("both", 0.7), ("shape", 0.1), ("colour", 0.1), ("null", 0.1)):
        assert abs(kinds[kind] / len(scenes) - share) < 0.02, kinds
    # Shapes and colours are uniform.
    for counts in (Counter(s.shape for s in scenes), Counter(s.colour for s in scenes)):
        assert all(abs(c / len(scenes) - 1 / len(counts)) < 0.03 for c in counts.values())


def test_real_images_pass_the_checks():
    scenes = shapes.sample_scenes(512, seed=1)
    images, _ = shapes.sample_world(512, seed=1)
    correct = [classify(im) == (True, s.colour, s.shape) for s, im in zip(scenes, images)]
    assert np.mean(correct) >= 0.99
    # The rasterisation is chosen so that every size and colour classifies right, not just most.
    for shape in SHAPES:
        for colour in COLOURS:
            for size in range(10, 19):
                for x0, y0 in ((0, 0), (32 - size, 32 - size), (3, 7)):
                    image = render(shape, colour, size, x0 + size / 2, y0 + size / 2)
                    assert classify(image) == (True, colour, shape), (shape, colour, size)


def test_shapes_are_inside_the_image_at_their_size():
    scenes = shapes.sample_scenes(512, seed=2)
    images, _ = shapes.sample_world(512, seed=2)
    sizes = Counter(s.size for s in scenes)
    assert set(sizes) == set(range(10, 19))
    for s, image in zip(scenes, images):
        assert s.cx - s.size / 2 >= 0 and s.cx + s.size / 2 <= IMAGE_SIZE
        assert s.cy - s.size / 2 >= 0 and s.cy + s.size / 2 <= IMAGE_SIZE
        # An unclipped shape fills a size x size box (base = height for triangles).
        ys, xs = np.nonzero(image.max(axis=-1) > 0)
        assert xs.max() - xs.min() + 1 == s.size and ys.max() - ys.min() + 1 == s.size
        assert (xs.min() + xs.max() + 1) / 2 == s.cx and (ys.min() + ys.max() + 1) / 2 == s.cy


def test_every_colour_is_exact_on_a_black_background():
    scenes = shapes.sample_scenes(256, seed=5)
    images, _ = shapes.sample_world(256, seed=5)
    for s, image in zip(scenes, images):
        pixels = {tuple(p) for p in image.reshape(-1, 3)}
        assert pixels == {(0, 0, 0), COLOURS[s.colour]}
    assert list(COLOURS) == ["red", "green", "blue", "yellow", "magenta", "cyan"]
    assert COLOURS["green"] == (0, 200, 0)


def test_triangle_is_upright():
    image = render("triangle", "red", 12, 16, 16).max(axis=-1) > 0
    widths = image.sum(axis=1)[image.any(axis=1)]
    assert np.all(np.diff(widths) >= 0) and widths[-1] == 12  # widens downwards to the base


def test_prompts():
    prompts = shapes.all_prompts()
    assert len(prompts) == 18 == len(set(prompts))
    assert "a magenta triangle" in prompts
    assert parse_prompt("a red circle") == ("red", "circle")
    assert parse_prompt("a square") == (None, "square")
    assert parse_prompt("a cyan shape") == ("cyan", None)
    assert parse_prompt("red") == ("red", None) and parse_prompt("") == (None, None)


# -----------------------------------------------------------------------------
# Checks


def test_classify_follows_the_thresholds():
    empty = np.zeros((32, 32, 3), np.uint8)
    assert classify(empty) == (False, None, None)
    dim = empty.copy()
    dim[5:20, 5:20] = (100, 100, 100)  # not above 100: background
    assert classify(dim) == (False, None, None)
    big = empty.copy()
    big[0:21, 0:20] = (250, 10, 5)  # 420 pixels: too many to be one shape
    assert classify(big) == (False, "red", "square")
    tiny = render("circle", "blue", 6, 10, 10)  # under 40 pixels
    assert classify(tiny)[0] is False
    noisy = render("square", "yellow", 12, 16, 16)
    noisy[10, 10] = (0, 0, 255)  # one odd pixel does not move the median
    assert classify(noisy) == (True, "yellow", "square")


def test_prompt_accuracy():
    images = np.stack([render("circle", "red", 12, 16, 16), render("square", "red", 12, 16, 16),
                       np.zeros((32, 32, 3), np.uint8), render("triangle", "cyan", 14, 16, 16)])
    prompts = ["a red circle", "a red circle", "a red circle", "a triangle"]
    assert shapes.prompt_accuracy(images, prompts) == 0.5


def test_negative_success_on_hand_built_images():
    images = np.stack([render("circle", "red", 12, 16, 16)] * 3
                      + [render("circle", "blue", 12, 16, 16)]
                      + [render("square", "red", 12, 16, 16)] * 2
                      + [render("circle", "red", 6, 16, 16)]  # too small to be present
                      + [np.zeros((32, 32, 3), np.uint8)])
    # Circles present: 3 red, 1 blue.
    assert shapes.negative_success(images, "a circle", "red") == (0.25, 4 / 8)
    # Red shapes present: 3 circles, 2 squares.
    assert shapes.negative_success(images, "a red shape", "circle") == (0.4, 5 / 8)
    success, accuracy = shapes.negative_success(images, "a triangle", "red")
    assert math.isnan(success) and accuracy == 0.0


def test_features():
    image = render("triangle", "magenta", 10, 8, 20)
    f = shapes.features(np.stack([image, np.zeros_like(image)]))
    assert f.shape == (2, 12)
    expected = np.zeros(12)
    expected[4] = expected[6 + 2] = 1
    expected[9:] = (8 / 32, 20 / 32, 10 / 32)
    assert np.allclose(f[0], expected) and np.all(f[1] == 0)


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(size=(400, 4)) * 2 + 1
    assert abs(shapes.frechet_distance(a, a)) < 1e-6
    # Independent reference: tr sqrt(A B) from the (real, positive) eigenvalues of A B.
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real).sum()
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * cross
    assert shapes.frechet_distance(a, b) == pytest.approx(reference, rel=1e-4)
    real = shapes.features(shapes.sample_world(300, 0)[0])
    other_real = shapes.features(shapes.sample_world(300, 1)[0])
    red = shapes.features(red_circle_generator([""] * 300, None, 0.0, 0))
    assert shapes.frechet_distance(red, real) > 10 * shapes.frechet_distance(other_real, real) > 0


# -----------------------------------------------------------------------------
# Evaluation


def test_evaluate_ideal_generator():
    calls = []

    def spy(prompts, negative_prompts, nasa_scale, seed):
        calls.append((list(prompts), negative_prompts, nasa_scale))
        return ideal_generator(prompts, negative_prompts, nasa_scale, seed)

    results = shapes.evaluate(ideal_generator, spy, n=144, seed=0, nasa_scale=2.0)
    assert results["teacher"]["accuracy"] == results["student"]["accuracy"] == 1.0
    assert results["student"]["fd"] < 3 * results["real_fd"] + 0.05
    for row in results["negative"]:
        assert row["success_with"] == 1.0 and row["accuracy_with"] == 1.0
        assert row["accuracy_without"] == 1.0
        # Without NASA a random colour (shape) hits the negative 1/6 (1/3) of the time.
        chance = 5 / 6 if parse_prompt(row["negative"])[0] else 2 / 3
        assert abs(row["success_without"] - chance) < 0.2 and row["success_without"] < 1.0
    # Accuracy uses 144 // 18 = 8 images of each full prompt, without negatives.
    accuracy_call = next(c for c in calls if len(c[0]) == 144 and c[0][0] == "a red circle")
    assert Counter(accuracy_call[0]) == {p: 8 for p in shapes.all_prompts()}
    negative_calls = [c for c in calls if c[1] is not None]
    assert len(negative_calls) == 4 and all(c[2] == 2.0 and len(c[0]) == 36 for c in negative_calls)
    assert [(c[0][0], c[1][0]) for c in negative_calls] == list(shapes.NEGATIVE_PAIRS)


def test_negative_sweep_scores_each_scale_on_the_same_seeds():
    calls = []

    def spy(prompts, negative_prompts, nasa_scale, seed):
        calls.append((prompts[0], negative_prompts[0], nasa_scale, seed, len(prompts)))
        return ideal_generator(prompts, negative_prompts, nasa_scale, seed)

    rows = shapes.negative_sweep(spy, [0.0, 0.5], n=48, seed=7)
    assert len(shapes.SWEEP_PAIRS) == 8 and set(shapes.NEGATIVE_PAIRS) < set(shapes.SWEEP_PAIRS)
    # pair i at seed + i at every scale, so two rows differ only by the scale
    expected = [(p, neg, scale, 7 + i, 48) for scale in (0.0, 0.5) for i, (p, neg) in enumerate(shapes.SWEEP_PAIRS)]
    assert calls == expected
    off, on = rows
    assert on["success"] == on["min_success"] == 1.0 and on["accuracy"] == off["accuracy"] == 1.0
    assert 0.5 < off["success"] < 0.95 and off["min_success"] < off["success"]  # chance: 5/6 or 2/3
    assert [(r["prompt"], r["negative"]) for r in on["pairs"]] == list(shapes.SWEEP_PAIRS)
    table = shapes.format_sweep(rows, "nasa")
    assert "| 0.5 | 1.000 | 1.000 | 1.000 | 1.000 |" in table


def test_sweep_of_a_teacher_along_cfg(monkeypatch, tmp_path):
    """--guidance cfg: each scale is the teacher's CFG kappa over --steps DDIM steps, the negative prompt
    in the unconditional slot, on the same pairs and seeds as NASA's sweep."""
    import sample
    calls = []

    def spy_sampler(pipe, steps, cfg):
        def generate(prompts, negative_prompts, nasa_scale, seed):
            calls.append((pipe, steps, cfg, negative_prompts[0], nasa_scale, seed))
            return ideal_generator(prompts, negative_prompts, 1.0, seed)
        return generate

    monkeypatch.setattr(sample, "load", lambda path: f"pipe of {path}")
    monkeypatch.setattr(shapes, "pipe_sampler", spy_sampler)
    shapes.main(["sweep", "checkpoints/shapes_teacher", "--guidance", "cfg", "--scales", "1,4.5", "--steps", "3",
                 "--n", "6", "--seed", "5", "--json", str(tmp_path / "rows.json")])
    pairs = shapes.SWEEP_PAIRS
    assert calls == [("pipe of checkpoints/shapes_teacher", 3, kappa, neg, 0.0, 5 + i)
                     for kappa in (1.0, 4.5) for i, (_, neg) in enumerate(pairs)]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["scale"] for r in rows] == [1.0, 4.5] and all(r["success"] == 1.0 for r in rows)


def test_sweep_restricts_nasa_to_the_named_layers(monkeypatch):
    """--nasa-layers reaches the sampler as a list of substrings ('' = every layer), for NASA and NAG."""
    seen = []

    def spy_sampler(checkpoint, layers=None, nag=None):
        seen.append((checkpoint, layers, nag))
        return ideal_generator
    monkeypatch.setattr(shapes, "sampler", spy_sampler)
    shapes.main(["sweep", "checkpoints/shapes_student", "--scales", "0.3", "--n", "4",
                 "--nasa-layers", "mid_block,up_blocks.1."])
    shapes.main(["sweep", "checkpoints/shapes_student", "--guidance", "nag", "--scales", "3", "--n", "4"])
    assert seen == [("checkpoints/shapes_student", ["mid_block", "up_blocks.1."], None),
                    ("checkpoints/shapes_student", None, (2.5, 0.375))]


def test_evaluate_red_circle_generator():
    results = shapes.evaluate(None, red_circle_generator, n=144, seed=0)
    assert results["teacher"] is None
    assert results["student"]["accuracy"] == pytest.approx(1 / 18)
    assert results["student"]["fd"] > 10 * results["real_fd"]
    rows = {(r["prompt"], r["negative"]): r for r in results["negative"]}
    for pair in (("a circle", "red"), ("a red shape", "circle")):
        assert rows[pair]["success_with"] == rows[pair]["success_without"] == 0.0
        assert rows[pair]["accuracy_with"] == 1.0
    for pair in (("a square", "blue"), ("a blue shape", "square")):
        assert math.isnan(rows[pair]["success_with"]) and rows[pair]["accuracy_with"] == 0.0
    report = shapes.format_report(results)
    assert "| student | 0.056 |" in report and "| teacher | n/a | n/a |" in report
    assert "| a square | blue | n/a | n/a | 0.000 | 0.000 |" in report


def fixed_red_circle(prompts, negative_prompts, nasa_scale, seed):
    """Ignores its prompts and its seed: the same red circle at the same place, every time."""
    return np.stack([render("circle", "red", 12, 16, 16) for _ in prompts])


def black(prompts, negative_prompts, nasa_scale, seed):
    return np.zeros((len(prompts), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def test_histograms_and_total_variation_of_a_collapsed_generator():
    images = fixed_red_circle(["a circle"] * 5, None, 0.0, 0)
    colours = shapes.histogram(images, "colour")
    assert colours == {"shares": {c: float(c == "red") for c in COLOURS}, "none": 0.0}
    # Against the world's uniform colours: 0.5 * (5/6 + 5 * 1/6) = 5/6; shapes: 0.5 * (2/3 + 2 * 1/3).
    assert shapes.total_variation(colours["shares"], shapes.world_histogram("a circle")["shares"]) == pytest.approx(5 / 6)
    circles = shapes.histogram(images, "shape")["shares"]
    assert shapes.total_variation(circles, shapes.world_histogram("a red shape")["shares"]) == pytest.approx(2 / 3)
    assert shapes.total_variation(circles, circles) == 0.0
    # Images with no shape present count only in "none".
    mixed = np.concatenate([images[:1], black([""] * 3, None, 0.0, 0)])
    assert shapes.histogram(mixed, "shape") == {"shares": {"circle": 1.0, "square": 0.0, "triangle": 0.0}, "none": 0.75}
    empty = shapes.histogram(black([""] * 3, None, 0.0, 0), "colour")
    assert empty["none"] == 1.0 and all(math.isnan(v) for v in empty["shares"].values())


def test_misses_say_how_an_image_misses_its_prompt():
    images = np.stack([render("square", "red", 12, 16, 16), render("circle", "red", 12, 16, 16),
                       render("square", "blue", 12, 16, 16), render("triangle", "blue", 12, 16, 16),
                       black([""], None, 0.0, 0)[0], render("circle", "green", 12, 16, 16)])
    prompts = ["a red square", "a red square", "a red square", "a red square", "a red square", "a circle"]
    assert shapes.misses(images, prompts) == {"no shape": 1, "colour": 1, "shape": 1, "both": 1,
                                              "shapes": {"square as circle": 1, "square as triangle": 1}}


def test_empty_share():
    assert shapes.empty_share(fixed_red_circle([""] * 4, None, 0.0, 0)) == 0.0
    assert shapes.empty_share(black([""] * 4, None, 0.0, 0)) == 1.0
    tiny = render("circle", "blue", 6, 10, 10)  # under 40 pixels: no shape present
    assert shapes.empty_share(np.stack([tiny, render("square", "red", 12, 16, 16)])) == 0.5


def test_spread_is_per_prompt():
    a = [render("square", "red", 10, 8, 8), render("square", "red", 10, 12, 8)]  # x 0.25 and 0.375
    b = [render("square", "red", 10, 24, 24)] * 2
    sd = shapes.spread(np.stack(a + b), ["a", "a", "b", "b"])
    # Prompt a: x sd (ddof 1) 0.125 / sqrt(2), y and size 0; prompt b: 0; averaged over the two.
    assert sd == pytest.approx({"centre_x": 0.125 / math.sqrt(2) / 2, "centre_y": 0.0, "size": 0.0})
    # One fixed place per prompt scores 0, however far apart the prompts' places are.
    assert shapes.spread(np.stack([a[0], a[0], b[0], b[0]]), ["a", "a", "b", "b"]) == {k: 0.0 for k in shapes.SPREAD_KEYS}
    # Empty images do not count; a prompt with fewer than two shapes is left out.
    sd = shapes.spread(np.stack(a + [b[0], np.zeros_like(b[0])]), ["a", "a", "b", "b"])
    assert sd["centre_x"] == pytest.approx(0.125 / math.sqrt(2))
    assert all(math.isnan(v) for v in shapes.spread(black(["a"] * 3, None, 0.0, 0), ["a"] * 3).values())
    # Real data: about 0.17 for each centre coordinate and 0.08 for size (SHAPES.md).
    real = shapes.spread(shapes.sample_world(1000, 0)[0], [""] * 1000)
    assert real == pytest.approx({"centre_x": 0.165, "centre_y": 0.165, "size": 0.08}, abs=0.015)


def test_tv_floor_is_the_max_tv_of_two_draws_from_one_histogram():
    """Two colours at 1/2 each, 2 images per prompt: one prompt's TV is 0, 1/2 or 1 with chances
    3/8, 1/2, 1/8, so the max over the 3 colour-free prompts is 0 with chance (3/8)^3 and at most
    1/2 with chance (7/8)^3 = 0.67: its median is 1/2. One shape for certain: always 0."""
    histograms = {p: {"shares": {c: 0.5 * (c in ("red", "blue")) for c in COLOURS}} for p in shapes.shape_prompts()}
    histograms |= {p: {"shares": {"circle": 1.0, "square": 0.0, "triangle": 0.0}} for p in shapes.colour_prompts()}
    assert shapes.tv_floor(histograms, 2) == {"colour": 0.5, "shape": 0.0}
    world = {p: shapes.world_histogram(p) for p in shapes.shape_prompts() + shapes.colour_prompts()}
    few, many = shapes.tv_floor(world, 29), shapes.tv_floor(world, 1000)
    assert few["colour"] > 0.25 and few["shape"] > 0.2 and many["colour"] < 0.07 and many["shape"] < 0.05
    assert shapes.tv_floor(world, 29) == few  # a fixed seed


def test_compare_leaves_out_prompts_with_no_shape():
    stats = {"histograms": {p: shapes.world_histogram(p) for p in shapes.shape_prompts() + shapes.colour_prompts()},
             "spread": {"centre_x": 0.1, "centre_y": 0.2, "size": 0.0}}
    stats["histograms"]["a circle"] = shapes.histogram(fixed_red_circle([""], None, 0.0, 0), "colour")
    stats["histograms"]["a square"] = shapes.histogram(black([""], None, 0.0, 0), "colour")
    reference = {"histograms": {p: shapes.world_histogram(p) for p in stats["histograms"]},
                 "spread": {"centre_x": 0.2, "centre_y": 0.2, "size": 0.0}}
    out = shapes.compare(stats, reference)
    assert out["tv"]["a circle"] == pytest.approx(5 / 6) and math.isnan(out["tv"]["a square"])
    assert out["max_tv_colour"] == pytest.approx(5 / 6) and out["mean_tv_colour"] == pytest.approx(5 / 12)
    assert out["max_tv_shape"] == out["mean_tv_shape"] == 0.0
    assert out["spread_ratio"]["centre_x"] == 0.5 and out["spread_ratio"]["centre_y"] == 1.0
    assert math.isnan(out["spread_ratio"]["size"])  # nothing to divide by


def test_evaluate_diversity_of_a_collapsed_student():
    results = shapes.evaluate(red_circle_generator, fixed_red_circle, n=144, seed=0)
    assert (results["images_per_full_prompt"], results["images_per_underspecified_prompt"]) == (8, 16)
    student, teacher = results["student"], results["teacher"]
    assert student["per_prompt_accuracy"] == {p: float(p == "a red circle") for p in shapes.all_prompts()}
    assert student["min_accuracy"] == 0.0 and student["min_accuracy_prompt"] == "a red square"
    assert student["empty_share"] == teacher["empty_share"] == 0.0
    assert student["spread"] == {k: 0.0 for k in shapes.SPREAD_KEYS}
    assert teacher["spread"]["centre_x"] > 0.1
    # Both draw only red circles: the same histograms; only the spread tells them apart.
    vs = student["vs_teacher"]
    assert vs["max_tv_colour"] == vs["max_tv_shape"] == 0.0
    assert vs["spread_ratio"] == {k: 0.0 for k in shapes.SPREAD_KEYS}
    for row in (student, teacher):
        assert row["vs_real"]["max_tv_colour"] == row["vs_real"]["mean_tv_colour"] == pytest.approx(5 / 6)
        assert row["vs_real"]["max_tv_shape"] == pytest.approx(2 / 3)
    assert results["tv_floor"] == {"colour": 0.0, "shape": 0.0}  # a teacher that draws one thing
    report = shapes.format_report(results)
    assert "16 images per prompt, differ by a max TV of 0.000 (colour) and 0.000 (shape)" in report
    assert "| student | 0.056 | 0.000 (a red square) |" in report
    # red circles, 8 for each prompt: the other 5 circles miss the colour, the 2 red prompts the shape,
    # the other 10 both; 6 x 8 squares and 6 x 8 triangles read as circles
    assert ("Misses of the student on the colour-and-shape prompts: no shape 0, wrong colour 40, wrong shape 16, "
            "both 80; the shape read in place of the prompted one: square as circle 48, triangle as circle 48.") in report
    assert "| 0.000 | 0.000 | 0.000 | teacher | 0.000 | 0.000 |" in report  # sd x, y, size; TV
    assert "| a red square | 0.000 | 0.000 |" in report  # per-prompt accuracy, teacher and student
    assert "| a circle | student | 1.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |" in report
    assert "| a red shape | teacher | 1.000 | 0.000 | 0.000 | 0.000 | 0.667 |" in report  # TV against the world


def test_evaluate_black_images():
    results = shapes.evaluate(None, black, n=36, seed=0)
    student = results["student"]
    assert student["empty_share"] == 1.0 and student["accuracy"] == student["min_accuracy"] == 0.0
    assert all(math.isnan(v) for v in student["spread"].values())
    assert math.isnan(student["vs_real"]["max_tv_colour"]) and "vs_teacher" not in student
    assert "| student | 0.000 | 0.000 (a red circle) |" in shapes.format_report(results)


def test_evaluate_ideal_generator_keeps_the_world_diversity():
    results = shapes.evaluate(ideal_generator, ideal_generator, n=288, seed=0)
    real = results["real"]["spread"]
    for name in ("teacher", "student"):
        row = results[name]
        assert row["empty_share"] == 0.0 and row["min_accuracy"] == 1.0
        assert row["vs_real"]["max_tv_colour"] < 0.4 and row["vs_real"]["max_tv_shape"] < 0.3
        for k in shapes.SPREAD_KEYS:
            assert 0.7 < row["spread"][k] / real[k] < 1.3, (name, k)


def test_format_curves_groups_seeds_into_mean_and_deviation():
    def point(step, fd, accuracy, worst="a red circle", ratio=1.0):
        return {"step": step, "fd": fd, "accuracy": accuracy, "min_accuracy": accuracy / 2,
                "min_accuracy_prompt": worst, "empty_share": 0.0,
                "vs_teacher": {"spread_ratio": {k: ratio for k in shapes.SPREAD_KEYS},
                               "max_tv_colour": 0.25, "max_tv_shape": math.nan}}
    teacher = {"fd": 0.04, "accuracy": 0.97, "min_accuracy": 0.8, "min_accuracy_prompt": "a red square",
               "empty_share": 0.0, "spread": {"centre_x": 0.17, "centre_y": 0.16, "size": 0.08},
               "vs_real": {"max_tv_colour": 0.1, "max_tv_shape": 0.2}}
    curves = {"n": 256, "teacher_steps": 25, "teacher_cfg": 3.0, "teacher": teacher,
              "tv_floor": {"colour": 0.241, "shape": 0.238}, "runs": {
        "runs/exp/none-s0": [point(25, 1.0, 0.5), point(50, 2.0, 0.25)],
        "runs/exp/none-s1": [point(25, 3.0, 0.75, "a blue circle", 0.5), point(50, 4.0, 0.25)],
        "runs/exp/lora-s0": [point(25, 0.5, 1.0)], "ckpt/student": [point(None, 0.3, 0.9)]}}
    text = shapes.format_curves(curves)
    assert "Teacher (25 DDIM steps, CFG 3.0, n=256): FD 0.040, accuracy 0.970, min prompt accuracy 0.800 " \
           "(a red square)" in text
    assert "29 images per prompt, differ by a max TV of 0.241 (colour) and 0.238 (shape)" in text
    assert ("| none (2 runs) | 25 | 2.000 +- 1.000 | 0.625 +- 0.125 | 0.312 +- 0.062 | 0.000 +- 0.000 "
            "| 0.750 +- 0.250 | 0.750 +- 0.250 | 0.750 +- 0.250 | 0.250 +- 0.000 | n/a "
            "| a blue circle / a red circle |") in text
    assert "| none (2 runs) | 50 | 3.000 +- 1.000 | 0.250 +- 0.000 |" in text
    assert "| lora (1 run) | 25 | 0.500 | 1.000 | 0.500 | 0.000 | 1.000 |" in text
    assert "| student (1 run) | final | 0.300 |" in text


def test_run_students_reads_runs_students_and_checkpoint_folders(tmp_path):
    run = tmp_path / "run"
    for step in (50, 100):
        (run / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    (run / "student").mkdir()
    (run / "student" / "denoiser.safetensors").touch()
    assert shapes.run_students(run) == [(50, run / "checkpoints" / "step-0000050"),
                                        (100, run / "checkpoints" / "step-0000100")]
    assert shapes.run_students(run, last=True) == [(100, run / "checkpoints" / "step-0000100")]
    (run / "checkpoints").rename(tmp_path / "elsewhere")
    assert shapes.run_students(run) == [(None, run / "student")]
    assert shapes.run_students(run / "student", last=True) == [(None, run / "student")]
    with pytest.raises(cli.UserError, match="no checkpoints/step-N, no student/"):
        shapes.run_students(tmp_path / "elsewhere")


def test_prompts_file_is_the_world_captions(tmp_path):
    shapes.main(["prompts", str(tmp_path / "p.txt")])
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert lines == sorted(lines) and len(lines) == 27 == len(set(lines))
    assert set(lines) == set(shapes.all_prompts() + shapes.shape_prompts() + shapes.colour_prompts())
    shipped = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "shapes_prompts.txt")
    assert open(shipped).read().splitlines() == lines


def test_real_images_file_holds_the_worlds_images(tmp_path):
    """shapes.py real-images: the world's images at the seed, as train.py --real-images reads them."""
    from safetensors.torch import load_file
    import train
    shapes.main(["real-images", str(tmp_path / "r.safetensors"), "--n", "5", "--seed", "3"])
    images = load_file(str(tmp_path / "r.safetensors"))["images"]
    assert images.dtype == torch.uint8 and images.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.array_equal(images.numpy(), shapes.sample_world(5, 3)[0])
    assert torch.equal(train.read_real_images(tmp_path / "r.safetensors"), images)


# -----------------------------------------------------------------------------
# Text encoder and tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_ckpt")
    shapes.main(["make-text-encoder", str(out)])
    return out


def test_tokenizer_gives_one_token_per_word(checkpoint):
    from transformers import AutoTokenizer, CLIPTokenizer
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (checkpoint / "tokenizer" / name).exists()
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    auto = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    assert tokenizer.model_max_length == 8
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    word_ids = {w: tokenizer(w).input_ids for w in shapes.world_words()}
    assert all(len(ids) == 3 and ids[0] == bos and ids[2] == eos for ids in word_ids.values())
    assert len({ids[1] for ids in word_ids.values()}) == len(word_ids)  # distinct tokens
    ids = tokenizer("a red circle", padding="max_length", max_length=8).input_ids
    assert ids == [bos, word_ids["a"][1], word_ids["red"][1], word_ids["circle"][1]] + [eos] * 4
    assert auto("a red circle", padding="max_length", max_length=8).input_ids == ids
    assert tokenizer.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "circle</w>"]
    # Unknown words and characters split or map to the unknown token instead of failing.
    odd = tokenizer("A Purple zebra, 42!", padding="max_length", max_length=8, truncation=True)
    assert len(odd.input_ids) == 8 and odd.input_ids[0] == bos and odd.input_ids[-1] == eos


def test_text_encoder_round_trip(checkpoint, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer
    assert (checkpoint / "text_encoder" / "model.safetensors").exists()
    tokenizer = CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    assert encoder.config.max_position_embeddings == 8
    prompts = shapes.all_prompts() + ["a circle", "a red shape", ""]
    embeddings = shapes.encode_prompts(tokenizer, encoder, prompts)
    assert embeddings.shape == (len(prompts), 8, encoder.config.hidden_size)
    pooled = embeddings.mean(dim=1)
    assert torch.cdist(pooled, pooled).add(torch.eye(len(prompts))).min() > 1e-3  # all differ
    # Same seed, same weights; the written files hold exactly the model that was built.
    _, model = shapes.make_text_encoder(tmp_path, seed=0)
    for (name, p), q in zip(model.state_dict().items(), encoder.state_dict().values()):
        assert torch.equal(p, q), name
    assert torch.equal(shapes.encode_prompts(tokenizer, model, prompts), embeddings)


def test_show_writes_a_grid(tmp_path):
    from PIL import Image
    shapes.main(["show", str(tmp_path / "grid.png")])
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == ((8 * 33 - 1) * 4, (8 * 33 - 1) * 4, 3)  # 32 px cells, 1 px lines
    first, _ = shapes.sample_world(1, seed=0)
    assert np.array_equal(grid[:128:4, :128:4], first[0])
