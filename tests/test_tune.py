"""pml-loop-compare --tune: the same search for plain and LoOp, then the report."""

import csv

import pytest

from pml_loop.bench import compare, tune
from pml_loop.bench.config import load_config_folders
from pml_loop.bench.search_space import search_dimensions
from test_bench_run import write_tiny_config_folders  # importing registers TinyBlobs


def _space(loss):
    configs = load_config_folders({"config_loss_and_miners": ["default", f"tune_{loss}"],
                                   "config_optimizers": ["default", "tune"]})
    dims = search_dimensions(configs.merged(), configs.provenance)
    # the searched setting (key, kind, bounds) wherever the variant nests it
    return sorted((d.name.replace("LoOpLoss.loss.", ""), d.kind, d.low, d.high) for d in dims)


@pytest.mark.parametrize("loss", ["triplet", "multi_similarity", "contrastive", "hphn_triplet"])
def test_plain_and_loop_variants_search_the_same_space(loss):
    plain, loop = _space(loss), _space(f"loop_{loss}")
    assert plain == loop
    names = [name for name, *_ in plain]
    assert "optimizers.trunk_optimizer.Adam.lr" in names and "optimizers.embedder_optimizer.Adam.lr" in names
    assert len(names) == 3  # the loss's margin and the two learning rates


def test_every_tuned_loss_has_its_search_space():
    for loss in tune.TUNE_LOSSES:
        assert _space(loss), loss


def test_tuned_comparison_reports_best_settings_and_intervals(tmp_path, capsys):
    configs = write_tiny_config_folders(tmp_path / "configs")
    out = tmp_path / "out"
    argv = ["--tune", "--losses", "triplet", "loop_triplet", "--trials", "2", "--reproductions", "2",
            "--root_experiment_folder", str(out), "--root_config_folder", str(configs),
            "--num_epochs_train", "2"]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    with open(out / "tune_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["loss"] for r in rows] == ["triplet", "loop_triplet"]
    for row in rows:
        assert int(row["trials"]) == 2 and float(row["wall_seconds"]) > 0
        low, mean, high = (float(row[f"test_mean_average_precision_at_r_{k}"]) for k in ("ci_low", "mean", "ci_high"))
        assert low < mean < high
        assert (out / f"tune_{row['loss']}" / "accuracy_report.yaml").is_file()
        assert (out / f"tune_{row['loss']}" / f"tune_{row['loss']}_reproduction1").is_dir()
    assert "trunk lr" in printed and "margin" in printed
    # a rerun finds both searches complete and reports the same without training
    assert compare.main(argv) == 0
    with open(out / "tune_results.csv") as f:
        assert list(csv.DictReader(f)) == rows


def test_bad_tune_settings_are_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert compare.main(["--tune", "--losses", "lifted", "--root_experiment_folder", str(out)]) == 2
    assert "tune_lifted" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        compare.parse_args(["--workers", "2"])  # only the tuned comparison has workers


def test_workers_split_the_cores_and_drop_the_workers_flag():
    assert tune.without_workers_flag(["--tune", "--workers", "2", "--trials", "4"]) == ["--tune", "--trials", "4"]
    assert tune.without_workers_flag(["--workers=3", "--tune"]) == ["--tune"]
    assert tune.thread_flags(["--num_threads", "2"], 2) == []
    assert tune.thread_flags([], 1) == []
    assert tune.thread_flags([], 2)[:1] == ["--num_threads"]
