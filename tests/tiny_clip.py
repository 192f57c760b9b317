"""A tiny random-weight CLIP model in transformers' folder layout, as evaluate.clip_model reads it (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 32
PROJECTION = 16


def write_tiny_clip(folder: Path) -> Path:
    """What CLIPModel/CLIPTokenizer save_pretrained write, plus a preprocessor_config.json as in openai's folders (32 px)."""
    from transformers import CLIPConfig, CLIPModel

    from stages.common.clip_vocab import build_clip_tokenizer

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(small, image_size=IMAGE_SIZE, patch_size=8), projection_dim=PROJECTION)
    CLIPModel(config).save_pretrained(folder)
    build_clip_tokenizer().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder
