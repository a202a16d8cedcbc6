"""Model-level behaviour: attach by patterns, summary, budgets, freezing, optimiser, merge/detach, save/load, and
parity with Hugging Face peft (LoRA, DoRA, OFT, BOFT) including export to peft's adapter format."""

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import methods
from methods import checks

CONF = Path(__file__).parents[1] / "conf" / "method"
pytestmark = [  # peft's BOFT looks for its CUDA extension and falls back to one butterfly factor
    pytest.mark.filterwarnings("ignore:.*CUDA:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor to 1:UserWarning"),
]

Attention, Toy, toy, inputs = checks.Attention, checks.Toy, checks.toy, checks.inputs
METHODS = methods.available()


def call(check, arg) -> None:
    try:
        check(arg)
    except checks.Skipped as e:
        pytest.skip(str(e))


@torch.no_grad()
def perturb(model: nn.Module, scale: float = 0.1) -> None:
    checks.perturb(methods.trainable_parameters(model), scale)


ATTN = checks.ATTN


def test_attach_summary_freezes_and_targets_default_attention():
    model = toy()
    model.requires_grad_(True)  # attach freezes whatever arrives trainable
    info = methods.attach(model, "lora", rank=3)
    assert info == {
        "method": "lora",
        "variant": None,
        "hparams": {"rank": 3, "alpha": 3},
        "layers": ATTN,
        "trainable_params": 3 * ((16 + 16) * 6 + (24 + 16) * 2),
        "stored_params": 3 * ((16 + 16) * 6 + (24 + 16) * 2),
        "budget": None,
        "sizing": "hparams",
    }
    assert methods.summary(model) == info
    trainable = {id(p) for p in methods.trainable_parameters(model)}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == info["trainable_params"]
    assert isinstance(model.attn2.to_out[0], methods.Adapter) and isinstance(model.attn2.to_out[1], nn.Dropout)


def test_target_patterns():
    model = toy()
    assert methods.attach(model, "oft", ["to_k", "conv_in"])["layers"] == ["conv_in", "attn1.to_k", "attn2.to_k"]
    methods.detach(model)
    assert methods.attach(model, "oft", ["re:attn2\\.to_(q|v)"])["layers"] == ["attn2.to_q", "attn2.to_v"]
    methods.detach(model)
    assert methods.attach(model, "oft", "attn1.to_out.0")["layers"] == ["attn1.to_out.0"]
    methods.detach(model)
    with pytest.raises(methods.MethodError, match="match no module"):
        methods.attach(model, "lora", ["to_z"])
    with pytest.raises(methods.MethodError, match="'attn1' is a Attention"):
        methods.attach(model, "lora", ["attn1"])
    with pytest.raises(methods.MethodError, match=r"method.block_size: 5 does not divide d_in=16 of attn1.to_q"):
        methods.attach(model, "oft", block_size=5)
    assert not methods.adapters(model)  # nothing half-attached


def test_attaching_twice_is_an_error_naming_the_layer():
    model = toy()
    methods.attach(model, "lora")
    with pytest.raises(methods.MethodError) as info:
        methods.attach(model, "oft")
    assert "attn1.to_q already carries a lora adapter" in str(info.value) and "\n" not in str(info.value)


def formula_total(method: str, targets=None, **hp) -> int | None:
    """The toy model's total trainable count for explicit hyper-parameters (None where they are not valid)."""
    try:
        return methods.attach(toy(), method, targets, **hp)["trainable_params"]
    except methods.MethodError:
        return None


closest = checks.closest


@pytest.mark.parametrize("method", METHODS)
def test_budget_picks_the_size_closest_to_it(method):
    """Among the method's budget options (a budget-sized method), the one whose total is closest to the budget
    within +10%; a fixed-size method keeps its size, a reference method ignores the budget (methods.checks)."""
    call(checks.budget_sizing, method)


def test_budget_resolves_lora_alpha_to_the_chosen_rank():
    info = methods.attach(toy(), "lora", budget=2500)
    assert info["hparams"]["alpha"] == info["hparams"]["rank"]
    assert info["trainable_params"] == closest([formula_total("lora", rank=r) for r in range(1, 17)], 2500)


CHANNEL_METHODS = [n for n in METHODS if "conv_channels" in methods.registry.method_class(n).also_sized]


