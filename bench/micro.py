"""Pretrain and check the embedded micro model.

    python -m bench.micro train --minutes 60     # resumable: continues from .cache/micro/state.pt, or on a
                                                 # new machine from the committed weights; SIGTERM stops it
                                                 # with a checkpoint
    python -m bench.micro check                  # JSON: per-attribute accuracy on 256 held-out captions
    python -m bench.micro check --out A --against B   # and A − B per attribute, paired over the same captions
    python -m bench.micro check --objects 3 --eval-n 192   # only captions that name three objects
    python -m bench.micro check --no-object-guidance       # sampled without the tasks' object guidance

Training renders scenes on the fly (`tasks.micro.world`), so no image is seen twice; captions leave out each
attribute with probability 0.2 and are replaced by the empty caption with probability 0.1 (classifier-free
guidance). The exported weights are an exponential moving average of the trained ones (decay warmed up as
min(ema, (1 + k) / (10 + k)), k = steps since the start or since the last switch of prediction target). Every
`--eval-every` minutes the EMA model is scored by the analytic parser and the point is appended to the learning
curve kept beside the weights (`learning_curve.json`).

The committed weights (546 training minutes, batch 64, 2 threads) were trained with `--prediction epsilon` for
3242 steps, then with v-prediction (the default) to step 5749, then at `--lr 4e-4` to step 7395 with a word-level
tokenizer; then, at `--lr 4e-4`, to step 15868 with one token per object phrase (`micro.build_tokenizer`; the new
tokens' embeddings started as the mean of their words', docs/micro-model.md); then 4200 steps with the lr decayed
linearly from 4e-4 to 0 (`--cooldown`), to step 20068. Until then `build_unet` built 32 attention heads of 3
channels where 3 heads of 32 were meant; those weights, relabelled to 3 heads (same shapes) and warm-started (fresh
optimiser, lr and EMA warmed up again), trained at `--lr 4e-4` to step 24272, then 1000 steps decayed, to step
25272; then with `--grounding 0.1` (the lr and EMA warmed up again) 4791 steps at `--lr 4e-4` and 1500 decayed, to
step 31563. Each learning-curve point names its target and grounding weight. Recipe: `train --prediction epsilon
--minutes 98`, `train --minutes 46`, `train --minutes 34 --lr 4e-4`, then the phrase tokens and `train --lr 4e-4` for
152 minutes (steps 7395 to 15868, in four calls), then `train --lr 4e-4 --cooldown --steps 4200` (69 minutes), then
the heads and `train --lr 4e-4` (steps 20068 to 24272, in two calls), then `train --lr 4e-4 --cooldown --steps 1000`,
then `train --lr 4e-4 --grounding 0.1` for 64 minutes (two calls) and `train --lr 4e-4 --grounding 0.1 --cooldown
--steps 1500`.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from results import record as records
from results import stats
from tasks.micro import parse, world

from . import CONF, models
from .attention import CrossAttentionMaps, ObjectGuidance, record_cross_attention
from .models import micro
from .sample import generate
from .train import prediction_target
from .validate import UsageError

log = logging.getLogger(__name__)
HELD_OUT_SEED = 10_000  # evaluation scenes come from their own stream, never the training one's


def training_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str], list[world.Scene]]:
    scenes = [world.sample_scene(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    captions = ["" if rng.random() < 0.1 else world.caption(s, rng, omit_prob=0.2) for s in scenes]
    return images, captions, scenes


def object_cells(ids: torch.Tensor, scenes: list[world.Scene], phrase_ids: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each object a caption names, as (caption index, token index, its 32x32 mask): the caption's k-th object-phrase
    token (one per object, `micro.build_tokenizer`) is the scene's k-th object. Empty captions name none."""
    rows, tokens, masks = [], [], []
    for i, scene in enumerate(scenes):
        positions = torch.isin(ids[i], phrase_ids).nonzero().flatten().tolist()
        if positions:
            assert len(positions) == len(scene.objects), (positions, scene)
            rows += [i] * len(positions)
            tokens += positions
            masks += [world.object_mask(o) for o in scene.objects]
    masks = np.stack(masks) if masks else np.zeros((0, world.SIZE, world.SIZE))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(tokens, dtype=torch.long), torch.from_numpy(masks).float()


