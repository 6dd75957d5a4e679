"""Trunks from the libraries people build models with: `timm:NAME`, `torchvision:NAME` and
`hf:MODEL_TYPE` (Hugging Face transformers), one registered builder per library in `LIBRARIES`.

Each builds the library's own class with random weights (never a download: timm and
torchvision with `pretrained=False` / `weights=None`, transformers with
`AutoConfig.for_model(type, **options)` + `AutoModel.from_config`), removes its classifier,
fits it to the suite's inputs and finds its feature width with one forward pass:

  images (C, H, W)  timm gets `in_chans=C` and, where the class takes one, `img_size=(H, W)`;
                    a torchvision model's first 3-channel conv is rebuilt for C channels (its
                    weights are random anyway); HF configs get `num_channels` and `image_size`.
                    `img_size` (timm) / `image_size` (torchvision, hf) is the size the model
                    sees: given to the class where it takes one, and where it differs from
                    the suite's, the trunk resizes its inputs to it first (small images and a
                    model whose strides need larger ones: `img_size=32`).
  token ids (L,)    HF configs get `vocab_size` (the data's largest id + 1, unless a given
                    config holds one) and enough `max_position_embeddings`; the trunk's output
                    is the mean of the last hidden states over the tokens.

Options (`--model-option KEY=VALUE`) go to the library's constructor or config: lists become
tuples, and "1,2,2" or "(1, 2, 2)" a tuple of numbers. A name, option or size the library
refuses is one `PrunefuseError` line naming the trunk, raised when the model is built (before
any training).
"""
from __future__ import annotations

import difflib
import inspect

import torch
import yaml
from torch import nn

from spaces.errors import PrunefuseError
from spaces.registry import Registry

from . import imports

LIBRARIES = Registry("trunk library")


# --- the trunk module: a library model, its input adapter and its output reduction ---

class LibraryTrunk(nn.Module):
    """`model` is the library's own module (its state-dict keys are `model.…` under the
    trunk); `resize` (H, W) or None: inputs are resized to it first; `call`: how the model
    is called ("images", "pixel_values" or "input_ids")."""

    def __init__(self, model: nn.Module, *, call: str, resize: tuple[int, int] | None = None):
        super().__init__()
        self.model, self.call, self.resize = model, call, resize

    def forward(self, x):
        if self.resize is not None and tuple(x.shape[-2:]) != self.resize:
            x = nn.functional.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
        if self.call == "images":
            return self.model(x).flatten(1)
        if self.call == "input_ids":
            out = self.model(input_ids=x.long())
        else:
            out = self.model(pixel_values=x)
        hidden = out.last_hidden_state
        if hidden.dim() == 3:  # (B, tokens, features): mean over the tokens
            return hidden.mean(dim=1)
        pooled = getattr(out, "pooler_output", None)  # a convolutional model's (B, C, 1, 1)
        return (pooled if pooled is not None else hidden.mean(dim=(-2, -1))).flatten(1)


