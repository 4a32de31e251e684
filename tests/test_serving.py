"""The vLLM plugin's contract that holds without vLLM: the entry point, no vLLM import from ``import arlow``, and the
config key vLLM reads for 3-D positions. The serving itself is tested in test_serving_vllm.py (vLLM environment)."""

import subprocess
import sys
import tomllib
from pathlib import Path

from arlow.configuration import ArlowConfig
from arlow.modeling.rope import mrope_slot_axes
from arlow.serving import vllm_plugin

ROOT = Path(__file__).resolve().parents[1]


def test_plugin_is_declared_as_a_vllm_general_plugin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    target = project["entry-points"]["vllm.general_plugins"]["arlow"]
    module, function = target.split(":")
    assert module == vllm_plugin.__name__ and callable(getattr(vllm_plugin, function))
    assert set(vllm_plugin.ARCHITECTURES) == {"ArlowForCausalLM", "ArlowForConditionalGeneration"}


def test_importing_arlow_and_the_plugin_module_does_not_import_vllm():
    code = "import sys, arlow, arlow.serving.vllm_plugin; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_mrope_section_counts_the_rotary_frequencies_of_each_axis():
    config = ArlowConfig(vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=96),
                         text_config=dict(vocab_size=64, hidden_size=96, intermediate_size=8, num_hidden_layers=1,
                                          num_attention_heads=1, num_key_value_heads=1,
                                          head_dim=64))
    slots = mrope_slot_axes(config.text_config.mrope_sections)
    assert config.mrope_section == [int((slots == axis).sum()) for axis in range(3)]
    assert sum(config.mrope_section) == config.text_config.head_dim // 2
    assert "mrope_section" not in config.to_dict()  # derived, never saved
