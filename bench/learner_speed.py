"""Learner speed and memory: fixations per second and per-tick latency, measured in one run.

Variants (same model, same inputs, same process, interleaved rounds so that machine noise hits all
of them alike):

* ``forward``: inference only (trunk, RGC, head; no gradients, no traces);
* ``rfp``: RFP, ``every_fixation`` (one optimizer step per tick; the service's mode);
* ``rfp-segment``: RFP, gradients accumulated and applied at the segment end;
* ``bptt-k10``, ``bptt-k100``: truncated BPTT re-run over the last K steps at every fixation;
* ``bptt-full``: full-history BPTT (the window is everything since the last reset).

Every tick includes the trunk on real-sized patches (uint8, ``input_size``), so ratios are what a
service sees. Ratios are to ``forward`` in the same run: of the mean tick, of the median tick, and
"paired" (the median over rounds of round-by-round ratios, the steadiest on a shared machine). The
variants interleave one tick at a time by default. The learning variants' running whitenings are
taken past their start-up schedule before timing, and their recomputes (an eigendecomposition every
64 or 256 ticks) are held during the timed ticks: they are timed on their own and added back as a
per-tick share in the column ``x fwd (+recompute)``, the ratio to hold against a target (a short run
would otherwise catch zero or two of them by chance). ``rfp-segment`` here never reaches a segment
end: ``segment_len`` is 0, so it shows RFP without the optimizer step. Memory per stream is measured
for RFP and BPTT against the sequence length T, with the crossover. The roofline section measures
the bytes the trace update moves per tick against a copy bandwidth measured in the same run.

    python -m bench.learner_speed --batch 1 16 64 128 --json runs/bench/learner_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.controls import config_overrides
from learner import BPTTLearner, ModelConfig, RFPLearner, StreamLearner
from learner.patches import preprocess

VARIANTS: dict[str, Callable[[ModelConfig, str], StreamLearner]] = {
    "forward": lambda cfg, dev: RFPLearner(cfg, device=dev),
    "rfp": lambda cfg, dev: RFPLearner(cfg, device=dev),
    "rfp-segment": lambda cfg, dev: RFPLearner(cfg.replace(update_mode="segment"), device=dev),
    "bptt-k10": lambda cfg, dev: BPTTLearner(cfg, device=dev, window=10),
    "bptt-k100": lambda cfg, dev: BPTTLearner(cfg, device=dev, window=100),
    "bptt-full": lambda cfg, dev: BPTTLearner(cfg, device=dev, window=None),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_ticks(
    cfg: ModelConfig,
    batch: int,
    variants: list[str],
    *,
    ticks: int,
    warmup: int,
    device: str,
    rounds: int | None = None,
) -> dict[str, dict[str, float]]:
    """Per-tick latencies of each variant, interleaved in ``rounds`` so noise is shared.

    ``rounds=None``: one tick of each variant per round (the finest interleave), the order reversed
    every other round. ``paired_ratio_to_forward`` is the median over rounds of a variant's mean tick
    over forward's in the same round: on a shared machine it is the steadiest of the three ratios.
    """
    rng = np.random.default_rng(0)
    patches = rng.integers(
        0, 256, size=(warmup + ticks, batch, cfg.input_size, cfg.input_size, 3), dtype=np.uint8
    )
    ids = [f"s{i}" for i in range(batch)]
    learners = {name: VARIANTS[name](cfg, device) for name in variants}
    times: dict[str, list[float]] = {name: [] for name in variants}
    round_means: dict[str, list[float]] = {name: [] for name in variants}
    rounds = ticks if rounds is None else max(1, min(rounds, ticks))
    per_round = max(1, ticks // rounds)
    for name, learner in learners.items():  # warm up; the first steps also allocate
        for t in range(warmup):
            learner.tick(ids, patches[t], learn=name != "forward")
        if name != "forward":
            settle_whitening(learner, patches[:warmup], ids)
    pos = {name: warmup for name in variants}
    held = [hold_recomputes(learner) for name, learner in learners.items() if name != "forward"]
    for r in range(rounds):
        order = list(learners) if r % 2 == 0 else list(learners)[::-1]
        for name in order:
            learner = learners[name]
            start_round = len(times[name])
            for _ in range(per_round):
                t = pos[name]
                _sync(device)
                start = time.perf_counter()
                learner.tick(ids, patches[t], learn=name != "forward")
                _sync(device)
                times[name].append(time.perf_counter() - start)
                pos[name] += 1
            round_means[name].append(float(np.mean(times[name][start_round:])))
    for release in held:
        release()
    out = {}
    for name, ts in times.items():
        arr = np.asarray(ts)
        out[name] = {
            "p50_ms": float(np.percentile(arr, 50) * 1e3),
            "p99_ms": float(np.percentile(arr, 99) * 1e3),
            "mean_ms": float(arr.mean() * 1e3),
            "fixations_per_s": float(batch / arr.mean()),
            "ticks": len(ts),
        }
    base = out.get("forward")
    for name in out:
        nan = float("nan")
        out[name]["ratio_to_forward"] = out[name]["mean_ms"] / base["mean_ms"] if base else nan
        out[name]["p50_ratio_to_forward"] = out[name]["p50_ms"] / base["p50_ms"] if base else nan
        paired = np.asarray(round_means[name]) / np.asarray(round_means["forward"]) if base else [nan]
        out[name]["paired_ratio_to_forward"] = float(np.median(paired))
    return out


def settle_whitening(learner: StreamLearner, patches: np.ndarray, ids: list[str]) -> None:
    """Take a learning variant's running whitenings past their start-up schedule, untimed.

    ``whitening.RunningWhitening`` (on the trunk features, and on the state h with ``context_norm``)
    recomputes its matrix (an eigendecomposition) after 1, 2, 4, ..., 128 observations and then every
    256: a service passes the doubling phase in its first seconds. Timed ticks inside it would charge
    a one-off start-up cost to a few ticks of a short run; the steady-state recomputes are reported on
    their own (``whitening_recompute``).
    """
    model = learner.model
    size, dev, dt = learner.cfg.input_size, learner.device, learner.dtype
    u = torch.cat([model.encode(preprocess(p, size, device=dev, dtype=dt)) for p in patches])  # (T*B, M)
    h = learner.states.h[learner.states.slots(ids)]  # (B, N)
    for norm, x in ((model.input_norm, u), (getattr(model, "context_norm", None), h)):
        if norm is None:
            continue
        last_doubling = 1 << ((norm.every - 1).bit_length() - 1)  # the largest power of two below every
        while norm.n_batches <= last_doubling:
            norm.observe(x)


def hold_recomputes(learner: StreamLearner) -> Callable[[], None]:
    """Skip the learner's whitening recomputes until the returned function is called."""
    model = learner.model
    norms = [n for n in (model.input_norm, getattr(model, "context_norm", None)) if n is not None]
    for norm in norms:
        norm._recompute = lambda n: None  # type: ignore[method-assign]  # an instance attribute shadows it

    def release() -> None:
        for norm in norms:
            del norm._recompute

    return release


