"""``fromage-gill toy build``: the toy world's backbones, training data and trained models; ``toy eval``: their
measured quality."""

from __future__ import annotations

import json
import os


def register(sub) -> None:
    p = sub.add_parser("toy", help="the toy world: a CPU-sized world in which the whole method really learns")
    toy = p.add_subparsers(dest="toy_command", required=True, metavar="ACTION")
    b = toy.add_parser(
        "build",
        help="pretrain the toy backbones (CLIP, LM, VAE, UNet), export the training data, "
        "train toy-fromage and toy-gill and their gallery indexes",
    )
    b.add_argument("--out", default="checkpoints/toy", help="output directory (default: checkpoints/toy)")
    b.add_argument(
        "--stage",
        action="append",
        dest="stages",
        metavar="STAGE",
        help="run only this stage (repeatable): tokenizer, clip, lm, vae, unet, data, fromage, gill. Default: all",
    )
    b.add_argument("--data-dir", help="where the 'data' stage writes the training set (default: OUT/../toy-data)")
    b.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads per stage (default: torch's choice; with --jobs, "
        "the CPUs shared out). The shipped checkpoints were built with one thread per stage",
    )
    b.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="stages run at once, each in its own process (default: 2, or 1 on a one-CPU machine); "
        "their progress goes to OUT/logs/STAGE.log",
    )
    b.add_argument("--smoke", action="store_true", help="a few steps per stage: checks the machinery, not quality")
    b.set_defaults(func=run_build)
    e = toy.add_parser("eval", help="measure toy-fromage / toy-gill on held-out world images and prompts")
    e.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="MODEL",
        help="toy-fromage, toy-gill or a model directory (repeatable; default: both presets)",
    )
    e.add_argument("--n", type=int, default=60, help="examples per measure (default 60)")
    e.add_argument("--gallery", type=int, default=300, help="held-out gallery size for retrieval (default 300)")
    e.add_argument("--steps", type=int, default=25, help="denoising steps for the generation measure (default 25)")
    e.add_argument(
        "--drawings",
        default="repo:assets/drawings",
        metavar="DIR",
        help="the drawings set to describe beside the world's test split (default: the checked-in "
        "assets/drawings; '' skips it)",
    )
    e.add_argument(
        "--conversations",
        type=int,
        default=60,
        help="toy-gill: scripted conversations over the drawings set whose first and last turns are compared "
        "(default 60; 0 skips them)",
    )
    e.add_argument("--turns", type=int, default=20, help="turns of each scripted conversation (default 20)")
    e.add_argument("--json", action="store_true", help="print the full results (with samples) as JSON")
    e.set_defaults(func=run_eval)
    d = toy.add_parser(
        "drawings", help="write the held-out drawings set (shapes drawn apart from the world's renderer) again"
    )
    d.add_argument("--out", default="assets/drawings", help="output directory (default: assets/drawings)")
    d.add_argument("--seed", type=int, default=0, help="the set's seed (default 0, the checked-in set's)")
    d.set_defaults(func=run_drawings)


def run_build(args) -> int:
    from ..toy.build import build
    from ..toy.pretrain import Recipe

    recipe = Recipe.smoke() if args.smoke else Recipe()
    report = build(
        args.out, stages=args.stages, recipe=recipe, data_dir=args.data_dir, threads=args.threads, jobs=args.jobs
    )
    print(json.dumps(report["stages"], indent=2))
    return 0


