"""Click4Caption demo: click two corners of a region to caption it, or ask about regions.

Without arguments it serves the shipped shapes model at http://127.0.0.1:7860 (local
only)::

    python demo.py
    python demo.py --cfg-path eval_configs/click4caption_eval.yaml --gpu-id 0   # the real model
    python demo.py --server_port 8080 --server_name 0.0.0.0                    # reachable from the network
    python demo.py --share                                                     # a public gradio.live link

Describe mode: pick an image, click two opposite corners of a region (any order); the
description streams into the chat. QA mode: select boxes, press "Add region" for each,
then ask (``[IMG]`` placeholders are inserted when left out). Scripts call the
``/describe`` and ``/ask`` endpoints with ``gradio_client`` (see the README).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from click4caption.paths import default_config_path
from click4caption_apps.cli import pick_device, run_main, seed_everything, setup_logging
from click4caption.config import load_config
from click4caption.errors import ConfigError

logger = logging.getLogger("click4caption.demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Click4Caption demo (Gradio): Describe and QA modes.")
    p.add_argument("--cfg-path", default=None,
                   help=f"eval config (default: the shipped shapes model, {default_config_path()})")
    p.add_argument("--gpu-id", type=int, default=None, help="GPU index (upstream); with CUDA the default is 0")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--options", nargs="+", default=None, help="config overrides, key=value (e.g. model.ckpt=x.pth)")
    p.add_argument("--server_name", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    p.add_argument("--server_port", "--port", dest="server_port", type=int, default=7860,
                   help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.add_argument("--examples_dir", default=None, help="folder of example scenes (default: assets/examples)")
    p.add_argument("--seed", type=int, default=42, help="seed for sampled answers (temperature > 0)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.server_port < 65536:
        p.error("--server_port must be between 1 and 65535")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    seed_everything(args.seed)
    cfg_path = args.cfg_path or default_config_path()
    if args.cfg_path is None and not Path(cfg_path).is_file():
        raise ConfigError(f"the shipped shapes model's config {cfg_path} is missing; "
                          "give a model with --cfg-path (e.g. eval_configs/click4caption_eval.yaml)")
    cfg = load_config(cfg_path, args.options)
    device = pick_device(args.device, args.gpu_id)

    from click4caption.captioner import Captioner
    from click4caption_apps.demo import CSS, DemoHandlers, LockedCaptioner, build_app, load_example_scenes

    logger.info("loading the model of %s on %s", cfg_path, device)
    captioner = Captioner.from_config(cfg, device=device)
    model = LockedCaptioner(captioner, name=Path(cfg_path).name, device=str(device))
    examples = load_example_scenes(args.examples_dir) if args.examples_dir else load_example_scenes()
    app = build_app(DemoHandlers(model, examples))
    app.queue(default_concurrency_limit=1)
    logger.info("starting the demo on http://%s:%d%s", args.server_name, args.server_port,
                " (and a public share link)" if args.share else "")
    app.launch(server_name=args.server_name, server_port=args.server_port, share=args.share, ssr_mode=False,
               show_error=True, css=CSS)
    return 0


if __name__ == "__main__":
    run_main(main)
