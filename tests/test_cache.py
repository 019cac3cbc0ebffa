"""KV-cached decoding, batching and budgets on a converted model with non-zero CA gates."""

import pytest
import torch
from conftest import extended, greedy

from visor.generate import collate

BUDGETS = [0, 1, 2, "full"]  # 2 = every SA candidate of the 6-layer default schedule


def prefill_logits(model, sample, budget):
    tok = collate([sample], model.backbone.image_token_id, "cpu")
    with torch.no_grad():
        return model.lm.prefill(tok, budget, capacity=tok.text_ids.shape[1])[0][0]


@pytest.mark.parametrize("budget", BUDGETS)
def test_cached_decode_equals_prefill_from_scratch(visor_model, images, budget):
    sample = visor_model.backbone.encode("Describe the picture.", [images[1]])
    tokens, logits = greedy(visor_model, [sample], 6, budget)
    for step in range(1, 6):
        longer = extended(sample, tokens[0, :step].tolist())
        assert (prefill_logits(visor_model, longer, budget) - logits[0, step]).abs().max() <= 1e-4


@pytest.mark.parametrize("budget", BUDGETS)
def test_batched_equals_one_by_one(visor_model, images, budget):
    bb = visor_model.backbone
    samples = [
        bb.encode("What is shown?", [images[0]]),
        bb.encode("Which colour dominates in the top left quadrant of this picture?", [images[3]]),
        bb.encode("Compare the two.", [images[1], images[2]]),  # two images in one prompt
        bb.encode("Is there a table?", []),  # no image at all
    ]
    assert len({s.visual.shape[0] for s in samples}) >= 3 and len({len(s.ids) for s in samples}) == 4
    tokens, logits = greedy(visor_model, samples, 8, budget)
    for b, sample in enumerate(samples):
        one_tokens, one_logits = greedy(visor_model, [sample], 8, budget)
        assert torch.equal(one_tokens[0], tokens[b])
        assert (one_logits[0] - logits[b]).abs().max() <= 1e-4


def test_budgets_change_the_computation(visor_model, images):
    sample = visor_model.backbone.encode("What is shown?", [images[1]])
    logits = {b: prefill_logits(visor_model, sample, b) for b in BUDGETS}
    for a in BUDGETS:
        for b in BUDGETS:
            if a != b:
                assert (logits[a] - logits[b]).abs().max() > 1e-3, (a, b)


def test_zero_gates_make_ca_a_no_op(checkpoints, arch, images):
    """A freshly converted model: each CA layer equals a text-only layer."""
    import visor

    model = visor.load(checkpoints[arch])
    text_only = visor.load(checkpoints[arch], schedule="sa,text,text,sa,text,text")
    sample = model.backbone.encode("What is shown?", [images[0]])
    for budget in [0, 1, 2]:
        assert torch.allclose(
            prefill_logits(model, sample, budget), prefill_logits(text_only, sample, budget), atol=1e-5
        )


def test_sampling_is_seeded_and_respects_top_p(visor_model, images):
    kwargs = dict(budget=1, max_new_tokens=12, temperature=1.0)
    a = visor_model.generate(images[0], "What is shown?", seed=1, **kwargs)
    b = visor_model.generate(images[0], "What is shown?", seed=1, **kwargs)
    c = visor_model.generate(images[0], "What is shown?", seed=2, **kwargs)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    greedy_ids = visor_model.generate(images[0], "What is shown?", budget=1, max_new_tokens=12).token_ids
    nucleus = visor_model.generate(images[0], "What is shown?", seed=3, top_p=1e-6, **kwargs).token_ids
    assert nucleus == greedy_ids  # a tiny nucleus holds only the most likely token


def test_generation_stops_on_eos_and_max_new_tokens(visor_model, images):
    g = visor_model.generate(images[0], "What is shown?", budget=0, max_new_tokens=5)
    assert 1 <= len(g.token_ids) <= 5
    eos = visor_model.backbone.eos_token_ids
    assert all(t not in eos for t in g.token_ids[:-1])
    if len(g.token_ids) < 5:
        assert g.token_ids[-1] in eos
    # force EOS: make it the most likely token everywhere
    with torch.no_grad():
        head = visor_model.lm.lm_head
        bias = torch.zeros(head.weight.shape[0])
        bias[min(eos)] = 1e4
        head.bias = torch.nn.Parameter(bias)
    g = visor_model.generate(images[0], "What is shown?", budget=0, max_new_tokens=5)
    assert g.token_ids == [min(eos)]