def run_eval(args) -> int:
    from ..pipeline import load_pipeline
    from ..toy.evaluate import evaluate

    if args.n < 2 or args.gallery < 10:
        raise ValueError(f"--n must be >= 2 and --gallery >= 10, got {args.n} and {args.gallery}")
    if args.conversations < 0 or args.turns < 2:
        raise ValueError(f"--conversations must be >= 0 and --turns >= 2, got {args.conversations} and {args.turns}")
    if args.drawings:  # a bad set is named before any model loads
        from ..toy.drawings import load

        load(args.drawings)
    results = []
    for name in args.models or ["toy-fromage", "toy-gill"]:
        pipe = load_pipeline(name, device="cpu", dtype="fp32")
        res = evaluate(
            pipe,
            n=args.n,
            gallery=args.gallery,
            steps=args.steps,
            drawings_dir=args.drawings or None,
        )
        if pipe.config.kind == "gill" and args.conversations and args.drawings:
            from ..toy.conversations import long_conversations

            res.long, res.samples["long"] = long_conversations(
                pipe, args.drawings, conversations=args.conversations, turns=args.turns, steps=args.steps, guidance=4.0
            )
        results.append(res.to_dict())
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("| measure | " + " | ".join(r["model"] for r in results) + " |")
    print("|---|" + "---|" * len(results))
    rows = [
        ("captioning: colour correct", lambda r: r["caption_colour"]),
        ("captioning: shape correct", lambda r: r["caption_shape"]),
        ("captioning: both correct", lambda r: r["caption_both"]),
        ("retrieval R@1", lambda r: r["retrieval"]["R@1"]),
        ("retrieval R@5", lambda r: r["retrieval"]["R@5"]),
        ("retrieval R@10", lambda r: r["retrieval"]["R@10"]),
        ("retrieval chance R@1", lambda r: r["retrieval"]["chance_R@1"]),
        ("retrieval match@1 (top image fits the caption)", lambda r: r["retrieval"]["match@1"]),
        ("retrieval match@5", lambda r: r["retrieval"]["match@5"]),
        ("retrieval chance match@1", lambda r: r["retrieval"]["chance_match@1"]),
        ("chat: colour question", lambda r: r["chat_colour"]),
        ("chat: two-image comparison", lambda r: r["compare"]),
        ("the frozen LM given the two descriptions instead", lambda r: r["compare_from_descriptions"]),
        ("decision: show vs draw", lambda r: r["decision"]),
        ("chat 'show me ...': an image from the gallery", lambda r: r["requests"].get("show_routed")),
        ("chat 'show me ...': it has the colour and shape asked for", lambda r: r["requests"].get("show_match")),
        ("chat 'draw ...': a generated image", lambda r: r["requests"].get("draw_routed")),
        ("chat 'draw ...': it has the colour and shape asked for", lambda r: r["requests"].get("draw_match")),
        ("chat 'What is in this image?': colour and shape named", lambda r: r["requests"].get("describe_right")),
        ("chat 'What is in this image?': no image in the answer", lambda r: r["requests"].get("describe_no_image")),
        ("chat: colour question about the last message's image", lambda r: r["requests"].get("follow_up_colour")),
        (
            "chat: requests typed in lower case, no full stop: right kind, colour",
            lambda r: r["requests"].get("typed_right"),
        ),
        ("chat: later requests in a conversation: right kind, colour", lambda r: r["requests"].get("later_right")),
        ("generation: colour (GILL)", lambda r: r["generation"].get("gill_colour")),
        ("generation: shape (GILL)", lambda r: r["generation"].get("gill_shape")),
        ("generation: colour (diffusion alone)", lambda r: r["generation"].get("diffusion_alone_colour")),
        ("generation: shape (diffusion alone)", lambda r: r["generation"].get("diffusion_alone_shape")),
        ("drawings 'What is in this image?': colour named right", lambda r: r["drawings"].get("colour")),
        ("drawings 'What is in this image?': colour and shape named right", lambda r: r["drawings"].get("both")),
        ("drawings set: no image in the answer", lambda r: r["drawings"].get("no_image")),
        ("drawings set, out-of-world images: no colour and shape made up", lambda r: r["drawings"].get("out_of_world")),
    ]
    for label, get in rows:
        print(f"| {label} | " + " | ".join("-" if get(r) is None else f"{get(r):.3f}" for r in results) + " |")
    if results[0]["drawings"]:
        d = results[0]["drawings"]
        print(f"\ndrawings set: {d['n']} drawings, {d['out_of_world_n']} out-of-world images ({args.drawings})")
    for r in results:
        if r["long"]:
            _print_long(r["model"], r["long"])
    return 0


LONG_FIGURES = (
    ("describe_both", "describe a drawing: colour and shape named"),
    ("describe_no_image", "describe a drawing: no image in the answer"),
    ("out_of_world", "out-of-world image: answered as such"),
    ("show_match", "'show me': the colour and shape asked for"),
    ("draw_colour", "'draw': the colour asked for"),
    ("draw_shape", "'draw': the shape asked for (CLIP judge)"),
    ("routed", "show / draw routed to retrieval / generation"),
)


def _print_long(model: str, long: dict) -> None:
    """The scripted conversations' first turn against their last, per figure, with the ratio."""
    turns = int(long["turns"])
    print(f"\n{model}: {long['conversations']} conversations of {turns} turns over the drawings set")
    print(f"| measure | turn 1 | turn {turns} | ratio | examples each |")
    print("|---|---|---|---|---|")
    for key, label in LONG_FIGURES:
        if f"{key}_first" in long:
            first, last = long[f"{key}_first"], long[f"{key}_last"]
            ratio = f"{last / first:.2f}" if first else "-"
            print(f"| {label} | {first:.3f} | {last:.3f} | {ratio} | {long[f'{key}_n']} |")
    print(
        f"| every answer ({long['answers']}): a word three times in a row / worded as the user's turn | "
        f"{long['repeats']:.3f} / {long['as_user']:.3f} | | | |"
    )


def run_drawings(args) -> int:
    from ..toy.drawings import write

    examples = write(args.out, seed=args.seed)
    print(f"wrote {len(examples)} images and labels.jsonl to {args.out}")
    return 0
