"""The short end-to-end demonstration: MAE pretraining -> alignment -> instruction tuning of a tiny VLM on generated
shapes, and the model answers held-out questions far above chance - only when it can see the media.

The control here is the trained model asked about blanked copies of the same held-out images and clips (same
questions, same answers): it must fall to chance, so the accuracy comes from the pixels and not from the text.
(scripts/demo_shapes_pipeline.py also runs the whole pipeline trained on blanked media; docs/finetuning.md has its
numbers.) A few minutes on 2 cores.
"""

from __future__ import annotations

import pytest

from arlow.demos.shapes import SHORT, evaluate, run_pipeline
from arlow.data.shapes import write_shapes_dataset

pytestmark = pytest.mark.slow


def test_short_pipeline_learns_from_the_media(tmp_path):
    results = run_pipeline(tmp_path / "real", SHORT, log=print)
    accuracy = results["accuracy"]
    print({task: round(a["accuracy"], 3) for task, a in accuracy.items()})
    # every stage trained: its loss fell
    for stage, (first, last) in results["losses_first_last"].items():
        assert last < first, (stage, first, last)
    # colour is read from the image almost always; overall far above the 1/4 chance
    assert accuracy["colour"]["accuracy"] >= 0.8
    assert accuracy["all"]["accuracy"] >= accuracy["all"]["chance"] + 0.2

    # the same held-out questions over blank media (same seed: the same scenes, answers and order)
    blank = write_shapes_dataset(tmp_path / "blank-eval", train_images=SHORT.train_images,
                                 train_clips=SHORT.train_clips, eval_images=SHORT.eval_images,
                                 eval_clips=SHORT.eval_clips, seed=SHORT.seed, blank=True)
    control = evaluate(tmp_path / "real" / "sft", blank["eval"])
    print({task: round(a["accuracy"], 3) for task, a in control.items()})
    assert control["all"]["total"] == accuracy["all"]["total"]
    for task, result in control.items():
        assert result["accuracy"] <= result["chance"] + 0.15, (task, result)
