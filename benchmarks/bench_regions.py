"""Many regions of one image: the batched engine against one region at a time.

One image, R boxes (R in ``--regions``, default 1 4 12 32 64). In the same run, for each R:

- one at a time (upstream's way): the ViT output is cached, then for each box one
  Q-Former pass and one ``generate``;
- batched (this project's engine, ``Captioner.describe_regions``): one ViT pass, the R
  boxes through the Q-Former as one batch, and the R prompts in one ``generate``.

It prints regions/s, ms/region, the speed-up, peak memory, and whether the greedy
captions are identical. Presets:

- ``shapes`` (default): the shipped shapes model on a shipped example scene (real
  captions, natural lengths), on the CPU;
- ``vicuna7b``: EVA-ViT-g + the BLIP-2 Q-Former + a Vicuna-7B-sized LLaMA (4096 x 32
  layers, 32001 tokens) with random weights in bf16, for a GPU; captions are forced to a
  fixed length (``--caption-tokens``, no stop). With CUDA it also prints decode tokens/s
  beside the memory-bandwidth bound (weight bytes / measured device copy bandwidth).

Examples::

    python benchmarks/bench_regions.py                                   # shapes model, CPU
    python benchmarks/bench_regions.py --preset vicuna7b --device cuda   # 7B sizes, random weights
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from click4caption.captioner import Captioner  # noqa: E402
from click4caption.generation import GenerationSettings  # noqa: E402
from click4caption.paths import EXAMPLES_DIR, default_config_path  # noqa: E402
from click4caption_apps.cli import setup_logging  # noqa: E402

logger = logging.getLogger("click4caption.bench")
NEVER = "\x00"  # a stop string no token produces: fixed-length captions


@dataclass
class Timing:
    seconds: float
    peak_bytes: int
    captions: list[str]


def peak_memory(device: torch.device) -> int:
    """Peak device memory (CUDA) or the process's peak resident memory (CPU), in bytes."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_at_a_time(captioner: Captioner, image: Image.Image, boxes: list[list[float]],
                  settings: GenerationSettings) -> list[str]:
    """Upstream's way: the ViT output cached, one Q-Former pass and one generate per box."""
    chat = captioner.chat
    captions = []
    for box in boxes:
        region = captioner.region(image, box)
        soft = captioner.encode_regions([region])[0]  # the cached ViT output, one Q-Former pass
        conv = chat.new_conversation()
        chat.ask("image[IMG] Tell me what it is and write a description for it.", conv)
        reply, _ = chat.answer(conv, [soft], settings)
        captions.append(reply)
    return captions


def batched(captioner: Captioner, image: Image.Image, boxes: list[list[float]],
            settings: GenerationSettings) -> list[str]:
    return captioner.describe(image, boxes, settings)


def measure(fn: Callable[[], list[str]], device: torch.device, repeats: int) -> Timing:
    times, captions = [], []
    reset_peak(device)
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        captions = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), peak_memory(device), captions)


def boxes_for(image: Image.Image, count: int, seed: int = 0) -> list[list[float]]:
    """``count`` boxes of different sizes all over the image (deterministic)."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    out = []
    for _ in range(count):
        x1, y1 = rng.uniform(0, 0.7 * w), rng.uniform(0, 0.7 * h)
        out.append([round(x1), round(y1), round(x1 + rng.uniform(0.15, 0.3) * w), round(y1 + rng.uniform(0.15, 0.3) * h)])
    return out


# ----------------------------------------------------------------------------- presets
def shapes_captioner(device: torch.device) -> tuple[Captioner, Image.Image]:
    from click4caption.config import load_config

    captioner = Captioner.from_config(load_config(default_config_path()), device=device)
    return captioner, Image.open(EXAMPLES_DIR / "scene_3.png").convert("RGB")


def vicuna7b_captioner(device: torch.device, dtype: torch.dtype) -> tuple[Captioner, Image.Image]:
    """EVA-ViT-g + Q-Former + a 7B LLaMA, random weights, built directly (no files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from click4caption.config import ModelConfig
    from click4caption.models.builder import compose
    from click4caption.shapes.tokenizer import build_shapes_tokenizer
    from click4caption.tokenizer import HFTokenizer

    llm_config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32001, max_position_embeddings=2048)
    with torch.device(device):
        llm = LlamaForCausalLM(llm_config).to(dtype)
    model = compose(ModelConfig(), llm, HFTokenizer(build_shapes_tokenizer()), meta_parts=frozenset())
    model.place(device, vit_dtype=dtype, llm_dtype=dtype).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    return Captioner(model, device=device), image


