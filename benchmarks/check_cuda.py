"""Correctness of the CUDA fast path, run on a GPU machine (the CPU test suite covers the shared code).

1. A tiny checkpoint, float32: for every budget and every decode mode (dynamic, static, graph,
   compile, compile-graph) and the CUDA-graph prefill, the logits of every step equal the CPU
   reference's, fed the same tokens (teacher-forced); free-running greedy decoding gives the
   CPU's tokens, and `full` gives transformers' own generate tokens.
2. The same in bfloat16 against the float32 CPU reference, at bf16 tolerance (teacher-forced:
   bf16 may break a near-tie differently, after which free-running tokens rightly differ).

    python benchmarks/check_cuda.py            # exits 1 and says what differs, if anything does
    python benchmarks/check_cuda.py cpu        # the same checks on the CPU (no CUDA graphs there)
"""

from __future__ import annotations

import sys
import tempfile

import torch

import visor
from visor.backbone import load_image
from visor.generate import DECODE_MODES, Decoder, GraphedPrefill, collate
from visor.tiny import TinySpec, build_tiny

N_NEW = 8


def greedy(model, tok, budget, mode="dynamic", force=None, graphed=False):
    """Greedy tokens and every step's logits (CPU float32); ``force``: feed these tokens instead."""
    capacity = tok.text_ids.shape[1] + N_NEW
    with torch.no_grad():
        if graphed:
            logits, cache = GraphedPrefill(model.lm, budget, capacity)(tok)
        else:
            logits, cache = model.lm.prefill(tok, budget, capacity=capacity)
        decoder = Decoder(model.lm, cache, mode)
        steps, ids = [logits.float().cpu()], [logits.argmax(-1)]
        for step in range(N_NEW - 1):
            fed = ids[-1] if force is None else force[:, step].to(ids[-1].device).clone()  # contiguous, as argmax's
            logits = decoder(fed)
            steps.append(logits.float().cpu())
            ids.append(logits.argmax(-1))
    return torch.stack(ids, 1).cpu(), torch.stack(steps, 1)


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
    modes = [m for m in DECODE_MODES if device == "cuda" or not m.endswith("graph")]
    failures = []
    root = tempfile.mkdtemp()
    path = build_tiny(f"{root}/tiny", TinySpec(layers=6, hidden=64, intermediate=128))
    from PIL import Image

    image = f"{root}/im.png"
    Image.effect_noise((48, 40), 64).convert("RGB").save(image)
    prompt = "Describe the picture."
    reference = visor.load(path)
    for p in reference.lm.cross.values():  # non-zero gates: CA layers change the result
        torch.nn.init.constant_(p.gate, 0.7)
    state = reference.lm.visor_state_dict()
    tok_cpu = collate([reference.backbone.encode(prompt, [image])], reference.backbone.image_token_id, "cpu")
    expected = {b: greedy(reference, tok_cpu, b) for b in [0, 1, 2, "full"]}
    for dtype, atol in (("float32", 1e-4), ("bfloat16", 5e-2)):
        torch._dynamo.reset()  # each dtype compiles its own steps (4 budgets), within the recompile limit
        model = visor.load(path, dtype=dtype, device=device)
        model.lm.load_state_dict(state, strict=False)
        tok = collate([model.backbone.encode(prompt, [image])], model.backbone.image_token_id, device)
        for budget, (ref_ids, ref_logits) in expected.items():
            scale = ref_logits.abs().max().item()
            runs = [(mode, False) for mode in modes] + ([("graph", True)] if device == "cuda" else [])
            for mode, graphed in runs:
                _, logits = greedy(model, tok, budget, mode, force=ref_ids, graphed=graphed)
                diff = (logits - ref_logits).abs().max().item()
                ok = diff <= atol * max(1.0, scale)
                name = f"{dtype} budget {budget} {'graph prefill + ' if graphed else ''}decode {mode}"
                print(f"{name}: max |logit diff| {diff:.2e} (scale {scale:.1f}) {'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append(f"{name}: logits differ by {diff:.2e}")
            if dtype == "float32":
                ids, _ = greedy(model, tok, budget, modes[-1], graphed=device == "cuda")  # the fastest path
                same = torch.equal(ids, ref_ids)
                print(f"{dtype} budget {budget} free-running {modes[-1]}: {'same' if same else 'DIFFERENT'} tokens")
                if not same:
                    failures.append(f"{dtype} budget {budget}: tokens {ids.tolist()} vs the CPU's {ref_ids.tolist()}")
        if dtype == "float32":
            ours, _ = greedy(model, tok, "full")
            theirs = hf_greedy(model, image, prompt, N_NEW)
            same = torch.equal(ours[0], theirs)
            print(f"full vs transformers' generate: {'same tokens' if same else 'DIFFERENT tokens'}")
            if not same:
                failures.append(f"full vs HF: {ours[0].tolist()} vs {theirs.tolist()}")
    print("all checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
