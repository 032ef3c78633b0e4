"""ImageNet encoder weights from local files -> an Orbax checkpoint the encoder starts from.

Three sources, nothing downloaded:
- `timm`: a timm state dict saved as safetensors (PyTorch layout): `legacy_xception` (the
  Cadene Xception), or `--arch efficientnet_b4`, whose module tree carries timm's names, so
  `from_timm_tree` maps it by walking that tree.
- `keras`: Keras's `xception_weights_tf_dim_ordering_tf_kernels_notop.h5` (legacy HDF5 layout).
- `deepfakebench`: DeepfakeBench's trained Xception detector (`xception_best.pth`, or the same
  state dict as safetensors): a Cadene Xception under `backbone.` (timm's keys) and a 2-way
  `last_linear`, which becomes our one-logit classifier head (`model.classifier.hidden=()`).

Xception's layout (`backbones.xception.encoder_layout`, declared once beside the model) names
every layer in our tree, in timm and in Keras; both importers follow it. The checkpoint stores flat
`{"params": {path: array}, "batch_stats": {path: array}}` plus `import.json`, which records the
backbone (`encoder`) and the conventions the weights need (`pool_padding`, `bn_epsilon`) so
training refuses a mismatch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from cae_jax import backbones, flat_state
from cae_jax import config as config_lib
from cae_jax.backbones import xception

IMPORT_META = "import.json"
CLASSIFIER_ITEM = "classifier"  # The imported classifier head, where the source has one.
# The conventions each Xception source was trained with (image_size: the input it was trained
# at); timm's other backbones declare theirs as TIMM_CONVENTIONS.
CONVENTIONS = {
    "timm": xception.TIMM_CONVENTIONS,
    "keras": {"pool_padding": "same", "bn_epsilon": 1e-3},
    "deepfakebench": {"pool_padding": "torch", "bn_epsilon": 1e-5, "image_size": 256},
}


Flat = dict[str, np.ndarray]
# Our leaf name -> timm's tensor name, for modules named as timm names them.
TIMM_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
# Top-level timm tensors of the ImageNet head, which no encoder takes.
TIMM_HEADS = ("fc.", "head.", "classifier.")


def _put(params: Flat, stats: Flat, layer: xception.Layer, arrays: dict[str, np.ndarray]) -> None:
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

    for layer in xception.encoder_layout(model_config):
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
    _check_all_used(state_dict, used)
    return params, stats


def _check_all_used(state_dict: dict[str, np.ndarray], used: set[str]) -> None:
    unused = {k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")}
    unused -= {k for k in unused if k.startswith(TIMM_HEADS)}
    if unused:
        raise ValueError(f"timm tensors no encoder layer takes: {sorted(unused)[:5]}")


def from_timm_tree(state_dict: dict[str, np.ndarray], model_config: ConfigDict
                   ) -> tuple[Flat, Flat]:
    """timm tensors -> our flat params and batch stats, for a backbone whose module tree
    carries timm's names: each leaf of our encoder takes the tensor of the same path (OIHW
    kernels transposed to HWIO), checked against the shape our config builds."""
    from cae_jax import models

    _, params, stats = models.abstract_model(model_config)
    arch = backbones.backbone(model_config).TIMM_ARCH
    used = set()

    def take(ours: dict) -> Flat:
        arrays = {}
        for path, shape in ours.items():
            *module, leaf = path.split(".")
            key = ".".join([*module, TIMM_LEAVES[leaf]])
            if key not in state_dict:
                raise KeyError(f"timm state dict has no {key!r}: not a {arch} of this size")
            array = np.asarray(state_dict[key], np.float32)
            if leaf == "kernel":
                array = array.transpose(2, 3, 1, 0)
            if array.shape != shape.shape:
                raise ValueError(f"timm tensor {key!r} has shape {array.shape} (in our "
                                 f"layout); the config's {arch} needs {shape.shape}")
            used.add(key)
            arrays[path] = array
        return arrays

    ours = take(flat_state.flatten(params["encoder"])), take(flat_state.flatten(stats["encoder"]))
    _check_all_used(state_dict, used)
    return ours


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
    for layer in xception.encoder_layout(model_config):
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


def conventions(source_format: str, encoder: str) -> dict:
    """The model fields weights of this source and backbone need."""
    if encoder == xception.NAME:
        return CONVENTIONS[source_format]
    return backbones.BACKBONES[encoder].TIMM_CONVENTIONS


def save(out_dir: str | Path, params: Flat, stats: Flat, source_format: str, source: str,
         classifier: Flat | None = None, model_config: ConfigDict | None = None) -> None:
    """The arrays and import.json; `model_config` (the widths the arrays fit, and so the
    backbone) is recorded so an imported detector is rebuilt at its own size
    (`detector_config`) and training refuses another backbone (`import_meta`)."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new --output directory")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out_dir / "weights", {"params": params, "batch_stats": stats})
        if classifier:
            ckptr.save(out_dir / CLASSIFIER_ITEM, classifier)
    encoder = backbones.name_of(model_config) if model_config is not None else xception.NAME
    meta = {"format": source_format, "source": str(source), "encoder": encoder,
            **conventions(source_format, encoder), "classifier": bool(classifier)}
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
    # Imports written before backbones were a choice hold Xception weights.
    encoder = meta.get("encoder", xception.NAME)
    if encoder != backbones.name_of(config.model):
        raise ValueError(f"{src} holds {encoder} weights; the config's encoder is "
                         f"{backbones.name_of(config.model)} (model.encoder.name)")
    for key in ("pool_padding", "bn_epsilon"):
        if key in meta and config.model[key] != meta[key]:
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
                        help="timm: a timm state dict (.safetensors) of --arch; keras: Xception "
                        "notop .h5; deepfakebench: their Xception detector (.pth or .safetensors)")
    parser.add_argument("--arch", default=xception.TIMM_ARCH,
                        choices=sorted(m.TIMM_ARCH for m in backbones.BACKBONES.values()),
                        help="the timm model of a --format timm file (default: %(default)s)")
    parser.add_argument("--input", required=True, type=Path, help="the weights file")
    parser.add_argument("--output", required=True, type=Path, help="new Orbax checkpoint dir")
    parser.add_argument("--config", type=Path, default=None,
                        help="config file whose model.encoder to check (default: --arch at "
                        "full size)")


