"""Configs: Python files with `get_config()` (as in big_vision), plus `--config.a.b=v` overrides.

`default_config()` holds every field with its default and the reason for it; files in
`configs/` start from it and change only what their setting needs.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ml_collections import ConfigDict


def default_config() -> ConfigDict:
    from cae_jax import backbones  # Backbone modules import jax; this module stays light.

    config = ConfigDict()
    # Every random stream (init, dropout, data order, augmentation) derives from it.
    config.seed = 0
    # Orbax checkpoint written by `cae-jax import-weights` to start the encoder from; "" = random.
    config.init_from = ""

    config.model = ConfigDict()
    config.model.image_size = 299  # Xception's native input; gives the 10x10x2048 latent.
    # Compute dtype: "float32" or "bfloat16" (parameters stay float32).
    config.model.dtype = "float32"
    config.model.bn_momentum = 0.99  # Running-average decay (Keras convention; PyTorch's 0.01).
    config.model.bn_epsilon = 1e-3  # Keras Xception's value; timm's legacy_xception uses 1e-5.
    # Devices whose examples share BatchNorm's training statistics: 0 = the whole global batch
    # (one all-reduce per layer across every chip), 1 = each device's own, N = groups of N.
    config.model.bn_group = 0
    # MaxPool padding in the strided blocks: "torch" (symmetric, timm/Cadene weights) or
    # "same" (TF/Keras). They differ only where the input side is even (74 -> 37 at 299).
    config.model.pool_padding = "torch"
    # How convolutions, pooling and BatchNorm statistics run (`cae_jax/ops`): "auto" (chosen
    # per platform when the program is lowered: "decomposed" for the CPU, "native" for GPU/TPU),
    # "decomposed" (convs as matrix products, depthwise as nine shifted multiply-adds,
    # transposed convs per output phase, max-pool as a max of slices, gradients written out)
    # or "native" (XLA's ops). Same parameters and values; XLA:CPU's native kernels are slow.
    config.model.layer_impl = "auto"
    # The encoder (`cae_jax/backbones`): `name` picks the backbone, the rest are its fields
    # (Xception's by default; configs/ffpp_c23_effb4.py shows EfficientNet-B4's).
    config.model.encoder = backbones.xception.encoder_config()
    config.model.decoder = ConfigDict()
    # ConvTranspose(4x4, stride 2) + BatchNorm + ReLU stages from the latent (10 -> 320), then
    # a 3x3 conv to RGB and a resize to the input size when the stages overshoot it.
    config.model.decoder.features = (512, 256, 128, 64, 32)
    config.model.decoder.kernel_size = 4
    # Matches the [-1, 1] input normalization of Xception.
    config.model.decoder.output_activation = "tanh"
    config.model.classifier = ConfigDict()
    # Dense + ReLU + Dropout layers after global average pooling.
    config.model.classifier.hidden = (256,)
    config.model.classifier.dropout = 0.5

    config.loss = ConfigDict()
    # L = sum of each term of `losses.TERMS` times its weight (0 turns a term off).
    config.loss.bce_weight = 1.0  # Real/fake binary cross-entropy of the classifier.
    config.loss.recon_weight = 1.0  # lambda in L = BCE + lambda * recon.
    config.loss.recon = "mse"  # "mse" or "l1".
    config.loss.recon_real_only = False  # Reconstruct only real faces (fakes add BCE only).
    # 1 - SSIM of the reconstruction (11x11 Gaussian window; needs image_size >= 11), averaged
    # as recon (real faces only with recon_real_only).
    config.loss.ssim_weight = 0.0

    config.optim = ConfigDict()
    config.optim.learning_rate = 2e-4  # Peak of the warmup + cosine schedule.
    config.optim.warmup_steps = 500
    config.optim.end_learning_rate_factor = 0.01  # Cosine decays to peak * factor at train.steps.
    config.optim.weight_decay = 1e-4  # AdamW decoupled weight decay (not applied to BN and biases).
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8  # Adam's denominator epsilon.
    config.optim.clip_grad_norm = 1.0  # Global-norm clipping; 0 disables it.

    config.mesh = ConfigDict()
    config.mesh.data = -1  # Data-parallel axis size; -1 takes all devices left over by fsdp.
    config.mesh.fsdp = 1  # Parameter-sharding axis size (the batch is split over it too).
    config.mesh.slices = 1  # TPU slices (multislice): the data axis spans them over DCN.

    config.train = ConfigDict()
    config.train.steps = 20_000
    config.train.batch_size = 32  # Global batch over all hosts and devices.
    config.train.log_every = 50
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 3  # The last K are kept, plus the best by validation AUC.
    config.train.nan_policy = "stop"  # "stop" (keep last good checkpoint) or "skip" the bad step.
    # Validation faces shown with their reconstructions in TensorBoard.
    config.train.recon_images = 8
    # Compiled steps saved by `cae-jax compile --save-executable DIR`, loaded instead of
    # compiling where they match this run (versions, devices, program); "" compiles.
    config.train.executable = ""

    # Input pipeline (cae_jax/input_pipeline.py, docs/input_pipeline.md).
    config.input = ConfigDict()
    config.input.train_dirs = ()  # `cae-jax prepare` output dirs to train on, mixed by `weights`.
    config.input.weights = ()  # One mixing weight per train dir; () = proportional to their sizes.
    config.input.train_split = "train"
    config.input.eval_dir = ""  # Prepared dir to evaluate on; "" = the first train dir.
    config.input.eval_split = "validation"
    config.input.eval_batch_size = 0  # Global evaluation batch; 0 = train.batch_size.
    # Draw real and fake 1:1 per dataset (FF++ is 1 real : 4 fake).
    config.input.class_balance = False
    config.input.workers = 0  # grain worker processes per host; 0 = decode in the training process.
    config.input.threads = 8  # Reader threads per process (OpenCV releases the GIL while decoding).
    config.input.buffer = 64  # Records read ahead per process, across its threads.
    config.input.prefetch_batches = 2  # Batches assembled ahead in a background thread.
    # Skip (and log) corrupt records instead of stopping with an error.
    config.input.skip_corrupt = False
    # DeepfakeBench's Xception recipe; each step runs with its probability (0 disables it).
    config.input.augment = ConfigDict()
    # Resize with a random one of 3 interpolation pairs, else area/cubic.
    config.input.augment.resize_prob = 1.0
    config.input.augment.flip_prob = 0.5  # Horizontal flip.
    config.input.augment.blur_prob = 0.5  # Gaussian blur, odd kernel size drawn from blur_kernel.
    config.input.augment.blur_kernel = (3, 7)
    # x * (1 + U(+-contrast)) + 255 * U(+-brightness).
    config.input.augment.brightness_contrast_prob = 0.5
    config.input.augment.brightness_limit = 0.1
    config.input.augment.contrast_limit = 0.1
    # JPEG re-compression at a quality drawn from jpeg_quality.
    config.input.augment.jpeg_prob = 0.5
    config.input.augment.jpeg_quality = (40, 100)
    # Where upscaling, flip, blur and brightness/contrast run: "auto" (in the train step on
    # GPU/TPU, on the host on CPU), "on" or "off". Decode, downscaling, SBI and JPEG stay on
    # the host.
    config.input.augment.on_device = "auto"
    # Self-blended images: real training faces turned into fakes on the fly (cae_jax/sbi.py).
    config.input.sbi = ConfigDict()
    # Chance a real training face becomes an SBI fake (label 1); 0 = off.
    config.input.sbi.prob = 0.0
    return config


def get_config() -> ConfigDict:
    """Lets `default_config` itself serve as a config file."""
    return default_config()


# The repository's configs/ in a checkout (editable install); cae_jax/configs in a wheel.
_SHIPPED_DIRS = (Path(__file__).resolve().parent.parent / "configs",
                 Path(__file__).resolve().parent / "configs")


def shipped_config(name: str) -> Path:
    """Path of a config that ships with cae-jax ("tiny", "tiny.py" or "configs/tiny.py")."""
    file_name = Path(name).stem + ".py"
    for directory in _SHIPPED_DIRS:
        if (directory / file_name).is_file():
            return directory / file_name
    raise FileNotFoundError(f"config file not found: {name} (nor a shipped config {file_name})")


def python_file(path: str | Path, namespace: str) -> ModuleType:
    """Runs a Python file (a config or sweep file) as a module named `namespace_<stem>`."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"{namespace}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str | Path, overrides: list[str] | None = None) -> ConfigDict:
    """Runs `get_config()` of a Python config file and applies `--config.a.b=v` overrides.

    A path that exists wins; otherwise its file name picks a shipped config, so that
    `--config configs/tiny.py` works from any directory once cae-jax is installed.
    """
    path = Path(path)
    if not path.is_file():
        path = shipped_config(str(path))
    config = python_file(path, "cae_jax_config").get_config()
    apply_overrides(config, overrides or [])
    validate(config)
    return config


