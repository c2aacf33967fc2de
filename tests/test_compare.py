"""A tiny plain-vs-LoOp comparison: table, CSV, PNG, and reruns that skip."""

import csv
import json

import numpy as np
import pytest

from pml_loop.bench import compare
from test_bench_run import write_tiny_config_folders  # importing registers TinyBlobs

@pytest.fixture
def config_root(tmp_path):
    return write_tiny_config_folders(tmp_path / "configs")


RUN_ORDER = [("triplet", 0), ("loop_triplet", 0), ("triplet", 1), ("loop_triplet", 1)]  # seeds outer
MAP_AT_R = "mean_average_precision_at_r"


def best_test_map_at_r(experiment_dir):
    """What the experiment itself logged, to check the comparison reports it."""
    meta = json.loads((experiment_dir / "meta_logs" / "best_accuracies.json").read_text())
    return meta["test"][MAP_AT_R]["mean"]


def markdown_row(markdown, loss):
    return next(line for line in markdown.splitlines() if line.startswith(f"| {loss} |")).split(" | ")


def test_compare_writes_table_and_plot_and_skips_on_rerun(tmp_path, config_root, capsys):
    out = tmp_path / "out"
    argv = ["--losses", "triplet", "loop_triplet", "--seeds", "0", "1",
            "--root_experiment_folder", str(out), "--root_config_folder", str(config_root),
            "--save_interval", "1"]  # a pass-through override
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "LoOp - plain" in printed

    # the CSV: one line per run, in the order run, with what each experiment logged
    with open(out / "compare_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], int(r["seed"])) for r in rows] == RUN_ORDER
    logged = {}
    for row, (loss, seed) in zip(rows, RUN_ORDER):
        experiment = out / f"{loss}_seed{seed}"
        assert row["experiment_dir"] == str(experiment) and row["loop"] == str(loss.startswith("loop_"))
        logged[loss, seed] = best_test_map_at_r(experiment)
        assert float(row[f"test_{MAP_AT_R}"]) == pytest.approx(logged[loss, seed])
        assert float(row["seconds_per_iteration"]) > 0
        assert (experiment / "configs").is_dir()
        assert (experiment / "fold_0" / "saved_csvs" / "logs.db").is_file()

    # the markdown table: mean ± sample std over the two seeds of those values
    markdown = (out / "compare_results.md").read_text()
    assert "| loss | LoOp | R@1 | MAP@R | NMI |" in markdown
    for loss in ("triplet", "loop_triplet"):
        values = [logged[loss, 0], logged[loss, 1]]
        cell = markdown_row(markdown, loss)[3]
        assert cell == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}", loss
        assert cell in printed, loss
    png = (out / "compare_map_at_r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the gain: difference of the means, with the standard error of the difference
    gain_row = [line for line in markdown.splitlines() if line.startswith("| triplet |")][-1]
    loop_mean, error = (float(x) for x in gain_row.split(" | ")[2].split(" ± "))
    plain, loop = [logged["triplet", s] for s in (0, 1)], [logged["loop_triplet", s] for s in (0, 1)]
    assert loop_mean == pytest.approx(np.mean(loop) - np.mean(plain), abs=1e-4)
    assert error == pytest.approx(np.sqrt(np.var(loop, ddof=1) / 2 + np.var(plain, ddof=1) / 2), abs=1e-4)

    # a rerun finds every run finished and re-reports the same results, in the
    # same order, with the wall time the runs took, not the rerun's
    first_wall = {(r["loss"], int(r["seed"])): float(r["wall_seconds"]) for r in rows}
    options, passthrough = compare.parse_args(argv)
    again = compare.compare(options, passthrough)
    assert all(r.skipped for r in again)
    assert [(r.loss, r.seed) for r in again] == RUN_ORDER
    for r in again:
        assert r.test[MAP_AT_R] == pytest.approx(logged[r.loss, r.seed])
        assert r.wall_seconds == pytest.approx(first_wall[r.loss, r.seed], abs=1e-3) and r.wall_seconds > 0
    assert compare.main(argv) == 0
    note = capsys.readouterr().out
    total = sum(r.wall_seconds for r in again)
    assert f"Wall time of the runs: {total:.0f} s" in note


def test_aggregate_and_gains_are_plain_minus_loop():
    runs = [
        compare.RunSummary("triplet", s, "", {"recall_at_1": 0.5, "mean_average_precision_at_r": m, "NMI": 0.1},
                           {}, 1, 0.01)
        for s, m in ((0, 0.2), (1, 0.4))
    ] + [compare.RunSummary("loop_triplet", 0, "", {"recall_at_1": 0.6, "mean_average_precision_at_r": 0.5,
                                                    "NMI": 0.1}, {}, 1, 0.02)]
    rows = compare.aggregate(runs, ["triplet", "loop_triplet"])
    assert rows[0]["MAP@R"] == pytest.approx((0.3, np.std([0.2, 0.4], ddof=1)))
    assert rows[1]["MAP@R"] == (0.5, None)  # one seed: no spread
    gains = compare.loop_gains(rows)
    assert len(gains) == 1 and gains[0]["loss"] == "triplet"
    for key, value in {"R@1": 0.1, "MAP@R": 0.2, "NMI": 0.0}.items():
        assert gains[0][key][0] == pytest.approx(value), key
        assert gains[0][key][1] is None, key  # no standard error from one seed
    assert gains[0]["s/it ratio"] == pytest.approx(2.0)
