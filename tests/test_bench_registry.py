"""From {ClassName: {kwargs}} to objects, and the errors when that fails."""

from __future__ import annotations

import textwrap

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers, trainers

from pml_loop.bench.config import ConfigError, load_config_folders, merge, Provenance
from pml_loop.bench.registry import (
    Location,
    accepted_kwargs,
    build,
    build_all,
    build_optimizer,
    build_scheduler,
    check_buildable,
    check_spec,
    register,
    resolve,
    unregister,
)

WHERE = "config_loss_and_miners/default.yaml: loss_funcs.metric_loss"


def test_builds_pml_classes_with_nested_objects():
    loss = build(
        {
            "TripletMarginLoss": {
                "margin": 0.2,
                "distance": {"CosineSimilarity": {}},
                "reducer": {"ThresholdReducer": {"low": 0.1}},
            }
        }
    )
    assert isinstance(loss, losses.TripletMarginLoss)
    assert loss.margin == 0.2
    assert isinstance(loss.distance, distances.CosineSimilarity)
    assert isinstance(loss.reducer, reducers.ThresholdReducer) and loss.reducer.low == 0.1
    regularized = build({"ContrastiveLoss": {"embedding_regularizer": {"LpRegularizer": {"p": 1}}}})
    assert isinstance(regularized.embedding_regularizer, regularizers.LpRegularizer)


def test_null_kwargs_and_extra_kwargs():
    assert isinstance(build({"CosineSimilarity": None}), distances.CosineSimilarity)
    miner = build({"TripletMarginMiner": {"margin": 0.1}}, margin=0.3)
    assert isinstance(miner, miners.TripletMarginMiner) and miner.margin == 0.3


def test_multiple_losses_list_and_mapping():
    combined = build(
        {"MultipleLosses": {"losses": [{"ContrastiveLoss": {}}, {"MultiSimilarityLoss": {}}], "weights": [1, 2]}}
    )
    assert isinstance(combined.losses[0], losses.ContrastiveLoss)
    reducer = build({"MultipleReducers": {"reducers": {"pos_loss": {"MeanReducer": {}}}}})
    assert isinstance(reducer.reducers["pos_loss"], reducers.MeanReducer)


def test_non_nested_keys_are_passed_through_untouched():
    def takes_options(options=None, loss=None):
        return options, loss

    register(takes_options)
    try:
        # `options` is not a nested key: a spec-looking value stays a dict.
        options, loss = build({"takes_options": {"options": {"Adam": {}}, "loss": {"ContrastiveLoss": {}}}})
    finally:
        unregister("takes_options")
    assert options == {"Adam": {}}
    assert isinstance(loss, losses.ContrastiveLoss)


def test_torch_classes_and_import_paths():
    assert isinstance(build({"Linear": {"in_features": 2, "out_features": 3}}), torch.nn.Linear)
    assert isinstance(build({"torch.nn.Identity": {}}), torch.nn.Identity)
    assert isinstance(build({"torch.nn:ReLU": {}}), torch.nn.ReLU)
    with pytest.raises(ConfigError, match=r"no_such_pkg\.Thing: cannot import"):
        build({"no_such_pkg.Thing": {}})


def test_unknown_class_names_path_and_suggests():
    with pytest.raises(ConfigError) as info:
        build({"TripletMarginLos": {"margin": 0.1}}, where=WHERE)
    assert str(info.value).startswith(
        "config_loss_and_miners/default.yaml: loss_funcs.metric_loss.TripletMarginLos: "
        "unknown class; did you mean TripletMarginLoss?"
    )


def test_unknown_nested_class_names_its_full_path():
    spec = {"TripletMarginLoss": {"distance": {"CosineSimilarty": {}}}}
    with pytest.raises(ConfigError, match=r"metric_loss\.TripletMarginLoss\.distance\.CosineSimilarty: unknown class; did you mean CosineSimilarity\?"):
        build(spec, where=WHERE)


