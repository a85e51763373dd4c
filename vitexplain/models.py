"""Loading timm ViTs (hub weights or local checkpoints), preprocessing and class names."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import timm
import torch
from torch import nn

from .capture.support import UnsupportedModelError, check_supported
from .capture.tokens import token_layout
from .io.preprocess import Preprocessing

DEFAULT_MODEL = "deit_tiny_patch16_224"
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")


class ModelLoadError(RuntimeError):
    """A model or its weights could not be loaded; the message says what to do."""


class ModelChoiceError(ModelLoadError):
    """The model asked for cannot work (unknown name, no attention blocks, unusable checkpoint):
    a usage error, found before any weights are loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Which network explains: a timm architecture and where its weights come from.

    ``weights`` is ``checkpoint`` (a local file, identified by its content hash), ``pretrained`` (timm's
    weights for ``pretrained_tag``) or ``random`` (a random init, for tests)."""

    name: str
    weights: str
    checkpoint: str | None = None  # absolute path, as recorded; not part of the identity
    checkpoint_sha256: str | None = None
    pretrained_tag: str | None = None
    model_kwargs: tuple[tuple[str, object], ...] = ()  # timm.create_model options (img_size=…, num_classes=…)

    def record(self) -> dict:
        return {**asdict(self), "model_kwargs": {k: v for k, v in self.model_kwargs}}

    def identity(self) -> dict:
        """What decides the network: everything but the checkpoint's path."""
        return {k: v for k, v in self.record().items() if k != "checkpoint"}

    def describe(self) -> str:
        """``deit_tiny_patch16_224, checkpoint weights.pth (sha256 a7cc9131…)`` and the like."""
        if self.weights == "checkpoint":
            return f"{self.name}, checkpoint {self.checkpoint} (sha256 {self.checkpoint_sha256[:8]}…)"
        if self.weights == "pretrained":
            return f"{self.name}, pretrained {self.pretrained_tag or '(default)'}"
        return f"{self.name}, random init"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_name(name: str) -> str:
    """Return ``name`` if timm knows it (and its pretrained tag, if it names one), else raise with the
    closest known names."""
    architecture, _, tag = name.partition(".")
    if timm.is_model(architecture):
        if tag and name not in timm.list_pretrained(f"{architecture}.*"):
            tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{architecture}.*")]
            raise ModelChoiceError(f"timm has no pretrained weights {tag!r} for {architecture!r}; its tags: "
                                   f"{', '.join(tags) or 'none'}")
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See `timm.list_models('*vit*')`."
    raise ModelChoiceError(f"unknown timm model {name!r}.{hint}")


