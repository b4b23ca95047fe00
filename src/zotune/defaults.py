"""Starting lr and eps for each method and trainable scheme, used when a recipe leaves them unset.

Why: a ZO run with a wrong lr moves nothing for hours, and the right lr differs by orders of
magnitude between methods (FZOO's normalised step against MeZO's gradient-sized one) and
between schemes (a LoRA factor or a prefix vector against a weight). The papers' defaults (MeZO
1e-6 for OPT-13B) are far too small for a 135 M model. Each entry here says where its value comes
from: ``measured`` entries are the dev-chosen values of a benchmark on SmolLM2-135M (SST-2, see
the ``evidence``); ``derived`` entries apply a measured ratio (another scheme, another method)
and are starting points only. For another model or task, ``zotune tune RECIPE`` probes the lr
on its dev rows: the larger the model, the smaller MeZO's best lr (its step grows with the
number of parameters), while FZOO's normalised step depends far less on the model.

    starting_point("fzoo", "lora")   # StartingPoint(lr=0.01, eps=0.01, evidence='measured: ...')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StartingPoint", "starting_point", "SCHEME_EPS"]


@dataclass(frozen=True)
class StartingPoint:
    """A learning rate and perturbation size, and where they come from."""

    lr: float
    eps: float
    evidence: str

    @property
    def measured(self) -> bool:
        return self.evidence.startswith("measured")


#: eps per scheme (MeZO's appendix: 1e-3 for weights, 1e-2 for LoRA, 1e-1 for prefix vectors,
#: whose entries are activations of order 1 rather than weights of order 1e-2). A prompt starts
#: from token embeddings, whose entries are about a tenth of the prefix's (rms 0.13 against 1.5 on
#: SmolLM2-135M, benchmarks/trainable_scale.py): a tenth of the prefix's eps
#: The normalisation gains (rms 0.37 on SmolLM2-135M, benchmarks/trainable_scale.py) are a quarter of
#: the prefix's entries: 1e-2, as LoRA's and the prompt's
#: The final norm's gains alone are larger (rms 1.83, benchmarks/trainable_scale.py): 1e-2 is half a percent of them, small enough for a
#: two-point difference and as the other gains'
SCHEME_EPS = {"full": 1e-3, "norms": 1e-2, "final_norm": 1e-2, "top_layers": 1e-3, "lora": 1e-2, "prefix": 1e-1, "prompt": 1e-2}

_CONV = "benchmarks/grids/sst2-convergence.yaml, docs/convergence.md"
_PROBES = "benchmarks/scheme_probes.sh, benchmarks/results/tune/"
_EQUAL = "benchmarks/grids/sst2-equal-time.yaml, docs/equal-time.md"

#: full fine-tuning lr per method, and its evidence
_FULL = {
    "mezo": (3e-5, f"measured: SST-2 dev sweep 1e-5 / 3e-5, 3 seeds ({_CONV})"),
    "fzoo": (1e-3, f"measured: SST-2 dev sweep 3e-4 / 1e-3 / 3e-3, 3 seeds ({_CONV})"),
    "population": (1e-4, f"measured: SST-2 dev sweep 3e-5 / 1e-4 ({_CONV})"),
    "sparse-mezo": (2e-5, f"measured: one lr on SST-2 ({_CONV}); moved dev 58 -> 62.5"),
    "hizoo": (1e-5, f"measured: one lr on SST-2 ({_CONV}); moved dev 58 -> 61.5"),
    "lozo": (1e-5, "measured: one lr on SST-2 (benchmarks/grids/smollm-results.yaml): test 58.0 -> 65.2 in 150 steps"),
    "fo-adam": (1e-5, f"measured: SST-2 ({_CONV}): test 84.25 after 100 steps"),
    "fo-sgd": (1e-3, "measured: SST-2 alignment study (docs/studies.md): test 70.5 after 60 steps"),
    # same estimate and step size as MeZO: MeZO's lr
    "zo-sgd-cons": (3e-5, "derived: MeZO's measured lr (same estimate and step)"),
    # one query per block: the estimate's noise is about 1 / B of a whole-model direction's, so B times
    # MeZO's lr keeps the noise per forward pass at MeZO's (a step costs 2 B forwards; B = 30-32 blocks,
    # one per layer, on SmolLM2-135M; tests/test_defaults.py). At MeZO's own lr 4 minutes moved nothing
    "zo-sgd-block": (3e-5 * 30, "derived: MeZO's measured lr x 30 blocks (one query per block: 1/30 of the "
                                "noise of a whole-model direction, tests/test_defaults.py); at MeZO's lr "
                                "it did not move SST-2 (docs/defaults.md)"),
    # per-example directions: the same expected step as MeZO's (E[g] = grad), with less noise
    "per-example": (3e-5, "derived: MeZO's measured lr (the same expected step; its noise is lower, "
                          "zotune.evaluation.PerExample)"),
    "per-example-lowrank": (5e-5, f"measured: SST-2 dev sweep 5e-5 / 1e-4 / 3e-4 over 250 steps ({_CONV}): 5e-5 "
                                  "the best dev (0.675; MeZO's 250-step accuracy at 100 / 100 / 150 forward passes on "
                                  "3 seeds, test 68.9 % mean), and held 0.61-0.675 dev over 30 minutes (589 steps, "
                                  f"test 71.5 %, {_EQUAL}); 1e-4 crossed it sooner but sank below zero-shot there"),
    "forward-grad": (3e-5, "derived: MeZO's measured lr (exact directional derivative, same step)"),
    # momentum's steady state is 1 / (1 - beta) = 10 estimates: a tenth of MeZO's lr
    "zo-sgd-momentum": (3e-6, "derived: MeZO's measured lr / 10 (momentum 0.9 sums ~10 estimates)"),
    # m / sqrt(v) of ZO estimates c z moves along g / ||g|| by about lr per step (E[c z] = g, rms(c z) ~ ||g||),
    # as sign(c) z does (by sqrt(2 / pi) lr), with a fifth of sign's noise: ZO-Sign's lr. FO-Adam's 1e-5
    # (whose exact gradients move along g by ~sqrt(2 d / pi) lr) did not move SST-2 in 4 minutes (docs/defaults.md)
    "zo-adam": (5e-4, "derived: ZO-Sign's lr (ZO-Adam moves along the gradient as fast per lr, tests/test_defaults.py); "
                      "FO-Adam's 1e-5 did not move SST-2 (docs/defaults.md)"),
    # sign(c) z moves a weight by lr E|z| = 0.8 lr; MeZO's c z by lr E|c| E|z|, with c ~ N(0, ||g||^2) and
    # ||g|| ~ 21 on SST-2 batches (benchmarks/grad_scale.py): the same movement as MeZO at 3e-5 needs 5e-4
    "zo-sgd-sign": (5e-4, "derived: the per-weight movement of MeZO at its measured lr (||g|| ~ 21 on SST-2, "
                          "benchmarks/grad_scale.py)"),
}

#: lr of a scheme over full fine-tuning's, for methods whose step is normalised (FZOO, Adam, sign:
#: measured with FZOO) and for those whose step is the gradient's size (MeZO and the rest: MeZO's
#: own grids, Table 15 of its paper: full 1e-6 / 1e-7, LoRA 1e-4 / 5e-5 on OPT; for the prefix, MeZO
#: measured here, 1e-2 over 3e-5: the grids' ~1e4x ratio gave 0.3, and 0.1 already never learned)
_MEZO_GRIDS = "MeZO's lr grids for OPT (its Table 15)"
#: MeZO's measured lr per scheme (evidence in _MEASURED below): its own starting points, and, over
#: its full fine-tuning lr, the ratio the other gradient-sized methods follow on that scheme
_MEZO = {"lora": 3e-3, "prefix": 1e-2, "norms": 3e-4, "final_norm": 3e-2, "prompt": 3e-3}


def _mezo_ratio(scheme: str) -> float:
    return _MEZO[scheme] / _FULL["mezo"][0]


_SCHEME_RATIO = {
    "lora": {"normalised": (10.0, f"measured: FZOO LoRA probe, 1e-2 over full's 1e-3 ({_PROBES})"),
             "gradient": (_mezo_ratio("lora"), f"measured: MeZO on LoRA, 3e-3 over full's 3e-5 ({_PROBES}; "
                                       f"{_MEZO_GRIDS} say ~100x too)")},
    "prefix": {"normalised": (100.0, f"measured: FZOO prefix probe, 0.1 over full's 1e-3 ({_PROBES})"),
               "gradient": (_mezo_ratio("prefix"), f"measured: MeZO on the prefix, 1e-2 over full's 3e-5 ({_EQUAL}; "
                                         f"{_MEZO_GRIDS} say ~1e4x, and 0.1 never learned here)")},
    # the gains' entries are a quarter of the prefix's (benchmarks/trainable_scale.py): a normalised step
    # scales with the entries' size, as for the prompt; MeZO's lr on the gains is measured
    "norms": {"normalised": (100.0 / 4, f"derived: FZOO's measured prefix ratio ({_PROBES}) / 4, the gains' entries "
                                        "being a quarter of the prefix's (benchmarks/trainable_scale.py)"),
              "gradient": (_mezo_ratio("norms"), f"measured: MeZO on the gains, 3e-4 over full's 3e-5 ({_CONV})")},
    # the final norm's gains (rms 1.83) are about a prefix's entries (rms 1.5): a normalised step as the prefix's.
    # A gradient-sized step is measured: MeZO's probe picked 3e-2 (100x all the gains' 3e-4: a two-point step's
    # noise grows with the entries it perturbs, 576 here against 35,136)
    "final_norm": {"normalised": (100.0, f"derived: FZOO's measured prefix ratio ({_PROBES}), the final norm's "
                                         "gains being about the size of the prefix's entries"),
                   "gradient": (_mezo_ratio("final_norm"), f"measured: MeZO on the final norm, 3e-2 over full's 3e-5 ({_PROBES})")},
    # the top layers' entries are full fine-tuning's own weights: a normalised step moves each entry as far
    # as in full fine-tuning. A gradient-sized step's noise grows with the entries perturbed (a two-point
    # estimate's variance is ~ d |g|^2): one layer of 30 perturbs a thirtieth of them
    "top_layers": {"normalised": (1.0, "derived: the same weights as full fine-tuning's, moved as far per step"),
                   "gradient": (30.0, "derived: one layer of SmolLM2-135M's 30 perturbs ~1/30 of full's entries, "
                                      "so ~30x the step keeps the estimate's noise per step")},
    # a prompt's entries are a tenth of a prefix's (benchmarks/trainable_scale.py): a normalised step
    # a tenth as long moves them as far relative to their size. MeZO's lr on the prompt is measured: the
    # square-of-the-size argument (a hundredth of the prefix's ratio, 1e-4) did not move SST-2 in 4 minutes
    "prompt": {"normalised": (10.0, f"derived: FZOO's measured prefix ratio ({_PROBES}) / 10, the prompt's "
                                    "entries being a tenth of the prefix's (benchmarks/trainable_scale.py)"),
               "gradient": (_mezo_ratio("prompt"), f"measured: MeZO on the prompt, 3e-3 over full's 3e-5 ({_CONV})")},
}
_NORMALISED = {"fzoo", "zo-adam", "zo-sgd-sign", "fo-adam"}

#: entries measured directly for a (method, scheme) other than full, overriding the ratios
_MEASURED = {
    ("fzoo", "lora"): StartingPoint(1e-2, 1e-2, f"measured: `zotune tune` on SST-2 dev, lr 1e-3 / 1e-2 / 1e-1 "
                                               f"({_PROBES})"),
    ("fzoo", "prefix"): StartingPoint(0.1, 1e-1, f"measured: `zotune tune` on SST-2 dev with the prefix from "
                                                f"real activations, lr 1e-3 / 1e-2 / 1e-1 ({_PROBES})"),
    ("mezo", "lora"): StartingPoint(_MEZO["lora"], 1e-2, f"measured: `zotune tune` on SST-2 dev picked 3e-3 of 1e-3 .. 0.1 "
                                               f"({_PROBES}, mezo-lora-wide): dev loss 0.938 -> 0.879 in 30 steps; "
                                               "1e-2 and above raised it (1.28-2.15)"),
    ("mezo", "prefix"): StartingPoint(_MEZO["prefix"], 1e-1, f"measured: 30-minute SST-2 runs chosen on dev ({_EQUAL}): "
                                                 "0.01 held 0.78-0.80 dev, 0.1 (its 30-step probe's pick) never learned"),
    ("mezo", "norms"): StartingPoint(_MEZO["norms"], 1e-2, f"measured: `zotune tune` on SST-2 dev picked 3e-4 of 1e-4 .. 1e-2 "
                                                 f"({_PROBES}); over 250 steps ({_CONV}) 3e-4 rose steadily to 0.62 dev, "
                                                 "1e-3 swung between 0.45 and 0.57"),
    ("mezo", "final_norm"): StartingPoint(_MEZO["final_norm"], 1e-2, f"measured: `zotune tune` on SST-2 dev picked 3e-2 of 1e-3 .. 0.1 "
                                                      f"({_PROBES}): dev loss 0.94 -> 0.55 in 30 steps (0.1: 0.54, within "
                                                      "one standard error)"),
    ("mezo", "prompt"): StartingPoint(_MEZO["prompt"], 1e-2, f"measured: `zotune tune` on SST-2 dev picked 3e-3 of 1e-4 .. 0.1 "
                                                  f"({_PROBES}); over 250 steps ({_CONV}) dev stayed at 0.52-0.56 for "
                                                  "150 steps, then rose to 0.63; test 58.0 -> 65.0 (p = 0.0013), 62.6 +- 2.1 "
                                                  "over 3 seeds (2 of 3 significant)"),
    ("mezo", "top_layers"): StartingPoint(3e-4, 1e-3, "measured: 2,000 cached steps on SST-2 dev "
                                                      "(benchmarks/results/head_cache_sweep_sst2_top_layers.json): 3e-4 rose "
                                                      "to 0.695 and held; 1e-3 peaked at 0.685 (step 1,000) and fell to 0.58"),
    ("fo-adam", "lora"): StartingPoint(1e-4, 1e-3, "measured: ZO-Bench studies' FO-Adam LoRA lr (docs/studies.md)"),
}


#: (method, scheme) whose estimate is another method's there: a prefix or a prompt is one tensor, so
#: ZO-SGD-Block's one block is MeZO's whole-model direction
_SAME_AS = {("zo-sgd-block", "prefix"): ("mezo", "one tensor, one block"),
            ("zo-sgd-block", "prompt"): ("mezo", "one tensor, one block")}
#: per-example directions take MeZO's step in expectation: MeZO's starting point on every scheme
_SAME_AS.update({("per-example", s): ("mezo", "the same expected step") for s in SCHEME_EPS})


def starting_point(method: str, scheme: str = "full") -> StartingPoint:
    """The lr and eps a run of ``method`` on ``scheme`` starts from when the recipe sets none."""
    if method not in _FULL:
        raise ValueError(f"no starting point for method {method!r}; known: {', '.join(sorted(_FULL))}")
    if scheme not in SCHEME_EPS:
        raise ValueError(f"unknown trainable scheme {scheme!r}; known: {', '.join(SCHEME_EPS)}")
    if (method, scheme) in _SAME_AS:
        other, why = _SAME_AS[(method, scheme)]
        start = starting_point(other, scheme)
        return StartingPoint(start.lr, start.eps, f"derived: {other}'s on {scheme} ({why}; "
                                                  f"{other}: {start.evidence})")
    if (method, scheme) in _MEASURED:
        return _MEASURED[(method, scheme)]
    lr, evidence = _FULL[method]
    eps = SCHEME_EPS[scheme]
    if scheme == "full":
        return StartingPoint(lr, eps, evidence)
    ratio, why = _SCHEME_RATIO[scheme]["normalised" if method in _NORMALISED else "gradient"]
    return StartingPoint(lr * ratio, eps, f"derived: full fine-tuning's lr x {ratio:g} ({evidence}; ratio {why})")
