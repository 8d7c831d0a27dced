"""``fromage-gill train-lm --model LM --data captions.txt --out DIR``: SimCTG domain adaptation of a plain LM."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "train-lm",
        help="fine-tune a plain LM on captions with SimCTG (the text-only step of MAGIC)",
        description="Fine-tune a causal LM on a caption corpus with the SimCTG objective (MLE plus "
        "a token-level contrastive loss), the text-only domain adaptation MAGIC relies "
        "on. Use the result with `fromage-gill caption --lm OUT`.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a MAGIC preset (its LM, e.g. tiny-magic), an LM directory, or a Hub id (e.g. gpt2)",
    )
    p.add_argument("--data", required=True, help="captions: one per line (.txt), or MAGIC's JSON")
    p.add_argument("--out", required=True, help="run directory (the latest LM, checkpoints/, run.json)")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--margin", type=float, default=0.5, help="contrastive margin (published: 0.5)")
    p.add_argument("--max-len", type=int, default=64, help="caption tokens kept")
    p.add_argument(
        "--start-token",
        default="<-start_of_text->",
        help="token every caption starts with (added to the tokenizer if missing)",
    )
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10, help="TensorBoard scalars (OUT/logs) every N steps")
    p.add_argument("--resume", help="a run directory or checkpoint to continue")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="let --resume read a checkpoint whose state files need a full unpickle (those of older versions); "
        "unpickling can run code, so pass it only for checkpoints you wrote yourself",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="e.g. cpu, cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..magic.simctg import SimCTGConfig, train_lm

    tc = SimCTGConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        margin=args.margin,
        max_len=args.max_len,
        start_token=args.start_token,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        log_every=args.log_every,
        resume=args.resume,
        trust_pickle=args.trust_pickle,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    result = train_lm(tc)
    last = result.history[-1] if result.history else {}
    summary = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "lr")
    print(f"trained to step {result.step}{': ' + summary if summary else ''}; LM saved in {result.out}")
    return 0
