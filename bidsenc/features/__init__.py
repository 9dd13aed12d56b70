"""Stimulus features: language-model and audio-model hidden states, cached per story.

:func:`extract` takes the run's feature specs and the stories heard, computes
what the cache does not hold yet (batched across all stories of a model), and
returns one :class:`FeatureSpace` per spec from which per-story, per-layer
features are read memory-mapped. Features know stimuli, not responses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from dataclasses import dataclass, field

from ..bids.experiment import Story
from ..config import FeatureSpec
from ..errors import MissingInputError, UsageError
from .audio import CONTEXT as AUDIO_CONTEXT, STEP as AUDIO_STEP
from .cache import FeatureStore, Request, StoredFeatures
from .hub import from_pretrained, model_fingerprint, parse_layers, slug

log = logging.getLogger(__name__)

_LM_OPTIONS = {"layers": str, "dtype": str, "context": str, "min_context": int, "max_tokens": int,
               "max_words": int, "batch_tokens": int, "lowercase": bool, "revision": str, "device_map": str, "family": str}
_AUDIO_OPTIONS = {"layers": str, "dtype": str, "batch_size": int, "step": float, "revision": str, "family": str}


@dataclass
class FeatureSpace:
    """One model's features for every story: where they are and what produced them."""

    spec: FeatureSpec
    name: str
    layers: list[int]
    n_layers: int
    requests: dict[str, Request]
    store: FeatureStore
    model: dict = field(default_factory=dict)
    #: How the stories were obtained in this run: {"hit": n, "computed": n, "waited": n}.
    counts: dict = field(default_factory=dict)

    def load(self, story_id: str) -> StoredFeatures:
        """Times (s from the audio's start) and per-layer float16 memmaps of one story."""
        return self.store.load(self.requests[story_id])

    def describe(self) -> dict:
        options = {k: v for k, v in self.spec.options.items() if k != "_path"}
        where = {"loaded_from": self.spec.options["_path"]} if "_path" in self.spec.options else {}
        return {"name": self.name, "kind": self.spec.kind, "model": self.spec.model, "options": options, **where,
                "layers": self.layers, **{k: v for k, v in self.model.items() if k not in ("model", "kind")}}


def extract(specs, stories: dict[str, Story], store: FeatureStore, *, device: str = "cpu",
            allow_download: bool = False, progress: bool = True, model_dir: Path | None = None,
            skip_absent_audio: bool = False) -> list[FeatureSpace]:
    """Make sure every spec's features exist for every story, computing what is missing.

    Text features come first, so that a missing audio file stops the run only after
    the language-model features are cached. With ``skip_absent_audio`` (the default
    feature spaces, which the user did not choose), audio features are left out with a
    warning when no story has audio, rather than stopping the run. A hub id with a copy in ``model_dir``
    (``model_dir/<org>/<name>``, as ``save_pretrained`` or ``hf download --local-dir``
    writes it) is loaded from there; the outputs still name the hub id.
    """
    specs = _without_absent_audio(list(specs), stories) if skip_absent_audio else list(specs)
    ordered = sorted(specs, key=lambda spec: spec.kind != "lm")
    spaces = {id(spec): _extract_one(_located(spec, model_dir), stories, store, device, allow_download, progress)
              for spec in ordered}
    return [spaces[id(spec)] for spec in specs]


def _without_absent_audio(specs: list[FeatureSpec], stories: dict[str, Story]) -> list[FeatureSpec]:
    """Leave out audio feature spaces when the dataset has no audio at all, if other spaces remain.

    A dataset of word timings only (no stimulus audio) still gets its text features fitted;
    audio missing for some stories only is an error (see :func:`_extract_one`).
    """
    if any(story.audio for story in stories.values()):
        return specs
    audio = [s for s in specs if s.kind == "audio" or (s.kind == "lowlevel" and s.model == "envelope")]
    if not audio or len(audio) == len(specs):
        return specs
    for spec in audio:
        log.warning("%s:%s skipped: none of the %d stories has audio in the dataset; the other feature spaces "
                    "are fitted", spec.kind, spec.model, len(stories))
    return [s for s in specs if s not in audio]


def _located(spec: FeatureSpec, model_dir: Path | None) -> FeatureSpec:
    """The spec with its model read from ``model_dir`` when a copy is there (the name kept as given)."""
    if model_dir is None or spec.kind == "lowlevel" or Path(spec.model).expanduser().is_dir():
        return spec
    copy = Path(model_dir) / spec.model
    if not (copy / "config.json").is_file():
        return spec
    log.info("%s: loaded from its local copy %s", spec.model, copy)
    return FeatureSpec(spec.kind, spec.model, {**spec.options, "_path": str(copy)})