def test_per_sample_budgets_in_one_batch(visor_model, images):
    """One batch, one budget per sample (what `auto` produces) == each sample alone."""
    bb = visor_model.backbone
    samples = [bb.encode("What is shown?", [images[i]]) for i in range(4)]
    budgets = [0, 2, "full", 1]
    tokens, logits = greedy(visor_model, samples, 6, budgets)
    for b, (sample, budget) in enumerate(zip(samples, budgets)):
        one_tokens, one_logits = greedy(visor_model, [sample], 6, budget)
        assert torch.equal(one_tokens[0], tokens[b])
        assert (one_logits[0] - logits[b]).abs().max() <= 1e-4


@pytest.mark.parametrize("budget", BUDGETS)
def test_static_decode_equals_dynamic_decode(visor_model, images, budget):
    """Fixed-shape steps over the whole preallocated cache (what CUDA graphs replay) give the
    same tokens and logits as steps over the filled slots, for a batch of unequal prompts."""
    bb = visor_model.backbone
    samples = [
        bb.encode("What is shown?", [images[0]]),
        bb.encode("Compare the two pictures, please.", [images[1], images[2]]),
        bb.encode("Is there a table?", []),
    ]
    dynamic_tokens, dynamic_logits = greedy(visor_model, samples, 10, budget, "dynamic")
    static_tokens, static_logits = greedy(visor_model, samples, 10, budget, "static")
    assert torch.equal(static_tokens, dynamic_tokens)
    assert (static_logits - dynamic_logits).abs().max() <= 1e-5


def test_decode_step_compiles_to_one_graph(visor_model, images):
    """The static step has no graph break and no host sync: torch.compile(fullgraph=True)
    traces it whole, and the compiled steps give the dynamic tokens."""
    import torch._dynamo

    from visor.generate import collate

    bb = visor_model.backbone
    samples = [bb.encode("What is shown?", [images[0]]), bb.encode("Describe it.", [images[3]])]
    expected, _ = greedy(visor_model, samples, 6, 1, "dynamic")
    tok = collate(samples, bb.image_token_id, "cpu")
    torch._dynamo.reset()
    with torch.no_grad():
        logits, cache, *_ = visor_model.lm.prefill(tok, 1, capacity=tok.text_ids.shape[1] + 6)
        step = torch.compile(visor_model.lm.decode_one_token, fullgraph=True, backend="eager")
        tokens, input_pos = [logits.argmax(-1)], torch.tensor([cache.n_prompt])
        for _ in range(5):
            tokens.append(step(tokens[-1], cache, input_pos).argmax(-1))
            input_pos += 1  # the caller's counter, outside the compiled step
    assert torch.equal(torch.stack(tokens, 1), expected)


def test_unknown_decode_mode_and_graph_without_cuda(visor_model, images):
    from visor.errors import VisorError

    with pytest.raises(VisorError, match="unknown decode mode"):
        visor_model.generate(images[0], "What is shown?", decode="fast")
    for mode in ("graph", "compile-graph"):
        with pytest.raises(VisorError, match="needs a CUDA device"):
            visor_model.generate(images[0], "What is shown?", decode=mode)


def test_one_image_without_padding_joins_by_concatenation(visor_model, images):
    """The SA layers' fast path (a concat instead of a scatter) is taken exactly where it is valid;
    the HF-equivalence and batched-vs-one-by-one tests check both paths' numbers."""
    from visor.layout import Context

    bb, lm = visor_model.backbone, visor_model.lm

    def block(samples):
        tok = collate(samples, bb.image_token_id, "cpu")
        return Context.build(tok, lm.rotary, torch.float32, with_rope=True).block

    one = bb.encode("What is shown?", [images[0]])
    assert block([one]) == one.ids.index(bb.image_token_id)
    # there, cross-attention needs no mask: a text token sees every visual token or none
    tok = collate([one, one], bb.image_token_id, "cpu")
    ctx = Context.build(tok, lm.rotary, torch.float32, with_rope=True)
    assert ctx.mask_tv is None
    by_hand = torch.tensor([[p > one.ids.index(bb.image_token_id) for p in row] for row in tok.text_pos.tolist()])
    assert torch.equal(ctx.seen[..., 0], by_hand) and 0 < int(ctx.seen.sum()) < ctx.seen.numel()
    assert block([one, one]) == block([one])  # same layout in every row
    assert block([one, bb.encode("Which colour dominates here?", [images[0]])]) is None  # padded text
    assert block([bb.encode("Compare the two.", [images[1], images[2]])]) is None  # two runs of visual tokens
    assert block([bb.encode("Is there a table?", [])]) is None


