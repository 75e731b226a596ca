"""Configuration: the upstream YAML layout (``model:``, ``datasets:``, ``run:``) checked
against typed schemas.

Every key has exactly one default, written in the dataclasses below. YAML files and
``--options key=value`` overrides are merged onto them with OmegaConf in struct mode,
so a mistyped or unknown key is an error that names it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from click4caption.errors import ConfigError

logger = logging.getLogger(__name__)


def upstream_only(default: Any, why: str) -> Any:
    """A key upstream YAML files hold and nothing here reads: accepted, and reported once
    (by name, with ``why``) when a file sets it."""
    return field(default=default, metadata={"unused": why})


def one_of(default: Any, choices: tuple[Any, ...], why: str) -> Any:
    """A key upstream read, of which only ``choices`` are supported here."""
    metadata = {"choices": choices, "why": why}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ViTSize:
    """Sizes of an EVA-style ViT: a named variant's (``eva_clip_g``, in
    :mod:`click4caption.models.vision`) or, with ``vit_model: custom``, all five given
    under ``vit:``."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_dim: int


@dataclass
class QFormerSize:
    """Sizes of the query-only Q-Former. Defaults are BLIP-2's (BERT-base)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1


@dataclass
class ModelConfig:
    """The ``model:`` section. Names follow upstream's ``Click4Caption.from_config``."""

    arch: str = "click4caption"
    model_type: str = one_of("pretrain_vicuna", ("pretrain_vicuna",),
                             "upstream's only model type (its defaults are the ones written here)")
    # vision encoder
    vit_model: str = "eva_clip_g"
    vit: Optional[ViTSize] = None
    vit_ckpt: Optional[str] = "cached_model/eva_vit_g.pth"
    image_size: int = 224
    drop_path_rate: float = 0.0
    use_grad_checkpoint: bool = False
    vit_precision: str = "fp16"
    freeze_vit: bool = True
    use_vit_multiblock_feat: Optional[List[int]] = field(default_factory=lambda: [9, 19, 29, 38])
    delete_vit_cls_token: bool = True
    add_img_pe: bool = True
    # Q-Former
    q_former_model: Optional[str] = "cached_model/blip2_pretrained_flant5xxl.pth"
    qformer: QFormerSize = field(default_factory=QFormerSize)
    num_query_token: int = 32
    freeze_qformer: bool = False
    # LLM
    llama_model: str = "cached_model/vicuna-13b-v0"
    llm_dtype: str = "auto"
    # build the LLM from the folder's config.json with random weights (the shapes model;
    # its trained weights then come from ``ckpt``)
    llm_from_scratch: bool = False
    freeze_llm: bool = True
    low_resource: bool = False
    device_8bit: int = 0
    llama_proj_ckpt: Optional[str] = None
    # the trained model
    ckpt: Optional[str] = None
    # text
    prompt: str = upstream_only("", "upstream's model reads no 'prompt' key; training prompts come from "
                                    "prompt_path and prompt_template")
    prompt_path: str = ""
    prompt_template: str = ""
    max_txt_len: int = 32
    end_sym: str = "###"
    # training aid for models trained from scratch: weight of a loss that pulls the
    # learned queries' cross-attention inside the box (0 = off, as upstream)
    box_attention_loss_weight: float = 0.0
    # with that loss: cut the box into g x g cells and give each query its own cell
    # (0 = every query looks at the whole box)
    box_attention_grid: int = 0
    # with that grid: "cells" gives (near-)whole-image boxes cells too, "free" lets every
    # query of such a box look anywhere in the image, "objects" gives each object of the
    # image to one query (the one whose cell holds its centre, or the nearest free one)
    # where the training data lists the objects' boxes (so that they can be counted)
    box_attention_whole_image: str = one_of("cells", ("cells", "free", "objects"),
                                            "the targets of (near-)whole-image boxes")
    # with "objects": weight of a loss that makes each query's output say whether it owns
    # an object (its first channel read as the logit), so that counting is adding up
    box_attention_owner_weight: float = 0.0
    # with "objects": pull whole-image queries onto their objects in the last n Q-Former
    # cross-attention layers only, the earlier ones letting them look anywhere (0 = all)
    box_attention_object_layers: int = 0
    # with "objects": weight of a loss that makes the queries' owner answers (see
    # box_attention_owner_weight) add up to the object count, so that an object near a cell
    # border is claimed once (0 = off)
    box_attention_owner_count_weight: float = 0.0
    # with "objects": width w (in cells, 0-1) of the band around the cell borders where an
    # object is owned by the neighbouring cells in shares (its centre spread over a w x w
    # square), so that owning changes smoothly near a border (0 = one owner per object)
    box_attention_owner_ramp: float = 0.0
    # with "objects" (and no ramp): b > 0 matches each object to the query that costs least,
    # squared distance (in cells) from its cell centre to the object's centre less b times
    # its attention mass on the object in that pass, so that near a cell border the
    # neighbour already looking at the object owns it (0 = the fixed rule)
    box_attention_owner_match: float = 0.0
    # with box_attention_owner_weight: gamma of a focal factor (1 - p_t)^gamma on each
    # query's owner term, so that the hard decisions (objects near a cell border) weigh more
    # than the many easy background queries (0 = plain binary cross-entropy)
    box_attention_owner_focal: float = 0.0
    # with "objects": "even" cuts the whole image into g x g equal owner cells, "patches"
    # moves their edges to the nearest ViT patch border, so that no patch (and no centre the
    # object-centre aid marks) lies in two cells (not with the ramp or matching)
    box_attention_owner_cells: str = one_of("even", ("even", "patches"), "the whole image's owner cells")
    # training aid for models trained from scratch: weight of a loss that makes each image
    # token's first channel say whether an object's centre lies in its patch, where the
    # training data lists every object's box, so that touching objects stay apart in the
    # image tokens (0 = off, as upstream; see click4caption/models/object_centres.py)
    object_centre_weight: float = 0.0


