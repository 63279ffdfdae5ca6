"""Inference-time scaling: beam search against Hugging Face's `generate(num_beams=K)` and an
exhaustive search, N samples from one prefill, and the selection functions."""

import itertools
import math
from decimal import Decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxalign import SamplingConfig, generate
from jaxalign.logprobs import token_logps
from jaxalign.models import forward, get_config, init_params, load_hf_checkpoint
from jaxalign.search import beam_search, best_of_n, majority_vote, pass_at_k
from tests._tolerance import ulps

VOCAB, N = 41, 6


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A random GPT-2 with peaked next-token distributions (init std 0.3: |logits| of several
    units, so beam candidates are rarely within float32 rounding of each other) and, as EOS, the
    token that is most often the model's second choice, so hypotheses do end early."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    ours, params = load_hf_checkpoint(path)
    with torch.no_grad():
        probe = model(torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(1))).logits
    second = torch.topk(probe, 2, dim=-1).indices[..., 1].flatten()
    eos = int(torch.bincount(second, minlength=VOCAB).argmax())
    return model, ours, params, eos


def prompts():
    # left-padded: row 0 has 2 padding tokens
    tokens = np.array([[0, 0, 5, 9, 13], [3, 7, 11, 2, 8]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    return tokens, mask


def hf_beams(model, k, lp, es, eos, r):
    tokens, mask = prompts()
    with torch.no_grad():
        out = model.generate(
            torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask), num_beams=k, do_sample=False,
            max_new_tokens=N, length_penalty=lp, early_stopping=es, num_return_sequences=r, eos_token_id=eos,
            pad_token_id=0, return_dict_in_generate=True, output_scores=True,
        )
    seqs = out.sequences[:, tokens.shape[1]:].numpy()
    return seqs.reshape(2, r, -1), out.sequences_scores.numpy().reshape(2, r)


@pytest.mark.parametrize(("k", "es"), [(2, False), (3, False), (3, True), (3, "never")])  # K = 1 is HF greedy: see below
def test_beam_search_equals_hugging_face(gpt2, k, es):
    model, config, params, eos = gpt2
    tokens, mask = prompts()
    ended_early = False
    for lp in (0.0, 1.0, 2.0):  # a traced argument: one compilation per (k, es)
        ref_tokens, ref_scores = hf_beams(model, k, lp, es, eos, k)
        out = beam_search(
            params, config, jnp.asarray(tokens), jnp.asarray(mask), num_beams=k, max_new_tokens=N,
            length_penalty=lp, early_stopping=es, eos_id=eos, pad_id=0, num_return_sequences=k,
        )
        width = ref_tokens.shape[-1]  # HF trims to the longest returned hypothesis
        ours, live = np.asarray(out.tokens), np.asarray(out.mask) > 0
        assert not live[..., width:].any() and ours[..., width:].max(initial=0) == 0
        # HF fills ended hypotheses with `pad_token_id or eos` (EOS when pad is 0); we write pad
        np.testing.assert_array_equal(np.where(live[..., :width], ours[..., :width], -1),
                                      np.where(live[..., :width], ref_tokens, -1))
        assert np.all(ref_tokens[~live[..., :width]] == eos)
        # Σ of ≤ 6 log-softmaxes of 41 logits of a 2-layer net, torch vs XLA: 64 ulps of the
        # summed magnitude (|score| ≤ ~8 nats); measured ≤ 0.4 of those units.
        np.testing.assert_allclose(np.asarray(out.scores), ref_scores, rtol=0, atol=ulps(64, np.abs(ref_scores).max() * N))
        lengths = np.asarray(out.lengths)
        assert np.all(lengths == np.asarray(out.mask).sum(-1))
        ended_early |= bool(np.any(lengths < N))
    assert ended_early  # the EOS paths were exercised


def test_one_beam_is_greedy_decoding(gpt2):
    _, config, params, eos = gpt2
    tokens, mask = prompts()
    beams = beam_search(params, config, jnp.asarray(tokens), jnp.asarray(mask), num_beams=1, max_new_tokens=N,
                        length_penalty=0.0, eos_id=eos, pad_id=0)
    greedy = generate(params, config, jnp.asarray(tokens), jnp.asarray(mask), rng=jax.random.key(0),
                      sampling=SamplingConfig(max_new_tokens=N, temperature=0.0, eos_id=eos, pad_id=0))
    np.testing.assert_array_equal(np.asarray(beams.tokens[:, 0]), np.asarray(greedy.tokens))
    # the score is the greedy path's summed model log-prob (length penalty 0)
    np.testing.assert_allclose(np.asarray(beams.scores[:, 0]), np.asarray(greedy.model_logps.sum(-1)), atol=ulps(16, 20.0))


def test_enough_beams_find_the_exhaustive_argmax():
    # V = 5, N = 3: K = 25 = V^(N−1) beams keep every 2-token prefix, so canonical beam search
    # (length_penalty 0, early_stopping "never", no EOS) finds the best of all 125 continuations.
    config = get_config("llama-tiny", vocab_size=5, max_seq_len=16, n_layers=1)
    params = jax.tree.map(lambda x: x * 8.0, init_params(config, jax.random.key(3)))  # peaked
    prompt = jnp.array([[1, 2, 3]], jnp.int32)
    out = beam_search(params, config, prompt, jnp.ones_like(prompt), num_beams=25, max_new_tokens=3,
                      length_penalty=0.0, early_stopping="never", num_return_sequences=25)
    cands = np.array(list(itertools.product(range(5), repeat=3)), np.int32)  # [125,3]
    seqs = jnp.concatenate([jnp.repeat(prompt, 125, 0), jnp.asarray(cands)], axis=1)
    logps = token_logps(forward(params, config, seqs[:, :-1]), seqs[:, 1:])[:, 2:].sum(-1)  # [125]
    order = np.argsort(-np.asarray(logps), kind="stable")
    gap = float(logps[order[0]] - logps[order[1]])
    assert gap > 1e-3  # no near tie at the top: the argmax is unambiguous
    np.testing.assert_array_equal(np.asarray(out.tokens[0, 0]), cands[order[0]])
    np.testing.assert_allclose(float(out.scores[0, 0]), float(logps[order[0]]), atol=ulps(16, 30.0))
    # and the 25 returned hypotheses are the 25 best continuations, best first
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), cands[order[:25]])


