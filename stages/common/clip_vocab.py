"""The real 49,408-token CLIP vocabulary, built offline from the BPE table shipped with tiflow.

Hugging Face's `vocab.json`/`merges.txt` for every Stable Diffusion text encoder are derived
from OpenAI's `bpe_simple_vocab_16e6.txt.gz` in exactly this order: 256 byte symbols, the same
256 with the end-of-word marker, 48,894 merges, then the two special tokens.
"""
from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from pathlib import Path

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_MERGE_COUNT = 49152 - 256 - 2  # as in OpenAI's SimpleTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map, which CLIP's BPE is written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.cache
def load_merges() -> tuple[str, ...]:
    """The 48,894 BPE merges, each as 'left right'."""
    table = resources.files("stages.common.data.clip_tokenizer").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(table.read_bytes()).decode("utf-8").split("\n")
    return tuple(lines[1 : _MERGE_COUNT + 1])  # line 0 is a version header


@functools.cache
def load_vocab() -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols]
    symbols += ["".join(merge.split()) for merge in load_merges()]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    return {symbol: index for index, symbol in enumerate(symbols)}


def write_tokenizer_files(folder: Path, model_max_length: int = 77, pad_token: str = EOS_TOKEN) -> Path:
    """Write a Hugging Face CLIP tokenizer folder (vocab.json, merges.txt, configs) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(load_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(load_merges()) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}),
        encoding="utf-8",
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": BOS_TOKEN,
                "eos_token": EOS_TOKEN,
                "unk_token": EOS_TOKEN,
                "pad_token": pad_token,
                "do_lower_case": True,
            }
        ),
        encoding="utf-8",
    )
    return folder


def build_clip_tokenizer(model_max_length: int = 77, pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
    """A CLIPTokenizer with the full vocabulary, made without any download.

    Built from the vocab/merges objects: in transformers 5 the file-path form
    `CLIPTokenizer(vocab_file=..., merges_file=...)` silently yields a 3-token vocabulary.
    """
    from transformers import CLIPTokenizer  # here, not at the top: the vocabulary tables alone import fast

    return CLIPTokenizer(
        vocab=dict(load_vocab()),
        merges=[tuple(merge.split()) for merge in load_merges()],
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
