"""The short end-to-end demonstration: MAE pretraining -> alignment -> instruction tuning of a tiny VLM on generated
shapes; the model answers 100 held-out questions each on colour, count, a single shape's position and the direction
of motion in a clip above chance at the 1% level - and only when the media carry the answer.

Two controls can fail, and must: the same pipeline trained on media shuffled against their answers, evaluated on
correctly paired held-out data, and the trained model asked each held-out question about another sample's media.
Both must land inside the range a guesser lands in 99% of the time. (A blank-media control cannot fail: identical
blank inputs make any model answer one choice per question type, exactly chance whatever it learnt.)

The fast tests check the statistics against an independent computation and the controls' data (a true
derangement; held-out sets identical and balanced). The pipeline test is slow (see docs/finetuning.md for its time).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from fractions import Fraction

import pytest

from arlow.data.shapes import POSITIONS, eval_items, write_shapes_dataset
from arlow.demos.shapes import SHORT, mismatched, run_pipeline
from arlow.evaluation.binomial import binomial_test, chance_range, wilson_interval


def _exact_tail(k: int, n: int, p: Fraction) -> Fraction:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (36, 100), (40, 100), (100, 100), (120, 400)])
def test_binomial_test_is_the_exact_tail(k, n):
    assert binomial_test(k, n, 0.25) == pytest.approx(float(_exact_tail(k, n, Fraction(1, 4))), rel=1e-9, abs=1e-300)


def test_chance_range_is_the_central_99_percent():
    n, p = 100, Fraction(1, 4)
    lo, hi = chance_range(n, 0.25, 0.99)
    below = 1 - _exact_tail(lo, n, p)  # P(X < lo)
    above = _exact_tail(hi + 1, n, p)  # P(X > hi)
    assert below <= Fraction(5, 1000) < below + math.comb(n, lo) * p**lo * (1 - p) ** (n - lo)
    assert above <= Fraction(5, 1000) < above + math.comb(n, hi) * p**hi * (1 - p) ** (n - hi)


def test_wilson_interval_matches_its_formula_and_covers():
    lo, hi = wilson_interval(30, 100, 0.95)
    z, phat, n = 1.959963984540054, 0.3, 100
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


def test_shuffled_training_data_pairs_media_with_other_answers_and_keeps_the_held_out_set(tmp_path):
    sizes = dict(train_images=24, train_clips=8, eval_images=8, eval_singles=8, eval_clips=8, seed=3)
    real = write_shapes_dataset(tmp_path / "real", **sizes)
    shuffled = write_shapes_dataset(tmp_path / "shuffled", **sizes, shuffle_answers=True)
    # the held-out questions and media are the same for both pipelines
    assert real["eval"].read_text() == shuffled["eval"].read_text()
    for item in eval_items(real["eval"]):
        rel = item["media"].split("/real/")[1]
        assert (tmp_path / "real" / rel).read_bytes() == (tmp_path / "shuffled" / rel).read_bytes()
    # the training media are the same, every one of them captioned as another sample
    captions = [[json.loads(line) for line in d["captions"].read_text().splitlines()] for d in (real, shuffled)]
    assert [c.get("image", c.get("video")) for c in captions[0]] == [c.get("image", c.get("video"))
                                                                      for c in captions[1]]
    texts = [c["caption"] for c in captions[0]]
    moved = [c["caption"] for c in captions[1]]
    assert sorted(texts) == sorted(moved)  # the same texts, permuted
    assert sum(a == b for a, b in zip(texts, moved)) < len(texts) // 2  # (equal only when two samples' texts are)
    # held out: 100 questions per type in the demo; here 8, with every answer equally often
    items = eval_items(real["eval"])
    counts = Counter((i["task"], i["answer"]) for i in items)
    assert Counter(i["task"] for i in items) == {"colour": 8, "count": 8, "position": 8, "motion": 8}
    assert set(counts.values()) == {2}


def test_validation_set_is_its_own_and_changes_neither_training_nor_test_data(tmp_path):
    """Settings are chosen on val.jsonl; adding it must leave the training data and the test questions byte-identical,
    and its media must be none of theirs."""
    sizes = dict(train_images=12, train_clips=4, eval_images=8, eval_singles=8, eval_clips=8, seed=5)
    plain = write_shapes_dataset(tmp_path / "plain", **sizes)
    with_val = write_shapes_dataset(tmp_path / "val", **sizes, val_images=4, val_singles=8, val_clips=4)
    assert "val" not in plain and not (tmp_path / "plain" / "val.jsonl").exists()
    for name in ("captions", "chat", "eval"):
        assert plain[name].read_text() == with_val[name].read_text()
    val, test = eval_items(with_val["val"]), eval_items(with_val["eval"])
    assert Counter(i["task"] for i in val) == {"colour": 4, "count": 4, "position": 8, "motion": 4}
    assert Counter(i["answer"] for i in val if i["task"] == "position") == {p: 2 for p in POSITIONS}
    digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()  # noqa: E731
    val_media = {digest(i["media"]) for i in val}
    others = {digest(p) for p in (tmp_path / "val").rglob("*") if p.suffix in (".png", ".mp4")
              and "/val" not in str(p.relative_to(tmp_path / "val").parent)}
    assert len(val_media) == len({i["media"] for i in val}) and not val_media & others


def test_mismatched_media_moves_every_question_to_another_sample_of_its_task():
    items = [{"task": t, "kind": "video" if t == "motion" else "image", "media": f"{t}{i}", "answer": str(i)}
             for t in ("colour", "motion") for i in range(5)]
    out = mismatched(items, seed=1)
    for before, after in zip(items, out):
        assert after["media"] != before["media"] and after["media"].startswith(before["task"])
        assert after["answer"] == before["answer"] and after["kind"] == before["kind"]
    assert sorted(o["media"] for o in out) == sorted(i["media"] for i in items)  # each media used once
    with pytest.raises(ValueError, match="cannot mismatch"):
        mismatched(items[:1])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ARLOW_DEMO_TEST") != "1",
                    reason="two whole pipelines (~10 min each on one free core of a 2-core host): "
                           "run with ARLOW_DEMO_TEST=1")
def test_short_pipeline_learns_every_skill_and_both_controls_fall_to_chance(tmp_path):
    tasks = ("colour", "count", "position", "motion")
    real = run_pipeline(tmp_path / "real", SHORT, log=print)
    for stage, (first, last) in real["losses_first_last"].items():
        assert last < first, (stage, first, last)  # every stage trained
    for evaluation in ("accuracy", "mismatched"):
        print(evaluation, {t: (a["correct"], a["total"], round(a["p_value"], 6)) for t, a in real[evaluation].items()})
    for task in tasks:
        result = real["accuracy"][task]
        assert result["total"] >= 100
        assert result["p_value"] < 0.01, (task, result)  # learnt: above chance at the 1% level
        lo, hi = real["mismatched"][task]["chance_range99"]
        assert lo <= real["mismatched"][task]["correct"] <= hi, (task, real["mismatched"][task])

    shuffled = run_pipeline(tmp_path / "shuffled", SHORT, shuffle_answers=True, log=print)
    print("shuffled", {t: (a["correct"], a["total"]) for t, a in shuffled["accuracy"].items()})
    for task in tasks:
        result = shuffled["accuracy"][task]
        lo, hi = result["chance_range99"]
        assert lo <= result["correct"] <= hi, (task, result)  # at chance: nothing to learn from the media
