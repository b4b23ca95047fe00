import torch

from zotune import rng
from zotune.estimators import Direction, Gaussian


def test_derive_seed_is_deterministic_and_key_sensitive():
    assert rng.derive_seed(7, 1, 2, 3) == rng.derive_seed(7, 1, 2, 3)
    seeds = {rng.derive_seed(7, 1, step, 0) for step in range(1000)}
    assert len(seeds) == 1000
    assert rng.derive_seed(7, 1, 2) != rng.derive_seed(7, 2, 1)
    assert rng.derive_seed(7, 1) != rng.derive_seed(8, 1)


def test_leaf_direction_regenerates_alone_in_any_order():
    params = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(2, 2)]
    est = Gaussian()
    est.bind(["a", "b", "c"], params, run_seed=11)
    d = Direction(step=4, query=0)
    forward = [est.full_direction(d, i, p) for i, p in enumerate(params)]
    backward = [est.full_direction(d, i, p) for i, p in reversed(list(enumerate(params)))][::-1]
    for a, b in zip(forward, backward):
        assert torch.equal(a, b)
    assert not torch.equal(forward[0], est.full_direction(Direction(5, 0), 0, params[0]))


def test_optimizer_never_touches_global_rng():
    import zotune

    w = torch.nn.Parameter(torch.zeros(4))
    opt = zotune.MeZO([w], lr=1e-3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    opt.step(lambda: (w - 1).pow(2).sum())
    assert torch.equal(torch.rand(3), expected)
