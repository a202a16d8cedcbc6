"""Floors and ceilings of the micro metrics on hand-made images: one test per row of docs/micro-metrics.md."""

import numpy as np
import pytest

from tasks.metrics import micro as micro_metrics
from tasks.micro import subjects

from micro_cases import CASES, measure


@pytest.mark.parametrize("case", list(CASES))
def test_hand_made_case_stays_within_its_floor_and_ceiling(case):
    _, (s_lo, s_hi), (p_lo, p_hi), s_mean_max = CASES[case]
    sf, pf = measure(case)
    assert len(sf) == 10 * len(subjects.SUBJECTS)
    assert s_lo - 1e-6 <= sf.min() and sf.max() <= s_hi + 1e-6, (sf.min(), sf.max())
    assert p_lo - 1e-6 <= pf.min() and pf.max() <= p_hi + 1e-6, (pf.min(), pf.max())
    assert sf.mean() <= s_mean_max + 1e-6


def test_a_copy_of_a_training_image_scores_only_what_it_satisfies_of_the_prompt():
    for s in subjects.SUBJECTS.values():
        for i, p in enumerate(subjects.eval_prompts(s)):
            ref_background = s.backgrounds[i % 5]
            asked = [ref_background == p.background] if p.background else []
            asked += [False] * ((p.kind == "size") + (p.main is not None) + (p.other is not None))
            r = micro_metrics.score_image(subjects.reference_images(s)[i % 5], s, p)
            assert r["micro_subject_fidelity"] == 1.0
            assert r["micro_prompt_fidelity"] == pytest.approx(np.mean(asked) if asked else 0.0)


def test_colour_change_prompts_score_identity_by_structure():
    s = subjects.SUBJECTS["checker"]
    p = next(p for p in subjects.eval_prompts(s) if p.kind == "color" and p.background is None)
    copy = subjects.render(s, "blue", 4)
    recoloured = subjects.render(s, "blue", 4, main=p.main)
    assert micro_metrics.score_image(copy, s, p) == {"micro_subject_fidelity": 1.0, "micro_prompt_fidelity": 0.0}
    assert micro_metrics.score_image(recoloured, s, p) == {"micro_subject_fidelity": 1.0,
                                                           "micro_prompt_fidelity": 1.0}
    # Outside colour-change prompts the main colour is part of the identity.
    q = next(p for p in subjects.eval_prompts(s) if p.kind == "size")
    assert micro_metrics.score_image(subjects.render(s, "blue", 4, "small", main=p.main), s, q)[
        "micro_subject_fidelity"] == 0.0


def test_no_evaluation_prompt_asks_for_a_position():
    for s in subjects.SUBJECTS.values():
        assert all(p.position is None for p in subjects.eval_prompts(s))
        counts = {}
        for p in subjects.eval_prompts(s):
            counts[p.kind] = counts.get(p.kind, 0) + 1
        assert counts == {"background": 3, "object": 3, "size": 2, "color": 2}


def test_the_subject_on_a_background_of_its_own_colour_is_not_an_object():
    s = subjects.SUBJECTS["bullseye"]
    p = subjects.eval_prompts(s)[0]
    for colour in (s.main, s.accent):
        img = subjects.render(s, colour, 4)
        assert micro_metrics.score_image(img, s, p)["micro_subject_fidelity"] == 0.0
