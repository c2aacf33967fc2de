"""Every shipped and example config parses, validates and builds.

Objects that need data or run-time arguments (datasets, samplers, trainers,
testers) are checked for their class and keyword names; a trunk whose local
weight file is missing is checked the same way.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

import pml_loop
from pml_loop.bench.cli import DEFAULT_ROOT_EXPERIMENT_FOLDER, experiment_dir, make_config, parse_args
from pml_loop.bench.config import (
    CONFIG_FOLDERS,
    SCHEMA_KEYS,
    load_config_folders,
    load_yaml_file,
    package_config_root,
    parse_merge_key,
    save_config,
    validate_config,
)
from pml_loop.bench.registry import build, check_buildable, resolve
from pml_loop.bench.search_space import midpoint_values, search_dimensions, substitute, substitute_provenance

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "configs"
PACKAGE = package_config_root()
EXAMPLE_ROOTS = sorted(p for p in EXAMPLES.iterdir() if p.is_dir())
ALL_YAML = sorted([*PACKAGE.rglob("*.yaml"), *EXAMPLES.rglob("*.yaml")])


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def _owner_of_each_key() -> dict[str, str]:
    return {
        key: folder
        for folder in CONFIG_FOLDERS
        for key in load_yaml_file(PACKAGE / folder / "default.yaml")
    }


def _combinations(root: Path):
    """(root_config_folder, {folder: ["default", name]}) for each named file,
    plus all defaults: each file is exercised layered as documented."""
    yield (root, {})
    for folder in CONFIG_FOLDERS:
        for path in sorted((root / folder).glob("*.yaml")):
            if path.stem != "default":
                yield (root, {folder: ["default", path.stem]})


COMBINATIONS = [c for root in [PACKAGE, *EXAMPLE_ROOTS] for c in _combinations(root)]


def _combination_id(combination) -> str:
    root, names = combination
    label = root.name if root != PACKAGE else "shipped"
    return label + "".join(f"-{names[f][-1]}" for f in names) or label


def test_there_is_something_to_check():
    assert len(ALL_YAML) > 30
    assert {p.name for p in EXAMPLE_ROOTS} == {"cub200", "cars196", "sop"}


@pytest.mark.parametrize("path", ALL_YAML, ids=_id)
def test_yaml_parses_and_keys_belong_to_its_folder(path):
    folder = path.parent.name
    assert folder in CONFIG_FOLDERS, f"{path}: not inside a config_* folder"
    owners = _owner_of_each_key()
    for raw_key in load_yaml_file(path):
        key = parse_merge_key(raw_key, str(path)).name
        assert key in SCHEMA_KEYS, f"{path}: {key} is not a schema key"
        assert owners[key] == folder, f"{path}: {key} belongs in {owners[key]}"


@pytest.mark.parametrize("combination", COMBINATIONS, ids=_combination_id)
def test_config_validates_and_builds(combination):
    root, names = combination
    configs = load_config_folders(names, None if root == PACKAGE else root)
    cfg, provenance = configs.merged(), configs.provenance
    dims = search_dimensions(cfg, provenance)
    if dims:  # a search space (tune_*.yaml): check it as a trial at the middle of each range
        cfg = substitute(cfg, dims, midpoint_values(dims))
        provenance = substitute_provenance(provenance, dims)
    validate_config(cfg, provenance)
    built = check_buildable(_without_uninstalled_trunk(cfg), provenance)
    assert "loss_funcs.metric_loss" in built and "models.trunk" in built


def _trunk_import_path(cfg):
    (name, kwargs), = cfg["models"]["trunk"].items()
    return (kwargs or {}).get("import_path") if name == "load_trunk" else None


def _without_uninstalled_trunk(cfg):
    """The paper trunk comes from an optional package; where it is not
    installed the rest of the config is still checked (its import path is
    checked by test_trunk_import_paths)."""
    path = _trunk_import_path(cfg)
    if path and importlib.util.find_spec(path.split(".")[0]) is None:
        cfg = dict(cfg, models=dict(cfg["models"], trunk={"torch.nn.Identity": {}}))
    return cfg


TRUNK_PATHS = sorted({
    _trunk_import_path(load_config_folders(names, None if root == PACKAGE else root).merged())
    for root, names in COMBINATIONS
} - {None})


@pytest.mark.parametrize("import_path", TRUNK_PATHS)
def test_trunk_import_paths(import_path):
    """A trunk given by import path must import even where its weight file
    is missing (check_buildable then checks only its keywords)."""
    package = import_path.split(".")[0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (optional; needed only for the paper trunk)")
    assert callable(resolve(import_path, where="models.trunk"))


def test_trunk_with_missing_weights_is_checked_not_built():
    cfg = {"models": {"trunk": {"load_trunk": {
        "import_path": "pml_loop.models.GlyphCNN", "weights": "no/such/file.pth", "channels": [8, 8, 8, 8]}}}}
    built = check_buildable(cfg)
    assert built["models.trunk"] is resolve("load_trunk")


def test_loop_files_really_wrap_the_named_loss():
    from pytorch_metric_learning import losses

    expected = {
        "loop_triplet": losses.TripletMarginLoss,
        "loop_multi_similarity": losses.MultiSimilarityLoss,
        "loop_contrastive": losses.ContrastiveLoss,
        "loop_lifted": losses.GeneralizedLiftedStructureLoss,
    }
    for name, loss_class in expected.items():
        configs = load_config_folders({"config_loss_and_miners": ["default", name]})
        built = check_buildable({"loss_funcs": configs.merged()["loss_funcs"]})
        wrapper = built["loss_funcs.metric_loss"]
        assert isinstance(wrapper, pml_loop.LoOpLoss)
        assert isinstance(wrapper.loss, loss_class)
        plain = load_config_folders({"config_loss_and_miners": ["default", name[len("loop_"):]]})
        # Same hyperparameters with and without LoOp, so the comparison is fair.
        wrapped_spec = configs.merged()["loss_funcs"]["metric_loss"]["LoOpLoss"]["loss"]
        assert plain.merged()["loss_funcs"]["metric_loss"] == wrapped_spec
        plain_loss = check_buildable({"loss_funcs": plain.merged()["loss_funcs"]})["loss_funcs.metric_loss"]
        assert type(plain_loss) is loss_class


def test_paper_examples_use_the_paper_setting():
    for root in EXAMPLE_ROOTS:
        cfg = load_config_folders({}, root).merged()
        trainer_kwargs = cfg["trainer"]["MetricLossOnly"]
        assert trainer_kwargs["batch_size"] == 128
        assert cfg["sampler"]["MPerClassSampler"]["m"] == (2 if root.name == "sop" else 4)
        for optimizer in cfg["optimizers"].values():
            assert optimizer == {"Adam": {"lr": 0.0001}}
        assert cfg["models"]["embedder"]["MLP"]["layer_sizes"] == [512]
        train_steps = cfg["transforms"]["train"]["Compose"]["transforms"]
        eval_steps = cfg["transforms"]["eval"]["Compose"]["transforms"]
        assert {"RandomResizedCrop": {"size": 227}} in train_steps
        assert {"CenterCrop": {"size": 227}} in eval_steps and {"Resize": {"size": 256}} in eval_steps
        loop = cfg["loss_funcs"]["metric_loss"]["LoOpLoss"]
        assert loop["reducer"] == {"LoOpReducer": {"mode": "hardest"}}
        assert "TripletMarginLoss" in loop["loss"]


def test_default_glyph_dataset_builds_from_the_shipped_data():
    cfg = load_config_folders({}).merged()
    dataset = build(cfg["dataset"], where="dataset", root=None, split="train", fold=0, num_folds=4)
    assert len(set(dataset.labels.tolist())) == 100
    image, _ = dataset[0]
    assert tuple(image.shape) == (1, 16, 16)
    transform = build(cfg["transforms"]["train"], where="transforms.train")
    assert transform(image).shape == image.shape


def _readme_commands() -> list[str]:
    text = (EXAMPLES / "README.md").read_text()
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if "python -m pml_loop.bench" in line]


README_COMMANDS = _readme_commands()


def _readme_argv(command: str, tmp_path: Path) -> list[str]:
    """The command's arguments with its placeholder paths, and the default
    experiments folder the README's replay path points into, under tmp_path."""
    argv = shlex.split(command.split("python -m pml_loop.bench", 1)[1])
    argv = [re.sub(r"^/path/to/.*", str(tmp_path / "data"), a) for a in argv]
    argv = [re.sub(rf"^{DEFAULT_ROOT_EXPERIMENT_FOLDER}/", f"{tmp_path}/", a) for a in argv]
    return [*argv, "--root_experiment_folder", str(tmp_path)]


