"""The powerful-benchmarker command line and how it becomes a config."""

from __future__ import annotations

import pytest

from pml_loop.bench.cli import experiment_dir, make_config, parse_args
from pml_loop.bench.config import ConfigError, load_saved_config, save_config


def test_known_flags_and_defaults():
    ns, overrides = parse_args(["--experiment_name", "exp"])
    assert ns.experiment_name == "exp"
    assert ns.root_experiment_folder == "experiments"
    assert ns.resume_training is None and ns.evaluate is False and ns.reproduce_results is None
    assert ns.config_general is None
    assert overrides == {}


def test_config_lists_in_both_spellings():
    ns, _ = parse_args(["--config_loss_and_miners", "default", "loop_triplet", "--config_models", "[default,", "glyph_cnn]"])
    assert ns.config_loss_and_miners == ["default", "loop_triplet"]
    assert ns.config_models == ["default", "glyph_cnn"]
    ns, _ = parse_args(["--config_eval", "[default]"])
    assert ns.config_eval == ["default"]


def test_other_keys_become_yaml_overrides_in_order():
    ns, overrides = parse_args(
        [
            "--experiment_name", "e",
            "--num_epochs_train", "3",
            "--trainer~APPLY~2", "{batch_size:", "64}",
            "--loss_funcs~OVERRIDE~", "{metric_loss: {ContrastiveLoss: {neg_margin: -0.5}}}",
            "--device=cpu",
            "--mining_funcs~DELETE~",
            "--dataset_root", "/data",
        ]
    )
    assert ns.dataset_root == "/data"
    assert overrides == {
        "num_epochs_train": 3,
        "trainer~APPLY~2": {"batch_size": 64},
        "loss_funcs~OVERRIDE~": {"metric_loss": {"ContrastiveLoss": {"neg_margin": -0.5}}},
        "device": "cpu",
        "mining_funcs~DELETE~": None,
    }
    assert list(overrides)[:2] == ["num_epochs_train", "trainer~APPLY~2"]


def test_splits_to_eval_is_a_flag_and_an_override():
    ns, overrides = parse_args(["--splits_to_eval", "[test]"])
    assert ns.splits_to_eval == ["test"] and overrides == {"splits_to_eval": ["test"]}


def test_no_abbreviations():
    # --eval must not silently become --evaluate: it is a config override.
    ns, overrides = parse_args(["--eval", "1"])
    assert ns.evaluate is False and overrides == {"eval": 1}


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--num_epochs_train"], r"command line --num_epochs_train: needs a value"),
        (["--trainer", "{a: [1"], r"command line --trainer.*broken YAML"),
        (["stray"], r"'stray': expected --flag"),
        (["--seed", "1", "--seed", "2"], r"--seed: given twice"),
    ],
)
def test_command_line_errors(argv, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_args(argv)


def test_argparse_still_checks_choices():
    with pytest.raises(SystemExit):
        parse_args(["--resume_training", "sometimes"])


# ---------------------------------------------------------------- make_config


def _make(argv, tmp_path):
    return make_config(*parse_args(["--root_experiment_folder", str(tmp_path), *argv]))


def test_make_config_merges_folders_and_overrides(tmp_path):
    cfg, provenance = _make(
        ["--experiment_name", "e", "--config_loss_and_miners", "default", "multi_similarity",
         "--num_epochs_train", "2", "--trainer~APPLY~2", "{batch_size: 64}"],
        tmp_path,
    )
    assert list(cfg["loss_funcs"]["metric_loss"]) == ["MultiSimilarityLoss"]
    assert cfg["num_epochs_train"] == 2
    assert cfg["trainer"]["MetricLossOnly"]["batch_size"] == 64
    assert provenance.origin("loss_funcs") == "config_loss_and_miners/multi_similarity.yaml"
    assert provenance.origin("num_epochs_train") == "command line --num_epochs_train"


def test_make_config_uses_the_users_root_config_folder(tmp_path):
    folder = tmp_path / "cfgs" / "config_general"
    folder.mkdir(parents=True)
    (folder / "quick.yaml").write_text("num_epochs_train: 1\n")
    cfg, _ = _make(
        ["--experiment_name", "e", "--root_config_folder", str(tmp_path / "cfgs"), "--config_general", "default", "quick"],
        tmp_path,
    )
    assert cfg["num_epochs_train"] == 1


def test_make_config_validates_and_names_the_source(tmp_path):
    with pytest.raises(ConfigError, match="command line --num_epochs_train: num_epochs_train: expected an integer"):
        _make(["--experiment_name", "e", "--num_epochs_train", "many"], tmp_path)


def test_resume_and_evaluate_use_the_saved_config(tmp_path):
    cfg, provenance = _make(["--experiment_name", "e", "--num_epochs_train", "7"], tmp_path)
    ns, _ = parse_args(["--root_experiment_folder", str(tmp_path), "--experiment_name", "e"])
    save_config(cfg, provenance, experiment_dir(ns))
    # A fresh run must not silently reuse an existing experiment.
    with pytest.raises(ConfigError, match="already exists; pass --resume_training"):
        _make(["--experiment_name", "e"], tmp_path)
    resumed, resumed_provenance = _make(["--experiment_name", "e", "--resume_training", "latest",
                                         "--config_loss_and_miners", "default", "contrastive"], tmp_path)
    assert resumed == cfg  # --config_* flags are ignored: the saved config wins
    assert resumed_provenance.origin("num_epochs_train").endswith("configs/config_general.yaml")
    more, _ = _make(["--experiment_name", "e", "--evaluate", "--splits_to_eval", "[test]"], tmp_path)
    assert more["splits_to_eval"] == ["test"] and more["num_epochs_train"] == 7


def test_resume_without_saved_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--resume_training: .*no saved config"):
        _make(["--experiment_name", "new", "--resume_training", "best"], tmp_path)


def test_reproduce_results_replays_a_saved_folder_with_overrides(tmp_path):
    cfg, provenance = _make(
        ["--experiment_name", "old", "--config_loss_and_miners", "default", "contrastive"], tmp_path
    )
    save_config(cfg, provenance, tmp_path / "old")
    replayed, replayed_provenance = _make(
        ["--experiment_name", "new", "--reproduce_results", str(tmp_path / "old"), "--seed", "3"], tmp_path
    )
    assert replayed["loss_funcs"] == cfg["loss_funcs"]
    assert replayed["seed"] == 3
    save_config(replayed, replayed_provenance, tmp_path / "new")
    # The override is saved with the folder that owns the key.
    assert load_saved_config(tmp_path / "new")[1].origin("seed").endswith("config_general.yaml")
    assert "seed: 3" in (tmp_path / "new" / "configs" / "config_general.yaml").read_text()


def test_experiment_name_is_required_for_a_fresh_run(tmp_path):
    with pytest.raises(ConfigError, match="--experiment_name is required"):
        _make([], tmp_path)
