"""What ``ftn predict`` and ``ftn serve`` share: decoding images, preparing them exactly as the
adapter's task was trained (size, channels, normalisation: the ``input`` entry of the adapter's
info), top-k labels, dense prediction images, and building one FTN model for a set of adapters.

Adapters written before labels travelled with them have no info; they are served with the
fallbacks below (ImageNet normalisation, RGB, ``--image-size`` with a centre crop) and numeric
labels.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms import v2

from ...core.adapters import (AdapterHeader, ModelLayout, check_adapter, declared_parameters, load_task,
                              read_adapter, read_adapter_header)
from ...core.errors import AdapterFileError, ConfigError, DataError, ShapeError
from ...core.model import FTNModel

__all__ = ["InputSpec", "decode_image", "preprocess", "top_k", "build_model", "adapter_info",
           "task_head", "inspect_adapter", "load_adapter", "save_dense_prediction", "IMAGE_SUFFIXES", "DEFAULT_IMAGE_SIZE", "MAX_PIXELS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
MAX_PIXELS = 4096 * 4096  # decoded size limit (a small PNG can expand to gigabytes)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the task's input tensor (see :func:`ftn.core.adapters.validate_task_info`)."""

    size: int | None = DEFAULT_IMAGE_SIZE
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "center_crop"
    crop_ratio: float = 1.14

    @classmethod
    def from_info(cls, info: Mapping[str, Any], default_size: int = DEFAULT_IMAGE_SIZE) -> InputSpec:
        spec = info.get("input")
        if not spec:  # an older adapter: torchvision's usual evaluation transform
            return cls(size=default_size)
        return cls(size=spec.get("size"), channels=int(spec.get("channels", 3)),
                   mean=tuple(spec.get("mean", (0.0,) * 3)), std=tuple(spec.get("std", (1.0,) * 3)),
                   resize=spec.get("resize", "stretch"), crop_ratio=float(spec.get("crop_ratio", 1.0)))

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.size, "channels": self.channels, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "crop_ratio": self.crop_ratio}


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, name: str = "image") -> Image.Image:
    """Decode image bytes fully; anything unreadable, empty or too large is a DataError."""
    if not data:
        raise DataError(f"{name} is empty")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size  # from the header, before decoding anything
        if width < 1 or height < 1 or width * height > max_pixels:
            raise DataError(f"{name} is {width}×{height} pixels; the limit is {max_pixels:,} pixels")
        img.load()
        return img
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name} is not an image in a format Pillow reads (or it is corrupt)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name} is not a readable image: {exc}") from None


def preprocess(img: Image.Image, spec: InputSpec) -> Tensor:
    """The task's input tensor ``[3, H, W]`` for one image, as its training pipeline made it.

    ``stretch`` (the embedded benchmark): to float, resize to size×size (antialiased bilinear);
    ``center_crop`` (DomainNet / ImageFolder evaluation): shorter side to ``int(size *
    crop_ratio)``, centre crop, to float; ``none``: as is. Grayscale tasks (``channels`` 1) read
    the image as luminance and repeat it to 3 channels. Then ``(x - mean) / std``.
    """
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if spec.resize == "center_crop":
        assert spec.size is not None
        img = v2.CenterCrop(spec.size)(v2.Resize(int(spec.size * spec.crop_ratio))(img))
    x = v2.ToDtype(torch.float32, scale=True)(v2.ToImage()(img)).as_subclass(Tensor)
    if spec.resize == "stretch":
        assert spec.size is not None
        x = v2.Resize((spec.size, spec.size), antialias=True)(x)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def top_k(logits: Tensor, labels: Sequence[str] | None, k: int = 5) -> list[list[dict[str, Any]]]:
    """``[[{"label", "index", "prob"}, ...] per sample]``: the k most probable classes (softmax)."""
    if logits.dim() != 2:
        raise ShapeError(f"top_k expects logits [N, C], got shape {tuple(logits.shape)}; "
                         f"is this a dense task?")
    classes = logits.shape[1]
    if labels is not None and len(labels) != classes:
        raise ShapeError(f"the task has {len(labels)} labels but its head gives {classes} outputs")
    probs = torch.softmax(logits.float(), dim=1)
    values, indices = probs.topk(min(max(k, 1), classes), dim=1)
    return [[{"label": labels[i] if labels is not None else str(i), "index": i, "prob": round(p, 6)}
             for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)]