def library_trunk(trunk: str, *, input_shape, vocab: int | None = None, config: dict | None = None,
                  **options) -> tuple[nn.Module, int]:
    """(trunk module, feature width) for `trunk` = "timm:NAME" / "torchvision:NAME" / "hf:TYPE".

    input_shape: the suite's (C, H, W) images or (length,) token ids; vocab: for token ids,
    the number of distinct ids the data holds (largest + 1). config: a Hugging Face
    `config.json` as a dict (hf only): the model is built from it, `options` on top.
    Random weights; the caller loads any it has."""
    library, name = split_name(trunk)
    build = LIBRARIES[library]
    if config is not None and library != "hf":
        raise PrunefuseError(f"trunk {trunk!r}: a config dict is for hf: trunks (a config.json); "
                             f"give {library} options as KEY=VALUE")
    input_shape = tuple(int(d) for d in input_shape)
    options = {k: parse_value(v) for k, v in options.items()}
    try:
        module = build(name, input_shape=input_shape, vocab=vocab, config=config, **options)
        width = feature_width(module, input_shape, tokens=module.call == "input_ids")
    except PrunefuseError:
        raise
    except Exception as exc:  # noqa: BLE001 - the library's own refusal, said in one line
        raise PrunefuseError(f"trunk {trunk!r} with options {options or '{}'} does not build for inputs "
                             f"{input_shape}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    return module, width


def split_name(trunk: str) -> tuple[str, str]:
    library, sep, name = trunk.partition(":")
    if not sep or library not in LIBRARIES:
        raise PrunefuseError(f"unknown trunk {trunk!r}; expected a built-in trunk or LIBRARY:NAME with LIBRARY one "
                             f"of: {', '.join(LIBRARIES)} (e.g. timm:resnet18, torchvision:resnet18, hf:bert)")
    if not name:
        raise PrunefuseError(f"trunk {trunk!r} names no model: {library}:NAME")
    return library, name


def is_library_trunk(trunk) -> bool:
    return isinstance(trunk, str) and trunk.partition(":")[0] in LIBRARIES and ":" in trunk


@torch.no_grad()
def feature_width(module: LibraryTrunk, input_shape, *, tokens: bool) -> int:
    """The width of the trunk's (batch, features) output, from one forward of two zero rows."""
    x = torch.zeros((2, *input_shape), dtype=torch.long if tokens else torch.float32)
    was = module.training
    module.eval()
    try:
        out = module(x)
    finally:
        module.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        raise PrunefuseError(f"expected (batch, features) features, got {getattr(out, 'shape', type(out).__name__)}")
    return int(out.shape[1])


def parse_value(value):
    """An option's value as the library wants it: lists (YAML, JSON) become tuples, and a string
    "1,2" or "(1, 2)" a tuple of YAML scalars (ints, floats, bools)."""
    if isinstance(value, list):
        return tuple(parse_value(v) for v in value)
    if isinstance(value, str) and "," in value:
        inner = value.strip()
        if inner[:1] in "([" and inner[-1:] in ")]":
            inner = inner[1:-1]
        try:
            return tuple(yaml.safe_load(v.strip()) for v in inner.split(",") if v.strip())
        except yaml.YAMLError:
            return value
    return value


def _unknown_model(library: str, name: str, known) -> PrunefuseError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return PrunefuseError(f"{library} has no model {name!r}{hint}")


def _image_input(library: str, name: str, input_shape) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise PrunefuseError(f"trunk '{library}:{name}' needs image inputs (C, H, W); the suite has {input_shape}")
    return input_shape


def _size(value, name: str) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise PrunefuseError(f"{name}={value!r}: expected a whole number or (height, width)")
    return size


def _resize(asked, suite_size) -> tuple[int, int] | None:
    return None if asked is None or tuple(asked) == tuple(suite_size) else tuple(asked)


# --- the three libraries ---

@LIBRARIES.register("timm")
def timm_model(name: str, *, input_shape, vocab=None, config=None, **options) -> LibraryTrunk:
    """timm.create_model(name, pretrained=False, num_classes=0, in_chans=C, img_size=(H, W)
    where the class takes it, **options): pooled features, no classifier."""
    timm = imports.timm(f"trunk 'timm:{name}'")
    channels, *size = _image_input("timm", name, input_shape)
    if not timm.is_model(name):
        raise _unknown_model("timm", name, timm.list_models())
    for fixed in ("pretrained", "num_classes", "in_chans"):
        if fixed in options:
            raise PrunefuseError(f"trunk 'timm:{name}': {fixed} is set by prunefuse (random weights, no classifier, "
                                 f"the suite's {channels} channels); leave it out")
    asked = _size(options.pop("img_size"), "img_size") if "img_size" in options else None
    kwargs = dict(pretrained=False, num_classes=0, in_chans=channels, **options)
    try:
        model = timm.create_model(name, **kwargs, img_size=asked or tuple(size))
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        model = timm.create_model(name, **kwargs)  # a convolutional model: any size fits (img_size: the resize)
    return LibraryTrunk(model, call="images", resize=_resize(asked, size))


def _torchvision_builder(tv, name: str):
    """A builder of `torchvision.models.list_models()`, or a model class of torchvision.models
    whose constructor takes plain values (`VisionTransformer`, `SwinTransformer`, `DenseNet`)."""
    models = tv.models
    if name in models.list_models():
        return models.get_model_builder(name), True
    found = getattr(models, name, None)
    if isinstance(found, type) and issubclass(found, nn.Module):
        return found, False
    classes = [n for n in dir(models) if isinstance(getattr(models, n), type) and issubclass(getattr(models, n), nn.Module)]
    raise _unknown_model("torchvision", name, [*models.list_models(), *classes])


@LIBRARIES.register("torchvision")
def torchvision_model(name: str, *, input_shape, vocab=None, config=None, **options) -> LibraryTrunk:
    """torchvision.models.get_model(name, weights=None, **options) (or the class `name`), its
    classifier (the last Linear) replaced by nn.Identity, its first conv rebuilt for the
    suite's channels; the models that are built for one input size (ViT's `image_size`,
    MaxViT's `input_size`) get the suite's."""
    tv = imports.torchvision(f"trunk 'torchvision:{name}'")
    channels, *size = _image_input("torchvision", name, input_shape)
    build, is_builder = _torchvision_builder(tv, name)
    if "weights" in options:
        raise PrunefuseError(f"trunk 'torchvision:{name}': weights are never downloaded; leave out weights")
    kwargs = dict(options, **({"weights": None} if is_builder else {}))
    key = _size_key(build, name)
    asked = _size(kwargs.pop("image_size"), "image_size") if "image_size" in kwargs and key != "image_size" else None
    resize = _resize(asked, size)  # a model that takes any size: image_size is the resize
    if key == "image_size":  # square images only
        side = kwargs.get(key, max(size))
        kwargs[key], resize = side, _resize((side, side), size)
    elif key == "input_size":
        kwargs[key] = _size(kwargs.get(key, tuple(size)), key)
        resize = _resize(kwargs[key], size)
    model = build(**kwargs)
    _drop_classifier(model)
    _fit_stem(model, channels)
    return LibraryTrunk(model, call="images", resize=resize)


def _size_key(build, name: str) -> str | None:
    for key in ("image_size", "input_size"):
        if _accepts(build, key):
            return key
    if name.startswith("vit_"):
        return "image_size"  # vit_b_16 … pass it on to VisionTransformer through **kwargs
    if name.startswith("maxvit_"):
        return "input_size"
    return None


def _accepts(fn, key: str) -> bool:
    try:
        return key in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _drop_classifier(model: nn.Module) -> None:
    """The classifier is the model's last Linear (torchvision's `fc`, `classifier[-1]`,
    `heads.head`, `head`): it becomes nn.Identity, so the model returns its features."""
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise PrunefuseError("no Linear classifier found to remove (a convolutional classifier, such as "
                             "SqueezeNet's, is not supported)")
    parent, _, attr = last[-1].rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())


