"""The toy world's renderer, grammar, detector and counting ranker.

The checker measurement: on crisp renders the ranker must accept >= 99 % of correct images and
pass <= 1 % of images with a wrong count, shape or colour, for every cell of the grammar.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from drpo_core.errors import ComponentError
from drpo_geneval.rules import evaluate
from drpo_shapes import world
from drpo_shapes.detect import detect, detect_array
from drpo_shapes.rankers import ShapesCountingRanker


def passes(scene: world.Scene, prompt: str, seed: int, blur: float = 0.0) -> bool:
    image = world.render_array(scene, seed)
    if blur:
        image = ndimage.gaussian_filter(image, (blur, blur, 0))
    return evaluate(detect_array(image), world.prompt_metadata(prompt)).correct


def test_grammar_round_trips_and_rejects_other_text():
    prompts = world.all_prompts()
    assert len(prompts) == len(set(prompts)) == 48
    assert "three blue circles" in prompts and "one red bar" in prompts and "four green pillars" in prompts
    for prompt in prompts:
        assert world.parse_prompt(prompt).prompt == prompt
    for bad in ("three blue circle", "one red bars", "five red bars", "two purple circles", "one red square"):
        with pytest.raises(ValueError, match="not a shapes prompt"):
            world.parse_prompt(bad)


def test_metadata_follows_geneval_counting_rows():
    assert world.prompt_metadata("three blue circles") == {
        "tag": "counting",
        "prompt": "three blue circles",
        "include": [{"class": "circle", "count": 3, "color": "blue"}],
        "exclude": [{"class": "circle", "count": 4}],
    }


def test_render_is_seeded_and_in_range():
    a, b, c = world.render("four yellow bars", 7), world.render("four yellow bars", 7), world.render("four yellow bars", 8)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    batch = world.render_batch(["one red bar", "two green circles"], [0, 1])
    assert batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch[1], world.render("two green circles", 1))


def test_layout_keeps_objects_apart_inside_and_one_per_cell():
    for scene in [*world.all_scenes(), world.Scene(5, "red", "bar")]:  # five: the encoder's free layout
        for seed in range(3):
            boxes = world.layout(scene, seed)
            assert len(boxes) == scene.count
            for i, (x, y, width, height) in enumerate(boxes):
                assert 0 < x and x + width < world.SIZE and 0 < y and y + height < world.SIZE
                assert all(world._apart(boxes[i], other) for other in boxes[i + 1 :])
            if scene.count <= 4:  # one object per cell of the 2x2 grid, wholly inside it
                cells = [(x // world.CELL, y // world.CELL) for x, y, _, _ in boxes]
                assert len(set(cells)) == scene.count
                assert all(((x + w - 1) // world.CELL, (y + h - 1) // world.CELL) == cell
                           for (x, y, w, h), cell in zip(boxes, cells, strict=True))


def test_checker_accepts_correct_renders():
    results = [passes(s, s.prompt, seed) for s in world.all_scenes() for seed in range(6)]  # 288
    assert np.mean(results) >= 0.99


def test_checker_rejects_wrong_counts_shapes_and_colours():
    wrong = []
    for scene in world.all_scenes():
        for count in range(1, 5):
            if count != scene.count:  # 144 scenes x 2 seeds
                wrong += [passes(world.Scene(count, scene.color, scene.shape), scene.prompt, s) for s in (0, 1)]
        for shape in world.SHAPES:
            if shape != scene.shape:  # 96 scenes x 2 seeds
                wrong += [passes(world.Scene(scene.count, scene.color, shape), scene.prompt, s) for s in (0, 1)]
        for color in world.COLORS:
            if color != scene.color:  # 144 scenes
                wrong.append(passes(world.Scene(scene.count, color, scene.shape), scene.prompt, 0))
    assert len(wrong) == 624
    assert np.mean(wrong) <= 0.01


def test_every_shape_is_recognised_as_itself_even_when_blurred():
    for blur in (0.0, 0.8):
        for shape in world.SHAPES:
            for color in world.COLORS:
                image = ndimage.gaussian_filter(world.render_array(world.Scene(1, color, shape), 11), (blur, blur, 0))
                found = detect(torch.from_numpy(image).permute(2, 0, 1))
                assert list(found) == [shape], (blur, shape, color, found)
                assert found[shape][0].color == color
    blurred = [passes(s, s.prompt, seed, blur=0.8) for s in world.all_scenes() for seed in range(2)]
    assert np.mean(blurred) >= 0.95


def test_a_batch_is_detected_exactly_as_its_images_one_by_one():
    # one labelling pass over a (B, colours, H, W) stack must not join components across images or colours
    scenes = [world.Scene(count, color, shape) for count in (1, 4) for color in world.COLORS for shape in world.SHAPES]
    images = world.render_batch(scenes, list(range(len(scenes))))
    blurred = torch.from_numpy(ndimage.gaussian_filter(images.numpy(), (0, 0, 1.2, 1.2)))  # merges, smears
    batch = torch.cat([images, blurred, images.roll(16, dims=0)])
    found = detect(batch)
    assert found == [detect(image) for image in batch]
    assert sum(len(d) for per_image in found[:len(scenes)] for d in per_image.values()) == 12 * (1 + 4)


def test_ranker_scores_binary_and_uses_metadata_or_the_prompt():
    ranker = ShapesCountingRanker()
    assert ranker.binary
    images = world.render_batch(["two red circles", "two red circles"], [0, 1])
    prompts = ["two red circles", "three red circles"]
    scores = ranker.score(images, prompts, [None, None])
    assert scores.tolist() == [1.0, 0.0]
    scores = ranker.score(images, prompts, [None, world.prompt_metadata("two red circles")])
    assert scores.tolist() == [1.0, 1.0]
    with pytest.raises(ComponentError):
        ranker.score(images, prompts[:1], [None])


def test_plugin_registers_without_importing_torch():
    code = (
        "import sys, drpo_shapes\n"
        "assert 'torch' not in sys.modules\n"
        "seen = []\n"
        "reg = lambda name, factory, **kw: seen.append((name, kw.get('variants')))\n"
        "drpo_shapes.drpo_register_generators(reg); drpo_shapes.drpo_register_rankers(reg)\n"
        "drpo_shapes.drpo_register_features(reg)\n"
        "print(seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[('shapes', None), ('shapes', ('counting',)), ('shapes', None)]"


def test_shipped_prompt_file_matches_the_grammar():
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(world.__file__).parent / "prompts.jsonl").read_text().splitlines()]
    assert rows == [world.prompt_metadata(p) for p in world.all_prompts()]
