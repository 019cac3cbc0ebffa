"""CPU wall-clock of the language-model prefill: Hugging Face vs. VISOR full vs. VISOR budgets.

A wide tiny model (random weights, built offline) and a prompt of N visual + M text tokens; the
visual tokens are random projector outputs, so only the language model is timed. Every method
runs in the same process, interleaved, median of several repeats.

    python benchmarks/prefill_cpu.py                       # 8 layers, hidden 512, 2000 + 64 tokens
    python benchmarks/prefill_cpu.py --budgets 0 1 2 --repeats 9 --json runs/prefill_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import visor
from visor.model import Tokens
from visor.tiny import TinySpec, build_tiny


def make_tokens(n_visual: int, n_text: int, hidden: int, vocab: int, image_at: int = 5) -> Tokens:
    """One prompt: `image_at` text tokens, then the image, then the rest of the text."""
    positions = torch.arange(n_visual + n_text)
    is_visual = (positions >= image_at) & (positions < image_at + n_visual)
    gen = torch.Generator().manual_seed(0)
    return Tokens(
        visual=torch.randn(1, n_visual, hidden, generator=gen),
        visual_pos=positions[is_visual][None],
        visual_valid=torch.ones(1, n_visual, dtype=torch.bool),
        text_ids=torch.randint(0, vocab, (1, n_text), generator=gen),
        text_pos=positions[~is_visual][None],
        text_valid=torch.ones(1, n_text, dtype=torch.bool),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--visual-tokens", type=int, default=2000)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--budgets", nargs="+", default=["2"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    spec = TinySpec(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = visor.load(build_tiny(tmp, spec))
    tok = make_tokens(args.visual_tokens, args.text_tokens, args.hidden, model.lm.cfg.vocab)
    hf_lm = model.backbone.hf.model.language_model
    order = torch.argsort(torch.cat([tok.visual_pos, tok.text_pos], 1)[0])  # back to the original sequence
    embeds = torch.cat([tok.visual, model.lm.embed_tokens(tok.text_ids)], 1)[:, order]

    budgets = [visor.Schedule.parse_budget(model.schedule, b) for b in args.budgets]
    methods = {"hf": lambda: hf_lm(inputs_embeds=embeds, use_cache=False)}
    for b in ["full", *budgets]:
        methods[f"visor:{b}"] = lambda b=b: model.lm.prefill(tok, b, capacity=args.text_tokens + 1)
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        for fn in methods.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, seconds in median.items():
        budget = "full" if name == "hf" else name.split(":")[1]
        lm_flops = model.flops(args.visual_tokens, args.text_tokens, budget).lm_prefill
        rows.append(
            {
                "method": name,
                "prefill_ms": seconds * 1e3,
                "lm_gflops": lm_flops / 1e9,
                "speedup_vs_full": median["visor:full"] / seconds,
                "speedup_vs_hf": median["hf"] / seconds,
            }
        )
    print(
        f"LM prefill on CPU ({args.threads} threads), {args.layers} layers x hidden {args.hidden}, "
        f"{args.visual_tokens} visual + {args.text_tokens} text tokens, "
        f"median of {args.repeats}, torch {torch.__version__}"
    )
    print(f"{'method':<12}{'prefill ms':>12}{'LM GFLOPs':>12}{'x vs full':>12}{'x vs hf':>10}")
    for r in rows:
        print(
            f"{r['method']:<12}{r['prefill_ms']:>12.1f}{r['lm_gflops']:>12.2f}"
            f"{r['speedup_vs_full']:>12.2f}{r['speedup_vs_hf']:>10.2f}"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
