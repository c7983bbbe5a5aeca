"""Evaluation settings (cwm_ray/evaluate/): metrics, the judge, the evaluation jobs and the reproduction driver."""

from __future__ import annotations

from dataclasses import dataclass, field

from cwm_ray.config.annotate import AnnotateConfig, StageResources
from cwm_ray.config.base import DEFAULT_OUTPUT_ROOT, REPO_ROOT, ConfigError, StorageConfig, TrackingConfig
from cwm_ray.config.core import load
from cwm_ray.config.models import IDMConfig, WorldModelConfig
from cwm_ray.config.toy import ToyCorpusConfig, ToyWorldConfig
from cwm_ray.config.train import TrainIDMConfig, TrainWorldModelConfig


@dataclass
class MetricsConfig:
    """Automatic metrics. Copying the source wins L1 / CLIP-I / DINO, so they are reported, never trusted alone."""

    l1: bool = True
    """Mean absolute pixel difference to the reference (0 = identical), at the reference's size."""
    clip_model: str | None = None
    """CLIP-I: cosine of CLIP image embeddings, by Hugging Face id or path (e.g. openai/clip-vit-base-patch32)."""
    dino_model: str | None = None
    """DINO: cosine of DINO [CLS] features, by id or path (e.g. facebook/dinov2-small)."""
    toy_judge: bool = False
    """The toy world's exact judge (edit success, minimal edit, min; 0–10): only for toy-world sets."""
    idm_agreement: bool = True
    """Does the IDM, shown source → prediction, say the instruction back (exact match after normalising)?"""
    device: str = "auto"