def whitening_recompute(cfg: ModelConfig, device: str, repeats: int = 3) -> dict[str, Any]:
    """Seconds of one recompute of each running whitening, and their share of a tick (each runs every
    ``every`` learning ticks)."""
    model = RFPLearner(cfg.replace(trunk="none", in_features=cfg.M), device=device).model
    named = {"input": model.input_norm, "context": getattr(model, "context_norm", None)}
    out: dict[str, Any] = {"per_tick_ms": 0.0}
    for name, norm in named.items():
        if norm is None:
            continue
        width = norm.cov.shape[0]
        norm.observe(torch.randn(4 * width, width, device=device))
        ts = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            norm._recompute(norm.n_seen)
            _sync(device)
            ts.append(time.perf_counter() - t0)
        out[name] = {"seconds": min(ts), "every_ticks": norm.every}
        out["per_tick_ms"] += min(ts) / norm.every * 1e3
    return out


def memory_vs_length(cfg: ModelConfig, lengths: list[int], device: str) -> dict[str, Any]:
    """Bytes held per stream after T fixations: RFP (flat) against full-history BPTT (growing)."""
    rows = []
    feats = torch.randn(max(lengths), cfg.M)
    for T in lengths:
        rfp = RFPLearner(cfg.replace(trunk="none", in_features=cfg.M, segment_len=0), device=device)
        bptt = BPTTLearner(
            cfg.replace(trunk="none", in_features=cfg.M, segment_len=0), device=device, window=None
        )
        for t in range(T):
            rfp.tick_features(["a"], feats[t : t + 1], learn=False)
            bptt.tick_features(["a"], feats[t : t + 1], learn=False)
        # BPTT must keep every input of the window plus, while back-propagating, one step's activations
        # (x, gates, h, c: about 8 N floats) per step of the window
        slot = bptt.states.slot_of("a")
        window_bytes = sum(u.numel() * u.element_size() for u in bptt._inputs[slot])
        act_bytes = T * 8 * cfg.n_units * 4
        rows.append(
            {
                "T": T,
                "rfp_bytes": rfp.memory_per_stream(),
                "bptt_bytes": bptt.memory_per_stream() + window_bytes + act_bytes,
            }
        )
    crossover = next((r["T"] for r in rows if r["bptt_bytes"] > r["rfp_bytes"]), None)
    per_step = (cfg.M + 8 * cfg.n_units) * 4
    return {
        "rows": rows,
        "crossover_T_measured": crossover,
        "crossover_T_model": rows[0]["rfp_bytes"] / per_step if rows else None,
    }