def test_unknown_name_without_close_match_explains_register():
    with pytest.raises(ConfigError, match="register your own"):
        resolve("Zzzzqqq")


def test_bad_kwarg_names_key_suggests_and_lists_accepted():
    with pytest.raises(ConfigError) as info:
        build({"TripletMarginLoss": {"margn": 0.1}}, where=WHERE)
    message = str(info.value)
    assert message.startswith(f"{WHERE}.TripletMarginLoss.margn: unexpected keyword for TripletMarginLoss; did you mean margin?")
    # Keywords PML passes up to base classes are accepted too.
    assert "distance" in message and "reducer" in message and "embedding_regularizer" in message


def test_constructor_errors_are_wrapped_with_the_path():
    with pytest.raises(ConfigError, match=r"metric_loss\.CircleLoss: CircleLoss\(\.\.\.\) failed: AssertionError") as info:
        build({"CircleLoss": {"distance": {"LpDistance": {}}}}, where=WHERE)
    assert isinstance(info.value.__cause__, AssertionError)


def test_spec_shape_errors():
    for bad in ({"A": {}, "B": {}}, "TripletMarginLoss", {"TripletMarginLoss": 3}):
        with pytest.raises(ConfigError, match="expected an object"):
            build(bad, where=WHERE)


def test_accepted_kwargs_walks_pml_base_classes():
    names, open_ended = accepted_kwargs(losses.MultiSimilarityLoss)
    assert {"alpha", "beta", "base", "distance", "reducer", "collect_stats"} <= set(names)
    assert not open_ended


# ---------------------------------------------------------------- register


class MyDistance(distances.LpDistance):
    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale


def test_register_a_user_class_one_call_away():
    register(MyDistance)
    try:
        loss = build({"ContrastiveLoss": {"distance": {"MyDistance": {"scale": 2.0, "p": 1}}}})
        assert isinstance(loss.distance, MyDistance) and loss.distance.scale == 2.0 and loss.distance.p == 1
        with pytest.raises(ConfigError, match="did you mean scale"):
            build({"MyDistance": {"scael": 1}})
    finally:
        unregister("MyDistance")
    with pytest.raises(ConfigError, match="unknown class"):
        build({"MyDistance": {}})


def test_register_as_decorator_with_a_name_and_shadowing():
    @register(name="TripletMarginLoss")
    def fake_triplet(margin: float = 0.0):
        return ("fake", margin)

    try:
        assert build({"TripletMarginLoss": {"margin": 1}}) == ("fake", 1)
    finally:
        unregister("TripletMarginLoss")
    assert isinstance(build({"TripletMarginLoss": {}}), losses.TripletMarginLoss)

    @register
    class Plain:
        pass

    try:
        assert isinstance(build({"Plain": {}}), Plain)
    finally:
        unregister("Plain")


def test_register_rejects_non_callables():
    with pytest.raises(TypeError):
        register(3)


# ---------------------------------------------------------------- optimizers


