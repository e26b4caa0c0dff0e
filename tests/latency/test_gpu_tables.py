"""GPU efficiency factors from published benchmark tables (timm's format): reading and refusing tables, the fit
recovering known factors from a table the estimator itself synthesised, the shipped GPU profiles and their labels,
and the command line (`latency calibrate --from-table`, `latency SPEC --device GPU`, `latency profiles`)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metaformer_lab.cli import app
from metaformer_lab.core.errors import LatencyError
from metaformer_lab.latency.gpu import GPUS, UNCALIBRATED, Efficiency, estimate_gpu, gpu_spec
from metaformer_lab.latency.gpu_calibrate import (
    GPU_PROFILES_DIR,
    SHIPPED_TABLES,
    TABLES_DIR,
    Point,
    RecordStore,
    TableRow,
    calibrate_from_table,
    gpu_efficiency,
    load_gpu_profile,
    map_rows,
    predict_points,
    read_table,
    shipped_gpu_profiles,
    table_source,
)

runner = CliRunner()
HEADER = "model,infer_img_size,infer_samples_per_sec,infer_step_time,infer_batch_size,param_count,infer_gmacs," \
         "infer_macts"
CALIBRATED_GPUS = ("rtx3090", "rtx5090", "rtx-pro-6000")


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _write(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# --- bad tables ---------------------------------------------------------------------------------------

GOOD = ["poolformer_s12,224,5000.0,204.8,1024,11.92,1.82,5.53",
        "vit_tiny_patch16_224,224,20000.0,51.2,1024,5.7,1.26,5.97"]
BAD_TABLES = {
    "unknown model": ([*GOOD, "poolformer_s13,224,5000.0,204.8,1024,11.92,1.82,5.53"], HEADER,
                      "line 4: 'poolformer_s13' is not a timm model (did you mean"),
    "missing column": (["poolformer_s12,224,5000.0,1024,11.92,1.82,5.53"],
                       HEADER.replace("infer_step_time,", ""), "has no column 'infer_step_time'"),
    "non-numeric step time": ([GOOD[0], "vit_tiny_patch16_224,224,20000.0,fast,1024,5.7,1.26,5.97"], HEADER,
                              "line 3 (vit_tiny_patch16_224): infer_step_time 'fast' is not a positive number"),
    "duplicate row": ([*GOOD, "poolformer_s12,224,5100.0,200.8,1024,11.92,1.82,5.53"], HEADER,
                      "line 4 repeats line 2 (poolformer_s12 at 224 px)"),
    "empty file": ([], "", "is empty"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_a_bad_table_gives_one_line_exit_1_and_no_profile(tmp_path: Path, case: str) -> None:
    rows, header, message = BAD_TABLES[case]
    table = tmp_path / "table.csv"
    if header:
        _write(table, rows, header)
    else:
        table.write_text("")
    out = tmp_path / "profile.json"
    code, stdout, stderr = run("latency", "calibrate", "--from-table", str(table), "--device", "rtx5090", "--out",
                               str(out))
    assert code == 1 and "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{table}: ") and message in lines[0], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_a_good_table_reads_and_rows_outside_the_zoo_are_skipped(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", [*GOOD, "resnet50,224,3000.0,341.3,1024,25.6,4.1,11.1",
                                        "swin_tiny_patch4_window7_224,256,3000.0,341.3,1024,28.3,5.9,18.7",
                                        "vit_tiny_patch16_224,384,5000.0,204.8,1024,5.7,1.26,5.97"])
    rows = read_table(table)
    assert [r.model for r in rows] == ["poolformer_s12", "vit_tiny_patch16_224", "resnet50",
                                       "swin_tiny_patch4_window7_224", "vit_tiny_patch16_224"]
    assert rows[0] == TableRow(2, "poolformer_s12", 224, 1024, 204.8)
    points, skipped = map_rows(rows, "rtx5090", path=str(table))
    assert [(p.zoo, p.row.img_size, p.family) for p in points] == [
        ("poolformer_s12", 224, "metaformer"), ("vit_tiny_patch16_224", 224, "vit"),
        ("vit_tiny_patch16_224", 384, "vit")]
    assert [(s.line, s.model, s.reason) for s in skipped][0] == (4, "resnet50", "no zoo model")
    assert skipped[1].model == "swin_tiny_patch4_window7_224" and skipped[1].img_size == 256
    assert "7 does not divide the 64x64 feature map" in skipped[1].reason  # never guessed: listed with its reason


def test_a_table_no_row_of_which_the_zoo_expresses_is_refused(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", ["resnet50,224,3000.0,341.3,1024,25.6,4.1,11.1"])
    with pytest.raises(LatencyError, match="none of its 1 rows names a zoo model"):
        calibrate_from_table(table, "rtx5090")


def test_the_shipped_tables_provenance_comes_from_their_readme() -> None:
    src = table_source(TABLES_DIR / SHIPPED_TABLES["rtx3090"])
    assert (src.torch, src.cuda) == ("2.4.0", "12.4")
    assert "5c33776aa59f0f05bfb8008ff546ed4c09083f1a" in src.source and "RTX 3090" in src.source
    assert src.date == "2024-09-04"
    assert (TABLES_DIR / "README.md").is_file()


# --- the fit recovers known factors -------------------------------------------------------------------

TRUTH = Efficiency(compute={"matmul": 0.61, "conv": 0.47, "dwconv": 0.19, "attention": 0.52},
                   memory={"matmul": 0.72, "conv": 0.41, "dwconv": 0.46, "attention": 0.63, "norm": 0.52,
                           "softmax": 0.38, "reduction": 0.33, "elementwise": 0.74, "copy": 0.57}, launch_us=4.2,
                   sharpness=2.0)
"""Known factors, none of them a default."""


@pytest.mark.slow
def test_the_fit_recovers_the_factors_of_a_table_the_estimator_synthesised(tmp_path: Path) -> None:
    """Step times made by the estimator at known factors on an H100 datasheet, every zoo model that is a timm
    model at its own input size, batches 1 to 1024 (launch-, memory- and compute-bound rows), written as a timm
    table: `latency calibrate --from-table` (with a weak pull towards the defaults) finds every factor that governs
    at least 0.5 % of the time within 2 %, and reproduces the step times."""
    from metaformer_lab.latency.gpu_calibrate import _zoo_by_timm
    from metaformer_lab.spec.load import read_spec

    gpu = gpu_spec("h100")
    store = RecordStore()
    batches = (1, 4, 16, 64, 256, 1024)
    zoo = _zoo_by_timm()
    rows = [TableRow(i + 2, name, read_spec(zoo[name][0]).input.hw[0], batches[i % len(batches)], 1.0)
            for i, name in enumerate(sorted(zoo))]
    assert len(rows) >= 50
    points = [Point(r, _zoo_by_timm()[r.model][0], "", gpu.name) for r in rows]
    kernels = [store.get(p, "float16") for p in points]
    measured = predict_points(kernels, [gpu] * len(points), TRUTH, "float16")
    table = _write(tmp_path / "synthetic.csv", [f"{r.model},{r.img_size},{r.batch_size / ms * 1e3!r},{ms!r},"
                                                f"{r.batch_size},0,0,0" for r, ms in zip(rows, measured, strict=True)])
    out = tmp_path / "fitted.json"
    code, stdout, err = run("latency", "calibrate", "--from-table", str(table), "--device", "h100", "--out", str(out),
                            "--prior-weight", "0.001")
    assert code == 0, err
    fitted = load_gpu_profile(out)
    got = fitted.efficiency
    checked = {}
    for key, share in fitted.fit["governed_share"].items():
        if share < 0.005:
            continue
        kind, _, cls = key.partition(".")
        truth = TRUTH.launch_us if kind == "launch" else (TRUTH.compute if kind == "compute" else TRUTH.memory)[cls]
        value = got.launch_us if kind == "launch" else (got.compute if kind == "compute" else got.memory)[cls]
        checked[key] = value / truth
    assert {"compute.matmul", "compute.dwconv", "memory.conv", "memory.norm", "memory.elementwise", "memory.copy",
            "launch"} <= set(checked), fitted.fit["governed_share"]
    assert all(abs(r - 1) <= 0.02 for r in checked.values()), checked
    assert fitted.fit["in_sample"]["mape"] < 0.002


def test_pooled_factors_scale_the_tensor_core_peak_by_power_per_tflops() -> None:
    eff = Efficiency(power_exponent=0.5)
    h100 = GPUS["h100"]
    assert h100.watts_per_tflops == pytest.approx(700 / 989.4)
    for cls in ("matmul", "conv", "attention"):
        assert eff.peak_tflops(h100, cls, "float16") == pytest.approx(989.4 * (700 / 989.4) ** 0.5)
    assert eff.peak_tflops(h100, "dwconv", "float16") == h100.fp32_tflops  # CUDA cores: the datasheet's
    assert Efficiency().peak_tflops(h100, "matmul", "float16") == h100.fp16_tflops
    unknown = replace(h100, name="h100-custom", board_power_w=None)
    assert eff.peak_tflops(unknown, "matmul", "float16") == h100.fp16_tflops
    est = estimate_gpu("poolformer_s12", unknown, batch_size=256, efficiency=eff)
    assert any("board power is not known" in n for n in est.notes)
    assert Efficiency.from_json(eff.to_json()) == eff
    with pytest.raises(LatencyError, match="power_exponent"):
        Efficiency(power_exponent=1.5)


@pytest.mark.slow
def test_a_pooled_fit_recovers_a_known_power_exponent() -> None:
    """Step times the estimator made at known factors and power exponent on three datasheets that differ in board
    power per TFLOPS (RTX 3090 4.9 W, RTX 5090 2.7 W, RTX PRO 6000 Max-Q 0.7 W): the pooled fit finds the exponent
    and reproduces the times; on one GPU the exponent is not fitted (it would only rescale every factor)."""
    from metaformer_lab.latency.gpu_calibrate import fit_points, network_kernels

    truth = replace(TRUTH, power_exponent=0.4)
    store = RecordStore()
    models = ["poolformer_s12", "vit_tiny_patch16_224", "convnext_atto", "swin_tiny_patch4_window7_224",
              "pvt_v2_b0", "resmlp_12_224", "caformer_s18", "mixer_s16_224"]
    gpus = [gpu_spec(g) for g in CALIBRATED_GPUS]
    kernels = [network_kernels(m, 224, batch, "float16", store.cache) for m in models for batch in (64, 256)]
    rows = [(k, g) for g in gpus for k in kernels]
    measured = predict_points([k for k, _ in rows], [g for _, g in rows], truth, "float16")
    fit = fit_points([k for k, _ in rows], [g for _, g in rows], measured, power=True, prior_weight=0.001)
    assert fit.efficiency.power_exponent == pytest.approx(0.4, abs=0.02)
    assert max(abs(p / m - 1) for p, m in zip(fit.predicted_ms, measured, strict=True)) < 0.01
    alone = fit_points(kernels, [gpus[0]] * len(kernels), measured[:len(kernels)], power=True)
    assert alone.efficiency.power_exponent is None


def test_the_fit_of_a_small_table_is_calibrated_and_labelled(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", [*GOOD, "convnext_atto,224,30000.0,34.1,1024,3.7,0.55,3.81"])
    profile = calibrate_from_table(table, "rtx5090").profile
    assert profile.kind == "table" and profile.gpu == "rtx5090" and len(profile.rows) == 3
    assert profile.efficiency.calibrated and profile.efficiency.batch_range == (1024, 1024)
    assert profile.efficiency.label == "calibrated on rtx5090 from t.csv (float16, batch 1024)"
    assert set(profile.fit) >= {"in_sample", "leave_one_family_out", "per_family"}
    assert profile.sources[0]["table"] == "t.csv" and len(profile.sources[0]["sha256"]) == 64
    est = estimate_gpu("poolformer_s12", "rtx5090", batch_size=1024, efficiency=profile.efficiency)
    assert est.calibrated and est.label == profile.efficiency.label and est.amp
    assert est.total_ms == pytest.approx(profile.rows[0]["fitted_ms"], rel=1e-3)


# --- shipped profiles ---------------------------------------------------------------------------------


def test_the_three_calibrated_gpus_have_datasheets_and_profiles() -> None:
    profiles = {p.name: p for p in shipped_gpu_profiles()}
    for gpu in CALIBRATED_GPUS:
        assert gpu in GPUS
        p = profiles[f"gpu-{gpu}-float16"]
        assert p.kind == "table" and p.gpu == gpu and p.sources[0]["table"] == SHIPPED_TABLES[gpu]
        assert (TABLES_DIR / SHIPPED_TABLES[gpu]).is_file()
        assert len(p.rows) >= 70 and p.fit["in_sample"]["mape"] < 0.08
        assert p.leave_one_gpu_out["fitted_on"] == [g for g in CALIBRATED_GPUS if g != gpu]
    pooled = profiles["datasheet-float16"]
    assert pooled.kind == "pooled" and pooled.efficiency.fitted_on == CALIBRATED_GPUS
    assert set(pooled.leave_one_gpu_out["per_gpu"]) == set(CALIBRATED_GPUS)
    assert load_gpu_profile(GPU_PROFILES_DIR / "datasheet-float16.json").efficiency == pooled.efficiency


def test_each_gpu_gets_its_own_factors_then_the_pooled_ones_then_none() -> None:
    assert gpu_efficiency("rtx5090", "float16").gpu == "rtx5090"
    assert gpu_efficiency("h100", "float16").fitted_on == CALIBRATED_GPUS
    assert gpu_efficiency("h100", "float32") == Efficiency()
    est = estimate_gpu("caformer_s18", "h100", batch_size=256, efficiency=gpu_efficiency("h100", "float16"))
    assert est.label == "estimated from datasheet, factors fitted on rtx3090, rtx5090, rtx-pro-6000"
    assert not est.calibrated
    own = estimate_gpu("caformer_s18", "rtx5090", batch_size=256, efficiency=gpu_efficiency("rtx5090", "float16"))
    assert own.calibrated and own.label.startswith("calibrated on rtx5090 from ")
    full = estimate_gpu("caformer_s18", "h100", batch_size=256, dtype="float32",
                        efficiency=gpu_efficiency("h100", "float32"))
    assert full.label == UNCALIBRATED


def test_a_shipped_profile_reproduces_its_tables_rows() -> None:
    """The profile's fitted times are what the estimator gives with its factors (no drift between the two)."""
    p = {q.name: q for q in shipped_gpu_profiles()}["gpu-rtx5090-float16"]
    for row in [r for r in p.rows if r["zoo"] in ("poolformer_s12", "vit_small_patch16_224")]:
        est = estimate_gpu(row["zoo"], "rtx5090", batch_size=row["batch_size"], input_size=row["img_size"],
                           efficiency=p.efficiency)
        assert est.total_ms == pytest.approx(row["fitted_ms"], rel=1e-3)


