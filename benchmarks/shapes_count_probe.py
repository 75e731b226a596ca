"""Is the object count in what the LLM receives for a whole-image box?

``python benchmarks/shapes_count_probe.py CHECKPOINT [--laion data/shapes/LAION]`` reads a
training checkpoint of the shapes recipe and the recipe's LAION shards (their json lists
every object's box), encodes each image with a whole-image box and reports:

- where the learned queries look: the attention mass that a query owning an object (its
  cell of the 4 x 4 grid holds the object's centre) puts on that object's patches, and
  that the other queries put on their cell's background (the ``objects`` targets of
  ``box_attention_whole_image``), per cross-attention layer;
- what comes out: a small MLP fit on three quarters of the images reads one soft token
  (plus the query's index) and says whether its query owns an object; its accuracy on the
  other quarter, the accuracy of always answering "no", and how often the number of tokens
  it calls owners is the image's count;
- an MLP reading all soft tokens of an image and predicting the count (2-5);
- the queries' own answer where the model was trained with the owner loss
  (``box_attention_owner_weight``): the first channel of each query's Q-Former output read
  as the "owns an object" logit, and how often the number of queries saying yes is the count.

The scene layout is read from the shards, so the probe works on checkpoints of any
whole-image target; the model sizes come from ``--config`` (default: the recipe's).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_laion(folder: Path) -> list[tuple[bytes, dict]]:
    """``(jpeg bytes, json)`` of every sample of the shards in ``folder`` holding ``objects``."""
    samples = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                meta = json.loads(tar.extractfile(members[name]).read())
                jpg = members.get(name[: -len(".json")] + ".jpg")
                if jpg is not None and meta.get("objects"):
                    samples.append((tar.extractfile(jpg).read(), meta))
    return samples


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, hidden: int, steps: int, seed: int = 0) -> nn.Module:
    """A one-hidden-layer MLP fit by full-batch AdamW (``classes`` 1: a binary logit)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, classes))
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=0.05)
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        loss = (nn.functional.binary_cross_entropy_with_logits(out[:, 0], y.float()) if classes == 1
                else nn.functional.cross_entropy(out, y))
        loss.backward()
        opt.step()
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a training checkpoint of the shapes recipe (runs/shapes/checkpoint_*.pth)")
    p.add_argument("--laion", default="data/shapes/LAION", help="the recipe's LAION shards (json with objects)")
    p.add_argument("--config", default="train_configs/shapes_train.yaml")
    p.add_argument("--llm-dir", default="models/shapes/llm", help="the LLM folder (config.json)")
    p.add_argument("--batch", type=int, default=50)
    args = p.parse_args(argv)

    from PIL import Image

    from click4caption.config import load_config
    from click4caption.models.builder import build_model
    from click4caption.processors import build_processor
    from click4caption.training.checkpointing import load_checkpoint, load_trainable_state_dict
    from click4caption.training.freezing import frozen_parts

    cfg = load_config(args.config, [f"model.llama_model={args.llm_dir}", "model.box_attention_loss_weight=1.0",
                                    "model.box_attention_whole_image=objects"])
    model = build_model(cfg.model, device="cpu", for_training=True)
    model.freeze(frozen_parts(cfg.model))
    load_trainable_state_dict(model, load_checkpoint(args.checkpoint)["model"], args.checkpoint)
    model.eval()
    aid, q, size = model.box_attention, cfg.model.num_query_token, model.img_size
    processor = build_processor(cfg.datasets["laion"].vis_processor.train)
    samples = read_laion(Path(args.laion))
    if len(samples) < 40:
        raise SystemExit(f"error: {args.laion}: {len(samples)} samples with objects; the probe needs at least 40")

    maps: list[torch.Tensor] = []
    hooks = [layer.crossattention.attention.register_forward_hook(lambda m, a, out: maps.append(out[1]))
             for layer in model.qformer.encoder.layer if layer.has_cross_attention]
    outputs: list[torch.Tensor] = []
    hooks.append(model.qformer.register_forward_hook(lambda m, a, out: outputs.append(out.last_hidden_state[:, :q])))
    tokens, counts, own, mass = [], [], [], []
    for first in range(0, len(samples), args.batch):
        chunk = samples[first:first + args.batch]
        images = [Image.open(io.BytesIO(jpg)).convert("RGB") for jpg, _ in chunk]
        objects = [torch.tensor(meta["objects"], dtype=torch.float32).reshape(-1, 2, 2)
                   * torch.tensor([size / im.width, size / im.height]) for im, (_, meta) in zip(images, chunk)]
        m = max(len(o) for o in objects)
        padded = torch.stack([torch.cat([o, o.new_zeros(m - len(o), 2, 2)]) for o in objects])
        n_obj = torch.tensor([len(o) for o in objects])
        boxes = torch.tensor([[[0.0, 0.0], [float(size)] * 2]]).repeat(len(chunk), 1, 1)
        maps.clear()
        with torch.no_grad():
            soft = model.encode_regions(model.encode_image(torch.stack([processor(im) for im in images])), boxes)
        target = aid.object_targets(padded, n_obj, maps[0].shape[-1])  # NxQxT
        own.append(aid.object_owners(padded, n_obj).amax(-1) > 0)  # NxQ
        mass.append(torch.stack([(mp[:, :, :q].mean(1) * target).sum(-1) for mp in maps], dim=-1))  # NxQxL
        tokens.append(soft)
        counts += [len(o) for o in objects]
    for h in hooks:
        h.remove()
    tokens, mass, own, channel = torch.cat(tokens), torch.cat(mass), torch.cat(own), torch.cat(outputs)[..., 0]
    y = torch.tensor(counts) - 2
    n = len(y)
    train, test = slice(0, 3 * n // 4), slice(3 * n // 4, n)
    print(f"{args.checkpoint}: {n} whole images of {args.laion}")
    for layer in range(mass.shape[-1]):
        print(f"  cross-attention layer {layer}: owners' mass on their object {mass[..., layer][own].mean():.3f}, "
              f"other queries' on their cell's background {mass[..., layer][~own].mean():.3f}")

    flat = tokens[train].reshape(-1, tokens.shape[-1])
    feats = (tokens - flat.mean(0)) / flat.std(0).clamp_min(1e-5)
    per_query = torch.cat([feats, torch.eye(q).expand(n, -1, -1)], dim=-1)
    net = fit(per_query[train].reshape(-1, per_query.shape[-1]), own[train].reshape(-1), 1, 64, 1500)
    with torch.no_grad():
        said = net(per_query.reshape(-1, per_query.shape[-1]))[:, 0].reshape(n, q) > 0
    acc = lambda a, b: (a == b).float().mean().item() * 100  # noqa: E731
    print(f"  owner from one soft token: {acc(said[test], own[test]):.1f} % held-back images "
          f"({acc(said[train], own[train]):.1f} % fitted ones; always 'no': {acc(own[test], False):.1f} %); "
          f"images whose owner tokens it counts right: {acc(said[test].sum(1), own[test].sum(1)):.1f} %")
    whole = feats.reshape(n, -1)
    net = fit(whole[train], y[train], 4, 256, 300)
    with torch.no_grad():
        guess = net(whole).argmax(1)
    print(f"  count from all soft tokens: {acc(guess[test], y[test]):.1f} % held-back images "
          f"({acc(guess[train], y[train]):.1f} % fitted ones; most common count: "
          f"{acc(y[test], y[train].mode().values):.1f} %)")
    says = channel > 0
    print(f"  the queries' owner channel (first output channel > 0): right for {acc(says, own):.1f} % of the "
          f"queries; images whose count it gives: {acc(says.sum(1), own.sum(1)):.1f} % "
          f"(meaningful for models trained with box_attention_owner_weight > 0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
