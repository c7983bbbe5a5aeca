"""The toy world's settings and the toy corpus job's config (jobs/make_toy_corpus.py; cwm_ray/toyworld/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cwm_ray.config.base import DEFAULT_OUTPUT_ROOT, StorageConfig


@dataclass
class ToyWorldConfig:
    """The procedural world: what scenes look like and how actions animate."""

    image_size: int = 64
    """Frame side in pixels; must be a multiple of `grid`."""
    grid: int = 8
    """Objects sit on a grid x grid board of cells; one object per cell."""
    min_objects: int = 2
    max_objects: int = 4
    move_cells: int = 2
    """How far "move the X left" moves an object, in cells."""
    actions: list[str] = field(
        default_factory=lambda: ["move", "remove", "add", "recolor", "put"]
    )
    """Action kinds to sample; see cwm_ray.toyworld.actions.KINDS."""
    frames_per_action: int = 10
    """Length of each action's animation in video frames."""
    idle_frames_min: int = 12
    idle_frames_max: int = 24
    """Still frames between actions (uniform in [min, max]); keeps actions apart for frame choice."""
    fps: int = 10


@dataclass
class ToyCorpusConfig:
    """`jobs/make_toy_corpus.py`: unlabelled videos with a ground-truth sidecar, plus gold triplets."""

    output: str = f"{DEFAULT_OUTPUT_ROOT}/toy_corpus"
    """Local directory or s3:// prefix to write to."""
    seed: int = 0
    num_videos: int = 48
    actions_per_video: int = 8
    num_train: int = 2000
    """Gold training triplets (AURORA format, `instruction` key)."""
    num_test: int = 300
    """Held-out test triplets on scenes never seen in training (AURORA-Bench format, `prompt` key)."""
    crf: int = 18
    """H.264 constant rate factor of the videos (lower = higher quality)."""
    pix_fmt: str = "yuv444p"
    """H.264 pixel format. yuv420p (what most corpora use) halves the chroma resolution, and a toy object is
    only 8 pixels wide: its colour bleeds into its neighbours, and the toy IDM (trained on renders) explained
    91 % of rendered test pairs but 40 % of the same pairs through yuv420p; 91 % through yuv444p."""
    gold_from_video: bool = False
    """Decode gold frames from an H.264 clip of the action (as a labelled video corpus gives them) instead of
    writing lossless renders. Off by default: with yuv444p the codec no longer hurts the toy IDM, and trained
    on codec frames it explained 83 % of test pairs against 91 % trained on renders (one run each)."""
    train_kind_weights: dict[str, float] = field(default_factory=dict)
    """Relative odds of each action kind in the gold *training* set (kinds left out weigh 1; empty = uniform).
    The test set and the videos stay uniform, so accuracy figures compare across settings."""
    world: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    allow_toy: bool = False
    """Let a run on a joined cluster (RAY_ADDRESS set) or on GPUs use toy values: a `toy` model, the toy corpus
    (outputs/toy_corpus/...), relative output paths. Off, `check_toy_values` refuses them there: a random model, or
    outputs lost with the job's temporary working directory, is never what a cluster run means."""
