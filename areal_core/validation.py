"""The rules ``areal check`` applies before anything heavy starts.

``validate(config, registry)`` returns every problem as a ``ConfigError`` (key, bad value, fix):
ranges of single values, the model directory, the chosen engine and server (installed, LoRA
ready, the pair supported, the rank and target modules servable), then each chosen plugin's own
``areal_validate_config`` hook. Nothing here loads a model or starts a process.

A run with ``adapters:`` is checked once more per adapter (``check_adapters``): its name, and
its own settings through the same rules run on its view of the run
(``areal_core.adapters.adapter_run_config``), reported under ``adapters.<name>.<key>``; the
backend checks take each adapter's rank and target modules, refuse several adapters on a pair
that does not declare ``LoraSupport.multi_adapter``, and add up the versions the adapters keep
live against ``rollout.max_loras``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from areal_core.adapters import adapter_run_config, run_adapters
from areal_core.config import (AGREEMENT_POLICIES, ALL_LINEAR, DTYPES, LOSS_AGG_MODES, LR_SCHEDULES,
                               NORM_LEVELS, WANDB_MODES, ADAPTER_DEFAULTS_FROM, AdapterConfig, RunConfig)
from areal_core.declarations import ENGINE, SERVER
from areal_core.errors import ConfigError
from areal_core.registry import Registry
from areal_core.versions import live_versions_needed

#: config.json keys whose presence (with a value > 0) marks a mixture-of-experts model.
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                   "num_experts_per_tok")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LORA_NAME = re.compile(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$")
_ADDRESS = re.compile(r"^(https?://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}/?$")


def _check(errors: list[ConfigError], ok: bool, key: str, value, problem: str, fix: str) -> None:
    if not ok:
        errors.append(ConfigError(key, value, problem, fix))


def check_values(config: RunConfig) -> list[ConfigError]:
    """Ranges and choices of single values."""
    errors: list[ConfigError] = []
    a, r, g, t = config.actor, config.rollout, config.gconfig, config.train
    _check(errors, a.use_lora, "actor.use_lora", a.use_lora,
           "this project trains LoRA adapters; full-model RL training is not offered",
           "set actor.use_lora=true (and choose lora_rank, lora_alpha, target_modules)")
    _check(errors, a.lora_rank >= 1, "actor.lora_rank", a.lora_rank, "the LoRA rank must be >= 1",
           "use a rank such as 8, 16 or 32")
    _check(errors, a.lora_alpha > 0, "actor.lora_alpha", a.lora_alpha, "lora_alpha must be > 0",
           "use e.g. twice the rank (lora_alpha: 32 for lora_rank: 16)")
    _check(errors, a.peft_type.lower() == "lora", "actor.peft_type", a.peft_type,
           "only LoRA adapters are supported", "set actor.peft_type=lora")
    for i, module in enumerate(a.target_modules):
        if module == ALL_LINEAR:
            continue
        _check(errors, bool(_MODULE_NAME.match(module)), f"actor.target_modules[{i}]", module,
               "target modules are short module names (regexes and dotted paths are not accepted)",
               "write names such as q_proj, v_proj, or [all-linear]")
    if ALL_LINEAR in a.target_modules and len(a.target_modules) > 1:
        errors.append(ConfigError("actor.target_modules", a.target_modules,
                                  "all-linear cannot be combined with other names",
                                  "use [all-linear] alone or list the names"))
    _check(errors, a.dtype in DTYPES, "actor.dtype", a.dtype, "unknown dtype",
           f"use one of {', '.join(DTYPES)}")
    _check(errors, a.param_dtype in ("",) + DTYPES, "actor.param_dtype", a.param_dtype,
           "unknown dtype", f"use '' (as loaded) or one of {', '.join(DTYPES)}")
    _check(errors, a.reduce_dtype in DTYPES, "actor.reduce_dtype", a.reduce_dtype, "unknown dtype",
           f"use one of {', '.join(DTYPES)}")
    _check(errors, a.world_size >= 1, "actor.world_size", a.world_size,
           "the number of training ranks must be >= 1", "set actor.world_size=1 or more")
    _check(errors, a.device in ("auto", "cpu", "cuda"), "actor.device", a.device, "unknown device",
           "use auto, cpu or cuda")
    _check(errors, a.max_tokens_per_microbatch >= 1, "actor.max_tokens_per_microbatch",
           a.max_tokens_per_microbatch, "the micro-batch token budget must be >= 1", "use e.g. 8192")
    _check(errors, a.tensor_parallel_size >= 1 and a.world_size % max(a.tensor_parallel_size, 1) == 0,
           "actor.tensor_parallel_size", a.tensor_parallel_size,
           "tensor parallel size must be >= 1 and divide actor.world_size",
           f"choose a divisor of world_size={a.world_size}")
    _check(errors, a.optimizer.lr > 0, "actor.optimizer.lr", a.optimizer.lr,
           "the learning rate must be > 0", "LoRA usually wants about 10x full fine-tuning's rate, e.g. 1e-4 to 1e-3")
    _check(errors, a.optimizer.grad_clip >= 0, "actor.optimizer.grad_clip", a.optimizer.grad_clip,
           "must be >= 0", "use 1.0, or 0 to disable clipping")
    _check(errors, all(0 <= b < 1 for b in a.optimizer.betas), "actor.optimizer.betas",
           a.optimizer.betas, "Adam betas must lie in [0, 1)", "use e.g. [0.9, 0.99]")
    _check(errors, a.optimizer.weight_decay >= 0, "actor.optimizer.weight_decay",
           a.optimizer.weight_decay, "must be >= 0", "use 0 or a small value such as 0.01")
    _check(errors, a.optimizer.lr_scheduler_type in LR_SCHEDULES, "actor.optimizer.lr_scheduler_type",
           a.optimizer.lr_scheduler_type, f"must be one of {', '.join(LR_SCHEDULES)}", "use constant or cosine")
    _check(errors, 0 <= a.optimizer.warmup_steps_proportion < 1, "actor.optimizer.warmup_steps_proportion",
           a.optimizer.warmup_steps_proportion, "must lie in [0, 1)", "use e.g. 0.05 (or 0: no warm-up)")
    _check(errors, 0 <= a.optimizer.min_lr_ratio <= 1, "actor.optimizer.min_lr_ratio",
           a.optimizer.min_lr_ratio, "must lie in [0, 1]", "use 0 (decay to zero) or e.g. 0.1")
    errors.extend(check_objective(config))

    _check(errors, r.max_head_offpolicyness >= 0, "rollout.max_head_offpolicyness",
           r.max_head_offpolicyness, "must be >= 0", "use 0 for synchronous rollouts")
    _check(errors, r.max_loras >= 0, "rollout.max_loras", r.max_loras, "must be >= 0",
           "use 0 to derive it from the staleness window")
    for i, address in enumerate(r.servers):
        _check(errors, bool(_ADDRESS.match(address)), f"rollout.servers[{i}]", address,
               "not a server address", "write host:port or http://host:port")
    for key in ("startup_timeout", "request_timeout"):
        value = getattr(r, key)
        _check(errors, value > 0, f"rollout.{key}", value, "must be > 0 seconds", "use e.g. 300")
    _check(errors, r.max_concurrent_requests >= 1, "rollout.max_concurrent_requests",
           r.max_concurrent_requests, "must be >= 1", "use e.g. 32")
    _check(errors, r.max_restarts >= 0, "rollout.max_restarts", r.max_restarts, "must be >= 0",
           "use e.g. 3, or 0 to stop the run when a rollout server dies")
    _check(errors, r.max_model_len >= 2, "rollout.max_model_len", r.max_model_len, "must be >= 2",
           "use the longest prompt + max_new_tokens, e.g. 256")

    _check(errors, g.n_samples >= 2, "gconfig.n_samples", g.n_samples,
           "GRPO needs at least 2 samples per prompt to form a group advantage", "use e.g. 8")
    _check(errors, g.max_new_tokens >= 1, "gconfig.max_new_tokens", g.max_new_tokens, "must be >= 1",
           "use e.g. 16")
    _check(errors, g.temperature > 0, "gconfig.temperature", g.temperature,
           "rollouts must be sampled (temperature > 0)", "use 1.0 to sample the policy itself")
    _check(errors, 0 < g.top_p <= 1, "gconfig.top_p", g.top_p, "must lie in (0, 1]", "use 1.0")
    _check(errors, g.top_k >= 0, "gconfig.top_k", g.top_k, "must be >= 0", "use 0 (off)")
    if not config.adapters:  # with adapters: each is named by its entry, gconfig.lora_name is unused
        _check(errors, bool(_LORA_NAME.match(g.lora_name)), "gconfig.lora_name", g.lora_name,
               "adapter names use letters, digits, '_', '.' and '-'", "use e.g. lora")
    if g.max_new_tokens >= r.max_model_len:
        errors.append(ConfigError("gconfig.max_new_tokens", g.max_new_tokens,
                                  f"must be below rollout.max_model_len ({r.max_model_len})",
                                  "raise rollout.max_model_len or lower max_new_tokens"))

    _check(errors, t.steps >= 1, "train.steps", t.steps, "must be >= 1", "use e.g. 50")
    _check(errors, t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1",
           "use e.g. 16 prompts per step")
    _check(errors, t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0",
           "use 0 to evaluate only at the start and the end")
    _check(errors, t.agreement in AGREEMENT_POLICIES, "train.agreement", t.agreement,
           f"must be one of {', '.join(AGREEMENT_POLICIES)}",
           "use stop (the default: a wrong-weights alarm stops the run), warn or off")
    _check(errors, t.keep_adapters >= 0, "train.keep_adapters", t.keep_adapters, "must be >= 0",
           "use 0 to keep every adapter version")
    _check(errors, t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every,
           "must be >= 0", "use e.g. 10, or 0 to checkpoint only at the end and on a stop")
    _check(errors, t.checkpoint_every_seconds >= 0, "train.checkpoint_every_seconds",
           t.checkpoint_every_seconds, "must be >= 0", "use e.g. 1800, or 0 for steps only")
    _check(errors, t.keep_checkpoints >= 0, "train.keep_checkpoints", t.keep_checkpoints,
           "must be >= 0", "use e.g. 3, or 0 to keep every checkpoint")
    _check(errors, t.collective_timeout > 0, "train.collective_timeout", t.collective_timeout,
           "must be > 0 seconds", "use e.g. 600; a rank that stops answering is detected after this long")
    _check(errors, bool(config.output_dir), "output_dir", config.output_dir, "must be set",
           "give a directory for the run, e.g. runs/my-run")
    return errors


def _check_norm(errors: list[ConfigError], norm, key: str, n_samples: int) -> None:
    if norm is None:
        return
    for level in ("mean_level", "std_level"):
        value = getattr(norm, level)
        _check(errors, value is None or value in NORM_LEVELS, f"{key}.{level}", value,
               f"must be {', '.join(NORM_LEVELS)} or null", "use group (GRPO), batch, or null")
    _check(errors, norm.eps > 0, f"{key}.eps", norm.eps, "must be > 0", "use e.g. 1e-5")
    _check(errors, norm.group_size in (0, n_samples), f"{key}.group_size", norm.group_size,
           f"a group is the gconfig.n_samples ({n_samples}) samples of one prompt",
           "leave it out (or 0), or set it to gconfig.n_samples")


def check_objective(config: RunConfig) -> list[ConfigError]:
    """The PPO/GRPO objective's settings under ``actor`` (docs/rl-options.md)."""
    errors: list[ConfigError] = []
    a, g, t = config.actor, config.gconfig, config.train
    _check(errors, a.eps_clip > 0, "actor.eps_clip", a.eps_clip, "must be > 0", "use 0.2")
    _check(errors, a.eps_clip_higher is None or a.eps_clip_higher >= a.eps_clip, "actor.eps_clip_higher",
           a.eps_clip_higher, f"the upper clip must be >= actor.eps_clip ({a.eps_clip})",
           "use e.g. 0.28 with eps_clip 0.2 (DAPO), or null for a symmetric clip")
    _check(errors, a.c_clip is None or a.c_clip > 1, "actor.c_clip", a.c_clip,
           "the dual clip bound must be > 1", "use e.g. 3.0, or null to disable dual clipping")
    _check(errors, a.kl_ctl >= 0, "actor.kl_ctl", a.kl_ctl, "must be >= 0", "use 0 to disable KL")
    _check(errors, a.loss_agg_mode in LOSS_AGG_MODES, "actor.loss_agg_mode", a.loss_agg_mode,
           f"must be one of {', '.join(LOSS_AGG_MODES)}",
           "use token-mean (DAPO), seq-mean-token-mean (GRPO) or seq-mean-token-sum-norm (Dr. GRPO)")
    _check(errors, a.ppo_n_minibatches >= 1, "actor.ppo_n_minibatches", a.ppo_n_minibatches,
           "must be >= 1", "use 1 (one optimizer step per batch) or e.g. 4")
    samples = t.batch_size * g.n_samples
    if a.ppo_n_minibatches > samples:
        errors.append(ConfigError("actor.ppo_n_minibatches", a.ppo_n_minibatches,
                                  f"more minibatches than samples in a batch ({samples} = train.batch_size "
                                  f"x gconfig.n_samples)", "lower ppo_n_minibatches or raise the batch"))
    if a.behav_imp_weight_cap is not None:
        _check(errors, a.behav_imp_weight_cap > 1, "actor.behav_imp_weight_cap", a.behav_imp_weight_cap,
               "the cap on proximal/behaviour weights must be > 1", "use e.g. 5.0 (the reference's GSM8K recipe)")
        _check(errors, a.use_decoupled_loss, "actor.behav_imp_weight_cap", a.behav_imp_weight_cap,
               "caps the behaviour weight of the decoupled loss, which is off",
               "set actor.use_decoupled_loss=true, or leave the cap out")
    _check(errors, a.reward_scaling > 0, "actor.reward_scaling", a.reward_scaling, "must be > 0", "use 1.0")
    _check(errors, a.reward_clip > 0, "actor.reward_clip", a.reward_clip, "must be > 0",
           "use e.g. 20 (rewards are clipped to [-reward_clip, reward_clip])")
    _check_norm(errors, a.reward_norm, "actor.reward_norm", g.n_samples)
    _check_norm(errors, a.adv_norm, "actor.adv_norm", g.n_samples)
    if a.overlong_reward_penalty:
        tokens, factor = a.overlong_tokens, a.overlong_penalty_factor
        _check(errors, tokens is not None and 1 <= tokens <= g.max_new_tokens, "actor.overlong_tokens", tokens,
               f"the penalised tail must be 1..gconfig.max_new_tokens ({g.max_new_tokens}) tokens",
               "set e.g. a quarter of max_new_tokens")
        _check(errors, factor is not None and factor > 0, "actor.overlong_penalty_factor", factor,
               "must be > 0 (the penalty of a completion that reaches max_new_tokens)", "use e.g. 1.0")
    _check(errors, a.dynamic_sampling_max_rounds >= 1, "actor.dynamic_sampling_max_rounds",
           a.dynamic_sampling_max_rounds, "must be >= 1", "use e.g. 4 refill rounds per step")
    return errors


