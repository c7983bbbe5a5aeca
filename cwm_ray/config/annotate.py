"""Annotation settings (cwm_ray/annotate.py): frames, filtering, corpus inputs, stage resources, and the
job's config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cwm_ray.config.base import DEFAULT_OUTPUT_ROOT, ConfigError, StorageConfig, check_choice
from cwm_ray.config.models import TOY, IDMConfig, RecognitionConfig, WorldModelConfig


@dataclass
class FramesConfig:
    """Decoding and frame choice (the paper: top K_f = 6 frames by optical flow, at least I_f = 20 apart)."""

    motion_size: int = 64
    """Motion is measured on frames downscaled so their longer side is this many pixels. Farneback flow is most of
    the CPU a pair costs and grows with the pixels: on 224-px H.264 (the toy world at a VLM's input size, clean and
    with sensor noise) a 64-px copy chose pairs that show one whole action as often as a 128-px one (70/70 and
    71/71 against 65/65 and 67/67) at a quarter of the flow's cost (docs/benchmarks.md, decode CPU)."""
    max_side: int = 512
    """Stored frames keep the source resolution, downscaled only so their longer side is at most this (the
    IDM and the world model resize to their own input sizes later). The toy configs set 64."""
    motion: str = "farneback"
    """`farneback` (OpenCV dense optical flow magnitude) or `diff` (mean absolute frame difference, cheaper)."""
    k_frames: int = 6
    """K_f: motion peaks kept per video (non-maximum suppression, highest first)."""
    min_spacing: int = 20
    """I_f: kept peaks are at least this many frames apart."""
    pairing: str = "bracket"
    """`bracket`: each peak gives the pair (last still frame before it, first still frame after it), so a
    pair spans one movement; `consecutive`: consecutive kept peaks form pairs, the paper's rule."""
    max_span: int = 20
    """`bracket` looks at most this many frames either side of a peak."""
    quiet: float = 0.05
    """`bracket`: motion below this fraction of the peak counts as still."""
    still_frames: int = 2
    """`bracket`: the motion must stay still this many frames in a row to end a bracket (1: the first still
    frame ends it). 2 bridges one repeated frame inside an action, e.g. a frame the encoder skipped in a
    slow fade, which otherwise cut the pair short mid-action."""
    min_motion: float = 0.005
    """Peaks with less motion than this (mean flow in pixels, or mean |difference| in 0–255) are ignored;
    a fading toy object moves ~0.01 flow pixels per frame at 64 px, camera noise much less."""
    min_frames: int = 8
    """Videos with fewer decodable frames are an error row ("too short")."""
    max_frames: int = 100_000
    """Decoding stops after this many frames (guards against endless streams)."""
    image_format: str = "PNG"
    """Encoding of the stored frames: PNG or JPEG."""
    decode_threads: int = 1
    """FFmpeg threads decoding each video; 0 = FFmpeg's choice (one per core). Decode tasks already run one video
    each, in parallel, so 1 spends the least CPU per frame (224-px H.264: 0.08 ms a frame against 0.17 with
    FFmpeg's threads, docs/benchmarks.md); more helps only a machine with cores to spare and few videos."""
    shot_cuts: bool = True
    """Detect hard cuts (PySceneDetect's ContentDetector on the frames already decoded): a cut is never a motion
    peak, and no pair spans one, since a pair across a cut shows two scenes, not an action."""
    cut_threshold: float = 27.0
    """ContentDetector's threshold (its default): the mean change of hue, saturation and value (0-255) between
    two frames, at `motion_size`, at or above which the second frame starts a new shot."""

    def __post_init__(self) -> None:
        check_choice("frames.motion", self.motion, ("farneback", "diff"))
        check_choice("frames.pairing", self.pairing, ("bracket", "consecutive"))
        check_choice("frames.image_format", self.image_format, ("PNG", "JPEG", "png", "jpeg"))