def _extract_one(spec: FeatureSpec, stories: dict[str, Story], store: FeatureStore, device: str,
                 allow_download: bool, progress: bool) -> FeatureSpace:
    if spec.kind == "lowlevel":
        return _extract_lowlevel(spec, stories, store)
    usable = {sid: s for sid, s in stories.items() if (s.words is not None if spec.kind == "lm" else s.audio)}
    missing = sorted(set(stories) - set(usable))
    if missing:
        story = stories[missing[0]]
        if spec.kind == "audio" and story.missing_audio is not None:
            raise MissingInputError(
                f"audio features from {spec.model} need {story.missing_audio.name}, which is not in "
                f"{story.missing_audio.parent}; put the stimuli there or point --stimuli-dir at them")
        what = "word timings" if spec.kind == "lm" else "audio"
        raise MissingInputError(f"{spec.kind} features from {spec.model} need {what}; story "
                                f"{', '.join(missing[:5])} has none")
    options = _options(spec)
    source = spec.options.get("_path", spec.model)
    config = _load_config(source, allow_download, options.get("revision"))
    n_layers = _n_layers(config, spec.kind)
    layers = parse_layers(options.get("layers"), n_layers)
    params = _extraction_params(spec, options)
    model_key = f"{slug(spec.model)}-{_hash(model_fingerprint(source, config, options.get('revision')), params)}"
    requests = {sid: Request(model_key, f"{slug(sid)}-{s.content_hash[:12]}", tuple(layers))
                for sid, s in sorted(usable.items())}
    by_request = {req: usable[sid] for sid, req in requests.items()}
    described: dict = {}

    def compute(todo: list[Request]):
        if spec.kind == "lm":
            yield from _compute_lm(spec, options, [by_request[r] for r in todo], todo, layers, device,
                                   allow_download, progress, described)
        else:
            yield from _compute_audio(spec, options, [by_request[r] for r in todo], todo, layers, device,
                                      allow_download, progress, described)

    counts = store.ensure(list(requests.values()), compute)
    log.info("%s features from %s: %d stories (%d from the cache, %d computed here)", spec.kind, spec.model,
             len(requests), counts.get("hit", 0), counts.get("computed", 0))
    if not described and requests:
        described = dict(store.load(next(iter(requests.values()))).info.get("model", {}))
    # the architecture names the model family of scaling curves unless the spec gives `family`
    described = {**described, "model_type": str(getattr(config, "model_type", "") or spec.kind)}
    name = f"{spec.kind}-{slug(spec.model)}"
    return FeatureSpace(spec, name, layers, n_layers, requests, store, described, counts)


# --------------------------------------------------------------------------- language models

def _compute_lm(spec, options, stories: list[Story], todo: list[Request], layers, device, allow_download,
                progress, described):
    from .lm import extract_lm_features, load_language_model

    lm = load_language_model(spec.options.get("_path", spec.model), device=device, dtype=options.get("dtype", "auto"),
                             allow_download=allow_download, revision=options.get("revision"),
                             device_map=options.get("device_map"))
    described.update(lm.describe())
    lowercase = options.get("lowercase", True)
    word_lists, times = [], []
    for story in stories:
        words = story.words.without_non_words()
        word_lists.append([w.lower() if lowercase else w for w in words.words])
        times.append(words.midpoints)
    result = extract_lm_features(
        lm, word_lists, layers=layers, scheme=options.get("context", "efficient"),
        min_context=options.get("min_context", 256), max_tokens=options.get("max_tokens"),
        max_words=options.get("max_words"), batch_tokens=options.get("batch_tokens"), progress=progress,
    )
    for req, story_times, feats in zip(todo, times, result.features, strict=True):
        yield req, story_times, feats, {"model": lm.describe(), "params": _extraction_params(spec, options),
                                        "unit": "word", "time": "word midpoint, s from the audio's start"}


# --------------------------------------------------------------------------- audio models

def _compute_audio(spec, options, stories: list[Story], todo: list[Request], layers, device, allow_download,
                   progress, described):
    from ..bids.audio import load_audio
    from .audio import extract_audio_features, load_audio_model

    model = load_audio_model(spec.options.get("_path", spec.model), device=device, dtype=options.get("dtype", "auto"),
                             allow_download=allow_download, revision=options.get("revision"))
    info = {"model": spec.model, "kind": "audio", "n_parameters": model.n_parameters, "n_layers": model.n_layers,
            "hidden_size": model.hidden_size, "fingerprint": model.fingerprint,
            "dtype": str(model.dtype).removeprefix("torch.")}
    described.update(info)
    for req, story in zip(todo, stories, strict=True):
        audio, _ = load_audio(story.audio)
        times, feats = extract_audio_features(model, audio, layers=layers, batch_size=options.get("batch_size"),
                                              step=options.get("step", AUDIO_STEP), progress=progress)
        yield req, times, feats, {"model": info, "params": _extraction_params(spec, options), "unit": "window",
                                  "time": "window end, s from the audio's start"}


# --------------------------------------------------------------------------- low-level baselines