def test_prefill_with_a_known_layout_skips_the_host_sync(visor_model, images, monkeypatch):
    """What a CUDA-graph prefill captures: with ``tok.layout`` given (``Context.layout_of``, what
    GraphedPrefill reads, is the built Context's), the Context is built without the one host sync
    (``Context.layout`` is not called) and the prefill is the same."""
    import dataclasses

    from visor.layout import Context

    bb, lm = visor_model.backbone, visor_model.lm
    one = bb.encode("What is shown?", [images[0]])
    for samples in ([one], [one, bb.encode("Compare the two.", [images[1], images[2]])]):  # concat / scatter
        tok = collate(samples, bb.image_token_id, "cpu")
        ctx = Context.build(tok, lm.rotary, torch.float32, with_rope=True)
        assert Context.layout_of(tok) == (ctx.seq, ctx.block)
        known = dataclasses.replace(tok, layout=Context.layout_of(tok))
        with torch.no_grad():
            expected = {b: lm.prefill(tok, b, capacity=64)[0] for b in BUDGETS}
            with monkeypatch.context() as m:
                m.setattr(Context, "layout", lambda *a: pytest.fail("host sync with a known layout"))
                for budget in BUDGETS:
                    assert torch.equal(lm.prefill(known, budget, capacity=64)[0], expected[budget])


