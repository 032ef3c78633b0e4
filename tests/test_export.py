"""Export bundle: the TF SavedModel and jax.export artifacts compute what the JAX model does."""

from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cae_jax import config as config_lib
from cae_jax import export, flat_state, models, pixels, serving, sharding, train_step
from cae_jax.ops import cpu_serving

SIZE = 64


def tiny_config():
    return config_lib.load_config("configs/tiny.py")


def initial_state(config) -> train_step.TrainState:
    """A fresh train state sharded over a (data 4, fsdp 2) mesh, as the trainer makes it."""
    mesh = sharding.make_mesh(4, 2, jax.devices())
    return train_step.create_train_state(config, train_step.abstract_state(config, mesh))


def calibrated_model(config, state):
    """The state's model with random BatchNorm statistics and logits spread over (-2, 2).

    Fresh statistics (mean 0, variance 1) would let a bundle that dropped them pass; random
    init gives logits in the hundreds (probability exactly 0 or 1), which would hide any
    mismatch, so the output layer is rescaled.
    """
    graphdef, _, _ = models.abstract_model(config.model)
    batch_stats = random_batch_stats(state.batch_stats)
    params = jax.device_get(state.params)
    logits = model_outputs(graphdef, params, batch_stats, face_batch(8, seed=1))["logits"]
    out = params["classifier"]["out"]
    scale = 1.0 / float(jnp.std(logits))
    out["kernel"].set_value(out["kernel"].get_value() * scale)
    out["bias"].set_value(out["bias"].get_value() * scale - float(jnp.mean(logits)) * scale)
    return graphdef, params, batch_stats


def random_batch_stats(batch_stats):
    """A copy with running means ~ N(0, 0.5) and variances in (0.25, 4), seeded."""
    stats = jax.device_get(batch_stats)
    rng = np.random.default_rng(7)
    for path, leaf in nnx.to_flat_state(stats):
        shape = leaf.get_value().shape
        value = rng.normal(0, 0.5, shape) if path[-1] == "mean" else rng.uniform(0.25, 4, shape)
        leaf.set_value(value.astype(np.float32))
    return stats


def face_batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@functools.partial(jax.jit, static_argnums=0)
def model_outputs(graphdef, params, batch_stats, images) -> dict[str, jax.Array]:
    """The JAX model itself: uint8 -> CAE(train=False) -> sigmoid, the error map against the
    images in [-1, 1] (one program: run op by op, each new batch size took seconds of
    compiling single ops)."""
    outputs, _ = models.forward(graphdef, params, batch_stats, images, train=False)
    logits, recon = outputs["logit"], outputs["reconstruction"]
    return {"logits": logits, "probability": jax.nn.sigmoid(logits), "reconstruction": recon,
            "error_map": jnp.mean(jnp.abs(recon - pixels.normalize(images)), axis=-1)}


def reference(graphdef, params, batch_stats, images: np.ndarray) -> dict[str, np.ndarray]:
    outputs = model_outputs(graphdef, params, batch_stats, images)
    return {k: np.asarray(outputs[k]) for k in ("probability", "reconstruction", "error_map")}


@pytest.fixture(scope="module")
def state():
    return initial_state(tiny_config())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, state):
    config = tiny_config()
    graphdef, params, batch_stats = calibrated_model(config, state)
    out = export.export_bundle(config, params, batch_stats,
                               tmp_path_factory.mktemp("export") / "bundle", step=7,
                               platforms=("cpu", "tpu"))
    return config, graphdef, params, batch_stats, out


@pytest.fixture(scope="module")
def images_and_reference(trained):
    _, graphdef, params, batch_stats, _ = trained
    images = face_batch(5, seed=0)
    ref = reference(graphdef, params, batch_stats, images)
    spread = ref["probability"]
    assert spread.min() > 0.01 and spread.max() < 0.99 and spread.std() > 0.05, spread
    return images, ref


def assert_outputs_close(got: dict, ref: dict, keys) -> None:
    for key in keys:
        np.testing.assert_allclose(np.asarray(got[key]), ref[key], atol=1e-4, rtol=0,
                                   err_msg=key)