@pytest.mark.parametrize("method", CHANNEL_METHODS)
@pytest.mark.parametrize("budget", [1500, 3000])
def test_budget_gives_convolutions_blocks_of_whole_channels(method, budget):
    """Methods sized by `conv_channels` (OFT, Möbius): on a Conv2d a budget only chooses blocks of whole input
    channels (b a multiple of k·k): `conv_channels` for the convolutions, blocks/block_size for the Linear layers,
    the pair closest to the budget."""
    model = toy()  # conv_in: c_in = 4, 3×3 kernel, d_in = 36
    info = methods.attach(model, method, ATTN + ["conv_in"], budget=budget)
    j = info["hparams"]["conv_channels"]
    assert j in (1, 2, 4) and model.conv_in.hparams["block_size"] == 9 * j
    sizes = range(1, 25)
    linear = [{"block_size": b} for b in sizes] + [{"blocks": r} for r in sizes]
    totals = [t for t in (formula_total(method, ATTN + ["conv_in"], **o, conv_channels=c) for o in linear
                          for c in (1, 2, 4)) if t is not None]
    assert info["trainable_params"] == closest(totals, budget)


def test_budget_sizes_soda_by_its_kronecker_factors():
    """SODA's factor sizes are its size: the budget picks per-width triples (recorded in hparams.factors) and lands
    closer to it than the default least-Σk² factors."""
    default = methods.attach(toy(), "soda")["trainable_params"]
    info = methods.attach(toy(), "soda", budget=3 * default)
    assert set(info["hparams"]["factors"]) == {"16", "24"} and info["sizing"] == "budget"
    assert abs(info["trainable_params"] - 3 * default) < abs(default - 3 * default)
    explicit = methods.attach(toy(), "soda", factors=info["hparams"]["factors"])["trainable_params"]
    assert explicit == info["trainable_params"] <= 3.3 * default


def test_full_ignores_the_budget_and_says_so():
    model = toy()
    info = methods.attach(model, "full", budget=700)
    assert info["budget"] is None and info["sizing"] == "budget ignored"
    assert info["trainable_params"] == 6 * 16 * 16 + 2 * 16 * 24  # d_out·d_in per layer, biases frozen
    assert methods.attach(toy(), "full")["sizing"] == "fixed"
    with pytest.raises(methods.MethodError, match="method.budget: -3 must be a positive integer"):
        methods.attach(toy(), "full", budget=-3)


def test_budget_errors():
    with pytest.raises(methods.MethodError, match=r"method.budget: 10 is below the smallest lora \(rank=1: 272 "):
        methods.attach(toy(), "lora", budget=10)
    # a budget overrides the size in the method's yaml (rank: 2 here); a given alpha is kept. 1000: rank 3 is 816,
    # rank 4 is 1088, closer and within +10%
    info = methods.attach(toy(), "lora", budget=1000, rank=2, alpha=8)
    assert info["hparams"] == {"rank": 4, "alpha": 8} and info["trainable_params"] == 1088
    info = methods.attach(toy(), "oft", budget=200, blocks=4)  # blocks=4 would be 264
    assert info["trainable_params"] <= 220 and info["hparams"]["blocks"] != 4
    fixed = methods.attach(toy(), "svd_scaling")["trainable_params"]
    assert methods.attach(toy(), "svd_scaling", budget=fixed)["trainable_params"] == fixed
    assert methods.attach(toy(), "svd_scaling", budget=fixed)["sizing"] == "fixed"
    with pytest.raises(methods.MethodError, match=r"method.budget: 50 is below the smallest svd_scaling "
                                                  r"\(its fixed size: \d+ trainable parameters\)"):
        methods.attach(toy(), "svd_scaling", budget=50)
    with pytest.raises(methods.MethodError, match=r"method.budget: 50 is below the smallest soda \(factors="):
        methods.attach(toy(), "soda", budget=50)
    with pytest.raises(methods.MethodError, match="method.budget: -3 must be a positive integer"):
        methods.attach(toy(), "oft", budget=-3)


@pytest.mark.parametrize("method", METHODS)
def test_optimiser_steps_touch_only_adapters(method):
    call(checks.optimiser_steps_touch_only_adapters, method)


