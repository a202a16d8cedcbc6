"""The micro subject set (tasks/micro/subjects.py): size, identity, identifiers, splits, prompts."""

import numpy as np
from omegaconf import OmegaConf

from tasks.dreambooth import MicroDreamBooth
from tasks.micro import subjects, world


def test_at_least_24_subjects_with_distinct_identities_and_known_class_words():
    assert len(subjects.SUBJECTS) >= 24
    assert {s.shape for s in subjects.SUBJECTS.values()} == set(world.SHAPES)
    pairs = [(s.main, s.accent) for s in subjects.SUBJECTS.values()]
    assert len(set(pairs)) == len(pairs) and all(m != a for m, a in pairs)
    assert len({(s.shape, s.pattern, s.main, s.accent) for s in subjects.SUBJECTS.values()}) == len(pairs)
    assert {s.pattern for s in subjects.SUBJECTS.values()} <= set(subjects.PATTERNS)


def test_identifiers_are_unique_sequences_of_untrained_vocabulary_words():
    ids = [s.token for s in subjects.SUBJECTS.values()]
    assert len(set(ids)) == len(ids)
    for ident in ids:
        words = ident.split()
        assert 1 <= len(words) <= 2 and set(words) <= set(world.SUBJECT_TOKENS) and len(set(words)) == len(words)
    # The original six keep their names and one-word identifiers (records refer to them).
    assert [subjects.SUBJECTS[n].token for n in ("checker", "bullseye", "stripes", "window", "split", "dotted")] == [
        "sks", "zwx", "qlo", "vrd", "kpt", "mjb"]


def test_identifiers_and_objects_of_every_prompt_are_tokens_of_the_micro_tokenizer():
    """The identifier is its own token(s) and the object phrase after it one token, in the instance prompt and in
    every evaluation prompt (property prompts put the identifier first: "a sks small circle")."""
    from bench.models import micro

    tok = micro.build_tokenizer()
    for s in subjects.SUBJECTS.values():
        for prompt in [s.instance_prompt] + [p.text for p in subjects.eval_prompts(s)]:
            pieces = tok.convert_ids_to_tokens(tok(prompt)["input_ids"])
            assert "<unk>" not in pieces, prompt
            at = pieces.index(s.token.split()[-1]) + 1
            assert pieces[at] in world.OBJECT_PHRASES and pieces[at].endswith(s.shape), (prompt, pieces)


def test_every_subject_is_legible_two_coloured_at_both_sizes():
    for s in subjects.SUBJECTS.values():
        for size, least in (("small", 3), ("big", 10)):
            mask, accent, _ = subjects.subject_layers(s, size, 4)
            assert accent.sum() >= least and (mask & ~accent).sum() >= least, (s.name, size)
        refs = subjects.reference_images(s)
        assert refs.shape == (5, 32, 32, 3)
        assert len({tuple(r[0, 0]) for r in refs}) == 5  # five backgrounds
        assert not {s.main, s.accent} & set(s.backgrounds)
        obj_pixels = subjects.subject_layers(s, "big", 4)[0]
        assert len({tuple(c) for c in refs[0][obj_pixels]}) == 2


def test_validation_and_test_are_disjoint_and_cover_the_set():
    val, test = set(subjects.VALIDATION), set(subjects.TEST)
    assert not val & test and val | test == set(subjects.SUBJECTS)
    assert len(val) >= 4 and {subjects.SUBJECTS[n].shape for n in val} == set(world.SHAPES)
    assert {"checker", "bullseye", "stripes", "window", "split", "dotted"} <= test


def test_no_subject_list_means_every_subject_of_the_split():
    assert MicroDreamBooth(OmegaConf.create({"subjects": None})).units() == list(subjects.TEST)
    assert MicroDreamBooth(OmegaConf.create({"subjects": None, "split": "validation"})).units() == list(
        subjects.VALIDATION)
    assert MicroDreamBooth(OmegaConf.create({"subjects": ["split"]})).units() == ["split"]


def test_prompts_are_dreambench_families_the_base_model_can_follow():
    for s in subjects.SUBJECTS.values():
        prompts = subjects.eval_prompts(s)
        assert len(prompts) == 10 and {p.family for p in prompts} == {"context", "property"}
        assert len({p.text for p in prompts}) == 10
        for p in prompts:
            spec = world.parse_caption(p.text)  # in the vocabulary
            assert spec["subject"] == s.token
            assert p.position is None and all(o["position"] is None for o in spec["objects"])
            colours = {p.background, p.main, p.other.color if p.other else None} - {None}
            assert not colours & {s.main, s.accent}, (s.name, p.text)
            if p.other is not None:
                assert p.other.color != p.background and p.other.shape != s.shape
            img = subjects.render_prompt(s, p)
            assert img.shape == (32, 32, 3) and len(np.unique(img.reshape(-1, 3), axis=0)) >= 3
