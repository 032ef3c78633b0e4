"""Train state, optimizer, and the jitted train/eval steps with explicit shardings.

The model's graph (NNX GraphDef) is static; its arrays live in `TrainState` as pytrees, so one
`jax.jit` with NamedShardings over the (data, fsdp) mesh runs the whole step. BatchNorm batch
statistics are means over the sharded global batch, so they are global-batch statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from cae_jax import augment, device_augment, losses, models, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: Any


def learning_rate_schedule(config: ConfigDict) -> optax.Schedule:
    optim_config = config.optim
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_config.learning_rate,
        warmup_steps=optim_config.warmup_steps,
        decay_steps=max(config.train.steps, optim_config.warmup_steps + 1),
        end_value=optim_config.learning_rate * optim_config.end_learning_rate_factor,
    )


def make_optimizer(config: ConfigDict) -> optax.GradientTransformation:
    """AdamW on a warmup + cosine schedule, after global-norm clipping; no decay on 1-D arrays."""
    optim_config = config.optim
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=optim_config.b1, b2=optim_config.b2,
        eps=optim_config.eps, weight_decay=optim_config.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
    )
    if optim_config.clip_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim_config.clip_grad_norm), adamw)
    return adamw


def bn_groups(model_config: ConfigDict, mesh: Mesh) -> int:
    """Groups of the global batch with their own BatchNorm statistics: `model.bn_group`
    devices' examples each (0: one group, the whole batch)."""
    group = model_config.bn_group
    if group == 0:
        return 1
    if mesh.size % group:
        raise ValueError(f"model.bn_group={group} must divide the mesh's {mesh.size} devices")
    return mesh.size // group


@dataclasses.dataclass(frozen=True)
class AbstractState:
    """What a run derives once from its config and mesh and hands to every step and restore.

    `shapes` is the TrainState as ShapeDtypeStructs carrying their shardings: the target an
    Orbax restore lays the saved arrays into. `shardings` are the same NamedShardings alone,
    as `jax.jit` takes them.
    """

    mesh: Mesh
    graphdef: nnx.GraphDef
    shapes: TrainState
    shardings: TrainState


def abstract_state(config: ConfigDict, mesh: Mesh) -> AbstractState:
    """The model graph and the train state's shapes and shardings, from shapes alone."""
    graphdef, params, batch_stats = models.abstract_model(config.model,
                                                          bn_groups(config.model, mesh))
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=jax.eval_shape(make_optimizer(config).init, params),
    )
    shardings = sharding.tree_shardings(mesh, shapes)
    shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
    return AbstractState(mesh=mesh, graphdef=graphdef, shapes=shapes, shardings=shardings)


def init_state(config: ConfigDict) -> TrainState:
    _, params, batch_stats = models.split_model(models.build_model(config.model, config.seed))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=make_optimizer(config).init(params),
    )


def create_train_state(config: ConfigDict, abstract: AbstractState) -> TrainState:
    """Initializes the state directly in its sharded layout (no full copy on one device)."""
    if config.init_from:  # Checked first: a convention mismatch fails before a full init.
        from cae_jax import weights  # Only needed when starting from imported weights.

        meta = weights.import_meta(config)
    state = jax.jit(lambda: init_state(config), out_shardings=abstract.shardings)()
    if config.init_from:
        state = weights.load_encoder(state, config, meta)
    return state


@dataclasses.dataclass(frozen=True)
class Program:
    """What a run compiles, built once from its config and devices: by `cae-jax train` on the
    devices it has, and by `cae-jax compile` on a topology's compile-only devices."""

    abstract: AbstractState
    train_step: Callable
    eval_step: Callable  # With reconstructions: the trainer's validation draws them.


