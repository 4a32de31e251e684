"""One runner for stages 2 and 3: recipe -> model + processor -> freezing / LoRA -> data -> the training engine.

A recipe is a YAML file with these sections (``arlow/configs/finetune/*.yaml``; every value can be overridden on the
command line with dotted keys, ``train.max_steps=50``):

    model:      where the VLM comes from (``path``, or ``vision_encoder`` + ``text_model``, or ``preset``),
                ``attn_implementation``, ``gradient_checkpointing``
    data:       ``train`` source(s) and the batching / truncation settings of :class:`FinetuneData`; ``processor``
                holds processing options (``max_pixels``, ``fps`` ...)
    trainable:  ``groups`` that train (see :mod:`arlow.finetune.freezing`), per-group ``lr`` / ``weight_decay``
    lora:       (``arlow sft`` only) :class:`~arlow.finetune.lora.LoraSettings`
    train:      :class:`arlow.training.TrainConfig`

Every checkpoint ``output_dir/checkpoint-N/`` holds, next to the engine's resume state, ``model/`` - a complete model
folder (``from_pretrained`` + ``AutoProcessor``) - and with LoRA also ``adapter/`` (see :mod:`arlow.finetune.lora`).
"""

from __future__ import annotations

import copy
import json
import logging
from importlib import resources
from pathlib import Path

import torch

from ..training import TrainConfig, Trainer, rank_and_world
from ..training.config import apply_overrides, check_keys, load_yaml
from ..training.mfu import dense_train_flops, train_flops, vit_forward_flops
from .data import FinetuneData
from .examples import ExampleEncoder
from .freezing import apply_freezing, format_report, optimizer_groups, trainable_report
from .lora import LoraSettings, apply_lora, check_quantization, load_quantized, merge_adapter, save_adapter

__all__ = ["STAGES", "recipe_path", "model_folder", "load_recipe", "build_model", "build_data", "finetune", "MODEL_DIR",
           "ADAPTER_DIR", "add_common_arguments", "run_stage"]

logger = logging.getLogger("arlow.finetune")

MODEL_DIR, ADAPTER_DIR = "model", "adapter"
SECTIONS = {"model", "data", "trainable", "lora", "train"}
# stage -> (task of the encoder, default trainable groups, default recipe)
STAGES = {
    "align": ("caption", ["merger", "deepstack_mergers", "gates"], "align_tiny"),
    "sft": ("chat", ["merger", "deepstack_mergers", "gates", "embeddings", "language_model"], "sft_tiny"),
}
_LORA_DEFAULT_GROUPS = ["merger", "deepstack_mergers", "gates", "lora"]
_MODEL_KEYS = {"path", "vision_encoder", "text_model", "tokenizer", "preset", "attn_implementation",
               "gradient_checkpointing", "seed"}
_DATA_KEYS = {"train", "media_root", "max_length", "overflow", "tokens_per_batch", "max_batch_size", "group_size",
              "shuffle", "num_workers", "prefetch_factor", "epochs", "dummy_vision", "caption_prompt", "processor",
              "cache"}


def recipe_path(name: str) -> Path:
    """A user's YAML file, or the name of a recipe shipped in ``arlow/configs/finetune/``."""
    if Path(name).is_file():
        return Path(name)
    shipped = Path(str(resources.files("arlow") / "configs" / "finetune" / f"{name}.yaml"))
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in shipped.parent.glob("*.yaml"))
    raise ValueError(f"no recipe {name!r}: give a YAML file or one of the shipped recipes {names}")