@dataclass
class ProcessorConfig:
    name: str = "blip2_image_eval"
    image_size: int = 224
    min_scale: float = 0.5
    max_scale: float = 1.0
    max_words: int = 50
    prompt: str = ""


@dataclass
class ProcessorSplits:
    train: Optional[ProcessorConfig] = None
    eval: Optional[ProcessorConfig] = None


@dataclass
class BuildInfo:
    storage: Optional[str] = None


@dataclass
class DatasetConfig:
    """One entry of the ``datasets:`` section."""

    data_type: str = upstream_only("images", "the datasets read their files from build_info.storage, as upstream")
    build_info: BuildInfo = field(default_factory=BuildInfo)
    vis_processor: ProcessorSplits = field(default_factory=ProcessorSplits)
    text_processor: ProcessorSplits = field(default_factory=ProcessorSplits)
    sample_ratio: float = 1.0
    special_batch_size: Optional[int] = None
    num_regions: int = 12
    # image ids never trained on (for example the VG test split of published benchmarks)
    held_out_ids: List[str] = field(default_factory=list)
    held_out_ids_file: Optional[str] = None
    # LAION: window of consecutive shard samples a batch is drawn from (upstream's shuffle buffer)
    shuffle_buffer: int = 1000
    # region instructions: records of one image put next to each other in an epoch's order, up
    # to this many, so that a batch holds fewer distinct images (one ViT pass per image)
    records_per_image: int = 1


@dataclass
class RunConfig:
    """The ``run:`` section (upstream LAVIS runner keys plus a few of ours)."""

    task: str = "image_text_pretrain"
    # optimiser and schedule
    lr_sched: str = "linear_warmup_cosine_lr"
    init_lr: float = 5e-5
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 20000
    weight_decay: float = 0.05
    beta2: float = 0.999
    max_epoch: int = 30
    iters_per_epoch: int = 10000
    accum_grad_iters: int = 1
    # seconds of training this run may take (null: no limit): the iterations are refitted to
    # the measured rate at every log line, at most max_epoch * iters_per_epoch, and the
    # cosine runs over the fitted length (click4caption/training/budget.py)
    time_budget_s: Optional[float] = None
    grad_clip: Optional[float] = None
    batch_size_train: int = 1
    batch_size_eval: int = upstream_only(12, "there is no evaluation during training (evaluate.py scores models)")
    num_workers: int = 4
    # precision
    amp: bool = True
    amp_dtype: str = "fp16"
    # bookkeeping
    seed: int = 42
    # torch.use_deterministic_algorithms for the run: on a CPU a run then repeats bit for bit
    # even on a busy machine (without it, the gradient into the image tokens changes with the
    # threads' timing; REPORT.md of the shapes model: "Where the draws differ")
    deterministic: bool = False
    output_dir: str = "output/"
    resume_ckpt_path: Optional[str] = None
    save_every_iters: int = 1000
    keep_last_ckpts: int = 2
    log_freq: int = 50
    evaluate: bool = one_of(False, (False,), "evaluation during training is not supported: score checkpoints "
                                             "with evaluate.py")
    train_splits: List[str] = one_of(["train"], (["train"],), "the datasets have one split, 'train'")
    # devices
    device: str = "cuda"
    world_size: int = upstream_only(1, "the number of processes comes from torchrun (WORLD_SIZE), as upstream")
    dist_url: str = "env://"
    distributed: bool = True
    # DDP: set when some trainable parameter gets no gradient in a step
    find_unused_parameters: bool = False