def test_num_samples_share_one_prefill_and_score_like_teacher_forcing(gpt2):
    _, config, params, eos = gpt2
    tokens, mask = prompts()
    sampling = SamplingConfig(max_new_tokens=N, temperature=1.0, pad_id=0)
    out = generate(params, config, jnp.asarray(tokens), jnp.asarray(mask), sampling=sampling,
                   rng=jax.random.key(7), num_samples=4)
    assert out.tokens.shape == (8, N)
    assert len({tuple(r) for r in np.asarray(out.tokens)[:4]}) > 1  # independent draws per row
    # rows 4i..4i+3 continue prompt i: teacher-forced log-probs of them equal the sampled ones
    rep_tokens, rep_mask = np.repeat(tokens, 4, 0), np.repeat(mask, 4, 0)
    seqs = jnp.concatenate([jnp.asarray(rep_tokens), out.tokens], axis=1)
    pos = np.concatenate([np.maximum(np.cumsum(rep_mask, 1) - 1, 0), rep_mask.sum(1, keepdims=True) + np.arange(N)], 1)
    logits = forward(params, config, seqs[:, :-1], jnp.asarray(pos[:, :-1]))
    # left padding: the padded rows' pad tokens are attended in this plain forward, so compare
    # the unpadded prompt's rows (1) only
    tf = token_logps(logits, seqs[:, 1:])[:, tokens.shape[1] - 1:]
    np.testing.assert_allclose(np.asarray(tf)[4:], np.asarray(out.model_logps)[4:], atol=ulps(64, 10.0))


def test_majority_and_weighted_votes():
    answers = [[Decimal("5"), Decimal("5.0"), Decimal("3"), None], [None, None], ["b", "a", "a", "b"]]
    assert majority_vote(answers) == [Decimal("5"), None, "b"]  # tie -> the first occurring
    weights = [[0.1, 0.1, 0.9, 0.5], [0.2, 0.3], [0.2, 0.3, 0.4, 0.1]]
    assert majority_vote(answers, weights=weights) == [Decimal("3"), None, "a"]
    with pytest.raises(ValueError, match="finite and >= 0"):
        majority_vote([["a"]], weights=[[-1.0]])
    with pytest.raises(ValueError, match="shape of answers"):
        majority_vote([["a", "b"]], weights=[[1.0]])


def test_best_of_n():
    np.testing.assert_array_equal(best_of_n([[0.1, 0.9, 0.9], [np.nan, -1.0, -2.0]]), [1, 1])
    with pytest.raises(ValueError, match="no finite score"):
        best_of_n([[np.nan, np.nan]])


def test_pass_at_k_is_the_subset_average():
    for n, c in [(5, 0), (5, 2), (6, 3), (4, 4)]:
        for k in range(1, n + 1):
            subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert math.isclose(float(pass_at_k(n, c, k)), brute, rel_tol=1e-12)  # float64, a few roundings
    np.testing.assert_allclose(pass_at_k(np.array([10, 10]), np.array([1, 0]), 1), [0.1, 0.0], rtol=1e-12)
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(3, 1, 4)