# ----------------------------------------------------------------------------- models
def adapter_info(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metadata, info)`` of an adapter file (fully verified, checksum included)."""
    _, meta = read_adapter(path)
    return meta, meta.get("info", {})


def _dense_spec(info: Mapping[str, Any]) -> dict[str, Any] | None:
    outputs = info.get("outputs") or {}
    return outputs if outputs.get("kind") == "dense" else None


def build_model(backbone: str, adapter_paths: Sequence[str | Path] = (), *, pretrained: bool = True,
                weights_path: str | Path | None = None, layers: Sequence[str] | None = None,
                dense: Mapping[str, Any] | None = None) -> FTNModel:
    """An FTN model on the named torchvision backbone, adapting the layers the adapters adapt.

    ``layers`` (exact names) default to those of the first adapter in ``adapter_paths``, so
    adapters trained with include/exclude patterns load without repeating them; with neither,
    every Conv/Linear is adapted. Dense adapters (``outputs.kind == "dense"`` in their info)
    get the multi-scale encoder they were trained on. No adapter is loaded here.
    """
    from ...training.backbones import build_backbone

    if layers is None and adapter_paths:
        meta, info = adapter_info(adapter_paths[0])
        layers = list(meta["layers"])
        dense = dense if dense is not None else _dense_spec(info)
    if dense is not None:
        from ...settings.dense.model import build_encoder

        encoder = dense.get("encoder", {})
        if encoder.get("backbone", backbone) != backbone:
            raise ConfigError(f"the dense adapter was trained on {encoder['backbone']!r}, not {backbone!r}")
        module: nn.Module = build_encoder(backbone, pretrained=pretrained and weights_path is None,
                                          output_stride=int(encoder.get("output_stride", 16)),
                                          weights_path=str(weights_path) if weights_path else None)
    else:
        module, _ = build_backbone(backbone, pretrained=pretrained and weights_path is None,
                                   weights_path=weights_path)
    options: dict[str, Any] = {}
    if layers is not None:
        # Exact names as fnmatch patterns: escape the glob characters a module name could hold.
        options["include"] = [_escape_glob(name) for name in layers]
    return FTNModel(module, rank=1, **options).eval()


def _escape_glob(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def task_head(model: FTNModel, info: Mapping[str, Any], header: AdapterHeader | None = None) -> nn.Module | None:
    """The head module to pass to ``load_task`` (None: the file's own Identity/Linear spec).

    A dense head is built from the recipe in the adapter's info (task, classes, decoder sizes):
    with ``header``, it is first built on the ``meta`` device (no memory) and checked against
    the head tensors the file holds, so a recipe declaring a huge decoder is refused before
    anything is allocated."""
    dense = _dense_spec(info)
    if dense is None:
        return None
    if header is not None:
        check_adapter(model, header, head=_head_probe(model, header), check_fingerprint=False)
    return _dense_head(model, dense, header.path if header is not None else "the adapter")


def _head_probe(model: FTNModel, header: AdapterHeader) -> nn.Module | None:
    """The adapter's dense head built on the meta device (shapes only), or None (a head the
    file's own spec describes)."""
    dense = _dense_spec(header.meta["info"])
    if dense is None:
        return None
    with torch.device("meta"):
        return _dense_head(model, dense, header.path)


def _dense_head(model: FTNModel, dense: Mapping[str, Any], path: Any) -> nn.Module:
    from ...settings.dense.model import SingleDenseHead, build_head

    try:
        head = build_head(model.backbone, dense["task"], int(dense.get("num_classes", 1)),
                          **dict(dense.get("head", {})))
    except Exception as exc:  # noqa: BLE001 - the recipe comes from the file: anything wrong is the file's fault
        raise AdapterFileError(f"{path}: its dense head recipe cannot be built: {type(exc).__name__}: {exc}") from None
    # layout "dict": the head of `ftn train`'s dense setting, DenseHeads({task: decoder})
    return SingleDenseHead({dense["task"]: head}) if dense.get("layout") == "dict" else head


def inspect_adapter(model: FTNModel, path: str | Path, fingerprint: str | None = None,
                    layout: ModelLayout | None = None) -> tuple[AdapterHeader, dict[str, int]]:
    """Every check ``load_adapter`` makes except the tensors' checksum, from the file's header
    alone: nothing is loaded or allocated (what a server does for tasks it loads later).
    ``fingerprint`` and ``layout``: the model's, computed once by a caller checking many files
    (None: computed here). Returns the header and the task's parameter counts (as the model's
    parameter report will give them)."""
    header = read_adapter_header(path)
    _check_fingerprint(header, fingerprint if fingerprint is not None else model.backbone_fingerprint())
    probe = _head_probe(model, header)
    layout = layout or ModelLayout.of(model)
    check_adapter(model, header, head=probe, check_fingerprint=False, layout=layout)
    return header, declared_parameters(model, header, head=probe, layout=layout)


def _check_fingerprint(header: AdapterHeader, fingerprint: str) -> None:
    declared = header.meta["backbone_fingerprint"]
    if declared != fingerprint:
        raise AdapterFileError(f"{header.path} was trained on a backbone with other weights (fingerprint "
                               f"{declared[:12]}…, this backbone {fingerprint[:12]}…)")


def load_adapter(model: FTNModel, path: str | Path, name: str | None = None, fingerprint: str | None = None,
                 layout: ModelLayout | None = None) -> str:
    """``model.load_task`` with the head a dense adapter needs. ``fingerprint`` and ``layout``:
    the model's backbone fingerprint and :class:`~ftn.core.adapters.ModelLayout`, computed once
    by a caller loading many adapters (a server) instead of once per file; the checks are the
    same. The header is checked before any head is built."""
    header = read_adapter_header(path)
    if fingerprint is not None:
        _check_fingerprint(header, fingerprint)
    name = load_task(model, path, name=name, head=task_head(model, header.meta["info"], header),
                     check_fingerprint=fingerprint is None, layout=layout)
    # The new task's head in eval mode (its norm copies take their layer's mode, eval in an eval
    # model): model.eval() would walk every module of every loaded task, ms per cold load.
    if model.training:
        model.eval()
    else:
        model.heads[name].eval()
    return name


# ----------------------------------------------------------------------------- dense outputs
def save_dense_prediction(prediction: Tensor, info: Mapping[str, Any], path: str | Path) -> Path:
    """Write one dense prediction ``[C, H, W]`` as a PNG, drawn as its task's record says
    (:func:`ftn.settings.dense.tasks.prediction_image`): semantic classes as a palette image,
    depth as grayscale (near = bright, scaled to the image's range), normals as RGB
    ((n + 1) / 2), edges as the sigmoid probability."""
    from ...settings.dense.tasks import prediction_image

    img = prediction_image((_dense_spec(info) or {}).get("task", ""), prediction)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def collect_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named on the command line; folders contribute their images (sorted, not
    recursive)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image file not found: {p}")
    return files


def run_predict(backbone: str, adapters: Sequence[str | Path], images: Sequence[str | Path], *, k: int = 5,
                batch_size: int = 32, image_size: int = DEFAULT_IMAGE_SIZE, pretrained: bool = True,
                weights_path: str | Path | None = None, output_dir: str | Path = "predictions",
                ) -> list[dict[str, Any]]:
    """Predictions of every adapter for every image: ``[{"image", "task", "top_k" | "output"}]``.

    Unreadable images raise DataError naming the file before anything runs.
    """
    adapter_files: list[Path] = []
    for a in map(Path, adapters):
        adapter_files += sorted(a.glob("*.safetensors")) if a.is_dir() else [a]
    if not adapter_files:
        raise AdapterFileError(f"no adapter files in {', '.join(map(str, adapters))}")
    files = collect_images(images)
    decoded = [decode_image(f.read_bytes(), name=str(f)) for f in files]
    model = build_model(backbone, adapter_files, pretrained=pretrained, weights_path=weights_path)
    results: list[dict[str, Any]] = []
    for path in adapter_files:
        name = load_adapter(model, path)
        info = model.task_info(name)
        spec = InputSpec.from_info(info, image_size)
        dense = _dense_spec(info) is not None
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            if spec.resize == "none":  # sizes may differ: one image at a time
                outs = []
                for img in decoded[start:start + batch_size]:
                    with torch.inference_mode():
                        outs.append(model(preprocess(img, spec).unsqueeze(0), task=name)[0])
            else:
                x = torch.stack([preprocess(img, spec) for img in decoded[start:start + batch_size]])
                with torch.inference_mode():
                    outs = model(x, task=name)
            if dense:
                for f, out in zip(chunk, outs):
                    target = Path(output_dir) / name / f"{f.stem}.png"
                    save_dense_prediction(out, info, target)
                    results.append({"image": str(f), "task": name, "output": str(target)})
            else:
                logits = outs if isinstance(outs, Tensor) else torch.stack(outs)
                for f, row in zip(chunk, top_k(logits, info.get("labels"), k)):
                    results.append({"image": str(f), "task": name, "top_k": row})
        model.remove_task(name)
    return results


def format_predictions(results: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for r in results:
        if "output" in r:
            lines.append(f"{r['image']}  [{r['task']}]  -> {r['output']}")
        else:
            best = ", ".join(f"{p['label']} {p['prob']:.3f}" for p in r["top_k"])
            lines.append(f"{r['image']}  [{r['task']}]  {best}")
    return "\n".join(lines)