@dataclass
class FilterConfig:
    """The stratified top-K filter (paper §Strategy 1): per corpus, round-robin over action classes."""

    budget: int = 7000
    """Triplets kept per corpus (the paper: 7K per source dataset)."""
    score: str = "sum"
    """Rank by the IDM's `sum` log-likelihood or its per-token `mean`."""
    class_rule: str = "verb_phrase"
    """`verb_phrase`: the first word plus `keep_words` in order ("put the cup on the table" → "put on");
    `first_word`; or `full` (the whole action text)."""
    keep_words: list[str] = field(default_factory=lambda: [
        "up", "down", "left", "right", "in", "into", "on", "onto", "off", "out", "over", "under", "above",
        "below", "behind", "next", "to", "from", "of", "away", "back", "open", "close", "closed",
    ])

    def __post_init__(self) -> None:
        check_choice("filter.score", self.score, ("sum", "mean"))
        check_choice("filter.class_rule", self.class_rule, ("verb_phrase", "first_word", "full"))


def corpus_name(uri: str) -> str:
    """A corpus's name from its URI: the last path part that is not a glob, without its extension
    (`s3://b/ego/` → `ego`, `/data/web.jsonl` → `web`, `/data/shards/*.tar` → `shards`)."""
    parts = [p for p in uri.replace("\\", "/").split("/") if p and not p.endswith(":")]
    while parts and any(c in parts[-1] for c in "*?["):
        parts.pop()
    name = Path(parts[-1]).stem if parts else ""
    if not name:
        raise ConfigError(f"cannot name a corpus after {uri!r}: give inputs=[{{name: NAME, uri: {uri}}}]")
    return name


@dataclass
class CorpusInput:
    """One named corpus; the triplet budget applies per corpus, as in the paper."""

    name: str = ""
    """The corpus's name in the outputs and the budget; empty = taken from `uri` (`corpus_name`), so an
    unnamed input is never silently called `toy`."""
    uri: str = "outputs/toy_corpus/videos"
    """A directory, a glob (`videos/*.mp4`), a manifest (.csv / .jsonl / .parquet with a `video_uri`
    column and an optional `dataset` column), an s3:// prefix, or webdataset .tar shards of videos."""

    def __post_init__(self) -> None:
        self.name = self.name or corpus_name(self.uri)


@dataclass
class StageResources:
    """Ray Data resources of one pipeline stage."""

    concurrency: int = 1
    """Actor pool size (model stages) or max parallel tasks (CPU stages, 0 = Ray's default)."""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 32
    torch_threads: int = 0
    """Torch threads in each actor; 0 = num_cpus (Ray's default), at least 1."""
    max_tasks_in_flight_per_actor: int = 2
    """Model stages: batches Ray Data hands each actor before it finishes one (Ray's
    `ActorPoolStrategy(max_tasks_in_flight_per_actor=…)`). 2 = the batch the model is on plus the next, whose
    rows are fetched to the actor while the model runs, so a GPU never waits on the transfer; more only queues
    batches behind a busy actor while another may sit idle at the end of the run."""


@dataclass
class DecodeResources(StageResources):
    """The decode stage: Ray Data tasks, one video each (read, decode, motion, cuts, frame choice, PNG)."""

    concurrency: int | str = 0
    """Most decode tasks at once: 0 = Ray's default (as many as free CPUs fit), a number, or `auto`: sized from
    measured costs so decoding keeps every IDM actor fed and no more, ceil(`headroom` x IDM actors x decode
    seconds per pair / IDM seconds per pair) tasks (docs/annotation.md, "Sizing the decode pool")."""
    pair_seconds: float | None = None
    """`auto`: one decode task's seconds per pair; None = measured in the driver on the first two videos to do
    (CPU seconds of one thread: a decode task's)."""
    idm_pair_seconds: float | None = None
    """`auto`: one IDM actor's seconds per pair; None = the last run's in this output (summary.json
    `stages.idm`, the StageClock's seconds inside the model per pair), else unknown: Ray's default this run."""
    headroom: float = 1.5
    """`auto`: decode capacity over the IDM's need, for videos that cost more than the sample and reads that
    wait on storage."""

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, str) and self.concurrency != "auto":
            raise ConfigError(f"bad value for config key 'decode.concurrency': {self.concurrency!r}; use a number "
                              "of tasks, 0 for Ray's default, or auto")