def check_attention_blocks(model: nn.Module, name: str) -> None:
    """Raise :class:`ModelChoiceError` unless the capture can record ``model`` faithfully
    (:func:`vitexplain.capture.support.check_supported`)."""
    try:
        check_supported(model, name)
    except UnsupportedModelError as error:
        raise ModelChoiceError(str(error)) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pth/.pt/.bin`` (plain or nested under ``state_dict``/``model``) or ``.safetensors``."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if os.path.lexists(path) else "does not exist"
        raise ModelChoiceError(f"checkpoint {str(path)!r} {what}")
    if path.stat().st_size == 0:
        raise ModelChoiceError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's message runs to many lines of advice: one line, its reason
        message = str(error)
        if "Unsupported global" not in message and "can still be loaded" not in message:  # not a checkpoint at all
            reason = message.partition("WeightsUnpickler error:")[2].partition("Check the documentation")[0]
            raise ModelChoiceError(f"cannot read checkpoint {str(path)!r}: "
                                   f"{' '.join((reason or message).split())}") from error
        raise ModelChoiceError(
            f"checkpoint {str(path)!r} holds pickled objects besides tensors, which torch.load(weights_only=True) "
            "refuses to run; if you trust it, load it once and save its tensors (safetensors.torch.save_file, or "
            "torch.save(model.state_dict(), ...))") from error
    except Exception as error:  # format errors come in many types
        raise ModelChoiceError(f"cannot read checkpoint {str(path)!r}: "
                               f"{' '.join(str(error).split()) or type(error).__name__}") from error
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelChoiceError(f"{str(path)!r} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def classifier_num_classes(name: str, state: dict[str, torch.Tensor]) -> int:
    """Number of classes of the classifier head stored in ``state`` (0 when it has none)."""
    classifier = timm.models.get_pretrained_cfg(name.split(".")[0]).classifier
    first = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    weight = state.get(f"{first or 'head'}.weight")
    return 0 if weight is None else int(weight.shape[0])


def load_checkpoint_state(model: nn.Module, name: str, state: dict[str, torch.Tensor], assign: bool = False) -> nn.Module:
    """Strict-load a checkpoint's ``state`` into ``model`` (``assign``: take its tensors as they are),
    explaining a mismatch."""
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ModelChoiceError(f"the checkpoint does not fit {name!r}: {problem} (is --model the architecture it "
                               "was trained with?)")
    model.load_state_dict(state, strict=True, assign=assign)
    return model


def state_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], most: int = 3) -> str | None:
    """The keys and shapes in which ``state`` differs from ``expected`` (a few of each), or ``None``."""
    def listed(items: list[str]) -> str:
        return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{label} {listed(items)}" for label, items in (("missing", missing), ("unexpected", unexpected),
                                                              ("shapes differ:", shapes)) if items]
    return "; ".join(parts) or None


