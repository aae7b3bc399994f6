"""The ``areal`` command: plugins, matrix, check, merge, train.

Start-up stays light: ``areal plugins`` and ``areal matrix`` import no torch; ``merge`` and
``train`` import their machinery only when they run.
"""

from __future__ import annotations

import argparse
import json
import sys


def _registry():
    from areal_core.registry import default_registry

    return default_registry()


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = _registry()
    records = registry.plugins()
    if args.json:
        print(json.dumps({"plugins": [r.to_dict() for r in records],
                          "backends": [d.to_dict() for d in registry.declarations()]}, indent=2))
        return 0
    if not records:
        print("no areal plugins installed (pip install 'areal-core[fsdp2,vllm]')")
        return 0
    width = max(len(r.name) for r in records)
    for r in records:
        detail = f"provides {', '.join(r.provides) or 'nothing'}" if r.status == "ok" else r.error
        print(f"{r.name:<{width}}  {r.distribution} {r.version}  {r.status}  {detail}")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    registry = _registry()
    matrix = registry.matrix
    if args.json:
        data = matrix.to_dict()
        data["broken_plugins"] = [r.to_dict() for r in registry.plugins() if r.status == "broken"]
        print(json.dumps(data, indent=2))
        return 0
    print(matrix.to_markdown())
    broken = [r for r in registry.plugins() if r.status == "broken"]
    for record in broken:
        print(f"\nbroken plugin {record.name} ({record.distribution}): {record.error}")
    return 0


def check_config(config_path: str | None, overrides: list[str], download: bool = False):
    """(config, errors, hub overrides) after loading, resolving Hub ids (from the cache, or
    downloading when ``download``) and every validation rule. The hub overrides point the
    model-path keys at the resolved snapshot directories; ``config`` already has them."""
    from areal_core.config_loader import load_config
    from areal_core.hub import path_overrides, resolve_model_paths
    from areal_core.validation import validate

    config, errors = load_config(config_path, overrides)
    resolved, hub_errors = resolve_model_paths(config, download=download)
    hub_overrides = path_overrides(resolved)
    if hub_overrides:
        config, errors = load_config(config_path, [*overrides, *hub_overrides])
    # an unresolved actor.path: the model checks would only repeat "no such directory"
    repeats = "actor.path" if any(e.key == "actor.path" for e in hub_errors) else None
    errors += hub_errors + [e for e in validate(config, _registry()) if e not in errors and e.key != repeats]
    return config, errors, hub_overrides


def cmd_check(args: argparse.Namespace) -> int:
    config, errors, _ = check_config(args.config, args.overrides)
    if args.json:
        print(json.dumps({"ok": not errors, "errors": [
            {"key": e.key, "value": repr(e.value), "problem": e.problem, "fix": e.fix} for e in errors
        ]}, indent=2))
        return 1 if errors else 0
    if errors:
        print(f"areal check: {len(errors)} problem(s); the run cannot start:", file=sys.stderr)
        for error in errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    a, r = config.actor, config.rollout
    print(f"areal check: ok: {a.backend} x {r.backend}, LoRA rank {a.lora_rank}, alpha {a.lora_alpha}, "
          f"target modules {a.resolved_target_modules}, {a.world_size} training rank(s)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from areal_core.errors import ArealError
    from areal_core.merge import merge, plan_merge

    try:
        plan = plan_merge(args.adapter, args.base, args.out, dtype=args.dtype,
                          max_shard_size=args.max_shard_size)
    except ArealError as exc:
        print(f"areal merge: refused, nothing was written: {exc}", file=sys.stderr)
        return 1
    print(f"areal merge: {plan.adapter} into {plan.base}, weights in {plan.dtype}", flush=True)
    try:
        merge(plan)
    except (ArealError, OSError) as exc:
        print(f"areal merge: failed, nothing was written: {exc}", file=sys.stderr)
        return 1
    print(f"areal merge: wrote {plan.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config, errors, hub_overrides = check_config(args.config, args.overrides, download=True)
    if errors:
        print(f"areal train: {len(errors)} configuration problem(s); nothing was started:", file=sys.stderr)
        for error in errors:
            print(f"  - {error}", file=sys.stderr)
        return 1
    from areal_core.launcher import launch

    return launch(config, args.config, args.overrides, hub_overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="areal", description="LoRA fine-tuning for RL of LLMs (GRPO).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="installed plugins, versions and status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("matrix", help="the LoRA support matrix of what is installed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_matrix)
    for name, func, text in (("check", cmd_check, "validate a run before starting it"),
                             ("train", cmd_train, "run GRPO with LoRA")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="YAML configuration file")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. actor.lora_rank=8")
        if name == "check":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    p = sub.add_parser("merge", help="an adapter merged into its base model, for deployment")
    p.add_argument("adapter", help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", required=True, help="the base model: a Hugging Face directory or a Hub id (org/name[@revision])")
    p.add_argument("--out", required=True, help="new directory for the merged model (must not exist)")
    # Checked by plan_merge, not by argparse choices: a bad value is a refusal (exit 1), not a usage error.
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the base's dtype)")
    p.add_argument("--max-shard-size", default=None, help="largest safetensors shard, e.g. 2GB (default 5GB)")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `areal matrix | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