def read_model_config(path: str) -> dict | None:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None


def check_model_dir(config: RunConfig) -> list[ConfigError]:
    """The base model directory: present, HF layout, safetensors, dense, no remote code unasked."""
    path = config.actor.path
    if not path:
        return [ConfigError("actor.path", path, "no base model given",
                            "set actor.path to a local Hugging Face model directory or a Hub id (org/name)")]
    directory = Path(path)
    if not directory.is_dir():
        return [ConfigError("actor.path", path, "model directory does not exist",
                            "give a local directory holding config.json and *.safetensors, or a Hub id org/name[@revision]")]
    errors: list[ConfigError] = []
    model_config = read_model_config(path)
    if model_config is None:
        errors.append(ConfigError("actor.path", path, "no readable config.json in the model directory",
                                  "point at a Hugging Face model directory"))
    if not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        detail = f" (found pickled {', '.join(pickled)})" if pickled else ""
        errors.append(ConfigError("actor.path", path, f"the model directory holds no *.safetensors{detail}",
                                  "convert the weights with save_pretrained(safe_serialization=True)"))
    if model_config:
        experts = {k: model_config[k] for k in MOE_CONFIG_KEYS if model_config.get(k)}
        if experts:
            errors.append(ConfigError("actor.path", path,
                                      f"mixture-of-experts model ({', '.join(f'{k}={v}' for k, v in experts.items())}): "
                                      "LoRA is supported for dense models only", "use a dense model"))
        if model_config.get("auto_map") and not config.actor.trust_remote_code:
            errors.append(ConfigError("actor.trust_remote_code", False,
                                      "the model needs its own code (config.json has auto_map)",
                                      "read that code, then set actor.trust_remote_code=true"))
    return errors


