import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.decoding import SamplingConfig, attend_sizes, generate, prompt_positions, sampling_logits
from jaxalign.logprobs import token_logps
from jaxalign.metrics import compilations
from jaxalign.models import forward, forward_with_cache, get_config, init_cache, init_params
from tests._tolerance import ulps

CONFIGS = {
    "gpt2": get_config("gpt2-tiny", vocab_size=97, max_seq_len=64),
    "llama": get_config("llama-tiny", vocab_size=97, max_seq_len=64),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    config = CONFIGS[request.param]
    # larger init so that greedy decoding is not dominated by one token
    params = jax.tree.map(lambda x: x * 4, init_params(config, jax.random.key(1)))
    return config, params


def teacher_forced(config, params, prompt, mask, gen):
    """token_logps of the generated tokens under one full forward pass over prompt + completion."""
    tokens = jnp.concatenate([prompt, gen.tokens], axis=1)
    pos = prompt_positions(jnp.concatenate([mask, jnp.ones_like(gen.tokens)], axis=1))
    logits = forward(params, config, tokens, pos)
    p = prompt.shape[1]
    return token_logps(logits[:, p - 1 : -1], gen.tokens)


def test_cached_decoding_equals_full_forward(model):
    config, params = model
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 97, (2, 12)))
    full = forward(params, config, tokens)
    cache = init_cache(config, 2, 12)
    logits, cache = forward_with_cache(params, config, tokens[:, :5], cache)  # prefill
    steps = [logits]
    for t in range(5, 12):
        logits, cache = forward_with_cache(params, config, tokens[:, t : t + 1], cache)
        steps.append(logits)
    # The cache reorders the 64-term (d_model) sums of 2 layers: 2·64 ulps of the largest logit
    # (measured <= 5.4 ulps here and with --xla_cpu_max_isa=SSE4_2).
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=0, atol=ulps(128, full))
    assert int(cache.length) == 12


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)])
def test_generation_logps_equal_teacher_forced(model, sampling):
    config, params = model
    prompt = jnp.asarray(np.random.RandomState(2).randint(0, 97, (3, 6)))
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    gen = generate(params, config, prompt, mask, rng=jax.random.key(3), sampling=SamplingConfig(max_new_tokens=10, **sampling))
    assert gen.tokens.shape == (3, 10) and float(gen.mask.sum()) == 30
    ref = teacher_forced(config, params, prompt, mask, gen)
    # cached vs one pass: 2·64 ulps of the logits (see above), doubled for the 97-way log-softmax;
    # measured <= 11 ulps of max|logp|
    np.testing.assert_allclose(gen.model_logps, ref, rtol=0, atol=ulps(256, ref))
    if sampling == dict(temperature=1.0):  # the same logits, divided by 1: measured equal
        np.testing.assert_allclose(gen.logps, gen.model_logps, rtol=0, atol=ulps(16, gen.model_logps))
    else:  # the sampling distribution differs from the model's
        assert not np.allclose(gen.logps, gen.model_logps, atol=1e-3)


def test_left_padding_does_not_change_greedy_completion(model):
    config, params = model
    prompt = np.random.RandomState(4).randint(0, 97, (5,))
    outs = []
    for pad in (0, 3, 7):
        toks = jnp.asarray(np.concatenate([np.full(pad, 11), prompt])[None])
        mask = jnp.asarray(np.concatenate([np.zeros(pad), np.ones(5)])[None])
        outs.append(generate(params, config, toks, mask, rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=12, temperature=0.0)))
    for g in outs[1:]:
        np.testing.assert_array_equal(g.tokens, outs[0].tokens)
        # padded rows sum over more (masked) keys: 256 ulps as in the teacher-forced test; measured <= 8
        np.testing.assert_allclose(g.model_logps, outs[0].model_logps, rtol=0, atol=ulps(256, outs[0].model_logps))