def _extract_lowlevel(spec: FeatureSpec, stories: dict[str, Story], store: FeatureStore) -> FeatureSpace:
    from . import lowlevel

    name = spec.model
    if name not in lowlevel.BASELINES:
        raise UsageError(f"--feature lowlevel:{name}: choose one of {', '.join(lowlevel.BASELINES)}")
    _options(spec)
    missing = sorted(sid for sid, story in stories.items() if not lowlevel.has_input(name, story))
    if missing:
        expected = stories[missing[0]].missing_audio
        if lowlevel.needs(name) == "audio" and expected is not None:
            raise MissingInputError(f"lowlevel:{name} needs the audio {expected.name}, which is not in "
                                    f"{expected.parent}; put the stimuli there or point --stimuli-dir at them "
                                    "(or leave this baseline out)")
        what = {"words": "word timings", "phones": "a TextGrid with a phone tier", "audio": "audio"}
        raise MissingInputError(f"lowlevel:{name} needs {what[lowlevel.needs(name)]} for every story; "
                                f"{', '.join(missing[:5])} has none (leave this baseline out)")
    params = {"baseline": name, "envelope_frame_s": lowlevel.ENVELOPE_FRAME if name == "envelope" else None}
    key = f"lowlevel-{name}-{_hash(params)}"
    requests = {sid: Request(key, f"{slug(sid)}-{s.content_hash[:12]}", (0,)) for sid, s in sorted(stories.items())}
    by_request = {req: stories[sid] for sid, req in requests.items()}
    described = {"model": name, "kind": "lowlevel", "n_parameters": None, "n_layers": 0, "hidden_size": 1,
                 "model_type": "lowlevel"}
    unit = {"words": "word", "phones": "phone", "audio": f"{lowlevel.ENVELOPE_FRAME} s frame"}[lowlevel.needs(name)]

    def compute(todo: list[Request]):
        for req in todo:
            times, values = lowlevel.compute(name, by_request[req])
            yield req, times, {0: values}, {"model": described, "params": params, "unit": unit,
                                            "time": f"{unit} centre, s from the audio's start"}

    counts = store.ensure(list(requests.values()), compute)
    log.info("low-level baseline %s: %d stories (%d from the cache)", name, len(requests), counts.get("hit", 0))
    return FeatureSpace(spec, f"lowlevel-{name}", [0], 0, requests, store, described, counts)


# --------------------------------------------------------------------------- helpers

def _options(spec: FeatureSpec) -> dict:
    known = {"lm": _LM_OPTIONS, "audio": _AUDIO_OPTIONS, "lowlevel": {"family": str}}[spec.kind]
    out = {}
    for key, value in spec.options.items():
        if key == "_path":  # set by _located, not by the user
            continue
        if key not in known:
            raise UsageError(f"feature {spec.kind}:{spec.model}: unknown option {key!r}; "
                             f"known: {', '.join(sorted(known))}")
        out[key] = _convert(value, known[key], f"{spec.kind}:{spec.model} {key}")
    if spec.kind == "audio" and "step" in out:
        step = out["step"]
        if not 0.01 <= step <= 2.0 or abs(step * 100 - round(step * 100)) > 1e-9:
            raise UsageError(f"feature {spec.kind}:{spec.model} step={step}: the window step must be a multiple "
                             f"of 0.01 s between 0.01 and 2 s (the reference is {AUDIO_STEP})")
    if out.get("context", "efficient") not in ("efficient", "reference"):
        raise UsageError(f"feature {spec.kind}:{spec.model}: context must be efficient or reference")
    return out


def _convert(value, kind, where: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes"):
            return True
        if str(value).lower() in ("0", "false", "no"):
            return False
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected a number, got {value!r}") from None
        if not number > 0 or number == float("inf"):
            raise UsageError(f"{where}: must be a positive number, got {value!r}")
        return number
    if kind is int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected a whole number, got {value!r}") from None
        if number < 1:
            raise UsageError(f"{where}: must be positive, got {number}")
        return number
    return str(value)


def _extraction_params(spec: FeatureSpec, options: dict) -> dict:
    """What changes the features' values (layers and batch sizes do not)."""
    if spec.kind == "lm":
        return {"context": options.get("context", "efficient"), "min_context": options.get("min_context", 256),
                "max_tokens": options.get("max_tokens"), "max_words": options.get("max_words"),
                "lowercase": options.get("lowercase", True), "dtype": options.get("dtype", "auto"),
                "non_words_dropped": True}
    step = options.get("step", AUDIO_STEP)
    return {"window_s": round(AUDIO_CONTEXT + step, 6), "step_s": step, "dtype": options.get("dtype", "auto")}


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _load_config(name: str, allow_download: bool, revision: str | None):
    from transformers import AutoConfig

    return from_pretrained(AutoConfig, name, allow_download=allow_download, revision=revision)


def _n_layers(config, kind: str) -> int:
    if kind == "audio" and getattr(config, "model_type", "") == "whisper":
        return int(config.encoder_layers)
    return int(config.get_text_config().num_hidden_layers)


__all__ = ["AUDIO_STEP", "FeatureSpace", "extract"]
