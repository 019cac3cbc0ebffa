"""The ``visor`` command line. Every user mistake ends as one line on stderr and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, VisorError

DECODE_HELP = "dynamic, static, graph (CUDA graphs), compile, compile-graph"  # visor.generate.DECODE_MODES
PREFILL_HELP = "eager, graph (CUDA graphs), compile, compile-graph"  # visor.generate.PREFILL_MODES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="VISOR: sparse vision-language inference over Hugging Face LVLM checkpoints.",
)
console = Console()

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="checkpoint directory (base LLaVA/LLaVA-OV or VISOR)")]
ScheduleOpt = Annotated[
    str | None, typer.Option(help="layer roles for a base checkpoint: JSON/YAML file or 'sa,ca,text,...'")
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        help="active SA layers: 0..n, 'full' (the base model), 'auto' (policy); default: on a VISOR checkpoint "
        "'auto' with a policy, else n (every SA layer), on a base checkpoint 'full'"
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace an earlier output of this command at --out (never other files)")
]
DeviceOpt = Annotated[str, typer.Option(help="auto (the GPU if there is one), cpu, cuda, cuda:N")]
PrefillOpt = Annotated[
    str,
    typer.Option(help="auto (compile-graph on a GPU, prompts padded to a few lengths; else eager), " + PREFILL_HELP),
]
DecodeOpt = Annotated[str, typer.Option(help="auto (compile-graph on a GPU, dynamic on the CPU), " + DECODE_HELP)]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on a GPU, else float32), float32, bfloat16, float16")]


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@app.command("tiny-model")
def tiny_model(
    out: Annotated[Path, typer.Option(help="directory to write the checkpoint to")],
    arch: Annotated[
        str,
        typer.Option(
            help="llava-onevision (SigLIP + Qwen2), llava (CLIP + Llama), qwen2-vl, qwen2.5-vl or qwen3-vl "
            "(dynamic resolution + M-RoPE; qwen3-vl: DeepStack), internvl (InternViT tiles + Qwen2)"
        ),
    ] = "llava-onevision",
    layers: int = 6,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    image_size: Annotated[int, typer.Option(help="vision tower input size (AnyRes tiles)")] = 32,
    patch_size: int = 8,
    seed: int = 0,
    overwrite: OverwriteOpt = False,
):
    """Write a tiny random checkpoint (config, safetensors, tokenizer, processor, chat template), offline."""
    from .tiny import TinySpec, build_tiny

    _quiet_transformers()
    spec = TinySpec(
        arch=arch,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        image_size=image_size,
        patch_size=patch_size,
        seed=seed,
    )
    path = build_tiny(out, spec, overwrite)
    console.print(f"wrote a tiny {arch} checkpoint to [bold]{path}[/]")


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option(help="the question; it is wrapped in the checkpoint's chat template")],
    image: Annotated[list[Path], typer.Option(help="an image file; repeat for several images")] = [],  # noqa: B006
    budget: BudgetOpt = None,
    max_new_tokens: int = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    schedule: ScheduleOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    prefill: PrefillOpt = "auto",
    decode: DecodeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
):
    """Answer a prompt about one or more images."""
    from .api import load
    from .generate import GenerationConfig, modes

    _quiet_transformers()
    GenerationConfig(max_new_tokens, temperature, top_p, seed)  # checked before loading
    modes(device, prefill, decode)
    m = load(model, schedule=schedule, dtype=dtype, device=device)
    g = m.generate(
        [str(p) for p in image],
        prompt,
        budget=budget,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        prefill=prefill,
        decode=decode,
    )
    if as_json:
        print(json.dumps(g.to_dict()))
    else:
        console.print(g.text, markup=False, highlight=False)
        console.print(
            f"[dim]budget {g.budget} · {g.n_visual} visual + {g.n_text} text tokens · "
            f"{g.flops['total'] / 1e9:.3f} GFLOPs[/]"
        )


@app.command()
def flops(
    visual_tokens: Annotated[int | None, typer.Option(help="image tokens in the prompt (or give --image)")] = None,
    text_tokens: Annotated[int | None, typer.Option(help="text tokens in the prompt (or give --image)")] = None,
    image: Annotated[
        list[Path], typer.Option(help="count the tokens of these images and --prompt (needs --model)")
    ] = [],  # noqa: B006
    prompt: Annotated[str, typer.Option(help="with --image: the question")] = "Describe the image.",
    model: Annotated[Path | None, typer.Option("--model", "-m", help="checkpoint directory")] = None,
    config: Annotated[Path | None, typer.Option(help="config.json only: no weights needed")] = None,
    budget: Annotated[str, typer.Option(help="active SA layers: 0..n, 'full' (the base model)")] = "full",
    crops: Annotated[int | None, typer.Option(help="crops the vision tower encodes (default: from tokens)")] = None,
    schedule: ScheduleOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
):
    """Count the FLOPs of one sample, per component, for prefill and per decode token."""
    from .backbone import read_config
    from .checkpoint import read_visor_json
    from .flops import count_flops
    from .schedule import Schedule

    if (model is None) == (config is None):
        raise ConfigError("give exactly one of --model DIR or --config config.json")
    grids = None  # a dynamic-resolution tower's patch grids: counted from --image, else one square image
    if image:
        counted = _count_tokens(model, image, prompt, visual_tokens, text_tokens, crops)
        visual_tokens, text_tokens, crops, grids = counted
    elif visual_tokens is None or text_tokens is None:
        raise ConfigError("give --visual-tokens and --text-tokens, or --image (with --model) to count them")
    hf_config = read_config(model or config)
    n_layers = hf_config.text_config.num_hidden_layers
    meta = read_visor_json(model) if model is not None else None
    sched = Schedule.from_spec(meta["schedule"] if meta else schedule, n_layers)
    report = count_flops(hf_config, sched, budget, visual_tokens, text_tokens, crops, None, grids)
    full = count_flops(hf_config, sched, "full", visual_tokens, text_tokens, crops, None, grids)
    if as_json:
        print(json.dumps(report.to_dict() | {"full_prefill": full.prefill, "schedule": sched.to_dict()}))
        return
    table = Table(title=f"FLOPs, budget {report.budget}: {visual_tokens} visual + {text_tokens} text tokens")
    table.add_column("component")
    table.add_column("prefill (GFLOPs)", justify="right")
    table.add_column("decode / token (GFLOPs)", justify="right")
    decode = report.breakdown["decode_per_token"]
    for name, value in report.breakdown["prefill"].items():
        table.add_row(name, f"{value / 1e9:,.3f}", f"{decode[name] / 1e9:,.4f}" if name in decode else "")
    table.add_row("[bold]total", f"[bold]{report.prefill / 1e9:,.3f}", f"[bold]{report.decode_per_token / 1e9:,.4f}")
    console.print(table)
    console.print(
        f"vs. full: prefill {full.prefill / report.prefill:.2f}x fewer FLOPs "
        f"(language model alone {full.lm_prefill / report.lm_prefill:.2f}x), "
        f"decode {full.decode_per_token / report.decode_per_token:.2f}x"
    )
    budgets = Table(title="every budget: language-model prefill")
    for column in ["budget", "SA layers", "GFLOPs", "x fewer than full"]:
        budgets.add_column(column, justify="right")
    for b in sched.budgets:
        r = count_flops(hf_config, sched, b, visual_tokens, text_tokens, crops, None, grids)
        row = [
            str(b),
            str(len(sched.active_sa(b))),
            f"{r.lm_prefill / 1e9:,.1f}",
            f"{full.lm_prefill / r.lm_prefill:.2f}",
        ]
        budgets.add_row(*row)
    console.print(budgets)


def _count_tokens(model, images, prompt, visual_tokens, text_tokens, crops) -> tuple[int, int, int, list | None]:
    """Visual and text tokens (and tower crops, patch grids) of one prompt with its images, as generate
    builds it."""
    from .api import load

    if model is None:
        raise ConfigError("--image needs --model: its tokenizer and vision path count the tokens")
    if visual_tokens is not None or text_tokens is not None:
        raise ConfigError("give --image or --visual-tokens/--text-tokens, not both")
    _quiet_transformers()
    sample = load(model, device="cpu", dtype="bfloat16").encode([prompt], [[str(p) for p in images]])[0]
    n_visual = sample.visual.shape[0]
    return n_visual, len(sample.ids) - n_visual, sample.n_crops if crops is None else crops, sample.grids


@app.command()
def bench(
    size: Annotated[str, typer.Option(help="built-in shape of --arch (random weights): see --arch")] = "0.5b",
    config: Annotated[Path | None, typer.Option(help="any config.json instead of --size (random weights)")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="a checkpoint directory instead")] = None,
    arch: Annotated[
        str,
        typer.Option(
            help="llava-onevision (--size 0.5b, 7b), qwen2-vl (7b), qwen2.5-vl (3b, 7b), qwen3-vl (8b), internvl (8b)"
        ),
    ] = "llava-onevision",
    visual_tokens: int = 7290,
    text_tokens: int = 64,
    new_tokens: int = 32,
    batch: int = 1,
    methods: Annotated[str, typer.Option(help="comma-separated: hf, hf-compile, full, visor:K")] = "hf,full,visor:2",
    repeats: Annotated[int, typer.Option(help="timed runs per method (medians reported)")] = 5,
    warmup: int = 2,
    device: Annotated[str, typer.Option(help="auto (cuda if available), cuda, cpu")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")] = "auto",
    decode: DecodeOpt = "auto",
    prefill: PrefillOpt = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="decode through torch.compile (--decode compile)")] = False,
    schedule: ScheduleOpt = None,
    memory_budget_gib: Annotated[
        float, typer.Option(help="serving: how many requests' KV caches fit in this much memory")
    ] = 40.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
    out: Annotated[Path | None, typer.Option(help="directory for bench.json")] = None,
    overwrite: OverwriteOpt = False,
):
    """Time vision encoder, LM prefill, time to first token and decode: HF vs. VISOR, same weights."""
    from .bench import BenchConfig, run_bench
    from .outputs import atomic_write, claim

    _quiet_transformers()
    if out is not None:  # refuse a bad --out before minutes of benchmarking
        claim(out, "bench", ["bench.json"], [model, config], overwrite, mark=False)
    cfg = BenchConfig(
        size=size,
        arch=arch,
        config=str(config or ""),
        model=str(model or ""),
        visual_tokens=visual_tokens,
        text_tokens=text_tokens,
        new_tokens=new_tokens,
        batch=batch,
        methods=methods,
        repeats=repeats,
        warmup=warmup,
        device=device,
        dtype=dtype,
        decode="compile" if compile else decode,
        prefill=prefill,
        schedule=schedule or "",
        memory_budget_gib=memory_budget_gib,
    )
    with console.status("benchmarking") as status:
        result = run_bench(cfg, lambda name, i: status.update(f"{name}: run {i}/{repeats + warmup}"))
    if out is not None:
        claim(out, "bench", ["bench.json"], [model, config], overwrite)
        atomic_write(out / "bench.json", json.dumps(result, indent=1) + "\n")
    if as_json:
        print(json.dumps(result))
        return
    shape = f"{visual_tokens} visual + {text_tokens} text tokens"
    title = f"{result['device']} · {result['config']['dtype']} · batch {batch} · {shape}"
    table = Table(title=title, caption="x: speed-up over the fastest transformers method, phase by phase")
    columns = [
        "method",
        "vision ms",
        "prefill ms",
        "TTFT ms",
        "decode ms",
        "KV MB/req",
        f"fit {memory_budget_gib:g} GiB",
    ]
    columns += ["decode GB/s (x bound)", "prefill x", "TTFT x", "decode x"]  # speed-ups over the fastest hf method
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in result["methods"]:
        up, serve = r["speedup_vs_best_hf"] or {}, r["serving"]
        table.add_row(
            r["method"],
            f"{r['vision_ms']:.2f}",
            f"{r['prefill_ms']:.2f}",
            f"{r['ttft_ms']:.2f}",
            f"{r['decode_ms']:.2f}",
            f"{serve['kv_cache_bytes_per_request'] / 2**20:.1f}",
            str(serve["requests_in_memory_budget"] or ""),
            f"{serve['decode_gb_per_s']:.0f} ({serve['decode_vs_bound']:.2f}x)",
            *(f"{up[k]:.2f}x" if up.get(k) else "" for k in ("prefill_ms", "ttft_ms", "decode_ms")),
        )
    console.print(table)
    if out is not None:
        console.print(f"wrote {out / 'bench.json'}")


@app.command()
def convert(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="directory for the VISOR checkpoint")],
    schedule: ScheduleOpt = None,
    position_encoding: Annotated[
        str | None, typer.Option(help="rope (original positions, the default) or conv (the paper's PEG)")
    ] = None,
    overwrite: OverwriteOpt = False,
):
    """Make a VISOR checkpoint from a base checkpoint (new CA layers, gates at zero)."""
    from .api import convert as convert_checkpoint

    _quiet_transformers()
    path = convert_checkpoint(model, out, schedule, position_encoding, overwrite)
    console.print(f"wrote a VISOR checkpoint to [bold]{path}[/]")


@app.command()
def export(
    model: ModelOpt,
    merged: Annotated[Path, typer.Option(help="directory for the self-contained checkpoint")],
    overwrite: OverwriteOpt = False,
):
    """Write a self-contained copy of a VISOR checkpoint (an adapter's base weights included), in its dtype."""
    from .api import export as export_checkpoint

    _quiet_transformers()
    path = export_checkpoint(model, merged, overwrite)
    console.print(f"wrote a self-contained VISOR checkpoint to [bold]{path}[/]")


@app.command()
def train(
    model: Annotated[str | None, typer.Option("--model", "-m", help="base or VISOR checkpoint to start from")] = None,
    data: Annotated[str | None, typer.Option(help="LLaVA conversation .json or {image,question,answer} .jsonl")] = None,
    images: Annotated[str | None, typer.Option(help="image paths are relative to it (default: the data's)")] = None,
    out: Annotated[str | None, typer.Option(help="run directory (checkpoints/, final/, metrics.jsonl)")] = None,
    stage: Annotated[int | None, typer.Option(help="1: train only CA modules; 2: train everything")] = None,
    budgets: Annotated[str | None, typer.Option(help="budgets to sample: all, 0-8, 0,2,4, 1-3,full")] = None,
    budget_weights: Annotated[str | None, typer.Option(help="sampling weights, e.g. 1,1,2")] = None,
    steps: Annotated[int | None, typer.Option(help="optimisation steps (default: --epochs worth)")] = None,
    epochs: float | None = None,
    batch_size: Annotated[int | None, typer.Option(help="per process and micro-batch")] = None,
    grad_accum: int | None = None,
    lr: float | None = None,
    warmup_steps: int | None = None,
    min_lr_ratio: float | None = None,
    clip: Annotated[float | None, typer.Option(help="max gradient norm, 0 = off")] = None,
    freeze_vision: Annotated[bool | None, typer.Option("--freeze-vision", help="stage 2: keep the tower")] = None,
    reduction: Annotated[
        str | None,
        typer.Option(help='train the base under a token reduction, JSON: {"method": "pdrop", "stages": [1, 2, 4]}'),
    ] = None,
    projector_only: Annotated[
        bool | None, typer.Option("--projector-only", help="stage 2: train only the projector (VisionZip's recipe)")
    ] = None,
    cache_vision: Annotated[
        bool | None,
        typer.Option("--cache-vision", help="keep each record's tower output (fixed tower; LLaVA / LLaVA-OV)"),
    ] = None,
    activation_checkpointing: Annotated[bool | None, typer.Option("--activation-checkpointing")] = None,
    save_every: Annotated[int | None, typer.Option(help="checkpoint every N steps (0: only final)")] = None,
    resume: Annotated[
        bool | None, typer.Option("--resume", help="continue the run in --out from its newest checkpoint")
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option("--overwrite", help="start again in --out; the earlier run is kept until this one ends"),
    ] = None,
    seed: int | None = None,
    fsdp: Annotated[bool | None, typer.Option("--fsdp", help="FSDP2 instead of DDP (several processes)")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="compute and final/ precision: auto (bfloat16 on a GPU), float32, bfloat16")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader processes reading records ahead (0: none)")] = None,
    max_bad: Annotated[
        float | None, typer.Option(help="stop once more than this fraction of the records met are unusable")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto (cuda:LOCAL_RANK if there is a GPU), cpu, cuda, cuda:N")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON file of these options; flags override it")] = None,
):
    """Train a universal VISOR network (stage 1 or 2); runs under torchrun as well."""
    from .train import TrainConfig
    from .train import train as run_training

    _quiet_transformers()
    cfg = TrainConfig.from_file(config) if config else TrainConfig()
    flags = {k: v for k, v in locals().items() if k not in ("cfg", "config", "TrainConfig", "run_training")}
    if flags["budget_weights"] is not None:
        try:
            flags["budget_weights"] = [float(w) for w in flags["budget_weights"].split(",")]
        except ValueError:
            raise ConfigError(f"--budget-weights must be numbers separated by commas: {budget_weights!r}") from None
    for key, value in flags.items():
        if value is not None:
            setattr(cfg, key, value)
    final = run_training(cfg)
    console.print(f"final VISOR checkpoint: [bold]{final}[/]")