def _reads_a_saved_config(namespace) -> bool:
    return bool(namespace.reproduce_results or namespace.resume_training or namespace.evaluate)


def _save_configs_of_earlier_commands(command: str, tmp_path: Path) -> None:
    """Resuming, evaluating and replaying read the config an earlier README
    command saved: save those configs as the runner does before training,
    as if the README had been followed from the top."""
    for earlier in README_COMMANDS[: README_COMMANDS.index(command)]:
        namespace, overrides = parse_args(_readme_argv(earlier, tmp_path))
        if not _reads_a_saved_config(namespace):
            cfg, provenance = make_config(namespace, overrides)
            save_config(cfg, provenance, experiment_dir(namespace))


def test_readme_has_commands_of_each_kind():
    # so that the test below covers fresh runs and runs that need an earlier one
    kinds = {_reads_a_saved_config(parse_args(_readme_argv(c, Path("/tmp")))[0]) for c in README_COMMANDS}
    assert kinds == {True, False}


@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_commands_give_valid_configs(command, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository
    _save_configs_of_earlier_commands(command, tmp_path)
    namespace, overrides = parse_args(_readme_argv(command, tmp_path))
    cfg, provenance = make_config(namespace, overrides)
    check_buildable(_without_uninstalled_trunk(cfg), provenance)