def test_saved_model_matches_jax(trained, images_and_reference):
    import tensorflow as tf

    images, ref = images_and_reference
    loaded = tf.saved_model.load(str(trained[-1] / export.SAVED_MODEL_DIR))
    classify = loaded.signatures["serving_default"]
    assert set(classify.structured_outputs) == {"probability"}
    assert_outputs_close(classify(images=tf.constant(images)), ref, ["probability"])
    one = classify(images=tf.constant(images[2:3]))["probability"].numpy()  # Another batch size.
    np.testing.assert_allclose(one, ref["probability"][2:3], atol=1e-4, rtol=0)
    full = loaded.signatures["reconstruct"](images=tf.constant(images))
    assert_outputs_close(full, ref, ["probability", "reconstruction", "error_map"])


def test_jax_export_matches_jax(trained, images_and_reference):
    images, ref = images_and_reference
    bundle = trained[-1]
    classify = jax.export.deserialize((bundle / "classify.jax").read_bytes())
    assert classify.platforms == ("cpu", "tpu")  # Runs here (CPU), and on TPU unchanged.
    assert_outputs_close(classify.call(images), ref, ["probability"])
    two = classify.call(images[:2])["probability"]
    np.testing.assert_allclose(np.asarray(two), ref["probability"][:2], atol=1e-4, rtol=0)
    full = jax.export.deserialize((bundle / "reconstruct.jax").read_bytes()).call(images)
    assert_outputs_close(full, ref, ["probability", "reconstruction", "error_map"])


def test_load_bundle_predictor_matches_jax(trained, images_and_reference):
    images, ref = images_and_reference
    predictor = serving.load_bundle(trained[-1], batch_size=2)  # 5 images: 3 padded batches.
    np.testing.assert_allclose(predictor.predict_proba(images), ref["probability"],
                               atol=1e-5, rtol=0)
    assert_outputs_close(predictor.reconstruct(images), ref,
                         ["probability", "reconstruction", "error_map"])
    assert predictor.predict_proba(np.zeros((0, SIZE, SIZE, 3), np.uint8)).shape == (0,)


def test_bundle_keeps_the_batch_norm_statistics(trained, images_and_reference, state):
    _, graphdef, params, batch_stats, bundle = trained
    images, ref = images_and_reference
    fresh = reference(graphdef, params, state.batch_stats, images)["probability"]
    assert np.abs(fresh - ref["probability"]).max() > 0.05  # The statistics matter here.
    loaded = flat_state.flatten(serving.load_bundle(bundle).batch_stats)
    assert loaded.keys() == flat_state.flatten(batch_stats).keys()
    for key, value in flat_state.flatten(batch_stats).items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_arrays_of_another_model_are_named_not_restored(trained):
    _, _, params, _, _ = trained
    arrays = flat_state.flatten(params)
    missing = sorted(arrays)[0]
    del arrays[missing]
    with pytest.raises(ValueError, match=f"no array for '{re.escape(missing)}'"):
        flat_state.unflatten(params, arrays)


def test_model_json_describes_model_without_training_state(trained):
    config, _, params, batch_stats, bundle = trained
    meta = json.loads((bundle / serving.MODEL_JSON).read_text())
    assert meta["model"] == json.loads(json.dumps(config.model.to_dict()))
    assert (meta["dtype"], meta["image_size"], meta["step"]) == ("float32", SIZE, 7)
    assert meta["formats"] == list(export.FORMATS) and meta["platforms"] == ["cpu", "tpu"]
    predictor = serving.load_bundle(bundle)
    loaded_params, loaded_stats = predictor.params, predictor.batch_stats
    assert flat_state.flatten(loaded_params).keys() == flat_state.flatten(params).keys()
    for key, value in flat_state.flatten(loaded_params).items():
        np.testing.assert_array_equal(value, flat_state.flatten(params)[key], err_msg=key)
    assert flat_state.flatten(loaded_stats).keys() == flat_state.flatten(batch_stats).keys()


