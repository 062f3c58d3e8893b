"""The model holder: loads the base model once and is the only code that changes it.

Every change to the resident model goes through a context manager here whose exit undoes it,
even when the block raises or is cancelled:
- `applied(output)`: the merged deltas added to the weights in place (`apply`/`restore` keep the
  original bits of every touched weight); `deltas_applied(modules, delta)` the same for deltas
  that are not one merge's (RegMean++: merged earlier layers beside one task's own layer);
- `head(tensors)`: a task's own head (modules_to_save) swapped in;
- `hooked(hooks)`: forward hooks on named modules (AdaMerging's factored deltas);
- `inputs_seen(observers)`: forward pre-hooks that see each named module's input and change
  nothing (RegMean's Gram collection);
- `frozen()`: every parameter without gradients (training touches only outside tensors);
- `cpu_float32()`: a CPU float32 holder for the block: this holder when it already is one,
  else a second copy loaded from the same path and released afterwards (AdaMerging's
  `force_cpu`).
`frozen`, `hooked`, `inputs_seen`, `applied` and `deltas_applied` hold the holder's lock, so no other job sees the model changed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from merging_core.engine.merge import MergeOutput
from merging_core.evaluation.audio import AudioColumns, ClipStore
from merging_core.errors import ConfigError, EvaluationError
from merging_core.runtime.cancel import CancelToken, check

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENCODING_CACHE_BATCHES = 512  # padded batches kept by ModelHolder.encode (a few MB)
FEATURE_CACHE_BATCHES = 16  # feature batches kept by ModelHolder.features (Whisper: ~1 MB a clip)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def _auto_class(model_class: str):  # type: ignore[no-untyped-def]
    import transformers

    classes = {
        "sequence_classification": transformers.AutoModelForSequenceClassification,
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq2seq_lm": transformers.AutoModelForSeq2SeqLM,
        "speech_seq2seq": transformers.AutoModelForSpeechSeq2Seq,
    }
    if model_class not in classes:
        raise ConfigError(f"unknown model_class {model_class!r}; use one of {', '.join(classes)}")
    return classes[model_class]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings off for the block (errors still shown), for calls whose warnings
    are expected and nothing a user can act on."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _head_target(key: str) -> tuple[str, str]:
    """`classifier.modules_to_save.default.weight` or `classifier.weight` -> (classifier, weight)."""
    parts = key.split(".")
    if "modules_to_save" in parts:
        index = parts.index("modules_to_save")
        parts = parts[:index] + parts[index + 2 :]
    return ".".join(parts[:-1]), parts[-1]


class ModelHolder:
    """One resident base model per worker."""

    load_count = 0  # class-wide: how many times any holder loaded a base model

    def __init__(
        self,
        model_path: str | Path,
        *,
        model_class: str = "sequence_classification",
        dtype: str = "float32",
        device: str = "auto",
    ) -> None:
        from transformers import AutoProcessor, AutoTokenizer

        self.model_path = Path(model_path)
        self.model_class = model_class
        self.device = resolve_device(device)
        if dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = _DTYPES[dtype]
        log.info("loading base model %s on %s (%s)", self.model_path, self.device, self.dtype)
        # A speech model comes with its processor: the feature extractor and the tokenizer.
        self.feature_extractor = None
        if model_class == "speech_seq2seq":
            processor = AutoProcessor.from_pretrained(self.model_path)
            self.feature_extractor = processor.feature_extractor
            self.tokenizer = processor.tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # The task heads come from the adapters, so transformers' report of a freshly
        # initialised classifier is expected noise here.
        with quiet_transformers():
            self.model: nn.Module = _auto_class(model_class).from_pretrained(self.model_path, dtype=self.dtype)
        self.model.to(self.device).eval()
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        ModelHolder.load_count += 1
        self._modules: dict[str, nn.Module] = dict(self.model.named_modules())
        self._saved_weights: dict[str, torch.Tensor] = {}
        self.lock = threading.RLock()
        self._encodings: OrderedDict[tuple[int, str, tuple[str, ...]], dict[str, torch.Tensor]] = OrderedDict()
        self.clips = ClipStore()  # audio inputs of speech tasks, by content key
        self._features: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()

    # --- inputs ----------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], max_length: int,
               add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """Tokenise one padded batch onto the model's device (`add_special_tokens=False` for text
        that brings its own, e.g. a rendered chat template). Sweeps evaluate the same batches
        every trial, so recent batches are kept (bounded LRU) instead of re-tokenised."""
        key = (max_length, str(self.tokenizer.padding_side), str(self.tokenizer.truncation_side),
               add_special_tokens, tuple(texts))
        cached = self._encodings.get(key)
        if cached is not None:
            self._encodings.move_to_end(key)
            return cached
        encoded = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt",
            add_special_tokens=add_special_tokens,
        )
        batch = {name: tensor.to(self.device) for name, tensor in encoded.items()}
        self._encodings[key] = batch
        if len(self._encodings) > ENCODING_CACHE_BATCHES:
            self._encodings.popitem(last=False)
        return batch

    def audio_columns(self, column: str, sample_rate_column: str | None) -> AudioColumns:
        """How a speech task's clips are read for this model (its rate, its longest clip)."""
        if self.feature_extractor is None:
            raise ConfigError(f"audio inputs need a speech model (model_class speech_seq2seq), not {self.model_class}")
        extractor = self.feature_extractor
        chunk = getattr(extractor, "chunk_length", None)
        return AudioColumns(column, sample_rate_column, int(extractor.sampling_rate),
                            float(chunk) if chunk else None)

    def features(self, keys: Sequence[str]) -> torch.Tensor:
        """The feature extractor's input features of a batch of clips, on the model's device and
        dtype (Whisper: log-mel spectrograms padded to 30 s). Recent batches are kept (bounded
        LRU), as for text."""
        key = tuple(keys)
        cached = self._features.get(key)
        if cached is not None:
            self._features.move_to_end(key)
            return cached
        assert self.feature_extractor is not None, "features() needs a speech model"
        extracted = self.feature_extractor([self.clips.samples(k) for k in keys],
                                           sampling_rate=self.feature_extractor.sampling_rate, return_tensors="pt")
        batch = extracted["input_features"].to(self.device, self.dtype)
        self._features[key] = batch
        if len(self._features) > FEATURE_CACHE_BATCHES:
            self._features.popitem(last=False)
        return batch

    def decoder_prefix(self) -> list[int]:
        """The decoder's start for transcription: the start token, then "no timestamps" where
        the model has one (Whisper: `<|startoftranscript|><|notimestamps|>`)."""
        config = self.model.generation_config
        start = config.decoder_start_token_id
        if start is None:
            raise EvaluationError(f"{self.model_path}: the generation config names no decoder_start_token_id")
        prefix = [int(start)]
        no_timestamps = getattr(config, "no_timestamps_token_id", None)
        if no_timestamps is not None:
            prefix.append(int(no_timestamps))
        return prefix

    # --- weights ---------------------------------------------------------------------------

    def _weight(self, module: str) -> torch.Tensor:
        target = self._modules.get(module)
        if target is None or not isinstance(getattr(target, "weight", None), torch.Tensor):
            raise EvaluationError(
                f"the base model has no weight for adapter module {module!r}; was the adapter "
                f"trained on {self.model_path.name} with model_class {self.model_class}?"
            )
        return target.weight

    def apply(self, output: MergeOutput, cancel: CancelToken | None = None) -> None:
        """Add the merged deltas in place; only one merge may be applied at a time."""
        self.apply_deltas(output.modules, output.delta, output.adapters[0].fan_in_fan_out, cancel)

    def apply_deltas(self, modules: Sequence[str], delta: Callable[[str], torch.Tensor], fan_in_fan_out: bool,
                     cancel: CancelToken | None = None) -> None:
        """Add `delta(module)` (out x in, LoRA orientation) to each module's weight in place; only
        one set of deltas may be applied at a time."""
        if self._saved_weights:
            raise EvaluationError("a merge is already applied; restore() first")
        try:
            with torch.no_grad():
                for module in modules:
                    check(cancel)
                    weight = self._weight(module)
                    change = delta(module)
                    if fan_in_fan_out:
                        change = change.T
                    if change.shape != weight.shape:
                        raise EvaluationError(
                            f"module {module}: delta {tuple(change.shape)} does not fit weight "
                            f"{tuple(weight.shape)}"
                        )
                    self._saved_weights[module] = weight.detach().clone()
                    weight.add_(change.to(device=weight.device, dtype=weight.dtype))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Put back the original weights bit for bit."""
        with torch.no_grad():
            for module, original in self._saved_weights.items():
                self._weight(module).copy_(original)
        self._saved_weights.clear()

    @property
    def is_pristine(self) -> bool:
        return not self._saved_weights

    @contextmanager
    def applied(self, output: MergeOutput | None, cancel: CancelToken | None = None) -> Iterator[None]:
        """Apply a merge (or nothing, for the base model) for the duration of the block."""
        if output is None:
            with self.lock:
                yield
            return
        with self.deltas_applied(output.modules, output.delta, output.adapters[0].fan_in_fan_out, cancel):
            yield

    @contextmanager
    def deltas_applied(self, modules: Sequence[str], delta: Callable[[str], torch.Tensor], fan_in_fan_out: bool,
                       cancel: CancelToken | None = None) -> Iterator[None]:
        """`apply_deltas` for the duration of the block (RegMean++: merged earlier layers beside
        one task's own later ones)."""
        with self.lock:
            self.apply_deltas(modules, delta, fan_in_fan_out, cancel)
            try:
                yield
            finally:
                self.restore()

    # --- heads -----------------------------------------------------------------------------

    @contextmanager
    def head(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Swap in a task's own head (its modules_to_save tensors) for the block."""
        originals: list[tuple[nn.Module, str, nn.Parameter | None, int | None]] = []
        try:
            for key, tensor in tensors.items():
                module_name, attribute = _head_target(key)
                module = self._modules.get(module_name)
                if module is None:
                    raise EvaluationError(f"the base model has no module {module_name!r} for head {key}")
                original = getattr(module, attribute, None)
                out_features = getattr(module, "out_features", None)
                originals.append((module, attribute, original, out_features))
                setattr(
                    module,
                    attribute,
                    nn.Parameter(tensor.to(self.device, self.dtype), requires_grad=False),
                )
                if attribute == "weight" and out_features is not None:
                    module.out_features = int(tensor.shape[0])
            yield
        finally:
            for module, attribute, original, out_features in reversed(originals):
                setattr(module, attribute, original)
                if out_features is not None:
                    module.out_features = out_features

    # --- hooks, gradients, copies -------------------------------------------------------------

    @contextmanager
    def hooked(
        self, hooks: Mapping[str, Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]]
    ) -> Iterator[None]:
        """Forward hooks on the named modules for the block; removed on exit."""
        with self.lock:
            handles = []
            try:
                for name, hook in hooks.items():
                    module = self._modules.get(name)
                    if module is None:
                        raise EvaluationError(f"the base model has no module {name!r} to hook")
                    handles.append(module.register_forward_hook(hook))
                yield
            finally:
                for handle in handles:
                    handle.remove()

    @contextmanager
    def inputs_seen(self, observers: Mapping[str, Callable[[torch.Tensor], None]]) -> Iterator[None]:
        """`observers[name](x)` sees the input x of each named module on every forward pass of
        the block (a forward pre-hook that returns nothing, so the forward pass is unchanged);
        removed on exit."""
        with self.lock:
            handles = []
            try:
                for name, observe in observers.items():
                    module = self._modules.get(name)
                    if module is None:
                        raise EvaluationError(f"the base model has no module {name!r} to observe")

                    def pre_hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...],
                                 observe: Callable[[torch.Tensor], None] = observe) -> None:
                        observe(inputs[0])

                    handles.append(module.register_forward_pre_hook(pre_hook))
                yield
            finally:
                for handle in handles:
                    handle.remove()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Every base parameter without gradients for the block (so gradients reach only the
        tensors a trainer owns); the flags are restored on exit."""
        with self.lock:
            flags = [(p, p.requires_grad) for p in self.model.parameters()]
            try:
                for parameter, _ in flags:
                    parameter.requires_grad_(False)
                yield
            finally:
                for parameter, flag in flags:
                    parameter.requires_grad_(flag)

    @contextmanager
    def cpu_float32(self) -> Iterator[ModelHolder]:
        """A CPU float32 holder for the block: this one if it already is, else a copy loaded
        from the same path (full float32 precision, not an upcast of reduced-precision
        weights), released on exit. The resident model is not touched."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            yield self
            return
        copy = ModelHolder(self.model_path, model_class=self.model_class, dtype="float32", device="cpu")
        copy.clips = self.clips  # the same inputs
        yield copy

    def weights_fingerprint(self) -> dict[str, torch.Tensor]:
        """A copy of every parameter, for tests that check bit-identical restores."""
        return {name: p.detach().clone() for name, p in self.model.state_dict().items()}