@app.command("train-policy")
def train_policy(
    model: ModelOpt,
    data: Annotated[Path, typer.Option(help="held-out set: LLaVA .json or {image,question,answer} .jsonl")],
    out: Annotated[Path, typer.Option(help="run directory; the checkpoint with its policy goes to OUT/final")],
    images: Annotated[Path | None, typer.Option(help="image paths are relative to it (default: the data's)")] = None,
    cost_weight: Annotated[float, typer.Option(help="> 0 prefers cheaper budgets at inference")] = 0.0,
    epochs: Annotated[
        int,
        typer.Option(
            help="at most this many; stopped where the loss on a fifth of the fitting samples set aside is lowest"
        ),
    ] = 300,
    width: Annotated[int, typer.Option(help="hidden width of the router MLP")] = 256,
    lr: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
    holdout: Annotated[
        float, typer.Option(help="fraction of the samples kept out of the fit; the report is measured on them")
    ] = 0.2,
    device: DeviceOpt = "auto",
    dtype: Annotated[
        str, typer.Option(help="float32 (default: the checkpoint written keeps the weights read), bfloat16, ...")
    ] = "float32",
    overwrite: OverwriteOpt = False,
):
    """Label every sample with its cheapest good-enough budget and train the router for `--budget auto`."""
    from .policy import PolicyTrainConfig
    from .policy import train_policy as run

    _quiet_transformers()
    cfg = PolicyTrainConfig(width=width, epochs=epochs, lr=lr, cost_weight=cost_weight, seed=seed, holdout=holdout)
    result = run(model, data, images or data.parent, out, cfg, batch_size, overwrite, device, dtype)
    measured = result["n_held_out"] or result["n_fit"]
    table = Table(
        title=f"budgets on {measured} {result['measured_on']} (of {result['n_samples']}; "
        "score: exact match / answer likelihood)"
    )
    for column in ["budget", "score", "mean prefill GFLOPs (vision tower + LM)"]:
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(str(row["budget"]), f"{row['score']:.3f}", f"{row['prefill_flops'] / 1e9:.4f}")
    console.print(table)
    console.print(
        f"auto chose budgets {result['rows'][-1]['chosen']} (counts per budget 0..n); the router fitted "
        f"{result['epochs_fitted']} of at most {epochs} epochs; checkpoint with policy: [bold]{result['final']}[/]"
    )


