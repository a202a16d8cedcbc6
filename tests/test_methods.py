"""Layer-level properties of every method: identity at init, merged == unmerged, parameter counts, orthogonality,
norm preservation, gradients, the butterfly and Kronecker constructions, and hyper-parameter errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods
from methods import checks
from methods.linalg import cayley, skew
from methods.boft import butterfly_permutation
from methods.soda import default_factors, kron_apply


LAYERS = checks.LAYERS
CASES = checks.layer_cases()  # every registered method: each of its examples (and variants) on each layer it adapts


def call(check, arg) -> None:
    try:
        check(arg)
    except checks.Skipped as e:
        pytest.skip(str(e))


def make(name: str, layer_key: str, example: str = "default", seed: int = 0, **hparams):
    """(layer, adapter, input) for one of the method's examples (or, given hparams, for those)."""
    if not hparams:
        return checks.make(checks.Case(name, example, layer_key), seed)
    torch.manual_seed(seed)
    layer_fn, x_fn = LAYERS[layer_key]
    layer = layer_fn()
    return layer, methods.create(name, layer, layer_name=layer_key, **hparams), x_fn()


frozen_forward = checks.frozen_forward
COFT = methods.registry.method_class("oft").examples["coft"]


def perturb(adapter: methods.Adapter, scale: float = 0.3) -> None:
    checks.perturb(adapter.adapter_state().values(), scale)