def test_batched_rows_with_different_padding_match_single_rows(model):
    config, params = model
    rng = np.random.RandomState(5)
    lengths = [8, 3, 5]
    prompts = [rng.randint(0, 97, (n,)) for n in lengths]
    width = max(lengths)
    toks = jnp.asarray(np.stack([np.concatenate([np.full(width - n, 0), p]) for n, p in zip(lengths, prompts)]))
    mask = jnp.asarray(np.stack([np.concatenate([np.zeros(width - n), np.ones(n)]) for n in lengths]))
    batched = generate(params, config, toks, mask, rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=8, temperature=0.0))
    for i, p in enumerate(prompts):
        single = generate(params, config, jnp.asarray(p[None]), jnp.ones((1, len(p))),
                          rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=8, temperature=0.0))
        np.testing.assert_array_equal(batched.tokens[i], single.tokens[0])


def test_sliding_window_decoding_equals_windowed_attention(model):
    config, params = model
    window = 4
    wconfig = config.replace(sliding_window=window)
    prompt = jnp.asarray(np.random.RandomState(6).randint(0, 97, (2, 7)))  # longer than the window
    mask = jnp.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    gen = generate(params, wconfig, prompt, mask, rng=jax.random.key(1), sampling=SamplingConfig(max_new_tokens=9, temperature=1.0))
    assert init_cache(wconfig, 2, 16).size == window  # rolling buffer: O(window) memory
    # cached vs one pass: 256 ulps of max|logp| (see above); measured <= 5.4
    np.testing.assert_allclose(
        gen.model_logps, teacher_forced(wconfig, params, prompt, mask, gen), rtol=0, atol=ulps(256, gen.model_logps)
    )
    # and the window really restricts attention: full-attention log-probs differ
    assert not np.allclose(gen.model_logps, teacher_forced(config, params, prompt, mask, gen), atol=1e-3)


def test_rolling_cache_multi_token_chunks(model):
    """Chunks of several tokens into a rolling buffer must still see the keys they overwrite."""
    config, params = model
    wconfig = config.replace(sliding_window=3)
    tokens = jnp.asarray(np.random.RandomState(7).randint(0, 97, (1, 11)))
    full = forward(params, wconfig, tokens)
    cache = init_cache(wconfig, 1, 11)
    outs = []
    for a, b in ((0, 4), (4, 6), (6, 9), (9, 10), (10, 11)):
        logits, cache = forward_with_cache(params, wconfig, tokens[:, a:b], cache)
        outs.append(logits)
    # Chunks reorder the 64-term sums of 2 layers: 2·64 ulps of the largest logit (|logit| ~ 8).
    # Measured 7 ulps here (6 with SSE4.2), 11.5 on AVX-512, where atol=1e-5 (11 ulps) failed.
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=0, atol=ulps(128, full))


def test_eos_stops_each_row(model):
    config, params = model
    prompt = jnp.asarray(np.random.RandomState(8).randint(0, 97, (2, 4)))
    mask = jnp.ones((2, 4))
    free = generate(params, config, prompt, mask, rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=10, temperature=0.0))
    eos = int(free.tokens[0, 3])  # row 0 emits this at step 3 (maybe earlier)
    first0 = int(np.argmax(np.asarray(free.tokens[0]) == eos))
    gen = generate(params, config, prompt, mask, rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=10, temperature=0.0, eos_id=eos, pad_id=96))
    assert int(gen.lengths[0]) == first0 + 1
    np.testing.assert_array_equal(gen.tokens[0, : first0 + 1], free.tokens[0, : first0 + 1])
    assert np.all(np.asarray(gen.tokens[0, first0 + 1 :]) == 96)
    np.testing.assert_array_equal(gen.mask[0], (np.arange(10) <= first0).astype(np.float32))
    assert float(gen.model_logps[0, first0 + 1 :].sum()) == 0.0
    row1 = np.asarray(free.tokens[1])
    expected1 = int(np.argmax(row1 == eos)) + 1 if (row1 == eos).any() else 10
    assert int(gen.lengths[1]) == expected1


