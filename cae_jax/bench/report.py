"""The CPU benchmark's table: one row per measurement beside its peer, then the layer table."""

from __future__ import annotations


def row(name: str, ours: float | None, peer: float | None, unit: str, note: str = "") -> dict:
    ratio = ours / peer if ours and peer else None
    return {"benchmark": name, "cae_jax": ours, "peer": peer, "unit": unit, "ratio": ratio,
            "note": note}


def markdown(results: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['machine']}, JAX {m['jax']} "
        f"({m['backend']}), PyTorch {m.get('torch', 'n/a')}; load average "
        f"{m['load_average'][0]:.1f}. Medians of {results['config']['repeats']} repeats.",
        "",
        "| benchmark | cae-jax | peer | unit | cae-jax / peer | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['benchmark']} | {fmt(r['cae_jax'])} | {fmt(r['peer'])} | "
                     f"{r['unit']} | {ratio} | {r['note']} |")
    if "layers" not in results:  # A run of some rows only (`bench --serve`).
        return "\n".join(lines)
    lines += [
        "",
        f"Matmul peak ({results['matmul_peak']['size']}^2 float32): "
        f"{results['matmul_peak']['gflops_per_s']:.1f} GFLOP/s.",
        "",
        "| layer (`model.layer_impl`) | shapes | native fwd / grad ms | decomposed fwd / grad ms |",
        "|---|---|---|---|",
    ]
    for r in results["layers"]:
        n, d = r["native"], r["decomposed"]
        lines.append(
            f"| {r['layer']} | {' '.join('x'.join(map(str, s)) for s in r['shapes'])} | "
            f"{n['forward_s'] * 1e3:.1f} / {n['gradient_s'] * 1e3:.1f} | "
            f"{d['forward_s'] * 1e3:.1f} / {d['gradient_s'] * 1e3:.1f} |"
        )
    return "\n".join(lines)
