"""A tiny random-weight BLIP captioning model in transformers' folder layout, as the blip caption method reads it.

Nothing is downloaded: the BERT tokenizer is built from a vocab.txt written here, and the
image processor's preprocessor_config.json is written as Salesforce's BLIP folders have it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SIZE = 32
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-4, as BertTokenizer numbers them by default
WORDS = ("a photo of red toy cat dog on the green blue table with two small big sitting next to under floor grass tree "
         "man woman in front near white black box").split()


def write_tiny_blip(folder: Path, seed: int = 0, **config) -> Path:
    """BlipForConditionalGeneration.save_pretrained + tokenizer + preprocessor_config.json; returns the folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + WORDS + ["[DEC]"]  # BLIP's decoder starts from [DEC], the last id as in Salesforce's tokenizer
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(folder, bos_token="[DEC]", local_files_only=True)
    tokenizer.save_pretrained(folder)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(small, vocab_size=len(vocab), max_position_embeddings=128, bos_token_id=vocab.index("[DEC]"),
                sep_token_id=vocab.index("[SEP]"), pad_token_id=0, eos_token_id=vocab.index("[SEP]"))
    blip_config = BlipConfig(text_config=text, vision_config=dict(small, image_size=IMAGE_SIZE, patch_size=8), projection_dim=32,
                             image_text_hidden_size=32, **config)
    torch.manual_seed(seed)
    BlipForConditionalGeneration(blip_config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor", "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}), encoding="utf-8")
    return folder
