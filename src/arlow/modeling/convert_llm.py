"""Turn a Qwen2 / Qwen2.5 / Qwen3 / Llama checkpoint directory into an ``ArlowForCausalLM`` checkpoint.

The decoders share Arlow's layout (pre-norm RMSNorm, GQA, SwiGLU, RoPE), so the conversion is a config translation
plus a checked rename of the weights, done one safetensors shard at a time (memory: one shard). What Arlow's
architecture cannot express is refused with a ``ValueError`` naming it, never dropped silently:

* Llama / Qwen3 ``attention_bias=True`` (they put a bias on ``o_proj`` too; Arlow's ``o_proj`` has none),
* Llama ``mlp_bias=True``, ``partial_rotary_factor`` < 1, per-layer-type RoPE, unknown RoPE types or activations,
* any weight the mapping does not know, and any Arlow weight the checkpoint lacks.

Mapped: Qwen2's q/k/v biases -> ``attention_bias=True``; Qwen3's per-head ``q_norm``/``k_norm`` ->
``use_qk_norm=True``; sliding-window layers (same mask semantics: query ``q`` sees keys ``q - W < k <= q``); every
RoPE scaling type transformers implements; tied embeddings. Tokenizer files and ``generation_config.json`` are
copied along. The result is written to a temporary folder next to ``dst_dir`` and renamed into place.

Usage::

    python -m arlow.modeling.convert_llm /path/to/Qwen2.5-0.5B /path/to/arlow-0.5b
    # or, from Python
    from arlow.modeling.convert_llm import convert_llm
    convert_llm("/path/to/Qwen2.5-0.5B", "/path/to/arlow-0.5b")
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..configuration import ArlowTextConfig
from .text import ArlowForCausalLM

__all__ = ["SUPPORTED_MODEL_TYPES", "arlow_config_from", "convert_llm", "map_weight_name", "main"]

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")

# Files a tokenizer (or generation defaults) may live in; copied verbatim when present.
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "qwen.tiktoken", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)

_LAYER_KEY = re.compile(
    r"^model\.layers\.\d+\.("
    r"self_attn\.[qkv]_proj\.(weight|bias)|self_attn\.o_proj\.weight|self_attn\.[qk]_norm\.weight|"
    r"mlp\.(gate|up|down)_proj\.weight|input_layernorm\.weight|post_attention_layernorm\.weight)$"
)
_TOP_KEYS = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def _refuse(what: str, why: str) -> ValueError:
    return ValueError(f"cannot convert: {what}. {why}")


def arlow_config_from(src) -> ArlowTextConfig:
    """Translate a transformers Qwen2/Qwen3/Llama config into an ``ArlowTextConfig`` (refusing what cannot map)."""
    kind = src.model_type
    if kind not in SUPPORTED_MODEL_TYPES:
        raise _refuse(f"model_type {kind!r}", f"Supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2.5 is qwen2).")
    if kind in ("llama", "qwen3") and getattr(src, "attention_bias", False):
        raise _refuse(f"{kind} attention_bias=True",
                      "That puts a bias on o_proj as well; Arlow's o_proj has no bias (fork key layout).")
    if getattr(src, "mlp_bias", False):
        raise _refuse("mlp_bias=True", "Arlow's SwiGLU MLP has no biases.")
    if src.hidden_act not in ACT2FN:
        raise _refuse(f"hidden_act {src.hidden_act!r}", "transformers does not know this activation.")
    rope = dict(src.rope_parameters or {})
    if "rope_type" not in rope and rope and all(isinstance(v, dict) for v in rope.values()):
        raise _refuse("per-layer-type rope_parameters", "Arlow uses one RoPE for every layer.")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(f"partial_rotary_factor={rope['partial_rotary_factor']}", "Arlow rotates every head channel.")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise _refuse(f"rope_type {rope_type!r}", f"Known: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}.")
    layer_types = list(getattr(src, "layer_types", None) or ["full_attention"] * src.num_hidden_layers)
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise _refuse(f"layer types {unknown}", "Arlow has full and sliding-window attention layers only.")
    sliding_window = getattr(src, "sliding_window", None)
    head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads

    config = ArlowTextConfig(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads or src.num_attention_heads,
        head_dim=head_dim,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=src.initializer_range,
        rms_norm_eps=src.rms_norm_eps,
        use_cache=getattr(src, "use_cache", True),
        rope_parameters=rope,
        attention_bias=kind == "qwen2",  # Qwen2 always has q/k/v biases, never an o_proj bias
        use_qk_norm=kind == "qwen3",
        attention_dropout=float(getattr(src, "attention_dropout", 0.0) or 0.0),
        use_sliding_window=sliding_window is not None,
        sliding_window=sliding_window,
        max_window_layers=getattr(src, "max_window_layers", src.num_hidden_layers),
        layer_types=layer_types,
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", False)),
        pad_token_id=src.pad_token_id,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
    )
    config.architectures = ["ArlowForCausalLM"]
    if getattr(src, "dtype", None) is not None:
        config.dtype = src.dtype
    return config


def map_weight_name(name: str) -> str | None:
    """Source tensor name -> Arlow name; ``None`` for tensors to drop (cached rotary tables). Raises if unknown.

    Names are identical for ``*ForCausalLM`` checkpoints; a bare decoder (``*Model``) checkpoint gains ``model.``.
    """
    if name.endswith("rotary_emb.inv_freq"):
        return None  # a derived buffer some old checkpoints saved; Arlow recomputes it
    if not name.startswith(("model.", "lm_head.")):
        name = "model." + name
    if name in _TOP_KEYS or _LAYER_KEY.match(name):
        return name
    raise _refuse(f"weight {name!r}", "Arlow's decoder has no parameter it could map to.")


def _shard_files(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ValueError(
        f"{src} holds no model.safetensors or model.safetensors.index.json; convert .bin weights to safetensors first "
        "(load with transformers and save_pretrained)"
    )


def _expected_shapes(config: ArlowTextConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor an ``ArlowForCausalLM`` checkpoint holds (built on the meta device)."""
    with torch.device("meta"):
        model = ArlowForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # saved once, as the embedding
    return shapes