def roofline(cfg: ModelConfig, batch: int, device: str, repeats: int = 5) -> dict[str, float]:
    """Bytes the trace update moves per tick against a copy bandwidth measured now."""
    learner = RFPLearner(cfg.replace(trunk="none", in_features=cfg.M), device=device)
    ids = [f"s{i}" for i in range(batch)]
    u = torch.randn(batch, cfg.M, device=device)
    for _ in range(3):
        learner.tick_features(ids, u)
    slots = learner.states.slots(ids)
    with torch.no_grad():
        _, _, cache = learner.model.rgc.step(u, learner.states.h[slots], learner.states.c[slots])
        jac = learner.model.rgc.jacobian(cache)
    ts = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        learner._rgc_grads_and_traces(slots, slots[:0], None, jac, cache.v)  # no stream scored: traces only
        _sync(device)
        ts.append(time.perf_counter() - t0)
    trace = learner.states.trace["W"]
    bytes_moved = 2 * batch * trace[0].numel() * trace.element_size()  # read + write each stream's W traces
    src = torch.empty(batch * trace[0].numel(), device=device)
    dst = torch.empty_like(src)
    cs = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        cs.append(time.perf_counter() - t0)
    bandwidth = 2 * src.numel() * src.element_size() / min(cs)
    achieved = bytes_moved / min(ts)
    return {
        "bytes_per_tick": bytes_moved,
        "seconds": min(ts),
        "achieved_GBps": achieved / 1e9,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "fraction_of_copy_bandwidth": achieved / bandwidth,
    }


def machine() -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_recompute_share(res: dict[str, dict[str, float]], per_tick_ms: float) -> None:
    """``ratio_with_recompute``: a learning variant's mean tick plus the recomputes' per-tick share,
    over forward's mean tick (forward never recomputes)."""
    base = res.get("forward")
    for name, r in res.items():
        extra = 0.0 if name == "forward" else per_tick_ms
        r["ratio_with_recompute"] = (r["mean_ms"] + extra) / base["mean_ms"] if base else float("nan")


def print_table(batch: int, res: dict[str, dict[str, float]]) -> None:
    print(f"\nB = {batch}")
    print(
        f"{'variant':<13}{'fix/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'x fwd (mean)':>14}{'x fwd (p50)':>13}{'x fwd (paired)':>16}{'x fwd (+recompute)':>20}"
    )
    for name, r in res.items():
        print(
            f"{name:<13}{r['fixations_per_s']:>10.1f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
            f"{r['ratio_to_forward']:>14.3f}{r['p50_ratio_to_forward']:>13.3f}"
            f"{r.get('paired_ratio_to_forward', float('nan')):>16.3f}"
            f"{r.get('ratio_with_recompute', float('nan')):>20.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaving rounds (default: one tick per variant per round)",
    )
    ap.add_argument("--trunk", default=ModelConfig.trunk)
    ap.add_argument("--n-units", type=int, default=ModelConfig.n_units)
    ap.add_argument("--input-size", type=int, default=ModelConfig.input_size)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-lengths", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="other ModelConfig fields (e.g. rgc_inputs=256)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(
        trunk=args.trunk,
        n_units=args.n_units,
        input_size=args.input_size,
        segment_len=0,
        **config_overrides(args.set),
    )
    report: dict[str, Any] = {"machine": machine(), "config": cfg.to_dict(), "ticks": {}}
    print(f"machine: {report['machine']}")
    print(
        f"model: trunk={cfg.trunk} input={cfg.input_size}px"
        f" N={cfg.n_units} M={cfg.M} K={cfg.K} D={cfg.embed_dim}"
    )
    recompute = whitening_recompute(cfg, args.device)
    report["whitening_recompute"] = recompute
    for b in args.batch:
        res = measure_ticks(
            cfg,
            b,
            args.variants,
            ticks=args.ticks,
            warmup=args.warmup,
            device=args.device,
            rounds=args.rounds,
        )
        add_recompute_share(res, recompute["per_tick_ms"])
        report["ticks"][b] = res
        print_table(b, res)
    mem = memory_vs_length(cfg, args.memory_lengths, args.device)
    report["memory"] = mem
    print("\nmemory per stream (bytes)\n     T     RFP          BPTT (full history)")
    for r in mem["rows"]:
        print(f"{r['T']:>6}{r['rfp_bytes']:>12,}{r['bptt_bytes']:>16,}")
    print(
        f"crossover: BPTT holds more than RFP from T = {mem['crossover_T_measured']} "
        f"(model: {mem['crossover_T_model']:.0f})"
    )
    parts = ", ".join(
        f"{name} {r['seconds'] * 1e3:.0f} ms every {r['every_ticks']} ticks"
        for name, r in recompute.items()
        if isinstance(r, dict)
    )
    print(
        f"\nwhitening recomputes (learning variants; held during the timed ticks, added back in "
        f"'+recompute'): {parts}; {recompute['per_tick_ms']:.2f} ms per tick amortised"
    )
    roof = roofline(cfg, max(args.batch), args.device)
    report["roofline"] = roof
    print(
        f"\ntrace update at B={max(args.batch)}: {roof['bytes_per_tick'] / 1e6:.1f} MB/tick, "
        f"{roof['achieved_GBps']:.2f} GB/s against a measured copy bandwidth of "
        f"{roof['copy_bandwidth_GBps']:.2f} GB/s"
        f" ({100 * roof['fraction_of_copy_bandwidth']:.0f}%)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