def test_soda_optimiser_is_one_object_with_a_riemannian_part():
    model = toy()
    methods.attach(model, "soda")
    opt = methods.optimizer(model, lr=1e-2, weight_decay=1e-4)
    kinds = sorted(type(p).__name__ for p in opt.parts)
    assert kinds == ["AdamW", "RiemannianAdam"]
    assert [g["weight_decay"] for g in opt.parts[0].param_groups] == [1e-4]
    assert [g["weight_decay"] for g in opt.parts[1].param_groups] == [0]
    twin = copy.deepcopy(model)
    twin_opt = methods.optimizer(twin, lr=1e-2, weight_decay=1e-4)
    image, context = inputs()
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad(set_to_none=True)
        m(image, context).square().mean().backward()
        o.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # a checkpoint round trip gives identical next steps
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer))
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad(set_to_none=True)
        m(image, context).square().mean().backward()
        o.step()
    for a, b in zip(methods.trainable_parameters(model), methods.trainable_parameters(twin)):
        assert torch.equal(a, b)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # a scheduler drives both parts
    assert all(g["lr"] == 5e-3 for part in opt.parts for g in part.param_groups)


def test_lr_multipliers():
    model = toy()
    methods.attach(model, "lora")
    b_before = [a.B.clone() for _, a in methods.adapters(model)]
    opt = methods.optimizer(model, lr=1e-2, lr_multipliers={"B": 0.0})
    image, context = inputs()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(image, context).square().mean().backward()
        opt.step()
    assert all(torch.equal(a.B, b) for (_, a), b in zip(methods.adapters(model), b_before))
    with pytest.raises(methods.MethodError, match=r"method.lr_multipliers: 'K' names no parameter of lora"):
        methods.optimizer(model, lr=1e-2, lr_multipliers={"K": 2.0})


