"""How far apart two correct bf16 prefills are: transformers with SDPA vs. with eager attention,
and ours (`full`) vs. transformers, at a bench shape, as max |logit diff| over max |logit|.

    python benchmarks/bf16_noise.py 0.5b [visual_tokens] [device]
"""

from __future__ import annotations

import sys

import torch

from visor.bench import HF, BenchConfig, build, prompt


@torch.no_grad()
def main() -> None:
    size = sys.argv[1]
    n_visual = int(sys.argv[2]) if len(sys.argv) > 2 else 7290
    device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cuda")
    cfg = BenchConfig(size=size, visual_tokens=n_visual, text_tokens=64)
    hf, lm = build(cfg, device, torch.bfloat16)
    tok = prompt(lm, cfg, device, torch.bfloat16)
    sdpa = HF(hf).prefill(tok)[0].float()
    ours = lm.prefill(tok, "full", capacity=96)[0].float()
    hf.set_attn_implementation("eager")
    eager = HF(hf).prefill(tok)[0].float()
    scale = sdpa.abs().max()
    for name, logits in (("transformers eager attention", eager), ("ours (full)", ours)):
        diff = ((logits - sdpa).abs().max() / scale).item()
        same = torch.equal(logits.argmax(-1), sdpa.argmax(-1))
        print(f"{size} bf16 {name} vs transformers sdpa: {diff:.4f} of the max logit, same argmax: {same}")


if __name__ == "__main__":
    main()
