"""Correctness of the CUDA fast path, run on a GPU machine (the CPU test suite covers the shared code).

1. A tiny checkpoint in bfloat16 against the float32 CPU reference, at bf16 tolerance: for every
   budget and every decode mode (dynamic, static, graph, compile, compile-graph) and the graph and
   compile-graph prefills, the logits of every step, fed the CPU's tokens (teacher-forced: bf16
   may break a near-tie differently, after which free-running tokens rightly differ).
2. The same in float32 at float32 tolerance; there free-running greedy decoding on the fastest
   path gives the CPU's tokens too, and `full` gives transformers' own generate tokens.
3. The API path, what users run: ``VisorModel.generate`` with its default modes (compile-graph
   prefill and decode on CUDA, prompts padded to buckets) on a batch of unequal prompts, in
   float32: the CPU's tokens for every budget, and a second batch (the same prompts in other rows)
   in the same buckets replays the graphs captured for the first (no new capture).

4. ``families``: the other model families (Qwen2.5-VL, Qwen3-VL: M-RoPE positions and DeepStack in
   the CUDA-graph prefill; InternVL) through the API path in float32: the CPU's tokens for budgets
   1 and full on a batch of unequal prompts.

    python benchmarks/check_cuda.py            # exits 1 and says what differs, if anything does
    python benchmarks/check_cuda.py cpu        # the same checks on the CPU (no CUDA graphs there)
    python benchmarks/check_cuda.py cuda families   # check 4 alone (cpu families: its dry run)
"""

from __future__ import annotations

import sys
import tempfile

import torch

import visor
from visor.backbone import load_image
from visor.generate import DECODE_MODES, Decoder, Prefill, bucket, collate
from visor.tiny import TinySpec, build_tiny

N_NEW = 8


def greedy(model, tok, budget, mode="dynamic", force=None, prefill="eager"):
    """Greedy tokens and every step's logits (CPU float32); ``force``: feed these tokens instead."""
    capacity = tok.text_ids.shape[1] + N_NEW
    with torch.no_grad():
        logits, cache, *_ = Prefill(model.lm, budget, capacity, prefill)(tok)
        decoder = Decoder(model.lm, cache, mode)
        steps, ids = [logits.float().cpu()], [logits.argmax(-1)]
        for step in range(N_NEW - 1):
            fed = ids[-1] if force is None else force[:, step].to(ids[-1].device).clone()  # contiguous, as argmax's
            logits = decoder(fed)
            steps.append(logits.float().cpu())
            ids.append(logits.argmax(-1))
    return torch.stack(ids, 1).cpu(), torch.stack(steps, 1)


def load_visor_state(model, state):
    """Copy VISOR's tensors (by checkpoint name) into a model's."""
    with torch.no_grad():
        for name, tensor in model.lm.visor_state_dict().items():
            tensor.copy_(state[name])


