"""Config loading and powerful-benchmarker's merge keys."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pml_loop.bench.config import (
    CONFIG_FOLDERS,
    ConfigError,
    Provenance,
    find_config_file,
    load_config_folders,
    load_saved_config,
    load_yaml_file,
    merge,
    merge_folder,
    parse_merge_key,
    save_config,
    validate_config,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


TRAINER = {"trainer": {"MetricLossOnly": {"batch_size": 32, "iterations_per_epoch": 10}}}


# ---------------------------------------------------------------- plain merge


def test_plain_dicts_merge_recursively_and_other_values_replace():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 5}
    result = merge(base, {"a": {"c": [3], "e": 4}, "d": 6})
    assert result == {"a": {"b": 1, "c": [3], "e": 4}, "d": 6}


def test_merge_does_not_modify_its_inputs():
    base = {"a": {"b": 1}}
    update = {"a": {"c": 2}}
    merge(base, update)
    assert base == {"a": {"b": 1}} and update == {"a": {"c": 2}}


def test_dict_replaces_scalar_and_scalar_replaces_dict():
    assert merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert merge({"a": {"b": 2}}, {"a": None}) == {"a": None}


# ---------------------------------------------------------------- OVERRIDE


def test_override_replaces_instead_of_merging():
    base = {"loss_funcs": {"metric_loss": {"TripletMarginLoss": {"margin": 0.1}}}}
    update = {"loss_funcs~OVERRIDE~": {"metric_loss": {"MultiSimilarityLoss": {}}}}
    assert merge(base, update) == {"loss_funcs": {"metric_loss": {"MultiSimilarityLoss": {}}}}
    # Without the merge key the two classes would sit side by side.
    plain = merge(base, {"loss_funcs": {"metric_loss": {"MultiSimilarityLoss": {}}}})
    assert set(plain["loss_funcs"]["metric_loss"]) == {"TripletMarginLoss", "MultiSimilarityLoss"}


def test_override_nested_and_on_missing_key():
    base = {"a": {"b": {"x": 1, "y": 2}, "c": 3}}
    assert merge(base, {"a": {"b~OVERRIDE~": {"z": 9}}}) == {"a": {"b": {"z": 9}, "c": 3}}
    assert merge({}, {"a~OVERRIDE~": {"b": 1}}) == {"a": {"b": 1}}


def test_merge_keys_inside_new_values_are_resolved():
    result = merge({}, {"a": {"b~OVERRIDE~": 1}})
    assert result == {"a": {"b": 1}}


# ---------------------------------------------------------------- APPLY


def test_apply_merges_into_every_dict_at_depth():
    base = {
        "trainer": {"MetricLossOnly": {"batch_size": 32, "iterations_per_epoch": 100}},
    }
    result = merge(base, {"trainer~APPLY~2": {"batch_size": 64, "dataloader_num_workers": 0}})
    assert result == {
        "trainer": {
            "MetricLossOnly": {"batch_size": 64, "iterations_per_epoch": 100, "dataloader_num_workers": 0}
        }
    }


def test_apply_reaches_every_sibling():
    base = {"optimizers": {"trunk_optimizer": {"Adam": {"lr": 1}}, "embedder_optimizer": {"SGD": {"lr": 2}}}}
    result = merge(base, {"optimizers~APPLY~3": {"weight_decay": 0.1}})
    assert result["optimizers"]["trunk_optimizer"]["Adam"] == {"lr": 1, "weight_decay": 0.1}
    assert result["optimizers"]["embedder_optimizer"]["SGD"] == {"lr": 2, "weight_decay": 0.1}


def test_apply_depth_one_is_a_plain_merge_into_the_value():
    assert merge({"a": {"x": 1}}, {"a~APPLY~1": {"y": 2}}) == {"a": {"x": 1, "y": 2}}


def test_apply_nested_inside_a_plain_key():
    base = {"models": {"trunk": {"GlyphCNN": {"width": 8}}, "embedder": {"MLP": {"layer_sizes": [4]}}}}
    result = merge(base, {"models": {"trunk~APPLY~2": {"width": 16}}})
    assert result["models"]["trunk"] == {"GlyphCNN": {"width": 16}}
    assert result["models"]["embedder"] == {"MLP": {"layer_sizes": [4]}}


def test_apply_value_may_use_merge_keys():
    base = {"a": {"X": {"d": {"p": 1, "q": 2}}}}
    result = merge(base, {"a~APPLY~2": {"d~OVERRIDE~": {"r": 3}}})
    assert result == {"a": {"X": {"d": {"r": 3}}}}


def test_apply_to_missing_key_or_empty_depth_is_an_error():
    with pytest.raises(ConfigError, match=r"f\.yaml: trainer~APPLY~2: 'trainer' is not set"):
        merge({}, {"trainer~APPLY~2": {"batch_size": 1}}, source="f.yaml")
    with pytest.raises(ConfigError, match="no mapping at depth 3"):
        merge({"a": {"b": 1}}, {"a~APPLY~3": {"c": 1}})


# ---------------------------------------------------------------- SWAP


def test_swap_renames_the_only_key_and_keeps_kwargs():
    base = {"trainer": {"MetricLossOnly": {"batch_size": 32}}}
    result = merge(base, {"trainer~SWAP~1": {"TrainWithClassifier": {}}})
    assert result == {"trainer": {"TrainWithClassifier": {"batch_size": 32}}}


def test_swap_with_kwargs_merges_them_into_the_renamed_value():
    base = {"trainer": {"MetricLossOnly": {"batch_size": 32}}}
    result = merge(base, {"trainer~SWAP~1": {"TrainWithClassifier": {"batch_size": 64}}})
    assert result == {"trainer": {"TrainWithClassifier": {"batch_size": 64}}}


def test_swap_old_to_new_form_at_depth_two():
    base = {"loss_funcs": {"metric_loss": {"ContrastiveLoss": {"pos_margin": 0}}}}
    result = merge(base, {"loss_funcs~SWAP~2": {"ContrastiveLoss": "TripletMarginLoss"}})
    assert result == {"loss_funcs": {"metric_loss": {"TripletMarginLoss": {"pos_margin": 0}}}}


def test_swap_old_to_new_form_needs_the_old_key_in_every_dict():
    base = {"loss_funcs": {"metric_loss": {"ContrastiveLoss": {}}, "aux": {"X": {}}}}
    with pytest.raises(ConfigError, match="f.yaml: loss_funcs~SWAP~2: cannot swap 'ContrastiveLoss'"):
        merge(base, {"loss_funcs~SWAP~2": {"ContrastiveLoss": "T"}}, source="f.yaml")


def test_swap_keeps_key_order():
    base = {"models": {"trunk": 1, "embedder": 2}}
    result = merge(base, {"models~SWAP~1": {"trunk": "backbone"}})
    assert list(result["models"]) == ["backbone", "embedder"]


def test_swap_single_form_is_ambiguous_with_several_keys():
    with pytest.raises(ConfigError, match="exactly one key"):
        merge({"models": {"trunk": {}, "embedder": {}}}, {"models~SWAP~1": {"x": {}}})


# ---------------------------------------------------------------- DELETE


def test_delete_removes_a_key_at_any_depth():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert merge(base, {"d~DELETE~": None}) == {"a": {"b": 1, "c": 2}}
    assert merge(base, {"a": {"b~DELETE~": {}}}) == {"a": {"c": 2}, "d": 3}


def test_delete_of_a_missing_key_names_file_and_key():
    with pytest.raises(ConfigError, match=r"x\.yaml: a\.zz~DELETE~: nothing to delete"):
        merge({"a": {}}, {"a": {"zz~DELETE~": None}}, source="x.yaml")


def test_delete_then_set_in_one_mapping():
    assert merge({"a": {"x": 1}}, {"a~DELETE~": None, "a": {"y": 2}}) == {"a": {"y": 2}}


# ---------------------------------------------------------------- merge key syntax


def test_parse_merge_key():
    assert parse_merge_key("trainer~APPLY~2").depth == 2
    assert parse_merge_key("loss~OVERRIDE~").op == "OVERRIDE"
    assert parse_merge_key("plain").op is None
    for bad in ("a~APPLY~", "a~OVERRIDE~3", "a~FOO~", "~DELETE~", "a~APPLY~0"):
        with pytest.raises(ConfigError, match=r"^f\.yaml: .*(merge key|needs a depth|takes no depth|depth must be)"):
            parse_merge_key(bad, "f.yaml")


# ---------------------------------------------------------------- provenance


def test_provenance_names_the_file_that_last_set_a_key():
    provenance = Provenance()
    cfg = merge({}, {"a": {"b": 1, "c": {"d": 2}}}, source="one.yaml", provenance=provenance)
    cfg = merge(cfg, {"a": {"c": {"d": 3}}}, source="two.yaml", provenance=provenance)
    assert provenance.origin("a.b") == "one.yaml"
    assert provenance.origin("a.c.d") == "two.yaml"
    assert provenance.origin("a.c.d.deeper") == "two.yaml"
    assert provenance.where("a.c.d") == "two.yaml: a.c.d"
    cfg = merge(cfg, {"a~APPLY~2": {"e": 1}}, source="three.yaml", provenance=provenance)
    assert provenance.origin("a.c.e") == "three.yaml"
    cfg = merge(cfg, {"a~SWAP~1": {"b": "bb"}}, source="four.yaml", provenance=provenance)
    assert provenance.origin("a.bb") == "one.yaml"
    assert provenance.origin(("a", "b")) is not None  # falls back to the ancestor 'a'
    merge(cfg, {"a~OVERRIDE~": {"z": 1}}, source="five.yaml", provenance=provenance)
    assert provenance.origin("a.z") == "five.yaml"
    assert ("a", "c", "d") not in provenance.sources


# ---------------------------------------------------------------- YAML files


def test_broken_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "trainer:\n  MetricLossOnly: {batch_size: 32\nseed: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+, column \d+: broken YAML") as info:
        load_yaml_file(path)
    assert str(path) in str(info.value)


def test_duplicate_keys_are_refused_with_line(tmp_path):
    path = write(tmp_path / "dup.yaml", "seed: 0\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml, line 2.*duplicate key 'seed'"):
        load_yaml_file(path)


def test_non_mapping_file_and_missing_file(tmp_path):
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: a config file must hold a mapping"):
        load_yaml_file(path)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_yaml_file(tmp_path / "nope.yaml")
    assert load_yaml_file(write(tmp_path / "empty.yaml", "# nothing\n")) == {}


# ---------------------------------------------------------------- config folders


def test_shipped_defaults_exist_for_every_folder():
    for folder in CONFIG_FOLDERS:
        path, label = find_config_file(folder, "default")
        assert path.is_file()
        assert label == f"{folder}/default.yaml"


def test_files_merge_in_the_given_order(tmp_path):
    write(tmp_path / "config_general" / "a.yaml", "x: {k: 1, only_a: true}\n")
    write(tmp_path / "config_general" / "b.yaml", "x: {k: 2}\n")
    provenance = Provenance()
    ab = merge_folder("config_general", ["a", "b"], tmp_path, provenance)
    ba = merge_folder("config_general", ["b", "a"], tmp_path)
    assert ab["x"] == {"k": 2, "only_a": True}
    assert ba["x"] == {"k": 1, "only_a": True}
    assert provenance.origin("x.k").endswith("b.yaml")
    assert provenance.origin("x.only_a").endswith("a.yaml")


def test_user_root_shadows_and_adds_files(tmp_path):
    write(tmp_path / "config_general" / "default.yaml", "mine: 1\n")
    assert merge_folder("config_general", ["default"], tmp_path) == {"mine": 1}
    # A folder the user does not provide still comes from the package.
    assert "tester" in merge_folder("config_eval", ["default"], tmp_path)


def test_a_name_may_be_a_path(tmp_path):
    path = write(tmp_path / "elsewhere" / "extra.yaml", "seed: 7\n")
    assert merge_folder("config_general", ["default", str(path)])["seed"] == 7


def test_unknown_config_name_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"--config_loss_and_miners loop_triplt: .*did you mean loop_triplet\?"):
        merge_folder("config_loss_and_miners", ["loop_triplt"])
    with pytest.raises(ConfigError, match="config file not found"):
        merge_folder("config_general", [str(tmp_path / "missing.yaml")])


def test_load_config_folders_defaults_are_valid():
    configs = load_config_folders({})
    cfg = configs.merged()
    validate_config(cfg, configs.provenance)
    assert configs.provenance.folders["loss_funcs"] == "config_loss_and_miners"
    assert configs.provenance.origin("sampler") == "config_loss_and_miners/default.yaml"


def test_named_loss_files_layer_on_default():
    configs = load_config_folders({"config_loss_and_miners": ["default", "loop_triplet"]})
    cfg = configs.merged()
    assert list(cfg["loss_funcs"]["metric_loss"]) == ["LoOpLoss"]
    assert cfg["sampler"] == {"MPerClassSampler": {"m": 4}}
    assert configs.provenance.origin("loss_funcs.metric_loss") == "config_loss_and_miners/loop_triplet.yaml"


def test_command_line_overrides_merge_into_the_owning_folder():
    overrides = {
        "num_epochs_train": 3,
        "trainer~APPLY~2": {"batch_size": 64},
        "loss_funcs~OVERRIDE~": {"metric_loss": {"ContrastiveLoss": {}}},
        "optimizers": {"trunk_optimizer": {"Adam": {"lr": 0.5}}},
    }
    configs = load_config_folders({}, overrides=overrides)
    cfg = configs.merged()
    assert cfg["num_epochs_train"] == 3
    assert cfg["trainer"]["MetricLossOnly"]["batch_size"] == 64
    assert cfg["trainer"]["MetricLossOnly"]["iterations_per_epoch"] == 100  # kept
    assert cfg["loss_funcs"] == {"metric_loss": {"ContrastiveLoss": {}}}
    assert cfg["optimizers"]["trunk_optimizer"]["Adam"]["lr"] == 0.5
    assert cfg["optimizers"]["embedder_optimizer"]["Adam"]["lr"] == 0.001
    assert configs.by_folder["config_loss_and_miners"]["loss_funcs"] == cfg["loss_funcs"]
    assert configs.provenance.origin("trainer.MetricLossOnly.batch_size") == "command line --trainer~APPLY~2"
    assert configs.provenance.origin("trainer.MetricLossOnly.iterations_per_epoch") == "config_general/default.yaml"


def test_override_of_a_new_key_lands_in_config_general():
    configs = load_config_folders({}, overrides={"my_key": 1})
    assert configs.by_folder["config_general"]["my_key"] == 1


def test_a_key_set_by_two_folders_is_refused(tmp_path):
    write(tmp_path / "config_eval" / "default.yaml", "seed: 3\n")
    with pytest.raises(ConfigError, match=r"config_eval/default\.yaml: top-level key 'seed' is also set by config_general"):
        load_config_folders({}, tmp_path)


def test_save_and_reload_round_trip(tmp_path):
    configs = load_config_folders(
        {"config_loss_and_miners": ["default", "multi_similarity"]}, overrides={"seed": 5}
    )
    cfg = configs.merged()
    directory = save_config(cfg, configs.provenance, tmp_path / "exp")
    assert directory == tmp_path / "exp" / "configs"
    assert sorted(p.name for p in directory.iterdir()) == sorted(f"{f}.yaml" for f in CONFIG_FOLDERS)
    saved_loss = load_yaml_file(directory / "config_loss_and_miners.yaml")
    assert "MultiSimilarityLoss" in saved_loss["loss_funcs"]["metric_loss"]
    assert "~" not in (directory / "config_loss_and_miners.yaml").read_text()
    reloaded, provenance = load_saved_config(tmp_path / "exp")
    assert reloaded == cfg
    assert list(reloaded) == list(cfg)
    assert provenance.origin("seed").endswith("config_general.yaml")
    # The configs folder itself is accepted too.
    assert load_saved_config(directory)[0] == cfg


def test_load_saved_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no saved config folder"):
        load_saved_config(tmp_path / "nothing")
    (tmp_path / "exp" / "configs").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"config_general\.yaml: saved config file missing"):
        load_saved_config(tmp_path / "exp")


# ---------------------------------------------------------------- validation


def _valid_cfg():
    configs = load_config_folders({})
    return configs.merged(), configs.provenance


def test_validate_reports_missing_key_with_its_folder():
    cfg, provenance = _valid_cfg()
    del cfg["sampler"]
    with pytest.raises(ConfigError, match="sampler: missing.*config_loss_and_miners"):
        validate_config(cfg, provenance)


def test_validate_reports_bad_types_with_their_file():
    configs = load_config_folders({}, overrides={"num_epochs_train": "ten", "splits": {"folds": [7]}})
    with pytest.raises(ConfigError) as info:
        validate_config(configs.merged(), configs.provenance)
    message = str(info.value)
    assert "command line --num_epochs_train: num_epochs_train: expected an integer >= 1, got 'ten'" in message
    assert "folds: expected a non-empty list of fold indices in [0, 4)" in message


def test_validate_blames_two_classes_in_one_spec_on_the_later_file(tmp_path):
    write(tmp_path / "config_loss_and_miners" / "ms.yaml", "loss_funcs: {metric_loss: {MultiSimilarityLoss: {}}}\n")
    configs = load_config_folders({"config_loss_and_miners": ["default", "ms"]}, tmp_path)
    with pytest.raises(ConfigError, match=r"metric_loss: expected one class name, got 2.*~OVERRIDE~"):
        validate_config(configs.merged(), configs.provenance)


def test_validate_suggests_for_unknown_top_level_keys():
    configs = load_config_folders({}, overrides={"num_epoch_train": 3})
    with pytest.raises(ConfigError, match=r"command line --num_epoch_train: num_epoch_train: unknown top-level key; did you mean num_epochs_train\?"):
        validate_config(configs.merged(), configs.provenance)
    validate_config(configs.merged(), configs.provenance, allow_unknown=True)


@pytest.mark.parametrize(
    "key, value",
    [
        ("device", "gpu"),
        ("patience", -1),
        ("check_untrained_accuracy", "yes"),
        ("splits_to_eval", "test"),
        ("transforms", {"training": None}),
        ("models", {"embedder": {"MLP": {}}}),
        ("optimizers", {}),
        ("trainer", "MetricLossOnly"),
    ],
)
def test_validate_rejects(key, value):
    cfg, provenance = _valid_cfg()
    cfg[key] = value
    with pytest.raises(ConfigError, match=key):
        validate_config(cfg, provenance)


def test_validate_accepts_nulls_where_allowed():
    cfg, provenance = _valid_cfg()
    cfg.update(patience=None, num_threads=2, sampler=None, device="cuda:1")
    cfg["transforms"] = {"train": None, "eval": None}
    cfg["models"]["embedder"] = None
    validate_config(cfg, provenance)
