"""What a compiled step tells before it runs: HBM per device, FLOPs and bytes, collectives, and
a roofline estimate of its time from the chip's published figures (`accelerators.CHIPS`).

TPU compiles report their cost; XLA's GPU compiler does not (`cost_analysis()` is None, the
optimized module hides its work in cuDNN/cuBLAS calls), so there the FLOPs and bytes are
counted on the module before optimization (the whole program, divided over the devices).
"""

from __future__ import annotations

import collections
import re

import jax

from cae_jax import accelerators

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# `%name = SHAPE op(` where SHAPE is one array or a tuple of them, op a collective; the async
# form counts once, at its `-done` (whose shape is the result).
_INSTRUCTION = re.compile(r"=\s+(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


def shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = 1
        for dim in filter(None, dims.split(",")):
            size *= int(dim)
        total += size * DTYPE_BYTES[dtype]
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives in an optimized HLO module's text."""
    found = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for shape, kind, phase in _INSTRUCTION.findall(hlo_text):
        if phase == "-start":
            continue
        found[kind]["count"] += 1
        found[kind]["bytes"] += shape_bytes(shape)
    return dict(sorted(found.items()))


def memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """HBM per device: arguments, outputs (less what donated arguments alias), temporaries,
    code, and their total."""
    stats = compiled.memory_analysis()
    figures = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
               "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
               "code": stats.generated_code_size_in_bytes}
    figures["total"] = (figures["arguments"] + figures["outputs"] - figures["aliased"]
                        + figures["temporaries"] + figures["code"])
    return figures


def cost(compiled: jax.stages.Compiled, lowered: jax.stages.Lowered, devices: int
         ) -> dict[str, float | str]:
    """FLOPs and bytes accessed per device, and where they were counted."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # Older jaxlibs: one dict per program.
        analysis = analysis[0] if analysis else None
    if analysis and analysis.get("flops"):
        return {"flops": float(analysis["flops"]),
                "bytes": float(analysis.get("bytes accessed", 0.0)),
                "counted_on": "the compiled program (XLA cost analysis)"}
    from jax._src.lib import _jax  # XLA's HloCostAnalysis: no public door before compiling.

    module = lowered.compiler_ir("hlo").as_hlo_module()
    analysis = _jax.hlo_module_cost_analysis(jax.extend.backend.get_backend("cpu"), module)
    return {"flops": float(analysis["flops"]) / devices,
            "bytes": float(analysis.get("bytes accessed", 0.0)) / devices,
            "counted_on": "the module before optimization, divided over the devices "
                          "(the compiler reports no cost)"}


def roofline(flops: float, bytes_accessed: float, chip: accelerators.Chip,
             batch_per_chip: int, chips: int) -> dict[str, float]:
    """Estimated step time per device: the slower of compute at the bf16 peak and memory
    traffic at the HBM bandwidth (each shared by the chip's devices); images/s from it."""
    share = chip.devices_per_chip
    compute = flops / (chip.bf16_flops / share)
    traffic = bytes_accessed / (chip.hbm_bytes_per_second / share)
    seconds = max(compute, traffic)
    per_chip = batch_per_chip / seconds if seconds else float("nan")
    return {"compute_seconds": compute, "memory_seconds": traffic, "step_seconds": seconds,
            "bound": "compute" if compute >= traffic else "memory",
            "flops_per_byte": flops / bytes_accessed if bytes_accessed else float("nan"),
            "images_per_second_per_chip": per_chip,
            "images_per_second_total": per_chip * chips}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def markdown(report: dict) -> str:
    """The report as a markdown table per step, estimated figures marked."""
    target = report["target"]
    lines = [f"# {target['name']}: {target['topology']}, {target['chips']} chips x "
             f"{target['slices']} slice(s), {target['devices']} devices; batch "
             f"{report['batch_per_chip']} per chip ({report['global_batch']} global), "
             f"{report['dtype']}", ""]
    for name, step in report["steps"].items():
        lines += [f"## {name}", "", "| figure | value |", "|---|---|"]
        if not step["fits"]:
            lines += ["| fits | **does not fit** |", f"| XLA | {step['message']} |"]
        else:
            mem, hbm = step["memory"], step["hbm_per_device"]
            lines += [f"| HBM per device: arguments / outputs / temporaries / code | "
                      f"{gib(mem['arguments'])} / {gib(mem['outputs'])} / "
                      f"{gib(mem['temporaries'])} / {gib(mem['code'])} |",
                      f"| HBM per device in all (donated outputs counted once) | "
                      f"{gib(mem['total'])} of {gib(hbm)} |",
                      f"| fits | yes, {gib(hbm - mem['total'])} to spare |"]
            if "cost" in step:
                cost_, roof = step["cost"], step["roofline"]
                lines += [f"| TFLOP per device per step | {cost_['flops'] / 1e12:.3f} |",
                          f"| GB accessed per device per step | {cost_['bytes'] / 1e9:.1f} |",
                          f"| GFLOP per image | {step['flops_per_image'] / 1e9:.1f} |",
                          f"| counted on | {cost_['counted_on']} |",
                          f"| step time (estimated, roofline, {roof['bound']}-bound) | "
                          f"{roof['step_seconds'] * 1e3:.1f} ms |",
                          f"| images/s per chip (estimated) | "
                          f"{roof['images_per_second_per_chip']:.0f} |",
                          f"| images/s in all (estimated) | "
                          f"{roof['images_per_second_total']:.0f} |"]
            for kind, figures in step["collectives"].items():
                lines.append(f"| {kind} per step | {figures['count']} "
                             f"({figures['bytes'] / 2**20:.1f} MiB) |")
            if not step["collectives"]:
                lines.append("| collectives | none |")
        lines += [f"| compile time | {step['compile_seconds']:.1f} s |", ""]
    if "max_batch" in report:
        best = report["max_batch"]
        lines += [f"Largest batch per chip that fits: {best['fits']}; {best['fails']} does "
                  f"not: {best['message']}", ""]
    chip = report["chip"]
    lines.append(f"Estimated from the chip's published figures: {chip['bf16_tflops']:.0f} "
                 f"TFLOP/s bf16, {chip['hbm_gb_per_second']:.0f} GB/s HBM "
                 f"({chip['source']}).")
    return "\n".join(lines) + "\n"