def check_backends(config: RunConfig, registry: Registry) -> list[ConfigError]:
    """The chosen engine and server: installed, LoRA ready, paired, rank and modules servable."""
    errors: list[ConfigError] = []
    engine_name, server_name = config.actor.backend, config.rollout.backend
    engine = registry.declaration(engine_name)
    server = registry.declaration(server_name)
    broken = {p.name: p.error for p in registry.plugins() if p.status == "broken"}
    for key, name, decl, kind, installed in (
        ("actor.backend", engine_name, engine, ENGINE, registry.engines()),
        ("rollout.backend", server_name, server, SERVER, registry.servers()),
    ):
        if decl is None:
            hint = f"; plugin {name!r} is installed but broken: {broken[name]}" if name in broken else ""
            errors.append(ConfigError(key, name, f"no installed {kind} of that name{hint}",
                                      f"install areal-core[{name}] or choose one of: {', '.join(installed) or 'none'}"))
        elif decl.kind != kind:
            errors.append(ConfigError(key, name, f"{name} is a {decl.kind}, not an {kind}",
                                      f"choose one of: {', '.join(installed) or 'none'}"))
    if errors:
        return errors
    if not registry.supports(engine_name, server_name):
        errors.append(ConfigError("actor.backend/rollout.backend", f"{engine_name} x {server_name}",
                                  f"this combination is not supported: {registry.why_not(engine_name, server_name)}",
                                  "choose a supported pair (see `areal matrix`)"))
        return errors
    # each adapter's rank and modules (the top-level actor.* for a run without adapters:)
    for adapter, prefix in _adapter_prefixes(config):
        rank = adapter.lora_rank
        for decl in (engine, server):
            limit = _rank_limit(decl)
            if limit is not None and rank > limit:
                errors.append(ConfigError(f"{prefix}lora_rank", rank,
                                          f"{decl.kind} {decl.name} handles ranks up to {limit}",
                                          f"use lora_rank <= {limit}"))
        bad = sorted(set(adapter.target_modules) & set(server.lora.unservable_modules))
        if bad:
            errors.append(ConfigError(f"{prefix}target_modules", bad,
                                      f"server {server.name} cannot serve LoRA on {', '.join(bad)}",
                                      "target linear projections only (e.g. [all-linear])"))
    return errors


