"""`metaformer-lab latency ...`: a spec measured, predicted and estimated; profiles listed, calibrated, resumed
and evaluated; bad settings refused with one `path: message` line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import OTHER_CPU_FAST, PROFILE_CPU
from typer.testing import CliRunner

from metaformer_lab.cli import app
from metaformer_lab.latency.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "tiny_caformer.yaml")
runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@OTHER_CPU_FAST
def test_a_spec_is_measured_and_predicted_from_the_matching_profile(host_cpu: str) -> None:
    """On either CPU model the shipped profile predicts, fitted to this host; the check names both models."""
    code, out, err = run("latency", TINY, "--profile", "auto", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["measured_ms"] > 0 and report["measurement"]["runs"] >= 10
    assert report["measurement"]["p10_ms"] <= report["measured_ms"] <= report["measurement"]["p90_ms"]
    assert report["prediction"]["profile"] == "cpu-tiny-1t" and report["predicted_ms"] > 0
    assert report["settings"]["threads"] == 1 and report["settings"]["input_size"] == [32, 32]
    assert report["estimated_ms"] is None
    check = report["host_check"]
    assert check["host"] == host_cpu and check["made_on"] == PROFILE_CPU
    assert report["prediction"]["host_scale"] == check["scale"]
    assert (f"(made on {PROFILE_CPU}; this host: {host_cpu})" in report["host_line"]) == (host_cpu != PROFILE_CPU)
    assert report["measurement"]["provenance"]["device_name"] == host_cpu


def test_without_a_host_check_only_a_profile_of_this_cpu_predicts(host_cpu: str) -> None:
    """--no-measure measures nothing, the host check included: a profile made on another CPU model does not
    fit, and the near match says why."""
    code, out, err = run("latency", TINY, "--profile", "auto", "--no-measure", "--json")
    if host_cpu == PROFILE_CPU:
        assert code == 0, err
        report = json.loads(out)
        assert report["prediction"]["profile"] == "cpu-tiny-1t" and report["prediction"]["host_scale"] == 1.0
        assert report["measured_ms"] is None and "host_check" not in report
    else:
        assert code == 1 and "Traceback" not in out + err
        assert err.splitlines()[0].startswith("--profile: no shipped profile matches"), err
        assert f"near match 'cpu-tiny-1t': differs in device_name {PROFILE_CPU} (want {host_cpu})" in err


def test_a_spec_is_measured_without_a_profile() -> None:
    code, out, err = run("latency", TINY)
    assert code == 0, err
    assert "measured" in out and "ms median" in out and "predicted" not in out


def test_a_named_gpu_gives_an_estimate_labelled_by_where_its_factors_come_from() -> None:
    """float16 on a GPU without a table: factors fitted on the calibrated GPUs, named; float32: nothing was
    fitted, uncalibrated."""
    code, out, err = run("latency", "vit_small_patch16_224", "--device", "h100", "--no-measure", "--dtype",
                         "float16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["measured_ms"] is None and report["predicted_ms"] is None
    assert report["estimated_ms"] > 0 and not report["estimate"]["calibrated"]
    assert report["label"] == ("estimated from datasheet, factors fitted on rtx3090, rtx5090, rtx-pro-6000; "
                               "extrapolated to batch 1")  # the tables are at batch 256-2048
    code, out, _ = run("latency", "vit_small_patch16_224", "--device", "h100", "--no-measure")
    assert code == 0 and "uncalibrated estimate" in out


@pytest.mark.parametrize(("args", "line"), [
    (["--device", "h10", "--no-measure"], "gpu: unknown 'h10' (did you mean 'h100'?)"),
    (["--no-measure"], "--no-measure: nothing to report"),
    (["--profile", "auto", "--threads", "3", "--no-measure"], "--profile: no shipped profile matches"),
    (["--profile", "cpu-metaformer-1t", "--no-measure"], "input.size: the spec's input is 32x32"),
    (["--profile", "cpu-tiny-1"], "cpu-tiny-1: no such profile file, and no shipped profile of that name "
                                  "(did you mean 'cpu-tiny-1t'?)"),
])
def test_bad_settings_are_one_line_each(args: list[str], line: str) -> None:
    code, out, err = run("latency", TINY, *args)
    assert code == 1 and "Traceback" not in out + err
    assert err.splitlines()[0].startswith(line), err


def test_profiles_are_listed_with_their_accuracy() -> None:
    code, out, err = run("latency", "profiles", "--json")
    assert code == 0, err
    listed = {p["name"]: p for p in json.loads(out)}
    assert {"cpu-tiny-1t", "cpu-metaformer-1t"} <= set(listed)
    assert listed["cpu-tiny-1t"]["accuracy"]["n"] >= 100
    assert "models" not in listed["cpu-tiny-1t"]["fit"]  # the summary leaves the fit's raw data out
    code, out, _ = run("latency", "profiles")
    assert code == 0 and "cpu-metaformer-1t" in out


def test_evaluate_refuses_the_calibration_seeds() -> None:
    seeds = load_profile(ROOT / "metaformer_lab" / "latency" / "profiles" / "cpu-tiny-1t.json").fit["calibration"]
    code, _, err = run("latency", "evaluate", "--profile", "cpu-tiny-1t", "--space", "tiny", "--seed",
                       str(seeds["seeds"][0]), "--n", "8")
    assert code == 1 and "--seed" in err.splitlines()[0] and "calibrat" in err, err


@pytest.mark.slow
@pytest.mark.serial  # most of its networks must be timed on a quiet machine
def test_calibrate_resume_and_evaluate_a_small_profile(tmp_path: Path) -> None:
    out = tmp_path / "mini.json"
    args = ["latency", "calibrate", "--space", "tiny", "--out", str(out), "--ops-archs", "4", "--fit-archs", "8",
            "--passes", "1", "--seed", "5", "--model-seconds", "0.5"]
    code, stdout, err = run(*args)
    assert code == 0, err
    profile = load_profile(out)
    quiet = [m for m in profile.fit["models"].values() if not m["noisy"]]
    assert len(profile.fit["models"]) == 8 and profile.correction is not None
    assert profile.fit["archs"] == len(quiet) >= 6  # a network measured while the machine was busy is left out
    assert profile.fit["calibration"]["seeds"] == [5, 6] and len(profile.ops) > 20
    assert profile.fit["calibration"]["model_seconds"] == 0.5
    before = dict(profile.ops)
    code, _, err = run(*args, "--resume")  # everything is there: nothing is timed again
    assert code == 0, err
    assert load_profile(out).ops == before
    code, _, err = run("latency", "calibrate", "--space", "tiny", "--out", str(out), "--threads", "2", "--resume")
    assert code == 1 and "other settings: threads" in err, err
    code, stdout, err = run("latency", "evaluate", "--profile", str(out), "--space", "tiny", "--n", "5",
                            "--seed", "50", "--json", "--plot", str(tmp_path / "scatter.png"))
    assert code == 0, err
    report = json.loads(stdout)
    assert report["n"] == 5 and 0 <= report["within_10"] <= 1 and report["mape"] >= 0
    assert (tmp_path / "scatter.png").stat().st_size > 10_000
