import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxalign.data as jd
from jaxalign.checkpoint import make_checkpoint_manager, restore_checkpoint, save_checkpoint
from jaxalign.metrics import compilations
from jaxalign.models import get_config, init_params
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers import (
    create_train_state,
    make_dpo_step,
    make_sft_step,
    pair_logps,
    reference_logps,
)

TOK = jd.byte_tokenizer()
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=64)
OPT = OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=20)


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def pairs():
    ds = jd.sorting_task(24, seed=0)
    return jd.tokenize_preference(ds, TOK, max_length=64)


def sft_stream(pairs, batch_size=4):
    examples = [p.chosen for p in pairs]
    collate = functools.partial(jd.collate_sft, batch_size=batch_size, buckets=(32, 64), pad_id=TOK.pad_id)
    return jd.BatchStream(examples, batch_size, 0, collate)


def assert_trees_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_sft_steps_reduce_loss_and_compile_once(params, pairs):
    tx, schedule = make_optimizer(OPT)
    step = make_sft_step(CONFIG, tx, schedule)
    state = create_train_state(copy(params), tx, 0)
    stream = sft_stream(pairs)
    losses = []
    with compilations(step) as compiled:
        for i in range(20):
            state, m = step(state, stream.batch_at(i % 2))  # two batches, memorised
            losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 20
    assert len(compiled) == 1  # every batch falls into the 32 bucket


def test_exact_resume_from_checkpoint(params, pairs, tmp_path):
    tx, schedule = make_optimizer(OPT)
    step = make_sft_step(CONFIG.replace(dropout=0.1), tx, schedule)  # dropout: rng must resume too
    stream = sft_stream(pairs)

    straight = create_train_state(copy(params), tx, 0)
    for i in range(6):
        straight, m_straight = step(straight, stream.batch_at(i))

    manager = make_checkpoint_manager(tmp_path, save_every=3, keep=1)
    state = create_train_state(copy(params), tx, 0)
    for i in range(3):
        state, _ = step(state, stream.batch_at(i))
        save_checkpoint(manager, int(state.step), state)
    manager.wait_until_finished()
    assert manager.latest_step() == 3
    abstract = create_train_state(copy(params), tx, 123)  # structure only; values are replaced
    resumed = restore_checkpoint(make_checkpoint_manager(tmp_path, save_every=3), abstract)
    assert int(resumed.step) == 3
    for i in range(int(resumed.step), 6):
        resumed, m_resumed = step(resumed, stream.batch_at(i))
    assert_trees_close(resumed.params, straight.params, rtol=0, atol=0)
    assert float(m_resumed["loss"]) == float(m_straight["loss"])


def test_restore_from_empty_directory_returns_none(params, tmp_path):
    tx, _ = make_optimizer(OPT)
    assert restore_checkpoint(make_checkpoint_manager(tmp_path, save_every=1), create_train_state(params, tx, 0)) is None


def test_grad_accumulation_equals_full_batch(params, pairs):
    # Equal token counts per half-batch: the mean of micro-batch means is the full-batch mean.
    examples = [jd.Example(p.chosen.tokens[:20], np.ones(20, np.float32)) for p in pairs[:4]]
    full = jd.collate_sft(examples, batch_size=4, buckets=(32,), pad_id=TOK.pad_id)
    halves = [jd.collate_sft(examples[i : i + 2], batch_size=2, buckets=(32,), pad_id=TOK.pad_id) for i in (0, 2)]
    tx1, s1 = make_optimizer(OPT)
    state1, _ = make_sft_step(CONFIG, tx1, s1)(create_train_state(copy(params), tx1, 0), full)
    opt2 = OptimConfig(**{**OPT.__dict__, "grad_accum_steps": 2})
    tx2, s2 = make_optimizer(opt2)
    step2 = make_sft_step(CONFIG, tx2, s2)  # accumulation is the optimizer's alone
    state2 = create_train_state(copy(params), tx2, 0)
    for h in halves:
        state2, _ = step2(state2, h)
    # warm-up starts at lr 0, so compare after a second update on both sides
    state1, _ = make_sft_step(CONFIG, tx1, s1)(state1, full)
    for h in halves:
        state2, _ = step2(state2, h)
    # Only the second update moves the parameters, by lr·m̂/√v̂ with lr = s1(1) = 1.5e-3. Adam is
    # scale-free in the gradient, so where an entry's gradient is near zero its reduction-order
    # noise (one 4-row sum vs two 2-row sums) moves the update by a fraction of lr, not by ulps of
    # the parameter: measured 0.5% of lr here, 1% with SSE4.2 and on AVX-512 (where atol=1e-5
    # failed). Allow 10% of lr; a wrong accumulation moves entries by ~lr.
    assert_trees_close(state1.params, state2.params, rtol=0, atol=0.1 * float(s1(1)))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state1.params, params))
    assert max(changed) > 1e-3  # the comparison is not between two untouched copies