def test_coft_projection_runs_after_every_step():
    model = toy()
    methods.attach(model, "oft", coft=True, eps=1e-3)
    opt = methods.optimizer(model, lr=0.1)
    image, context = inputs()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(image, context).square().mean().backward()
        opt.step()
    for _, a in methods.adapters(model):  # every block on its sphere ε·b²/√r: ‖Q‖_F = ε·b² (the OFT authors')
        q_norm = (2 * a.Q.square().sum()).sqrt()  # Frobenius norm of the block-diagonal skew Q
        radius = 1e-3 * a.hparams["block_size"] ** 2
        assert radius * 0.99 <= q_norm <= radius * (1 + 1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_detach(method):
    call(checks.merge_and_detach, method)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_reproduces_outputs_exactly(method):
    call(checks.save_load_exact, method)


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_is_one_line(method):
    call(checks.one_line_errors, method)


def test_save_records_the_method_and_shapes(tmp_path):
    model = toy()
    info = methods.attach(model, "oft", ATTN + ["conv_in"], blocks=4)
    methods.save(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert saved["method"] == "oft" and saved["hparams"] == info["hparams"]
    assert saved["layers"]["attn2.to_k"]["weight_shape"] == [16, 24]
    assert saved["layers"]["conv_in"]["weight_shape"] == [16, 4, 3, 3]


def test_adapter_file_holds_only_the_stored_parameters(tmp_path):
    from safetensors import safe_open

    for method in ("svd_scaling", "soda", "oft"):
        model = toy()
        info = methods.attach(model, method)
        methods.save(model, tmp_path / method)
        with safe_open(tmp_path / method / "adapter.safetensors", "pt") as f:
            keys = list(f.keys())
            assert sum(f.get_tensor(k).numel() for k in keys) == info["stored_params"]
        suffixes = {k.rsplit("attn1.to_q.", 1)[1] for k in keys if "attn1.to_q." in k}
        assert suffixes == {"svd_scaling": {"delta"}, "soda": {"delta", "K.0", "K.1", "K.2"}, "oft": {"Q"}}[method]


def test_load_into_other_shapes_is_a_clear_error(tmp_path):
    model = toy()
    methods.attach(model, "lora")
    methods.save(model, tmp_path)
    with pytest.raises(ValueError, match=r"layer attn1.to_q was saved for weight shape \(16, 16\), the model's is "
                                         r"\(32, 32\)"):
        methods.load(toy(dim=32), tmp_path)
    other = toy()
    methods.attach(other, "lora", rank=5)
    with pytest.raises(ValueError, match=r"layer attn1.to_q tensor A has shape \(4, 16\), the attached adapter's is "
                                         r"\(5, 16\)"):
        methods.load(other, tmp_path)
    oft = toy()
    methods.attach(oft, "oft")
    with pytest.raises(ValueError, match="holds lora on 8 layers, the model carries oft"):
        methods.load(oft, tmp_path)


def test_every_method_yaml_on_a_diffusers_unet():
    """conf/method/*.yaml, passed as Hydra passes them, on a small diffusers UNet2DConditionModel: identity at init,
    counts equal to the formulas, and one optimiser step with the yaml's lr and weight decay."""
    from diffusers import UNet2DConditionModel
    from omegaconf import OmegaConf

    sd15 = OmegaConf.load(CONF.parent / "model" / "sd15.yaml")  # the model a method's budget interpolates from
    configs = {p.stem: OmegaConf.merge({"model": sd15}, OmegaConf.load(p)) for p in CONF.glob("*.yaml")}
    assert sorted(configs) == sorted(methods.available() + ["none"])
    assert all(c.name == stem for stem, c in configs.items())

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=8, norm_num_groups=8,
    ).eval().requires_grad_(False)
    sample, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 48)
    with torch.no_grad():
        base = unet(sample, t, context).sample
    shapes = [m.weight.shape for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert any(s[1] == 48 for s in shapes)  # cross-attention: d_in ≠ d_out
    for method in methods.available():
        cfg = configs[method]
        info = methods.attach(unet, cfg.name, budget=cfg.budget, variant=cfg.variant, **cfg.hparams)
        assert len(info["layers"]) == len(shapes)
        if methods.registry.method_class(method).identity_at_init:  # else its paper's init (FourierFT)
            with torch.no_grad():
                assert (unet(sample, t, context).sample - base).abs().max() <= 1e-5, method
        opt = methods.optimizer(unet, lr=cfg.lr, weight_decay=cfg.weight_decay)
        unet(sample, t, context).sample.square().mean().backward()
        opt.step()
        assert (unet(sample, t, context).sample - base).abs().max() > 0
        held = sum(p.numel() for p in methods.trainable_parameters(unet))
        formula = sum(methods.registry.method_class(method).count(a.shape, a.hparams, a.variant)
                      for _, a in methods.adapters(unet))
        assert info["trainable_params"] == held == formula, method
        methods.detach(unet)


# --- Hugging Face peft: the reference implementation ------------------------------------------------------------

PARITY = [
    ("lora", {"rank": 3, "alpha": 6}, True),
    ("dora", {"rank": 3}, True),
    ("oft", {"blocks": 4}, False),
    ("oft", {"block_size": 4, "cayley": "neumann"}, False),
    ("oft", {"block_size": 4, "coft": True, "eps": 0.02}, False),  # peft gets eps·b² (its radius eps/√r)
    ("boft", {"block_size": 4, "factors": 1}, True),
]


@pytest.mark.parametrize("method,hp,with_conv", PARITY)
def test_parity_with_peft(method, hp, with_conv):
    from methods import reference

    model = toy()
    methods.attach(model, method, ATTN + (["conv_in"] if with_conv else []), **hp)
    perturb(model)
    if hp.get("coft"):
        for _, a in methods.adapters(model):
            a.project_()
    peft_model = reference.to_peft(model)
    image, context = inputs()
    model.train(), peft_model.train()
    ours, theirs = model(image, context), peft_model(image, context)
    assert (ours - theirs).abs().max() <= 1e-5
    ours.square().sum().backward()
    theirs.square().sum().backward()  # the same gradients (DoRA: the norm is a constant for both)
    state = reference.peft_state(model)
    grads = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if p.grad is not None}

    def close(ours_grad, theirs_grad):
        assert ours_grad.abs().max() > 0
        return (ours_grad - theirs_grad.reshape(ours_grad.shape)).abs().max() <= 1e-4 * (1 + ours_grad.abs().max())

    for n, a in methods.adapters(model):
        key = f"base_model.model.{n}."
        if method in ("lora", "dora"):
            assert close(a.A.grad, grads[key + "lora_A.weight"]) and close(a.B.grad, grads[key + "lora_B.weight"])
        if method == "dora":
            assert close(a.m.grad, grads[key + "lora_magnitude_vector.weight"])
        if method == "oft":
            sign = -1 if hp.get("cayley") == "neumann" else 1
            assert close(a.Q.grad, sign * grads[key + "oft_R.weight"])
        if method == "boft":  # peft's skew part 0.5 (M − Mᵀ) of a full matrix: d/d(upper) = 2 · dM(upper)
            b = hp["block_size"]
            rows, cols = torch.triu_indices(b, b, 1)
            assert close(a.Q.grad, 2 * grads[key + "boft_R"][..., rows, cols])
    assert len(state) == len(methods.adapters(model)) * {"lora": 2, "dora": 3, "oft": 1, "boft": 2}[method]


