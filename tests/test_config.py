"""Config files are data checked against what the code accepts: every shipped YAML loads
and validates, unknown keys and wrong types are errors that name the key, and
``--options key=value`` overrides work."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from click4caption import registry
from click4caption.config import Config, ModelConfig, from_dict, load_config, parse_options
from click4caption.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*REPO.glob("eval_configs/*.yaml"), *REPO.glob("train_configs/*.yaml")])


def write_yaml(tmp_path: Path, doc: object, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def test_configs_are_shipped() -> None:
    assert REPO / "eval_configs" / "click4caption_eval.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_yaml_loads_and_names_registered_things(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.path == str(path)
    assert cfg.model.arch in registry.names("model")
    if cfg.model.vit_model != "custom":
        registry.get("vit_variant", cfg.model.vit_model)
    assert cfg.run.task in registry.names("task")
    for name, ds in cfg.datasets.items():
        assert name in registry.names("dataset"), name
        for split in (ds.vis_processor.train, ds.vis_processor.eval, ds.text_processor.train, ds.text_processor.eval):
            if split is not None:
                assert registry.get("processor", split.name) is not None
        for split in (ds.vis_processor.train, ds.vis_processor.eval):
            if split is not None and path.parent.name == "eval_configs":
                assert split.image_size == cfg.model.image_size, "the processor must feed the model's input size"
    # the whole config survives the round trip through the plain dict stored in checkpoints
    again = from_dict(cfg.to_dict())
    assert (again.model, again.datasets, again.run) == (cfg.model, cfg.datasets, cfg.run)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cached_model_files_of_shipped_configs_are_documented(path: Path) -> None:
    """Every ``cached_model/...`` file a shipped config names is explained in cached_model/README.md."""
    readme = (REPO / "cached_model" / "README.md").read_text()
    text = path.read_text()  # commented-out alternatives (7B) included
    for ref in set(re.findall(r"cached_model/([\w.\-]+)", text)) - {"README.md"}:
        assert f"`{ref}" in readme, f"{ref} (named in {path.name}) is not described in cached_model/README.md"


def test_eval_config_is_upstreams() -> None:
    cfg = load_config(REPO / "eval_configs" / "click4caption_eval.yaml")
    m = cfg.model
    assert (m.arch, m.model_type, m.freeze_vit, m.freeze_qformer) == ("click4caption", "pretrain_vicuna", True, False)
    assert (m.max_txt_len, m.end_sym, m.low_resource) == (160, "###", False)
    assert (m.delete_vit_cls_token, m.add_img_pe, m.use_vit_multiblock_feat) == (True, True, [9, 19, 29, 38])
    assert m.ckpt == "cached_model/click4caption_13b.pth"
    assert m.llama_model == "cached_model/vicuna-13b-v0"
    assert m.vit_ckpt == "cached_model/eva_vit_g.pth"
    assert (m.vit_model, m.image_size, m.num_query_token) == ("eva_clip_g", 224, 32)
    ds = cfg.datasets["cc_sbu_align"]
    assert (ds.vis_processor.train.name, ds.vis_processor.train.image_size) == ("blip2_image_eval", 224)
    assert ds.text_processor.train.name == "blip_caption"
    assert cfg.run.task == "image_text_pretrain"
    # the 7B switch described in the file gives the 7B paths
    seven = load_config(REPO / "eval_configs" / "click4caption_eval.yaml",
                        ["model.llama_model=cached_model/vicuna-7b-v0", "model.ckpt=cached_model/click4caption_7b.pth"])
    assert (seven.model.llama_model, seven.model.ckpt) == ("cached_model/vicuna-7b-v0",
                                                          "cached_model/click4caption_7b.pth")


# --------------------------------------------------------------------------- errors name the key
@pytest.mark.parametrize("doc,key", [
    ({"model": {"bogus": 1}}, "model.bogus"),
    ({"model": {"qformer": {"num_layer": 3}}}, "model.qformer.num_layer"),
    ({"model": {"vit": {"depth": 3, "widht": 8}}}, "model.vit.widht"),
    ({"datasets": {"vg": {"sample_ratoi": 2}}}, "datasets.vg.sample_ratoi"),
    ({"datasets": {"vg": {"vis_processor": {"train": {"nme": "blip2_image_eval"}}}}},
     "datasets.vg.vis_processor.train.nme"),
    ({"run": {"init_lrr": 1e-4}}, "run.init_lrr"),
    ({"modle": {}}, "modle"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path: Path, doc: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path, doc))
    assert f"'{key}'" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("doc,key", [
    ({"model": {"max_txt_len": "long"}}, "model.max_txt_len"),
    ({"model": {"freeze_vit": "maybe"}}, "model.freeze_vit"),
    ({"model": {"use_vit_multiblock_feat": "nine"}}, "model.use_vit_multiblock_feat"),
    ({"model": {"use_vit_multiblock_feat": [9, "x"]}}, "model.use_vit_multiblock_feat"),
    ({"model": {"qformer": {"hidden_size": 7.5}}}, "model.qformer.hidden_size"),
    ({"run": {"init_lr": "fast"}}, "run.init_lr"),
    ({"datasets": {"vg": {"num_regions": "twelve"}}}, "datasets.vg.num_regions"),
    ({"model": ["arch", "click4caption"]}, "model"),
    ({"datasets": {"vg": 3}}, "datasets.vg"),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path: Path, doc: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path, doc))
    assert f"'{key}" in str(err.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(write_yaml(tmp_path, "model: {arch: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"))


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path, ""))
    assert cfg.model == ModelConfig() and cfg.datasets == {}
    assert (cfg.run.seed, cfg.run.init_lr, cfg.run.warmup_steps) == (42, 5e-5, 20000)


# --------------------------------------------------------------------------- --options
def test_options_override_values_with_types(tmp_path: Path) -> None:
    path = REPO / "eval_configs" / "click4caption_eval.yaml"
    cfg = load_config(path, ["model.max_txt_len=7", "model.use_vit_multiblock_feat=[1,2]", "model.ckpt=null",
                             "model.low_resource=True", "model.qformer.num_layers=6", "run.seed=3",
                             "datasets.cc_sbu_align.vis_processor.train.image_size=336",
                             "datasets.new_set.sample_ratio=2.5"])
    assert cfg.model.max_txt_len == 7 and isinstance(cfg.model.max_txt_len, int)
    assert cfg.model.use_vit_multiblock_feat == [1, 2]
    assert cfg.model.ckpt is None and cfg.model.low_resource is True
    assert cfg.model.qformer.num_layers == 6 and cfg.model.qformer.hidden_size == 768
    assert cfg.run.seed == 3
    assert cfg.datasets["cc_sbu_align"].vis_processor.train.image_size == 336
    assert cfg.datasets["new_set"].sample_ratio == 2.5
    # the file's other values are untouched
    assert cfg.model.end_sym == "###" and cfg.model.llama_model == "cached_model/vicuna-13b-v0"


@pytest.mark.parametrize("opts,needle", [
    (["model.max_txt_len"], "key=value"),
    (["model.nope=1"], "'model.nope'"),
    (["model.max_txt_len=abc"], "'model.max_txt_len'"),
    (["run.warmup_stepz=5"], "'run.warmup_stepz'"),
    (["model=3"], "'model'"),
])
def test_bad_options_are_errors_naming_the_key(opts: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "eval_configs" / "click4caption_eval.yaml", opts)
    assert needle in str(err.value)
    # the mistake is the override's, not the file's
    assert "click4caption_eval.yaml" not in str(err.value) and "--options" in str(err.value)


def test_parse_options() -> None:
    assert parse_options(None) == {}
    assert parse_options(["a.b=1", "c=x"]) == {"a": {"b": 1}, "c": "x"}
