"""Checkpoint retention and selection: last K plus the best by validation AUC; restores."""

import jax
import numpy as np
import pytest

from cae_jax import checkpoints, input_pipeline, sharding, train_step
from cae_jax.config import load_config, to_json
from tests import datasets


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data = datasets.write(root / "data", {"train": (8, 8)}, num_shards=1)
    config = load_config("configs/tiny.py")
    config.input.train_dirs = (str(data),)
    config.train.keep_checkpoints = 2
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, jax.devices())
    return root, config, mesh, train_step.create_train_state(
        config, train_step.abstract_state(config, mesh))


def test_keeps_last_k_and_best_by_validation_and_restores_it(setup):
    root, config, mesh, state = setup
    workdir = root / "run"
    checkpoints.write_config(workdir, config)
    data = input_pipeline.make_train_iterator(config, mesh)
    # Step 2 has the best validation AUC; steps without validation carry no metrics.
    aucs = {1: 0.6, 2: 0.9, 3: None, 4: 0.7, 5: None, 6: None}
    with checkpoints.make_manager(workdir, config) as manager:
        for step, auc in aucs.items():
            marked = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
            checkpoints.save(manager, step, marked, data,
                             None if auc is None else {checkpoints.BEST_METRIC: auc})
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 5, 6]
        assert checkpoints.best_step(manager) == 2
    data.close()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2", "5", "6"]
    _, params, stats, step = checkpoints.restore_inference(workdir)
    assert step == 2
    for got, want in zip(jax.tree.leaves((params, stats)),
                         jax.tree.leaves((state.params, state.batch_stats)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert checkpoints.restore_inference(workdir / "checkpoints" / "6")[3] == 6
    full = checkpoints.restore_state(workdir / "checkpoints" / "5",
                                     train_step.abstract_state(config, mesh).shapes)
    assert int(full.step) == 5


def test_nan_validation_auc_is_never_selected(setup, caplog):
    root, config, mesh, state = setup
    workdir = root / "nan_auc"
    checkpoints.write_config(workdir, config)
    config = config.copy_and_resolve_references()
    config.train.keep_checkpoints = 3
    data = input_pipeline.make_train_iterator(config, mesh)
    # As saved by a run from before NaN AUCs were left out: NaN at the earliest step.
    with checkpoints.make_manager(workdir, config) as manager:
        for step, auc in ((1, float("nan")), (2, 0.6), (3, 0.7)):
            checkpoints.save(manager, step, state, data, {checkpoints.BEST_METRIC: auc})
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2, 3]
        with caplog.at_level("WARNING"):
            assert checkpoints.validation_scores(manager) == {2: 0.6, 3: 0.7}
        warned = [r.getMessage() for r in caplog.records if "validation AUC" in r.getMessage()]
        assert warned == [f"{manager.directory}: steps [1] have no finite validation AUC; "
                          "not selected by it."]
        assert checkpoints.best_step(manager) == 3
    data.close()
    assert checkpoints.restore_inference(workdir)[3] == 3


def test_without_validation_the_latest_is_selected(setup):
    root, config, mesh, state = setup
    workdir = root / "noval"
    checkpoints.write_config(workdir, config)
    data = input_pipeline.make_train_iterator(config, mesh)
    with checkpoints.make_manager(workdir, config) as manager:
        for step in (1, 2, 3):
            checkpoints.save(manager, step, state, data)
        manager.wait_until_finished()
    data.close()
    assert checkpoints.restore_inference(workdir)[3] == 3


def test_unfinished_step_directory_is_ignored_and_bad_paths_are_named(setup):
    root, config, _, _ = setup
    workdir = root / "empty"
    checkpoints.write_config(workdir, config)
    # What a save killed mid-write leaves: a temporary directory, never a step.
    (workdir / "checkpoints" / "7.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoints.restore_inference(workdir)
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        checkpoints.restore_inference(root)


@pytest.mark.parametrize(
    "given, expected",
    [("gs://bucket/runs/a", "gs://bucket/runs/a"), ("/abs/run", "/abs/run"), ("rel", "CWD/rel")],
)
def test_workdir_paths_keep_uris_and_make_local_ones_absolute(given, expected, monkeypatch,
                                                              tmp_path):
    monkeypatch.chdir(tmp_path)
    path = checkpoints.as_path(given) / checkpoints.CHECKPOINT_DIR / "7"
    assert str(path) == expected.replace("CWD", str(tmp_path)) + "/checkpoints/7"


def test_a_workdir_config_is_validated_when_read_back(setup, tmp_path):
    import json

    _, config, _, _ = setup
    checkpoints.write_config(tmp_path, config)
    assert to_json(checkpoints.read_config(tmp_path)) == to_json(config)  # Tuples as lists.
    path = tmp_path / checkpoints.CONFIG_FILE
    edited = json.loads(path.read_text())
    edited["model"]["image_size"] = -3
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"config\.json: .*model\.image_size=-3"):
        checkpoints.read_config(tmp_path)
    edited["model"] = 3
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"config\.json: not a config written by cae-jax train "
                       r"\(model is not a group of fields\)"):
        checkpoints.read_config(tmp_path)
    path.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(ValueError, match=r"config\.json: not a config written by cae-jax train "
                       r"\(it has none of cae-jax's config fields\)"):
        checkpoints.read_config(tmp_path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a config written by cae-jax"):
        checkpoints.read_config(tmp_path)



def test_a_workdir_config_from_before_a_field_existed_reads_with_its_default(setup, tmp_path):
    import json

    _, config, _, _ = setup
    checkpoints.write_config(tmp_path, config)
    path = tmp_path / checkpoints.CONFIG_FILE
    saved = json.loads(path.read_text())
    del saved["model"]["bn_group"], saved["mesh"]["slices"]  # Fields added later.
    path.write_text(json.dumps(saved))
    read = checkpoints.read_config(tmp_path)
    assert (read.model.bn_group, read.mesh.slices) == (0, 1)
    checkpoints.check_resumable(tmp_path, config)  # Resumes: the defaults are what it ran.