def test_oft_conv_parity_on_merged_weights():
    """peft's OFT on a Conv2d rotates unfolded patches and folds them back, which equals W Rᵀ only for 1×1 kernels;
    its merged weight is W Rᵀ, as ours."""
    from methods import reference

    model = toy()
    methods.attach(model, "oft", ["conv_in"], blocks=4)
    perturb(model)
    ours = model.conv_in.merged_weight().detach()
    merged = reference.to_peft(model).merge_and_unload()
    assert (merged.conv_in.weight - ours).abs().max() <= 1e-5
    torch.manual_seed(0)
    pointwise = nn.Sequential(nn.Conv2d(8, 6, 1)).eval()  # a 1×1 kernel: the unmerged forwards agree too
    methods.attach(pointwise, "oft", ["0"], blocks=4)
    perturb(pointwise)
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        assert (reference.to_peft(pointwise)(x) - pointwise(x)).abs().max() <= 1e-5


def test_peft_baseline_has_the_same_size():
    from methods import reference

    for method, hp in (("lora", {"rank": 3}), ("dora", {}), ("oft", {"blocks": 4})):
        ours = methods.attach(toy(), method, **hp)["trainable_params"]
        peft_model = reference.attach(toy(), method, **hp)
        assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == ours
    peft_model = reference.attach(toy(), "boft", block_size=4, factors=1)
    ours = methods.attach(toy(), "boft", block_size=4, factors=1)["trainable_params"]
    # peft stores full b×b matrices (m·d_in·b) and a per-output scale boft_s (d_out) where we store the triangles
    stored = sum(16 * 4 + 16 for _ in range(6)) + 2 * (24 * 4 + 16)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == stored
    assert ours == 6 * 16 * 3 // 2 + 2 * 24 * 3 // 2


@pytest.mark.parametrize("method,hp,with_conv", PARITY)
def test_export_to_peft_format_loads_in_peft(method, hp, with_conv, tmp_path):
    from peft import PeftModel

    from methods import reference

    model = toy()
    methods.attach(model, method, ATTN + (["conv_in"] if with_conv else []), **hp)
    perturb(model)
    if hp.get("coft"):
        for _, a in methods.adapters(model):
            a.project_()
    reference.export(model, tmp_path)
    loaded = PeftModel.from_pretrained(toy(), tmp_path)
    image, context = inputs()
    assert (loaded(image, context) - model(image, context)).abs().max() <= 1e-5


def test_export_boft_with_several_factors(tmp_path):
    from safetensors.torch import load_file

    from methods import reference

    model = toy()
    methods.attach(model, "boft", block_size=2, factors=3)
    reference.export(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOFT" and config["boft_n_butterfly_factor"] == 3
    assert config["boft_block_size"] == 2
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.attn2.to_k.boft_R"].shape == (3, 12, 2, 2)


def test_soda_factors_per_input_width_round_trip(tmp_path):
    model = toy()  # eval mode: the adapters follow the layers they replace
    info = methods.attach(model, "soda", ATTN, factors={16: [2, 2, 4], "24": [2, 3, 4]})
    assert info["hparams"] == {"factors": {"16": [2, 2, 4], "24": [2, 3, 4]}}
    assert not any(a.training for _, a in methods.adapters(model))
    assert [k.shape[0] for k in model.attn2.to_k.K] == [2, 3, 4]
    perturb(model)
    image, context = inputs()
    with torch.no_grad():
        out = model(image, context)
    methods.save(model, tmp_path)
    fresh = toy()
    assert methods.load(fresh, tmp_path) == info
    with torch.no_grad():
        assert torch.equal(fresh(image, context), out)


def test_peft_reference_refuses_what_peft_cannot_hold():
    """peft's config holds one block size (or r) for every layer and one COFT eps: OFT's conv_channels giving a
    convolution its own block size, and COFT over several block sizes, have no peft counterpart."""
    from methods import reference

    model = toy()
    methods.attach(model, "oft", ATTN + ["conv_in"], block_size=4, conv_channels=1)  # conv_in: b = 9
    with pytest.raises(methods.MethodError, match=r"method.conv_channels: 1 gives conv_in block size 9"):
        reference.to_peft(model)
    model = toy()
    methods.attach(model, "oft", blocks=2, coft=True)  # b = 8 and 12
    with pytest.raises(methods.MethodError, match=r"method.eps: .* with block sizes \[8, 12\] has no peft"):
        reference.to_peft(model)
