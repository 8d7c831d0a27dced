"""Every shipped preset resumes bit for bit (issue 29, item 1). The toy presets name their backbones
``repo:checkpoints/toy/...`` while a checkpoint's config holds the absolute path: --resume compares what the
backbones are (a fingerprint of their files), not how the path is spelled, and still refuses a different one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fromage_gill.checkpoint import read_native
from fromage_gill.cli import main
from fromage_gill.paths import checkout_path
from fromage_gill.training.checkpoints import BACKBONES, CHECKPOINTS
from fromage_gill.training.loop import TrainConfig, train
from fromage_gill.training.synthetic import make_shapes


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 12, fmt="tsv")


def cli_train(model, data, out, steps, *extra):
    argv = ["train", "--model", model, "--data", str(data), "--out", str(out), "--max-steps", str(steps)]
    argv += ["--batch-size", "4", "--val-fraction", "0", "--save-every", "2", "--lr", "1e-2", "--no-progress"]
    assert main([*argv, *extra]) == 0


@pytest.mark.parametrize("preset", ["toy-fromage", "toy-gill"])
def test_a_toy_preset_resumes_bit_for_bit_from_the_cli(preset, shapes, tmp_path):
    cli_train(preset, shapes, tmp_path / "straight", 4)
    cli_train(preset, shapes, tmp_path / "halves", 2)
    saved = json.loads((tmp_path / "halves" / CHECKPOINTS / "step-0000002" / "config.json").read_text())
    assert saved["lm"]["source"] == checkout_path("repo:checkpoints/toy/lm")  # the spelling differs from the preset
    cli_train(preset, shapes, tmp_path / "halves", 4, "--resume", str(tmp_path / "halves"))
    a = read_native(tmp_path / "straight" / "model.safetensors")
    b = read_native(tmp_path / "halves" / "model.safetensors")
    start = read_native(tmp_path / "halves" / CHECKPOINTS / "step-0000002" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit, not approximately
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the resumed half trained: not a comparison of copies


def run(data, out, **kw):
    kw = dict(batch_size=4, warmup=0, val_fraction=0.0, progress=False, tensorboard=False, save_every=1) | kw
    return train(TrainConfig(data=str(data), out=str(out), **kw))


def config_with_lm(tmp_path, lm: str) -> str:
    """The toy-fromage preset with its LM at ``lm``, as a config file."""
    from fromage_gill.config import load_preset

    cfg = load_preset("toy-fromage").to_dict()
    cfg["lm"]["source"] = lm
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_the_same_backbone_elsewhere_resumes_and_a_different_one_is_refused(shapes, tmp_path):
    lm = checkout_path("repo:checkpoints/toy/lm")
    run(shapes, tmp_path / "run", model="toy-fromage", max_steps=1)
    assert json.loads((tmp_path / "run" / CHECKPOINTS / "step-0000001" / BACKBONES).read_text())["lm.source"]
    copy = tmp_path / "copy-of-lm"
    shutil.copytree(lm, copy)
    run(shapes, tmp_path / "run", model=config_with_lm(tmp_path, str(copy)), max_steps=2, resume=str(tmp_path / "run"))

    # the same files with other weights (one value changed) are another backbone, whatever the path says
    other = tmp_path / "other-lm"
    shutil.copytree(lm, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first].clone()
    weights[first].view(-1)[0] += 1.0
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"written by another model \('toy-fromage', differing in lm\)"):
        run(
            shapes,
            tmp_path / "run",
            model=config_with_lm(tmp_path, str(other)),
            max_steps=3,
            resume=str(tmp_path / "run"),
        )
    # and a checkpoint whose LM folder was later replaced in place is refused too: the fingerprint was stored
    shutil.rmtree(copy)
    shutil.copytree(other, copy)
    with pytest.raises(ValueError, match="differing in lm"):
        run(
            shapes,
            tmp_path / "run",
            model=config_with_lm(tmp_path, str(copy)),
            max_steps=3,
            resume=str(tmp_path / "run"),
        )