def test_sampling_logits_filters_hand_computed():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    nucleus = sampling_logits(logits, temperature=1.0, top_p=0.8)
    np.testing.assert_array_equal(np.isfinite(nucleus), [[True, True, False, False]])
    nucleus = sampling_logits(logits, temperature=1.0, top_p=0.81)
    np.testing.assert_array_equal(np.isfinite(nucleus), [[True, True, True, False]])
    np.testing.assert_array_equal(np.isfinite(sampling_logits(logits, temperature=1.0, top_p=0.1)), [[True, False, False, False]])
    topk = sampling_logits(logits, temperature=2.0, top_k=2)
    np.testing.assert_allclose(topk[0, :2], logits[0, :2] / 2, rtol=1e-6)  # /2 is exact: 8 ulps of slack
    assert np.all(np.isinf(topk[0, 2:]))


def test_top_k_samples_stay_in_top_k(model):
    config, params = model
    prompt = jnp.zeros((16, 1), jnp.int32)
    gen = generate(params, config, prompt, jnp.ones((16, 1)), rng=jax.random.key(9), sampling=SamplingConfig(max_new_tokens=1, top_k=3))
    logits = forward(params, config, prompt)[0, -1]
    top3 = set(np.argsort(-np.asarray(logits))[:3].tolist())
    assert set(np.asarray(gen.tokens[:, 0]).tolist()) <= top3
    assert len(set(np.asarray(gen.tokens[:, 0]).tolist())) > 1  # it does sample


def test_compiles_once_per_shape(model):
    config, params = model
    prompt = jnp.asarray(np.random.RandomState(10).randint(0, 97, (2, 5)))
    args = [(prompt + seed, jnp.ones((2, 5)), jax.random.key(seed)) for seed in range(3)]
    jax.block_until_ready(args)
    sampling = SamplingConfig(max_new_tokens=4)
    (tokens, mask, key), rest = args[0], args[1:]
    generate(params, config, tokens, mask, rng=key, sampling=sampling)  # compiles, unless an earlier test did
    with compilations() as compiled:
        for tokens, mask, key in rest:
            jax.block_until_ready(generate(params, config, tokens, mask, rng=key, sampling=sampling))
    assert compiled == []  # other prompts and keys, same shapes: nothing compiled