def check_encoder_shapes(params: Flat, stats: Flat, model_config: ConfigDict,
                         source: Path) -> None:
    """Raises ValueError naming the first imported array whose shape the encoder of
    `model_config` does not have (checked here, not when a run starts from the import)."""
    from cae_jax import models

    _, abstract_params, abstract_stats = models.abstract_model(model_config)
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
        read = from_timm if backbones.name_of(model_config) == xception.NAME else from_timm_tree
        params, stats = read(state_dict, model_config)
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
    module = next(m for m in backbones.BACKBONES.values() if m.TIMM_ARCH == args.arch)
    if args.format != "timm" and module is not xception:
        raise SystemExit(f"error: --arch {args.arch}: only --format timm holds one")
    try:
        config = config_lib.load_config(args.config) if args.config else config_lib.default_config()
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if not args.config:
        config.model.encoder = module.encoder_config()
    if backbones.name_of(config.model) != module.NAME:
        raise SystemExit(f"error: {args.config}: model.encoder.name is "
                         f"{backbones.name_of(config.model)!r}; --arch {args.arch} needs "
                         f"{module.NAME!r}")
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
    overrides = " ".join(f"--config.model.{k}={v}"
                         for k, v in conventions(args.format, module.NAME).items())
    if classifier:
        overrides += " --config.model.classifier.hidden=()"
    print(f"wrote {args.output} ({len(params)} parameter arrays, "
          f"{sum(v.size for v in params.values()):,} values); train with "
          f"--config.init_from={args.output} {overrides}")
    if classifier:
        print(f"evaluate it as it is: cae-jax evaluate --checkpoint {args.output} ...")
    return 0
