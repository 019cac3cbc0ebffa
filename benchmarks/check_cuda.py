"""Correctness of the CUDA fast path, run on a GPU machine (the CPU test suite covers the shared code).

1. A tiny checkpoint, float32: the CUDA forward equals the CPU reference (prefill and every decode
   step, every budget) and transformers' own greedy tokens for `full`.
2. The same in bfloat16 against the float32 CPU reference, at bf16 tolerance.
3. Every decode mode (dynamic, static, graph, compile, compile-graph) gives the dynamic mode's tokens.

    python benchmarks/check_cuda.py            # exits 1 and says what differs, if anything does
    python benchmarks/check_cuda.py cpu        # the same checks on the CPU (no CUDA graphs there)
"""

from __future__ import annotations

import sys
import tempfile

import torch

import visor
from visor.backbone import load_image
from visor.generate import DECODE_MODES, Decoder, collate
from visor.tiny import TinySpec, build_tiny


def greedy(model, tok, budget, n_new, mode="dynamic"):
    with torch.no_grad():
        logits, cache = model.lm.prefill(tok, budget, capacity=tok.text_ids.shape[1] + n_new)
        decoder = Decoder(model.lm, cache, mode)
        steps, ids = [logits.float().cpu()], [logits.argmax(-1)]
        for _ in range(n_new - 1):
            logits = decoder(ids[-1])
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
    for dtype, atol in (("float32", 1e-4), ("bfloat16", 5e-2)):
        model = visor.load(path, dtype=dtype, device=device)
        model.lm.load_state_dict(state, strict=False)
        samples_cpu = [reference.backbone.encode(prompt, [image])]
        samples_gpu = [model.backbone.encode(prompt, [image])]
        tok_cpu = collate(samples_cpu, reference.backbone.image_token_id, "cpu")
        tok_gpu = collate(samples_gpu, model.backbone.image_token_id, device)
        for budget in [0, 1, 2, "full"]:
            ids_cpu, logits_cpu = greedy(reference, tok_cpu, budget, 8)
            ids_gpu, logits_gpu = greedy(model, tok_gpu, budget, 8)
            diff = (logits_cpu - logits_gpu).abs().max().item()
            scale = logits_cpu.abs().max().item()
            ok = diff <= atol * max(1.0, scale)
            print(f"{dtype} budget {budget}: max |logit diff| {diff:.2e} (scale {scale:.1f}) {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"{dtype} budget {budget}: logits differ by {diff:.2e}")
            for mode in modes:
                ids_mode, _ = greedy(model, tok_gpu, budget, 8, mode)
                same = torch.equal(ids_mode, ids_gpu)
                print(f"  decode {mode}: {'same tokens' if same else 'DIFFERENT tokens'}")
                if not same:
                    failures.append(f"{dtype} budget {budget}: decode {mode} changes the tokens")
        if dtype == "float32":
            ours, _ = greedy(model, tok_gpu, "full", 8)
            theirs = hf_greedy(model, image, prompt, 8)
            same = torch.equal(ours[0], theirs)
            print(f"full vs transformers' generate: {'same tokens' if same else 'DIFFERENT tokens'}")
            if not same:
                failures.append(f"full vs HF: {ours[0].tolist()} vs {theirs.tolist()}")
    print("all checks passed" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
