"""Benchmark: images per second of the caption stage's model methods on CPU threads (default 2): tagger, deepbooru, blip.

python bench/bench_caption.py [--images 8] [--threads 2] [--methods tagger,deepbooru,blip]

Every model is built here with random weights at its real size; nothing is downloaded. The
images are 512x512 PNGs through the real preprocess stage, so every stage figure includes
reading, resizing and the caches.

tagger: a ConvNeXt-B-shaped network (depths 3-3-27-3, widths 128-256-512-1024, 7x7 depthwise
+ 4x pointwise blocks, GELU; no layer norms) taking a [batch, 448, 448, 3] NHWC float image and
giving 10,861 sigmoid scores like SmilingWolf's wd-v1-4-convnext-tagger-v2, whose backbone it
copies (~60 GMACs and ~88M parameters per image; the figures are printed).

deepbooru: AUTOMATIC1111's DeepDanbooruModel at full size (n_Conv_0 ... n_Conv_178, 9,176 tags),
saved as model-resnet_custom_v3.pt is, on 512x512 resize-and-fill inputs.

blip: BlipForConditionalGeneration with BlipConfig's defaults (the shape of
Salesforce/blip-image-captioning-base: ViT-B/16 at 384 px and a 12-layer BERT-base decoder),
with a 30,524-token BERT vocabulary written here. Random weights never end a sentence early, so
each caption runs to its length limit: the stage figure uses the default limit (75 tokens), and
the model figures force 20 and 75 tokens (a real caption is about 10 to 20).

Printed figures, per method:
  stage, cold         write_captions with nothing cached: hashing, model load, preprocessing, inference, outputs
  model, ...          steady-state inference alone, on images already read
  stage, cached       a changed setting: captions rebuilt from cached scores or sentences, model not loaded
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from stages.caption.captions import write_captions
from stages.caption.settings import CaptionSettings
from stages.caption.tagger_model import load_tagger_input, open_tagger, run_tagger
from stages.common.files import hash_file
from stages.preprocess.prepare import PreprocessSettings, preprocess_folder

SIDE, TAG_COUNT = 448, 10861  # WD14 v2 taggers: 448x448 input, 10,861 tags in selected_tags.csv
DEPTHS, WIDTHS = (3, 3, 27, 3), (128, 256, 512, 1024)  # ConvNeXt-B


class GraphBuilder:
    """Adds ONNX nodes with random weights and counts their multiply-accumulates."""

    def __init__(self, seed: int = 0):
        self.nodes, self.weights, self.macs, self.params = [], [], 0, 0
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def _weight(self, shape: tuple[int, ...], fan_in: int) -> str:
        name = self._name("w")
        values = (self.rng.standard_normal(shape, dtype=np.float32) * np.float32(1 / np.sqrt(fan_in)))
        self.weights.append(numpy_helper.from_array(values, name))
        self.params += values.size
        return name

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, stride: int, side: int, groups: int = 1) -> tuple[str, int]:
        out_side = side // stride
        w = self._weight((c_out, c_in // groups, kernel, kernel), c_in // groups * kernel * kernel)
        b = self._weight((c_out,), 1)
        y = self._name("conv")
        pad = (kernel - 1) // 2 if stride == 1 else 0
        self.nodes.append(helper.make_node("Conv", [x, w, b], [y], kernel_shape=[kernel, kernel], strides=[stride, stride],
                                           pads=[pad, pad, kernel - 1 - pad, kernel - 1 - pad] if stride == 1 else [0, 0, 0, 0], group=groups))
        self.macs += out_side * out_side * c_out * (c_in // groups) * kernel * kernel
        return y, out_side

    def op(self, kind: str, *inputs: str, **attributes) -> str:
        y = self._name(kind.lower())
        self.nodes.append(helper.make_node(kind, list(inputs), [y], **attributes))
        return y


def build_convnext_tagger(path: Path) -> tuple[int, int]:
    """Write the benchmark model; return (MACs per image, parameters)."""
    g = GraphBuilder()
    x = g.op("Transpose", "input_1", perm=[0, 3, 1, 2])  # NHWC in, as WD14 models take it
    x, side = g.conv(x, 3, WIDTHS[0], 4, 4, SIDE)
    for stage, (depth, width) in enumerate(zip(DEPTHS, WIDTHS)):
        if stage:
            x, side = g.conv(x, WIDTHS[stage - 1], width, 2, 2, side)
        for _ in range(depth):
            h, _ = g.conv(x, width, width, 7, 1, side, groups=width)
            h, _ = g.conv(h, width, 4 * width, 1, 1, side)
            h = g.op("Gelu", h)
            h, _ = g.conv(h, 4 * width, width, 1, 1, side)
            x = g.op("Add", x, h)
    pooled = g.op("Flatten", g.op("GlobalAveragePool", x))
    head_w, head_b = g._weight((WIDTHS[-1], TAG_COUNT), WIDTHS[-1]), g._weight((TAG_COUNT,), 1)
    logits = g.op("Gemm", pooled, head_w, head_b)
    g.macs += WIDTHS[-1] * TAG_COUNT
    g.nodes.append(helper.make_node("Sigmoid", [logits], ["predictions_sigmoid"]))
    graph = helper.make_graph(g.nodes, "convnext_b_tagger",
                              [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", SIDE, SIDE, 3])],
                              [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", TAG_COUNT])], g.weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.save(model, path)
    return g.macs, g.params


def write_tags(path: Path) -> None:
    rows = ["tag_id,name,category,count"]
    rows += [f"{i},rating_{i},9,0" for i in range(4)]
    rows += [f"{i},tag_{i},{4 if i >= TAG_COUNT - 2000 else 0},0" for i in range(4, TAG_COUNT)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def make_images(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(1)
    source = folder / "source"
    source.mkdir(parents=True)
    for i in range(count):  # smooth random pictures, so PNG decoding costs what a photo's does
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((512, 512), Image.BICUBIC).save(source / f"img_{i:03d}.png")
    preprocess_folder(source, folder / "preprocess", PreprocessSettings.from_schema(size=(512, 512)))
    return folder / "preprocess"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def bench_tagger(root: Path, preprocess: Path, args: argparse.Namespace) -> None:
    model_path = root / "model.onnx"
    macs, params = build_convnext_tagger(model_path)
    write_tags(root / "selected_tags.csv")
    print(f"tagger model: ConvNeXt-B-shaped tagger, {SIDE}x{SIDE} NHWC -> {TAG_COUNT} scores, {macs / 1e9:.1f} GMACs/image, "
          f"{params / 1e6:.1f}M parameters ({model_path.stat().st_size / 2**20:.0f} MiB); onnxruntime {ort.__version__} CPU")

    def settings(threshold: float, batch: int = 4) -> CaptionSettings:
        return CaptionSettings.from_section({"method": "tagger", "tagger": {"model": str(model_path), "general_threshold": threshold,
                                                                             "threads": args.threads, "batch_size": batch}})

    out, store = root / "out" / "caption", root / "out" / "cache" / "tagger"
    cold, seconds = timed(lambda: write_captions(preprocess, out, settings(0.35), store))
    assert cold.tagged == args.images
    print(f"tagger stage, cold (batch 4):   {args.images / seconds:6.2f} images/s  ({seconds:.1f} s for {args.images}, model load included)")

    model = open_tagger(model_path, args.threads)
    images = sorted(preprocess.glob("*.png"))
    prepared, prep_seconds = timed(lambda: np.stack([load_tagger_input(p, model.side) for p in images]))
    for batch in (1, 4):
        run_tagger(model, prepared[:batch])  # warm-up: first-run allocations
        _, seconds = timed(lambda: [run_tagger(model, prepared[i : i + batch]) for i in range(0, len(prepared), batch)])
        print(f"tagger model, batch {batch}:          {len(prepared) / seconds:6.2f} images/s  ({seconds / len(prepared) * 1000:.0f} ms/image)")
    print(f"tagger image preparation:       {len(images) / prep_seconds:6.1f} images/s  ({prep_seconds / len(images) * 1000:.1f} ms/image)")

    cached, seconds = timed(lambda: write_captions(preprocess, out, settings(0.5), store))
    assert cached.tagged == 0 and cached.tags_reused == args.images
    print(f"tagger stage, cached (threshold changed): {args.images / seconds:6.1f} images/s  ({seconds:.2f} s, model not run)")
    _, hash_seconds = timed(lambda: hash_file(model_path))
    print(f"  of which fixed: model file hash {hash_seconds:.2f} s (once per stage run, keys the score cache)")


def bench_deepbooru(root: Path, preprocess: Path, args: argparse.Namespace) -> None:
    import torch

    from stages.caption.deepbooru_model import DeepDanbooruModel, load_deepbooru, load_deepbooru_input, run_deepbooru

    torch.manual_seed(0)
    path = root / "model-resnet_custom_v3.pt"
    state = DeepDanbooruModel().state_dict()
    state["tags"] = [f"tag_{i}" for i in range(9172)] + ["rating:safe", "rating:questionable", "rating:explicit", "rating:general"]
    torch.save(state, path)
    params = sum(t.numel() for name, t in state.items() if name != "tags")
    del state
    print(f"deepbooru model: DeepDanbooruModel, 512x512 NHWC -> 9176 scores, {params / 1e6:.1f}M parameters "
          f"({path.stat().st_size / 2**20:.0f} MiB); torch {torch.__version__}, {torch.get_num_threads()} threads")

    def settings(threshold: float) -> CaptionSettings:
        return CaptionSettings.from_section({"method": "deepbooru", "deepbooru": {"model": str(path), "threshold": threshold}})

    out, store = root / "out" / "caption", root / "out" / "cache" / "tagger"
    cold, seconds = timed(lambda: write_captions(preprocess, out, settings(0.5), store, args.threads))
    assert cold.runs["deepbooru"].computed == args.images
    print(f"deepbooru stage, cold (batch 1):  {args.images / seconds:6.2f} images/s  ({seconds:.1f} s for {args.images}, "
          f"model load included; {cold.runs['deepbooru'].images_per_second:.2f} images/s as the stage reports it)")
    model = load_deepbooru(path, torch.device("cpu"))
    images = sorted(preprocess.glob("*.png"))
    prepared, prep_seconds = timed(lambda: np.stack([load_deepbooru_input(p) for p in images]))
    for batch in (1, 2):
        run_deepbooru(model, prepared[:batch])  # warm-up
        _, seconds = timed(lambda: [run_deepbooru(model, prepared[i : i + batch]) for i in range(0, len(prepared), batch)])
        print(f"deepbooru model, batch {batch}:        {len(prepared) / seconds:6.2f} images/s  ({seconds / len(prepared) * 1000:.0f} ms/image)")
    print(f"deepbooru image preparation:     {len(images) / prep_seconds:6.1f} images/s  ({prep_seconds / len(images) * 1000:.1f} ms/image)")
    model = None  # frees its memory before the cached run
    cached, seconds = timed(lambda: write_captions(preprocess, out, settings(0.75), store, args.threads))
    assert cached.runs["deepbooru"].computed == 0
    print(f"deepbooru stage, cached (threshold changed): {args.images / seconds:6.1f} images/s  ({seconds:.2f} s, model not loaded)")


def write_blip_base(folder: Path) -> int:
    """A random-weight BLIP with BlipConfig's defaults (blip-image-captioning-base's shape) and a 30,524-token vocabulary."""
    import json

    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    folder.mkdir(parents=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(30522 - len(vocab))] + ["[DEC]", "[ENC]"]  # BERT's ids, then BLIP's two added tokens
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizer.from_pretrained(folder, bos_token="[DEC]", local_files_only=True).save_pretrained(folder)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig())
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "processor_class": "BlipProcessor", "do_resize": True,
        "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return sum(t.numel() for t in model.parameters())


def bench_blip(root: Path, preprocess: Path, args: argparse.Namespace) -> None:
    import torch

    from stages.caption.blip import BlipCaptioner
    from stages.caption.settings import BlipSettings

    folder = root / "blip-base"
    params = write_blip_base(folder)
    print(f"blip model: BlipForConditionalGeneration, BlipConfig() defaults (384 px, ViT-B/16 + BERT-base decoder), {params / 1e6:.1f}M "
          f"parameters; torch {torch.__version__}, {torch.get_num_threads()} threads")

    def settings(**blip) -> CaptionSettings:
        return CaptionSettings.from_section({"method": "blip", "blip": {"model": str(folder), **blip}})

    out, store = root / "out" / "caption", root / "out" / "cache" / "tagger"
    cold, seconds = timed(lambda: write_captions(preprocess, out, settings(), store, args.threads))
    assert cold.runs["blip"].computed == args.images
    print(f"blip stage, cold (defaults: greedy, 5-75 tokens, batch 1): {args.images / seconds:6.2f} images/s  ({seconds:.1f} s for "
          f"{args.images}, model load included; random weights run every caption to 75 tokens)")
    images = sorted(preprocess.glob("*.png"))
    for tokens, beams, batch in ((20, 1, 1), (20, 1, 4), (20, 3, 1), (75, 1, 1)):
        captioner = BlipCaptioner(folder, BlipSettings(folder, beams, tokens, tokens, batch, "cpu"), torch.device("cpu"))
        captioner.caption(images[:1])  # warm-up
        _, seconds = timed(lambda: [captioner.caption(images[i : i + batch]) for i in range(0, len(images), batch)])
        print(f"blip model, {tokens} tokens, {beams} beam(s), batch {batch}: {len(images) / seconds:6.2f} images/s  "
              f"({seconds / len(images) * 1000:.0f} ms/image, reading and resizing included)")
    cached, seconds = timed(lambda: write_captions(preprocess, out, settings(), store, args.threads))
    assert cached.runs["blip"].computed == 0
    print(f"blip stage, cached (rerun after another edit): {args.images / seconds:6.1f} images/s  ({seconds:.2f} s, model not loaded)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="tagger,deepbooru,blip", help="comma-separated: tagger, deepbooru, blip")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        preprocess = make_images(root / "data", args.images)
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores visible, {args.threads} threads, {args.images} images")
        for method in methods:
            if method in ("deepbooru", "blip"):
                import torch

                torch.set_num_threads(args.threads)
            (root / method).mkdir()
            {"tagger": bench_tagger, "deepbooru": bench_deepbooru, "blip": bench_blip}[method](root / method, preprocess, args)


if __name__ == "__main__":
    main()