def _mean_over_layers(term, maps: list[torch.Tensor], rows: torch.Tensor, tokens: torch.Tensor,
                     masks: torch.Tensor) -> torch.Tensor:
    """Mean over cross-attention layers of term(attention, cells): each named object's token's attention over the
    layer's cells (objects, queries; queries are a side x side grid) and the cells its object touches (1 where it
    does). 0 for a batch whose captions name no object (all empty)."""
    if not len(rows):
        return maps[0].new_zeros(())
    losses = []
    for probs in maps:  # (batch, queries, tokens)
        side = int(probs.shape[1] ** 0.5)
        losses.append(term(probs[rows, :, tokens], F.adaptive_max_pool2d(masks[:, None], side).flatten(1)))
    return torch.stack(losses).mean()


def grounding_loss(maps: list[torch.Tensor], rows: torch.Tensor, tokens: torch.Tensor,
                   masks: torch.Tensor) -> torch.Tensor:
    """Mean over cross-attention layers and named objects of (1 − the share of the object token's attention that
    falls on the cells its object touches)², the token loss of TokenCompose (Wang et al., CVPR 2024) with the
    scenes' exact masks: each object's token should be read where that object is drawn, and not where another is."""
    return _mean_over_layers(lambda attention, cells: ((1 - (attention * cells).sum(1) / attention.sum(1)) ** 2).mean(),
                             maps, rows, tokens, masks)