def _rank_limit(decl) -> int | None:
    """The largest rank ``decl`` takes: its ``max_rank``, and the largest of its ``allowed_ranks``
    (a server's start-up flag holds every rank up to its value); None: no limit."""
    limits = [decl.lora.max_rank] if decl.lora.max_rank is not None else []
    if decl.lora.allowed_ranks:
        limits.append(max(decl.lora.allowed_ranks))
    return min(limits) if limits else None


def check_multi_adapter(config: RunConfig, registry: Registry) -> list[ConfigError]:
    """More than one adapter needs an engine and a server that both declare ``multi_adapter``
    (a list of one runs on any pair). Call after ``check_backends`` found both installed."""
    engine = registry.declaration(config.actor.backend)
    server = registry.declaration(config.rollout.backend)
    if len(config.adapters) <= 1 or engine is None or server is None:
        return []
    names = [a.name or "(no name)" for a in config.adapters]
    listed = f"; the config lists {len(names)}: {', '.join(names)}"
    errors = []
    if not engine.lora.multi_adapter:
        others = [e for e in registry.engines() if e != engine.name
                  and registry.declaration(e).lora.multi_adapter and registry.supports(e, server.name)]
        instead = f"use actor.backend={' or '.join(others)} or " if others else ""
        errors.append(ConfigError(
            "actor.backend", engine.name, engine.why_not_multi_adapter() + listed,
            f"{instead}list one adapter under adapters: (train the others in runs of their own)"))
    if not server.lora.multi_adapter:
        others = [s for s in registry.servers() if s != server.name
                  and registry.declaration(s).lora.multi_adapter and registry.supports(engine.name, s)]
        instead = f"use rollout.backend={' or '.join(others)} or " if others else ""
        errors.append(ConfigError(
            "rollout.backend", server.name, server.why_not_multi_adapter() + listed,
            f"{instead}list one adapter under adapters: (train the others in runs of their own)"))
    return errors