def copy_bandwidth(device: torch.device, gigabytes: float = 2.0) -> float:
    """Measured device memory bandwidth of a copy (bytes read + written per second)."""
    x = torch.empty(int(gigabytes * 2**30) // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * x.element_size() * 5 / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["shapes", "vicuna7b"], default="shapes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--regions", type=int, nargs="+", default=[1, 4, 12, 32, 64])
    p.add_argument("--caption-tokens", type=int, default=None,
                   help="force captions to this many tokens (default: natural length for shapes, 32 for vicuna7b)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    setup_logging()
    logging.getLogger("click4caption").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    if args.preset == "shapes":
        captioner, image = shapes_captioner(device)
        tokens = args.caption_tokens
    else:
        captioner, image = vicuna7b_captioner(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokens = args.caption_tokens or 32
    if tokens:  # fixed length: no stop string, no EOS before `tokens`
        captioner.model.end_sym = NEVER
        settings = GenerationSettings(max_new_tokens=tokens, min_length=tokens, batch_size=max(args.regions))
    else:
        settings = GenerationSettings(max_new_tokens=60, batch_size=max(args.regions))
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads")
    print(f"# {args.preset} on {device} ({machine}); torch {torch.__version__}; "
          f"captions {'of ' + str(tokens) + ' tokens' if tokens else 'of natural length (greedy, stop at ###)'}")
    bw = copy_bandwidth(device) if device.type == "cuda" else None
    llm_bytes = sum(t.numel() * t.element_size() for t in captioner.model.llama_model.parameters())
    print("| R | one at a time: regions/s | ms/region | batched: regions/s | ms/region | speed-up | "
          "peak memory (MB) one / batched | identical captions |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows: list[dict[str, Any]] = []
    batched(captioner, image, boxes_for(image, 2), settings)  # warm-up (and the ViT cache)
    for r in args.regions:
        boxes = boxes_for(image, r)
        single = measure(lambda: one_at_a_time(captioner, image, boxes, settings), device, args.repeats)
        many = measure(lambda: batched(captioner, image, boxes, settings), device, args.repeats)
        row = {"R": r, "single_s": single.seconds, "batched_s": many.seconds,
               "single_regions_per_s": r / single.seconds, "batched_regions_per_s": r / many.seconds,
               "speedup": single.seconds / many.seconds, "single_peak_mb": single.peak_bytes / 2**20,
               "batched_peak_mb": many.peak_bytes / 2**20, "identical": single.captions == many.captions}
        if tokens:
            row["batched_decode_tokens_per_s"] = r * tokens / many.seconds
        rows.append(row)
        print(f"| {r} | {row['single_regions_per_s']:.2f} | {1000 / row['single_regions_per_s']:.0f} | "
              f"{row['batched_regions_per_s']:.2f} | {1000 / row['batched_regions_per_s']:.0f} | "
              f"{row['speedup']:.1f}x | {row['single_peak_mb']:.0f} / {row['batched_peak_mb']:.0f} | "
              f"{'yes' if row['identical'] else 'NO'} |", flush=True)
    if bw is not None:
        print(f"\nLLM weights {llm_bytes / 2**30:.1f} GiB; measured copy bandwidth {bw / 1e9:.0f} GB/s; "
              f"one decode step reads every weight once, so the bound is {bw / llm_bytes:.1f} steps/s "
              f"= R x {bw / llm_bytes:.1f} tokens/s")
        for row in rows:
            if "batched_decode_tokens_per_s" in row:
                print(f"R={row['R']}: decode {row['batched_decode_tokens_per_s']:.0f} tokens/s (whole call, "
                      f"prefill included) vs bound {row['R'] * bw / llm_bytes:.0f} tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "device": str(device), "machine": machine,
                                               "caption_tokens": tokens, "rows": rows}, indent=2))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
