"""ImageNet Xception weights from local files -> an Orbax checkpoint the encoder starts from.

Three sources, nothing downloaded:
- `timm`: a timm/Cadene `legacy_xception` state dict saved as safetensors (PyTorch layout).
- `keras`: Keras's `xception_weights_tf_dim_ordering_tf_kernels_notop.h5` (legacy HDF5 layout).
- `deepfakebench`: DeepfakeBench's trained Xception detector (`xception_best.pth`, or the same
  state dict as safetensors): a Cadene Xception under `backbone.` (timm's keys) and a 2-way
  `last_linear`, which becomes our one-logit classifier head (`model.classifier.hidden=()`).

One walk over the encoder (`encoder_layout`) names every layer in our tree, in timm and in Keras;
both importers follow it, so the mapping is written once. The checkpoint stores flat
`{"params": {path: array}, "batch_stats": {path: array}}` plus `import.json`, which records the
conventions the weights need (`pool_padding`, `bn_epsilon`) so training refuses a mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import config as config_lib
from cae_jax import flat_state

IMPORT_META = "import.json"
CLASSIFIER_ITEM = "classifier"  # The imported classifier head, where the source has one.
# The conventions each source was trained with (image_size: the input it was trained at).
CONVENTIONS = {
    "timm": {"pool_padding": "torch", "bn_epsilon": 1e-5},
    "keras": {"pool_padding": "same", "bn_epsilon": 1e-3},
    "deepfakebench": {"pool_padding": "torch", "bn_epsilon": 1e-5, "image_size": 256},
}


@dataclasses.dataclass(frozen=True)
class Layer:
    path: str  # Our path below the encoder, "." separated.
    kind: str  # "conv", "sep" or "bn".
    timm: str  # Prefix in the timm state dict.
    keras: str  # Keras layer name; "" for the unnamed residual layers (matched by order).


def encoder_layout(model_config: ConfigDict) -> Iterator[Layer]:
    """Every weighted layer of the encoder, in forward order."""
    yield Layer("conv1", "conv", "conv1", "block1_conv1")
    yield Layer("bn1", "bn", "bn1", "block1_conv1_bn")
    yield Layer("conv2", "conv", "conv2", "block1_conv2")
    yield Layer("bn2", "bn", "bn2", "block1_conv2_bn")
    encoder = model_config.encoder
    widths = [(width, width) for width in encoder.entry_features]
    widths += [(encoder.entry_features[-1],) * 3] * encoder.middle_blocks
    widths += [tuple(encoder.exit_features)]
    in_width = encoder.stem_features[-1]
    for b, block_widths in enumerate(widths):
        ours, timm, keras = f"blocks.{b}", f"block{b + 1}", f"block{b + 2}"
        strided = b < len(encoder.entry_features) or b == len(widths) - 1
        if block_widths[-1] != in_width or strided:  # As in models.Block.
            yield Layer(f"{ours}.skip", "conv", f"{timm}.skip", "")
            yield Layer(f"{ours}.skipbn", "bn", f"{timm}.skipbn", "")
        first = 0 if b == 0 else 1  # timm's first block has no leading ReLU in `rep`.
        for j in range(len(block_widths)):
            yield Layer(f"{ours}.seps.{j}", "sep", f"{timm}.rep.{first + 3 * j}",
                        f"{keras}_sepconv{j + 1}")
            yield Layer(f"{ours}.bns.{j}", "bn", f"{timm}.rep.{first + 3 * j + 1}",
                        f"{keras}_sepconv{j + 1}_bn")
        in_width = block_widths[-1]
    head = f"block{len(widths) + 2}"
    yield Layer("conv3", "sep", "conv3", f"{head}_sepconv1")
    yield Layer("bn3", "bn", "bn3", f"{head}_sepconv1_bn")
    yield Layer("conv4", "sep", "conv4", f"{head}_sepconv2")
    yield Layer("bn4", "bn", "bn4", f"{head}_sepconv2_bn")


Flat = dict[str, np.ndarray]


def _put(params: Flat, stats: Flat, layer: Layer, arrays: dict[str, np.ndarray]) -> None:
    """Stores one layer's arrays (already in our layout) under our flat paths."""
    p = layer.path
    if layer.kind == "conv":
        params[f"{p}.kernel"] = arrays["kernel"]
    elif layer.kind == "sep":
        params[f"{p}.depthwise"] = arrays["depthwise"]
        params[f"{p}.pointwise.kernel"] = arrays["pointwise"]
    else:
        params[f"{p}.scale"], params[f"{p}.bias"] = arrays["scale"], arrays["bias"]
        stats[f"{p}.mean"], stats[f"{p}.var"] = arrays["mean"], arrays["var"]


