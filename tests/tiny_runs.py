"""The tiny-model SST-2 run the training tests share: overrides for ``load_config`` that train a
random 2-layer model for a few steps on rows of the shared data (seconds, no real weights)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def tiny_sst2(scheme: str, *, dev: int = 16, test: int = 0, lr: float = 1e-2) -> list[str]:
    """Overrides of a tiny-llama SST-2 run training ``scheme`` (32 train rows, batches of 4)."""
    return [
        "model.name=tiny-llama", "task.name=sst2", "task.train=32", f"task.dev={dev}", f"task.test={test}",
        f"task.data_root={DATA}", "task.max_length=32", "train.batch_size=4", f"optim.lr={lr}", "optim.eps=1e-2",
        "train.progress=false", "train.tensorboard=false", "train.eval_batch_size=8", "train.eval_at_start=false",
        f"trainable.scheme={scheme}",
    ]


def straight_and_resumed(common: list[str], tmp_path: Path):
    """Run ``common`` for 6 steps straight, and for 3 then resumed to 6; returns (the straight run's
    last weights, the resumed run's, the straight run's folder) for bit-for-bit comparisons."""
    from safetensors.torch import load_file

    from zotune.config import load_config
    from zotune.train.loop import train

    straight, half = tmp_path / "straight", tmp_path / "half"
    train(load_config(None, common + ["train.steps=6", f"train.output_dir={straight}"]))
    train(load_config(None, common + ["train.steps=3", f"train.output_dir={half}"]))
    train(load_config(None, common + ["train.steps=6", f"train.output_dir={half}"]))
    return (load_file(str(straight / "ckpt-last" / "weights.safetensors")),
            load_file(str(half / "ckpt-last" / "weights.safetensors")), straight)


def tiny_setup(overrides: list[str], *extra: str):
    """(config, built run) of ``overrides`` plus ``extra``."""
    from zotune.config import load_config
    from zotune.train.loop import build

    cfg = load_config(None, list(overrides) + list(extra))
    return cfg, build(cfg)
