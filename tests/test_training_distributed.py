"""Two CPU processes (torchrun, gloo; accelerate picks the setup up): identical trained weights, and contrastive
negatives gathered from both."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fromage_gill
from fromage_gill.training.losses import contrastive_loss
from fromage_gill.training.synthetic import make_shapes

WORKER = textwrap.dedent("""
    import os
    import sys

    import torch
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from fromage_gill.training.distributed import gather_with_grad
    from fromage_gill.training.loop import TrainConfig, train
    from fromage_gill.training.losses import contrastive_loss

    torch.set_num_threads(1)
    data, out, port = sys.argv[1], sys.argv[2], sys.argv[3]
    res = train(TrainConfig(model="tiny-fromage", data=data, out=out, max_steps=3, batch_size=4, warmup=0, lr=3e-3,
                            val_fraction=0.2, save_every=3, progress=False, tensorboard=False, cpu=True))
    # train() destroys the process group it created: left alive, gloo's threads abort the process at exit.
    assert not torch.distributed.is_initialized()
    # This script's own group, on a store of its own (a new default group would meet the old one's keys in
    # torchrun's); accelerate picks it up.
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    acc = Accelerator(cpu=True)
    rank = acc.process_index
    save_file({k: v.contiguous() for k, v in res.model.trained_state_dict().items()}, f"{out}/rank{rank}.safetensors")

    # The contrastive loss on gathered embeddings; the ranks hold different numbers of rows on purpose.
    g = torch.Generator().manual_seed(rank)
    n = 3 if rank == 0 else 2
    text = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1).requires_grad_()
    image = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1).requires_grad_()
    all_text, all_image = gather_with_grad(text, acc), gather_with_grad(image, acc)
    loss = contrastive_loss(all_text, all_image, torch.tensor(0.5))
    loss.backward()
    torch.save({"text": text.detach(), "image": image.detach(), "loss": loss.detach(), "grad_text": text.grad,
                "grad_image": image.grad, "history": res.history, "world": acc.num_processes,
                "skipped": res.skipped},
               f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
""")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # bound together, so the ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_two_processes_train_identically_and_share_negatives(tmp_path):
    data = make_shapes(tmp_path / "data", 30, fmt="tsv")
    for i in (3, 11, 17):  # unreadable: the processes' batches then differ in size, which the gather must handle
        (tmp_path / "data" / "images" / f"{i:05d}.png").write_bytes(b"broken")
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "run"
    # The workers import the fromage_gill under test (a checkout), not whichever copy is installed.
    src = str(Path(fromage_gill.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
    }
    torchrun_port, worker_port = _free_ports(2)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(torchrun_port),
        str(tmp_path / "worker.py"),
        str(data),
        str(out),
        str(worker_port),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # 1. Both processes end with the same trained layers, which are the ones the run saved, and they moved.
    w0, w1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    saved = load_file(out / "model.safetensors")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
        assert torch.equal(w0[k], saved[k]), k
    from fromage_gill import load_pipeline

    init = load_pipeline("tiny-fromage", device="cpu", dtype="fp32").model.trained_state_dict()
    assert not torch.equal(w0["visual_fc.weight"], init["visual_fc.weight"])

    # 2. The contrastive loss saw both processes' rows: equal to the loss on the concatenation, with each
    # process's gradient equal to the full loss's gradient for its own rows.
    r0, r1 = torch.load(out / "rank0.pt", weights_only=False), torch.load(out / "rank1.pt", weights_only=False)
    assert r0["world"] == 2
    assert r0["skipped"] == r1["skipped"] == 3  # all three broken images are in the training split: met once each
    text = torch.cat([r0["text"], r1["text"]]).requires_grad_()
    image = torch.cat([r0["image"], r1["image"]]).requires_grad_()
    ref = contrastive_loss(text, image, torch.tensor(0.5))
    ref.backward()
    assert r0["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert r1["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    local0 = contrastive_loss(r0["text"], r0["image"], torch.tensor(0.5))
    assert abs(local0.item() - ref.item()) > 1e-3  # with only local negatives the value would differ
    torch.testing.assert_close(r0["grad_text"], text.grad[:3])
    torch.testing.assert_close(r1["grad_text"], text.grad[3:])
    torch.testing.assert_close(r0["grad_image"], image.grad[:3])
    torch.testing.assert_close(r1["grad_image"], image.grad[3:])
    # the logged losses are global means, the same on both processes
    assert [h["total"] for h in r0["history"]] == pytest.approx([h["total"] for h in r1["history"]], abs=1e-6)