def apply_overrides(config: ConfigDict, overrides: list[str]) -> ConfigDict:
    """Applies absl-style `--config.a.b=value` (or `--config.a.b value`) items in place."""
    items = list(overrides)
    while items:
        item = items.pop(0)
        if not item.startswith("--config."):
            raise ValueError(f"unrecognized argument {item!r}: overrides look like --config.a.b=v")
        key, sep, value = item[len("--config.") :].partition("=")
        if not sep:
            if not items:
                raise ValueError(f"override {item!r} has no value")
            value = items.pop(0)
        set_field(config, key, value)
    return config


def set_field(config: ConfigDict, dotted_key: str, text: str) -> None:
    """Sets a field from text, parsed to the type of the field it replaces."""
    *parents, name = dotted_key.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, ConfigDict) else None
    if not isinstance(node, ConfigDict) or name not in node or isinstance(node[name], ConfigDict):
        raise ValueError(unknown_field_message(config, dotted_key))
    old = node[name]
    node[name] = _parse_like(old, text, dotted_key)


def field_names(config: ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of `config` ("train.steps", ...)."""
    names = []
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            names += field_names(value, f"{prefix}{key}.")
        else:
            names.append(prefix + key)
    return names


def unknown_field_message(config: ConfigDict, dotted_key: str) -> str:
    """"unknown config field ...", with the closest known field name where one is close."""
    close = difflib.get_close_matches(dotted_key, field_names(config), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f"unknown config field --config.{dotted_key}{hint}"


def _parse_like(old, text: str, key: str):
    if isinstance(old, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key} takes true/false, got {text!r}")
    if isinstance(old, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"--config.{key}: cannot parse {text!r}") from err
    if isinstance(old, float) and isinstance(value, int):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(old, tuple) and not isinstance(value, tuple):
        value = (value,)
    if old is not None and not isinstance(value, type(old)):
        raise ValueError(f"--config.{key} is {type(old).__name__}, got {text!r}")
    return value


def _integer(low: int) -> tuple[Callable, str]:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    return ok, f"an integer >= {low}"


def _number(low: float, high: float = math.inf, *, open_low=False, open_high=False):
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > low if open_low else v >= low) and (v < high if open_high else v <= high)

    return ok, (f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
                if math.isfinite(high) else f"a number {'>' if open_low else '>='} {low}")


def _widths(min_len: int, max_len: float = math.inf) -> tuple[Callable, str]:
    ok = lambda v: (isinstance(v, tuple | list) and min_len <= len(v) <= max_len  # noqa: E731
                    and all(_integer(1)[0](w) for w in v))
    count = f"{min_len}" if max_len == min_len else f"{min_len} or more"
    return ok, f"{count} positive integers"


def _range(low: int, high: int) -> tuple[Callable, str]:
    ok = lambda v: (isinstance(v, tuple | list) and len(v) == 2  # noqa: E731
                    and all(_integer(low)[0](x) and x <= high for x in v) and v[0] <= v[1])
    return ok, f"(low, high) integers with {low} <= low <= high <= {high}"


def _one_of(*choices: str) -> tuple[Callable, str]:
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


_PROBABILITY = _number(0.0, 1.0)
LAYER_IMPLS = ("auto", "decomposed", "native")  # How `cae_jax/ops` computes (model.layer_impl).
# Every numeric or enumerated field whose bad value would divide by zero, loop forever, or
# fail only later (after compiling, or hours into a run): (dotted key, (check, requirement)).
RULES: tuple[tuple[str, tuple[Callable, str]], ...] = (
    ("seed", _integer(0)),
    ("model.image_size", _integer(1)),  # And the encoder's minimum (`_encoder_problems`).
    ("model.dtype", _one_of("float32", "bfloat16")),
    ("model.bn_momentum", _PROBABILITY),
    ("model.bn_epsilon", _number(0.0, open_low=True)),
    ("model.bn_group", _integer(0)),
    ("model.pool_padding", _one_of("torch", "same")),
    ("model.layer_impl", _one_of(*LAYER_IMPLS)),
    ("model.decoder.features", _widths(1)),
    ("model.decoder.kernel_size", _integer(1)),
    ("model.decoder.output_activation", _one_of("tanh", "sigmoid")),
    ("model.classifier.hidden", _widths(0)),
    ("model.classifier.dropout", _number(0.0, 1.0, open_high=True)),
    ("loss.bce_weight", _number(0.0)),
    ("loss.recon_weight", _number(0.0)),
    ("loss.ssim_weight", _number(0.0)),
    ("loss.recon", _one_of("mse", "l1")),
    ("optim.learning_rate", _number(0.0, open_low=True)),
    ("optim.warmup_steps", _integer(0)),
    ("optim.end_learning_rate_factor", _number(0.0)),
    ("optim.weight_decay", _number(0.0)),
    ("optim.b1", _number(0.0, 1.0, open_high=True)),
    ("optim.b2", _number(0.0, 1.0, open_high=True)),
    ("optim.eps", _number(0.0, open_low=True)),
    ("optim.clip_grad_norm", _number(0.0)),
    ("mesh.data", ((lambda v: v == -1 or _integer(1)[0](v)), "-1 or an integer >= 1")),
    ("mesh.fsdp", _integer(1)),
    ("mesh.slices", _integer(1)),
    ("train.steps", _integer(1)),
    ("train.batch_size", _integer(1)),
    ("train.log_every", _integer(1)),
    ("train.eval_every", _integer(1)),
    ("train.checkpoint_every", _integer(1)),
    ("train.keep_checkpoints", _integer(1)),
    ("train.nan_policy", _one_of("stop", "skip")),
    ("train.recon_images", _integer(0)),
    ("input.weights", ((lambda v: all(_number(0.0, open_low=True)[0](w) for w in v)),
                       "positive numbers")),
    ("input.eval_batch_size", _integer(0)),
    ("input.workers", _integer(0)),
    ("input.threads", _integer(1)),
    ("input.buffer", _integer(1)),
    ("input.prefetch_batches", _integer(0)),
    ("input.augment.resize_prob", _PROBABILITY),
    ("input.augment.flip_prob", _PROBABILITY),
    ("input.augment.blur_prob", _PROBABILITY),
    ("input.augment.blur_kernel", _range(1, 99)),
    ("input.augment.brightness_contrast_prob", _PROBABILITY),
    ("input.augment.brightness_limit", _number(0.0, 1.0)),
    ("input.augment.contrast_limit", _number(0.0, 1.0)),
    ("input.augment.jpeg_prob", _PROBABILITY),
    ("input.augment.jpeg_quality", _range(0, 100)),
    ("input.augment.on_device", _one_of("auto", "on", "off")),
    ("input.sbi.prob", _PROBABILITY),
)


def validate(config: ConfigDict) -> None:
    """Raises ValueError naming every field whose value no run could use (see RULES, and the
    RULES of the backbone `model.encoder.name` picks).

    Called by `load_config` (so by every command that reads a config file) and by `train`,
    before anything is compiled or written.
    """
    problems = []
    for key, (ok, requirement) in RULES:
        node = config
        for part in key.split("."):
            node = node[part]
        if not ok(node):
            problems.append(f"{key}={node!r} (must be {requirement})")
    problems += _encoder_problems(config.model)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def _encoder_problems(model_config: ConfigDict) -> list[str]:
    from cae_jax import backbones

    try:
        module = backbones.backbone(model_config)
    except ValueError as err:
        return [str(err)]
    problems = []
    for key, (ok, requirement) in module.RULES:
        if key not in model_config.encoder:
            problems.append(f"model.encoder.{key} is missing ({module.NAME} needs it)")
        elif not ok(model_config.encoder[key]):
            problems.append(f"model.encoder.{key}={model_config.encoder[key]!r} "
                            f"(must be {requirement})")
    size = model_config.image_size
    if not problems and _integer(1)[0](size):
        minimum = backbones.min_image_size(model_config)
        if size < minimum:
            problems.append(f"model.image_size={size} (must be an integer >= {minimum} for "
                            f"{module.NAME}: a smaller input leaves it no latent)")
    return problems


def eval_data_dir(config: ConfigDict) -> str:
    """The prepared dir the trainer validates on and evaluation reads by default:
    `input.eval_dir`, else the first train dir; "" where the config names neither."""
    return config.input.eval_dir or next(iter(config.input.train_dirs), "")


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def _take_saved_encoder_defaults(config: ConfigDict, saved: dict) -> None:
    """Gives `config` (a whole config or its model group) the encoder defaults of the backbone
    `saved` names (Xception's where it names none), whose fields differ from the default's."""
    from cae_jax import backbones

    model, saved_model = (config, saved) if "encoder" in config else (
        config.get("model"), saved.get("model") if isinstance(saved, dict) else None)
    encoder = saved_model.get("encoder") if isinstance(saved_model, dict) else None
    if isinstance(model, ConfigDict) and isinstance(encoder, dict):
        module = backbones.BACKBONES.get(encoder.get("name", backbones.DEFAULT))
        if module is not None:
            model.encoder = module.encoder_config()


def from_saved(saved: dict, source: str, defaults: ConfigDict | None = None) -> ConfigDict:
    """A config saved by any release (config.json, a bundle's model) merged onto today's
    `defaults` (`default_config()`): fields added since it was written take their defaults
    and fields since removed are dropped, one log line each, so old workdirs and bundles
    keep working. JSON lists become tuples where the default is one. Raises ValueError
    where the saved layout does not fit (a value where a group belongs, or the reverse)."""
    config = default_config() if defaults is None else ConfigDict(defaults.to_dict())
    _take_saved_encoder_defaults(config, saved)
    added = set(field_names(config))
    dropped = []

    def merge(node: ConfigDict, values: dict, prefix: str) -> None:
        if not isinstance(values, dict):
            raise ValueError(f"{prefix[:-1] or 'the config'} is not a group of fields")
        for key, value in values.items():
            name = prefix + key
            if key not in node:
                dropped.append(name)
            elif isinstance(node[key], ConfigDict):
                merge(node[key], value, name + ".")
            elif isinstance(value, dict):
                raise ValueError(f"{name} is a field, not a group")
            else:
                try:
                    node[key] = tuple(value) if isinstance(node[key], tuple) else value
                except TypeError as err:
                    raise ValueError(f"{name}: {err}") from err
                added.discard(name)

    merge(config, saved, "")
    if added == set(field_names(config)):
        raise ValueError("it has none of cae-jax's config fields")
    if added:
        logging.warning("%s: written before fields %s existed; they take their defaults.",
                        source, ", ".join(sorted(added)))
    if dropped:
        logging.warning("%s: fields %s are no longer used; ignored.",
                        source, ", ".join(sorted(dropped)))
    return config