def build_program(config: ConfigDict, devices: Sequence[jax.Device]) -> Program:
    """The (data, fsdp) mesh over `devices`, the abstract state, and the jitted steps."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices, config.mesh.slices)
    abstract = abstract_state(config, mesh)
    return Program(abstract, make_train_step(config, abstract),
                   make_eval_step(config, abstract, with_reconstructions=True))


def batch_shapes(config: ConfigDict, mesh: Mesh, batch_size: int, *, train: bool = True
                 ) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the input pipeline feeds a step, as sharded shapes: uint8 images, with
    the `aug_*` fields where the train step augments on the device; training batches also say
    which dataset each example came from (unused by the step)."""
    size, shard = config.model.image_size, sharding.batch_sharding(mesh)
    on_device = train and augment.on_device(config.input.augment, sharding.platform(mesh))
    fields = {"image": ((batch_size, size, size, 3), jnp.uint8),
              "label": ((batch_size,), jnp.int32)}
    if train:
        fields["dataset_id"] = ((batch_size,), jnp.int32)
    if on_device:
        fields.update({f"aug_{name}": ((batch_size,), dtype)
                       for name, dtype in device_augment.PARAM_DTYPES.items()})
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)
            for name, (shape, dtype) in fields.items()}


def lower_steps(config: ConfigDict, program: Program, steps: Sequence[str] = ("train", "eval")
                ) -> dict[str, jax.stages.Lowered]:
    """`program`'s steps lowered (traced, not compiled) for the batches a run feeds them: the
    train step at `train.batch_size`, the eval step at the validation batch. What `cae-jax
    compile` compiles and what a saved executable is matched against."""
    mesh, state = program.abstract.mesh, program.abstract.shapes
    eval_batch = config.input.eval_batch_size or config.train.batch_size
    calls = {"train": (program.train_step, batch_shapes(config, mesh, config.train.batch_size)),
             "eval": (program.eval_step, batch_shapes(config, mesh, eval_batch, train=False))}
    return {name: calls[name][0].lower(state, calls[name][1]) for name in steps}


def make_train_step(config: ConfigDict, abstract: AbstractState) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`, jitted with donated state.

    `batch` holds "image" (uint8 [B, H, W, 3], which the model normalizes) and "label" (int
    [B]); with `input.augment.on_device` also the `aug_*` fields of the input pipeline, and the
    images are augmented here, on the device, before the model. A step whose
    loss or gradient norm is not finite leaves parameters, statistics and optimizer untouched
    (`metrics["finite"]` is 0): the trainer then stops or goes on, per `train.nan_policy`.
    """
    graphdef, mesh = abstract.graphdef, abstract.mesh
    tx = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    base_key = jax.random.key(config.seed)
    augment_config = config.input.augment
    on_device = augment.on_device(augment_config, sharding.platform(mesh))

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        dropout_key = jax.random.fold_in(base_key, state.step)
        images = batch["image"]
        if on_device:
            max_kernel = augment_config.blur_kernel[1]
            images = device_augment.augment_batch(batch, max_kernel)

        def loss_fn(params, batch_stats):
            outputs, new_stats = models.forward(
                graphdef, params, batch_stats, images, train=True, dropout_key=dropout_key,
            )
            loss, terms = losses.joint_loss(outputs, batch["label"], config.loss)
            return loss, (terms, new_stats)

        (loss, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats
        )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            batch_stats=keep(new_stats, state.batch_stats),
            opt_state=keep(opt_state, state.opt_state),
        )
        metrics = {
            **terms,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(abstract.shardings, sharding.batch_sharding(mesh)),
        out_shardings=(abstract.shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(
    config: ConfigDict, abstract: AbstractState, *, with_reconstructions: bool = False
) -> Callable:
    """`eval_step(state, batch) -> {"logit", "prob", "recon_error"}`, each [B], batch-sharded.

    `with_reconstructions` adds "reconstruction" ([B, H, W, 3] in [-1, 1]), so the trainer
    draws its reconstruction grid from the same forward pass that scores the batch.
    """

    def eval_step(state: TrainState, batch: dict[str, jax.Array]):
        model_outputs, _ = models.forward(
            abstract.graphdef, state.params, state.batch_stats, batch["image"], train=False
        )
        logits, recon = model_outputs["logit"], model_outputs["reconstruction"]
        outputs = {
            "logit": logits,
            "prob": jax.nn.sigmoid(logits),
            "recon_error": losses.reconstruction_error(recon, model_outputs["target"],
                                                       config.loss.recon),
        }
        if with_reconstructions:
            outputs["reconstruction"] = recon
        return outputs

    batch_sharding = sharding.batch_sharding(abstract.mesh)
    return jax.jit(
        eval_step,
        in_shardings=(abstract.shardings, batch_sharding),
        out_shardings=batch_sharding,
    )
