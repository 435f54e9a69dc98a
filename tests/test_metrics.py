"""BLEU-4 and CIDEr-D against pycocoevalcap (a test-only dependency), fed pre-tokenised text
so its Java PTB tokenizer is not needed."""
import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from metrics import bleu, caption_scores, cider_d, tokenisation_for, tokenize

REFS = [
    ["A man in a red shirt is riding a bike down the street.", "A cyclist rides along a city road.",
     "A man rides his bicycle on the street.", "Someone on a bike in traffic.",
     "A person in red cycles past parked cars."],
    ["Two dogs play in the snow.", "A pair of dogs running through snow.", "Dogs playing outside in winter.",
     "Two brown dogs chase each other in the snow.", "Two dogs in a snowy field."],
    ["A little girl eats an ice cream cone.", "A child with ice cream.", "A girl is eating ice cream outside.",
     "A young girl licks her ice cream.", "A kid enjoys a cone of ice cream on a sunny day."],
    ["A crowd watches a concert at night.", "People at an outdoor concert.", "A band plays for a large crowd.",
     "Fans cheer at a night show.", "A stage lit up in front of many people."],
]
HYPS = ["A man in a red shirt rides a bike down the street.", "Two dogs play in the snow together.",
        "A little girl eats ice cream.", "A band plays for a crowd at night."]


def coco(refs, hyps):
    gts = {i: [" ".join(tokenize(r, "word")) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(tokenize(h, "word"))] for i, h in enumerate(hyps)}
    return Bleu(4).compute_score(gts, res, verbose=0)[0][3], Cider().compute_score(gts, res)[0]


def ours(refs, hyps):
    r = [[tokenize(x, "word") for x in rs] for rs in refs]
    h = [tokenize(x, "word") for x in hyps]
    return bleu(r, h), cider_d(r, h)


def test_english_example_set_matches_pycocoevalcap_to_1e6():
    (b_ref, c_ref), (b, c) = coco(REFS, HYPS), ours(REFS, HYPS)
    assert 0.1 < b_ref < 1 and c_ref > 0.5                  # a meaningful, non-degenerate example
    assert b == pytest.approx(b_ref, abs=1e-6)
    assert c == pytest.approx(c_ref, abs=1e-6)


def test_random_sets_match_pycocoevalcap_including_short_and_empty_hypotheses():
    rng = random.Random(3)
    words = "a the dog cat man woman runs sits on in red blue street park ball with".split()
    for trial in range(20):
        n = rng.randint(2, 8)
        refs = [[" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 5))]
                for _ in range(n)]
        hyps = [" ".join(rng.choices(words, k=rng.randint(0 if trial % 5 == 0 else 1, 10))) for _ in range(n)]
        (b_ref, c_ref), (b, c) = coco(refs, hyps), ours(refs, hyps)
        assert b == pytest.approx(b_ref, abs=1e-6) and c == pytest.approx(c_ref, abs=1e-6), (refs, hyps)


def test_perfect_and_wrong_captions_order_correctly():
    refs = [[r[0]] for r in REFS]
    perfect = caption_scores(refs, [r[0] for r in REFS])
    wrong = caption_scores(refs, ["purple elephants juggling"] * len(REFS))
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["cider"] > 5
    assert wrong["bleu4"] < 1e-3 and wrong["cider"] == 0
    assert perfect["tokenisation"] == "word"


def test_chinese_is_scored_on_characters_and_says_so():
    assert tokenize("一只橙色的猫，坐在窗台上。") == list("一只橙色的猫坐在窗台上")
    assert tokenize("穿T恤的man") == ["穿", "t", "恤", "的", "man"]
    assert tokenize("A dog's ball, too!") == ["a", "dog's", "ball", "too"]
    refs = [["一只橙色的猫坐在窗台上", "窗台上有一只猫"], ["雪山在蓝天下", "蓝天白云下的雪山"]]
    s = caption_scores(refs, ["一只猫坐在窗台上", "蓝天下的雪山"])
    assert s["tokenisation"] == "char" and tokenisation_for(["猫", "dog", "狗"]) == "char"
    assert 0 < s["bleu4"] < 1 and s["cider"] > 0


def test_cider_of_a_single_image_is_zero():
    assert caption_scores([["a dog"]], ["a dog"])["cider"] == 0.0