def entry_label(config: RunConfig, index: int) -> str:
    """How entry ``index`` of ``adapters:`` is named in errors: ``adapters.<name>``, or
    ``adapters[<index>]`` when its name is empty, shared with another entry or holds whitespace
    (as the loader names it)."""
    name = config.adapters[index].name
    names = [a.name for a in config.adapters]
    if name and names.count(name) == 1 and not any(c.isspace() or c in "[]=" for c in name):
        return f"adapters.{name}"
    return f"adapters[{index}]"


def _adapter_prefixes(config: RunConfig) -> list[tuple[AdapterConfig, str]]:
    """Each adapter with what its own settings are reported under: ``adapters.<name>.`` for an
    entry of ``adapters:``, ``actor.`` for the one adapter of a run without it."""
    if not config.adapters:
        return [(adapter, "actor.") for adapter in run_adapters(config)]
    return [(adapter, entry_label(config, i) + ".") for i, adapter in enumerate(config.adapters)]


#: A name ending like a version name ``<adapter>-v<N>``.
_VERSION_SUFFIX = re.compile(r"-v[0-9]+$")


def served_model_names(config: RunConfig) -> set[str]:
    """The names a rollout server may serve the base model under: ``actor.path`` as given, as the
    absolute path a launched server is given (vLLM serves under ``--model``'s value, SGLang under
    ``--model-path``'s), and the directory's basename."""
    path = config.actor.path
    if not path:
        return set()
    names = {path, str(Path(path).absolute()), Path(path).name}
    names.add(Path(path).name.split("@", 1)[0])  # a Hub id with a revision
    return {n for n in names if n}


