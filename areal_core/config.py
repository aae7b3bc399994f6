"""The configuration tree of a run, with its defaults (DESIGN.md, "Configuration").

Plain attrs classes: field validators check types and ranges of single values as the tree is
built (``areal_core.config_loader``); the rules that need the registry or the model directory
(pair supported, rank allowed by the server, target modules present) live in
``areal_core.validation``. Every class is frozen: a run's configuration does not change.
"""

from __future__ import annotations

import attrs

ALL_LINEAR = "all-linear"
DTYPES = ("float32", "bfloat16", "float16")
AGREEMENT_POLICIES = ("stop", "warn", "off")
LR_SCHEDULES = ("constant", "linear", "cosine")
NORM_LEVELS = ("group", "batch")  # and None: no centring / no scaling
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _list_of_str(value) -> list[str]:
    return list(value) if value is not None else []


@attrs.frozen
class OptimizerConfig:
    """AdamW over the trainable parameters."""

    lr: float = 1e-3
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.99), converter=tuple)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # the learning rate of each optimizer step (areal_core.lr_schedule); reference-system names
    lr_scheduler_type: str = "constant"  # constant | linear | cosine
    warmup_steps_proportion: float = 0.0  # share of all optimizer steps spent warming up
    min_lr_ratio: float = 0.0  # linear/cosine decay ends at lr * min_lr_ratio


@attrs.frozen
class NormConfig:
    """Centring and scaling of rewards (per sample) or advantages (per token), as in the
    reference system: ``(x - mean) / (std + eps)`` over each group or the whole batch.
    ``mean_level``/``std_level``: group | batch | null (no centring / no scaling)."""

    mean_level: str | None = "group"
    std_level: str | None = "group"
    std_unbiased: bool = False  # std with n - 1 (the reference's default) instead of n
    eps: float = 1e-4
    group_size: int = 0  # 0: gconfig.n_samples (the only group size a GRPO batch has)


@attrs.frozen
class ActorConfig:
    """The training engine and the LoRA adapter it trains."""

    backend: str = "fsdp2"
    path: str = ""  # local HF model directory (config.json + *.safetensors)
    dtype: str = "float32"  # dtype of the base weights as loaded
    world_size: int = 1  # training ranks started by `areal train` on this machine
    device: str = "auto"  # auto | cpu | cuda
    use_lora: bool = True
    lora_rank: int = 16
    lora_alpha: float = 32
    target_modules: list[str] = attrs.field(factory=lambda: [ALL_LINEAR], converter=_list_of_str)
    peft_type: str = "lora"
    full_finetune: bool = False  # train every parameter (for comparison); exports no adapter
    optimizer: OptimizerConfig = attrs.field(factory=OptimizerConfig)
    gradient_checkpointing: bool = False
    # fsdp2: keep the adapter (and its AdamW state) whole on every rank instead of sharded, so
    # an export gathers nothing (gradients are all-reduced once per step instead)
    replicate_adapter: bool = False
    # fsdp2: keep the frozen base weights whole on every rank instead of sharded, so no layer is
    # all-gathered in the forward and again in the backward (for a base that fits every rank)
    replicate_base: bool = False
    # CPU: every tensor of 1 MiB or more is its own memory mapping, given back to the system when
    # freed (areal_core.host_allocator); false keeps glibc's heap reuse: no page faults of fresh
    # mappings, more resident memory
    release_freed_tensors: bool = True
    param_dtype: str = ""  # FSDP2 mixed precision: compute dtype of parameters ("" = as loaded)
    reduce_dtype: str = "float32"  # FSDP2 mixed precision: gradient reduction dtype
    max_tokens_per_microbatch: int = 8192
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1  # engines with tensor parallelism (megatron)
    # --- the PPO/GRPO objective (reference-system names; areal_core.grpo.loss, docs/rl-options.md)
    ppo_n_minibatches: int = 1  # optimizer steps per batch
    recompute_logprob: bool = False  # trainer's pre-update log-probs as the old policy (implied below)
    use_decoupled_loss: bool = False  # clip against the trainer's proximal policy, weight by prox/behav
    behav_imp_weight_cap: float | None = None  # decoupled: tokens whose prox/behav exceeds it are dropped
    eps_clip: float = 0.2
    eps_clip_higher: float | None = None  # DAPO clip-higher: upper bound 1 + eps_clip_higher
    c_clip: float | None = None  # dual clip for negative advantages (> 1)
    kl_ctl: float = 0.0  # k3 KL to the base policy (adapter disabled)
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    # --- rewards and advantages
    reward_scaling: float = 1.0  # reward -> (reward + reward_bias) * reward_scaling, then clipped
    reward_bias: float = 0.0
    reward_clip: float = 20.0
    reward_norm: NormConfig | None = attrs.field(factory=NormConfig)  # null: raw rewards
    adv_norm: NormConfig | None = None  # e.g. {mean_level: batch, std_level: batch}, over tokens
    overlong_reward_penalty: bool = False  # DAPO soft penalty over the last overlong_tokens
    overlong_tokens: int | None = None
    overlong_penalty_factor: float | None = None
    # --- DAPO dynamic sampling: groups with equal rewards dropped, refilled from the stream
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4  # refill rounds per step before training on what there is

    @property
    def uses_recomputed_logprobs(self) -> bool:
        """The trainer scores each batch before its update: asked for, or needed by the decoupled
        loss or by several minibatches (later minibatches' old policy must be pre-update)."""
        return self.recompute_logprob or self.use_decoupled_loss or self.ppo_n_minibatches > 1

    @property
    def resolved_target_modules(self) -> list[str]:
        """``[]`` means ``[all-linear]``, as in the reference system."""
        return list(self.target_modules) or [ALL_LINEAR]