def from_timm(state_dict: dict[str, np.ndarray], model_config: ConfigDict) -> tuple[Flat, Flat]:
    """timm `legacy_xception` tensors (OIHW convs) -> our flat params and batch stats."""
    params: Flat = {}
    stats: Flat = {}
    used = set()

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise KeyError(f"timm state dict has no {key!r}: not a legacy_xception of this size")
        used.add(key)
        return np.asarray(state_dict[key], np.float32)

    for layer in encoder_layout(model_config):
        t = layer.timm
        if layer.kind == "conv":
            arrays = {"kernel": take(f"{t}.weight").transpose(2, 3, 1, 0)}
        elif layer.kind == "sep":
            arrays = {"depthwise": take(f"{t}.conv1.weight").transpose(2, 3, 1, 0),
                      "pointwise": take(f"{t}.pointwise.weight").transpose(2, 3, 1, 0)}
        else:
            arrays = {"scale": take(f"{t}.weight"), "bias": take(f"{t}.bias"),
                      "mean": take(f"{t}.running_mean"), "var": take(f"{t}.running_var")}
        _put(params, stats, layer, arrays)
    unused = {k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")}
    unused -= {k for k in unused if k.startswith(("fc.", "head.", "classifier."))}
    if unused:
        raise ValueError(f"timm tensors no encoder layer takes: {sorted(unused)[:5]}")
    return params, stats


def from_deepfakebench(
    state_dict: dict[str, np.ndarray], model_config: ConfigDict
) -> tuple[Flat, Flat, Flat]:
    """DeepfakeBench `XceptionDetector` state dict -> our encoder params, batch stats and head.

    Their backbone is the Cadene Xception timm ports as `legacy_xception`, so below
    `backbone.` the keys are timm's and `from_timm` maps them. Their head is
    `last_linear` (2048 -> 2; `last_linear.1` with dropout), scored as softmax(z)[1] =
    sigmoid(z1 - z0): our single logit takes w1 - w0 and b1 - b0, exactly. `adjust_channel`
    (used only by their "adjust_channel" mode) is left out.
    """
    prefix = "module.backbone." if any(k.startswith("module.") for k in state_dict) else "backbone."
    outside = sorted(k for k in state_dict if not k.startswith(prefix))
    if outside:
        raise ValueError(f"not a DeepfakeBench Xception detector: keys outside {prefix}: "
                         f"{outside[:5]}")
    backbone = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    head = next((h for h in ("last_linear", "last_linear.1") if f"{h}.weight" in backbone), None)
    if head is None:
        raise KeyError(f"no {prefix}last_linear.weight: not a DeepfakeBench Xception detector")
    weight = np.asarray(backbone.pop(f"{head}.weight"), np.float64)
    bias = np.asarray(backbone.pop(f"{head}.bias"), np.float64)
    if weight.shape[0] != 2:
        raise ValueError(f"last_linear has {weight.shape[0]} outputs, not 2 (real, fake)")
    backbone = {k: v for k, v in backbone.items() if not k.startswith("adjust_channel.")}
    params, stats = from_timm(backbone, model_config)
    classifier = {"out.kernel": (weight[1] - weight[0])[:, None].astype(np.float32),
                  "out.bias": np.array([bias[1] - bias[0]], np.float32)}
    return params, stats, classifier


def read_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict from .safetensors, or from a .pth/.pt file through
    `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers
    (no arbitrary unpickling). torch is needed only for the latter."""
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    try:
        import torch
    except ImportError as err:
        raise SystemExit(f"error: {path}: reading a PyTorch checkpoint needs torch "
                         "(pip install torch), or convert it to .safetensors") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several kinds for a refused file.
        raise SystemExit(f"error: {path}: not loadable as tensors only (weights_only=True): "
                         f"{type(err).__name__}: {err}") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # Their trainer's {"state_dict": ...} variant.
    if not isinstance(loaded, dict):
        raise SystemExit(f"error: {path}: holds a {type(loaded).__name__}, not a state dict")
    return {k: v.detach().float().numpy() for k, v in loaded.items() if torch.is_tensor(v)}


def _read_legacy_h5(path: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(layer name, {weight name: array}) in model order, from a legacy Keras HDF5 file."""
    import h5py

    layers = []
    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in group.attrs:
            raise ValueError(f"{path}: not a Keras legacy HDF5 weights file (no layer_names)")
        for raw_name in group.attrs["layer_names"]:
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            g = group[name]
            weights = {}
            for raw_w in g.attrs["weight_names"]:
                w = raw_w.decode() if isinstance(raw_w, bytes) else str(raw_w)
                weights[w.split("/")[-1].split(":")[0]] = np.asarray(g[w], np.float32)
            if weights:
                layers.append((name, weights))
    return layers


def from_keras(path: str | Path, model_config: ConfigDict) -> tuple[Flat, Flat]:
    """Keras Xception (HWIO convs, (3,3,C,1) depthwise) -> our flat params and batch stats."""
    path = Path(path)
    layers = _read_legacy_h5(path)
    named = dict(layers)
    residual_convs = [w for n, w in layers if not n.startswith("block") and len(w) == 1]
    residual_bns = [w for n, w in layers if not n.startswith("block") and "gamma" in w]
    params: Flat = {}
    stats: Flat = {}
    for layer in encoder_layout(model_config):
        if layer.keras:
            if layer.keras not in named:
                raise KeyError(f"{path}: no layer {layer.keras!r}: not an Xception of this size")
            w = named[layer.keras]
        else:
            pool = residual_convs if layer.kind == "conv" else residual_bns
            if not pool:
                raise KeyError(f"{path}: fewer residual layers than the encoder has")
            w = pool.pop(0)
        if layer.kind == "conv":
            arrays = {"kernel": w["kernel"]}
        elif layer.kind == "sep":
            arrays = {"depthwise": w["depthwise_kernel"].transpose(0, 1, 3, 2),
                      "pointwise": w["pointwise_kernel"]}
        else:
            arrays = {"scale": w["gamma"], "bias": w["beta"], "mean": w["moving_mean"],
                      "var": w["moving_variance"]}
        _put(params, stats, layer, arrays)
    if residual_convs or residual_bns:
        raise ValueError(f"{path}: more residual layers than the encoder has")
    return params, stats


def save(out_dir: str | Path, params: Flat, stats: Flat, source_format: str, source: str,
         classifier: Flat | None = None, model_config: ConfigDict | None = None) -> None:
    """The arrays and import.json; `model_config` (the widths the arrays fit) is recorded so
    an imported detector is rebuilt at its own size (`detector_config`)."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new --output directory")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / "weights", {"params": params, "batch_stats": stats})
        if classifier:
            ckptr.save(out_dir / CLASSIFIER_ITEM, classifier)
    meta = {"format": source_format, "source": str(source), **CONVENTIONS[source_format],
            "classifier": bool(classifier)}
    if model_config is not None:
        meta["model"] = model_config.to_dict()
    (out_dir / IMPORT_META).write_text(json.dumps(meta, indent=2))


def is_import(path: str | Path) -> bool:
    """Whether `path` is an `import-weights` output (rather than a training workdir)."""
    return (Path(path) / IMPORT_META).is_file()


def detector_config(import_dir: str | Path, base: ConfigDict | None = None) -> ConfigDict:
    """The config that runs an imported detector as it was trained: `base` (default: the
    default config) with the source's conventions, the one-logit head, and init_from."""
    import_dir = Path(import_dir).absolute()
    meta = json.loads((import_dir / IMPORT_META).read_text())
    config = base if base is not None else config_lib.default_config()
    config.init_from = str(import_dir)
    if "model" in meta:  # Imports before it was recorded hold the default widths.
        config.model.update(meta["model"])
    for key in ("pool_padding", "bn_epsilon", "image_size"):
        if key in meta:
            config.model[key] = meta[key]
    if meta.get("classifier"):
        config.model.classifier.hidden = ()
    return config


def import_meta(config: ConfigDict) -> dict:
    """What `config.init_from` was imported from, once its conventions are checked against
    the config's model (cheap: run before initializing a model only to throw it away)."""
    src = Path(config.init_from).absolute()
    meta_path = src / IMPORT_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not written by `cae-jax import-weights`")
    meta = json.loads(meta_path.read_text())
    for key in ("pool_padding", "bn_epsilon"):
        if config.model[key] != meta[key]:
            raise ValueError(
                f"{src} holds {meta['format']} weights, which need model.{key}={meta[key]!r}; "
                f"the config has {config.model[key]!r} (override --config.model.{key}={meta[key]})"
            )
    return meta


def load_encoder(state, config: ConfigDict, meta: dict):
    """Replaces the encoder of a TrainState by the imported weights `meta` describes."""
    import orbax.checkpoint as ocp

    src = Path(config.init_from).absolute()
    encoder = {"params": flat_state.flatten(state.params["encoder"]),
               "batch_stats": flat_state.flatten(state.batch_stats["encoder"])}
    with ocp.StandardCheckpointer() as ckptr:
        loaded = ckptr.restore(src / "weights", {name: flat_state.restore_target(arrays)
                                                 for name, arrays in encoder.items()})
        # The source's own head (a trained detector), where our head has its shape.
        head = None
        if meta.get("classifier") and not config.model.classifier.hidden:
            head = ckptr.restore(src / CLASSIFIER_ITEM, flat_state.restore_target(
                flat_state.flatten(state.params["classifier"])))

    def replace(tree: nnx.State, part: str, arrays: dict[str, jax.Array]) -> nnx.State:
        tree = jax.tree.map(lambda x: x, tree)  # A copy: the input state stays as it was.
        tree[part] = flat_state.unflatten(tree[part], arrays)
        return tree

    params = replace(state.params, "encoder", loaded["params"])
    if head is not None:
        params = replace(params, "classifier", head)
    return state.replace(params=params,
                         batch_stats=replace(state.batch_stats, "encoder", loaded["batch_stats"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=sorted(CONVENTIONS),
                        help="timm: legacy_xception state dict (.safetensors); keras: notop .h5; "
                        "deepfakebench: their Xception detector (.pth or .safetensors)")
    parser.add_argument("--input", required=True, type=Path, help="the weights file")
    parser.add_argument("--output", required=True, type=Path, help="new Orbax checkpoint dir")
    parser.add_argument("--config", type=Path, default=None,
                        help="config file whose model.encoder widths to check (default: full size)")


def check_encoder_shapes(params: Flat, stats: Flat, model_config: ConfigDict,
                         source: Path) -> None:
    """Raises ValueError naming the first imported array whose shape the encoder of
    `model_config` does not have (checked here, not when a run starts from the import)."""
    from cae_jax import train_step

    _, abstract_params, abstract_stats = train_step.abstract_model(model_config)
    for arrays, abstract in ((params, abstract_params), (stats, abstract_stats)):
        shapes = {k: tuple(v.shape) for k, v in flat_state.flatten(abstract["encoder"]).items()}
        for key, array in arrays.items():
            if tuple(array.shape) != shapes.get(key):
                raise ValueError(f"{source}: array {key} has shape {tuple(array.shape)}, the "
                                 f"encoder's is {shapes.get(key)} (model.encoder widths of "
                                 "--config)")


def _read(args: argparse.Namespace, model_config: ConfigDict) -> tuple[Flat, Flat, Flat | None]:
    """(params, batch stats, classifier head or None) of the --input file."""
    classifier = None
    if args.format == "timm":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            state_dict = load_file(str(args.input))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{args.input}: not a safetensors file ({err})") from err
        params, stats = from_timm(state_dict, model_config)
    elif args.format == "deepfakebench":
        state_dict = read_torch_state_dict(args.input)
        params, stats, classifier = from_deepfakebench(state_dict, model_config)
    else:
        try:
            params, stats = from_keras(args.input, model_config)
        except OSError as err:
            raise ValueError(f"{args.input}: not a Keras HDF5 weights file ({err})") from err
    check_encoder_shapes(params, stats, model_config, args.input)
    return params, stats, classifier


def run(args: argparse.Namespace) -> int:
    try:
        config = config_lib.load_config(args.config) if args.config else config_lib.default_config()
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if not args.input.is_file():
        raise SystemExit(f"error: {args.input}: no such file")
    if args.output.exists():
        raise SystemExit(f"error: --output {args.output} exists; choose a new directory")
    try:
        params, stats, classifier = _read(args, config.model)
    except (KeyError, ValueError) as err:
        message = str(err.args[0] if err.args else err)  # A KeyError's str() adds quotes.
        if str(args.input) not in message:
            message = f"{args.input}: {message}"
        raise SystemExit(f"error: {message}") from err
    save(args.output, params, stats, args.format, args.input, classifier, config.model)
    overrides = " ".join(f"--config.model.{k}={v}" for k, v in CONVENTIONS[args.format].items())
    if classifier:
        overrides += " --config.model.classifier.hidden=()"
    print(f"wrote {args.output} ({len(params)} parameter arrays, "
          f"{sum(v.size for v in params.values()):,} values); train with "
          f"--config.init_from={args.output} {overrides}")
    if classifier:
        print(f"evaluate it as it is: cae-jax evaluate --checkpoint {args.output} ...")
    return 0
