"""`sae-platform vector add NAME FILE`: a direction (probe, steering vector, difference of means) as a
one-latent dictionary, which `sae-platform features --sae NAME` then describes like any SAE."""

from jobs.cli.common import _definitions


def cmd_vector_add(args) -> int:
    """Validate and commit the direction (sae_platform.vectors.add_vector) against the deployment's
    shuffled store; errors (PlatformError) are printed by main with their fix."""
    from sae_platform.vectors import add_vector

    defs = _definitions()
    store = defs.resources["storage"].store()
    shuffle_name = defs.resources["shuffle"].settings().name
    added = add_vector(store, args.name, args.file, shuffle_name, hook_point=args.hook_point, bias=args.bias,
                       key=args.key)
    what = "committed" if added["committed"] else "already committed (unchanged)"
    print(f"vector {added['name']}: {what} at {added['path']}: |d| {added['norm']:.4g}, d_model {added['d_model']}, "
          f"reads shuffled store {added['shuffle']}\n  next: sae-platform features --sae {added['name']}")
    return 0


def add_parser(commands) -> None:
    """The `vector` command group (one subcommand, `add`)."""
    vector = commands.add_parser("vector", help="a direction (probe, steering vector) as a one-latent dictionary")
    actions = vector.add_subparsers(dest="vector_command", required=True)
    add = actions.add_parser("add", help="validate a .npy / .safetensors direction and commit it as SAE NAME")
    add.add_argument("name", help="its name (as an SAE: sae-platform features --sae NAME)")
    add.add_argument("file", help=".npy (no pickles) or .safetensors: shape [d_model] or [1, d_model], floating point")
    add.add_argument("--hook-point", default=None,
                     help="the cached hook point it reads (resources.caching.config.hook_points); default: the first")
    add.add_argument("--bias", type=float, default=0.0,
                     help="added to the projection before the ReLU, raw activation units (a probe w.x + c: c / |w|)")
    add.add_argument("--key", default=None, help="the tensor to read from a .safetensors file holding several")
    add.set_defaults(func=cmd_vector_add)