@attrs.frozen
class RolloutConfig:
    """The inference servers that generate rollouts."""

    backend: str = "vllm"
    servers: list[str] = attrs.field(factory=list, converter=_list_of_str)  # empty: launch one
    max_head_offpolicyness: int = 0
    max_loras: int = 0  # adapters live at once on a server; 0 = derived from the window
    dtype: str = "float32"
    max_model_len: int = 256
    max_num_seqs: int = 32
    kv_cache_bytes: int = 256 * 1024 * 1024
    host: str = "127.0.0.1"  # where a launched server binds
    startup_timeout: float = 300.0
    request_timeout: float = 120.0
    max_concurrent_requests: int = 32
    max_restarts: int = 3  # recoveries of a server that died or went away, per run (0: stop at once)
    api_key_env: str = ""  # name of the environment variable holding a remote server's API key
    extra_args: list[str] = attrs.field(factory=list, converter=_list_of_str)


@attrs.frozen
class GenerationConfig:
    """How rollouts are sampled."""

    n_samples: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    lora_name: str = "lora"
    ignore_eos: bool = False  # rollouts do not stop at eos: every one has max_new_tokens tokens


@attrs.frozen
class TrainConfig:
    """The GRPO loop."""

    steps: int = 20
    batch_size: int = 16  # prompts per step (each sampled gconfig.n_samples times)
    seed: int = 1
    eval_every: int = 10
    eval_size: int = 0  # held-out prompts evaluated (0 = the dataset's whole eval split)
    # after each load: are the served weights the trainer's adapter? (areal_core.agreement)
    # YAML reads a bare `off` as false: that means "off" here
    agreement: str = attrs.field(default="stop", metadata={"yaml_false": "off"})  # stop | warn | off
    keep_adapters: int = 0  # adapter directories kept on disk (0 = all)
    checkpoint_every: int = 10  # steps between checkpoints (0: only at the end and on a stop)
    checkpoint_every_seconds: float = 0.0  # also checkpoint when this long passed since the last (0: off)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk (0 = all)
    collective_timeout: float = 600.0  # seconds a rank waits in a collective for the others


@attrs.frozen
class DatasetConfig:
    """Where prompts come from: a built-in name or an import path ``module:function``, called
    with ``options`` as keyword arguments (file paths go there, e.g. ``options.path``)."""

    name: str = "arithmetic"
    options: dict = attrs.field(factory=dict)


@attrs.frozen
class RewardConfig:
    """How a completion is scored: a built-in name or an import path ``module:function``."""

    name: str = "arithmetic"
    options: dict = attrs.field(factory=dict)


