"""`sae-platform steer`: the model's greedy continuation of a prompt without and with SAE features
added at the SAE's hook point (``sae_platform.steering``), the same as the feature page's steer panel."""

import sys

from jobs.cli.common import _definitions, _described_sae


def cmd_steer(args) -> int:
    """Prints the two continuations, each token as it comes (the steered one first line by line
    would hide how they diverge; the side-by-side view is the browser's)."""
    from sae_platform.live import checkpoint_loader
    from sae_platform.model import pick_device
    from sae_platform.steering import Condition, steer

    if len(args.strength) != len(args.feature):
        sys.exit(f"error: {len(args.feature)} --feature but {len(args.strength)} --strength: give one strength "
                 "(activation units) after each feature, e.g. --feature 12 --strength 8 --feature 40 --strength -3")
    defs = _definitions()
    store = defs.resources["storage"].store()
    args.sae = args.sae or _described_sae(defs)
    device = pick_device(args.device)
    load_model = lambda: defs.resources["language_model"].load(store, device=str(device))[0]  # noqa: E731
    live = checkpoint_loader(store, args.sae, load_model, device)(None)     # the committed checkpoint
    condition = None if args.condition_feature is None else Condition(args.condition_feature,
                                                                      args.condition_threshold)
    ids = live.hooked.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    pairs = list(steer(live.hooked, live.sae, ids, list(zip(args.feature, args.strength, strict=True)), args.method,
                       args.max_new_tokens, condition, hook_point=live.hook_point,
                       input_hook_point=live.input_hook_point))
    decode = live.hooked.tokenizer.decode
    where = "" if condition is None else f", only where feature {condition.feature} > {condition.threshold}"
    print(f"SAE {args.sae} (checkpoint {live.checkpoint_version}) at {live.hook_point}; {args.method} "
          + ", ".join(f"#{f} x {s:g}" for f, s in zip(args.feature, args.strength, strict=True)) + where)
    for name, side in (("without", 0), ("steered", 1)):
        print(f"--- {name} ---\n{args.prompt}{decode([p[side] for p in pairs if p[side] is not None])}")
    return 0


def add_parser(commands) -> None:
    """The ``steer`` subcommand; nothing heavy is imported (the method is checked by the core)."""
    steer = commands.add_parser("steer", help="greedy continuation of a prompt without and with SAE features added")
    steer.add_argument("prompt")
    steer.add_argument("--sae", default=None, help="default: the deployment's resources.features.config.sae_name")
    steer.add_argument("--feature", type=int, action="append", required=True, help="latent id (repeatable)")
    steer.add_argument("--strength", type=float, action="append", required=True,
                       help="activation units, one per --feature (e.g. the feature's max activation)")
    steer.add_argument("--method", default="additive",
                       help="Neuronpedia's methods (sae_platform.steering): additive (h + s·v), orthogonal "
                            "((I-P)h + s·Ph), cap (the coefficient along v clipped at s)")
    steer.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated")
    steer.add_argument("--condition-feature", type=int, default=None,
                       help="steer only at positions where this latent fires above --condition-threshold")
    steer.add_argument("--condition-threshold", type=float, default=0.0,
                       help="activation units --condition-feature must exceed")
    steer.add_argument("--device", default="auto", help="auto, cpu or cuda")
    steer.set_defaults(func=cmd_steer)
