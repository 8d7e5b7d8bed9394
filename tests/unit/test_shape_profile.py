"""Shapes, machines and profiles: parsing, feasible shapes, the JSON format, interpolation, the plot."""

from __future__ import annotations

import json

import pytest

from scalellm.config import EngineConfig
from scalellm.shape.profile import Profile, ProfilePoint, ShapeProfile, plot_profile
from scalellm.shape.profiling import profile_from_aggregates, serve_command, shape_list
from scalellm.shape.shape import Machine, Shape


@pytest.mark.parametrize("text, shape", [("2x1", Shape(2, 1)), (" 1X2 ", Shape(1, 2)), ("4×2", Shape(4, 2))])
def test_shape_parses_and_labels(text, shape):
    assert Shape.parse(text) == shape
    assert Shape.parse(shape.label) == shape


@pytest.mark.parametrize("text", ["2", "x1", "2x", "0x2", "2x0", "two by one", "auto"])
def test_bad_shapes_are_refused(text):
    with pytest.raises(ValueError):
        Shape.parse(text)


@pytest.mark.parametrize("units, shapes", [
    (1, ["1x1"]), (2, ["1x2", "2x1"]), (4, ["1x4", "2x2", "4x1"]), (6, ["1x6", "2x3", "3x2", "6x1"]),
    (16, ["1x16", "2x8", "4x4", "8x2"]),  # at most 8 replicas
])
def test_feasible_shapes_use_every_unit(units, shapes):
    assert [s.label for s in Machine("cpu", units).feasible_shapes()] == shapes


def test_cpu_shapes_set_threads_and_gpu_shapes_split_the_devices():
    cpu, gpu = Machine("cpu", 2), Machine("cuda", 4)
    assert cpu.apply(Shape(2, 1), EngineConfig(num_threads=7)).num_threads == 1
    assert cpu.replica_env(Shape(2, 1), 1) == {}
    assert gpu.apply(Shape(2, 2), EngineConfig()).tensor_parallel_size == 2
    assert [gpu.replica_env(Shape(2, 2), i) for i in range(2)] == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                                                   {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert gpu.fits(Shape(4, 1)) and not gpu.fits(Shape(4, 2))
    with pytest.raises(ValueError):
        Machine("tpu", 1)


def point(concurrency: int, tokens_per_s: float, e2e_ms: float = 100.0) -> ProfilePoint:
    return ProfilePoint(concurrency, tokens_per_s, tokens_per_s / 64, 10, 20, 5, 8, e2e_ms, 2 * e2e_ms)


def two_shapes() -> Profile:
    return Profile((ShapeProfile(Shape(1, 2), (point(16, 160, 6000), point(1, 40, 1600), point(4, 110, 2300))),
                    ShapeProfile(Shape(2, 1), (point(1, 30, 2100), point(4, 120, 2100), point(16, 320, 3200)))),
                   model="m", device="cpu", num_units=2, workload="w", created="t")


def test_prediction_interpolates_in_log_concurrency_and_holds_at_the_ends():
    entry = two_shapes().get(Shape(1, 2))
    assert [p.concurrency for p in entry.points] == [1, 4, 16]  # sorted
    assert entry.predict("output_throughput", 2) == pytest.approx(75.0)  # halfway between 1 and 4 in log2
    assert entry.predict("output_throughput", 8) == pytest.approx(135.0)
    assert entry.predict("output_throughput", 0) == 40 and entry.predict("output_throughput", 0.5) == 40
    assert entry.predict("output_throughput", 1000) == 160
    assert entry.predict("e2e_p50_ms", 4) == 2300


def test_profile_round_trips_through_json(tmp_path):
    path = tmp_path / "profile.json"
    two_shapes().save(path)
    document = json.loads(path.read_text())
    assert document["version"] == 1 and document["shapes"][1]["shape"] == "2x1"
    assert Profile.load(path) == two_shapes()


@pytest.mark.parametrize("document, message", [
    ({"shapes": []}, "version-1 profile"),
    ({"version": 1, "shapes": []}, "at least one shape"),
    ({"version": 1}, "malformed"),
    ({"version": 1, "shapes": [{"shape": "1x2", "points": []}]}, "no measured points"),
    ({"version": 1, "shapes": [{"shape": "1x2", "points": [{"concurrency": 1}]}]}, "malformed"),
    ({"version": 1, "shapes": [{"shape": "1y2", "points": []}]}, "REPLICASxPARALLEL"),
])
def test_malformed_profiles_are_refused(document, message):
    with pytest.raises(ValueError, match=message):
        Profile.from_json(document)


def test_invalid_points_and_duplicates_are_refused():
    with pytest.raises(ValueError, match="output_throughput"):
        ProfilePoint(1, -5.0, 1, 1, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="concurrency >= 1"):
        point(0, 10)
    with pytest.raises(ValueError, match="twice"):
        ShapeProfile(Shape(1, 2), (point(1, 10), point(1, 20)))
    entry = ShapeProfile(Shape(1, 2), (point(1, 10),))
    with pytest.raises(ValueError, match="shape twice"):
        Profile((entry, entry))


def test_load_reports_missing_and_non_json_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        Profile.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not JSON"):
        Profile.load(tmp_path / "bad.json")


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "profile.png"
    plot_profile(two_shapes(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_from_bench_aggregates_takes_the_medians():
    summary = {"output_throughput": 40.0, "request_throughput": 0.6, "median_ttft_ms": 90.0, "p99_ttft_ms": 120.0,
               "median_tpot_ms": 24.0, "p99_tpot_ms": 30.0, "median_e2el_ms": 1600.0, "p99_e2el_ms": 1900.0,
               "failed": 0}
    aggregates = [{"system": label, "concurrency": c,
                   "metrics": {k: {"median": v * c, "min": 0, "max": 0} for k, v in summary.items()}}
                  for label in ("1x2", "2x1") for c in (1, 4)]
    profile = profile_from_aggregates(aggregates, Machine("cpu", 2), "w", "m")
    assert [e.shape.label for e in profile.shapes] == ["1x2", "2x1"]
    assert profile.get(Shape(2, 1)).points[1] == ProfilePoint(4, 160.0, 2.4, 360.0, 480.0, 96.0, 120.0, 6400.0, 7600.0)
    assert (profile.model, profile.device, profile.num_units) == ("m", "cpu", 2)


def test_profile_flags_name_the_shape_and_pass_the_engine_flags():
    from scalellm.cli import build_parser

    args = build_parser("profile").parse_args(["profile", "/m", "--quantization", "int8", "--shapes", "2x1,1x2"])
    assert args.shapes == (Shape(2, 1), Shape(1, 2)) and args.concurrency == (1, 4, 16, 64)
    command = serve_command(args, Shape(2, 1))
    assert "serve --port {port} --shape 2x1" in command and "/m" in command and "--quantization int8" in command
    assert "--num-threads" not in command
    with pytest.raises(Exception):
        shape_list("2x1,banana")


@pytest.mark.parametrize("flags", [["--replicas", "2"], ["--num-threads", "2"], ["--profile", "p.json"]])
def test_serve_shape_refuses_conflicting_flags(flags, capsys):
    from scalellm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--engine", "mock", "--shape", "2x1", *flags])
    assert exit_info.value.code == 2
    assert "--shape" in capsys.readouterr().err
