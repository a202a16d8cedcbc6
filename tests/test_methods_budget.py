"""One budget on the micro model (DESIGN §2.2): every method whose family can reach `model.method_budget` lands
within ±10% of it on the micro model's target layers, methods sized by `conv_channels` (OFT, Möbius) give
convolutions blocks of whole input channels, the ones that cannot reach it are identifiable from the summary, and
docs/methods.md's table holds the counts an attach gives. Every registered method is covered; none is named in a
generic test."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import methods

ROOT = Path(__file__).parents[1]
MICRO = OmegaConf.load(ROOT / "conf" / "model" / "micro.yaml")
BUDGET = MICRO.method_budget
METHODS = methods.available()


def targets(name: str) -> list[str]:
    """micro's targets, the attention projections alone for a method that adapts no Conv2d (peft's Linear-only
    tuners; on the resnet convolutions they stop with one line, tests/test_cli.py)."""
    if "conv2d" in methods.registry.method_class(name).kinds:
        return list(MICRO.target_modules)
    return [t for t in MICRO.target_modules if not t.startswith("conv")]


def method_yaml(name: str) -> dict:
    conf = OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml")
    return {"variant": conf.variant, "hparams": OmegaConf.to_container(conf.hparams)}


@pytest.fixture(scope="module")
def attached() -> dict:
    """{method: (summary, {layer: adapter})} of every method attached to the micro UNet with its yaml and the
    micro budget, as a micro run does."""
    from bench.models.micro import build_unet

    out = {}
    for name in methods.available():
        unet = build_unet()
        conf = method_yaml(name)
        info = methods.attach(unet, name, targets(name), budget=BUDGET, variant=conf["variant"],
                              **conf["hparams"])
        out[name] = (info, dict(methods.adapters(unet)))
    return out


def reachable(name: str, layers: dict) -> bool:
    """Whether any of the method's sizes lands within ±10% of the budget on these layers (its budget options, as
    `methods.attach` counts them)."""
    cls = methods.registry.method_class(name)
    shapes = [a.shape for a in layers.values()]
    hp = methods.registry.full_hparams(cls, method_yaml(name)["hparams"], sized=bool(cls.sized_by or cls.also_sized))
    variant = methods.registry.resolve_variant(cls, method_yaml(name)["variant"])
    for option in cls.budget_options(shapes, hp):
        try:
            total = sum(cls.count(s, cls.resolve(s, {**hp, **option}), variant) for s in shapes)
        except methods.MethodError:
            continue
        if 0.9 * BUDGET <= total <= 1.1 * BUDGET:
            return True
    return False


def test_every_method_that_can_reach_the_budget_lands_within_ten_percent(attached):
    for name, (info, layers) in attached.items():
        count = info["trainable_params"]
        cls = methods.registry.method_class(name)
        if cls.budget_ignored:  # a reference row (full fine-tuning): the budget is ignored, and says so
            assert info["sizing"] == "budget ignored" and info["budget"] is None, name
        elif reachable(name, layers):
            assert info["sizing"] == "budget" and info["budget"] == BUDGET, name
            assert 0.9 * BUDGET <= count <= 1.1 * BUDGET, (name, count)
        else:  # no size of its family reaches it (SVD scaling: min(d_in, d_out) per layer): under budget, visible
            assert info["budget"] == BUDGET and count < 0.9 * BUDGET, name


def test_the_micro_targets_are_what_the_table_assumes(attached):
    """Σ d_in and Σ d_out of the micro targets, the numbers the docs' table is computed from."""
    _, layers = next(v for v in attached.values() if set(methods.registry.method_class(v[0]["method"]).kinds) == {
        "linear", "conv2d"})
    convs = [a for a in layers.values() if a.shape.kind == "conv2d"]
    assert len(layers) == 78 and len(convs) == 22
    assert sum(a.shape.d_in for a in layers.values()) == 26128
    assert sum(a.shape.d_out for a in layers.values()) == 7200
    assert all(a.shape.weight_shape[2:] == (3, 3) for a in convs)


@pytest.mark.parametrize("name", [n for n in METHODS if "conv_channels" in methods.registry.method_class(n).also_sized])
def test_budget_gives_micro_convolutions_whole_channel_blocks(name, attached):
    info, layers = attached[name]
    j = info["hparams"]["conv_channels"]
    for layer, a in layers.items():
        if a.shape.kind == "conv2d":
            c_in = a.shape.weight_shape[1]
            assert a.hparams["block_size"] == j * 9 and a.hparams["blocks"] == c_in // j, layer


def test_counts_by_formula(attached):
    """Every method's micro total is its formula (`count`) summed over the target layers at the sizes the budget
    chose, and the number of trainable parameters the UNet holds."""
    for name, (info, layers) in attached.items():
        cls = methods.registry.method_class(name)
        formula = sum(cls.count(a.shape, a.hparams, a.variant) for a in layers.values())
        held = sum(p.numel() for a in layers.values() for p in a.adapter_state().values())
        assert info["trainable_params"] == formula == held, name


def test_the_docs_table_is_what_attach_gives(attached):
    """Every row of the table is a registered method at the count attach gives (a new method needs no row to pass;
    the native ones have theirs)."""
    text = (ROOT / "docs" / "methods.md").read_text()
    table = text.split("### Budget at 135k on micro", 1)[1].split("\n\n")[2]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = int(cells[2].replace(",", ""))
    assert len(rows) >= 8 and set(rows) <= set(attached)
    assert rows == {name: attached[name][0]["trainable_params"] for name in rows}
    assert re.search(rf"`model.method_budget` = {BUDGET:,}", text)


@pytest.mark.parametrize("name", METHODS)
def test_budget_sized_adapters_reload_with_their_sizes(name, tmp_path):
    """An adapter file of a budget-sized method (its chosen sizes in hparams) loads into a fresh micro UNet with
    the same layers, sizes, counts, budget and sizing, without the budget."""
    import torch

    from bench.models.micro import build_unet

    unet = build_unet()
    conf = method_yaml(name)
    info = methods.attach(unet, name, targets(name), budget=BUDGET, **conf["hparams"])
    with torch.no_grad():
        for p in methods.trainable_parameters(unet):
            if not hasattr(p, "manifold"):
                p.add_(1e-3 * torch.randn_like(p))
    methods.save(unet, tmp_path)
    fresh = build_unet()
    fresh.load_state_dict({k: v for k, v in methods.detach(unet).state_dict().items()})
    assert methods.load(fresh, tmp_path) == info


def test_a_budget_no_size_can_meet_names_the_hyper_parameter_that_blocks_it():
    """Every size the budget could choose fails to resolve (LoLDU's σ₀ = alpha / rank with alpha null): the method's
    own one-line message, not a bare error from an empty search."""
    from bench.models.micro import build_unet

    with pytest.raises(methods.MethodError, match=r"^method\.alpha: None must be a positive number"):
        methods.attach(build_unet(), "loldu", list(MICRO.target_modules), budget=BUDGET, alpha=None)
