"""`cae-jax compile-table`: `cae-jax compile` reports side by side, and the scaling plot's data."""

import json

from cae_jax import compile_table, main

GIB = 2**30


def report(name: str, chips: int, *, dtype="float32", fsdp=1, bn_group=None, fits=True,
           total_images=1000.0, slices=1) -> dict:
    """A report with the fields `cae-jax compile --out` writes (tests/test_compile.py checks a
    real one is read)."""
    train = {"fits": fits, "compile_seconds": 61.4}
    if fits:
        train.update(
            memory={"arguments": GIB, "outputs": GIB, "temporaries": 8 * GIB, "code": GIB // 8,
                    "total": 10 * GIB + GIB // 2},
            hbm_per_device=16 * GIB,
            cost={"flops": 2.5e12, "bytes": 150e9, "counted_on": "compiled"},
            flops_per_image=80e9,
            roofline={"bound": "memory", "step_seconds": 0.2,
                      "images_per_second_per_chip": total_images / chips,
                      "images_per_second_total": total_images},
            collectives={"all-reduce": {"count": 84, "bytes": 156 * 2**20}},
        )
    else:
        train["message"] = "Ran out of memory in memory space hbm."
    result = {"target": {"name": name, "topology": "t", "chips": chips, "slices": slices,
                         "devices": chips, "platform": "tpu"},
              "batch_per_chip": 32, "dtype": dtype, "mesh": {"data": -1, "fsdp": fsdp},
              "steps": {"train step": train, "eval step": {}}}
    if bn_group is not None:
        result["bn_group"] = bn_group
    return result


def write(tmp_path, name: str, content: dict) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "report.json").write_text(json.dumps(content))


def test_table_rows_sorted_by_choice_then_chips_with_fits_and_misses(tmp_path, capsys):
    write(tmp_path, "b", report("v5litepod-256", 256, total_images=40000.0))
    write(tmp_path, "a", report("v5litepod-4", 4))
    write(tmp_path, "c", report("v5litepod-4", 4, fits=False, bn_group=1))
    assert main.main(["compile-table", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("| v5litepod-4 | 4 | float32 | 1 | global batch | 32 | 10.50 (16.0) | yes "
                        "| 2.50 / 150 | 80.0 | 250 (memory-bound) | 1,000 | 84 all-reduce "
                        "(156 MiB) | 61 s |")
    assert lines[3].startswith("| v5litepod-256 | 256 | float32 | 1 | global batch |")
    assert "| 40,000 |" in lines[3]
    assert lines[4] == ("| v5litepod-4 | 4 | float32 | 1 | per device | 32 | - | **no** | - | - "
                        "| - | - | - | 61 s |")
    assert (tmp_path / "out" / "compile_table.md").read_text().splitlines() == lines
    assert (tmp_path / "out" / "compile_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_series_one_line_per_choice_of_the_rows_that_fit():
    rows = [compile_table.row(r) for r in (
        report("v6e-64", 64, total_images=9.0), report("v6e-4", 4, total_images=1.0),
        report("v6e-4", 4, dtype="bfloat16", fsdp=4, total_images=2.0),
        report("v6e-16", 16, bn_group=4, total_images=3.0),
        report("v6e-256", 256, fits=False),
        report("h100-8", 8, slices=2, total_images=5.0))]
    assert compile_table.scaling_series(rows) == {
        "h100 float32": [(16, 5.0)],
        "v6e bfloat16, fsdp 4": [(4, 2.0)],
        "v6e float32": [(4, 1.0), (64, 9.0)],
        "v6e float32, BN groups of 4": [(16, 3.0)],
    }
    assert rows[-1]["target"] == "h100-8 x2 slices"


def test_missing_and_foreign_reports_are_one_line_errors(tmp_path, capsys):
    assert main.main(["compile-table", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"cae-jax compile-table: {tmp_path / 'nothing'}: no such " \
                                      "file or directory\n"
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "report.json").write_text('{"steps": {}}')
    assert main.main(["compile-table", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"cae-jax compile-table: {tmp_path / 'x' / 'report.json'}: "
                                       "not a `cae-jax compile` report (no train step)\n")