@dataclass
class JudgeConfig:
    """The VIEScore-style LLM judge through any OpenAI-compatible chat-completions endpoint."""

    enabled: bool = False
    base_url: str | None = None
    """e.g. https://api.openai.com/v1 or a local vLLM server; None = the openai client's default."""
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key (never the key itself in a config)."""
    max_concurrency: int = 4
    max_retries: int = 4
    """Retries with exponential backoff on connection errors, 429 and 5xx (the openai client's own)."""
    timeout_s: float = 120.0
    temperature: float = 0.0
    cache_dir: str = f"{DEFAULT_OUTPUT_ROOT}/judge_cache"
    """Answers cached by a hash of (model, prompt, images): re-running an evaluation costs nothing."""


AURORA_JUDGED_TASKS = ("magicbrush", "ag", "something", "whatsup", "kubric")
"""AURORA-Bench's `task` names of the paper's five judged subsets (MagicBrush, Action-Genome, Something-Something,
WhatsUp, Kubric): the ones with a reference frame. Its other three (clevr, emu, epic) have none."""


@dataclass
class EvaluateConfig:
    """`jobs/evaluate.py`: AURORA-format benchmark → predictions (best-of-N) → metrics, judge, report."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    bench: str = f"{DEFAULT_OUTPUT_ROOT}/toy_corpus/gold/test.json"
    """AURORA-format JSON (local or s3://): a list of {input, output?, prompt | instruction, task, ...}."""
    tasks: list[str] = field(default_factory=list)
    """Only these tasks (empty = all)."""
    headline_tasks: list[str] = field(default_factory=lambda: list(AURORA_JUDGED_TASKS))
    """The headline score is the primary metric (the LLM judge's min(edit success, minimal edit)) averaged over
    these tasks, each task's mean weighing alike, as the paper reports AURORA-Bench: its five judged subsets.
    Empty = every task in the bench (the toy configs). The mean over all items stays in the report as "all tasks"."""
    max_items: int | None = None
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    idm: IDMConfig = field(default_factory=IDMConfig)
    """The verifier of best-of-N (and of the `idm_agreement` metric)."""
    best_of: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Search widths to evaluate. Candidate j's noise depends only on (seed, item, j), so one run of
    max(best_of) candidates gives every smaller N exactly: N uses the first N candidates."""
    seed: int = 0
    endpoint: str | None = None
    """http://host:8000 of a running Serve app: predictions come from its /v1/predict instead."""
    endpoint_api_key_env: str = "CWM_API_KEY"
    endpoint_concurrency: int = 4
    world_model_stage: StageResources = field(default_factory=lambda: StageResources(concurrency=1, batch_size=8))
    verifier_stage: StageResources = field(default_factory=lambda: StageResources(concurrency=1, batch_size=8))
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    """The toy world's geometry, for `metrics.toy_judge`."""
    baselines: list[str] = field(default_factory=lambda: ["copy"])
    """`copy` scores the source itself as the prediction: the paper's reminder that L1 favours doing nothing."""
    output: str = f"{DEFAULT_OUTPUT_ROOT}/eval"
    """Local directory or s3:// prefix: report/index.html, plots, results.json, results.parquet."""
    report_examples: int = 12
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""


@dataclass
class EvaluateIDMConfig:
    """`jobs/evaluate_idm.py`: the IDM's accuracy on an AURORA-format test set, or of annotation's kept actions."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    bench: str | None = f"{DEFAULT_OUTPUT_ROOT}/toy_corpus/gold/test.json"
    """AURORA-format JSON (local or s3://) with both frames per item; the IDM labels every pair."""
    triplets: str | None = None
    """Instead of `bench`: a Parquet directory from `jobs/annotate.py` (triplets/ or pairs/), scored as stored."""
    tasks: list[str] = field(default_factory=list)
    max_items: int | None = None
    """First items per task (as in `jobs/evaluate.py`)."""
    idm: IDMConfig = field(default_factory=IDMConfig)
    batch_size: int = 100
    """Pairs per `label` call."""
    toy_judge: bool = True
    """Also score `explains` with the toy world's exact parser (turn off for real benchmarks)."""
    text_metrics: bool = True
    """Score each action against its reference text as the paper scores its IDM: corpus BLEU (sacrebleu's
    defaults, on a 0–1 scale), ROUGE-1 and ROUGE-L F1 (rouge-score, Porter stemming) and, with `bertscore_model`,
    BERTScore F1 (bert-score), beside `exact`. Bench only: annotation's triplets have no reference."""
    bertscore_model: str | None = None
    """BERTScore's encoder by Hugging Face id or local / s3:// path (bert-score's English default is
    `roberta-large`, as the real profiles set); None = no BERTScore."""
    bertscore_layers: int | None = None
    """The encoder layer whose features are matched; None = bert-score's tuned layer for a model it knows (17 for
    roberta-large), else the model's last layer."""
    bertscore_rescale: bool = False
    """Rescale with bert-score's English baseline for `bertscore_model` (shipped for its known models), which spreads
    the raw scores (0.8–1 for most English pairs) over about 0–1; the real profiles set it."""
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    output: str = f"{DEFAULT_OUTPUT_ROOT}/eval_idm"
    """Local directory or s3:// prefix: results.json (rates overall and per task) and rows.jsonl."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""


REPRODUCE_ROWS = ("a", "b", "b_oracle", "c")
"""The table's rows, as `best_of_rows` names them (`ROWS` in cwm_ray/evaluate/reproduce.py says what each trains on;
this module cannot import the evaluate package)."""
REPRODUCE_REGIMES = ("scratch", "finetuned", "single")
SINGLE_MODEL_ROWS = ("b", "c")
"""Rows the `single` regime can train: those whose synthetic labels come from the IDM, here the model's own."""
SINGLE_MODEL_IDM = ("idm.lora.enabled=true", "idm.lora_export=adapter",
                    "idm.lora.modules_to_save=[model.vision_model,model.aligner,lm_head]")
"""`ReproduceConfig.single_model_idm_overrides`' default: the IDM as a LoRA adapter over the pretrained toy Janus
(its Llama adapted at the paper's r16/α32), exported alone, with the understanding path trained whole beside it:
the toy Janus was pretrained only as a world model, so its SigLIP, aligner and text head have never seen a
gradient (Janus-Pro's have; a real run adapts the Llama only, configs/real/janus_pro_7b_self.yaml)."""
PAPER_FINETUNE = ("world_model.lora.enabled=true", "world_model.lora.r=16", "world_model.lora.alpha=32",
                  "optim.lr=5e-4", "optim.warmup_steps=20", "optim.global_batch_size=32", "optim.max_steps=null",
                  "optim.epochs=10")
"""`ReproduceConfig.finetune_overrides`' default: the paper's fine-tuning recipe (PAPER.md), at the toy's batch."""


@dataclass
class ReproduceConfig:
    """`jobs/reproduce.py`: the paper's ablation table in miniature on the toy world, from nothing.

    Each stage loads its own job's YAML (configs/toy.yaml, train_idm.yaml, annotate.yaml,
    `world_model_config`, evaluate.yaml) and applies the `*_overrides` below, so the stages run
    exactly as the jobs do; only paths move under `output`.
    """

    output: str = f"{DEFAULT_OUTPUT_ROOT}/reproduce"
    seeds: int = 1
    """Seeds 0..seeds−1: each trains the IDM, annotates, trains every row's world model and evaluates again on one
    corpus; the table gives each figure's mean ± spread (sample standard deviation) over seeds, and a difference
    between rows counts only beyond the spread. 3 to judge the table's claims."""
    rows: list[str] = field(default_factory=lambda: list(REPRODUCE_ROWS))
    """Rows (a, b, b_oracle, c) the `scratch` and `finetuned` regimes train; default all four. Fewer buy time for a
    question that needs only some, e.g. `rows=[b]` with `regimes=[finetuned,single]` for the single model against
    the separate IDM: a claim whose rows are missing is left out of the table."""
    best_of: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    best_of_rows: list[str] = field(default_factory=lambda: ["b", "c"])
    """Rows (a, b, b_oracle, c) whose world model is also evaluated at best-of-N for N in `best_of`; the others with
    one sample. (b) as well as the paper's (c): while recognition weighting costs the scene (row c's minimal edit),
    best-of-N over (c) has nothing to choose from, and what N adds shows on (b)."""
    synthetic_weight: float = 1.0
    """Sampling weight of the synthetic triplets beside the gold set (rows b, b′ and c)."""
    reuse: bool = True
    """Skip a stage finished under the same fingerprint (its resolved config and its inputs' fingerprints, kept in
    `stages/` under `output`) and resume one that crashed; false redoes every stage from nothing."""
    corpus_overrides: list[str] = field(default_factory=list)
    idm_overrides: list[str] = field(default_factory=list)
    annotate_overrides: list[str] = field(default_factory=list)
    world_model_config: str = "train_world_model.yaml"
    """The YAML in configs/ every row's world model trains from: train_world_model.yaml (the diffusion toy) or
    train_token_world_model.yaml (the token toy, the paper's kind). Its backend also reaches annotation (whose
    encoder gives the recognition weights) and evaluation."""
    world_model_overrides: list[str] = field(default_factory=list)
    evaluate_overrides: list[str] = field(default_factory=lambda: ["max_items=20"])
    """Default: 20 test items per action kind (100 items), judged for every row and N."""
    regimes: list[str] = field(default_factory=lambda: ["scratch"])
    """How every row's world model starts: `scratch` (from its YAML's model, as `world_model_overrides` train it)
    and/or `finetuned` (LoRA on one world model pretrained once, on `pretrain_gold` triplets of scenes the table
    never uses: the paper's regime, `finetune_overrides`), and/or `single` (the `single_model_rows` fine-tuned
    likewise, with the pretrained model's own IDM adapter in place of the separate IDM: the paper's single-model
    setting). Each gives the table its rows side by side; configs/reproduce.yaml asks for all three."""
    pretrain_gold: int = 10000
    """Gold triplets of the pretraining set (every action kind, none of the corpus's gold or test scenes)."""
    pretrain_overrides: list[str] = field(default_factory=list)
    """The pretraining run's overrides over `world_model_config` (alone: the rows' `world_model_overrides` do not
    apply). It trains once, for every seed, and is reused while its config and the corpus stay the same."""
    finetune_overrides: list[str] = field(default_factory=lambda: list(PAPER_FINETUNE))
    """The `finetuned` rows' overrides, after `world_model_overrides`, on the pretrained model: the paper's LoRA
    r16/α32, lr 5e-4, a fixed global batch and a schedule in epochs (so row (b), with ~3x the data, takes ~3x the
    steps of row (a), as an epoch schedule does in the paper)."""
    single_model_rows: list[str] = field(default_factory=lambda: ["b"])
    """Rows of the `single` regime (the paper's single-model setting: one pretrained model is the IDM and the world
    model, with two LoRA adapters): each fine-tunes the pretrained world model as its `finetuned` twin does, on
    the videos annotated by the model's own IDM adapter, which also verifies its best-of-N. Only rows whose
    labels come from the IDM: b, c."""
    single_model_idm_overrides: list[str] = field(default_factory=lambda: list(SINGLE_MODEL_IDM))
    """The `single` regime's IDM adapter training: train_idm.yaml with `idm.model` the pretrained world model, then
    `idm_overrides`, then these."""
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"bad value for config key 'seeds': {self.seeds}; use 1 or more")
        unknown = [r for r in self.rows if r not in REPRODUCE_ROWS]
        if unknown or not self.rows or len(set(self.rows)) != len(self.rows):
            raise ConfigError(f"bad value for config key 'rows': {self.rows}; use one or more of "
                              f"{', '.join(REPRODUCE_ROWS)}")
        unknown = [r for r in self.best_of_rows if r not in REPRODUCE_ROWS]
        if unknown:
            raise ConfigError(f"bad value for config key 'best_of_rows': {unknown}; rows are "
                              f"{', '.join(REPRODUCE_ROWS)}")
        if not self.regimes or any(r not in REPRODUCE_REGIMES for r in self.regimes) \
                or len(set(self.regimes)) != len(self.regimes):
            raise ConfigError(f"bad value for config key 'regimes': {self.regimes}; use one or both of "
                              f"{', '.join(REPRODUCE_REGIMES)}")
        unknown = [r for r in self.single_model_rows if r not in SINGLE_MODEL_ROWS]
        if unknown or ("single" in self.regimes and not self.single_model_rows):
            raise ConfigError(f"bad value for config key 'single_model_rows': {self.single_model_rows}; use one "
                              f"or more of {', '.join(SINGLE_MODEL_ROWS)} (the rows labelled by the IDM)")
        if self.pretrain_gold < 1:
            raise ConfigError(f"bad value for config key 'pretrain_gold': {self.pretrain_gold}; use 1 or more")
        if not (REPO_ROOT / "configs" / self.world_model_config).is_file():
            raise ConfigError(f"bad value for config key 'world_model_config': {self.world_model_config!r}; "
                              f"no such file in {REPO_ROOT / 'configs'}")
        # Each stage's overrides are checked against that stage's job config now, as the stage will load them:
        # a typo in evaluate_overrides used to surface only after the IDM had trained and the videos were annotated.
        stages = {"corpus_overrides": (ToyCorpusConfig, "toy.yaml"),
                  "idm_overrides": (TrainIDMConfig, "train_idm.yaml"),
                  "annotate_overrides": (AnnotateConfig, "annotate.yaml"),
                  "world_model_overrides": (TrainWorldModelConfig, self.world_model_config),
                  "evaluate_overrides": (EvaluateConfig, "evaluate.yaml")}
        stages |= {"pretrain_overrides": (TrainWorldModelConfig, self.world_model_config),
                   "finetune_overrides": (TrainWorldModelConfig, self.world_model_config),
                   "single_model_idm_overrides": (TrainIDMConfig, "train_idm.yaml")}
        for key, (cls, yaml_name) in stages.items():
            overrides = getattr(self, key)
            if key == "finetune_overrides":  # applied after the rows' own, as the fine-tuned rows load them
                overrides = [*self.world_model_overrides, *overrides]
            if key == "single_model_idm_overrides":
                overrides = [*self.idm_overrides, *overrides]
            try:
                load(cls, REPO_ROOT / "configs" / yaml_name, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{key}, checked against {cls.__name__} (configs/{yaml_name}): "
                                  + str(exc).replace("(from command line)", f"(in {key})")) from None
        if "single" in self.regimes:
            backend = load(TrainWorldModelConfig, REPO_ROOT / "configs" / self.world_model_config,
                           self.pretrain_overrides).world_model.backend
            if backend != "token":
                raise ConfigError(f"regimes: `single` makes the pretrained world model the IDM too, which needs an "
                                  f"early-fusion model (world_model.backend=token, e.g. world_model_config="
                                  f"train_token_world_model.yaml); {self.world_model_config} trains a {backend} one")
