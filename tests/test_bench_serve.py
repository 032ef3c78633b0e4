"""`cae-jax bench --serve --smoke`: the service rows at tiny size (no timing asserted)."""

import json

from cae_jax import main


def test_serve_rows_drive_a_server_with_1_4_and_16_clients(tmp_path):
    out = tmp_path / "bench.json"
    assert main.main(["bench", "--serve", "--smoke", "--out", str(out),
                      "--markdown", str(tmp_path / "bench.md")]) == 0
    results = json.loads(out.read_text())
    loads = results["service"]["loads"]
    assert [(load["clients"], load["requests"]) for load in loads] == [(1, 16), (4, 16), (16, 16)]
    assert all(load["requests_per_s"] > 0 and 0 < load["p50_ms"] <= load["p99_ms"]
               for load in loads)
    by_kind = results["service"]["by_kind"]
    assert {kind: [(load["clients"], load["requests"]) for load in loads]
            for kind, loads in by_kind.items()} == {
        "face crops to :predict": [(1, 16), (16, 16)], "photos to /v1/score": [(1, 16), (16, 16)]}
    assert sorted(results["service"]["memory_mb"]["after"]) == ["16", "8"]
    stats = results["service"]["server_stats"]
    # Every request reached the model: 2 warm-up + 3 x 16 mixed + 2 x 2 x 16 by kind + 16
    # memory requests; the photos (half the mixed and memory ones) reached the detector.
    assert stats["batched_requests"] == 2 + 3 * 16 + 4 * 16 + 16
    assert stats["detected_requests"] == 1 + 3 * 8 + 2 * 16 + 8
    assert 0 < stats["model_calls"] <= stats["batched_requests"]
    table = (tmp_path / "bench.md").read_text()
    assert [r["benchmark"] for r in results["rows"]] == [
        "service, 1 HTTP clients", "service, 4 HTTP clients", "service, 16 HTTP clients",
        "service, face crops to :predict, 16 HTTP clients",
        "service, photos to /v1/score, 16 HTTP clients", "service RSS after 16 requests"]
    for row in results["rows"]:
        assert f"| {row['benchmark']} |" in table
    assert results["rows"][0]["ratio"] == 1.0
