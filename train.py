"""Train Click4Caption (upstream's command line)::

    torchrun --nproc-per-node NUM_GPU train.py --cfg-path train_configs/click4caption_train.yaml --exp_name 13b_exp1

Also runs as one process without torchrun (``python train.py ...``), on CPUs with the
gloo backend, and across nodes with torchrun's usual arguments. Outputs (log file,
TensorBoard scalars, checkpoints, the resolved config) go to
``run.output_dir/<exp_name>/``. Resume with ``--options run.resume_ckpt_path=PATH``
(or ``=auto`` for that experiment's ``checkpoint_last.pth``); rank 0 writes the
checkpoints, so across nodes ``run.output_dir`` must be storage every node can read. ``--dry-run`` builds the
datasets, model and optimiser, draws one batch per dataset and runs no step.
"""
from __future__ import annotations

import argparse
import logging
import os

from click4caption_apps.cli import run_main, setup_logging
from click4caption.config import load_config
from click4caption.training import run_training

logger = logging.getLogger("click4caption.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train Click4Caption.")
    p.add_argument("--cfg-path", required=True, help="path to the training config (YAML)")
    p.add_argument("--exp_name", required=True, help="experiment name: outputs go to run.output_dir/<exp_name>/")
    p.add_argument("--options", nargs="+", default=None,
                   help="override config settings, key=value (e.g. run.init_lr=1e-4 run.resume_ckpt_path=auto)")
    p.add_argument("--dry-run", action="store_true", help="build everything, run no training step")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    # torch.distributed.launch passes --local-rank; torchrun uses LOCAL_RANK instead
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    setup_logging(args.verbose)
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 reports progress
        logging.getLogger("click4caption").setLevel(logging.WARNING)
    cfg = load_config(args.cfg_path, args.options)
    result = run_training(cfg, args.exp_name, dry_run=args.dry_run)
    if not args.dry_run:
        logger.info("done: iterations %d..%d, outputs in %s", result.start_iteration, result.end_iteration,
                    result.output_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