@app.command("eval")
def eval_command(
    model: ModelOpt,
    data: Annotated[Path, typer.Option(help="JSONL {image, question, answer[, task, family]} or LLaVA JSON")],
    images: Annotated[Path | None, typer.Option(help="image paths are relative to it (default: the data's)")] = None,
    method: Annotated[str, typer.Option(help="visor, base, fastv, pdrop or visionzip")] = "visor",
    budget: Annotated[
        str | None, typer.Option(help="VISOR budget: 0..n, full, auto; default: as generate (baselines: full)")
    ] = None,
    layer: Annotated[int, typer.Option(help="fastv: prune after this many layers")] = 2,
    keep: Annotated[float, typer.Option(help="fastv: fraction of visual tokens kept")] = 0.5,
    stages: Annotated[str | None, typer.Option(help="pdrop: prune after these layer counts, e.g. 6,12,18")] = None,
    ratio: Annotated[float, typer.Option(help="pdrop: lambda; stage k keeps lambda^k of the visual tokens")] = 0.5,
    dominant: Annotated[int, typer.Option(help="visionzip: dominant tokens per crop")] = 54,
    contextual: Annotated[int, typer.Option(help="visionzip: merged contextual tokens per crop")] = 10,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: Annotated[int | None, typer.Option(help="only the first N records")] = None,
    out: Annotated[Path | None, typer.Option(help="write result.json and result.md here")] = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    prefill: PrefillOpt = "auto",
    decode: DecodeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
):
    """Accuracy (exact match, ANLS), FLOPs and time of one method on a data set."""
    from .api import load
    from .evaluate import RESULT_ENTRIES, check_options, evaluate, make_setting, markdown, skipped_note, write_result
    from .generate import modes
    from .outputs import claim

    _quiet_transformers()
    check_options(batch_size, max_new_tokens, limit)
    modes(device, prefill, decode)
    setting = make_setting(method, budget, layer, keep, stages, ratio, dominant, contextual)
    inputs = [model, data, images]
    if out is not None:  # refuse a bad --out before the evaluation, not after
        claim(out, "eval", RESULT_ENTRIES, inputs, overwrite, mark=False)
    m = load(model, dtype=dtype, device=device)
    result = evaluate(
        m, data, images, setting.for_model(m), batch_size, max_new_tokens, limit, prefill=prefill, decode=decode
    )
    if result["n_skipped"]:
        print(f"warning: {skipped_note(result)}", file=sys.stderr)
    if out is not None:
        write_result(out, result, inputs, overwrite)
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, default=str))
    else:
        print(markdown(result))