def test_wrong_dtype_or_shape_is_rejected(trained):
    import tensorflow as tf

    bundle = trained[-1]
    predictor = serving.load_bundle(bundle)
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 64, 64, 3\].*got dtype float32"):
        predictor.predict_proba(np.zeros((2, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError, match=r"got shape \[2, 32, 32, 3\]"):
        predictor.predict_proba(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \[64, 64, 3\]"):
        predictor.reconstruct(np.zeros((SIZE, SIZE, 3), np.uint8))
    signature = tf.saved_model.load(str(bundle / export.SAVED_MODEL_DIR)).signatures[
        "serving_default"]
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        signature(images=tf.zeros((1, SIZE, SIZE, 3), tf.float32))
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        signature(images=tf.zeros((1, 32, 32, 3), tf.uint8))


def test_export_refuses_to_overwrite_and_load_names_missing_bundle(trained, tmp_path):
    config, _, params, batch_stats, bundle = trained
    with pytest.raises(FileExistsError, match="exists"):
        export.export_bundle(config, params, batch_stats, bundle)
    with pytest.raises(FileNotFoundError, match="model.json"):
        serving.load_bundle(tmp_path)
    with pytest.raises(ValueError, match="unknown export formats"):
        export.export_bundle(config, params, batch_stats, tmp_path / "b", formats=("onnx",))
    with pytest.raises(ValueError, match="unknown platforms"):
        export.export_bundle(config, params, batch_stats, tmp_path / "b", platforms=("gpu",))
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.tmp").exists()


def test_bfloat16_bundle_stores_bf16_and_stays_close(trained, images_and_reference, tmp_path):
    config, _, params, batch_stats, _ = trained
    images, ref = images_and_reference
    mc, bf16_params = export.cast_for_export(config.model, params, "bfloat16")
    assert mc.dtype == "bfloat16" and config.model.dtype == "float32"
    assert {v.dtype for v in flat_state.flatten(bf16_params).values()} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="float16"):
        export.cast_for_export(config.model, params, "float16")
    bundle = export.export_bundle(config, params, batch_stats, tmp_path / "bf16",
                                  dtype="bfloat16", formats=())
    predictor = serving.load_bundle(bundle)
    loaded = predictor.params
    assert {v.dtype for v in flat_state.flatten(loaded).values()} == {jnp.dtype(jnp.bfloat16)}
    assert json.loads((bundle / serving.MODEL_JSON).read_text())["model"]["dtype"] == "bfloat16"
    prob = predictor.predict_proba(images)
    assert not np.allclose(prob, ref["probability"], atol=1e-6, rtol=0)  # bf16 really ran.
    np.testing.assert_allclose(prob, ref["probability"], atol=0.05, rtol=0)


def write_two_checkpoints(workdir, state) -> None:
    """Steps 10 (val_auc 0.9, the best) and 20 (0.6, params + 1) of a tiny training run."""
    import orbax.checkpoint as ocp

    from cae_jax import checkpoints

    config = tiny_config()
    shifted = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
    checkpoints.write_config(workdir, config)
    manager = checkpoints.make_manager(workdir, config)
    for step, saved, auc in ((10, state, 0.9), (20, shifted, 0.6)):
        manager.save(step, args=ocp.args.Composite(
            **{checkpoints.STATE_ITEM: ocp.args.StandardSave(saved)}), metrics={"val_auc": auc})
    manager.wait_until_finished()
    manager.close()


def test_cli_exports_best_checkpoint_of_a_workdir(state, tmp_path, capsys):
    from cae_jax import main as cli

    workdir = tmp_path / "run"
    write_two_checkpoints(workdir, state)
    out = tmp_path / "bundle"
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out), "--formats="]) == 0
    assert "step 10" in capsys.readouterr().out
    meta = json.loads((out / serving.MODEL_JSON).read_text())
    assert meta["step"] == 10 and meta["source"] == str(workdir)
    assert sorted(p.name for p in out.iterdir()) == [serving.MODEL_JSON, serving.PARAMS_DIR]
    loaded = serving.load_bundle(out).params
    expected = flat_state.flatten(jax.device_get(state.params))
    for key, value in flat_state.flatten(loaded).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)

    with pytest.raises(SystemExit, match="nowhere: neither a training workdir"):
        cli.main(["export", "--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])


def test_demo_replaces_a_bundle_of_another_step(state, tmp_path):
    from cae_jax import demo

    write_two_checkpoints(tmp_path / "train", state)
    bundle = demo.ensure_bundle(tmp_path, 10)
    meta_file = bundle / serving.MODEL_JSON
    assert json.loads(meta_file.read_text())["step"] == 10
    kept = meta_file.stat().st_mtime_ns
    assert demo.ensure_bundle(tmp_path, 10) == bundle
    assert meta_file.stat().st_mtime_ns == kept  # the same step: kept as is
    meta = json.loads(meta_file.read_text())
    meta["step"] = 4  # as left by an earlier, shorter run
    meta_file.write_text(json.dumps(meta))
    demo.ensure_bundle(tmp_path, 10)
    assert json.loads(meta_file.read_text())["step"] == 10


def test_cpu_serving_runs_without_ynnpack_and_computes_the_same():
    config = tiny_config()
    graphdef, params, batch_stats = calibrated_model(config, initial_state(config))
    weights, images = (params, batch_stats), jnp.asarray(face_batch(4, seed=3))
    classify = serving.serving_fns(graphdef)["classify"]
    tuned, default = serving.jit_serving(classify), jax.jit(classify)
    assert "__ynn_fusion" not in tuned.lower(weights, images).compile().as_text()
    assert "__ynn_fusion" in default.lower(weights, images).compile().as_text()
    np.testing.assert_allclose(tuned(weights, images)["probability"],
                               reference(graphdef, params, batch_stats, images)["probability"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("count", [16, 13])
def test_cpu_serving_runs_in_chunks_with_the_same_outputs(count, monkeypatch):
    """A batch of 16 (two chunks of 8) or 13 (the last chunk padded): one loop over chunks in
    the program, the same probabilities and reconstructions as the whole batch at once."""
    monkeypatch.setattr(cpu_serving, "CHUNK", 8)
    config = tiny_config()
    graphdef, params, batch_stats = calibrated_model(config, initial_state(config))
    weights, images = (params, batch_stats), jnp.asarray(face_batch(count, seed=4))
    reconstruct = serving.serving_fns(graphdef)["reconstruct"]
    chunked = serving.jit_serving(reconstruct)
    assert "while" in chunked.lower(weights, images).as_text()
    got, want = chunked(weights, images), reference(graphdef, params, batch_stats, images)
    for key in ("probability", "reconstruction", "error_map"):
        assert got[key].shape == want[key].shape
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_model_json_lists_the_checks_export_ran(trained):
    checks = json.loads((trained[-1] / serving.MODEL_JSON).read_text())["checks"]
    assert checks[0].startswith("saved_model: serving_default and reconstruct run in TensorFlow")
    assert [c.split(":")[0] for c in checks[1:]] == ["classify.jax", "reconstruct.jax"]


def truncate(path) -> None:
    """A write cut short: the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["corrupt_jax_export", "saved_model_of_other_weights"])
def test_export_refuses_an_artifact_that_does_not_run_as_the_model(trained, tmp_path,
                                                                   monkeypatch, damage):
    """Damage one artifact between its write and the check: no bundle, the artifact named."""
    config, _, params, batch_stats, _ = trained
    if damage == "corrupt_jax_export":
        write = export._write_jax_exports

        def damaged(fns, weights, size, platforms, out):
            write(fns, weights, size, platforms, out)
            truncate(out / "reconstruct.jax")

        monkeypatch.setattr(export, "_write_jax_exports", damaged)
        formats, named = ("jax_export",), "reconstruct.jax"
    else:
        write = export._write_saved_model

        def damaged(fns, weights, size, platforms, out):
            other = jax.tree.map(lambda w: w * 0.5, weights)  # Another model's arrays.
            write(fns, other, size, platforms, out)

        monkeypatch.setattr(export, "_write_saved_model", damaged)
        formats, named = ("saved_model",), "saved_model (serving_default): output 'probability'"
    with pytest.raises(export.export_check.ArtifactError, match=re.escape(named)):
        export.export_bundle(config, params, batch_stats, tmp_path / "b", formats=formats,
                             platforms=("cpu",))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # Neither b nor b.tmp.
