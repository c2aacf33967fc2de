"""A tiny plain-vs-LoOp comparison: table, CSV, PNG, and reruns that skip."""

import csv

import pytest

from pml_loop.bench import compare
from test_bench_run import write_tiny_config_folders  # importing registers TinyBlobs

@pytest.fixture
def config_root(tmp_path):
    return write_tiny_config_folders(tmp_path / "configs")


def test_compare_writes_table_and_plot_and_skips_on_rerun(tmp_path, config_root, capsys):
    out = tmp_path / "out"
    argv = ["--losses", "triplet", "loop_triplet", "--seeds", "0", "1",
            "--root_experiment_folder", str(out), "--root_config_folder", str(config_root),
            "--save_interval", "1"]  # a pass-through override
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "loop_triplet" in printed and "LoOp - plain" in printed

    markdown = (out / "compare_results.md").read_text()
    assert "| loss | LoOp | R@1 | MAP@R | NMI |" in markdown
    assert " ± " in markdown  # two seeds -> mean ± std
    with open(out / "compare_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["loss"], r["seed"]) for r in rows) == [
        ("loop_triplet", "0"), ("loop_triplet", "1"), ("triplet", "0"), ("triplet", "1")]
    assert all(0.0 <= float(r["test_mean_average_precision_at_r"]) <= 1.0 for r in rows)
    assert all(float(r["seconds_per_iteration"]) > 0 for r in rows)
    png = (out / "compare_map_at_r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for loss in ("triplet", "loop_triplet"):
        assert (out / f"{loss}_seed0" / "configs").is_dir()
        assert (out / f"{loss}_seed0" / "fold_0" / "saved_csvs" / "logs.db").is_file()

    # a rerun finds every run finished and only re-reports it
    options, passthrough = compare.parse_args(argv)
    again = compare.compare(options, passthrough)
    assert all(r.skipped for r in again)
    assert [r.test for r in again] == [
        r.test for r in sorted(again, key=lambda r: (r.seed, argv.index(r.loss)))]


def test_aggregate_and_gains_are_plain_minus_loop():
    runs = [
        compare.RunSummary("triplet", s, "", {"recall_at_1": 0.5, "mean_average_precision_at_r": m, "NMI": 0.1},
                           {}, 1, 0.01)
        for s, m in ((0, 0.2), (1, 0.4))
    ] + [compare.RunSummary("loop_triplet", 0, "", {"recall_at_1": 0.6, "mean_average_precision_at_r": 0.5,
                                                    "NMI": 0.1}, {}, 1, 0.02)]
    rows = compare.aggregate(runs, ["triplet", "loop_triplet"])
    assert rows[0]["MAP@R"] == pytest.approx((0.3, 0.1))
    gains = compare.loop_gains(rows)
    assert len(gains) == 1 and gains[0]["loss"] == "triplet"
    for key, value in {"R@1": 0.1, "MAP@R": 0.2, "NMI": 0.0, "s/it ratio": 2.0}.items():
        assert gains[0][key] == pytest.approx(value), key