def hf_greedy(model, image, prompt, n_new):
    """transformers' own generate on the same checkpoint (LLaVA-OneVision inputs)."""
    bb = model.backbone
    ids = torch.tensor([bb.encode(prompt, [image]).ids], device=bb.device)
    inputs = {k: v.to(bb.device) for k, v in bb.image_processor([[load_image(image)]], return_tensors="pt").items()}
    with torch.no_grad():
        out = bb.hf.generate(input_ids=ids, **inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    return out[0, ids.shape[1] :].cpu()


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU path (pass `cpu` to run its checks on the CPU)")
        return 1
    if sys.argv[2:] == ["families"]:
        failures = families(device)
        print("all checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures))
        return 1 if failures else 0
    modes = [m for m in DECODE_MODES if device == "cuda" or not m.endswith("graph")]
    # (decode, prefill) beside every decode mode with the eager prefill; the last is the fastest path
    prefills = [("graph", "graph"), ("compile-graph", "compile-graph")] if device == "cuda" else [("compile",) * 2]
    failures = []
    root = tempfile.mkdtemp()
    path = build_tiny(f"{root}/tiny", TinySpec(layers=6, hidden=64, intermediate=128))
    from PIL import Image

    image = f"{root}/im.png"
    Image.effect_noise((48, 40), 64).convert("RGB").save(image)
    prompt = "Describe the picture."
    reference = visor.load(path, dtype="float32", device="cpu")  # the CPU float32 reference
    for p in reference.lm.cross.values():  # non-zero gates: CA layers change the result
        torch.nn.init.constant_(p.gate, 0.7)
    state = reference.lm.visor_state_dict()
    tok_cpu = collate([reference.backbone.encode(prompt, [image])], reference.backbone.image_token_id, "cpu")
    expected = {b: greedy(reference, tok_cpu, b) for b in [0, 1, 2, "full"]}
    torch._dynamo.config.recompile_limit = 32  # the decode step compiles per budget and cache layout
    for dtype, atol in (("bfloat16", 5e-2), ("float32", 1e-4)):
        torch._dynamo.reset()  # each dtype compiles its own steps
        model = visor.load(path, dtype=dtype, device=device)
        load_visor_state(model, state)
        tok = collate([model.backbone.encode(prompt, [image])], model.backbone.image_token_id, device)
        for budget, (ref_ids, ref_logits) in expected.items():
            scale = ref_logits.abs().max().item()
            for mode, prefill in [(mode, "eager") for mode in modes] + prefills:
                _, logits = greedy(model, tok, budget, mode, force=ref_ids, prefill=prefill)
                diff = (logits - ref_logits).abs().max().item()
                ok = diff <= atol * max(1.0, scale)
                name = f"{dtype} budget {budget} prefill {prefill} + decode {mode}"
                print(f"{name}: max |logit diff| {diff:.2e} (scale {scale:.1f}) {'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append(f"{name}: logits differ by {diff:.2e}")
            if dtype == "float32":
                mode, prefill = prefills[-1]
                ids, _ = greedy(model, tok, budget, mode, prefill=prefill)
                same = torch.equal(ids, ref_ids)
                print(f"{dtype} budget {budget} free-running {prefill} + {mode}: {'same' if same else 'DIFFERENT'}")
                if not same:
                    failures.append(f"{dtype} budget {budget}: tokens {ids.tolist()} vs the CPU's {ref_ids.tolist()}")
        if dtype == "float32":
            ours, _ = greedy(model, tok, "full")
            theirs = hf_greedy(model, image, prompt, N_NEW)
            same = torch.equal(ours[0], theirs)
            print(f"full vs transformers' generate: {'same tokens' if same else 'DIFFERENT tokens'}")
            if not same:
                failures.append(f"full vs HF: {ours[0].tolist()} vs {theirs.tolist()}")
    failures += api_path(path, state, image, device)
    print("all checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


def api_path(path, state, image, device) -> list[str]:
    """Check 3 (see the module docstring); returns what failed."""
    failures = []
    prompts, pictures = ["Describe the picture.", "What colour is it?", "Is there text?"], [[image], [image, image], []]
    batches = [(prompts, pictures), (prompts[::-1], pictures[::-1])]  # other rows, the same longest lengths
    reference = visor.load(path, dtype="float32", device="cpu")  # the CPU float32 reference
    load_visor_state(reference, state)
    model = visor.load(path, dtype="float32", device=device)
    load_visor_state(model, state)
    runner = model.runner()
    print(f"API path on {device}: prefill {runner.prefill_mode}, decode {runner.decode_mode}, buckets {runner.buckets}")

    def shapes(prompts, pictures):
        samples = model.encode(prompts, pictures)
        n_visual = [s.visual.shape[0] for s in samples]
        return bucket(max(n_visual)), bucket(max(len(s.ids) - n for s, n in zip(samples, n_visual)))

    if shapes(*batches[0]) != shapes(*batches[1]):
        failures.append("API path: the two batches fall in different buckets; pick closer prompts")
    for budget in [1, 2, "full"]:
        for prompts, pictures in batches:
            expected = [g.token_ids for g in reference.generate(pictures, prompts, budget=budget, max_new_tokens=N_NEW)]
            got = [g.token_ids for g in model.generate(pictures, prompts, budget=budget, max_new_tokens=N_NEW)]
            same = got == expected
            print(f"API float32 budget {budget}: {'same tokens' if same else 'DIFFERENT tokens'} as the CPU's")
            if not same:
                failures.append(f"API budget {budget}: {got} vs the CPU's {expected}")
    graphs = sum(len(p.graphed.graphs) for p in runner.prefills.values() if p.graphed is not None)
    if device == "cuda" and graphs != 3:
        failures.append(f"API path: {graphs} prefill graphs captured for 3 budgets x 2 batches in one bucket (want 3)")
    print(f"API path: {graphs} prefill graphs for 3 budgets, 2 batches each")
    return failures


def families(device) -> list[str]:
    """Check 4 (see the module docstring); returns what failed."""
    from PIL import Image

    failures, root = [], tempfile.mkdtemp()
    images = []
    for i, size in enumerate([(48, 40), (70, 50)]):
        images.append(f"{root}/im{i}.png")
        Image.effect_noise(size, 64).convert("RGB").save(images[-1])
    prompts, pictures = ["Describe the picture.", "Compare the two.", "Is there text?"], [images[:1], images, []]
    for arch in ("qwen2.5-vl", "qwen3-vl", "internvl"):
        path = build_tiny(f"{root}/{arch}", TinySpec(arch=arch))
        reference = visor.load(path, dtype="float32", device="cpu")
        for p in reference.lm.cross.values():  # non-zero gates: CA layers change the result
            torch.nn.init.constant_(p.gate, 0.7)
        model = visor.load(path, dtype="float32", device=device)
        load_visor_state(model, reference.lm.visor_state_dict())
        # the default (fastest) modes on CUDA; on the CPU the compiled prefill and the static decode
        modes = {} if device == "cuda" else {"prefill": "compile", "decode": "static"}
        runner = model.runner(**modes)
        for budget in [1, "full"]:
            expected = [g.token_ids for g in reference.generate(pictures, prompts, budget=budget, max_new_tokens=N_NEW)]
            generated = model.generate(pictures, prompts, budget=budget, max_new_tokens=N_NEW, **modes)
            same = [g.token_ids for g in generated] == expected
            name = f"{arch} ({runner.prefill_mode} + {runner.decode_mode}) budget {budget}"
            print(f"{name}: {'same tokens' if same else 'DIFFERENT tokens'} as the CPU float32 eager path")
            if not same:
                failures.append(f"{name}: {[g.token_ids for g in generated]} vs the CPU's {expected}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