def load_recipe(stage: str, config: str | None = None, overrides: list[str] | None = None) -> dict:
    """The recipe tree after overrides; unknown sections and keys are refused."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGES)}")
    tree = load_yaml(recipe_path(config or STAGES[stage][2]))
    if overrides:
        tree = apply_overrides(tree, overrides)
    unknown = set(tree) - SECTIONS
    if unknown:
        raise ValueError(f"unknown recipe sections {sorted(unknown)}; expected {sorted(SECTIONS)}")
    if stage == "align" and tree.get("lora"):
        raise ValueError("the lora section belongs to `arlow sft`; alignment trains the mergers and gates")
    sections = (("model", _MODEL_KEYS), ("data", _DATA_KEYS), ("trainable", {"groups", "lr", "weight_decay"}))
    for section, keys in sections:
        check_keys(section, tree.get(section) or {}, sorted(keys))
    return tree


# ----------------------------------------------------------------------------------------------------------------
# Model


def model_folder(path: str | Path) -> Path:
    """A model folder; a fine-tuning ``checkpoint-N/`` (its ``model/``); or a fine-tuning run's ``output_dir`` (the
    ``model/`` of its newest complete checkpoint)."""
    from ..training.checkpoint import list_checkpoints

    path = Path(path)
    if (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    if (path / "config.json").is_file():
        return path
    for _, checkpoint in reversed(list_checkpoints(path)):
        if (checkpoint / MODEL_DIR / "config.json").is_file():
            return checkpoint / MODEL_DIR
    raise FileNotFoundError(f"{path} is not a model folder (no config.json), nor a checkpoint holding {MODEL_DIR}/, "
                            "nor a run folder with such checkpoints")


def build_model(section: dict, lora: LoraSettings | None = None):
    """``(model, processor)`` from the ``model`` section: ``path`` (a VLM folder), ``vision_encoder`` +
    ``text_model`` (assembled as ``arlow create-model`` does), or ``preset`` (random weights)."""
    from ..assemble import assemble, build_preset
    from ..modeling.multimodal import ArlowForConditionalGeneration
    from ..processing import ArlowProcessor

    section = dict(section or {})
    attn = section.get("attn_implementation", "sdpa")
    sources = [k for k in ("path", "preset") if section.get(k)] + (
        ["vision_encoder + text_model"] if section.get("vision_encoder") or section.get("text_model") else [])
    if len(sources) != 1:
        raise ValueError("the model section needs exactly one of: path (a VLM folder), vision_encoder + text_model "
                         f"(an exported encoder and an ArlowForCausalLM folder), or preset; got {sources or 'none'}")
    quantization = lora.quantization if lora is not None and lora.enabled else None
    if quantization is not None:
        check_quantization(quantization)
        if not section.get("path"):
            raise ValueError("QLoRA loads a saved VLM folder quantized: set model.path (assemble the model first with "
                             "`arlow create-model`)")
    if section.get("path"):
        folder = model_folder(section["path"])
        if quantization is not None:
            model = load_quantized(folder, quantization, attn, bool(section.get("gradient_checkpointing")))
        else:
            model = ArlowForConditionalGeneration.from_pretrained(str(folder), attn_implementation=attn)
        processor = ArlowProcessor.from_pretrained(str(folder))
    elif section.get("preset"):
        model, processor = build_preset(section["preset"], seed=int(section.get("seed", 0)))
    else:
        if not (section.get("vision_encoder") and section.get("text_model")):
            raise ValueError("model.vision_encoder and model.text_model go together")
        model, processor = assemble(section["vision_encoder"], section["text_model"], section.get("tokenizer"))
    if attn and not section.get("path"):
        model.set_attn_implementation(attn)
    if section.get("gradient_checkpointing") and quantization is None:
        model.activation_checkpointing_enable()
    return model, processor


# ----------------------------------------------------------------------------------------------------------------
# Data


def shapes_demo_data(output_dir: str | Path, task: str) -> Path:
    """``data.train: shapes``: the generated shapes data set (:mod:`arlow.finetune.shapes`), written once next to
    the run (``<output_dir>/../shapes-data``); captions for alignment, conversations for instruction tuning."""
    from .shapes import write_shapes_dataset

    root = Path(output_dir).resolve().parent / "shapes-data"
    done = root / "shapes.json"
    rank, _ = rank_and_world()
    if not done.is_file():
        if rank == 0:
            write_shapes_dataset(root, train_images=200, train_clips=80, eval_images=40, eval_clips=20)
        else:  # the other ranks wait for rank 0 (no process group exists yet)
            import time

            for _ in range(600):
                if done.is_file():
                    break
                time.sleep(0.5)
    return root / ("captions.jsonl" if task == "caption" else "chat.jsonl")


def build_data(section: dict, processor, task: str, seed: int, output_dir: str | Path = ".") -> FinetuneData:
    from .shapes import MEDIA_SETTINGS

    section = dict(section or {})
    if "train" not in section:
        raise ValueError("data.train is required: a .jsonl file, a saved datasets folder or .tar shards")
    if section["train"] == "shapes":
        section["train"] = str(shapes_demo_data(output_dir, task))
        section["processor"] = {**MEDIA_SETTINGS, **(section.get("processor") or {})}
    encoder = ExampleEncoder(processor, task, max_length=section.pop("max_length", 2048),
                             caption_prompt=section.pop("caption_prompt", ""),
                             media_kwargs=section.pop("processor", None))
    rank, world = rank_and_world()
    source = section.pop("train")
    return FinetuneData(source, encoder, seed=seed, rank=rank, world_size=world, **section)


def _flops_estimate(model):
    """``batch -> FLOPs`` of forward + backward: ``6 N T`` for the decoder (embeddings excluded, LM head included)
    plus 3x the vision encoder's forward over the batch's items."""
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    head = text.hidden_size * text.vocab_size
    mlp_hidden = int(vision.embed_dim * vision.mlp_ratio)

    def flops(batch) -> float:
        total = dense_train_flops(layers + head, int(batch["attention_mask"].sum()))
        for key in ("image_grid_thw", "video_grid_thw"):
            if batch.get(key) is not None:
                lengths = batch[key].prod(-1).tolist()
                total += train_flops(vit_forward_flops(lengths, vision.depth, vision.embed_dim, mlp_hidden,
                                                       vision.patch_dim))
        return total

    return flops


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint export


def _unwrap_peft(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _needs_master_weights(model) -> bool:
    """ZeRO-3 partitions parameters and DeepSpeed bf16/fp16 holds low-precision copies: then the fp32 weights of
    record are the engine's ``model.safetensors``."""
    return any(hasattr(p, "ds_id") or p.dtype != torch.float32 for p in model.parameters()) and not getattr(
        _unwrap_peft(model), "is_quantized", False)