@dataclass
class Config:
    """A resolved configuration file."""

    model: ModelConfig
    datasets: Dict[str, DatasetConfig]
    run: RunConfig
    path: Optional[str] = None
    #: dotted names of the keys the file and the overrides set (``datasets.vg.num_regions``)
    given: frozenset = frozenset()

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-serialisable dict (stored in every checkpoint), without the
        upstream-only keys nothing reads."""

        def plain(section: Any) -> dict[str, Any]:
            data = OmegaConf.to_container(OmegaConf.structured(section))
            for key in _schema_unused(section, ""):
                data.pop(key, None)
            return data

        return {"model": plain(self.model), "datasets": {k: plain(v) for k, v in self.datasets.items()},
                "run": plain(self.run)}


_TOP_LEVEL = ("model", "datasets", "run")


def _merge(schema: Any, data: Any, where: str, section: str) -> Any:
    """Merge ``data`` (the ``section`` of the file) onto the structured ``schema``; errors
    name the offending key in full, e.g. ``model.qformer.num_layers``."""
    if data is not None and not isinstance(data, (dict, DictConfig)):
        raise ConfigError(f"{where}: '{section}' must be a mapping of keys, got {type(data).__name__}")
    base = OmegaConf.structured(schema)
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, data if data is not None else {})
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        key = f"{section}.{key}" if key else section
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{where}: invalid key '{key}': {msg}") from None


def parse_options(options: Optional[Sequence[str]]) -> DictConfig:
    """``["model.ckpt=x", "run.seed=1"]`` -> DictConfig (upstream's ``--options``)."""
    options = list(options or [])
    for opt in options:
        if "=" not in opt:
            raise ConfigError(f"--options expects key=value pairs, got '{opt}'")
    try:
        return OmegaConf.from_dotlist(options)
    except OmegaConfBaseException as err:
        raise ConfigError(f"--options: {str(err).splitlines()[0]}") from None


def from_dict(raw: Any, where: str = "config") -> Config:
    """Validate a raw mapping (``model``/``datasets``/``run``) into a :class:`Config`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, (dict, DictConfig)):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(_TOP_LEVEL)}")
    for key in raw.keys():
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{where}: unknown top-level key '{key}' (expected {', '.join(_TOP_LEVEL)})")
    model = _merge(ModelConfig, raw.get("model"), where, "model")
    datasets_raw = raw.get("datasets") or {}
    if not isinstance(datasets_raw, (dict, DictConfig)):
        raise ConfigError(f"{where}: 'datasets' must be a mapping of dataset names, got {type(datasets_raw).__name__}")
    datasets: Dict[str, DatasetConfig] = {}
    for name in datasets_raw.keys():
        datasets[str(name)] = _merge(DatasetConfig, datasets_raw[name], where, f"datasets.{name}")
    run = _merge(RunConfig, raw.get("run"), where, "run")
    given = frozenset(_dotted_keys(raw))
    _check_choices(model, "model", where)
    _check_choices(run, "run", where)
    for name, ds in datasets.items():
        _check_choices(ds, f"datasets.{name}", where)
    report_unused(given, _schema_unused(model, "model") | _schema_unused(run, "run")
                  | {f"datasets.{n}.{k}": why for n, ds in datasets.items() for k, why in _schema_unused(ds, "").items()},
                  where)
    return Config(model=model, datasets=datasets, run=run, given=given)


def _dotted_keys(data: Any, prefix: str = "") -> Iterable[str]:
    """Every key path of a nested mapping: ``{"a": {"b": 1}}`` -> ``a``, ``a.b``."""
    if isinstance(data, (dict, DictConfig)):
        for key in data.keys():
            path = f"{prefix}{key}"
            yield path
            yield from _dotted_keys(data[key], path + ".")


def _schema_unused(obj: Any, section: str) -> dict[str, str]:
    """``{dotted key: why}`` of the schema's upstream-only fields (see :func:`upstream_only`)."""
    prefix = f"{section}." if section else ""
    return {prefix + f.name: f.metadata["unused"] for f in fields(obj) if "unused" in f.metadata}


def _check_choices(obj: Any, section: str, where: str) -> None:
    """Keys declared with :func:`one_of` hold one of their values.

    Raises:
        ConfigError: naming the key, the value and why.
    """
    for f in fields(obj):
        if "choices" in f.metadata and getattr(obj, f.name) not in f.metadata["choices"]:
            allowed = " or ".join(repr(c) for c in f.metadata["choices"])
            raise ConfigError(f"{section}.{f.name} is {getattr(obj, f.name)!r}: only {allowed} is supported "
                              f"({f.metadata['why']})")
        value = getattr(obj, f.name)
        if is_dataclass(value):
            _check_choices(value, f"{section}.{f.name}", where)


_REPORTED: set[str] = set()


def report_unused(given: Iterable[str], unused: Mapping[str, str], where: str) -> None:
    """Warn once per process about each key in ``unused`` that ``given`` sets: accepted
    for compatibility with upstream files, not used, and why."""
    given = set(given)
    for key, why in sorted(unused.items()):
        if key in given and key not in _REPORTED:
            _REPORTED.add(key)
            logger.warning("%s: %s is accepted for upstream configs but not used: %s", where, key, why)


def load_config(path: str | Path, options: Optional[Sequence[str]] = None) -> Config:
    """Load and validate a YAML config, applying ``key=value`` overrides.

    Raises:
        ConfigError: file missing, YAML broken, unknown key, wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    cfg = from_dict(raw, where=str(path))  # the file alone: its mistakes are named with its path
    if options:
        overrides = parse_options(options)
        try:
            raw = OmegaConf.merge(raw, overrides)
        except (OmegaConfBaseException, TypeError, ValueError) as err:
            raise ConfigError(f"--options: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        cfg = from_dict(raw, where="--options")
    cfg.path = str(path)
    return cfg