def _fit_stem(model: nn.Module, channels: int) -> None:
    """torchvision's models take 3 channels: the first conv is rebuilt for `channels`."""
    if channels == 3:
        return
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.in_channels != 3 or conv.groups != 1:
        raise PrunefuseError(f"cannot fit the first conv ({type(conv).__name__}) to {channels} input channels")
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


@LIBRARIES.register("hf")
def hf_model(model_type: str, *, input_shape, vocab=None, config=None, **options) -> LibraryTrunk:
    """transformers.AutoModel.from_config(AutoConfig.for_model(model_type, **config, **options)),
    sized to the suite (`hf_config`), without its pooler where the class can leave it out."""
    transformers = imports.transformers(f"trunk 'hf:{model_type}'")
    cfg, call, resize = hf_config(transformers, model_type, input_shape, vocab=vocab, config=config, options=options)
    auto = transformers.AutoModel
    cls = auto._model_mapping[type(cfg)] if type(cfg) in auto._model_mapping else None
    extra = {"add_pooling_layer": False} if cls is not None and _accepts(cls.__init__, "add_pooling_layer") else {}
    model = auto.from_config(cfg, **extra)
    return LibraryTrunk(model, call=call, resize=resize)


def hf_config(transformers, model_type: str, input_shape, *, vocab, config, options):
    """(config, how the model is called, resize): the library's defaults for `model_type`, then
    `config` (a config.json dict), then `options`, then what the suite fixes."""
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise _unknown_model("transformers (hf:MODEL_TYPE)", model_type, CONFIG_MAPPING.keys())
    given = dict(config or {})
    if given.get("model_type", model_type) != model_type:
        raise PrunefuseError(f"trunk 'hf:{model_type}' was given a config.json of model_type "
                             f"{given['model_type']!r}; use --trunk hf:{given['model_type']}")
    given.pop("model_type", None)
    defaults = transformers.AutoConfig.for_model(model_type).to_dict()
    for key in options:  # a typo would silently become a config attribute nobody reads
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3)
            raise PrunefuseError(f"trunk 'hf:{model_type}' has no config option {key!r}"
                                 + (f"; close matches: {', '.join(close)}" if close else ""))
    values = {**given, **options}
    if len(input_shape) == 3:
        channels, *size = input_shape
        asked = values.get("image_size")
        values.setdefault("num_channels", channels)
        values["image_size"] = asked if asked is not None else size[0] if size[0] == size[1] else tuple(size)
        if values["num_channels"] != channels:
            raise PrunefuseError(f"trunk 'hf:{model_type}': num_channels={values['num_channels']}, but the suite's "
                                 f"images have {channels} channels")
        want = _size(values["image_size"], "image_size")
        return transformers.AutoConfig.for_model(model_type, **values), "pixel_values", _resize(want, size)
    if len(input_shape) != 1:
        raise PrunefuseError(f"trunk 'hf:{model_type}' takes token ids (length,) or images (C, H, W); the suite has "
                             f"{input_shape}")
    length = input_shape[0]
    if "vocab_size" not in values and vocab is not None:
        values["vocab_size"] = int(vocab)  # the data's: a given config or option keeps its own
    elif vocab is not None and int(values["vocab_size"]) < vocab:
        raise PrunefuseError(f"trunk 'hf:{model_type}': vocab_size={values['vocab_size']} is smaller than the data's "
                             f"token ids (up to {vocab - 1})")
    positions = values.get("max_position_embeddings", defaults.get("max_position_embeddings"))
    if isinstance(positions, int) and positions < length + 2:  # RoBERTa's positions start after the pad id
        if "max_position_embeddings" in given:
            raise PrunefuseError(f"trunk 'hf:{model_type}': max_position_embeddings={positions} is too short for "
                                 f"sequences of {length} tokens")
        values["max_position_embeddings"] = length + 2
    _pad_within_vocab(values, defaults)
    return transformers.AutoConfig.for_model(model_type, **values), "input_ids", None


def _pad_within_vocab(values: dict, defaults: dict) -> None:
    """A small vocabulary (the data's) can be smaller than the library's default pad id (its
    embedding row must exist): the vocabulary grows to hold it."""
    pad = values.get("pad_token_id", defaults.get("pad_token_id"))
    if isinstance(pad, int) and isinstance(values.get("vocab_size"), int) and pad >= values["vocab_size"]:
        values["vocab_size"] = pad + 1
