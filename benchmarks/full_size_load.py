"""Full-size loading, with random weights in the upstream file formats.

Writes, under ``--out``: ``eva_vit_g.pth`` (EVA-ViT-g, 39 blocks, fp16, as BLIP-2 ships
it), ``click4caption_7b.pth`` (``{'model': ...}`` in upstream names, with the buffers
upstream saves), a LLaMA folder 4096 wide (``--llm-layers`` layers, 32001 tokens,
safetensors, a SentencePiece ``tokenizer.model`` with ``[PAD]`` added) and an eval YAML
in the upstream layout. Then runs the README's command (``inference.py --cfg-path ...``)
on it and times it, and times three broken variants, each of which must end in one
``error:`` line naming the tensor as the file spells it:

- a tensor removed from the LLM folder's safetensors file;
- a Q-Former key removed from the Click4Caption checkpoint;
- a Q-Former tensor of the wrong shape.

Example::

    python benchmarks/full_size_load.py --out /tmp/fullsize     # ~6 GB of files
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QFORMER_KEY = "Qformer.bert.encoder.layer.4.crossattention.self.key.weight"
LLM_KEY = "model.layers.1.mlp.up_proj.weight"


def write_files(out: Path, llm_layers: int) -> Path:
    """The random full-size files and the eval YAML; returns the YAML's path."""
    import torch
    import yaml
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_parity import upstream_ckpt_shapes, upstream_vit_shapes
    from tests.tiny import write_sentencepiece_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def fill(name: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        if name.endswith("position_ids"):
            return torch.arange(shape[-1]).reshape(shape)
        if name.endswith("inv_freq"):
            return 1.0 / (10000 ** (torch.arange(0, 2 * shape[0], 2).float() / (2 * shape[0])))
        return (0.02 * torch.randn(shape, generator=gen)).to(dtype)

    if not (out / "eva_vit_g.pth").exists():
        vit = {k: fill(k, s, torch.float16) for k, s in upstream_vit_shapes(1408, 39, 6144, 14, 224).items()}
        torch.save(vit, out / "eva_vit_g.pth")
        del vit
    ckpt = {k: fill(k, s, torch.float32) for k, s in
            upstream_ckpt_shapes(1408, 768, 12, 3072, 2, 32, 4096, llm_layers, 128).items()}
    torch.save({"model": ckpt, "optimizer": None, "epoch": 29}, out / "click4caption_7b.pth")
    llm_dir = out / "vicuna-7b-shaped"
    if not (llm_dir / "model.safetensors").exists():
        tok_dir = write_sentencepiece_tokenizer(llm_dir)
        (tok_dir / "added_tokens.json").write_text(json.dumps({"[PAD]": 32000}))
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32001, bos_token_id=1,
                             eos_token_id=2, pad_token_id=32000, max_position_embeddings=2048)
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(config)
        state = {k: fill(k, list(v.shape), torch.float16) for k, v in skeleton.state_dict().items()}
        config.save_pretrained(llm_dir)
        save_file(state, str(llm_dir / "model.safetensors"), metadata={"format": "pt"})
    doc = yaml.safe_load((REPO / "eval_configs" / "click4caption_eval.yaml").read_text())
    doc["model"].update(vit_ckpt=str(out / "eva_vit_g.pth"), ckpt=str(out / "click4caption_7b.pth"),
                        llama_model=str(llm_dir), llm_dtype="fp32")
    path = out / "eval_fullsize.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def broken_variants(out: Path, yaml_path: Path) -> dict[str, list[str]]:
    """Three broken copies; returns ``{name: --options overrides}``."""
    import torch
    from safetensors.torch import load_file, save_file

    variants: dict[str, list[str]] = {}
    llm = out / "vicuna-7b-shaped"
    broken_llm = out / "llm-missing-tensor"
    if not broken_llm.exists():
        shutil.copytree(llm, broken_llm, ignore=shutil.ignore_patterns("model.safetensors"))
        state = load_file(str(llm / "model.safetensors"))
        state.pop(LLM_KEY)
        save_file(state, str(broken_llm / "model.safetensors"), metadata={"format": "pt"})
    variants["llm_tensor_missing"] = [f"model.llama_model={broken_llm}"]
    ckpt = torch.load(out / "click4caption_7b.pth", weights_only=True)
    missing = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if k != QFORMER_KEY})
    torch.save(missing, out / "ckpt-missing-key.pth")
    variants["qformer_key_missing"] = [f"model.ckpt={out / 'ckpt-missing-key.pth'}"]
    wrong = dict(ckpt, model={**ckpt["model"], QFORMER_KEY: torch.zeros(768, 1024)})
    torch.save(wrong, out / "ckpt-wrong-shape.pth")
    variants["qformer_wrong_shape"] = [f"model.ckpt={out / 'ckpt-wrong-shape.pth'}"]
    return variants


def run(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "inference.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    return time.perf_counter() - start, proc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--llm-layers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    t = time.perf_counter()
    yaml_path = write_files(args.out, args.llm_layers)
    variants = broken_variants(args.out, yaml_path)
    print(f"# files written in {time.perf_counter() - t:.0f} s; machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
    image = args.out / "image.png"
    from PIL import Image

    Image.new("RGB", (640, 480), (120, 90, 60)).save(image)
    base = ["--cfg-path", str(yaml_path), "--device", args.device, "--image_path", str(image),
            "--tl_x", "10", "--tl_y", "20", "--br_x", "300", "--br_y", "200", "--max_new_tokens", "3"]
    seconds, proc = run(base + ["--verbose"], args.out)
    built = [line for line in proc.stderr.splitlines() if "model built in" in line]
    print(f"| the README command | exit {proc.returncode} | {seconds:.1f} s | {built[-1].split(': ', 1)[-1] if built else ''} |")
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
    for name, options in variants.items():
        seconds, proc = run(base + ["--options", *options], args.out)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("INFO")]
        print(f"| {name} | exit {proc.returncode} | {seconds:.1f} s | {' / '.join(lines)[:400]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
