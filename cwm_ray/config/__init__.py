"""Typed job configs: one dataclass per job, YAML defaults in `configs/`, `key=value` overrides.

Each component's settings live in the module named after it (`models`, `train`, `annotate`, `serve`, `evaluate`,
`toy`), the loading and the command line in `core` and `cli`, the whole-config checks in `checks`. Every public
name is re-exported here, so `from cwm_ray.config import X` is the one import a caller needs. Each module imports
only modules before it in this order: base, toy, models, train, annotate, checks, core, serve, evaluate, cli.
`--help` reads each field's description from the docstring under it, in every module of this package
(`cli._source_docs`).
"""

from __future__ import annotations

from cwm_ray.config.annotate import (
    AnnotateConfig,
    CorpusInput,
    DecodeResources,
    FilterConfig,
    FramesConfig,
    StageResources,
    corpus_name,
)
from cwm_ray.config.base import (
    DEFAULT_OUTPUT_ROOT,
    REPO_ROOT,
    ROOT_KEY,
    ConfigError,
    StorageConfig,
    TrackingConfig,
    check_choice,
)
from cwm_ray.config.checks import (
    AT_LEAST_ONE,
    DATA_FIELDS,
    MIN_REAL_INPUT,
    OUTPUT_FIELDS,
    PATH_SETTINGS,
    PLACEHOLDER,
    check_ranges,
    check_toy_values,
    find_placeholders,
    joined_cluster,
    placeholder_message,
)
from cwm_ray.config.checks import (
    _leaves as _leaves,  # preflight and tests walk a config's settings
)
from cwm_ray.config.cli import (
    USAGE,
    describe,
    parse_cli,
)
from cwm_ray.config.cli import (
    _source_docs as _source_docs,  # tests read the parsed docs
)
from cwm_ray.config.core import (
    PROFILE_SECTIONS,
    expand_shorthands,
    from_dict,
    load,
    read_layer,
    to_dict,
    to_yaml,
)
from cwm_ray.config.evaluate import (
    AURORA_JUDGED_TASKS,
    PAPER_FINETUNE,
    REPRODUCE_REGIMES,
    REPRODUCE_ROWS,
    SINGLE_MODEL_IDM,
    SINGLE_MODEL_ROWS,
    EvaluateConfig,
    EvaluateIDMConfig,
    JudgeConfig,
    MetricsConfig,
    ReproduceConfig,
)
from cwm_ray.config.models import (
    DIFFUSERS_LORA_TARGETS,
    DTYPE_NAMES,
    IDM_LORA_EXPORTS,
    TOY,
    TRANSFORMERS_LORA_TARGETS,
    WORLD_MODEL_BACKENDS,
    IDMConfig,
    LoRAConfig,
    RecognitionConfig,
    TokenSamplingConfig,
    WorldModelConfig,
)
from cwm_ray.config.serve import (
    ServeConfig,
    ServeLimits,
    serve_config,
)
from cwm_ray.config.toy import (
    ToyCorpusConfig,
    ToyWorldConfig,
)
from cwm_ray.config.train import (
    DataSection,
    DataSource,
    DeepSpeedSection,
    OptimSection,
    ScalingSection,
    TrainIDMConfig,
    TrainSection,
    TrainWorldModelConfig,
    accumulation_steps,
)

__all__ = [
    "AT_LEAST_ONE",
    "AURORA_JUDGED_TASKS",
    "AnnotateConfig",
    "ConfigError",
    "CorpusInput",
    "DATA_FIELDS",
    "DEFAULT_OUTPUT_ROOT",
    "DIFFUSERS_LORA_TARGETS",
    "DTYPE_NAMES",
    "DataSection",
    "DataSource",
    "DecodeResources",
    "DeepSpeedSection",
    "EvaluateConfig",
    "EvaluateIDMConfig",
    "FilterConfig",
    "FramesConfig",
    "IDMConfig",
    "IDM_LORA_EXPORTS",
    "JudgeConfig",
    "LoRAConfig",
    "MIN_REAL_INPUT",
    "MetricsConfig",
    "OUTPUT_FIELDS",
    "OptimSection",
    "PATH_SETTINGS",
    "PLACEHOLDER",
    "PROFILE_SECTIONS",
    "REPO_ROOT",
    "PAPER_FINETUNE",
    "REPRODUCE_REGIMES",
    "SINGLE_MODEL_IDM",
    "SINGLE_MODEL_ROWS",
    "REPRODUCE_ROWS",
    "ROOT_KEY",
    "RecognitionConfig",
    "ReproduceConfig",
    "ScalingSection",
    "ServeConfig",
    "ServeLimits",
    "StageResources",
    "StorageConfig",
    "TOY",
    "TRANSFORMERS_LORA_TARGETS",
    "TokenSamplingConfig",
    "ToyCorpusConfig",
    "ToyWorldConfig",
    "TrackingConfig",
    "TrainIDMConfig",
    "TrainSection",
    "TrainWorldModelConfig",
    "USAGE",
    "WORLD_MODEL_BACKENDS",
    "WorldModelConfig",
    "accumulation_steps",
    "check_choice",
    "check_ranges",
    "check_toy_values",
    "corpus_name",
    "describe",
    "expand_shorthands",
    "find_placeholders",
    "from_dict",
    "joined_cluster",
    "load",
    "parse_cli",
    "placeholder_message",
    "read_layer",
    "serve_config",
    "to_dict",
    "to_yaml",
]
