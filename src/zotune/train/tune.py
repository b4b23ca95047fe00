"""``zotune tune RECIPE``: a short probe on dev data that picks the learning rate for a model and task.

Why: ZO methods are sensitive to lr (and eps), and a wrong one means nothing moves for hours;
the papers' users ask this again and again. The probe answers it in minutes: from the same
starting weights, each candidate lr (the recipe's lr times ``factors``) trains ``steps`` steps on
the recipe's training batches, then the probe measures the loss on a fixed set of dev rows (the
training objective, never the test split), in ``chunks`` groups of rows so that the noise of a
difference between two candidates on the same rows can be measured. It picks by the
one-standard-error rule (``rule="one-se"``, the default): among the candidates whose dev loss is
within one standard error of the lowest, the smallest lr. Why: a short probe favours a large lr
that keeps drifting in a long run, and a difference within the noise is no reason to take the
larger one. ``rule="min"`` takes the lowest dev loss whatever the noise. The rule guards against
noise, not against drift: on SST-2's prefix MeZO's 30-step probe (factors 1-100 from 1e-3) picks
0.03 by either rule (dev loss 0.607 against 0.01's 0.799, far outside one standard error), and over
250 steps 0.03 peaked at dev 0.71 and fell back to 0.615 while 0.01 held 0.695
(docs/convergence.md). So when the recipe trains many times longer than the probe, the probe says
so: evaluate on dev during the run (``train.eval_every``; the best-dev checkpoint is what is
tested), or probe with more ``steps``. It says what it picked and why,
with the whole table; a candidate whose loss went non-finite or rose is reported as such. If no
candidate lowered the dev loss, it says that too instead of picking one. With ``eps_factors``
(``--eps-factors 0.1,1,10``) it tries every (lr, eps) pair and picks both.

Run it with the training run's split sizes (its recipe as is): without a labeled evaluation file,
test rows are carved first and dev rows after them, so a different ``task.test`` moves the dev
rows, and ``task.test=0`` would make them the training run's test rows.

The probe keeps one copy of the trainable tensors (to restart each candidate from the same
point), so for full fine-tuning it needs the model's memory twice.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import torch

from zotune.config import Config
from zotune.methods import build_optimizer
from zotune.step import NonFiniteLossError

log = logging.getLogger("zotune.tune")

DEFAULT_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)


RULES = ("one-se", "min")
LONG_RUN = 10  # a run this many times longer than the probe gets the drift caution


def drift_caution(run_steps: int, probe_steps: int, eval_every: int) -> str | None:
    """What to do when the run is much longer than the probe, or None when it is not.

    Why: a short probe measures how fast an lr lowers the loss at the start, not whether it keeps
    the gain; the lr that looks best over 30 steps can drift over 250 (see the module docstring)."""
    if run_steps < LONG_RUN * probe_steps:
        return None
    text = (f"caution: the recipe trains {run_steps} steps, {run_steps // probe_steps}x the probe's {probe_steps}; "
            "an lr that looks best over a short probe can drift over a long run")
    if eval_every <= 0 or eval_every >= run_steps:
        return text + (": set train.eval_every (dev evaluation during the run; the best-dev checkpoint "
                       "is the one tested) or probe with more --steps")
    return text + (f": train.eval_every={eval_every} keeps the best-dev checkpoint; "
                   "if dev accuracy falls back, try the next smaller lr")


def _paired_se(a: list[float], b: list[float]) -> float:
    """Standard error of the mean difference of two candidates' chunk losses on the same rows."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return 0.0
    mean = sum(d) / len(d)
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def choose(before: float, candidates: list[dict], rule: str = "one-se") -> tuple[dict | None, str]:
    """The candidate to use, and why: by ``rule`` among those that lowered the dev loss.

    ``"min"``: the lowest dev loss. ``"one-se"``: the smallest lr whose dev loss is within one
    standard error (paired over the candidates' ``dev_chunks``) of the lowest; without chunk
    losses it is ``"min"``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    good = [r for r in candidates if r["status"] == "ok"]
    if not good:
        return None, (f"no candidate lowered the dev loss ({before:.4f}): try more steps (--steps), other factors "
                      "(--factors), or another eps")
    lowest = min(good, key=lambda r: r["dev_loss"])
    best, why_smaller = lowest, ""
    if rule == "one-se" and all(len(r.get("dev_chunks") or ()) > 1 for r in good):
        tied = [r for r in good if r["dev_loss"] - lowest["dev_loss"] <= _paired_se(r["dev_chunks"], lowest["dev_chunks"])]
        best = min(tied, key=lambda r: (r["lr"], r["dev_loss"]))
        if best is not lowest:
            se = _paired_se(best["dev_chunks"], lowest["dev_chunks"])
            why_smaller = (f"; lr {lowest['lr']:.3g} was lower ({lowest['dev_loss']:.4f}) by {best['dev_loss'] - lowest['dev_loss']:.4f}, "
                           f"within one standard error ({se:.4f}) of the difference, so the smaller lr is kept (a short "
                           "probe favours lrs that drift in a long run)")
    factors = [r["factor"] for r in candidates]
    edge = best["factor"] in (min(factors), max(factors)) and len(factors) > 1
    eps = f" (eps {best['eps']:.3g})" if len({r.get("eps") for r in candidates}) > 1 else ""
    verb = "lowered the dev loss most" if best is lowest else "lowered the dev loss"
    return best, (f"lr {best['lr']:.3g}{eps} {verb} ({before:.4f} -> {best['dev_loss']:.4f}){why_smaller}"
                  + ("; it is at the edge of the grid, so a wider grid may do better" if edge else ""))


def probe_lr(cfg: Config, *, factors=DEFAULT_FACTORS, steps: int = 20, rows: int = 64, setup=None,
             progress: bool = True, eps_factors=(1.0,), chunks: int = 8, rule: str = "one-se") -> dict:
    """Try ``cfg.optim.lr * f`` for each ``f`` in ``factors`` (and ``cfg.optim.eps * e`` for each
    ``e`` in ``eps_factors``: every pair) for ``steps`` steps; pick on dev loss by ``rule``,
    measured in ``chunks`` groups of the dev rows."""
    from zotune.train.loop import BatchOrder, build, make_closure, resolve_objective

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    for name, given in (("factors", factors), ("eps_factors", eps_factors)):
        if not given or any(not (isinstance(f, (int, float)) and f > 0) for f in given):
            raise ValueError(f"{name} must be positive numbers, got {given!r}")
    setup = setup if setup is not None else build(cfg)
    data, model, named = setup.data, setup.model, setup.named
    probe = list(data.dev)[:rows]
    if not probe:
        raise ValueError("zotune tune needs dev rows: set task.dev > 0 (the probe never reads the test split)")
    if cfg.task.test == 0 and cfg.task.eval_file is None:
        log.warning("task.test=0 with no task.eval_file: dev rows are carved right after the test rows, so "
                    "these dev rows are the ones a run with task.test > 0 tests on; give tune the training "
                    "run's split sizes (its recipe) to probe on that run's dev rows")
    if cfg.train.head_cache:
        log.warning("train.head_cache: zotune tune's probes do not use it (each loss is a forward pass, as without "
                    "it); benchmarks/head_cache_sweep.py tries methods and lrs for thousands of steps from one cache")
    device = next(model.parameters()).device
    objective = resolve_objective(cfg, data.train)
    size = math.ceil(len(probe) / min(chunks, len(probe)))
    parts = [probe[i:i + size] for i in range(0, len(probe), size)]
    closures = [make_closure(setup.loaded, part, cfg, device, objective) for part in parts]

    def dev_losses() -> tuple[float, list[float]]:
        """The dev loss (rows weighted equally across chunks) and each chunk's."""
        each = [float(c()) for c in closures]
        return sum(x * len(part) for x, part in zip(each, parts)) / len(probe), each
    start = {n: p.detach().clone() for n, p in named.items()}

    def restart() -> None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(start[n])

    with torch.no_grad():
        before, _ = dev_losses()
    order = BatchOrder(len(data.train), cfg.train.batch_size, cfg.train.data_seed)
    batches = [[data.train[i] for i in order.indices(s)] for s in range(steps)]
    rows_out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(factors) * len(eps_factors) * steps, desc="tune", dynamic_ncols=True)
    for f, e in [(f, e) for e in eps_factors for f in factors]:
        restart()
        o = copy.deepcopy(cfg.optim)
        o.lr = cfg.optim.lr * f
        o.eps = cfg.optim.eps * e
        opt = build_optimizer(o, named, model, masks=setup.masks)
        t0, status = time.perf_counter(), "ok"
        try:
            for batch in batches:
                closure = make_closure(setup.loaded, batch, cfg, device, objective)
                opt.step(closure)
                if bar is not None:
                    bar.update(1)
        except NonFiniteLossError:
            status = "non-finite loss"
        with torch.no_grad():
            after, chunk_losses = dev_losses() if status == "ok" else (float("nan"), [])
        if status == "ok" and not math.isfinite(after):
            status = "non-finite loss"
        elif status == "ok" and after >= before:
            status = "dev loss did not fall"
        rows_out.append({"lr": o.lr, "factor": f, "eps": o.eps, "eps_factor": e,
                         "dev_loss": after if math.isfinite(after) else None,
                         "dev_chunks": chunk_losses if math.isfinite(after) else None,
                         "status": status, "seconds": round(time.perf_counter() - t0, 1)})
        log.info("lr %.3g eps %.3g: dev loss %.4f -> %s (%s)", o.lr, o.eps, before, after, status)
    if bar is not None:
        bar.close()
    restart()
    best, reason = choose(before, rows_out, rule)
    reason += (f" (over {steps} steps of {cfg.train.batch_size} rows, dev loss on {len(probe)} dev rows in "
               f"{len(parts)} chunks; rule {rule})")
    return {"method": cfg.optim.method, "scheme": cfg.trainable.scheme, "task": cfg.task.name,
            "steps": steps, "dev_rows": len(probe), "split": {"train": cfg.task.train, "dev": cfg.task.dev,
                                                              "test": cfg.task.test, "seed": cfg.task.split_seed,
                                                              "eval_file": cfg.task.eval_file},
            "dev_loss_before": before, "rule": rule, "chunks": len(parts), "candidates": rows_out,
            "chosen_lr": best["lr"] if best else None, "chosen_eps": best["eps"] if best else None,
            "reason": reason, "caution": drift_caution(cfg.train.steps, steps, cfg.train.eval_every)}