def test_compiled_layers_give_the_eager_prefill(visor_model, images):
    """Prefill mode ``compile`` (``lm.compiled``): every layer's pieces through torch.compile, the
    code compiled once per piece and shape and shared by all layers; the prefill (logits and
    cache) is the eager one for every budget and both layouts (concat / scatter); outside it the
    layers are eager again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from visor.generate import Prefill

    bb, lm = visor_model.backbone, visor_model.lm
    one = bb.encode("What is shown?", [images[0]])
    batches = [[one], [one, bb.encode("Compare the two.", [images[1], images[2]])]]
    toks = [collate(samples, bb.image_token_id, "cpu") for samples in batches]
    with torch.no_grad():
        expected = [[lm.prefill(tok, b, capacity=64) for b in BUDGETS] for tok in toks]
    torch._dynamo.reset()
    counters.clear()
    Prefill(lm, "full", 64, "compile")(toks[0])  # every layer SA: one qkv and one finish for all layers
    assert counters["stats"]["unique_graphs"] == 2 < lm.cfg.n_layers
    for tok, runs in zip(toks, expected):
        for budget, (logits, cache, *_) in zip(BUDGETS, runs):
            got, got_cache, *_ = Prefill(lm, budget, 64, "compile")(tok)
            assert (got - logits).abs().max() <= 1e-5
            for i in range(lm.cfg.n_layers):
                assert (got_cache.layers[i].k - cache.layers[i].k).abs().max() <= 1e-5
    assert not counters["graph_break"]
    assert "qkv" not in lm.layers[0].__dict__ and "forward" not in next(iter(lm.cross.values())).__dict__
    with lm.compiled():
        assert "qkv" in lm.layers[0].__dict__


def test_prefill_modes(visor_model):
    from visor.errors import VisorError
    from visor.generate import Prefill

    with pytest.raises(VisorError, match="unknown prefill mode"):
        Prefill(visor_model.lm, 1, 40, "fast")
    for mode in ("graph", "compile-graph"):
        with pytest.raises(VisorError, match="needs a CUDA device"):
            Prefill(visor_model.lm, 1, 40, mode)


def test_graphed_prefill_needs_cuda_and_a_fixed_budget(visor_model, images):
    from visor.errors import VisorError
    from visor.generate import GraphedPrefill

    tok = collate(
        [visor_model.backbone.encode("What is shown?", [images[0]])], visor_model.backbone.image_token_id, "cpu"
    )
    with pytest.raises(VisorError, match="needs a CUDA device"):
        GraphedPrefill(visor_model.lm, 1, capacity=64)(tok)
    for routed in ("auto", [1, "auto"]):
        with pytest.raises(VisorError, match="fixed budget"):
            GraphedPrefill(visor_model.lm, routed, capacity=64)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_decode_steps_concatenate_no_keys_or_values(visor_model, images, monkeypatch, mode):
    """An SA layer's visual and text K/V share one [visual | text] buffer: a decode step attends over
    a view of it. torch.cat along the sequence of 4-D (K/V-shaped) tensors is made to fail."""
    from visor.generate import Decoder

    bb, lm = visor_model.backbone, visor_model.lm
    samples = [bb.encode("What is shown?", [images[0]]), bb.encode("Compare them.", [images[1], images[2]])]
    samples.append(bb.encode("Is there a table?", []))
    budgets = [2, 1, "full"]
    tok = collate(samples, bb.image_token_id, "cpu")
    reference, _ = greedy(visor_model, samples, 5, budgets, mode)
    cat = torch.cat

    def no_kv_cat(tensors, dim=0, **kw):
        if tensors[0].dim() == 4 and dim in (2, -2):
            raise AssertionError("K/V concatenated along the sequence in a decode step")
        return cat(tensors, dim, **kw)

    with torch.no_grad():
        logits, cache, *_ = lm.prefill(tok, budgets, capacity=tok.text_ids.shape[1] + 5)
        monkeypatch.setattr(torch, "cat", no_kv_cat)
        decoder, tokens = Decoder(lm, cache, mode), [logits.argmax(-1)]
        for _ in range(4):
            tokens.append(decoder(tokens[-1]).argmax(-1))
    assert torch.equal(torch.stack(tokens, 1), reference)
    # the buffers, from the schedule: SA layers (of any sample's budget) hold [visual | text], the rest text
    sa_layers = set().union(*(visor_model.schedule.active_sa(b) for b in budgets))
    n_visual, capacity, elem = tok.visual.shape[1], cache.capacity, 4 * lm.cfg.n_kv_heads * lm.cfg.head_dim
    per_layer = [(n_visual if i in sa_layers else 0) + capacity for i in range(lm.cfg.n_layers)]
    assert [layer.n_visual for layer in cache.layers] == [n - capacity for n in per_layer]
    cross = sum(2 * 3 * n_visual * elem for kv in cache.cross if kv is not None)  # 3 samples
    assert cache.nbytes() == sum(2 * 3 * n * elem for n in per_layer) + cross


def test_a_decode_step_writes_only_its_slot(visor_model, images):
    """A static step at input_pos p changes the cache only at text slot p of each layer's K/V: nothing
    else (no mask, no counter), so CUDA-graph warm-up steps need no undoing and a step run twice at
    the same position gives the same logits."""
    bb, lm = visor_model.backbone, visor_model.lm
    tok = collate([bb.encode("What is shown?", [images[0]]), bb.encode("Hi?", [])], bb.image_token_id, "cpu")
    with torch.no_grad():
        logits, cache, *_ = lm.prefill(tok, 2, capacity=tok.text_ids.shape[1] + 3)

        def tensors():
            own = [t for layer in cache.layers for t in (layer.k, layer.v, layer.valid)]
            return own + [t for kv in cache.cross if kv is not None for t in kv] + [cache.text_valid, cache.rope_offset]

        before = [t.clone() for t in tensors()]
        input_pos = torch.tensor([cache.n_prompt + 1])
        first = lm.decode_one_token(logits.argmax(-1), cache, input_pos)
        n_layer_tensors = 3 * len(cache.layers)
        for i, (t, old) in enumerate(zip(tensors(), before)):
            if i < n_layer_tensors and i % 3 < 2:  # a layer's K or V: only the written slot
                slot = cache.layers[i // 3].n_visual + cache.n_prompt + 1
                assert (t != old).any(dim=(0, 1, 3)).nonzero().flatten().tolist() == [slot]
            else:
                assert torch.equal(t, old)
        again = lm.decode_one_token(logits.argmax(-1), cache, input_pos)
    assert torch.equal(first, again)