def _master_copy(model, checkpoint_dir: Path, lora: LoraSettings | None):
    from safetensors.torch import load_file

    from ..modeling.multimodal import ArlowForConditionalGeneration

    fresh = ArlowForConditionalGeneration(copy.deepcopy(_unwrap_peft(model).config))
    fresh.generation_config = copy.deepcopy(_unwrap_peft(model).generation_config)
    if lora is not None and lora.enabled:
        fresh = apply_lora(fresh, lora)
    state = load_file(str(checkpoint_dir / "model.safetensors"))
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{checkpoint_dir}/model.safetensors does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return fresh


def export_checkpoint(model, processor, checkpoint_dir: Path, lora: LoraSettings | None, meta: dict) -> Path:
    """Write ``checkpoint_dir/model/`` (and ``adapter/`` with LoRA) from the engine's unwrapped model."""
    from ..assemble import save_model_dir

    checkpoint_dir = Path(checkpoint_dir)
    if _needs_master_weights(model):
        model = _master_copy(model, checkpoint_dir, lora)
    was_training = model.training
    is_peft = hasattr(model, "merge_and_unload")
    if is_peft:
        save_adapter(model, checkpoint_dir / ADAPTER_DIR)
        processor.save_pretrained(checkpoint_dir / ADAPTER_DIR)
    if not is_peft or (lora is not None and lora.save_merged):
        plain = merge_adapter(copy.deepcopy(model)) if is_peft else model
        save_model_dir(plain, processor, checkpoint_dir / MODEL_DIR, overwrite=True)
    (checkpoint_dir / "finetune.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    model.train(was_training)
    return checkpoint_dir


# ----------------------------------------------------------------------------------------------------------------
# The run


def finetune(tree: dict, stage: str) -> dict:
    """Run a recipe tree for ``stage`` (``"align"`` or ``"sft"``). Returns the engine's summary plus the data
    pipeline's drop counts."""
    task, default_groups, _ = STAGES[stage]
    train_cfg = TrainConfig.from_dict(dict(tree.get("train") or {}))
    lora = LoraSettings.from_dict(tree.get("lora")) if stage == "sft" else None
    trainable = dict(tree.get("trainable") or {})
    extra = set(trainable) - {"groups", "lr", "weight_decay"}
    if extra:
        raise ValueError(f"unknown trainable key(s) {sorted(extra)}; valid: groups, lr, weight_decay")
    groups = trainable.get("groups") or (_LORA_DEFAULT_GROUPS if lora is not None and lora.enabled else default_groups)
    groups = list(groups)
    if lora is not None and lora.enabled and "lora" not in groups:
        groups.append("lora")
    if "lora" in groups and (lora is None or not lora.enabled):
        raise ValueError("trainable.groups lists 'lora' but lora.enabled is false")

    torch.manual_seed(train_cfg.seed)  # identical weights (and LoRA init) on every rank and on resume
    model, processor = build_model(tree.get("model"), lora)
    if lora is not None and lora.enabled:
        model = apply_lora(model, lora)
    apply_freezing(model, groups)
    lrs = dict(trainable.get("lr") or {})
    param_groups = optimizer_groups(model, lrs, trainable.get("weight_decay"))
    rank, _ = rank_and_world()
    if rank == 0:
        print(f"arlow {stage}: trainable parameter groups\n"
              + format_report(trainable_report(model, lrs, train_cfg.learning_rate)), flush=True)

    data = build_data(tree.get("data"), processor, task, train_cfg.seed, train_cfg.output_dir)
    meta = {"stage": stage, "trainable_groups": groups, "recipe": tree}

    def on_checkpoint(checkpoint_dir, unwrapped):
        export_checkpoint(unwrapped, processor, Path(checkpoint_dir), lora,
                          {**meta, "dropped_examples_rank0": dict(data.dropped_by_kind)})

    trainer = Trainer(train_cfg, model, data, param_groups=param_groups,
                      flops_per_batch=_flops_estimate(_unwrap_peft(model)), on_checkpoint=on_checkpoint)
    summary = trainer.train()
    summary["dropped_examples"] = data.num_dropped
    summary["dropped_by_kind"] = dict(data.dropped_by_kind)
    if summary.get("last_checkpoint"):
        summary["model_dir"] = str(Path(summary["last_checkpoint"]) / MODEL_DIR)
    return summary


def add_common_arguments(parser, stage: str) -> None:
    parser.add_argument("--config", default=None,
                        help=f"recipe YAML, or a shipped recipe name (default: {STAGES[stage][2]})")
    parser.add_argument("--resume", default=None, help='"latest" or a checkpoint directory (same as train.resume=...)')
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")


def run_stage(args, stage: str) -> int:
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    tree = load_recipe(stage, args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(tree, sort_keys=False))
        return 0
    summary = finetune(tree, stage)
    if rank_and_world()[0] == 0:
        print(json.dumps(summary, indent=2, default=str))
        if summary.get("model_dir"):
            print(f"the trained model folder is {summary['model_dir']}")
    return 0