def check_adapter_names(config: RunConfig) -> list[ConfigError]:
    """Each ``adapters:`` entry's name: set, unique, a lora name vLLM and SGLang take, not a
    version name, not the base model's served name."""
    errors: list[ConfigError] = []
    seen: dict[str, int] = {}
    served = served_model_names(config)
    for i, adapter in enumerate(config.adapters):
        key, name = f"adapters[{i}].name", adapter.name
        if not name:
            errors.append(ConfigError(key, name, "every adapter needs a name",
                                      "give each entry a name: e.g. '- name: add'"))
            continue
        if name in seen:
            errors.append(ConfigError(key, name, f"adapters[{seen[name]}] has the same name",
                                      "give each adapter its own name"))
            continue
        seen[name] = i
        if "/" in name or any(c.isspace() for c in name):
            errors.append(ConfigError(key, name, "an adapter name cannot hold '/' or whitespace "
                                      "(it names a directory adapters/<name>/ and the served lora name)",
                                      "use letters, digits, '_', '.' and '-', e.g. add or sub_v2"))
        elif not _LORA_NAME.match(name):
            errors.append(ConfigError(key, name, "adapter names use letters, digits, '_', '.' and '-' "
                                      "(no leading, trailing or doubled '-'): it is served as a lora name",
                                      "use e.g. add, sub or arith.small"))
        elif _VERSION_SUFFIX.search(name):
            suffix = _VERSION_SUFFIX.search(name)
            errors.append(ConfigError(key, name, "ends like a version name: this adapter's versions are "
                                      "served as <name>-v<N>, and a name ending in -v<N> reads as a "
                                      "version of another adapter",
                                      f"rename it without the '-v<N>' ending, e.g. "
                                      f"{name[:suffix.start()]}_{suffix.group(0)[1:]}"))
        if name in served:
            errors.append(ConfigError(key, name, "the base model is served under this name (actor.path), "
                                      "so a request for the adapter would get the base model",
                                      "give the adapter another name"))
    return errors


def _adapter_key(key: str, label: str) -> str | None:
    """``key`` of an adapter's view as the entry's own key (``actor.lora_rank`` ->
    ``adapters.<name>.lora_rank``, ``label`` being ``adapters.<name>``); None when the key is not
    one of an entry's settings."""
    for entry_key, source in sorted(ADAPTER_DEFAULTS_FROM.items(), key=lambda item: -len(item[1])):
        if key == source or key.startswith(source + ".") or key.startswith(source + "["):
            return f"{label}.{entry_key}{key[len(source):]}"
    return None