@dataclass
class AnnotateConfig:
    """`jobs/annotate.py`: videos → IDM-labelled, recognition-weighted, stratified triplets (Parquet)."""

    root: str | None = None
    """The storage root of a model profile (configs/real/): its sections write every path as `${root}/…`, so each
    stage reads what the one before it wrote. Set it once per run (`root=s3://<bucket>/<prefix>`); a placeholder
    bucket (s3://your-bucket/…) is refused before anything starts. Unused (None) by the toy YAMLs."""
    inputs: list[CorpusInput] = field(default_factory=lambda: [CorpusInput(name="toy")])
    """The corpora, each `{name, uri}`; on the command line `input=PATH` is one corpus named after its path."""
    output: str = f"{DEFAULT_OUTPUT_ROOT}/annotated"
    """Local directory or s3:// prefix; re-running into the same output resumes."""
    video_extensions: list[str] = field(default_factory=lambda: [".mp4", ".avi", ".mov", ".mkv", ".webm"])
    frames: FramesConfig = field(default_factory=FramesConfig)
    idm: IDMConfig = field(default_factory=IDMConfig)
    world_model: WorldModelConfig = field(default_factory=lambda: WorldModelConfig(model=TOY))
    """Only its encoder is used, for recognition weights: the base checkpoint's (frozen) encoder."""
    recognition: RecognitionConfig = field(default_factory=RecognitionConfig)
    """Maps stored with each triplet (`weights`), which a weighted world-model run then uses as stored; with
    `enabled` false the recognition stage does not run and no map is stored (a weighted run computes its own)."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    decode: DecodeResources = field(default_factory=lambda: DecodeResources(concurrency=0, num_cpus=0.5))
    """CPU tasks, one video each. Fractional CPUs so decode tasks run beside the actors on small machines."""
    idm_stage: StageResources = field(default_factory=lambda: StageResources(concurrency=1, batch_size=32))
    recognition_stage: StageResources = field(default_factory=lambda: StageResources(
        concurrency=1, num_cpus=0.25, batch_size=64, torch_threads=1))
    """The encoder pass is cheap next to the IDM's generation; give it a sliver of a CPU (or of a GPU)."""
    full_batches: bool = True
    """Re-block the decoded pairs into blocks of exactly `idm_stage.batch_size` rows before the IDM (Ray Data's
    strict streaming repartition), so every model call but the last gets a full batch. One video's pairs are one
    block; without it an IDM task took whole blocks up to a batch and called the model with a batch and then a
    remainder (59 calls for 554 pairs at batch 16), and a GPU call of 2 pairs costs nearly one of 16."""
    op_resource_reservation: bool = True
    """Ray Data's per-operator resource reservation (`DataContext.op_resource_reservation_enabled`, on by
    default in Ray), set on the pipeline's dataset only. It keeps a share of the cluster for each operator; on
    a small node whose model actors hold most CPUs, the decode tasks' share is a quarter CPU, so one video
    decodes at a time and the IDM waits (2 CPUs: IDM busy 0.50 of the steady time with it, 0.83 without;
    docs/benchmarks.md). Large clusters can keep Ray's default."""
    export_aurora: bool = True
    """Also write triplets as AURORA-format `aurora/train.json` + PNGs, which the trainers read."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    read_attempts: int = 3
    """Reads of a video (or a staging file) before a transient failure (storage, network) is given up for this run,
    with exponential backoff from `retry_backoff_s`; each read already has `storage.retries` S3 attempts. A video
    still failing becomes a transient error row, which the next run retries; a staging file fails the run."""
    retry_backoff_s: float = 1.0
    fail_once_in: str | None = None
    """Fault injection (tests, bench/): `idm` kills the IDM actor's process once, mid-run."""
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""

    def __post_init__(self) -> None:
        check_choice("fail_once_in", self.fail_once_in, (None, "idm"))
