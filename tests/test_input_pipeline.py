"""The grain input pipeline: order, resume, hosts, mixing, corruption, device arrays."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from cae_jax import config as config_lib
from cae_jax import eval_pipeline, example_proto, input_pipeline, prepared_data, sharding, tfrecord
from cae_jax.bench.tf_data_reference import tf_data_reference
from data_prep import preview, records, writer
from tests import datasets

SIZE = 32  # Stored crops and model input: small enough for thousands of samples a second.


def make_config(*dirs, batch=16, **input_fields):
    c = config_lib.default_config()
    c.model.image_size = SIZE
    c.train.batch_size = batch
    c.input.train_dirs = tuple(str(d) for d in dirs)
    c.input.threads = 4
    for key, value in input_fields.items():
        node, *rest = key.split("__")
        if rest:
            c.input[node][rest[0]] = value
        else:
            c.input[node] = value
    return c


def no_augment(c):
    for key in ("resize_prob", "flip_prob", "blur_prob", "brightness_contrast_prob", "jpeg_prob"):
        c.input.augment[key] = 0.0
    return c


@pytest.fixture(scope="module")
def ffpp_like(tmp_path_factory):
    """1 real : 4 fake like FF++, three shards per split."""
    out = tmp_path_factory.mktemp("ffpp_like")
    return datasets.write(out, {"train": (40, 160), "validation": (9, 14)}, size=SIZE)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    out = tmp_path_factory.mktemp("other")
    return datasets.write(out, {"train": (30, 30)}, name="other", size=SIZE)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------------- reader


def test_index_and_crc_agree_with_tensorflow(ffpp_like):
    files = [path for path, _ in prepared_data.split_shards(ffpp_like, "train")]
    source = tfrecord.IndexedTFRecords(files)
    expected = [r.numpy() for f in files for r in tf.data.TFRecordDataset(f)]
    assert len(source) == len(expected) == 200
    assert [source[i]["data"] for i in range(len(source))] == expected


def test_parse_matches_record_schema(ffpp_like):
    (path, count), *_ = prepared_data.split_shards(ffpp_like, "validation")
    source = tfrecord.IndexedTFRecords([path], num_records=[count])
    raw = source[5]
    parsed = prepared_data.ParseRecord(skip_corrupt=False).map(raw)
    reference = records.features().deserialize_example_np(raw["data"])
    np.testing.assert_array_equal(prepared_data.decode_image(parsed), reference["image"])
    assert parsed["label"] == reference["label"]
    assert parsed["frame_index"] == reference["frame_index"]
    for name in prepared_data.METADATA_FIELDS:
        assert parsed[name] == reference[name].decode()


# ----------------------------------------------------------------------------- train


def test_train_batches_are_deterministic_for_a_seed(ffpp_like):
    c = make_config(ffpp_like)
    first = take(iter(input_pipeline.train_dataset(c)), 3)
    again = take(iter(input_pipeline.train_dataset(c)), 3)
    assert_same_batches(first, again)
    assert first[0]["image"].shape == (16, SIZE, SIZE, 3) and first[0]["image"].dtype == np.uint8
    assert first[0]["label"].dtype == np.int32
    c.seed = 1
    other_seed = take(iter(input_pipeline.train_dataset(c)), 1)
    assert not np.array_equal(first[0]["image"], other_seed[0]["image"])


def test_resume_mid_epoch_gives_the_uninterrupted_batches(ffpp_like, other):
    # Everything stateful at once: two datasets mixed, class balance, SBI, augmentation.
    c = make_config(ffpp_like, other, weights=(2.0, 1.0), class_balance=True, sbi__prob=0.5)
    uninterrupted = iter(input_pipeline.train_dataset(c))
    take(uninterrupted, 5)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # As stored in a checkpoint.
    # 13 batches in all: ~69 reals of the 40-real dataset, ~35 of the 30-real one, so both
    # real streams start a new, reshuffled epoch after the resume point.
    expected = take(uninterrupted, 8)
    resumed = iter(input_pipeline.train_dataset(c))
    resumed.set_state(state)
    assert_same_batches(take(resumed, 8), expected)


def test_worker_processes_give_the_in_process_batches(ffpp_like):
    c = make_config(ffpp_like, class_balance=True)
    expected = take(iter(input_pipeline.train_dataset(c)), 3)
    c.input.workers = 1
    it = iter(input_pipeline.train_dataset(c))
    try:
        assert_same_batches(take(it, 3), expected)
    finally:
        it.close()


def test_each_host_reads_its_own_shards_once_per_epoch(tmp_path):
    d = datasets.write(tmp_path, {"train": (24, 24)}, num_shards=4, size=SIZE)
    crops = {datasets.face_crop(i, SIZE).tobytes(): i for i in range(48)}
    shard_records = [
        {crops[prepared_data.decode_image(r).tobytes()] for r in _parsed(f)}
        for f, _ in prepared_data.split_shards(d, "train")
    ]
    c = no_augment(make_config(d, batch=16))
    seen = []
    for host in range(2):
        batches = take(
            iter(input_pipeline.train_dataset(c, process_index=host, process_count=2)), 3
        )
        epoch = np.concatenate([b["image"] for b in batches])[:24]
        indices = [crops[image.tobytes()] for image in epoch]
        assert len(set(indices)) == 24  # A full epoch of the host's records, each once.
        assert set(indices) == shard_records[host] | shard_records[host + 2]
        seen += indices
    assert sorted(seen) == list(range(48))


def test_epoch_shuffle_permutes_each_epoch_afresh_and_survives_pickling():
    import pickle

    def epochs(ds, n=3):
        return np.array([ds[i] for i in range(n * 50)]).reshape(n, 50)

    shuffled = input_pipeline.EpochShuffle(grain.MapDataset.range(50), seed=7)
    orders = epochs(shuffled)
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(50))  # Each record once.
    assert len({tuple(o) for o in orders}) == 3  # A new order every epoch.
    np.testing.assert_array_equal(epochs(pickle.loads(pickle.dumps(shuffled))), orders)
    np.testing.assert_array_equal(
        epochs(input_pipeline.EpochShuffle(grain.MapDataset.range(50), seed=7)), orders)
    other = epochs(input_pipeline.EpochShuffle(grain.MapDataset.range(50), seed=8))
    assert not np.array_equal(other, orders)
    # Random access in any order, as reader threads ask: the same records.
    late_first = [shuffled[i] for i in (149, 0, 75)]
    assert late_first == [orders[2, 49], orders[0, 0], orders[1, 25]]


def _parsed(path):
    source = tfrecord.IndexedTFRecords([path])
    parse = prepared_data.ParseRecord(skip_corrupt=False)
    return [parse.map(source[i]) for i in range(len(source))]


def test_too_few_shards_for_the_hosts_is_an_error(ffpp_like):
    with pytest.raises(ValueError, match="3 shards .* cannot feed 4 hosts"):
        input_pipeline.train_dataset(make_config(ffpp_like), process_index=3, process_count=4)


def test_mixing_weights_hold_over_thousands_of_samples(ffpp_like, other):
    c = no_augment(make_config(ffpp_like, other, batch=64, weights=(3.0, 1.0)))
    ids = np.concatenate([b["dataset_id"] for b in take(iter(input_pipeline.train_dataset(c)), 40)])
    assert len(ids) == 2560
    assert abs(np.mean(ids == 0) - 0.75) < 0.02


def test_default_weights_follow_dataset_sizes(ffpp_like, other):
    c = no_augment(make_config(ffpp_like, other, batch=64))
    ids = np.concatenate([b["dataset_id"] for b in take(iter(input_pipeline.train_dataset(c)), 40)])
    assert abs(np.mean(ids == 0) - 200 / 260) < 0.02


def test_class_balance_draws_real_and_fake_one_to_one(ffpp_like):
    c = no_augment(make_config(ffpp_like, batch=64))
    labels = np.concatenate([b["label"] for b in take(iter(input_pipeline.train_dataset(c)), 32)])
    assert abs(labels.mean() - 0.8) < 0.03  # FF++-like 1 real : 4 fake as stored.
    c.input.class_balance = True
    labels = np.concatenate([b["label"] for b in take(iter(input_pipeline.train_dataset(c)), 32)])
    assert len(labels) == 2048 and abs(labels.mean() - 0.5) < 0.02


def test_sbi_turns_the_configured_share_of_reals_into_fakes(tmp_path):
    d = datasets.write(tmp_path, {"train": (50, 0)}, size=SIZE)
    c = no_augment(make_config(d, batch=64, sbi__prob=0.3))
    batches = take(iter(input_pipeline.train_dataset(c)), 16)
    labels = np.concatenate([b["label"] for b in batches])
    assert abs(labels.mean() - 0.3) < 0.04
    crops = {datasets.face_crop(i, SIZE).tobytes() for i in range(50)}
    images = np.concatenate([b["image"] for b in batches])
    untouched = np.array([image.tobytes() in crops for image in images])
    np.testing.assert_array_equal(untouched, labels == 0)  # Reals unchanged, SBI fakes not.


def test_class_balance_needs_both_classes(tmp_path):
    d = datasets.write(tmp_path, {"train": (10, 0)}, size=SIZE)
    with pytest.raises(ValueError, match="both classes.*10 real and 0 fake"):
        input_pipeline.train_dataset(make_config(d, class_balance=True))


def test_weights_must_match_the_dirs(ffpp_like, other):
    with pytest.raises(ValueError, match="one positive weight per train dir"):
        input_pipeline.train_dataset(make_config(ffpp_like, other, weights=(1.0,)))


def test_train_iterator_yields_sharded_uint8_global_arrays(ffpp_like):
    c = make_config(ffpp_like)
    host = take(iter(input_pipeline.train_dataset(c)), 2)
    mesh = sharding.make_mesh(data=4, fsdp=2)
    it = input_pipeline.make_train_iterator(c, mesh)
    first = next(it)
    state = it.get_state()
    second = next(it)
    assert first["image"].shape == (16, SIZE, SIZE, 3) and first["image"].dtype == np.uint8
    assert first["image"].sharding == sharding.batch_sharding(mesh)
    assert len(first["image"].addressable_shards) == 8
    for got, want in zip((first, second), host, strict=True):
        np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])
        np.testing.assert_array_equal(np.asarray(got["label"]), want["label"])
    it.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(it)["image"]), np.asarray(second["image"]))


def test_iterator_state_round_trips_through_an_orbax_checkpoint(ffpp_like, tmp_path):
    c = make_config(ffpp_like, class_balance=True)
    mesh = sharding.make_mesh()
    it = input_pipeline.make_train_iterator(c, mesh)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = [np.asarray(b["image"]) for b in take(it, 2)]
        resumed = input_pipeline.make_train_iterator(c, mesh)
        manager.restore(
            3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed))
        )
    for want in expected:
        np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), want)


def test_batch_not_divisible_by_the_devices_is_an_error(ffpp_like):
    with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices"):
        input_pipeline.make_train_iterator(make_config(ffpp_like, batch=12), sharding.make_mesh())


def test_sample_grid_frames_each_image_by_its_label():
    images = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (10, 20, 30)])
    grid = preview.sample_grid(images, np.array([0, 1, 1]), columns=2)
    assert grid.shape == (2 * 34, 2 * 34, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[1:33, 1:33], images[0])
    np.testing.assert_array_equal(grid[35:67, 1:33], images[2])
    np.testing.assert_array_equal(grid[0, 0], preview.FRAME_COLOURS[0])
    np.testing.assert_array_equal(grid[0, 34], preview.FRAME_COLOURS[1])
    np.testing.assert_array_equal(grid[40, 40], [255, 255, 255])  # Empty cell.


def test_tf_data_reference_does_the_same_work(ffpp_like, other):
    c = make_config(ffpp_like, other, batch=64, weights=(1.0, 1.0), class_balance=True)
    batches = list(tf_data_reference(c).take(8).as_numpy_iterator())
    assert batches[0]["image"].shape == (64, SIZE, SIZE, 3)
    assert batches[0]["image"].dtype == np.uint8
    labels = np.concatenate([b["label"] for b in batches])
    assert abs(labels.mean() - 0.5) < 0.07  # Balanced, like the grain pipeline.


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_eval_reads_every_record_exactly_once_across_hosts(ffpp_like, hosts):
    c = make_config(ffpp_like, batch=12, eval_batch_size=6 * hosts)
    seen, counts = [], []
    for host in range(hosts):
        batches = list(eval_pipeline.eval_batches(c, process_index=host, process_count=hosts))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (6, SIZE, SIZE, 3)
            assert not b["image"][~b["mask"]].any() and set(b["video_id"][~b["mask"]]) <= {""}
            for i in np.flatnonzero(b["mask"]):
                np.testing.assert_array_equal(
                    b["image"][i], datasets.face_crop(b["frame_index"][i], SIZE)
                )
                seen.append((b["video_id"][i], b["frame_index"][i], b["label"][i]))
    assert len(set(counts)) == 1  # The same number of batches on every host.
    frames = sorted(f for _, f, _ in seen)
    assert frames == list(range(200, 223))  # The 23 validation records, each exactly once.
    assert sum(label for _, _, label in seen) == 14


def test_eval_resizes_to_the_model_input(ffpp_like):
    c = make_config(ffpp_like, batch=8)
    c.model.image_size = 20
    batch = next(eval_pipeline.eval_batches(c))
    assert batch["image"].shape == (8, 20, 20, 3)


def test_make_eval_iterator_pads_with_mask(ffpp_like):
    c = make_config(ffpp_like, batch=16)
    batches = list(eval_pipeline.make_eval_iterator(c, sharding.make_mesh()))
    assert len(batches) == 2
    mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
    np.testing.assert_array_equal(mask, np.arange(32) < 23)
    np.testing.assert_array_equal(batches[1]["meta"]["mask"], np.arange(16) < 7)
    assert batches[0]["image"].dtype == np.uint8  # The model normalizes.


# ----------------------------------------------------------------------------- bad data


def _record_offsets(path):
    return [int(o) for o in tfrecord.index_file(path)]


def test_truncated_shard_names_file_and_offset(tmp_path, caplog):
    d = datasets.write(tmp_path, {"train": (6, 6)}, size=SIZE)
    shard, _ = prepared_data.split_shards(d, "train")[1]
    last = _record_offsets(shard)[-1]
    with open(shard, "r+b") as f:
        f.truncate(last + 20)
    with pytest.raises(tfrecord.CorruptRecordError, match=f"{shard}.*byte offset {last}.*past"):
        input_pipeline.train_dataset(make_config(d))
    before = _skips_logged(caplog)
    c = make_config(d, batch=4, skip_corrupt=True)
    frames = [f for b in eval_pipeline.eval_batches(c, split="train") for f in b["frame_index"]]
    assert len([f for f in frames if f >= 0]) == 11  # Everything but the cut record.
    assert _skips_logged(caplog) == before + 1


def test_corrupt_record_bytes_name_file_and_offset(tmp_path, caplog):
    d = datasets.write(tmp_path, {"train": (6, 6)}, size=SIZE)
    shard, _ = prepared_data.split_shards(d, "train")[2]
    offset = _record_offsets(shard)[1]
    with open(shard, "r+b") as f:
        f.seek(offset + 100)
        byte = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    c = make_config(d, batch=12)
    with pytest.raises(tfrecord.CorruptRecordError, match=f"{shard}.*byte offset {offset}.*data"):
        next(iter(input_pipeline.train_dataset(c)))
    c.input.skip_corrupt = True
    before = _skips_logged(caplog)
    frames = [f for b in eval_pipeline.eval_batches(c, split="train") for f in b["frame_index"]]
    assert len([f for f in frames if f >= 0]) == 11
    assert _skips_logged(caplog) == before + 1


def test_undecodable_image_is_an_error_never_zeros(tmp_path):
    good, other = datasets.examples("bad", "train", 2, 0, SIZE)
    png = cv2.imencode(".png", other["image"])[1].tobytes()
    broken = {**other, "image": png[:20] + b"\x00" * 30 + png[50:]}  # Wrecked PNG header.
    writer.write_dataset(tmp_path, "bad", {"train": [good, broken]})
    shard, _ = prepared_data.split_shards(tmp_path, "train")[0]
    offset = _record_offsets(shard)[1]
    c = make_config(tmp_path, batch=2, eval_split="train")
    with pytest.raises(tfrecord.CorruptRecordError, match=f"{shard}.*byte offset {offset}.*PNG"):
        list(eval_pipeline.eval_batches(c))
    c.input.skip_corrupt = True
    (batch,) = eval_pipeline.eval_batches(c)
    np.testing.assert_array_equal(batch["mask"], [True, False])
    assert batch["frame_index"].tolist() == [0, -1]


def test_shard_cut_at_a_record_boundary_is_caught_by_the_metadata(tmp_path):
    d = datasets.write(tmp_path, {"train": (6, 6)}, size=SIZE)
    shard, count = prepared_data.split_shards(d, "train")[0]
    last = _record_offsets(shard)[-1]
    with open(shard, "r+b") as f:
        f.truncate(last)  # Every remaining frame is whole: only the count can tell.
    with pytest.raises(tfrecord.CorruptRecordError, match=f"{shard}.*{count - 1} records.*{count}"):
        input_pipeline.train_dataset(make_config(d))


def test_missing_shard_or_metadata_is_named(tmp_path):
    d = datasets.write(tmp_path, {"train": (6, 6)}, size=SIZE)
    shard, _ = prepared_data.split_shards(d, "train")[2]
    Path(shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard}: shard listed in .* is missing"):
        input_pipeline.train_dataset(make_config(d))
    with pytest.raises(ValueError, match="no split 'test'"):
        prepared_data.split_shards(d, "test")
    with pytest.raises(FileNotFoundError, match="dataset_info.json not found"):
        prepared_data.split_shards(tmp_path / "elsewhere", "train")


def test_shard_that_shrinks_after_indexing_is_a_corrupt_record(tmp_path, caplog):
    d = datasets.write(tmp_path, {"train": (6, 6)}, size=SIZE)
    shard, count = prepared_data.split_shards(d, "train")[0]
    last, whole = _record_offsets(shard)[-1], Path(shard).read_bytes()
    for cut, problem in ((last + 40, "inside a record of"), (last + 5, "inside the record header")):
        Path(shard).write_bytes(whole)
        source = tfrecord.IndexedTFRecords([shard], num_records=[count])
        Path(shard).write_bytes(whole[:cut])
        with pytest.raises(tfrecord.CorruptRecordError, match=f"{shard}.*offset {last}.*{problem}"):
            source[count - 1]
        assert source[0]["offset"] == 0  # Records before the cut still read.
        source.skip_corrupt = True
        before = _skips_logged(caplog)
        assert source[count - 1] is None
        assert _skips_logged(caplog) == before + 1


def _skips_logged(caplog) -> int:
    """Corrupt records skipped so far in this test, each logged once by `skip_or_raise`."""
    return sum("skipped corrupt record" in r.getMessage() for r in caplog.records)


def test_frames_and_examples_are_tensorflows(tmp_path):
    """`tfrecord.frame` writes TFRecordWriter's bytes; `example_proto.Example` reads and
    writes tf.train.Example's wire format, every kind of feature included."""
    example = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\x89PNG", b""])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, -5, 2**40])),
        "box": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, -2.25])),
        "empty": tf.train.Feature()}))
    serialized = example.SerializeToString()
    with tf.io.TFRecordWriter(str(tmp_path / "r")) as w:
        w.write(serialized)
        w.write(b"")
    assert (tmp_path / "r").read_bytes() == tfrecord.frame(serialized) + tfrecord.frame(b"")
    ours = example_proto.Example.FromString(serialized)
    feature = ours.features.feature
    assert list(feature["image"].bytes_list.value) == [b"\x89PNG", b""]
    assert list(feature["label"].int64_list.value) == [1, -5, 2**40]
    assert list(feature["box"].float_list.value) == [0.5, -2.25]
    assert feature["empty"].WhichOneof("kind") is None
    assert tf.train.Example.FromString(ours.SerializeToString()) == example


