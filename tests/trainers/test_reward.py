import functools

import jax
import numpy as np

import jaxalign.data as jd
from jaxalign.models import get_config, init_scalar_model, sequence_scores
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainers import (
    create_train_state,
    evaluate_reward_model,
    make_reward_eval_step,
    make_reward_step,
    pair_scores,
)
from tests._tolerance import ulps

TOK = jd.byte_tokenizer()
CONFIG = get_config("gpt2-tiny", vocab_size=TOK.vocab_size, max_seq_len=32)


def pairs(n, seed):
    """Chosen answers contain more 'a's than rejected ones: a rule a small RM can learn."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = rng.integers(1, 5)
        good = "".join(rng.permutation(list("a" * k + "b" * (6 - k))))
        bad = "".join(rng.permutation(list("a" * (k - 1) + "b" * (7 - k))))
        side = lambda text: jd.tokenize_prompt_completion(TOK, "x:", text, max_length=16)  # noqa: E731
        out.append(jd.PreferenceExample(side(good), side(bad)))
    return out


COLLATE = functools.partial(jd.collate_preference, batch_size=16, buckets=(16,), pad_id=TOK.pad_id)


def test_pair_scores_equal_separate_forward_passes():
    params = init_scalar_model(CONFIG, jax.random.key(0))
    batch = COLLATE(pairs(3, 0))
    c, r = pair_scores(params, CONFIG, batch)
    # two programs through 2 layers of 64-term sums: 128 ulps of max|score| (a score near 0 carries the
    # rounding of the large terms); measured equal
    np.testing.assert_allclose(c, sequence_scores(params, CONFIG, batch["chosen_tokens"], batch["chosen_mask"]), rtol=0, atol=ulps(128, c))
    np.testing.assert_allclose(r, sequence_scores(params, CONFIG, batch["rejected_tokens"], batch["rejected_mask"]), rtol=0, atol=ulps(128, r))


def test_reward_model_learns_a_preference_and_eval_counts_only_real_pairs():
    train, held_out = pairs(256, 1), pairs(40, 2)
    stream = jd.BatchStream(train, 16, 0, COLLATE)
    tx, schedule = make_optimizer(OptimConfig(learning_rate=3e-3, warmup_steps=5, total_steps=120))
    state = create_train_state(init_scalar_model(CONFIG, jax.random.key(0)), tx, 0)
    step = make_reward_step(CONFIG, tx, schedule)
    eval_step = make_reward_eval_step(CONFIG)
    before = evaluate_reward_model(eval_step, state.params, jd.eval_batches(held_out, batch_size=16, collate=COLLATE))
    for i in range(120):
        state, metrics = step(state, stream.batch_at(i))
    after = evaluate_reward_model(eval_step, state.params, jd.eval_batches(held_out, batch_size=16, collate=COLLATE))
    assert before["pairs"] == after["pairs"] == 40  # 3 batches, the last padded with 8 filler rows
    # at init the scores barely differ (loss near log 2; a random head may already rank by luck)
    assert after["accuracy"] >= 0.95 and after["margin"] > 10 * abs(before["margin"]), (before, after)
    assert after["loss"] < 0.1 and before["loss"] > 0.5
    assert float(metrics["accuracy"]) >= 0.8


def test_lora_reward_step_trains_adapters_and_the_head_only():
    """The one step builder wraps the reward model in LoRA like every trainer: the state's params
    are the adapters plus a full copy of the head (`LoraConfig.trainable`), the base is the
    step's argument and never moves, and the loss falls."""
    from jaxalign.lora import LoraConfig, apply_lora, init_lora

    base = init_scalar_model(CONFIG, jax.random.key(0))
    base_before = jax.tree.map(np.array, base)
    lora = LoraConfig(rank=4, targets=("all",), trainable=("^head/",))
    adapters = init_lora(base, lora, jax.random.key(1))
    tx, schedule = make_optimizer(OptimConfig(learning_rate=2e-3, total_steps=20, weight_decay=0.0))
    step = make_reward_step(CONFIG, tx, schedule, lora=lora)
    state = create_train_state(adapters, tx, 0)
    batch = COLLATE(pairs(16, 0))
    losses = []
    for _ in range(8):
        state, m = step(state, batch, base)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    for got, before in zip(jax.tree.leaves(base), jax.tree.leaves(base_before)):
        np.testing.assert_array_equal(got, before)
    assert not np.array_equal(state.params["head"]["kernel"], base_before["head"]["kernel"])
    # the step's loss is the full-model loss of the effective params
    trained = jax.tree.map(np.array, state.params)
    _, m = step(state, batch, base)  # donates the state
    chosen, rejected = pair_scores(apply_lora(base, trained, lora), CONFIG, batch)
    want = float(np.mean(-jax.nn.log_sigmoid(np.asarray(chosen) - np.asarray(rejected))))
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)  # two programs, a 16-term mean: 84 ulps
