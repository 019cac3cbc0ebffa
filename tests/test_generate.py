"""The generation path: modes chosen per device, prompts padded to buckets, the API's runner."""

import pytest
import torch
from conftest import set_visor_weights

import visor
from visor.errors import VisorError
from visor.generate import Decoder, bucket, collate, modes


def test_buckets_are_few_and_waste_at_most_an_eighth():
    sizes = range(1, 20_000)
    padded = [bucket(n) for n in sizes]
    assert all(n <= p < max(n + 16, n * 9 / 8) for n, p in zip(sizes, padded))  # 16 tokens or 1/8
    assert all(bucket(p) == p for p in padded)  # a bucket is its own bucket
    assert len(set(padded)) <= 8 * 11  # at most 8 lengths per power of two


def test_modes_per_device():
    assert modes("cpu") == ("eager", "dynamic")
    assert modes("cpu", "compile", "static") == ("compile", "static")
    with pytest.raises(VisorError, match="unknown prefill mode 'fast'"):
        modes("cpu", prefill="fast")
    with pytest.raises(VisorError, match="unknown decode mode 'fast'"):
        modes("cpu", decode="fast")
    for prefill, decode in (("graph", "auto"), ("auto", "compile-graph")):
        with pytest.raises(VisorError, match="needs a CUDA device"):
            modes("cpu", prefill, decode)


def greedy_tokens(model, samples, budgets, n_new, buckets):
    tok = collate(samples, model.backbone.image_token_id, "cpu", buckets)
    with torch.no_grad():
        logits, cache, *_ = model.lm.prefill(tok, budgets, capacity=tok.text_ids.shape[1] + n_new)
        decoder, steps = Decoder(model.lm, cache, "static"), [logits]
        for _ in range(n_new - 1):
            steps.append(decoder(steps[-1].argmax(-1)).clone())
    return tok, torch.stack(steps, 1)


@pytest.mark.parametrize("budgets", [[0, 0, 0], [2, 2, 2], ["full"] * 3, [2, 1, "full"]])
def test_prompts_padded_to_buckets_give_the_same_tokens(visor_model, images, budgets):
    """What the compiled / CUDA-graph path runs: visual and text tokens padded to bucket lengths, the
    layout fixed by the shapes alone. The padding is masked everywhere: same logits, same tokens."""
    bb = visor_model.backbone
    samples = [
        bb.encode("What is shown?", [images[0]]),
        bb.encode("Compare the two pictures, please.", [images[1], images[2]]),
        bb.encode("Is there a table?", []),
    ]
    plain_tok, plain = greedy_tokens(visor_model, samples, budgets, 6, buckets=False)
    tok, padded = greedy_tokens(visor_model, samples, budgets, 6, buckets=True)
    assert tok.text_ids.shape[1] == bucket(plain_tok.text_ids.shape[1]) > plain_tok.text_ids.shape[1]
    assert tok.visual.shape[1] == bucket(plain_tok.visual.shape[1])
    assert tok.layout == (tok.visual.shape[1] + tok.text_ids.shape[1], None)
    assert torch.equal(padded.argmax(-1), plain.argmax(-1))
    assert (padded - plain).abs().max() <= 1e-4


def test_the_api_runs_every_cpu_mode_alike(checkpoints, images):
    """``generate(prefill=, decode=)``: compiled prefill (prompts padded to buckets) and compiled or
    static decode give the eager tokens; the runner, with its compiled code, is kept across calls."""
    import torch._dynamo

    model = visor.load(checkpoints["llava-onevision"])
    set_visor_weights(model)
    prompts = ["What is shown?", "Which colour dominates in the top left quadrant of this picture?"]
    pictures = [images[0], [images[1], images[3]]]
    expected = [g.token_ids for g in model.generate(pictures, prompts, budget=1, max_new_tokens=6)]
    assert model.runner().prefill_mode == "eager" and not model.runner().buckets
    torch._dynamo.reset()
    for prefill, decode in (("compile", "static"), ("eager", "compile")):
        got = model.generate(pictures, prompts, budget=1, max_new_tokens=6, prefill=prefill, decode=decode)
        assert [g.token_ids for g in got] == expected, (prefill, decode)
        assert model.runner(prefill, decode) is model.runner(prefill, decode)
    assert model.runner("compile", "static").buckets