@app.command()
def compare(
    model: ModelOpt,
    data: Annotated[Path, typer.Option(help="the evaluation set (e.g. data/builtin/test.jsonl)")],
    out: Annotated[Path, typer.Option(help="directory for report.md, pareto.png, results.json")],
    images: Annotated[Path | None, typer.Option(help="image paths are relative to it (default: the data's)")] = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    limit: Annotated[int | None, typer.Option(help="only the first N records")] = None,
    base: Annotated[
        Path | None, typer.Option(help="the checkpoint VISOR was trained from: the base and baselines run on it")
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    prefill: PrefillOpt = "auto",
    decode: DecodeOpt = "auto",
    overwrite: OverwriteOpt = False,
):
    """Sweep VISOR budgets and the baselines' knobs; write a table at matched FLOPs and a Pareto plot."""
    from .api import load
    from .evaluate import COMPARE_ENTRIES
    from .evaluate import compare as run
    from .generate import modes
    from .outputs import claim

    _quiet_transformers()
    modes(device, prefill, decode)
    claim(out, "compare", COMPARE_ENTRIES, [model, data, images, base], overwrite, mark=False)  # before loading
    base_model = load(base, dtype=dtype, device=device) if base is not None else None
    model_ = load(model, dtype=dtype, device=device)
    result = run(
        model_, data, out, images, None, batch_size, max_new_tokens, limit, base_model, overwrite, prefill, decode
    )
    print(Path(result["report"]).read_text())
    console.print(f"plot: [bold]{result['plot']}[/]")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="where the stages, report.md, pareto.png and results.json go")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, typer.Option("--quick", help="the same stages on a tiny budget (under 2 minutes)")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="redo every stage instead of reusing finished ones")] = False,
    seed: Annotated[int, typer.Option(help="seeds the data, the initial weights and the training order")] = 0,
):
    """The paper's story end to end on this CPU: data, base model, VISOR training, policy, comparison."""
    from .demo import run_demo

    _quiet_transformers()
    run_demo(out, quick, fresh, seed)
    print((out / "report.md").read_text().split("## Reproduce")[0])
    console.print(f"report: [bold]{out / 'report.md'}[/], plot: [bold]{out / 'pareto.png'}[/]")


