"""What every method costs, measured in one process as ratios (issue 8).

    python -m bench.perf                          # all methods, the full grid, JSON + Markdown
    python -m bench.perf --quick --methods lora,oft --out perf.json --markdown perf.md
    python -m bench.perf --device cuda --precision bf16

Three measurements, each a ratio of two timings taken in the same process, interleaved (every repeat times every
variant once, in a shuffled order, each right after one measurement of its reference: the frozen layer, LoRA's step,
the base model) and summarised by the median over repeats of the per-repeat ratio to the reference measured beside
it, with the spread (min–max over repeats) kept in the JSON as the measurement's noise. Pairs, because on this
shared 2-core machine one call differs from the next by ±10%: in a 24-pair sampling test they narrowed the ratios'
interquartile range from 0.87–1.10 to 0.93–1.06.

1. **One adapted layer** (`layer`): forward + backward of a Stable-Diffusion-1.5-shaped attention projection
   (d → d, d ∈ {320, 640, 1280}, tokens ∈ {4096, 1024, 256}; cross-attention keys/values 768 → d on 77 tokens;
   batch 2) against the frozen `nn.Linear` (weight frozen, input requiring grad, so its backward computes the input
   gradient as inside a network), and for the methods of `methods.reference.METHODS` against Hugging Face peft's
   layer at the same hyper-parameters. Every method runs with its yaml's hyper-parameters, on the side its cost
   estimate picks ("auto"), and also forced to each side (`input`, `weight`) to check that choice.
   Memory: the peak bytes of one forward + backward: the tensors allocated during it (`bench.memory.PeakMemory`
   with the "allocations" meter on CPU, the allocator's peak above what was allocated before on CUDA) plus what the
   call holds throughout: the input, the output gradient, and the module's parameters and buffers (frozen weight
   included, so that the frozen layer's figure is not 0).
2. **A training step of the micro model** (`micro`): `bench.models.micro.build_unet()` (random weights), each
   method attached as a micro run attaches it (`conf/model/micro.yaml`: its target modules, every method sized to
   its parameter budget) with its yaml's optimiser settings (`methods.optimizer`); batch 16 of random 12×16×16
   latents and 40×128 text states; forward, MSE loss, backward, optimiser step; time and peak memory (the same
   meter) relative to LoRA's.
3. **Sampling with a merged adapter** (`sampling`): `bench.sample.generate` on `bench.models.load("micro")`
   (a few prompts, 10 DDIM steps) with a method attached, its parameters perturbed, then `methods.merge`d, against
   the base model; and the same adapter left attached in eval mode (its cached merged weight).

Targets (`targets`; benchmarks, not tests; a missed one is marked ✗ in the Markdown): each method's `perf_target` ×
the frozen layer at ≥ 1024 tokens; its `peft_perf_target` (time, memory) × peft's layer; every micro training step
≤ 1.15× LoRA's; merged sampling within 5% of the base model. Every registered method is measured the same way: the
class attributes and `methods.reference.METHODS` (which have a peft counterpart) are all this package knows of a
method.

Modules: `harness` (interleaved timing, methods set up as runs set them up), `layer`, `micro_step`, `sampling`
(the three measurements), `targets`, `report` (Markdown, missed targets, noise), `cli` (`python -m bench.perf`).
"""
