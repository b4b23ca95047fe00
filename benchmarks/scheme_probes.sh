#!/usr/bin/env bash
# The lr probes behind the LoRA / prefix / prompt starting points (src/zotune/defaults.py) and the
# cross-task grid's per-scheme lr (benchmarks/grids/cross-task.yaml): `zotune tune` on SST-2's dev
# rows (never test), SmolLM2-135M, FZOO and MeZO, each candidate lr trained from the same weights;
# then per-task probes of the prefix's lr on each task's own dev rows (the task-* names).
# One probe at a time (2 cores); each writes its JSON answer to benchmarks/results/tune/.
#   bash benchmarks/scheme_probes.sh [NAME ...]   # default: all
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/tune
mkdir -p "$out"
common=(model.name=smollm2-135m train.batch_size=16 train.progress=false)
# the grids' SST-2 split sizes: test rows are carved first (SST-2/dev.tsv is never used implicitly),
# then dev, so these probes read the grids' dev rows. Before 2026-12-03 they ran with test=0 and so
# read the grids' test rows (benchmarks/results/tune/split-leak/README.md)
sst2=(task.name=sst2 task.train=1000 task.dev=200 task.test=400 task.max_length=64)
probe() {  # name steps factors overrides...
  local name=$1 steps=$2 factors=$3; shift 3
  if [[ -s "$out/$name.json" ]]; then echo "$name: done already ($out/$name.json)"; return; fi
  echo "== $name"
  local rc=0
  zotune tune "${common[@]}" "$@" --steps "$steps" --factors "$factors" > "$out/$name.json.tmp" || rc=$?
  # exit 3: no candidate lowered the dev loss (the JSON says so); anything else is an error
  if [[ $rc -ne 0 && $rc -ne 3 ]]; then rm -f "$out/$name.json.tmp"; echo "$name failed ($rc)"; return $rc; fi
  mv "$out/$name.json.tmp" "$out/$name.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['reason'])" "$out/$name.json"
}
want() { [[ ${#names[@]} -eq 0 ]] || [[ " ${names[*]} " == *" $1 "* ]]; }
names=("$@")
want fzoo-lora   && probe fzoo-lora 10 1,10,100 "${sst2[@]}" optim.method=fzoo optim.lr=1e-3 optim.eps=1e-2 trainable.scheme=lora
want fzoo-prefix && probe fzoo-prefix 10 1,10,100 "${sst2[@]}" optim.method=fzoo optim.lr=1e-3 optim.eps=1e-1 trainable.scheme=prefix
# the prefix probe picked its grid's top (0.1): the next decade up
want fzoo-prefix-wide && probe fzoo-prefix-wide 10 1,3,10 "${sst2[@]}" optim.method=fzoo optim.lr=1e-1 optim.eps=1e-1 trainable.scheme=prefix
# with the init seeded (the two probes above drew their prefixes from the global RNG), over 20 steps:
# the 0.3 chosen at 10 steps oscillated around 50 % dev in the 56-step cross-task run
want fzoo-prefix-20 && probe fzoo-prefix-20 20 0.1,0.3,1 "${sst2[@]}" optim.method=fzoo optim.lr=3e-1 optim.eps=1e-1 trainable.scheme=prefix
# prefix from real activations (zotune train's init since 2026-12-03): the probes above started from
# peft's random prefix, which raised the dev loss from 1.22 to 1.67 before any step
want fzoo-prefix-act && probe fzoo-prefix-act 10 0.1,1,10 "${sst2[@]}" optim.method=fzoo optim.lr=1e-2 optim.eps=1e-1 trainable.scheme=prefix
want fzoo-prompt && probe fzoo-prompt 10 1,10,100 "${sst2[@]}" optim.method=fzoo optim.lr=1e-3 optim.eps=1e-1 trainable.scheme=prompt
want mezo-lora   && probe mezo-lora 30 1,10,100 "${sst2[@]}" optim.method=mezo optim.lr=3e-5 optim.eps=1e-2 trainable.scheme=lora
want mezo-prefix && probe mezo-prefix 30 1,10,100 "${sst2[@]}" optim.method=mezo optim.lr=3e-5 optim.eps=1e-1 trainable.scheme=prefix
want mezo-prompt && probe mezo-prompt 30 1,10,100 "${sst2[@]}" optim.method=mezo optim.lr=3e-5 optim.eps=1e-1 trainable.scheme=prompt
# per task, the prefix (from real activations) at 0.03 .. 1 around SST-2's 0.1, on the task's own dev
# rows with the cross-task grid's split sizes: the classification tasks did not move at SST-2's lr.
# The test size must be the grid's too: these tasks carve test first, then dev, so another test
# size would shift the dev rows (test=0 would make them the grid's test rows). tune never reads test.
# in the order of their re-balancing room on dev (benchmarks/task_scan.py): RTE 44 -> 57, MNLI 44 -> 52,
# COPA 63 -> 69, WiC 51 -> 58; WSC and WinoGrande have none (54 -> 54, 52 -> 53)
prefix=(optim.method=fzoo optim.lr=1e-1 optim.eps=1e-1 trainable.scheme=prefix)
want task-rte        && probe task-rte 10 0.3,1,3,10 task.name=rte task.test=300 task.train=1000 task.dev=100 "${prefix[@]}"
want task-mnli       && probe task-mnli 10 0.3,1,3,10 task.name=mnli task.test=500 task.train=1000 task.dev=100 "${prefix[@]}"
want task-copa       && probe task-copa 10 0.3,1,3,10 task.name=copa task.test=100 task.train=250 task.dev=50 "${prefix[@]}"
want task-wic        && probe task-wic 10 0.3,1,3,10 task.name=wic task.test=500 task.train=1000 task.dev=100 "${prefix[@]}"
want task-wsc        && probe task-wsc 10 0.3,1,3,10 task.name=wsc task.test=200 task.train=304 task.dev=50 "${prefix[@]}"
want task-winogrande && probe task-winogrande 10 0.3,1,3,10 task.name=winogrande task.test=500 task.train=1000 task.dev=100 "${prefix[@]}"
# 2026-12-03 (fifth session): MNLI with the infer template (one shared context, one-token answers:
# a third of the LM-BFF template's forward cost), a decade around the other tasks' 0.03-0.1
want task-mnli-infer && probe task-mnli-infer 10 0.1,0.3,1,3 task.name=mnli task.template=infer task.test=500 task.train=1000 task.dev=100 "${prefix[@]}"
# MeZO on the prefix from real activations (the mezo-prefix probe above ran from peft's random prefix,
# and at 3e-5 .. 3e-3): its step shrinks with the loss differences, where FZOO's normalised step
# keeps its length and drifted on SST-2 after step 60 (docs/equal-time.md)
want mezo-prefix-act && probe mezo-prefix-act 30 1,10,100 "${sst2[@]}" optim.method=mezo optim.lr=1e-3 optim.eps=1e-1 trainable.scheme=prefix
# a first-order reference: can the prefix learn WiC at all in 10 steps? (FO-Adam; none of 1e-3 .. 0.1
# lowered WiC's dev loss, where FO-Adam on all weights moves WiC in 100 steps)
want task-wic-fo-adam-prefix && probe task-wic-fo-adam-prefix 10 0.1,1,10 task.name=wic task.test=500 task.train=1000 task.dev=100 optim.method=fo-adam optim.lr=1e-2 trainable.scheme=prefix
# mezo-prefix-act picked its grid's top (0.1; dev loss 0.975 -> 0.786, 0.01 gave 0.799): the next half decade up
want mezo-prefix-act-wide && probe mezo-prefix-act-wide 30 1,3,10 "${sst2[@]}" optim.method=mezo optim.lr=1e-1 optim.eps=1e-1 trainable.scheme=prefix
# 2026-12-04: the same probe with the half decades between, picked by the one-standard-error rule
# (zotune tune's default since): at equal time 0.1 never learned and 0.01 reached 77.75 % test
want mezo-prefix-act-onese && probe mezo-prefix-act-onese 30 1,3,10,30,100 "${sst2[@]}" optim.method=mezo optim.lr=1e-3 optim.eps=1e-1 trainable.scheme=prefix
# 2026-12-04 (tenth session): MeZO on the normalisation gains (trainable.scheme=norms, 35,136 entries),
# around the derived starting point (6.25e-4: the prefix's measured ratio scaled by the gains' size)
want mezo-norms && probe mezo-norms 30 1,3,10,30,100 "${sst2[@]}" optim.method=mezo optim.lr=1e-4 optim.eps=1e-2 trainable.scheme=norms
# 2026-12-05 (fourteenth session): the final norm's gains alone (trainable.scheme: final_norm, 576 entries: a linear
# probe on the last hidden state through the frozen head); the decade around the derived start (all gains' 3e-4 x 61)
want mezo-final-norm && probe mezo-final-norm 30 1,3,10,30,100 "${sst2[@]}" optim.method=mezo optim.lr=1e-3 optim.eps=1e-2 trainable.scheme=final_norm
# 2026-12-04 (eleventh session): MeZO on the prompt (10 tokens from sampled vocabulary, 5,760 entries of
# rms 0.125). No ZO run moved SST-2 on it in 4 minutes (docs/defaults.md, derived lrs), while FO-Adam on
# the same prompt reached 0.725 dev in 20 steps: the lr, not the prompt, is in question. Three decades
want mezo-prompt-vocab && probe mezo-prompt-vocab 30 1,3,10,30,100,300,1000 "${sst2[@]}" optim.method=mezo optim.lr=1e-4 optim.eps=1e-2 trainable.scheme=prompt
# 2026-12-05 (sixteenth session): per-example directions on the prefix, the same probe as mezo-prefix-act-onese
# (the same expected step as MeZO's with a third of its noise: does the probe pick the same lr?)
want per-example-prefix && probe per-example-prefix 30 1,3,10,30,100 "${sst2[@]}" optim.method=per-example optim.lr=1e-3 optim.eps=1e-1 trainable.scheme=prefix
# 2026-12-06 (twenty-first session): MeZO on LoRA. Its starting point (3e-3) is derived from MeZO's OPT grids
# (LoRA ~100x full) and only just moved SST-2 in 4 minutes (docs/defaults.md: 61.3, p = 0.024); the other
# gradient-sized methods' LoRA lrs follow the same ratio and did not move. Two decades around it
want mezo-lora-wide && probe mezo-lora-wide 30 1,3,10,30,100 "${sst2[@]}" optim.method=mezo optim.lr=1e-3 optim.eps=1e-2 trainable.scheme=lora