def pixel_loss(maps: list[torch.Tensor], rows: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over cross-attention layers, named objects and cells of the binary cross-entropy between the object
    token's attention map, scaled to a maximum of 1, and its object's cells: TokenCompose's pixel loss (Wang et al.,
    CVPR 2024) with exact masks. The token loss charges a second region by its share of the token's attention (less,
    the bigger the object); here every cell outside the object is pushed to 0 on its own (a region at half the peak
    costs log 2 per cell, whatever the object's size)."""
    return _mean_over_layers(lambda attention, cells: F.binary_cross_entropy(
        (attention / attention.amax(1, keepdim=True)).clamp(1e-6, 1 - 1e-6), cells), maps, rows, tokens, masks)


def held_out(n: int, objects: int | None = None) -> tuple[list[str], list[world.Scene]]:
    """The first n scenes of the held-out stream (only those with `objects` objects, if given) and their full
    captions."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    scenes = []
    while len(scenes) < n:
        scene = world.sample_scene(rng)
        if objects is None or len(scene.objects) == objects:
            scenes.append(scene)
    return [world.caption(s) for s in scenes], scenes


def image_scores(image: np.ndarray, caption: str, scene: world.Scene) -> dict[str, float]:
    """One sample read back against its caption: each attribute's match (`parse.attribute_match`) and their mean,
    `prompt_fidelity`; `count`, 1 where the parser finds exactly as many objects as the caption names (0 for a
    missing, doubled or extra object); `doubled`, 1 where an object the caption names in full (shape, size and
    colour) is drawn more often than named (NaN where none is named in full); how objects found by shape and size
    were coloured (`parse.colour_binding`)."""
    parsed, spec = parse.parse(image), world.parse_caption(caption)
    scores = parse.attribute_match(parsed, spec)
    named = Counter((o["shape"], o["size"], o["color"]) for o in spec["objects"]
                    if o["shape"] and o["size"] and o["color"])
    drawn = Counter((o.shape, o.size, o.color) for o in parsed.objects)
    return {"objects": len(scene.objects), **scores, "prompt_fidelity": float(np.mean(list(scores.values()))),
            "count": float(len(parsed.objects) == len(scene.objects)),
            "doubled": float(any(drawn[k] > n for k, n in named.items())) if named else float("nan"),
            **parse.colour_binding(parsed, spec)}


def caption_scores(model: models.Diffusion, n: int, guidance: float, steps: int = 25,
                   objects: int | None = None, object_guidance: ObjectGuidance | None = None) -> pd.DataFrame:
    """`image_scores` of one sample per held-out caption (seed = its index), captions naming `objects` objects if
    given."""
    captions, scenes = held_out(n, objects)
    images = generate(model, captions, seeds=range(n), steps=steps, guidance=guidance,
                      object_guidance=object_guidance)
    return pd.DataFrame([image_scores(img.permute(1, 2, 0).numpy(), cap, scene)
                         for img, cap, scene in zip(images, captions, scenes)])


def evaluate(model: models.Diffusion, n: int, guidance: float, steps: int = 25,
             by_object_count: bool = False) -> dict:
    """Per-attribute accuracy of the parsed samples against their full held-out captions (fixed seeds); with
    `by_object_count`, also per number of objects the caption asks for (attribute binding gets harder with more)."""
    return summarise(caption_scores(model, n, guidance, steps), by_object_count)


def summarise(rows: pd.DataFrame, by_object_count: bool = False) -> dict:
    """`caption_scores` rows -> each attribute's accuracy (and per object count, with how many captions)."""
    attributes = rows.drop(columns="objects")

    def value(v):  # a binding mean is NaN where no caption of the group had an object to count
        return None if pd.isna(v) else round(float(v), 4)

    out = {k: value(v) for k, v in attributes.mean().items()}
    if by_object_count:
        out["by_object_count"] = {str(c): {"captions": len(g), **{k: value(v) for k, v in
                                                                  g.drop(columns="objects").mean().items()}}
                                  for c, g in rows.groupby("objects")}
    return out


def paired_differences(rows: pd.DataFrame, other: pd.DataFrame) -> dict:
    """Per attribute (overall and per object count): Δ = mean(rows − other) over the same captions and seeds, its
    95% bootstrap CI and the paired sign-flip p (`results.stats.compare`; captions are the units)."""

    def delta(a: pd.Series, b: pd.Series) -> dict | None:  # over the captions scored in both (binding can be NaN)
        both = a.notna() & b.notna()
        if both.sum() < 2:
            return None
        c = stats.compare(stats.sample(a[both].to_numpy()), stats.sample(b[both].to_numpy()))
        return {"delta": round(c.delta, 4), "ci": [round(c.lo, 4), round(c.hi, 4)], "p": round(c.p, 4)}

    attributes = [k for k in rows.columns if k != "objects"]
    out = {k: delta(rows[k], other[k]) for k in attributes}
    out["by_object_count"] = {str(c): {k: delta(g[k], other.loc[g.index, k]) for k in attributes}
                              for c, g in rows.groupby("objects")}
    return out


def timesteps(n: int, T: int, high_noise: float) -> torch.Tensor:
    """Uniform training timesteps, except that a `high_noise` fraction of the batch is drawn from the noisier half
    [T/2, T), where x_t shows little of the layout and only the caption can say which object is which."""
    t = torch.randint(0, T, (n,))
    if high_noise:  # (no extra draws otherwise: the same seed gives the same noise as a uniform run)
        t = torch.where(torch.rand(n) < high_noise, torch.randint(T // 2, T, (n,)), t)
    return t


def switch_objective(state: dict, old: str, new: str) -> None:
    """Continuing under another prediction target (the committed model went epsilon -> v): warm the lr up again."""
    state["prediction"] = new
    if old != new:
        state["warm_start"] = state["step"]
        log.info("prediction target %s -> %s from step %d", old, new, state["step"])


def learning_rate(args: argparse.Namespace, step: int, warm_start: int, first_step: int) -> float:
    """`--lr`, warmed up linearly over 500 steps from `warm_start` (the last (re)start) and, with `--cooldown`,
    decayed linearly to 0 over the `--steps` of the call that began at `first_step`."""
    lr = args.lr * min(1.0, (step - warm_start + 1) / 500)
    if args.cooldown:
        lr *= 1 - (step - first_step) / args.steps
    return lr


def architecture_differences(config: dict | None, built: dict) -> list[str]:
    """The UNet config entries in which saved weights differ from what `build_unet` builds now, input channels aside
    (`--coordinates` sets them). Weights of the same shapes load into another architecture without an error (32
    attention heads of 3 channels into 3 heads of 32), so training refuses them instead."""
    if config is None:
        return ["no UNet config recorded: a checkpoint from before the attention-heads fix"]
    plain = lambda v: json.loads(json.dumps(v))  # tuples and lists compare equal
    return [f"{k} {plain(config.get(k))} (build_unet: {plain(v)})" for k, v in built.items()
            if not k.startswith("_") and k != "in_channels" and plain(config.get(k)) != plain(v)]


class Pretraining:
    """The micro model in training: weights, their EMA, the optimiser and the state a checkpoint keeps (step,
    training minutes, learning curve, prediction target, the data stream's rng)."""

    def __init__(self, args: argparse.Namespace):
        torch.manual_seed(args.seed)
        self.args = args
        self.tokenizer = micro.build_tokenizer()
        self.unet = micro.build_unet(coordinates=args.coordinates)
        self.text = micro.build_text_encoder(self.tokenizer)
        self.scheduler = micro.build_scheduler(args.prediction)
        self.params = list(self.unet.parameters()) + list(self.text.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.01)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text).requires_grad_(False)
        # the trained UNet's cross-attention keeps its maps for the grounding loss (not the EMA's, which samples)
        self.attention = (record_cross_attention(self.unet) if args.grounding or args.grounding_pixel
                          else CrossAttentionMaps())
        self.phrase_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(world.OBJECT_PHRASES)))
        self.state = {"step": 0, "minutes": 0.0, "curve": [], "prediction": args.prediction,
                      "rng": np.random.default_rng(args.seed).bit_generator.state}
        self.resume()
        self.first_step = self.state["step"]  # of this call: where `--cooldown` starts
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = self.state["rng"]
        self.ema_params = list(self.ema_unet.parameters()) + list(self.ema_text.parameters())
        self.model = models.Diffusion("micro", self.unet, self.text, self.tokenizer, self.scheduler, None, world.SIZE,
                                      coordinates=args.coordinates)
        self.ema_model = models.Diffusion("micro", self.ema_unet, self.ema_text, self.tokenizer, self.scheduler, None,
                                          world.SIZE, coordinates=args.coordinates)

    def resume(self) -> None:
        """From the checkpoint file; on a new machine (no .cache) from the committed weights, with fresh optimiser
        moments and the lr warmed up again, extending their learning curve (with `--coordinates` from weights
        without them: `micro.with_coordinates`)."""
        args, state_file = self.args, Path(self.args.state)
        if state_file.exists():
            ckpt = torch.load(state_file, weights_only=False)
            if differences := architecture_differences(ckpt.get("unet_config"), self.unet.config):
                raise UsageError(f"--state: {state_file} holds a UNet that build_unet no longer builds "
                                 f"({'; '.join(differences)}); pass another --state to warm-start from --out")
            for module, key in ((self.unet, "unet"), (self.text, "text"), (self.ema_unet, "ema_unet"),
                                (self.ema_text, "ema_text")):
                module.load_state_dict(ckpt[key])
            self.opt.load_state_dict(ckpt["opt"])
            self.state = ckpt["state"]
            log.info("resumed at step %d (%.1f training minutes)", self.state["step"], self.state["minutes"])
            switch_objective(self.state, self.state.get("prediction", "epsilon"), args.prediction)
        elif (Path(args.out) / "learning_curve.json").exists():
            committed = models.load(args.out)
            if differences := architecture_differences(committed.unet.config, self.unet.config):
                raise UsageError(f"--out: the UNet in {args.out} is not the one build_unet builds "
                                 f"({'; '.join(differences)})")
            if committed.coordinates and not args.coordinates:
                raise UsageError(f"--coordinates: the weights in {args.out} read a (y, x) grid; pass --coordinates "
                                 "to continue them")
            unet = committed.unet.state_dict()
            if args.coordinates and not committed.coordinates:
                unet = micro.with_coordinates(unet)
            text = committed.text_encoder.state_dict()
            for module, source in ((self.unet, unet), (self.text, text), (self.ema_unet, unet), (self.ema_text, text)):
                module.load_state_dict(source)
            curve = json.loads((Path(args.out) / "learning_curve.json").read_text())
            last = curve[-1]
            self.state = {"step": last["step"], "minutes": last["minutes"], "curve": curve, "warm_start": last["step"],
                          "rng": np.random.default_rng(args.seed + last["step"]).bit_generator.state}
            log.info("warm start from %s at step %d (%.1f training minutes)", args.out, last["step"], last["minutes"])
            switch_objective(self.state, committed.scheduler.config.prediction_type, args.prediction)

    def step(self) -> dict[str, float]:
        """One optimiser step on a fresh batch at `learning_rate`, then the EMA; returns the losses."""
        args, state, model = self.args, self.state, self.model
        for g in self.opt.param_groups:
            g["lr"] = learning_rate(args, state["step"], state.get("warm_start", 0), self.first_step)
        images, captions, scenes = training_batch(self.rng, args.batch)
        latents = model.encode_images(images)
        noise = torch.randn_like(latents)
        t = timesteps(len(latents), self.scheduler.config.num_train_timesteps, args.high_noise)
        noisy = self.scheduler.add_noise(latents, noise, t)
        self.attention.maps.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = model.predict(noisy, t, model.encode_text(captions))
        loss = F.mse_loss(pred.float(), prediction_target(model, latents, noise, t))
        losses = {"loss": loss.item()}
        if args.grounding or args.grounding_pixel:
            ids = model._token_ids(self.tokenizer, captions)  # the token positions the encoder saw
            objects = object_cells(ids, scenes, self.phrase_ids)
            for name, weight, term in (("grounding", args.grounding, grounding_loss),
                                       ("pixel", args.grounding_pixel, pixel_loss)):
                if weight:
                    value = term(self.attention.maps, *objects)
                    loss = loss + weight * value
                    losses[name] = value.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        with torch.no_grad():  # EMA warmed up from the (re)start, so earlier weights fade out within a few steps
            since = state["step"] - state.get("warm_start", 0)
            decay = min(args.ema, (1 + since) / (10 + since))
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        state["step"] += 1
        return losses

    def checkpoint(self) -> None:
        """Score the EMA model (a learning-curve point), then save the state and the EMA weights (diffusers layout)."""
        args, state = self.args, self.state
        self.unet.eval(), self.text.eval(), self.ema_unet.eval(), self.ema_text.eval()
        scores = evaluate(self.ema_model, n=args.eval_n, guidance=args.guidance)
        state["curve"].append({"minutes": round(state["minutes"], 1), "step": state["step"],
                               "prediction": args.prediction, "grounding": args.grounding,
                               "grounding_pixel": args.grounding_pixel, "guidance": args.guidance,
                               **scores})
        log.info("step %d, %.1f min: %s", state["step"], state["minutes"], scores)
        state["rng"] = self.rng.bit_generator.state
        buffer = io.BytesIO()
        torch.save({"unet": self.unet.state_dict(), "text": self.text.state_dict(),
                    "ema_unet": self.ema_unet.state_dict(), "ema_text": self.ema_text.state_dict(),
                    "opt": self.opt.state_dict(), "unet_config": dict(self.unet.config), "state": state}, buffer)
        records.atomic_write(Path(args.state), buffer.getvalue())
        micro.save(args.out, self.ema_unet, self.ema_text, self.tokenizer, self.scheduler)
        records.atomic_write(Path(args.out) / "learning_curve.json", json.dumps(state["curve"], indent=1))
        self.unet.train(), self.text.train()