def test_bad_arguments(model):
    config, params = model
    prompt = jnp.zeros((1, 60), jnp.int32)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(params, config, prompt, jnp.ones((1, 60)), rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=10))
    with pytest.raises(ValueError, match="SamplingConfig.top_p"):
        SamplingConfig(max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="SamplingConfig.temperature"):
        SamplingConfig(max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be in"):  # k > V is only known to generate
        generate(params, config, prompt[:, :2], jnp.ones((1, 2)), rng=jax.random.key(0),
                 sampling=SamplingConfig(max_new_tokens=2, top_k=config.vocab_size + 1))
    # hashable and frozen: the compiled program's static argument
    assert hash(SamplingConfig(4, top_p=0.9)) == hash(SamplingConfig(4, top_p=0.9))


# --- top-k / top-p against Hugging Face's logits warpers (transformers 5.24, test-only oracle) ---


def hf_warp(logits, *, temperature=1.0, top_k=None, top_p=None):
    """HF's sampling chain as `GenerationMixin._get_logits_processor` builds it (min_tokens_to_keep=1)."""
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.tensor(np.asarray(logits, np.float32))
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


def kept(logits, **kw):
    return np.isfinite(np.asarray(sampling_logits(jnp.asarray(logits), temperature=kw.pop("temperature", 1.0), **kw)))


def test_top_p_hf_documented_cases():
    # transformers tests/generation/test_logits_process.py::test_top_p_dist_warper
    dist = np.log(np.array([[0.3, 0.1, 0.1, 0.5], [0.15, 0.3, 0.3, 0.25]], np.float32))
    filtered = np.exp(np.asarray(sampling_logits(jnp.asarray(dist), temperature=1.0, top_p=0.8)))
    # kept values are the inputs unchanged: exp(log x) within 2 float32 ulps of x
    np.testing.assert_allclose(filtered, [[0.3, 0.0, 0.0, 0.5], [0.0, 0.3, 0.3, 0.25]], rtol=2.4e-7, atol=0)
    # the older version of that test used top_p = 0.7, same expected set
    np.testing.assert_array_equal(kept(dist, top_p=0.7), [[1, 0, 0, 1], [0, 1, 1, 1]])
    # its ramp case (HF asserts [3, 2] with min_tokens_to_keep=2; with 1 the extreme row keeps 1)
    ramp = np.tile(np.arange(10, dtype=np.float32) - 5, (2, 1))
    ramp[1] *= 100.0
    np.testing.assert_array_equal(kept(ramp, top_p=0.9).sum(-1), [3, 1])
    np.testing.assert_array_equal(np.isfinite(hf_warp(ramp, top_p=0.9)).sum(-1), [3, 1])


def test_top_p_cuts_where_the_mass_reaches_p_exactly():
    # mass before each token in decreasing order: 0.5 | 0.3 -> 0.8 | 0.1 -> 0.9 | 0.1
    dist = np.log(np.array([[0.3, 0.1, 0.1, 0.5]], np.float32))
    np.testing.assert_array_equal(kept(dist, top_p=0.8), [[1, 0, 0, 1]])  # before 0.1: 0.8, not < 0.8
    np.testing.assert_array_equal(kept(dist, top_p=0.9), [[1, 1, 0, 1]])
    np.testing.assert_array_equal(kept(dist, top_p=0.5), [[0, 0, 0, 1]])  # the head branch (p <= 1/2)
    np.testing.assert_array_equal(kept(dist, top_p=0.501), [[1, 0, 0, 1]])  # 2e-3 past the 2^-20 slack
    # ten 0.1s at top_p = 0.1: one token (HF keeps two: its cumsum lands just past 0.9)
    tenth = np.log(np.full((1, 10), 0.1, np.float32))
    assert kept(tenth, top_p=0.1).sum() == 1
    assert kept(tenth, top_p=0.3).sum() == 3
    np.testing.assert_array_equal(kept(tenth, top_p=0.3)[0], [1, 1, 1] + [0] * 7)


def test_top_p_ties_keep_lower_ids_and_the_same_count_as_hf():
    dist = np.log(np.array([[0.15, 0.3, 0.3, 0.25]], np.float32))  # ids 1 and 2 tie
    np.testing.assert_array_equal(kept(dist, top_p=0.3), [[0, 1, 0, 0]])  # mass before id 2: 0.3
    hf = np.isfinite(hf_warp(dist, top_p=0.3))
    assert hf.sum() == 1 and hf[0, 1:3].sum() == 1  # HF: one of the tied pair (torch.sort's choice)
    uniform = np.zeros((1, 8), np.float32)
    np.testing.assert_array_equal(kept(uniform, top_p=0.5)[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_top_k_hf_documented_cases():
    # transformers tests/generation/test_logits_process.py::test_top_k_dist_warper
    ramp = np.tile(np.arange(10, dtype=np.float32), (2, 1))
    ramp[1, :5] += 10
    out = np.asarray(sampling_logits(jnp.asarray(ramp), temperature=1.0, top_k=3))
    np.testing.assert_array_equal(np.isinf(out[0]), 7 * [True] + 3 * [False])
    np.testing.assert_array_equal(np.isinf(out[1]), 2 * [True] + 3 * [False] + 5 * [True])
    np.testing.assert_array_equal(out[np.isfinite(out)], ramp[np.isfinite(out)])  # kept values unchanged
    # ties at the k-th value are kept: uniform logits survive top_k=1 whole, as in HF
    uniform = np.zeros((2, 5), np.float32)
    assert kept(uniform, top_k=1).sum() == 10 == np.isfinite(hf_warp(uniform, top_k=1)).sum()
    assert kept(ramp, top_k=50).all()  # k > V keeps all (HF clamps k to V)


def test_top_k_then_top_p_renormalises_over_the_top_k_like_hf():
    # top-2 leaves [0.5, 0.25] -> [2/3, 1/3]; the second's mass before (2/3) >= 0.6 drops it.
    # Top-p first (mass before 0.25 is 0.5 < 0.6) would keep both.
    dist = np.log(np.array([[0.25, 0.5, 0.1, 0.15]], np.float32))
    np.testing.assert_array_equal(kept(dist, top_k=2, top_p=0.6), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(np.isfinite(hf_warp(dist, top_k=2, top_p=0.6)), [[0, 1, 0, 0]])
    np.testing.assert_array_equal(kept(dist, top_k=3, top_p=0.6), [[1, 1, 0, 0]])  # [0.56, 0.28, 0.17]


@pytest.mark.parametrize("vocab", [50, 4096])
def test_sampling_logits_match_hf_warpers_on_random_logits(vocab):
    rng = np.random.RandomState(vocab)
    for temperature, top_k, top_p in [(1.0, None, 0.9), (0.7, None, 0.3), (1.3, 40, 0.95), (1.0, 5, None),
                                      (0.8, 40, 0.5), (1.0, None, 0.999), (1.0, None, 0.05), (2.0, 10, 0.7)]:
        for scale in (0.5, 3.0, 10.0):
            logits = (scale * rng.randn(16, vocab)).astype(np.float32)
            ours = np.asarray(sampling_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
            ref = hf_warp(logits, temperature=temperature, top_k=top_k, top_p=top_p)
            np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), err_msg=f"{temperature, top_k, top_p, scale}")
            # logits / temperature: XLA's division is at most 1 ulp from torch's (measured); 4 ulps
            np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=4.8e-7, atol=0)


def float64_top_p_keep(logits, top_p):
    """The top-p rule in float64 on the same float32 logits (ties: lower id first)."""
    z = np.asarray(logits, np.float64)
    order = np.argsort(-z, axis=-1, kind="stable")
    sz = np.take_along_axis(z, order, -1)
    probs = np.exp(sz - sz[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    before = np.concatenate([np.zeros_like(probs[:, :1]), np.cumsum(probs, -1)[:, :-1]], -1)
    keep_sorted = before < top_p
    keep_sorted[:, 0] = True
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, -1)
    return keep


def test_top_p_one_is_the_identity_and_near_one_is_exact():
    rng = np.random.RandomState(11)
    wide = (8.0 * rng.randn(8, 4096)).astype(np.float32)
    # top_p = 1 (the old cumsum rounded past 1 and dropped ~1000 of these 4096 tokens per row)
    np.testing.assert_array_equal(sampling_logits(jnp.asarray(wide), temperature=1.0, top_p=1.0), wide)
    for scale in (1.0, 3.0, 8.0):
        logits = (scale * rng.randn(8, 4096)).astype(np.float32)
        for top_p in (0.05, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999, 1 - 1e-5, 1 - 1e-6):
            # the float64 rule's kept set, exactly (old code: up to 218 tokens wrong at 1 - 1e-6)
            np.testing.assert_array_equal(kept(logits, top_p=top_p), float64_top_p_keep(logits, top_p),
                                          err_msg=f"scale {scale}, top_p {top_p}")


def test_prompt_that_fills_the_context_is_refused_before_compute(model, monkeypatch):
    config, params = model  # max_seq_len 64
    import jaxalign.decoding as decoding

    calls = []
    monkeypatch.setattr(decoding, "forward_with_cache", lambda *a, **k: calls.append(a) or 1 / 0)
    # a SamplingConfig cannot hold N < 1 (what `min(N, max_seq_len - P)` gives a too-long prompt),
    # so the prompt is the only cause generate can report
    with pytest.raises(ValueError, match=r"SamplingConfig.max_new_tokens must be >= 1, got -6"):
        SamplingConfig(max_new_tokens=-6)
    for p, n in ((64, 1), (70, 1)):
        prompt = jnp.zeros((1, p), jnp.int32)
        with pytest.raises(ValueError, match=rf"prompt is {p} tokens .*context is 64 \(config.max_seq_len\)"):
            generate(params, config, prompt, jnp.ones((1, p)), rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=n))
    assert calls == []  # refused before the model was traced
    monkeypatch.undo()
    # 63 prompt tokens leave room for exactly one
    gen = generate(params, config, jnp.zeros((1, 63), jnp.int32), jnp.ones((1, 63)), rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=1))
    assert gen.tokens.shape == (1, 1) and int(gen.lengths[0]) == 1


BUCKET_CONFIGS = {
    # stacked [L, B, S, K, H] cache (grown on axis 2); gemma2 covers the per-layer tuple layout
    "llama-scanned": get_config("llama-tiny", vocab_size=97, max_seq_len=64, scan_layers=True),
    # local (window 8) and global layers: every layer keeps P + N slots, the local ones mask by position
    "gemma2": get_config("gemma2-tiny", vocab_size=97, max_seq_len=64),
}


@pytest.mark.parametrize("name", sorted(BUCKET_CONFIGS))
def test_attend_buckets_give_the_same_generation(name):
    """Segments of 4 steps, each over P + 4·(j+1) slots (P = 6, N = 14: 4 segments over 10, 14,
    18 and 20 slots) against one loop over all 20: the same sampled tokens and log-probs, the
    early steps no longer attending empty slots. Masked slots add exact zeros to the softmax, so
    only the order of the 64-term sums may change: 2·64 ulps of the logits, doubled for the
    97-way log-softmax (as the cached-vs-teacher-forced bound above); measured 0 here."""
    config = BUCKET_CONFIGS[name]
    params = jax.tree.map(lambda x: x * 4, init_params(config, jax.random.key(1)))
    prompt = jnp.asarray(np.random.RandomState(2).randint(0, 97, (3, 6)))
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    bucketed = SamplingConfig(max_new_tokens=14, temperature=1.0, attend_bucket=4)
    assert attend_sizes(config, 6, bucketed) == (10, 14, 18, 20)
    whole = SamplingConfig(max_new_tokens=14, temperature=1.0, attend_bucket=None)
    assert attend_sizes(config, 6, whole) == (20,)
    for num_samples in (1, 2):
        a = generate(params, config, prompt, mask, rng=jax.random.key(3), sampling=bucketed, num_samples=num_samples)
        b = generate(params, config, prompt, mask, rng=jax.random.key(3), sampling=whole, num_samples=num_samples)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.model_logps, b.model_logps, rtol=0, atol=ulps(256, b.model_logps))
        np.testing.assert_allclose(a.logps, b.logps, rtol=0, atol=ulps(256, b.logps))
        ref = teacher_forced(config, params, jnp.repeat(prompt, num_samples, 0), jnp.repeat(mask, num_samples, 0), a)
        np.testing.assert_allclose(a.model_logps, ref, rtol=0, atol=ulps(256, ref))