def test_reading_prepared_data_does_not_import_tensorflow():
    program = ("import sys; from cae_jax import eval_pipeline, evaluate, input_pipeline, train; "
               "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_length_checksum_mismatch_names_file_and_offset(tmp_path):
    good = tf.train.Example().SerializeToString() + b"x"
    path = tmp_path / "bad.tfrecord"
    second = bytearray(tfrecord.frame(b"abc"))
    second[8] ^= 0xFF  # The length's checksum.
    path.write_bytes(tfrecord.frame(good) + bytes(second))
    offset = len(tfrecord.frame(good))
    with pytest.raises(tfrecord.CorruptRecordError, match=f"{path}.*{offset}.*length checksum"):
        tfrecord.index_file(str(path))
    assert tfrecord.index_file(str(path), skip_corrupt=True).tolist() == [0]


def _parse(data: bytes, skip: bool):
    raw = tfrecord.RawRecord(data=data, path="shard-7", offset=1234)
    return prepared_data.ParseRecord(skip_corrupt=skip).map(raw)


def test_record_that_is_not_an_example_or_lacks_a_feature_is_corrupt(caplog):
    example = next(datasets.examples("toy", "train", 1, 0, SIZE))
    serialized = records.features().serialize_example(example)
    assert _parse(serialized, skip=False)["label"] == 0
    no_label = tf.train.Example.FromString(serialized)
    del no_label.features.feature["label"]
    cases = {b"\xff\xff\xff": "not a tf.train.Example",
             no_label.SerializeToString(): "no feature 'label'"}
    for data, problem in cases.items():
        with pytest.raises(tfrecord.CorruptRecordError, match=f"shard-7.*offset 1234.*{problem}"):
            _parse(data, skip=False)
        before = _skips_logged(caplog)
        assert _parse(data, skip=True) is None
        assert _skips_logged(caplog) == before + 1
