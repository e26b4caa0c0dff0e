"""A built wheel carries the data the package needs at run time (zoo, families, blocks, status, search spaces,
latency profiles)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_finds_its_yaml_without_the_source_tree(tmp_path: Path) -> None:
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("metaformer_lab-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import metaformer_lab as ml, metaformer_lab.spec.load as L;"
             "assert L.data_dir('blocks') == L.PACKAGE_DIR / 'blocks', L.data_dir('blocks');"
             "assert len(ml.list_models()) >= 60;"
             "import metaformer_lab.space as S;"
             "assert S.space_names() == ['metaformer', 'tiny'], S.space_names();"
             "assert len(S.load_space('tiny').references) >= 4;"
             "import metaformer_lab.latency as T;"
             "names = sorted(p.name for p in T.shipped_profiles());"
             "assert names == ['cpu-metaformer-1t', 'cpu-tiny-1t'], names;"
             "spec = ml.load_spec('caformer_s18');"
             "print(spec.stages[2].block[0].token_mixer.type, ml.build(spec).__class__.__name__)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["attention", "Network"]