data_app = typer.Typer(no_args_is_help=True, help="The built-in benchmark.")
app.add_typer(data_app, name="data")


@data_app.command("make")
def data_make(
    out: Annotated[Path, typer.Option(help="directory for images/, train/val/test.jsonl and the card")],
    seed: int = 0,
    train: Annotated[int, typer.Option(help="training samples per task")] = 800,
    val: Annotated[int, typer.Option(help="validation samples per task")] = 100,
    test: Annotated[int, typer.Option(help="test samples per task")] = 200,
    image_size: Annotated[int, typer.Option(help="image side in pixels")] = 384,
    tasks: Annotated[str | None, typer.Option(help="comma-separated subset of the tasks")] = None,
    workers: int = 2,
    overwrite: OverwriteOpt = False,
):
    """Generate the built-in benchmark (fine-grained, reasoning and global tasks), deterministically."""
    from .synth import make_dataset

    chosen = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    sizes = {"train": train, "val": val, "test": test}
    card = make_dataset(out, seed, sizes, chosen, image_size, workers, overwrite=overwrite)
    console.print(f"wrote {card['total']} samples of {len(card['tasks'])} tasks to [bold]{out}[/]")


@data_app.command("lmms-tasks")
def data_lmms_tasks(
    data: Annotated[Path, typer.Option(help="a data set made by `visor data make`")],
    out: Annotated[Path, typer.Option(help="directory for the task YAMLs (lmms-eval --include_path OUT)")],
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
    max_new_tokens: int = 16,
    overwrite: OverwriteOpt = False,
):
    """Write the built-in benchmark as lmms-eval tasks: visor_hard, visor_reasoning, visor_easy, visor_all."""
    from .lmms import write_tasks

    names = write_tasks(data, out, split, max_new_tokens, overwrite)
    console.print(f"wrote lmms-eval tasks {', '.join(names)} to [bold]{out}[/]")
    print(f"run: lmms-eval --model visor --model_args pretrained=DIR --include_path {out} --tasks {','.join(names)}")


def main() -> None:
    """Run the CLI: a user's mistake (ours or a bad option) is one `error:` line and exit code 2."""
    click = _click_exceptions()
    try:
        app(standalone_mode=False)
    except VisorError as e:
        _fail(str(e))
    except getattr(click, "NoArgsIsHelpError", ()) as e:  # `visor` or `visor data` alone: the help
        print(e.ctx.get_help())
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "visor"
        _fail(f"{command}: {e.format_message()} (see {command} --help)")
    except click.ClickException as e:
        _fail(e.format_message())
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)


def _click_exceptions():
    """click's exception module (typer >= 0.25 carries its own copy of click)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _fail(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
