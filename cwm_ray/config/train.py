"""Training settings (cwm_ray/train.py): scaling, DeepSpeed, data, optimizer and schedule, and the two
training jobs' configs."""

from __future__ import annotations

from dataclasses import dataclass, field

from cwm_ray.config.base import ConfigError, StorageConfig, TrackingConfig, check_choice
from cwm_ray.config.models import TOY, IDMConfig, RecognitionConfig, WorldModelConfig


@dataclass
class ScalingSection:
    """Maps onto Ray Train's ScalingConfig."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker. Keep some free for Ray Data, which feeds the workers."""
    torch_threads: int = 0
    """Torch threads per worker; 0 = this node's cores / workers (Ray would otherwise give it
    `cpus_per_worker` threads, which starves a CPU run)."""
    gpus_per_worker: float = 1.0
    """Used only with use_gpu."""


@dataclass
class DeepSpeedSection:
    enabled: bool = True
    zero_stage: int = 2
    """ZeRO stage 0, 1 or 2 (stage 3 shards parameters, which our export does not gather)."""
    bf16: bool = True
    """bf16 mixed precision; only applied on GPU (CPU trains in fp32 with gloo unless `bf16_cpu`)."""
    bf16_cpu: bool = False
    """On CPU, run the forward pass under torch's bf16 autocast (weights, gradients, all-reduce and AdamW stay
    fp32), as transformers' Trainer does for `bf16=True` on CPU. Pays off on CPUs with AVX512-BF16 or AMX."""
    gradient_clipping: float = 1.0
    """Max global gradient norm (0 = none); also applied when `enabled` is false (DDP)."""

    def __post_init__(self) -> None:
        check_choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2))


@dataclass
class DataSource:
    """One training source: an AURORA-format JSON (gold) or a Parquet directory of triplets."""

    uri: str = ""
    weight: float = 1.0
    """Sampling weight: the source is repeated (>1) or subsampled (<1) by this factor per epoch."""