def test_the_cases_cover_every_method_example_and_layer_kind():
    for name in methods.available():
        cls = methods.registry.method_class(name)
        mine = [c for c in CASES if c.method == name]
        assert {c.example for c in mine} == set(cls.examples), name
        assert {checks.kind_of(LAYERS[c.layer][0]()) for c in mine} == set(cls.kinds), name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_identity_at_init(case):
    call(checks.identity_at_init, case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_merged_equals_unmerged_after_perturbation(case):
    call(checks.merged_equals_unmerged, case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_trainable_count_is_the_formula(case):
    call(checks.count_is_formula, case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_reach_only_adapter_parameters(case):
    call(checks.gradients_reach_only_adapters, case)


def test_eval_cache_is_reused_and_invalidated():
    layer, adapter, x = make("oft", "linear24to40")
    adapter.eval()
    with torch.no_grad():
        w1 = adapter.merged_weight()
        assert adapter.merged_weight() is w1  # cached
        y1 = adapter(x)
        adapter.Q.add_(0.1)  # an in-place change (as an optimiser step) invalidates the cache
        y2 = adapter(x)
        assert adapter.merged_weight() is not w1
        assert (y2 - y1).abs().max() > 1e-4
        assert (y2 - frozen_forward(layer, x, adapter.adapted_weight())).abs().max() <= 1e-5
    adapter.train()
    assert adapter._cache is None
    adapter.eval()
    y3 = adapter(x)  # grad enabled and parameters trainable: no cache, gradients flow
    assert y3.requires_grad and adapter._cache is None


@pytest.mark.parametrize("layer_key", LAYERS)
def test_rotations_stay_orthogonal_after_optimiser_steps(layer_key):
    for case, name, example in (("oft", "oft", "default"), ("boft", "boft", "block4"), ("soda", "soda", "default"),
                                ("coft", "oft", "coft")):
        layer, adapter, x = make(name, layer_key, example)
        opt = methods.optimizer(adapter, lr=0.05)
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            (adapter(x) - 1).square().mean().backward()
            opt.step()
        eye = torch.eye(adapter.shape.d_in)
        if case in ("oft", "coft"):
            r = adapter.rotation()
            assert (r @ r.mT - torch.eye(r.shape[-1])).abs().max() <= 1e-5
            assert adapter.Q.abs().max() > 0
        if case == "coft":  # every block inside ε·b²/√r (the OFT authors' radius), so ‖Q‖_F ≤ ε·b², and active
            b = adapter.hparams["block_size"]
            q = skew(adapter.Q, b)
            block_norms = q.flatten(1).norm(dim=1)
            radius = COFT["eps"] * b**2 / math.sqrt(q.shape[0])
            assert block_norms.max() <= radius * (1 + 1e-5)
            assert block_norms.max() >= radius * (1 - 1e-3)
            assert q.flatten().norm() <= COFT["eps"] * b**2 * (1 + 1e-5)
        if case == "boft":
            dense = adapter.butterfly(eye)
            assert (dense @ dense.T - eye).abs().max() <= 1e-5
            assert adapter.Q.abs().max() > 0
        if case == "soda":
            for k in adapter.K:
                assert (k @ k.T - torch.eye(k.shape[0])).abs().max() <= 1e-5
            dense = kron_apply(eye, list(adapter.K))
            assert (dense @ dense.T - eye).abs().max() <= 1e-5
            assert max((k - torch.eye(k.shape[0])).abs().max() for k in adapter.K) > 1e-3
            assert adapter.delta.abs().max() > 0


def test_coft_at_the_papers_eps_moves_the_weight():
    """COFT in the OFT authors' convention (Zeju1997/oft: radius ε·b²/√r per block): at the papers' ε = 6e-5 and
    DreamBooth lr (6e-5 × the micro task's lr_scale 30) a few steps towards a random target move W measurably,
    every block stays inside its ball, and the ball is what stops it. At peft 0.21's radius ε/√r (b² = 576 times
    smaller here) the same rotation would leave W practically frozen."""
    torch.manual_seed(0)
    layer = nn.Linear(96, 96)
    eps, b, r = 6e-5, 24, 4
    adapter = methods.create("oft", layer, blocks=r, coft=True, eps=eps)
    x, target = torch.randn(64, 96), torch.randn(64, 96)
    opt = methods.optimizer(adapter, lr=6e-5 * 30)
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(adapter(x), target).backward()
        opt.step()
    w = layer.weight.detach()
    moved = ((adapter.merged_weight().detach() - w).norm() / w.norm()).item()
    assert moved >= 1e-3
    radius = eps * b**2 / math.sqrt(r)
    norms = skew(adapter.Q, b).detach().flatten(1).norm(dim=1)
    assert norms.max() <= radius * (1 + 1e-5) and norms.min() >= radius * (1 - 1e-3)  # all on the sphere
    with torch.no_grad():  # the same Q shrunk onto peft's ball
        adapter.Q.div_(b**2)
    assert ((adapter.merged_weight().detach() - w).norm() / w.norm()).item() <= moved / 100


CHANNEL_EXAMPLES = [(name, example) for name in methods.available()
                    for example, hp in methods.registry.method_class(name).examples.items() if hp.get("conv_channels")]


@pytest.mark.parametrize("name,example", CHANNEL_EXAMPLES)
def test_conv_blocks_cover_whole_input_channels(name, example):
    """With conv_channels = j a convolution's rotation acts within groups of j whole input channels (PyTorch
    flattens a kernel channel-major): changing W on one channel changes W' on that channel's group only."""
    j = methods.registry.method_class(name).examples[example]["conv_channels"]
    layer, adapter, _ = make(name, "conv8to6k3", example)
    assert adapter.hparams["block_size"] == j * 3 * 3 and adapter.hparams["blocks"] == 8 // j
    perturb(adapter, scale=1.0)
    before = adapter.merged_weight().detach().clone()
    with torch.no_grad():
        layer.weight[:, 5].add_(torch.randn(6, 3, 3))  # channel 5: group 5 // j
    changed = (adapter.merged_weight().detach() - before).abs().amax(dim=(0, 2, 3)) > 1e-6
    group = torch.arange(8) // j == 5 // j
    assert torch.equal(changed, group)


@pytest.mark.parametrize("layer_key", LAYERS)
def test_mobius_keeps_every_block_norm_and_contains_oft(layer_key):
    layer, adapter, _ = make("mobius", layer_key)
    perturb(adapter, scale=1.0)
    n, b = adapter.hparams["blocks"], adapter.hparams["block_size"]
    w = layer.weight.detach().reshape(layer.weight.shape[0], n, b)
    w_new = adapter.merged_weight().detach().reshape(w.shape)
    assert (w_new.norm(dim=-1) - w.norm(dim=-1)).abs().max() <= 1e-5
    # the boost changes angles between neurons (unlike a rotation): cosines within a block are not kept
    cos = lambda t: F.normalize(t[:, 0], dim=-1) @ F.normalize(t[:, 0], dim=-1).T  # noqa: E731
    assert (cos(w_new) - cos(w)).abs().max() > 1e-3
    # with the boost at zero it is exactly OFT with the same Q
    with torch.no_grad():
        adapter.boost.v.zero_()
    oft = methods.create("oft", layer, block_size=b)
    with torch.no_grad():
        oft.Q.copy_(adapter.Q)
    assert (adapter.merged_weight() - oft.merged_weight()).abs().max() <= 1e-5


def test_conformal_boost_maps_the_sphere_onto_itself():
    boost = methods.mobius.ConformalBoost(3, 5)
    with torch.no_grad():
        boost.v.copy_(torch.randn(3, 5) * 3)  # large v: ‖a‖ close to 1, still inside the ball
    u = F.normalize(torch.randn(100, 3, 5), dim=-1)
    assert (boost(u).norm(dim=-1) - 1).abs().max() <= 1e-5


def test_cayley_exact_and_neumann():
    torch.manual_seed(0)
    q = skew(0.05 * torch.randn(6, 10), 5)
    r = cayley(q)
    assert (r @ r.mT - torch.eye(5)).abs().max() <= 1e-6
    dense = (torch.eye(5) - q) @ torch.linalg.inv(torch.eye(5) + q)  # the definition, for the test only
    assert (r - dense).abs().max() <= 1e-6
    errors = [(cayley(q, n) - r).abs().max().item() for n in (1, 2, 4, 16)]
    assert errors == sorted(errors, reverse=True) and errors[-1] <= 1e-6
    assert torch.equal(cayley(torch.zeros(2, 4, 4)), torch.eye(4).expand(2, 4, 4))


def peft_dense_butterfly(rotations: torch.Tensor, d: int, b: int) -> torch.Tensor:
    """BOFT's dense construction, with peft's own permutation: R = Π_i P_i blockdiag(R_i) P_iᵀ (last factor left)."""
    from peft.tuners.boft.layer import BOFTLayer

    m = rotations.shape[0]
    out = torch.eye(d)
    for i in range(m):
        perm = BOFTLayer.block_butterfly_perm(None, d, (d // b) // 2**i, b // 2, m - 1)
        p = BOFTLayer.perm2mat(None, perm)
        out = p @ torch.block_diag(*rotations[i]) @ p.T @ out
    return out


@pytest.mark.parametrize("d,b,m", [(16, 2, 4), (32, 4, 3), (24, 2, 3), (72, 4, 2), (512, 128, 3)])
def test_butterfly_matches_the_dense_construction(d, b, m):
    torch.manual_seed(0)
    layer = nn.Linear(d, 5)
    adapter = methods.create("boft", layer, block_size=b, factors=m)
    assert adapter.dense == (d != 512)  # W Rᵀ with R's chunk blocks; 512 chunks of 512: factor by factor
    perturb(adapter)
    dense = peft_dense_butterfly(adapter.rotations().detach(), d, b)
    assert (adapter.butterfly(torch.eye(d)) - dense).abs().max() <= 1e-5
    assert (adapter.merged_weight() - layer.weight @ dense.T).abs().max() <= 1e-5
    assert all(t.dim() == 1 for n, t in adapter.named_buffers() if not n.startswith("base."))  # indices, no P matrix


def test_butterfly_mixes_everything_with_log_factors():
    torch.manual_seed(0)
    d, b = 16, 2  # 8 blocks: 1 + log2(8) = 4 factors make R dense, 3 do not
    for m, dense_expected in ((4, True), (3, False)):
        adapter = methods.create("boft", nn.Linear(d, d), block_size=b, factors=m)
        perturb(adapter)
        r = adapter.butterfly(torch.eye(d)).detach()
        assert bool((r.abs() > 1e-9).all()) == dense_expected
    # each factor's permutation pairs half-blocks 2^i apart
    assert butterfly_permutation(8, 2, 1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert butterfly_permutation(8, 2, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# sizes: all multiplied out (2·3·4 ≤ 128); a wide slice product, then a narrow one (2·2·70); none merged (16·20 > 128)
@pytest.mark.parametrize("sizes", [(2, 3, 4), (2, 2, 70), (4, 16, 20)])
def test_kronecker_apply_matches_torch_kron(sizes):
    torch.manual_seed(0)
    ks = [torch.randn(k, k) / k**0.5 for k in sizes]
    dense = torch.kron(torch.kron(ks[0], ks[1]), ks[2])
    x = torch.randn(5, 7, dense.shape[0])
    assert (kron_apply(x, ks) - x @ dense).abs().max() <= 1e-4
    assert (kron_apply(x, ks, transpose=True) - x @ dense.T).abs().max() <= 1e-4
    batched = [torch.stack([k, 2 * k]) for k in ks]  # factors (N, k, k): the i-th set applies to x[i]
    out = kron_apply(x[:2], batched)
    assert (out[0] - x[0] @ dense).abs().max() <= 1e-4 and (out[1] - 8 * x[1] @ dense).abs().max() <= 1e-3


def test_soda_default_factors():
    paper = {640: [8, 8, 10], 768: [6, 8, 16], 1280: [4, 16, 20], 2048: [4, 8, 64]}
    for d, f in paper.items():
        assert default_factors(d) == f
    least = {16: [2, 2, 4], 24: [2, 3, 4], 32: [2, 4, 4], 72: [3, 4, 6]}  # least Σk² triples
    for d, f in {**least, 96: [4, 4, 6], 128: [4, 4, 8], 7: [1, 1, 7]}.items():
        assert default_factors(d) == f and math.prod(f) == d
    adapter = methods.create("soda", nn.Linear(96, 8), factors={96: [2, 6, 8]})
    assert [k.shape[0] for k in adapter.K] == [2, 6, 8]


def test_svd_factors_are_recomputed_not_stored():
    _, adapter, _ = make("soda", "linear24to40")
    assert set(adapter.adapter_state()) == {"delta", "K.0", "K.1", "K.2"}
    assert set(adapter.state_dict()) - {"base.weight", "base.bias"} == {"delta", "K.0", "K.1", "K.2"}


LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def error(name, layer=None, **hp) -> str:
    with pytest.raises(methods.MethodError) as info:
        methods.create(name, layer if layer is not None else nn.Linear(96, 96), layer_name=LAYER, **hp)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    return message


def test_bad_hyper_parameters_raise_one_clear_line():
    assert error("oft", block_size=7) == (
        f"method.block_size: 7 does not divide d_in=96 of {LAYER} (allowed: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96)"
    )
    assert "'nope' is not a registered method" in error("nope") and "lora" in error("nope")
    for rank in (0, -2):
        m = error("lora", rank=rank)
        assert m.startswith(f"method.rank: {rank} ") and LAYER in m
    m = error("dora", rank=1.5)
    assert m.startswith("method.rank: 1.5") and LAYER in m
    m = error("oft", blocks=5)
    assert m.startswith("method.blocks: 5 does not divide d_in=96") and LAYER in m
    m = error("mobius", block_size=7)
    assert m.startswith("method.block_size: 7 does not divide d_in=96") and LAYER in m
    m = error("boft", block_size=5)
    assert m.startswith("method.block_size: 5 does not divide d_in=96") and LAYER in m
    m = error("boft", block_size=3, factors=2)
    assert "factors=2" in m and "d_in=96" in m and "(allowed: 2, 4, 6, 8, 12, 16, 24, 48)" in m
    m = error("soda", factors=[4, 4, 4])
    assert m.startswith("method.factors: [4, 4, 4] multiply to 64, not d_in=96") and LAYER in m and "[4, 4, 6]" in m
    m = error("oft", cayley="pade")
    assert "'pade'" in m and "'exact', 'neumann'" in m
    m = error("lora", rnak=4)
    assert m.startswith("method.rnak: 4 is not a hyper-parameter of lora") and "alpha, rank" in m
    assert "block_size" in error("oft", blocks=4, block_size=8)
    assert "not a variant of lora" in error("lora", variant="x")
    assert "'conformal'" in error("mobius", variant="paper")
    m = error("lora", layer=nn.Embedding(4, 4))
    assert "Embedding" in m and "nn.Linear" in m
    assert "grouped Conv2d" in error("lora", layer=nn.Conv2d(4, 4, 3, groups=2))
    m = error("oft", layer=nn.Conv2d(6, 4, 3), conv_channels=4)
    assert m == f"method.conv_channels: 4 does not divide c_in=6 of {LAYER} (allowed: 1, 2, 3, 6)"
    m = error("boft", layer=nn.Conv2d(4, 4, 3), factors=2, conv_block_size=9)
    assert m.startswith("method.conv_block_size: 9 with factors=2 needs an even b") and "d_in=36" in m