def train(args: argparse.Namespace) -> None:
    """Train for `--minutes` (or `--steps`), a learning-curve point every `--eval-every` minutes; SIGTERM stops at
    the next step with a checkpoint."""
    run = Pretraining(args)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    end = time.time() + args.minutes * 60
    next_eval = time.time() + args.eval_every * 60
    bar = tqdm(desc="pretraining micro", unit="step", initial=run.state["step"])
    run.unet.train(), run.text.train()
    last_step = run.first_step + args.steps if args.steps else None
    while time.time() < end and not stop and run.state["step"] != last_step:
        t0 = time.time()
        losses = run.step()
        run.state["minutes"] += (time.time() - t0) / 60
        bar.update()
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
        if time.time() >= next_eval:
            run.checkpoint()
            next_eval = time.time() + args.eval_every * 60
    run.checkpoint()


def check(args: argparse.Namespace) -> None:
    """The JSON report; with `--against`, also the paired differences to those weights on the same captions. The
    learning curve's points (`train`) are sampled without object guidance: they follow what training changes."""
    model = models.load(args.out)
    setting = OmegaConf.load(CONF / "model" / "micro.yaml").object_guidance if args.object_guidance else None
    object_guidance = ObjectGuidance.from_config(setting)
    t0 = time.time()
    rows = caption_scores(model, n=args.eval_n, guidance=args.guidance, objects=args.objects,
                          object_guidance=object_guidance)
    curve_file = Path(args.out) / "learning_curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else []
    report = {"captions": args.eval_n, "objects": args.objects, "guidance": args.guidance, "ddim_steps": 25,
              "object_guidance": OmegaConf.to_container(setting) if setting is not None else None,
              "seconds": round(time.time() - t0, 1), "accuracy": summarise(rows, by_object_count=True),
              "chance": {"background": 1 / len(world.COLORS), "color": 1 / (len(world.COLORS) - 1),
                         "shape": 1 / len(world.SHAPES), "size": 1 / len(world.SIZES),
                         "position": 1 / len(world.POSITIONS)},
              "learning_curve": curve}
    if args.against:
        other = caption_scores(models.load(args.against), n=args.eval_n, guidance=args.guidance,
                               objects=args.objects, object_guidance=object_guidance)
        report["against"] = {"weights": args.against, "accuracy": summarise(other, by_object_count=True),
                             "difference": paired_differences(rows, other)}
    print(json.dumps(report, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["train", "check"])
    p.add_argument("--out", default=str(micro.WEIGHTS), help="weights folder (diffusers layout)")
    p.add_argument("--state", default=".cache/micro/state.pt", help="training checkpoint (weights, EMA, optimiser)")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock minutes to train in this call")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (whichever comes first)")
    p.add_argument("--cooldown", action="store_true",
                   help="decay the lr linearly to 0 over this call's --steps (the last stage of a warmup-stable-decay "
                        "schedule)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast (slower on CPUs without bf16 units)")
    p.add_argument("--eval-every", type=float, default=10.0, help="minutes between learning-curve points")
    p.add_argument("--eval-n", type=int, default=256, help="held-out captions per evaluation")
    p.add_argument("--guidance", type=float, default=OmegaConf.load(CONF / "model" / "micro.yaml").guidance,
                   help="classifier-free guidance (default: the micro tasks' value, conf/model/micro.yaml)")
    p.add_argument("--object-guidance", action=argparse.BooleanOptionalAction, default=True,
                   help="check: sample with the micro tasks' object guidance (conf/model/micro.yaml)")
    p.add_argument("--objects", type=int, choices=[1, 2, 3], default=None,
                   help="check: only held-out captions that name this many objects (three-object binding needs more "
                        "than the 68 of the default 256 to resolve a change of 0.08)")
    p.add_argument("--against", default=None,
                   help="check: also these weights on the same captions and seeds, and the paired differences")
    p.add_argument("--prediction", choices=["v_prediction", "epsilon"], default="v_prediction",
                   help="what the UNet predicts; the committed weights: epsilon to step 3242, then v")
    p.add_argument("--coordinates", action="store_true",
                   help="the UNet also reads a (y, x) grid (from weights without one: its inputs start at zero)")
    p.add_argument("--high-noise", type=float, default=0.0,
                   help="fraction of each batch whose timestep is drawn from the noisier half [T/2, T)")
    p.add_argument("--grounding", type=float, default=0.0,
                   help="weight of the cross-attention grounding loss (`grounding_loss`: each object's token attends "
                        "where that object is)")
    p.add_argument("--grounding-pixel", type=float, default=0.0,
                   help="weight of the cross-attention pixel loss (`pixel_loss`: no cell outside an object reads its "
                        "token)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 when sharing a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    models.quiet_loading()
    try:
        if args.cooldown and not args.steps:
            raise UsageError("--cooldown: needs --steps (the steps to decay the lr over)")
        for flag in ("out", "against") if args.command == "check" else ():
            path = getattr(args, flag)
            if path and not (Path(path) / "unet" / "config.json").exists():
                raise UsageError(f"--{flag}: {path} is not a micro weights folder (no unet/config.json)")
        (train if args.command == "train" else check)(args)
    except (UsageError, models.ModelNotFound) as e:  # weights that are absent, corrupt or do not fit the flags
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
