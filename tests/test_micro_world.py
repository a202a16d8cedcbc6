import numpy as np
import pytest

from tasks.metrics import micro as micro_metrics
from tasks.micro import parse, subjects, world


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng) for _ in range(n)]


def test_render_is_deterministic_and_uses_the_palette():
    s = scenes(1)[0]
    a, b = world.render(s), world.render(s)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    colours = {tuple(c) for c in a.reshape(-1, 3)}
    assert colours <= {world.COLORS[s.background]} | {world.COLORS[o.color] for o in s.objects}


def test_shapes_are_distinct_at_both_sizes():
    for size in world.SIZES.values():
        masks = [world.shape_mask(k, size, (16, 16)) for k in world.SHAPES]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
                assert iou < 0.85, (world.SHAPES[i], world.SHAPES[j], iou)


def test_scenes_keep_objects_apart_and_off_the_background_colour():
    for s in scenes(300, seed=3):
        assert 1 <= len(s.objects) <= 3
        assert all(o.color != s.background for o in s.objects)
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1 :]:
                assert not world.overlaps(a, b)


def test_caption_grammar_round_trips_and_names_no_position():
    for s in scenes(200, seed=1):
        spec = world.parse_caption(world.caption(s))
        assert spec["background"] == s.background
        got = [(o["shape"], o["color"], o["size"], o["position"]) for o in spec["objects"]]
        assert got == [(o.shape, o.color, o.size, None) for o in s.objects]


def test_a_prompt_may_still_name_a_position():
    spec = world.parse_caption("a big red circle in the top left and a square in the bottom")
    assert [o["position"] for o in spec["objects"]] == [0, 7]


def test_caption_omissions_leave_attributes_open():
    rng = np.random.default_rng(0)
    s = world.Scene("blue", (world.Obj("circle", "red", "big", 0),))
    seen = {world.caption(s, rng, omit_prob=0.5) for _ in range(200)}
    assert "a big red circle on a blue background" in seen
    assert "a circle" in seen
    spec = world.parse_caption("a circle")
    assert spec["objects"] == [{"size": None, "color": None, "shape": "circle", "position": None}]
    assert spec["background"] is None


def test_unknown_prompt_word_names_the_word_and_vocabulary():
    with pytest.raises(ValueError, match=r"unknown word 'teal'.*vocabulary"):
        world.parse_caption("a teal circle")
    with pytest.raises(ValueError, match="bad position 'top center'"):
        world.parse_caption("a red circle in the top center")


def test_parser_reads_clean_renders_back():
    hits = {k: [] for k in ("background", "count", "color", "shape", "size", "position", "segmentation")}
    for s in scenes(300, seed=2):
        img = world.render(s)
        p = parse.parse(img)
        hits["background"].append(p.background == s.background)
        hits["count"].append(len(p.objects) == len(s.objects))
        truth = np.zeros((32, 32), np.int64)
        for o in s.objects:
            truth[world.object_mask(o)] = 1 + world.SHAPES.index(o.shape)
        hits["segmentation"].append((p.segmentation == truth).mean())
        spec = world.parse_caption(world.caption(s))
        for want, o in zip(spec["objects"], s.objects):
            want["position"] = o.position  # captions name none; the parser must still read it
        for k, v in parse.attribute_match(p, spec).items():
            if k != "background":
                hits[k].append(v)
    for k, v in hits.items():
        assert np.mean(v) >= 0.99, (k, np.mean(v))


def test_colour_binding_finds_objects_by_shape_and_size_and_tells_a_borrowed_colour():
    circle, square = world.Obj("circle", "red", "big", 0), world.Obj("square", "blue", "small", 8)
    spec = world.parse_caption(world.caption(world.Scene("white", (circle, square))))
    swapped = (world.Obj("circle", "blue", "big", 0), world.Obj("square", "red", "small", 8))
    third = (circle, world.Obj("square", "green", "small", 8))

    def binding(*objects):
        return parse.colour_binding(parse.parse(world.render(world.Scene("white", objects))), spec)

    assert binding(circle, square) == {"own_color": 1.0, "borrowed_color": 0.0}
    assert binding(*swapped) == {"own_color": 0.0, "borrowed_color": 1.0}
    assert binding(*third) == {"own_color": 0.5, "borrowed_color": 0.0}  # green is no caption object's colour
    assert binding(circle) == {"own_color": 1.0, "borrowed_color": 0.0}  # the missing square does not count
    assert all(np.isnan(v) for v in binding(world.Obj("triangle", "red", "big", 4)).values())


