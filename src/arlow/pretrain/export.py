"""Export of a pretraining checkpoint: what stage 2 needs, plus what continuing MAE needs.

``checkpoint-N/`` after export::

    vision_encoder/            ArlowVLVisionModel.save_pretrained: config.json (model_type arlow_vision) +
                               model.safetensors; loads with ArlowVLVisionModel / AutoModel.from_pretrained
    image_processor/           ArlowImageProcessor.save_pretrained (preprocessor_config.json)
    video_processor/           ArlowVideoProcessor.save_pretrained
    processor_config.json      both processors' settings in one file, for tools that read a single file
    mae_decoder/               config.json (the whole ArlowMAEConfig) + decoder.safetensors (every non-encoder
                               weight): with vision_encoder/ it rebuilds the full MAE model (continue pretraining,
                               reconstructions)
    pretrain_meta.json         step, resolution and the data settings the encoder was trained with
    README.md                  a short model card

``arlow export CHECKPOINT [--output DIR]`` re-exports any checkpoint the training engine wrote, from the engine
state alone (its ``config.json`` + ``model.safetensors`` hold the whole MAE model), or any MAE model directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..modeling.vision import ArlowVLVisionModel
from ..training.checkpoint import publish_folder
from ..processing.image import ArlowImageProcessor
from ..processing.video import ArlowVideoProcessor
from .mae import ArlowMAEConfig, ArlowMAEForPreTraining

__all__ = ["export_checkpoint", "load_mae_checkpoint", "run"]

MAE_CONFIG = "mae_config.json"  # the MAE config in engine checkpoints of earlier versions (now config.json)


def _processors(vision_config) -> tuple[ArlowImageProcessor, ArlowVideoProcessor]:
    """Processors matching the encoder's patching; pixel bounds default to the processors' own (native
    resolution), since the encoder has no absolute position table and accepts any size."""
    common = dict(patch_size=vision_config.patch_size, temporal_patch_size=vision_config.temporal_patch_size,
                  merge_size=vision_config.spatial_merge_size)
    return ArlowImageProcessor(**common), ArlowVideoProcessor(**common)


def _model_card(meta: dict, config: ArlowMAEConfig) -> str:
    vc = config.vision_config
    # Counted on the meta device: no memory, no initialisation, no draw from the global RNG (so exporting cannot
    # change the training run that calls it, whatever the model size).
    with torch.device("meta"):
        params = sum(p.numel() for p in ArlowVLVisionModel(vc).parameters())
    lines = [
        "---", "library_name: arlow", "tags: [vision, mae, arlow]", "---", "",
        "# Arlow vision encoder (MAE-pretrained)", "",
        "Exported by `arlow pretrain` / `arlow export`. Load it with:", "",
        "```python", "import arlow", "from transformers import AutoModel",
        "encoder = AutoModel.from_pretrained(\"vision_encoder\")  # ArlowVLVisionModel", "```", "",
        "| field | value |", "|---|---|",
        f"| depth / embed_dim / heads | {vc.depth} / {vc.embed_dim} / {vc.num_heads} |",
        f"| output width (hidden_size) | {vc.hidden_size} |",
        f"| patch / temporal patch / merge | {vc.patch_size} / {vc.temporal_patch_size} / {vc.spatial_merge_size} |",
        f"| locality bias / progressive patches | {vc.use_deformable_attention} / {vc.use_progressive_patches} |",
        f"| DeepStack blocks | {vc.deepstack_visual_indexes} |",
        f"| objective | MAE over merge windows, mask ratio {config.mask_ratio}, norm_pix_loss {config.norm_pix_loss} |",
        f"| decoder | width {config.decoder_hidden_size}, depth {config.decoder_num_layers}, "
        f"{config.decoder_num_heads} heads |",
    ]
    lines.append(f"| encoder parameters | {params:,} |")
    for key in ("step", "resolution", "video_prob", "clip_frames", "images", "videos"):
        if key in meta:
            lines.append(f"| {key} | {meta[key]} |")
    return "\n".join(lines) + "\n"


def export_checkpoint(model: ArlowMAEForPreTraining, checkpoint_dir: str | Path, meta: dict | None = None) -> Path:
    """Write the export folders next to (inside) ``checkpoint_dir``. Each part is written to a temporary
    directory and renamed into place, so an interrupted export never leaves a half-written folder."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    vc = model.config.vision_config
    image_processor, video_processor = _processors(vc)

    publish_folder(checkpoint_dir / "vision_encoder",
                   lambda d: model.encoder.save_pretrained(d, safe_serialization=True))
    publish_folder(checkpoint_dir / "image_processor", image_processor.save_pretrained)
    publish_folder(checkpoint_dir / "video_processor", video_processor.save_pretrained)

    def write_decoder(d: Path):
        model.config.save_pretrained(d)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
        save_file(state, str(d / "decoder.safetensors"), metadata={"format": "pt"})

    publish_folder(checkpoint_dir / "mae_decoder", write_decoder)
    processor_config = {"image_processor": image_processor.to_dict(), "video_processor": video_processor.to_dict()}
    (checkpoint_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2, default=str) + "\n")
    (checkpoint_dir / "pretrain_meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (checkpoint_dir / "README.md").write_text(_model_card(meta, model.config))
    return checkpoint_dir


def load_mae_checkpoint(path: str | Path) -> tuple[ArlowMAEForPreTraining, dict]:
    """Rebuild the full MAE model (encoder + decoder) from any of:

    * an exported checkpoint (``vision_encoder/`` + ``mae_decoder/``),
    * an engine checkpoint (the engine's ``config.json`` + ``model.safetensors`` of the whole model; earlier
      versions wrote ``mae_config.json``): the engine state alone, without the export,
    * a directory written by ``ArlowMAEForPreTraining.save_pretrained``.

    Returns the model (eval mode) and the pretraining metadata found (may be empty).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; give a checkpoint-N/ folder or an MAE model folder")
    meta = json.loads((path / "pretrain_meta.json").read_text()) if (path / "pretrain_meta.json").is_file() else {}
    if (path / "mae_decoder" / "decoder.safetensors").is_file() and (path / "vision_encoder").is_dir():
        config = ArlowMAEConfig.from_pretrained(path / "mae_decoder")
        model = ArlowMAEForPreTraining(config)
        model.encoder.load_state_dict(ArlowVLVisionModel.from_pretrained(path / "vision_encoder").state_dict())
        missing, unexpected = model.load_state_dict(load_file(str(path / "mae_decoder" / "decoder.safetensors")),
                                                    strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(f"{path}/mae_decoder does not match the MAE architecture: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    elif (path / MAE_CONFIG).is_file():
        config = ArlowMAEConfig.from_dict(json.loads((path / MAE_CONFIG).read_text()))
        weights = sorted(path.glob("model*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"{path} has {MAE_CONFIG} but no model.safetensors: not a complete checkpoint "
                                    "(DeepSpeed checkpoints are exported by the run itself; see docs/pretraining.md)")
        model = ArlowMAEForPreTraining(config)
        state = {}
        for w in weights:
            state.update(load_file(str(w)))
        model.load_state_dict(state, strict=True)
    elif (path / "config.json").is_file() and json.loads((path / "config.json").read_text()).get("model_type") == "arlow_mae":
        model = ArlowMAEForPreTraining.from_pretrained(path)
    else:
        raise ValueError(f"{path} holds no MAE checkpoint: expected vision_encoder/ + mae_decoder/, or "
                         f"{MAE_CONFIG} + model.safetensors, or an ArlowMAEForPreTraining directory")
    return model.eval(), meta


def run(args: argparse.Namespace) -> int:
    model, meta = load_mae_checkpoint(args.checkpoint)
    out = export_checkpoint(model, args.output or args.checkpoint, meta)
    print(f"exported vision_encoder/, image_processor/, video_processor/, mae_decoder/ to {out}")
    return 0
