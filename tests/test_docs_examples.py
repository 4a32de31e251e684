"""The README's "Using Arlow models" examples run exactly as written.

The code blocks are read from README.md at test time, so editing an example into something broken fails here. The
only substitutions are the model folders (``path/to/arlow-model`` and ``path/to/arlow-text-model`` become tiny
folders made by the README's own ``arlow create-model ... --preset tiny`` command) and the media, which the test
writes under the names the examples use (built-in photos and clip) into the working directory.
"""

import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import arlow
from arlow.cli import main as arlow_main
from arlow.data.sources import builtin_media

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Using Arlow models"
VLM_PLACEHOLDER = "path/to/arlow-model"
TEXT_PLACEHOLDER = "path/to/arlow-text-model"


def _section() -> str:
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md lost its {SECTION!r} section"
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:] if end == -1 else text[start:end]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory with the README's media names and the tiny folders its commands create."""
    root = tmp_path_factory.mktemp("readme")
    images, videos = builtin_media()
    by_name = {Path(p).stem: p for p in images}
    for name, source in (("photo.jpg", by_name["astronaut"]), ("cat.jpg", by_name["chelsea"]),
                         ("dog.jpg", by_name["coffee"]), ("clip.mp4", videos[0])):
        shutil.copy(source, root / name)
    # The README's own command line for the tiny preset, run through the CLI entry point.
    preset_lines = [line for block in _blocks("bash") for line in block.splitlines()
                    if line.startswith("arlow create-model") and "--preset tiny" in line]
    assert preset_lines, "the README no longer shows `arlow create-model ... --preset tiny`"
    argv = shlex.split(preset_lines[0].split("#")[0])[1:]
    vlm_dir = root / argv[1]
    argv[1] = str(vlm_dir)
    assert arlow_main(argv) == 0
    text_dir = root / "tiny-text"
    assert arlow_main(["create-model", str(text_dir), "--preset", "tiny", "--text-only"]) == 0
    return root, vlm_dir, text_dir


def _run(code: str, namespace: dict, replacements: dict[str, Path]) -> None:
    for placeholder, folder in replacements.items():
        code = code.replace(f'"{placeholder}"', repr(str(folder)))
    exec(compile(code, str(README), "exec"), namespace)


def test_readme_examples_run_as_written(workdir, monkeypatch, capsys):
    root, vlm_dir, text_dir = workdir
    monkeypatch.chdir(root)
    blocks = _blocks("python")
    assert len(blocks) == 4, f"expected the four usage examples (text, image, video, mixed batch), found {len(blocks)}"
    for block in blocks:  # only the import line differs from a stock-transformers example
        imports = [line for line in block.splitlines() if re.match(r"\s*(import|from) ", line)]
        assert all("arlow" not in line or line.strip() == "import arlow" for line in imports), imports
    assert f'"{TEXT_PLACEHOLDER}"' in blocks[0] and f'"{VLM_PLACEHOLDER}"' in blocks[1]

    namespace: dict = {"__name__": "__readme__"}
    replacements = {TEXT_PLACEHOLDER: text_dir, VLM_PLACEHOLDER: vlm_dir}

    # 1. text only, with the ArlowForCausalLM folder
    _run(blocks[0], namespace, replacements)
    assert type(namespace["model"]).__name__ == "ArlowForCausalLM"
    assert namespace["output_ids"].shape[1] > namespace["inputs"]["input_ids"].shape[1]

    # 2. one image (the session continues: 3 and 4 reuse model and processor, as a reader would)
    _run(blocks[1], namespace, replacements)
    assert isinstance(namespace["model"], arlow.ArlowForConditionalGeneration)
    assert isinstance(namespace["processor"], arlow.ArlowProcessor)
    inputs = namespace["inputs"]
    assert inputs["image_grid_thw"].shape == (1, 3)
    assert namespace["new_tokens"].shape[1] >= 1

    # 3. a video at one frame per second
    _run(blocks[2], namespace, replacements)
    inputs = namespace["inputs"]
    assert inputs["video_grid_thw"].shape == (1, 3) and "pixel_values" not in inputs
    assert namespace["new_tokens"].shape[1] >= 1

    # 4. a left-padded batch: two images / text only / image + video
    _run(blocks[3], namespace, replacements)
    inputs, answers = namespace["inputs"], namespace["answers"]
    assert inputs["input_ids"].shape[0] == 3 and len(answers) == 3
    assert inputs["image_grid_thw"].shape[0] == 3 and inputs["video_grid_thw"].shape[0] == 1
    assert (inputs["attention_mask"][:, -1] == 1).all() and (inputs["attention_mask"][1] == 0).any()  # left padding
    assert all(isinstance(a, str) for a in answers)
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 6  # every example printed its answers


def test_text_example_also_runs_on_a_vision_language_folder(workdir, monkeypatch):
    """The README says a full VLM folder works for text-only use: AutoModelForCausalLM gives the VLM class."""
    root, vlm_dir, _ = workdir
    monkeypatch.chdir(root)
    namespace: dict = {"__name__": "__readme__"}
    _run(_blocks("python")[0], namespace, {TEXT_PLACEHOLDER: vlm_dir})
    model = namespace["model"]
    assert isinstance(model, arlow.ArlowForConditionalGeneration)
    # Greedy decoding is deterministic: the printed continuation is what a plain forward loop produces.
    inputs, output_ids = namespace["inputs"], namespace["output_ids"]
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(ids, output_ids[:, : ids.shape[1]])
