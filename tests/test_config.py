"""Config files: every shipped preset loads; mistakes are reported with their place."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from geca.config import RunConfig, load_config, save_config
from geca.errors import ConfigError
from geca.models.config import NAMED_MODELS, named_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS + [resources.files("geca") / "configs" / "demo.yaml"], ids=str)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.model.name in NAMED_MODELS


def test_model_name_fills_the_named_config_and_file_keys_win(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: GeCA-S\n  nca_steps: 4\ntrain:\n  lr: 0.001\n")
    cfg = load_config(p)
    assert cfg.model.hidden_size == named_model("GeCA-S").hidden_size == 768
    assert cfg.model.nca_steps == 4 and cfg.train.lr == 0.001


@pytest.mark.parametrize("text, where", [
    ("train:\n  batch_size: 3.5\n", "train.batch_size"),
    ("train:\n  max_steps: .inf\n", "train.max_steps: expected int, got inf"),
    ("train:\n  seed: .nan\n", "train.seed: expected int, got nan"),
    ("train:\n  ema_warmup: 'yes'\n", "train.ema_warmup"),
    ("model:\n  name: GeCA-Q\n", "GeCA-Q"),
    ("data: [1, 2]\n", "data"),
    ("- a\n- b\n", "top level"),
    ("train: {lr: [\n", "YAML"),
])
def test_bad_configs_name_the_problem(tmp_path: Path, text: str, where: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=where):
        load_config(p)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = RunConfig()
    cfg.train.max_minutes = 2.5
    cfg.preview.sampler.steps = 7
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_model_compile_reads_true_false_and_auto(tmp_path: Path) -> None:
    """YAML booleans (and runs saved when model.compile was one) read as "true"/"false"; anything else is named."""
    from geca.run import ModelSpec

    for text, value in (("true", "true"), ("false", "false"), ("auto", "auto")):
        (tmp_path / "c.yaml").write_text(f"model:\n  compile: {text}\n")
        assert load_config(tmp_path / "c.yaml").model.compile == value
    assert RunConfig().model.compile == "auto"
    (tmp_path / "c.yaml").write_text("model:\n  compile: sometimes\n")
    with pytest.raises(ConfigError, match="model.compile must be one of auto, true, false"):
        load_config(tmp_path / "c.yaml").validate()
    saved = {"model": {"family": "geca", "compile": False}, "diffusion": {}, "data": {}, "in_channels": 3,
             "num_classes": 2, "resolution": 8, "class_names": ["a", "b"], "multilabel": False, "format": 2}
    assert ModelSpec.from_dict(saved).model.compile == "false"


def test_invalid_yaml_is_one_error_line(tmp_path: Path) -> None:
    """PyYAML's messages span lines (a caret under the column); geca's errors are one line, in a file or --set."""
    from geca.utils.schema import apply_set

    (tmp_path / "c.yaml").write_text("train: [\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML \(while parsing") as bad_file:
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"--set 'train.lr=\[': the value is not valid YAML") as bad_set:
        apply_set(load_config(None), ["train.lr=["])
    assert "\n" not in str(bad_file.value) and "\n" not in str(bad_set.value)


def test_on_off_yes_no_are_words_not_booleans(tmp_path: Path) -> None:
    """YAML 1.2's booleans: `heredity: off` is the setting "off" (YAML 1.1 made it false, an invalid heredity)."""
    from geca.utils.schema import apply_set

    (tmp_path / "c.yaml").write_text("model:\n  heredity: off\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.heredity == "off"
    cfg.validate()
    apply_set(cfg, ["model.heredity=gated", "data.flip=false"])
    assert cfg.model.heredity == "gated" and cfg.data.flip is False
    apply_set(cfg, ["model.heredity=off"])
    assert cfg.model.heredity == "off"
    (tmp_path / "c.yaml").write_text("data:\n  flip: no\n")
    with pytest.raises(ConfigError, match="data.flip: expected true/false, got 'no'"):
        load_config(tmp_path / "c.yaml")


def test_values_that_would_break_sampling_or_gated_training_are_refused() -> None:
    """DDIM with η > 1 takes the square root of a negative number (NaN images); a gated model trained with no
    inheriting calls leaves its gate without gradients (DDP stops on it)."""
    from geca.sampling.config import SamplerConfig

    SamplerConfig(sampler="ddim", eta=1.0).validate()
    with pytest.raises(ConfigError, match=r"eta must be in \[0, 1\], got 1.5"):
        SamplerConfig(sampler="ddim", eta=1.5).validate()
    cfg = RunConfig()
    cfg.model.heredity, cfg.train.heredity_prob = "gated", 0.0
    with pytest.raises(ConfigError, match="train.heredity_prob must be > 0 for a model with heredity: gated"):
        cfg.validate()
    cfg.model.heredity = "off"
    cfg.validate()
    # the model sizes its output by its learn_sigma, the diffusion splits it by its own
    cfg.model.learn_sigma = False
    with pytest.raises(ConfigError, match=r"diffusion.learn_sigma must be equal to model.learn_sigma \(False\)"):
        cfg.validate()
    cfg.diffusion.learn_sigma = False
    cfg.validate()
    # a preview or validation sampler with more steps than the diffusion has would stop training at its first use
    cfg.diffusion.timesteps = 10
    with pytest.raises(ConfigError, match=r"preview.sampler.steps must be ≤ diffusion.timesteps \(10\)"):
        cfg.validate()
    cfg.preview.sampler.steps = 10
    with pytest.raises(ConfigError, match=r"validation.sampler.steps must be ≤ diffusion.timesteps"):
        cfg.validate()


def test_a_rule_on_two_keys_names_the_flag_that_set_either() -> None:
    cfg = RunConfig()
    cfg.diffusion.beta_end = 5.0
    with pytest.raises(ConfigError, match=r"^--set diffusion.beta_end must be 0 < beta_start < beta_end < 1"):
        cfg.validate({"diffusion.beta_end": "--set diffusion.beta_end"}, where="preset.yaml")
    with pytest.raises(ConfigError, match=r"^preset.yaml: diffusion.beta_start/beta_end must be"):
        cfg.validate({"train.lr": "--lr"}, where="preset.yaml")


def test_a_preset_is_described_by_its_first_whole_sentence(tmp_path: Path) -> None:
    from geca.presets import describe, presets

    cases = {
        "# GeCA-T on data (see: method.md §5), sized for 2 cores\n# (about an hour). More: here.\n": "GeCA-T on data "
        "(see: method.md §5), sized for 2 cores (about an hour).",
        "# The study on fundus images, the paper's settings:\n#   geca experiment x.yaml\n": "The study on fundus "
        "images, the paper's settings",
        "# Multi-label path, offline: GeCA-T at 32×32 (v0.5 layout).\ndata: {}\n": "Multi-label path, offline: "
        "GeCA-T at 32×32 (v0.5 layout).",
        "data: {}\n": "",
    }
    for i, (text, first) in enumerate(cases.items()):
        (tmp_path / f"{i}.yaml").write_text(text)
        assert describe(tmp_path / f"{i}.yaml") == first
    for kind in ("run", "experiment"):
        for path in presets(kind).values():
            assert 20 < len(describe(path)) < 400, path