# --- command line -------------------------------------------------------------------------------------


def test_latency_for_a_calibrated_gpu_names_its_calibration() -> None:
    args = ["latency", "caformer_s18", "--device", "rtx5090", "--dtype", "float16", "--batch-size", "256",
            "--no-measure"]
    code, out, err = run(*args)
    assert code == 0, err
    assert "calibrated on rtx5090 from benchmark-infer-amp-nchw-pt291-cu130-5090.csv" in " ".join(out.split())
    code, out, err = run(*args, "--json")
    report = json.loads(out)
    assert report["estimate"]["calibrated"] and report["estimate"]["amp"] and report["estimated_ms"] > 0
    code, out, err = run("latency", "caformer_s18", "--device", "h100", "--dtype", "float16", "--no-measure")
    assert code == 0 and "factors fitted on rtx3090, rtx5090, rtx-pro-6000" in " ".join(out.split())


def test_calibrate_from_a_table_writes_a_profile_that_latency_uses(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.csv", [*GOOD, "resnet50,224,3000.0,341.3,1024,25.6,4.1,11.1"])
    out = tmp_path / "mine.json"
    code, stdout, err = run("latency", "calibrate", "--from-table", str(table), "--device", "rtx-pro-6000", "--out",
                            str(out))
    assert code == 0, err
    assert "2 rows used, 1 skipped" in stdout and "leave-one-family-out" in stdout
    profile = load_gpu_profile(out)
    assert profile.gpu == "rtx-pro-6000" and profile.skipped["no_zoo_model"] == ["resnet50"]
    code, stdout, err = run("latency", "poolformer_s12", "--device", "rtx-pro-6000", "--dtype", "float16",
                            "--batch-size", "1024", "--no-measure", "--profile", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["estimate"]["label"] == profile.efficiency.label
    code, _, err = run("latency", "calibrate", "--from-table", str(table), "--device", "cuda", "--out", str(out))
    assert code == 1 and err.startswith("--device: ")


def test_profiles_lists_the_gpu_profiles_with_their_errors() -> None:
    code, out, err = run("latency", "profiles", "--json")
    assert code == 0, err
    listed = {p["name"]: p for p in json.loads(out)}
    for gpu in CALIBRATED_GPUS:
        entry = listed[f"gpu-{gpu}-float16"]
        assert entry["in_sample"]["mape"] > 0 and entry["leave_one_gpu_out"]["mape"] > 0
    code, out, _ = run("latency", "profiles")
    assert code == 0 and "leave-one-GPU-out" in out and "datasheet-float16" in out


def test_the_shipped_tables_are_what_the_profiles_were_fitted_on() -> None:
    for gpu, name in SHIPPED_TABLES.items():
        with (TABLES_DIR / name).open() as f:
            assert next(csv.reader(f))[:5] == ["model", "infer_img_size", "infer_samples_per_sec", "infer_step_time",
                                              "infer_batch_size"]
        profile = {p.name: p for p in shipped_gpu_profiles()}[f"gpu-{gpu}-float16"]
        assert profile.sources[0]["sha256"] == table_source(TABLES_DIR / name).sha256


def test_an_estimate_outside_the_fitted_batch_range_says_it_extrapolates() -> None:
    """The tables are at batch 256-2048: batch 1 (launch-bound) is an extrapolation, in the label, the estimate's
    JSON and the CLI; inside the range, or with nothing fitted, nothing is said."""
    factors = gpu_efficiency("rtx5090", "float16")
    lo, hi = factors.batch_range or (0, 0)
    assert lo >= 256 and hi >= 1024
    one = estimate_gpu("caformer_s18", "rtx5090", batch_size=1, efficiency=factors)
    assert one.extrapolates is not None and f"outside the fitted batch range {lo}-{hi}" in one.extrapolates
    assert one.label.endswith("; extrapolated to batch 1") and one.to_json()["extrapolates"] == one.extrapolates
    inside = estimate_gpu("caformer_s18", "rtx5090", batch_size=lo, efficiency=factors)
    assert inside.extrapolates is None and "extrapolated" not in inside.label
    assert estimate_gpu("caformer_s18", "t4", batch_size=1, dtype="float32").extrapolates is None
    code, out, err = run("latency", "caformer_s18", "--device", "h100", "--dtype", "float16", "--no-measure")
    assert code == 0 and "extrapolates: batch 1 is outside the fitted batch range" in " ".join(out.split()), err
    code, out, err = run("latency", "caformer_s18", "--device", "h100", "--dtype", "float16", "--no-measure",
                         "--batch-size", "512", "--json")
    assert code == 0 and json.loads(out)["estimate"]["extrapolates"] is None, err


@pytest.mark.slow
def test_the_wheel_carries_the_gpu_profiles_and_tables(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(root), "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("metaformer_lab-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("from metaformer_lab.latency.gpu_calibrate import SHIPPED_TABLES, TABLES_DIR, gpu_efficiency, "
             "shipped_gpu_profiles;"
             "assert all((TABLES_DIR / t).is_file() for t in SHIPPED_TABLES.values());"
             "assert (TABLES_DIR / 'README.md').is_file();"
             "print(sorted(p.name for p in shipped_gpu_profiles()), gpu_efficiency('h100', 'float16').label)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == ("['datasheet-float16', 'gpu-rtx-pro-6000-float16', 'gpu-rtx3090-float16', "
                                  "'gpu-rtx5090-float16'] estimated from datasheet, factors fitted on rtx3090, "
                                  "rtx5090, rtx-pro-6000")


def test_a_gpu_profile_with_a_factor_out_of_range_names_its_file(tmp_path: Path) -> None:
    raw = json.loads((GPU_PROFILES_DIR / "datasheet-float16.json").read_text())
    raw["efficiency"]["power_exponent"] = 2.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    code, out, err = run("latency", "caformer_s18", "--device", "h100", "--no-measure", "--profile", str(bad))
    assert code == 1 and "Traceback" not in out + err
    assert err.strip() == f"{bad}: efficiency.power_exponent: 2.0 must be a number in [0, 1]"
