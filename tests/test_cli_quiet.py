"""The everyday commands print what the user asked for and nothing else: no bitsandbytes kernel warning, no faiss
loader lines, whatever libraries the package imports; and ``generate`` writes its images into a folder it names,
not among the user's files. Each runs as a user runs it: a subprocess, in a fresh folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("bitsandbytes", "kernels-community", "gemm_4bit", "ModuleNotFoundError", "faiss.loader", "AVX")


def run(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    code = "import sys; from fromage_gill.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    noise = [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, f"`fromage-gill {' '.join(argv)}` printed: {noise}"
    return done


def test_presets_prints_no_import_noise(tmp_path):
    assert "tiny-gill" in run(tmp_path, "presets").stdout


@pytest.mark.slow
def test_generate_prints_no_noise_and_writes_images_into_a_named_folder(tmp_path):
    args = ["--model", "tiny-gill", "--text", "draw", "--mode", "generate", "--image-logit-bias", "20"]
    done = run(tmp_path, "generate", *args, "--max-images", "1", "--max-new-tokens", "3", "--steps", "1")
    assert not list(tmp_path.glob("*.png")), "nothing written among the user's files"
    images = list((tmp_path / "fromage-gill-images").glob("*.png"))
    assert len(images) == 1 and "fromage-gill-images/answer-image1.png" in done.stdout, done.stdout
    out = tmp_path / "mine"
    run(tmp_path, "generate", *args, "--max-images", "1", "--max-new-tokens", "3", "--steps", "1", "--out", str(out))
    assert [p.name for p in out.glob("*.png")] == ["answer-image1.png"]


@pytest.mark.slow
def test_index_search_prints_no_faiss_noise(tmp_path):
    index = ROOT / "assets" / "indexes" / "tiny-gill"
    done = run(tmp_path, "index", "search", str(index), "--model", "tiny-gill", "--text", "a cat", "-k", "2")
    assert done.stdout.strip(), "the results are printed"
