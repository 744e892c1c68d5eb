"""The benchmark runner keeps working: every case kind runs on a tiny model and the report renders.

Nothing here asserts a time or a memory figure (those live in ``benchmarks/results``); the checks are that each
method ran on every image and that the tables and target verdicts come out of real measurements.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks import __main__ as runner
from benchmarks import cases

TINY = {"model": "vit_tiny_patch16_224", "img_size": 32, "batch_size": 2, "device": "cpu", "threads": None}


@pytest.fixture(scope="module")
def report():
    at4 = [f"{m}@4" for m in runner.BATCH_METHODS]
    speed = cases.speed(
        {**TINY, "kind": "speed", "num_images": 4, "rounds": 1, "methods": [*runner.SPEED_METHODS, *at4]}
    )
    mem = {m: cases.memory({**TINY, "kind": "memory", "method": m, "num_images": 4}) for m in runner.MEMORY_METHODS}
    mem |= {
        f"{m}@4": cases.memory({**TINY, "kind": "memory", "method": m, "num_images": 4, "batch_size": 4})
        for m in runner.BATCH_METHODS
    }
    scaling = [
        mem["attention-distance"],
        cases.memory({**TINY, "kind": "memory", "method": "attention-distance", "num_images": 6}),
    ]
    hires = {
        m: cases.memory({**TINY, "kind": "memory", "method": m, "num_images": 4, "img_size": 48, "rss_cap_mib": 1.0})
        for m in runner.MEMORY_METHODS
    }
    fewshot = cases.fewshot({"kind": "fewshot", "device": "cpu", "repeats": 1})
    results = {
        "models": {TINY["model"]: {"speed": speed, "memory": mem, "scaling": scaling}},
        "hires": hires,
        "fewshot": fewshot,
        "startup": {"help_s": 0.2, "import_analysis_s": 2.0, "python_startup_s": 0.03},
    }
    settings = dataclasses.replace(runner.QUICK, device="cpu", rss_cap_mib=1.0, batch_size=2, compare_batch_sizes=(4,))
    out = {"quick": True, "machine": runner.machine("cpu"), "settings": dataclasses.asdict(settings)}
    out |= {"results": results, "ratios": runner.ratios(results), "total_s": 1.0}
    return out


def test_every_method_ran_on_every_image(report):
    speed = report["results"]["models"][TINY["model"]]["speed"]
    assert set(speed["images_per_s"]) == set(runner.SPEED_METHODS) | {f"{m}@4" for m in runner.BATCH_METHODS}
    assert all(len(t) == 1 and t[0] > 0 for t in speed["all_seconds"].values())
    hires = report["results"]["hires"]
    # The 1 MiB cap stops keep-every-map after its first batch; the streaming methods never stop.
    assert hires["keep-every-map"]["stopped_after_images"] == 2
    assert all("stopped_after_images" not in hires[m] for m in ("plain-forward", "attention-distance", "rollout"))
    assert hires["attention-distance"]["num_tokens"] == (48 // 16) ** 2 + 1


def test_report_renders_every_table_and_target(report):
    md = runner.markdown(report)
    for needle in (
        "| unfused-forward |",
        "| rollout-one-at-a-time |",
        "attention-distance, scaling:",
        "stopped at the 0.0 GiB cap after 2 images",
        "LogisticRegression on the same shots",
        "| ≥ 3× less memory than keep-every-map (first model) |",
        "| timm's explicit attention path (the floor of any map capture) × plain |",
        "| method | images/s @2 | images/s @4 | memory @2 | memory @4 |",
        "| at batch 4: attention-distance memory × plain |",
    ):
        assert needle in md, needle
    # One verdict per target that has a value for the model, and the model-free ones under "all".
    ratios = report["ratios"]
    assert set(ratios) == {TINY["model"], "all"}
    assert {"attention_distance_vs_plain@4", "keep_every_map_vs_streaming", "memory_growth_in_images"} <= set(
        ratios[TINY["model"]]
    )
    assert "attention-distance × plain, median of the per-round ratios" in md
    assert md.count("✅") + md.count("❌") == sum(key in r for key, *_ in runner.TARGETS for r in ratios.values())
    acc = report["results"]["fewshot"]["accuracy"]
    assert acc["ridge"][-1]["mean"] > 0.5  # the demo model's features separate the digits: far above chance


def test_half_precision_case_runs_every_method():
    # On CUDA the runner adds bfloat16/float16 entries; the case casts the weights and every method follows them.
    methods = ["plain-forward", "attention-distance", "rollout", "features"]
    speed = cases.speed(
        {**TINY, "kind": "speed", "num_images": 2, "rounds": 1, "methods": methods, "dtype": "bfloat16"}
    )
    assert set(speed["images_per_s"]) == set(methods) and all(v > 0 for v in speed["images_per_s"].values())


def test_command_line_settings():
    settings, _ = runner.parse_settings(["--device", "cpu", "--models", "a,b", "--gpu-models", "", "--threads", "1"])
    assert settings.models == ("a", "b") and settings.gpu_models == () and settings.threads == 1
    assert settings.device == "cpu" and settings.batch_size == 8  # vitlens's CPU default, resolved
    assert settings.gpu_dtypes == runner.FULL.gpu_dtypes  # not given: the full run's
    quick, _ = runner.parse_settings(["--quick", "--device", "cpu", "--gpu-dtypes", "bfloat16"])
    assert quick.models == runner.QUICK.models and quick.gpu_dtypes == ("bfloat16",)


def test_per_round_ratio_cancels_a_slow_round():
    # Round 2 is slow for both methods alike: its ratio is still 0.5, where best-of-rounds would give 2 / 3.
    speed = {"all_seconds": {"plain-forward": [2.0, 6.0, 2.0], "rollout": [4.0, 12.0, 3.0]}}
    assert runner._per_round(speed, "rollout") == 0.5


def test_distributed_scaling_and_equality_arithmetic():
    from benchmarks import distributed as bench

    # 1x1: 1 image/s after 2 s; 2x1: 2 images/s after 10 s; 1x2: 1.6 images/s after 5 s (hand-computed walls).
    configs = [bench.Config.parse(c) for c in ("1x1", "2x1", "1x2")]
    walls = {"1x1": {10: 12.0, 110: 112.0}, "2x1": {10: 15.0, 110: 65.0}, "1x2": {10: 11.25, 110: 73.75}}
    got = bench.scaling(walls, configs, 10, 110)
    want = {  # steady images/s, start-up s, speed-up, efficiency per core, end-to-end speed-up
        "1x1": (1.0, 2.0, 1.0, 1.0, 1.0),
        "2x1": (2.0, 10.0, 2.0, 1.0, 112.0 / 65.0),
        "1x2": (1.6, 5.0, 1.6, 0.8, 112.0 / 73.75),
    }
    for name, (steady, startup, speedup, efficiency, e2e) in want.items():
        row = got[name]
        assert row["steady_images_per_s"] == pytest.approx(steady) and row["startup_s"] == pytest.approx(startup)
        assert row["speedup"] == pytest.approx(speedup) and row["efficiency"] == pytest.approx(efficiency)
        assert row["end_to_end_speedup"] == pytest.approx(e2e)
    # The equality check: 5e-7 relative passes, 2e-6 relative fails, a different image count fails.
    base = {"num_images": 8, "distance_px": [[100.0, 50.0]], "std_px": [[1.0, 2.0]], "prefix_mass": [[0.1, 0.2]]}
    close = base | {"distance_px": [[100.0 * (1 + 5e-7), 50.0]]}
    off = base | {"distance_px": [[100.0, 50.0 * (1 + 2e-6)]]}
    fewer = base | {"num_images": 7}
    diff = bench.differences({"1x1": base, "2x1": close, "3x1": off, "4x1": fewer}, "1x1")
    assert diff["2x1"]["distance_px"]["max_abs"] == pytest.approx(5e-5)
    assert diff["3x1"]["distance_px"]["max_rel"] == pytest.approx(2e-6)
    assert bench.equal_within(diff, 1e-6, ["2x1"])
    assert not bench.equal_within(diff, 1e-6, ["2x1", "3x1"]) and not bench.equal_within(diff, 1e-6, ["4x1"])


@pytest.mark.slow
def test_distributed_benchmark_runs_the_cli_under_torchrun(tmp_path):
    from benchmarks import distributed as bench

    # 8 images, 2 ranks, batch 2: each rank's batches are the single process's, so even std_px agrees to 1e-6.
    argv = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-images", "8", "--startup-images", "4"]
    argv += ["--batch-size", "2", "--rounds", "1", "--configs", "1x1,2x1", "--out", str(tmp_path)]
    report = bench.main(argv)
    assert report["equal"] and set(report["scaling"]) == {"1x1", "2x1"}
    for key in bench.COMPARED:
        assert report["differences"]["2x1"][key]["max_rel"] <= 1e-6, key
    assert all(len(t) == 1 and t[0] > 0 for by_n in report["wall_s"].values() for t in by_n.values())
    saved = json.loads((tmp_path / "distributed.json").read_text())
    assert saved["scaling"]["2x1"]["processes"] == 2 and saved["settings"]["num_images"] == 8
    md = (tmp_path / "distributed.md").read_text()
    assert "| 2 × 1 |" in md and ": equal." in md