def test_optimizer_and_scheduler_get_their_runtime_argument():
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = build_optimizer({"Adam": {"lr": 0.01, "weight_decay": 0.1}}, params)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.01
    scheduler = build_scheduler({"StepLR": {"step_size": 3}}, optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    with pytest.raises(ConfigError, match=r"trunk_optimizer\.Adam\.weight_decy: unexpected keyword.*did you mean weight_decay"):
        build_optimizer({"Adam": {"weight_decy": 1}}, params, where="config_optimizers/default.yaml: optimizers.trunk_optimizer")


def test_build_all():
    built = build_all({"a": {"ContrastiveLoss": {}}, "b": {"MultiSimilarityLoss": {}}}, where="x")
    assert isinstance(built["a"], losses.ContrastiveLoss) and isinstance(built["b"], losses.MultiSimilarityLoss)
    assert build_all(None) == {} and build_all({}) == {}
    with pytest.raises(ConfigError, match=r"^x\.b\.Nope: unknown class"):
        build_all({"a": {"ContrastiveLoss": {}}, "b": {"Nope": {}}}, where="x")


# ---------------------------------------------------------------- fail fast


def test_check_spec_checks_runtime_objects_without_building():
    # returns the class itself: a trainer cannot be built before its models exist
    assert check_spec({"MetricLossOnly": {"batch_size": 32}}) is trainers.MetricLossOnly
    with pytest.raises(ConfigError, match=r"trainer\.MetricLossOnly\.batchsize: unexpected keyword.*did you mean batch_size"):
        check_spec({"MetricLossOnly": {"batchsize": 32}}, where="trainer")


def test_check_buildable_blames_the_file_that_set_the_nested_key(tmp_path):
    folder = tmp_path / "config_loss_and_miners"
    folder.mkdir()
    (folder / "mine.yaml").write_text(
        textwrap.dedent(
            """\
            loss_funcs:
              metric_loss:
                TripletMarginLoss:
                  distance: {CosineSimilarty: {}}
            """
        )
    )
    configs = load_config_folders({"config_loss_and_miners": ["default", "mine"]}, tmp_path)
    cfg = {"loss_funcs": configs.merged()["loss_funcs"]}
    with pytest.raises(ConfigError) as info:
        check_buildable(cfg, configs.provenance)
    assert str(info.value).startswith(
        f"{folder / 'mine.yaml'}: loss_funcs.metric_loss.TripletMarginLoss.distance.CosineSimilarty: unknown class"
    )


def test_check_buildable_reports_bad_runtime_kwargs_with_file():
    configs = load_config_folders({}, overrides={"sampler": {"MPerClassSampler": {"mm": 4}}})
    cfg = {key: configs.merged()[key] for key in ("loss_funcs", "sampler", "trainer")}
    with pytest.raises(ConfigError, match=r"^command line --sampler: sampler\.MPerClassSampler\.mm: unexpected keyword"):
        check_buildable(cfg, configs.provenance)


def test_check_buildable_builds_optimizers_and_schedulers():
    cfg = {
        "optimizers": {"trunk_optimizer": {"SGD": {"lr": 0.1, "momentum": 0.9}}},
        "lr_schedulers": {"trunk_scheduler_by_epoch": {"StepLR": {"step_size": 2}}},
        "loss_funcs": {"metric_loss": {"ContrastiveLoss": {}}},
    }
    built = check_buildable(cfg)
    assert isinstance(built["optimizers.trunk_optimizer"], torch.optim.SGD)
    assert isinstance(built["lr_schedulers.trunk_scheduler_by_epoch"], torch.optim.lr_scheduler.StepLR)
    cfg["lr_schedulers"] = {"s": {"StepLR": {"stepsize": 2}}}
    with pytest.raises(ConfigError, match=r"lr_schedulers\.s\.StepLR\.stepsize"):
        check_buildable(cfg)


def test_models_with_missing_weight_files_are_checked_by_signature(tmp_path):
    def weighted_trunk(weights: str, width: int = 1):
        return torch.load(weights)

    register(weighted_trunk)
    try:
        missing = str(tmp_path / "absent.pth")
        built = check_buildable({"models": {"trunk": {"weighted_trunk": {"weights": missing}}}})
        assert built["models.trunk"] is weighted_trunk
        with pytest.raises(ConfigError, match="widht"):
            check_buildable({"models": {"trunk": {"weighted_trunk": {"weights": missing, "widht": 2}}}})
    finally:
        unregister("weighted_trunk")


def test_location_formatting():
    provenance = Provenance()
    merge({}, {"a": {"b": 1}}, source="f.yaml", provenance=provenance)
    assert str(Location(provenance=provenance).child("a", "b", "C")) == "f.yaml: a.b.C"
    assert str(Location("p").child("x")) == "p.x"
    assert str(Location()) == "<config>"