def test_parser_edges_and_keypoints():
    obj = world.Obj("square", "red", "big", 4)
    p = parse.parse(world.render(world.Scene("blue", (obj,))))
    ys, xs = np.nonzero(world.object_mask(obj))
    assert p.keypoints.shape == (1, 5, 2)
    np.testing.assert_allclose(p.keypoints[0, 0], (ys.mean() + 0.5, xs.mean() + 0.5))
    assert p.keypoints[0, 1, 0] == ys.min() + 0.5 and p.keypoints[0, 2, 0] == ys.max() + 0.5
    assert p.edges.sum() > 0 and not p.edges[0, 0] and p.edges[ys.min(), xs.mean().astype(int)]


def test_parser_survives_noise():
    rng = np.random.default_rng(0)
    s = scenes(1, seed=5)[0]
    img = world.render(s).astype(np.float32) / 255 + rng.normal(0, 0.05, (32, 32, 3))
    p = parse.parse(np.clip(img, 0, 1).astype(np.float32))
    assert p.background == s.background and len(p.objects) == len(s.objects)


def test_subject_fidelity_tells_the_subject_from_a_plain_shape():
    s = subjects.SUBJECTS["checker"]
    prompt = subjects.eval_prompts(s)[0]
    good = subjects.render(s, prompt.background, 2)
    plain = world.render(world.Scene(prompt.background, (world.Obj(s.shape, s.main, "big", 2),)))
    wrong_place = subjects.render(s, "black", 2)
    empty = world.render(world.Scene(prompt.background, ()))
    sg, sp = micro_metrics.score_image(good, s, prompt), micro_metrics.score_image(plain, s, prompt)
    assert sg["micro_subject_fidelity"] == 1.0 and sg["micro_prompt_fidelity"] == 1.0
    # A plain shape in the main colour or an empty background score 0 (floors: tests/test_micro_metrics.py).
    assert sp["micro_subject_fidelity"] == 0.0
    assert micro_metrics.score_image(empty, s, prompt)["micro_subject_fidelity"] == 0.0
    assert micro_metrics.score_image(wrong_place, s, prompt)["micro_prompt_fidelity"] == 0.0
    # Half the pattern's accent pixels painted over: the score is the worse role's accuracy.
    half = good.copy()
    _, accent, _ = subjects.subject_layers(s, "big", 2)
    ys, xs = np.nonzero(accent)
    keep = len(ys) // 2
    half[ys[keep:], xs[keep:]] = world.COLORS[s.main]
    score = micro_metrics.score_image(half, s, prompt)["micro_subject_fidelity"]
    assert score == pytest.approx(keep / len(ys), abs=0.05)


def test_prompt_fidelity_needs_the_subject_for_its_size_and_colour():
    s = subjects.SUBJECTS["bullseye"]
    small = next(p for p in subjects.eval_prompts(s) if p.kind == "size" and p.background is None)
    recolour = next(p for p in subjects.eval_prompts(s) if p.main and p.background is None)
    plain = world.render(world.Scene("black", (world.Obj(s.shape, s.main, "small", 0),)))
    assert micro_metrics.score_image(plain, s, small)["micro_prompt_fidelity"] == 0.0
    assert micro_metrics.score_image(subjects.render(s, "black", 0, "small"), s, small)["micro_prompt_fidelity"] == 1.0
    recoloured = subjects.render(s, "black", 4, main=recolour.main)
    assert micro_metrics.score_image(recoloured, s, recolour)["micro_prompt_fidelity"] == 1.0
    assert micro_metrics.score_image(subjects.render(s, "black", 4), s, recolour)["micro_prompt_fidelity"] == 0.0


def test_diversity_and_drift():
    a, b = world.render(scenes(1, 0)[0]), world.render(scenes(1, 1)[0])
    assert micro_metrics.diversity([a, a]) == 0.0 and micro_metrics.diversity([a, b]) > 0
    assert micro_metrics.drift([a], [a]) == 0.0 and micro_metrics.drift([a], [b]) > 0
