"""Answer a multiple-choice question by scoring each candidate answer with the model.

The prompt is the chat template up to ``<|im_start|>assistant\\n``; each candidate is the answer text followed by
``<|im_end|>``. A candidate's score is the sum of the log-probabilities of its tokens given the prompt and its own
earlier tokens, so multi-token answers ("top left") compete fairly with one-token answers and the model must also
be ready to stop. The prediction is the best-scoring candidate; accuracy against the known answer measures what the
model learned, with chance at ``1 / len(choices)``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["choice_scores", "accuracy_by_task"]


@torch.no_grad()
def choice_scores(model, processor, messages: list[dict], choices: list[str], **processor_kwargs) -> torch.Tensor:
    """``(len(choices),)`` summed log-probabilities of each candidate answer to ``messages`` (one user turn or a
    conversation ending with a user turn)."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", **processor_kwargs)
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prefix = prompt["input_ids"][0]
    answers = [torch.tensor(tokenizer(c, add_special_tokens=False)["input_ids"] + [end]) for c in choices]
    length = len(prefix) + max(len(a) for a in answers)
    n = len(choices)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((n, length), pad, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, answer in enumerate(answers):
        row = torch.cat([prefix, answer])
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    media = {}
    for pixels, grid, extra in (("pixel_values", "image_grid_thw", None),
                                ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")):
        if pixels in prompt:  # every candidate row carries its own copy of the prompt's media
            media[pixels] = prompt[pixels].repeat(n, 1)
            media[grid] = prompt[grid].repeat(n, 1)
            if extra and extra in prompt:
                media[extra] = prompt[extra].repeat(n)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, **media}.items()}
    logits = model(**inputs).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    scores = torch.zeros(n)
    start = len(prefix)
    for i, answer in enumerate(answers):
        positions = torch.arange(start - 1, start - 1 + len(answer), device=logprobs.device)
        scores[i] = logprobs[i, positions, answer.to(logprobs.device)].sum().cpu()
    return scores


def accuracy_by_task(model, processor, items: list[dict], **processor_kwargs) -> dict[str, dict]:
    """Accuracy per ``task`` (and ``"all"``) of items ``{"kind": "image"|"video", "media", "question", "choices",
    "answer", "task"}`` (see :func:`arlow.data.shapes.eval_items`). Returns
    ``{task: {"correct", "total", "accuracy", "chance"}}``."""
    was_training = model.training
    model.eval()
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    chance: dict[str, float] = {}
    for item in items:
        messages = [{"role": "user", "content": [{"type": item["kind"], "path": item["media"]},
                                                 {"type": "text", "text": item["question"]}]}]
        scores = choice_scores(model, processor, messages, item["choices"], **processor_kwargs)
        right = item["choices"][int(scores.argmax())] == item["answer"]
        for key in (item["task"], "all"):
            tally[key][0] += int(right)
            tally[key][1] += 1
        chance[item["task"]] = 1.0 / len(item["choices"])
    model.train(was_training)
    tasks = [t for t in tally if t != "all"]
    chance["all"] = sum(chance[t] * tally[t][1] for t in tasks) / max(tally["all"][1], 1)
    return {task: {"correct": c, "total": n, "accuracy": c / n, "chance": chance[task]}
            for task, (c, n) in tally.items()}
