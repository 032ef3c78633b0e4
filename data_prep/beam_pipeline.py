"""`cae-jax prepare --runner beam`: the same work as the local pool, as an Apache Beam pipeline.

For corpora too large for one machine (DFDC: ~470 GB, 100k+ videos), on Dataflow, Spark or
Flink (`--beam-options '--runner=DataflowRunner ...'`); OUT and ROOT may then be gs:// paths.
Workers crop videos into the same per-video cache as the local runner (so runs resume), then
write shards under temporary names; the launching process renames them and writes the
manifest and TFDS metadata, exactly as `writer.write_dataset` does locally.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

from data_prep import records, work, writer
from data_prep.entries import Entry, unit_hash


def shard_counts(
    entries: Sequence[Entry], frames_per_video: int, examples_per_shard: int
) -> dict[str, int]:
    """Shards per split, sized for the frames expected before cropping (an upper bound)."""
    frames: dict[str, int] = {}
    for e in entries:
        frames[e.split] = frames.get(e.split, 0) + (1 if e.is_image else frames_per_video)
    return {s: max(1, math.ceil(n / examples_per_shard)) for s, n in frames.items()}


def _shard_key(entry: Entry, num_shards: dict[str, int]) -> tuple[str, int]:
    """All crops of a video go to one shard, chosen by hash of its id (stable across runs)."""
    index = int(unit_hash("shard", entry.video_id) * num_shards[entry.split])
    return entry.split, index


class _WriteShard(beam.DoFn):
    """Writes one shard's videos (in id order) to a temporary file; emits its location."""

    def __init__(self, name: str, out_dir: str, work_dir: str):
        self.name, self.out_dir, self.work_dir = name, out_dir, work_dir

    def process(self, element) -> Iterator[str]:
        (split, index), group = element
        serialize = records.serializer()
        group = sorted(group, key=lambda e: e.video_id)
        serialized = (
            serialize(example)
            for entry in group
            for example in work.cached_examples(entry, self.name, self.work_dir)
        )
        path = writer.temporary_shard(self.out_dir, self.name, split, index)
        count = writer.write_shard(path, serialized)
        yield json.dumps({"split": split, "index": index, "path": os.fspath(path), "n": count})


def run(
    entries: Sequence[Entry],
    name: str,
    out_dir: epath.Path,
    work_dir: epath.Path,
    settings: work.Settings,
    examples_per_shard: int,
    beam_options: Sequence[str],
) -> tuple[epath.Path, dict[str, dict]]:
    """Runs the pipeline to completion, then commits its shards; returns OUT and the
    summary of each video (by id)."""
    num_shards = shard_counts(entries, settings.frames_per_video, examples_per_shard)
    run_dir = work_dir / f"beam-{uuid.uuid4().hex[:12]}"
    with beam.Pipeline(options=PipelineOptions(list(beam_options))) as pipeline:
        results = (
            pipeline
            | "Entries" >> beam.Create(list(entries))
            | "Spread" >> beam.Reshuffle()
            | "Crop" >> beam.Map(lambda e: (e, work.process(e, settings, os.fspath(work_dir))))
        )
        _ = (
            results
            | "Summaries" >> beam.Map(lambda r: json.dumps(r[1]))
            | "WriteSummaries" >> beam.io.WriteToText(os.fspath(run_dir / "summaries"))
        )
        _ = (
            results
            | "Cropped" >> beam.Filter(lambda r: r[1]["status"] == "ok")
            | "KeyByShard" >> beam.Map(lambda r: (_shard_key(r[0], num_shards), r[0]))
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards"
            >> beam.ParDo(_WriteShard(name, os.fspath(out_dir), os.fspath(work_dir)))
            | "WriteShardList" >> beam.io.WriteToText(os.fspath(run_dir / "shards"))
        )
    summaries = {s["video_id"]: s for s in _read_lines(run_dir, "summaries")}
    shards: dict[str, list[tuple[str, int]]] = {}
    for s in sorted(_read_lines(run_dir, "shards"), key=lambda s: (s["split"], s["index"])):
        shards.setdefault(s["split"], []).append((s["path"], s["n"]))
    stats: dict[str, writer.SplitStats] = {}
    for entry in entries:
        summary = summaries[entry.video_id]
        if summary["status"] == "ok":
            stats.setdefault(entry.split, writer.SplitStats()).add(
                entry.video_id, entry.label, entry.method, summary["frames"]
            )
    from data_prep import prepare  # It imports this module lazily.

    manifest = {
        "splits": {split: st.to_dict() for split, st in sorted(stats.items())},
        **prepare.run_manifest(entries, summaries, settings),
    }
    return writer.commit(out_dir, name, shards, manifest), summaries


def _read_lines(run_dir: epath.Path, prefix: str) -> Iterator[dict]:
    for path in sorted(run_dir.glob(f"{prefix}-*")):
        for line in path.read_text().splitlines():
            if line:
                yield json.loads(line)
