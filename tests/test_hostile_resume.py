"""Resuming from a checkpoint folder someone else made never runs its code: every resume file loads with
``weights_only=True``; a file that needs a full unpickle is refused unless ``--trust-pickle`` (issue 17, finding 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fromage_gill.cli import main
from fromage_gill.magic.simctg import SimCTGConfig, train_lm
from fromage_gill.resume_state import UnsafeStateError, load_state
from fromage_gill.training.checkpoints import CHECKPOINTS
from fromage_gill.training.loop import TrainConfig, train
from fromage_gill.training.synthetic import make_shapes


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Hostile:
    """Unpickling this writes a marker file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def run(data, out, **kw):
    kw = dict(model="tiny-fromage", batch_size=4, warmup=0, val_fraction=0.0, progress=False, tensorboard=False) | kw
    return train(TrainConfig(data=str(data), out=str(out), save_every=2, **kw))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), 16, fmt="tsv")


def test_train_checkpoints_load_with_weights_only(shapes, tmp_path):
    run(shapes, tmp_path / "run", max_steps=2)
    step = tmp_path / "run" / CHECKPOINTS / "step-0000002"
    for name in ("trainer_state.pt", "rng-0.pt"):
        state = torch.load(step / name, map_location="cpu", weights_only=True)  # raises on anything pickled
        assert isinstance(state, dict)


@pytest.mark.parametrize("name", ["rng-0.pt", "trainer_state.pt"])
def test_train_resume_refuses_a_hostile_pickle(shapes, tmp_path, name, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    run(shapes, out, max_steps=2)
    torch.save(Hostile(marker), out / CHECKPOINTS / "step-0000002" / name)
    with pytest.raises(UnsafeStateError, match=f"{name}.*--trust-pickle"):
        run(shapes, out, max_steps=4, resume=str(out))
    assert not marker.exists()
    argv = ["train", "--model", "tiny-fromage", "--data", str(shapes), "--out", str(out), "--resume", str(out)]
    assert main([*argv, "--batch-size", "4", "--max-steps", "4", "--no-progress"]) == 2  # the CLI: one clear line
    assert "--trust-pickle" in capsys.readouterr().err and not marker.exists()
    # behind the flag the file is unpickled (the marker proves it), then refused for not being a state dict
    with pytest.raises((ValueError, TypeError)):
        run(shapes, out, max_steps=4, resume=str(out), trust_pickle=True)
    assert marker.read_text() == "pwned"


def test_an_older_pickled_rng_state_resumes_only_with_trust_pickle_and_exactly(shapes, tmp_path):
    straight = run(shapes, tmp_path / "a", max_steps=4, concat_prob=1.0)
    run(shapes, tmp_path / "b", max_steps=2, concat_prob=1.0)
    rng_file = tmp_path / "b" / CHECKPOINTS / "step-0000002" / "rng-0.pt"
    new = load_state(rng_file)
    np_state = new["numpy"]
    old = dict(new)  # the format earlier versions wrote: numpy's state tuple, an ndarray inside (a pickle)
    old["numpy"] = (
        np_state["name"],
        np_state["key"].numpy().astype(np.uint32),
        np_state["pos"],
        np_state["has_gauss"],
        np_state["cached_gaussian"],
    )
    torch.save(old, rng_file)
    with pytest.raises(UnsafeStateError, match="older fromage-gill"):
        run(shapes, tmp_path / "b", max_steps=4, resume=str(tmp_path / "b"), concat_prob=1.0)
    second = run(shapes, tmp_path / "b", max_steps=4, resume=str(tmp_path / "b"), concat_prob=1.0, trust_pickle=True)
    assert [h["total"] for h in second.history] == pytest.approx([h["total"] for h in straight.history[2:]])
    # and the checkpoint it wrote is in the safe format again
    torch.load(tmp_path / "b" / CHECKPOINTS / "step-0000004" / "rng-0.pt", weights_only=True)


def test_train_lm_resume_refuses_a_hostile_pickle(tmp_path, capsys):
    data = tmp_path / "captions.txt"
    data.write_text("\n".join(f"a {c} dog on the {p}" for c in ("red", "blue", "big") for p in ("grass", "road")))
    out, marker = tmp_path / "run", tmp_path / "marker"
    common = dict(model="tiny-magic", data=str(data), batch_size=6, save_every=1, progress=False)
    train_lm(SimCTGConfig(out=str(out), max_steps=1, **common))
    state = out / CHECKPOINTS / "step-0000001" / "trainer_state.pt"
    assert set(torch.load(state, weights_only=True)) == {"optimizer", "scheduler", "step", "rng"}
    torch.save(Hostile(marker), state)
    with pytest.raises(UnsafeStateError, match="trainer_state.pt.*--trust-pickle"):
        train_lm(SimCTGConfig(out=str(out), max_steps=2, resume=str(out), **common))
    assert not marker.exists()
    argv = ["train-lm", "--model", "tiny-magic", "--data", str(data), "--out", str(out), "--resume", str(out)]
    assert main([*argv, "--batch-size", "6", "--max-steps", "2", "--no-progress"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not marker.exists()
    with pytest.raises(ValueError, match="not a resume state dict"):
        train_lm(SimCTGConfig(out=str(out), max_steps=2, resume=str(out), trust_pickle=True, **common))
    assert marker.read_text() == "pwned"