def test_attend_buckets_stop_at_eos_and_skip_rolling_buffers():
    """EOS inside an early segment ends every later segment at once (same output as one loop);
    a rolling buffer (Mistral-style window shorter than P + N) keeps one segment."""
    config = CONFIGS["llama"]
    params = jax.tree.map(lambda x: x * 4, init_params(config, jax.random.key(1)))
    prompt = jnp.asarray(np.random.RandomState(4).randint(0, 97, (2, 5)))
    mask = jnp.ones_like(prompt)
    first = generate(params, config, prompt, mask, rng=jax.random.key(0), sampling=SamplingConfig(max_new_tokens=3, temperature=0.0))
    eos = int(first.tokens[0, 1])  # row 0 emits it at step 1, inside the first 2-step segment
    kw = dict(max_new_tokens=12, temperature=0.0, eos_id=eos, pad_id=0)
    a = generate(params, config, prompt, mask, rng=jax.random.key(0), sampling=SamplingConfig(attend_bucket=2, **kw))
    b = generate(params, config, prompt, mask, rng=jax.random.key(0), sampling=SamplingConfig(attend_bucket=None, **kw))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert int(a.lengths[0]) == 2
    mistral = config.replace(sliding_window=8)
    assert mistral.cache_window == 8
    assert attend_sizes(mistral, 5, SamplingConfig(max_new_tokens=12, attend_bucket=2)) == (17,)
    assert attend_sizes(mistral, 2, SamplingConfig(max_new_tokens=6, attend_bucket=2)) == (4, 6, 8)
    with pytest.raises(ValueError, match="attend_bucket"):
        SamplingConfig(max_new_tokens=4, attend_bucket=0)