@dataclass
class DataSection:
    sources: list[DataSource] = field(
        default_factory=lambda: [DataSource(uri="outputs/toy_corpus/gold/train.json")]
    )
    val_fraction: float = 0.05
    """Share of each source held out (deterministically, by id) for the validation loss."""
    max_rows: int | None = None
    """Cap per source, for quick runs."""
    shuffle_buffer: int = 1024
    materialize: bool = False
    """Read the training and validation sets once into Ray's object store (`Dataset.materialize`) instead of
    on every epoch: for sets that fit in memory, such as the toy gold set; not for streamed corpora."""


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    """AdamW's second-moment decay (transformers' `TrainingArguments` name and default). The toy IDM uses
    0.95, as LLaMA and GPT-3 pre-training do: with 0.999 its late tokens (the relation word) learn slowly."""
    adam_epsilon: float = 1e-8
    warmup_steps: int = 20
    batch_size: int = 32
    """Per-worker micro-batch size: the rows one forward pass holds, a cluster wiring's choice (GPU memory)."""
    global_batch_size: int | None = None
    """Rows per optimizer step, summed over workers: the recipe's (the paper: 64 for the IDM, 96 for the world
    model). Each worker accumulates gradients over global_batch_size / (scaling.num_workers × batch_size)
    micro-batches (DeepSpeed's `gradient_accumulation_steps`, or DDP's `no_sync`), so a wiring with more or fewer
    workers changes the speed, never the recipe; it must divide evenly. None = num_workers × batch_size, no
    accumulation (the toy configs)."""
    epochs: float | None = None
    """Passes over the training set. Set, it derives `max_steps` = ceil(epochs × training rows / global batch),
    the rows counted in the driver before training starts (gold items and Parquet ids, each source times its
    weight, without reading an image), and `max_steps` must be null. The real profiles set it (the paper's 10
    for the IDM, 40 for the world model), since their data size is not known when the profile is written."""
    max_steps: int | None = 1000
    """Total optimizer steps, or null with `epochs`; a resumed run continues to exactly this count."""
    schedule: str = "cosine"
    """Learning rate after warm-up: `cosine` (decays to 0 at max_steps) or `constant`."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("optim.schedule", self.schedule, ("cosine", "constant"))  # cwm_ray.train.SCHEDULES
        if (self.epochs is None) == (self.max_steps is None):
            raise ConfigError("set exactly one of optim.epochs and optim.max_steps (the other null): got "
                              f"epochs={self.epochs}, max_steps={self.max_steps}")
        for key in ("epochs", "max_steps", "batch_size", "global_batch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                least = "a positive number" if key == "epochs" else "1 or more"  # epochs may be fractional
                raise ConfigError(f"bad value for config key 'optim.{key}': {value}; use {least}")


def accumulation_steps(optim: OptimSection, scaling: ScalingSection) -> int:
    """Micro-batches each worker accumulates per optimizer step, so the global batch is `optim.global_batch_size`
    whatever the worker count; a ConfigError naming both ways out when it does not divide evenly."""
    per_step = scaling.num_workers * optim.batch_size
    if optim.global_batch_size is None:
        return 1
    steps, rest = divmod(optim.global_batch_size, per_step)
    if rest or steps < 1:
        fits = [b for b in range(1, optim.batch_size + 1)
                if optim.global_batch_size % (scaling.num_workers * b) == 0]
        hint = f"optim.batch_size={fits[-1]}" if fits else f"a worker count that divides {optim.global_batch_size}"
        raise ConfigError(
            f"optim.global_batch_size={optim.global_batch_size} is not a whole number of micro-batches of "
            f"scaling.num_workers={scaling.num_workers} x optim.batch_size={optim.batch_size} = {per_step}: "
            f"use {hint}, or change the global batch (the recipe) on purpose")
    return steps


@dataclass
class TrainSection:
    name: str = "toy"
    """Run name: a re-run with the same name and storage_path resumes from its latest checkpoint."""
    storage_path: str = "outputs/runs"
    """Local directory or s3:// prefix for Ray Train's checkpoints."""
    export: str = "outputs/models/toy"
    """Where the final model directory goes (local or s3://), loadable by path."""
    overwrite_export: bool = False
    """Let the export replace a model directory of another kind (an IDM, the other world-model backend, or one
    whose kind cannot be told). Off, that is an error before training starts: a trained model is never lost to
    a run that was meant to write elsewhere. Replacing a model of the same kind needs no setting."""
    log_every: int = 25
    eval_every: int = 250
    checkpoint_every: int = 250
    num_to_keep: int = 2
    max_failures: int = 2
    """Worker failures survived by restarting from the latest checkpoint."""
    fail_at_step: int | None = None
    """Fault injection for tests: the rank-0 worker stalls 5 s, then its process dies, at this step of its
    first attempt (the 5 s let Ray Train register the checkpoint reported just before)."""


@dataclass
class TrainIDMConfig:
    """`jobs/train_idm.py`: fine-tune (or, for `toy`, train from scratch) the IDM on triplets."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    idm: IDMConfig = field(default_factory=lambda: IDMConfig(model=TOY))
    train: TrainSection = field(
        default_factory=lambda: TrainSection(name="toy_idm", export="outputs/models/toy_idm")
    )
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""

    def __post_init__(self) -> None:
        if self.idm.lora_export == "adapter" and not self.idm.lora.enabled:
            raise ConfigError("idm.lora_export=adapter exports a LoRA adapter, but idm.lora.enabled is false (all "
                              "weights train): set idm.lora.enabled=true, or idm.lora_export=merged")
        accumulation_steps(self.optim, self.scaling)


@dataclass
class TrainWorldModelConfig:
    """`jobs/train_world_model.py`: the world model with the recognition-weighted loss."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    world_model: WorldModelConfig = field(default_factory=lambda: WorldModelConfig(model=TOY))
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    train: TrainSection = field(
        default_factory=lambda: TrainSection(name="toy_world_model", export="outputs/models/toy_world_model")
    )
    """`train.name` and `train.export` left at the diffusion toy's (`toy_world_model`) become the backend's own
    (`toy_token_world_model` for `token`, as configs/train_token_world_model.yaml sets): else switching the backend
    would resume the other backend's run and replace its model."""
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""

    def __post_init__(self) -> None:
        accumulation_steps(self.optim, self.scaling)
        backend = self.world_model.backend
        if backend != "diffusion":
            for key, default in (("name", "toy_world_model"), ("export", "outputs/models/toy_world_model")):
                if getattr(self.train, key) == default:
                    setattr(self.train, key, default.replace("toy_world_model", f"toy_{backend}_world_model"))