WANDB_MODES = ("offline", "online", "disabled")


@attrs.frozen
class WandbConfig:
    """Weights & Biases. ``online`` needs the user's key in ``WANDB_API_KEY`` (never logged)."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "areal"
    name: str = ""  # "": the output directory's name
    dir: str = ""  # "": output_dir (wandb writes <dir>/wandb/)


@attrs.frozen
class MlflowConfig:
    """MLflow: a tracking server's URI, or a local store."""

    tracking_uri: str = ""  # "": sqlite:///<output_dir>/mlflow.db (artifacts in <output_dir>/mlartifacts)
    experiment_name: str = "areal"
    run_name: str = ""  # "": the output directory's name


@attrs.frozen
class TrackingConfig:
    """Experiment trackers that get every scalar of metrics.jsonl each step (rank 0 only);
    areal_core.tracking names them by phase."""

    tensorboard: bool = False
    tensorboard_dir: str = ""  # "": <output_dir>/tensorboard
    wandb: WandbConfig | None = None  # e.g. {mode: offline, project: areal}
    mlflow: MlflowConfig | None = None  # e.g. {tracking_uri: "sqlite:///mlflow.db"}

    @property
    def any(self) -> bool:
        return bool(self.tensorboard or (self.wandb and self.wandb.mode != "disabled") or self.mlflow)


@attrs.frozen
class AdapterConfig:
    """One of several LoRA adapters trained side by side on the one frozen base (``adapters:``).

    ``areal_core.config_loader`` fills every key an entry leaves out from the run's own settings
    (``actor.*``, ``actor.optimizer`` key by key, ``train.batch_size``,
    ``rollout.max_head_offpolicyness``, ``gconfig`` key by key, ``dataset``, ``reward``), so a
    loaded entry is complete; the defaults below are those same settings' defaults.
    """

    name: str = ""
    lora_rank: int = 16
    lora_alpha: float = 32
    target_modules: list[str] = attrs.field(factory=lambda: [ALL_LINEAR], converter=_list_of_str)
    peft_type: str = "lora"
    optimizer: OptimizerConfig = attrs.field(factory=OptimizerConfig)
    batch_size: int = 16
    max_head_offpolicyness: int = 0
    gconfig: GenerationConfig = attrs.field(factory=GenerationConfig)
    dataset: DatasetConfig = attrs.field(factory=DatasetConfig)
    reward: RewardConfig = attrs.field(factory=RewardConfig)


#: The keys of an ``adapters:`` entry that default to a setting of the run, and where from.
ADAPTER_DEFAULTS_FROM = {
    "lora_rank": "actor.lora_rank",
    "lora_alpha": "actor.lora_alpha",
    "target_modules": "actor.target_modules",
    "peft_type": "actor.peft_type",
    "optimizer": "actor.optimizer",
    "batch_size": "train.batch_size",
    "max_head_offpolicyness": "rollout.max_head_offpolicyness",
    "gconfig": "gconfig",
    "dataset": "dataset",
    "reward": "reward",
}
#: Of those, the mappings an entry overrides key by key (the others it replaces whole).
ADAPTER_MERGED_KEYS = ("optimizer", "gconfig")


@attrs.frozen
class RunConfig:
    """The whole configuration of ``areal train``."""

    actor: ActorConfig = attrs.field(factory=ActorConfig)
    rollout: RolloutConfig = attrs.field(factory=RolloutConfig)
    gconfig: GenerationConfig = attrs.field(factory=GenerationConfig)
    train: TrainConfig = attrs.field(factory=TrainConfig)
    dataset: DatasetConfig = attrs.field(factory=DatasetConfig)
    reward: RewardConfig = attrs.field(factory=RewardConfig)
    tracking: TrackingConfig = attrs.field(factory=TrackingConfig)
    # several adapters on one base (areal_core.adapters); empty: the one adapter gconfig.lora_name
    adapters: list[AdapterConfig] = attrs.field(factory=list, converter=list)
    output_dir: str = "runs/default"
    resume: bool = False

    @property
    def multi_adapter(self) -> bool:
        """The run lists ``adapters:`` (even one): the run directory and metrics are per adapter."""
        return bool(self.adapters)