def test_dpo_precomputed_reference_equals_in_step(params, pairs):
    collate_kw = dict(batch_size=4, buckets=(32, 64), pad_id=TOK.pad_id)
    collate = functools.partial(jd.collate_preference, **collate_kw)
    ref = copy(params)
    ref_c, ref_r = reference_logps(ref, CONFIG, jd.eval_batches(pairs, batch_size=4, collate=collate))
    assert ref_c.shape == (len(pairs),)
    items = jd.with_reference_logps(pairs, ref_c, ref_r)
    pre = jd.BatchStream(items, 4, 0, functools.partial(jd.collate_referenced, **collate_kw))
    live = jd.BatchStream(pairs, 4, 0, collate)

    tx, schedule = make_optimizer(OPT)
    step = make_dpo_step(CONFIG, tx, schedule, beta=0.1)
    a = create_train_state(copy(params), tx, 0)
    b = create_train_state(copy(params), tx, 0)
    for i in range(4):
        a, ma = step(a, pre.batch_at(i))
        b, mb = step(b, live.batch_at(i), ref)
        if i == 0:  # policy == reference: h = 0, loss = log 2
            np.testing.assert_allclose(ma["loss"], np.log(2.0), rtol=1e-5)  # h = 0 up to ulps of |logp| ~ 60
        np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)  # 84 ulps; measured <= 0.02
    # Reference log-probs from two programs; Adam amplifies any rounding difference in near-zero
    # gradients to a fraction of lr (see test_grad_accumulation_equals_full_batch): 10% of peak lr.
    # Measured equal here and with SSE4.2.
    assert_trees_close(a.params, b.params, rtol=0, atol=0.1 * OPT.learning_rate)
    assert float(ma["reward_margin"]) > 0


def test_pair_logps_ignore_padding_rows_and_match_manual_sum(params, pairs):
    batch = jd.collate_preference(pairs[:3], batch_size=4, buckets=(32,), pad_id=TOK.pad_id)
    c, r = pair_logps(params, CONFIG, batch)
    assert float(c[3]) == 0.0 and float(r[3]) == 0.0  # filler row
    # manual: log-probs of the chosen completion tokens of row 0
    from jaxalign.models import forward

    toks = batch["chosen_tokens"][:1]
    lp = jax.nn.log_softmax(forward(params, CONFIG, toks[:, :-1]))
    picked = jnp.take_along_axis(lp, toks[:, 1:, None], -1)[0, :, 0]
    # a sum of <= 31 logps (|sum| ~ 66): 1e-5 is 84 ulps of it; measured 1 ulp
    np.testing.assert_allclose(c[0], jnp.sum(picked * batch["chosen_mask"][0, 1:]), rtol=1e-5)


def test_lora_steps_train_adapters_only_with_base_as_reference(params, pairs):
    from jaxalign.lora import LoraConfig, init_lora

    lora = LoraConfig(rank=4, targets=("attention",))
    tx, schedule = make_optimizer(OPT)
    base = copy(params)
    batch = jd.collate_preference(pairs[:4], batch_size=4, buckets=(32,), pad_id=TOK.pad_id)
    step = make_dpo_step(CONFIG, tx, schedule, beta=0.1, lora=lora)
    state = create_train_state(init_lora(base, lora, jax.random.key(1)), tx, 0)
    margins = []
    for i in range(4):
        state, m = step(state, batch, base, base)  # adapters off == the reference
        if i == 0:
            np.testing.assert_allclose(m["loss"], np.log(2.0), rtol=1e-5)  # h = 0 up to ulps of |logp|; measured 0.7 ulp
        margins.append(float(m["reward_margin"]))
    assert margins[-1] > 0
    assert_trees_close(base, params, rtol=0, atol=0)  # the base (and reference) never moved
    assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape, state.params))) != set()
    assert sum(x.size for x in jax.tree.leaves(state.params)) < 0.2 * sum(x.size for x in jax.tree.leaves(params))
