"""``zotune report``: turn grid results (JSONL) into markdown tables shaped like the papers'.

- :func:`runs_table`: one row per run: zero-shot and tuned metric, steps, time, test size, memory.
- :func:`pivot_table`: a metric by method (rows) and scheme or task (columns), ZO-Bench Table 2.
- :func:`cost_table`: memory and time per method, ZO-Bench Table 4.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path


def load_records(path: str | Path) -> list[dict]:
    """Read a results JSONL; later records of the same run replace earlier ones."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"results file not found: {p}")
    by_run: dict[str, dict] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} line {n}: not JSON ({e.msg})") from None
        by_run[rec.get("run", f"line{n}")] = rec
    return list(by_run.values())


def _metric(metrics: dict | None) -> tuple[str, float] | None:
    if not metrics:
        return None
    for key in ("accuracy", "f1", "f1a", "em"):
        if key in metrics:
            return key, metrics[key]
    return None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _mib(v) -> str:
    return "-" if not v else f"{v / 2**20:,.0f}"


def _md(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def runs_table(records: list[dict]) -> str:
    """One row per run, failed runs included with their status."""
    header = ["run", "task", "method", "scheme", "steps", "zero-shot", "tuned", "metric", "test n",
              "train s", "s/step", "fwd passes", "peak RSS MiB", "RSS over load MiB", "status"]
    rows = []
    for rec in records:
        r = rec.get("results") or {}
        zs, tuned = _metric(r.get("zero_shot")), _metric(r.get("test"))
        peak, load = r.get("peak_rss_bytes"), r.get("rss_after_load_bytes")
        rows.append([
            rec["run"], r.get("task", "-"), r.get("method", "-"), r.get("scheme", "-"), r.get("steps", "-"),
            _pct(zs[1] if zs else None), _pct(tuned[1] if tuned else None), tuned[0] if tuned else "-",
            (r.get("test") or {}).get("n", "-"), r.get("train_seconds_this_session", "-"),
            r.get("mean_step_seconds", "-"), r.get("forward_passes", "-"), _mib(peak),
            _mib(peak - load) if peak and load else "-", rec.get("status", "-"),
        ])
    return _md(header, rows)


def _key(results: dict, name: str) -> str | None:
    """A results.json field, or several joined with '+' (``method+scheme`` -> 'mezo (lora)')."""
    if "+" in name:
        first, *rest = name.split("+")
        return f"{results.get(first)} ({', '.join(str(results.get(k)) for k in rest)})"
    return results.get(name)


def pivot_table(records: list[dict], rows: str = "method", cols: str = "scheme") -> str:
    """The tuned metric (in %) by ``rows`` x ``cols`` (keys of results.json: method, scheme, task;
    ``a+b`` joins two keys), averaged over seeds (n shown when more than one run)."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    row_keys, col_keys = [], []
    for rec in records:
        r = rec.get("results") or {}
        m = _metric(r.get("test"))
        if rec.get("status") != "ok" or m is None:
            continue
        rk, ck = _key(r, rows), _key(r, cols)
        row_keys += [rk] if rk not in row_keys else []
        col_keys += [ck] if ck not in col_keys else []
        cells[(rk, ck)].append(m[1])
    body = []
    for rk in row_keys:
        line = [rk]
        for ck in col_keys:
            vals = cells.get((rk, ck))
            line.append("-" if not vals else _pct(sum(vals) / len(vals)) + (f" (n={len(vals)})" if len(vals) > 1 else ""))
        body.append(line)
    return _md([f"{rows} \\ {cols}"] + [str(c) for c in col_keys], body)


def cost_table(records: list[dict]) -> str:
    """Memory and time per method (ZO-Bench Table 4's shape)."""
    header = ["method", "scheme", "peak RSS MiB", "RSS over load MiB", "CUDA peak MiB", "s/step", "fwd passes/step"]
    rows = []
    for rec in records:
        r = rec.get("results") or {}
        if rec.get("status") != "ok":
            continue
        peak, load = r.get("peak_rss_bytes"), r.get("rss_after_load_bytes")
        steps = r.get("steps") or 1
        fwd = r.get("forward_passes")
        rows.append([r.get("method"), r.get("scheme"), _mib(peak), _mib(peak - load) if peak and load else "-",
                     _mib(r.get("cuda_peak_bytes")), r.get("mean_step_seconds", "-"),
                     f"{fwd / steps:.1f}" if isinstance(fwd, (int, float)) else "-"])
    return _md(header, rows)


def report(path: str | Path) -> str:
    """The full markdown report of a results file."""
    records = load_records(path)
    parts = [f"## Runs ({Path(path).name})", runs_table(records),
             "## Tuned metric by method and task", pivot_table(records, "method+scheme", "task"),
             "## Tuned metric by method and scheme", pivot_table(records, "method", "scheme"),
             "## Memory and time by method", cost_table(records)]
    return "\n\n".join(parts) + "\n"


def _curve(run_dir: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                steps.append(rec["step"])
                losses.append(rec["loss"])
    return steps, losses


def figures(records: list[dict], out_dir: str | Path) -> list[Path]:
    """Loss curves (one panel per task) and tuned accuracy against forward passes, as PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.get("status") == "ok" and r.get("output_dir")]
    written = []
    tasks = list(dict.fromkeys((r.get("results") or {}).get("task") for r in ok))
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for r in ok:
                if (r.get("results") or {}).get("task") != task:
                    continue
                steps, losses = _curve(r["output_dir"])
                if steps:
                    ax.plot(steps, losses, label=r["run"])
            ax.set_title(task)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written += _save(fig, out / "loss_curves")
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in ok:
            res = r.get("results") or {}
            m = _metric(res.get("test"))
            if m and res.get("forward_passes"):
                ax.scatter(res["forward_passes"], 100 * m[1], label=r["run"])
        ax.set_xlabel("forward passes")
        ax.set_ylabel("tuned test metric (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written += _save(fig, out / "accuracy_vs_forward_passes")
    return written


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a report so that a crash midway leaves the previous file, never a truncated one."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return out


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for p in paths:
        fig.savefig(p, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