def check_adapters(config: RunConfig, found: list[ConfigError] = ()) -> list[ConfigError]:
    """Every ``adapters:`` entry: its name, and its own settings under the rules of
    ``check_values``, ``check_objective`` and ``check_tasks`` run on its view of the run.

    An error about one of the entry's own keys is reported under ``adapters.<name>.<key>``; one
    about another key is dropped when ``found`` (the top-level checks' errors) already has it,
    else kept with the adapter named in its problem (it comes from that adapter's settings,
    e.g. too few samples for ``actor.ppo_n_minibatches`` with its batch_size). The versions the
    adapters keep live at once are added up against ``rollout.max_loras``."""
    if not config.adapters:
        return []
    errors = check_adapter_names(config)
    seen = list(found)  # a list: an error's value may be a list (unhashable)
    for i, adapter in enumerate(config.adapters):
        label = entry_label(config, i)
        view = adapter_run_config(config, adapter)
        for error in check_values(view) + check_tasks(view):
            key = _adapter_key(error.key, label)
            if key is not None:
                error = ConfigError(key, error.value, error.problem, error.fix)
            elif error in seen:
                continue
            else:
                error = ConfigError(error.key, error.value,
                                    f"with {label}'s settings: {error.problem}", error.fix)
            if error not in seen:
                seen.append(error)
                errors.append(error)
    max_loras = config.rollout.max_loras
    live = [live_versions_needed(a.max_head_offpolicyness) for a in config.adapters]
    if max_loras > 0 and sum(live) > max_loras:
        each = " + ".join(f"{n} ({entry_label(config, i)})" for i, n in enumerate(live))
        errors.append(ConfigError(
            "rollout.max_loras", max_loras,
            f"the adapters keep up to {sum(live)} versions live at once on the server ({each}: each "
            "adapter's current version, max_head_offpolicyness versions behind it and one loading), "
            "more than rollout.max_loras lets it hold",
            f"raise rollout.max_loras to {sum(live)} or more, or set it to 0 to derive it"))
    return errors


def check_tasks(config: RunConfig) -> list[ConfigError]:
    """The dataset and reward names resolve (built-in names, or importable ``module:function``)."""
    from areal_core.tasks import TaskResolutionError, resolve_dataset_factory, resolve_reward

    errors = []
    for key, name, resolve in (("dataset.name", config.dataset.name, resolve_dataset_factory),
                               ("reward.name", config.reward.name, resolve_reward)):
        try:
            resolve(name)
        except TaskResolutionError as exc:
            errors.append(ConfigError(key, name, str(exc), "use a built-in name or package.module:function"))
    return errors


def check_tracking(config: RunConfig) -> list[ConfigError]:
    """The trackers asked for: their packages installed, W&B's mode known and its key present."""
    import os

    from areal_core.tracking import missing_packages

    errors: list[ConfigError] = []
    wandb = config.tracking.wandb
    if wandb is not None:
        _check(errors, wandb.mode in WANDB_MODES, "tracking.wandb.mode", wandb.mode,
               f"must be one of {', '.join(WANDB_MODES)}", "use offline (sync later with `wandb sync`)")
        _check(errors, wandb.mode != "online" or bool(os.environ.get("WANDB_API_KEY")),
               "tracking.wandb.mode", wandb.mode, "online W&B needs your API key and WANDB_API_KEY is not set",
               "export WANDB_API_KEY=... (it is read from the environment, never from the config or logged), "
               "or use tracking.wandb.mode=offline")
    for name, extra in missing_packages(config.tracking).items():
        key = "tracking.tensorboard" if name == "tensorboard" else f"tracking.{name}"
        errors.append(ConfigError(key, "set", f"the {name} tracker's package is not installed",
                                  f"pip install 'areal-core[{extra}]'"))
    return errors


def validate(config: RunConfig, registry: Registry) -> list[ConfigError]:
    """Every problem with ``config``; an empty list means the run can start."""
    errors = check_values(config) + check_model_dir(config) + check_tasks(config) + check_tracking(config)
    errors += check_adapters(config, errors)
    backend_errors = check_backends(config, registry)
    errors += backend_errors
    if not any(e.key in ("actor.backend", "rollout.backend") for e in backend_errors):
        errors += check_multi_adapter(config, registry)  # both installed: their declarations say
    if not backend_errors:
        for key, backend in (("actor.backend", config.actor.backend),
                             ("rollout.backend", config.rollout.backend)):
            try:
                found = registry.manager.hook.areal_validate_config(backend=backend, config=config)
            except Exception as exc:  # a plugin's own checks crashing is itself a finding
                found = [ConfigError(key, backend, f"the {backend} plugin's checks failed: {exc!r}",
                                     "report this to the plugin's authors")]
            errors += [e for e in (found or []) if e not in errors]
    return errors