NO_WEIGHTS_HINT = ("Without access to the Hugging Face Hub, pass --checkpoint PATH (a local state dict for this "
                   "architecture, .pth or .safetensors), or put the weights in the HF cache (HF_HOME) and set "
                   "HF_HUB_OFFLINE=1.")


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off here (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_pretrained_reachable(config: dict, name: str) -> None:
    """Offline, timm's pretrained weights for ``name`` (its ``pretrained_cfg``) must be in the local HF cache:
    raise :class:`ModelChoiceError` if they are not (no retries, no download attempts)."""
    repo = config.get("hf_hub_id")
    if not hub_offline() or not repo:
        return
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    names = [config.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    if not any(isinstance(try_to_load_from_cache(repo_id, file, revision=revision or None), str) for file in names):
        raise ModelChoiceError(f"could not get pretrained weights for {name!r}: HF_HUB_OFFLINE is set and "
                               f"{repo_id} is not in the Hugging Face cache. {NO_WEIGHTS_HINT}")


def load_pretrained_model(name: str, **model_kwargs) -> nn.Module:
    """Build ``name`` with its pretrained weights via timm (Hugging Face Hub or local HF cache); the hub
    client's retry warnings are kept quiet, the failure is said in one line."""
    import logging

    quiet = [logging.getLogger(logger) for logger in ("huggingface_hub", "timm")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        return timm.create_model(name, pretrained=True, **model_kwargs)
    except (OSError, ConnectionError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"could not get pretrained weights for {name!r} ({type(error).__name__}). "
                             f"{NO_WEIGHTS_HINT}") from error
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


@dataclass
class ModelPlan:
    """A model checked before any weights are loaded: known name, readable checkpoint, supported ViT
    architecture; with its identity (:class:`ModelSource`) and preprocessing."""

    name: str
    num_classes: int
    state: dict[str, torch.Tensor] | None  # the checkpoint, read once
    kwargs: dict
    source: ModelSource
    preprocessing: Preprocessing
    pretrained_cfg: dict
    depth: int  # the number of attention blocks
    grid: tuple[int, int] = (0, 0)  # the patch grid (gh, gw) at the preprocessing's input size
    labels: tuple[str, ...] | None = None  # the head's class names, from --labels

    @property
    def class_synonyms(self) -> tuple[tuple[str, ...], ...]:
        """Per class, the names ``--class`` accepts: the labels given, else :func:`class_synonyms_for`."""
        return label_synonyms(self.labels, self.num_classes)

    def check_weights_reachable(self) -> None:
        """Raise :class:`ModelChoiceError` if pretrained weights are planned but cannot be had offline."""
        if self.source.weights == "pretrained":
            check_pretrained_reachable(self.pretrained_cfg, self.name)


def plan_model(name: str = DEFAULT_MODEL, checkpoint: str | Path | None = None, pretrained: bool = True,
               labels: str | Path | None = None, **model_kwargs) -> ModelPlan:
    """Check everything that can fail cheaply: the name, the checkpoint file and the architecture
    (built on the meta device, no memory, no weights), and the ``labels`` file (:func:`read_labels`). Without a
    checkpoint the weights are timm's pretrained ones, or a random init with ``pretrained=False``."""
    check_model_name(name)
    state = read_state_dict(Path(checkpoint)) if checkpoint is not None else None
    kwargs = dict(model_kwargs)
    if state is not None:
        kwargs["num_classes"] = classifier_num_classes(name, state)
    with torch.device("meta"):
        skeleton = timm.create_model(name, pretrained=False, **kwargs)
    check_attention_blocks(skeleton, name)
    if state is not None:
        load_checkpoint_state(skeleton, name, state, assign=True)  # checks keys and shapes, copies nothing
    options = tuple(sorted((k, v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
                           for k, v in kwargs.items()))
    if state is not None:
        path = Path(os.path.abspath(checkpoint))
        source = ModelSource(name, "checkpoint", str(path), file_sha256(path), model_kwargs=options)
    elif pretrained:
        source = ModelSource(name, "pretrained", pretrained_tag=(skeleton.pretrained_cfg or {}).get("tag"),
                             model_kwargs=options)
    else:
        source = ModelSource(name, "random", model_kwargs=options)
    preprocessing = preprocessing_for(skeleton)
    names = read_labels(Path(labels), int(skeleton.num_classes)) if labels is not None else None
    return ModelPlan(name, int(skeleton.num_classes), state, kwargs, source, preprocessing,
                     dict(skeleton.pretrained_cfg or {}), len(skeleton.blocks),
                     token_layout(skeleton, preprocessing.size).grid, names)


def read_labels(path: Path, num_classes: int) -> tuple[str, ...]:
    """The head's class names from ``path``: plain text, one name per line (blank lines and surrounding space
    ignored), a JSON list, or a JSON object of index → name covering every index; one per class of the head,
    all different. :class:`ModelChoiceError` saying what is wrong."""
    if not path.is_file():
        raise ModelChoiceError(f"--labels {str(path)!r} " + ("is not a regular file" if os.path.lexists(path) else "does not exist"))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelChoiceError(f"--labels {str(path)!r}: cannot read it as UTF-8 text ({error})") from None
    stripped = text.strip()
    names: list
    if stripped.startswith(("[", "{")):
        try:
            loaded = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise ModelChoiceError(f"--labels {str(path)!r}: not valid JSON ({error})") from None
        if isinstance(loaded, dict):
            try:
                by_index = {int(k): v for k, v in loaded.items()}
            except ValueError:
                raise ModelChoiceError(f"--labels {str(path)!r}: a JSON object's keys must be class indices") from None
            if sorted(by_index) != list(range(len(by_index))):
                raise ModelChoiceError(f"--labels {str(path)!r}: the indices must be 0…{len(by_index) - 1}, each once")
            loaded = [by_index[i] for i in range(len(by_index))]
        names = loaded
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ModelChoiceError(f"--labels {str(path)!r} holds no class names")
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ModelChoiceError(f"--labels {str(path)!r}: every class name must be non-empty text")
    names = [n.strip() for n in names]
    if len(names) != num_classes:
        raise ModelChoiceError(f"--labels {str(path)!r} names {len(names)} classes; the model's head has {num_classes}")
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name.lower() in seen:
            raise ModelChoiceError(f"--labels {str(path)!r}: {name!r} names classes {seen[name.lower()]} and {index}")
        seen[name.lower()] = index
    return tuple(names)


def label_synonyms(labels: tuple[str, ...] | None, num_classes: int) -> tuple[tuple[str, ...], ...]:
    """Per class, its accepted names: ``labels`` if given, else :func:`class_synonyms_for`."""
    return tuple((name,) for name in labels) if labels else class_synonyms_for(num_classes)


def labels_digest(labels: tuple[str, ...]) -> str:
    """16 hex digits of the SHA-256 of the class names, one per line: what a run's record keeps of them."""
    return hashlib.sha256("\n".join(labels).encode()).hexdigest()[:16]


def build_model(plan: ModelPlan) -> nn.Module:
    """The planned model in eval mode, with the checkpoint's weights, else pretrained ones (or random init)."""
    if plan.state is not None:
        model = load_checkpoint_state(timm.create_model(plan.name, pretrained=False, **plan.kwargs), plan.name, plan.state)
    elif plan.source.weights == "pretrained":
        model = load_pretrained_model(plan.name, **plan.kwargs)
    else:
        model = timm.create_model(plan.name, pretrained=False, **plan.kwargs)
    return model.eval()


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    **model_kwargs,
) -> nn.Module:
    """A timm ViT in eval mode: from ``checkpoint`` if given, else pretrained (or random-init)."""
    return build_model(plan_model(name, checkpoint, pretrained, **model_kwargs))


def preprocessing_for(model: nn.Module) -> Preprocessing:
    """Normalisation from timm's data config for ``model``; size is what the patch embedding was built for.

    The whole image is resized to that size (no centre crop), so masks cover the whole picture.
    """
    config = timm.data.resolve_data_config({}, model=model)
    height, width = getattr(model.patch_embed, "img_size", None) or config["input_size"][1:]
    return Preprocessing((height, width), tuple(config["mean"]), tuple(config["std"]), config["interpolation"])


@lru_cache(maxsize=4)
def imagenet_class_synonyms(subset: str = "imagenet-1k") -> tuple[tuple[str, ...], ...]:
    """Per class of an ImageNet label set (``imagenet-1k``, ``-12k``, ``-21k``, ``-22k`` as timm describes them),
    its WordNet lemmas (``('tiger cat',)``, ``('airliner',)``…), shipped with timm."""
    info = timm.data.ImageNetInfo(subset)
    return tuple(tuple(s.strip() for s in info.index_to_description(i).split(",")) for i in range(info.num_classes()))


def class_synonyms_for(num_classes: int) -> tuple[tuple[str, ...], ...]:
    """The lemmas of the ImageNet label set with ``num_classes`` classes (1k; the 12k, 21k and 22k subsets timm's
    pretrained heads use, told apart by their size as timm does), ``('class_<i>',)`` otherwise."""
    if num_classes == 1000:
        return imagenet_class_synonyms()
    subset = timm.data.infer_imagenet_subset({"num_classes": num_classes})
    if subset:
        return imagenet_class_synonyms(subset)
    return tuple((f"class_{i}",) for i in range(num_classes))


def class_names_for(num_classes: int, labels: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """One display name per class: the ``labels`` given, else its first lemma (:func:`label_synonyms`)."""
    return tuple(synonyms[0] for synonyms in label_synonyms(labels, num_classes))


def resolve_class(spec: str | int, synonyms: tuple[tuple[str, ...], ...]) -> int:
    """Class index from an index (``"243"``) or any of its names (``"tiger cat"``, case-insensitive)."""
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(synonyms):
            raise ValueError(f"class index {index} is out of range: the model has classes 0..{len(synonyms) - 1}")
        return index
    indices_of: dict[str, list[int]] = {}
    for i, names in enumerate(synonyms):
        for name in names:
            indices_of.setdefault(name.lower(), []).append(i)
    matches = indices_of.get(text.lower(), [])
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"class name {text!r} is ambiguous: classes {', '.join(map(str, matches))}; give the index")
    close = difflib.get_close_matches(text.lower(), list(indices_of), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else " Give the class index instead."
    raise ValueError(f"unknown class name {text!r}.{hint}")