def convert_llm(src_dir: str | Path, dst_dir: str | Path, *, overwrite: bool = False) -> ArlowTextConfig:
    """Convert the checkpoint in ``src_dir`` (config.json + safetensors, sharded or not) into ``dst_dir``.

    Returns the ``ArlowTextConfig`` written. ``dst_dir`` then loads with ``ArlowForCausalLM.from_pretrained`` or
    ``AutoModelForCausalLM.from_pretrained`` (after ``import arlow``).
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json; pass a transformers checkpoint directory")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"{dst} exists and is not empty; pick a new folder or pass overwrite=True")
    config = arlow_config_from(AutoConfig.from_pretrained(src))
    expected = _expected_shapes(config)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        total_bytes = 0
        shards = _shard_files(src)
        for shard in shards:
            tensors = {}
            with safe_open(str(src / shard), framework="pt") as f:
                for name in f.keys():
                    new = map_weight_name(name)
                    if new is None or (new == "lm_head.weight" and config.tie_word_embeddings):
                        continue  # tied: the head is the embedding
                    if new not in expected:
                        raise _refuse(f"weight {name!r}", "the converted config has no such parameter "
                                      "(e.g. a bias the architecture lacks)")
                    if new in weight_map:
                        raise ValueError(f"weight {new!r} appears in two shards of {src}")
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != expected[new]:
                        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}; the config implies "
                                         f"{expected[new]}")
                    tensors[new] = tensor.contiguous()
                    weight_map[new] = shard
                    total_bytes += tensor.numel() * tensor.element_size()
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            del tensors
        missing = sorted(set(expected) - set(weight_map))
        if missing:
            raise ValueError(f"{src} lacks weights Arlow needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.save_pretrained(tmp)
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


def main(argv: list[str] | None = None) -> int:
    """``arlow convert-llm SRC DST [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="arlow convert-llm",
        description="Convert a Qwen2/Qwen2.5/Qwen3/Llama checkpoint directory into an Arlow causal LM checkpoint.",
    )
    parser.add_argument("src", help="transformers checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    config = convert_llm(args.src, args.dst, overwrite=args.overwrite)
    print(
        f"wrote {args.dst}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"heads {config.num_attention_heads}/{config.num_key_value_heads}, vocab {config.vocab_size}, "
        f"attention_bias={config.attention_bias}, use_qk_norm={config.use_qk_norm}, "
        f"rope={config.rope_parameters.get('rope_type', 'default')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
