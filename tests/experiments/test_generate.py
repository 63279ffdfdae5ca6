"""experiments/generate.py on the real stories260K model."""

import jaxalign.data as jd
from experiments.generate import main, shuffle_words


def test_stories260k_generates_stories_and_prefers_real_sentences(shared_data, tmp_path):
    model = shared_data / "models/stories260K"
    result = main([
        "--model", str(model / "stories260K.bin"), "--tokenizer", str(model / "tok512.model"),
        "--max-new-tokens", "40", "--json-out", str(tmp_path / "out.json"),
    ])
    assert result["samples"][0].startswith("Once upon a time, there was a little girl")
    # story sentences are far more likely than the same words shuffled (measured: 1.3 vs 5.9)
    assert result["mean_nll"] < 2.0
    assert result["mean_nll_shuffled"] > result["mean_nll"] + 2.0
    assert (tmp_path / "out.json").exists()


def test_prompt_encoding_is_left_padded_with_bos(shared_data):
    tok = jd.load_tokenizer(shared_data / "models/stories260K/tok512.model")
    tokens, mask = jd.collate_prompts(("Once upon a time", ""), tok)
    assert tokens[1, -1] == tok.bos_id and mask[1].sum() == 1
    assert tokens[0, 0] == tok.bos_id and mask[0].all()
    assert sorted(shuffle_words("a b c d", 0).split()) == ["a", "b", "c", "d"]


def test_prompt_longer_than_the_context_is_refused_with_its_length(shared_data, tmp_path):
    import pytest

    model = shared_data / "models/stories260K"
    tok = jd.load_tokenizer(model / "tok512.model")
    long_prompt = "Once upon a time, there was a dog. " * 60
    n_tokens = 1 + len(tok.encode(long_prompt))  # BOS + text: > 512, stories260K's context
    assert n_tokens > 512
    args = ["--model", str(model / "stories260K.bin"), "--tokenizer", str(model / "tok512.model"),
            "--sentences", "a b", "--json-out", str(tmp_path / "out.json")]
    with pytest.raises(ValueError, match=rf"--prompt\[1\] is {n_tokens} tokens \(with BOS\), the model's context is 512 "
                                         r"\(config.max_seq_len of --model\)"):
        main(args + ["--prompt", "Tom", long_prompt])
    assert not (tmp_path / "out.json").exists()  # refused before generating anything


def test_qwen_checkpoint_prompts_go_through_its_chat_template(tmp_path):
    """A Qwen2.5-Instruct-shaped directory: each --prompt becomes the template's user turn (ids
    equal to `transformers`' apply_chat_template), generation runs from it; --no-chat keeps the
    raw text."""
    import pytest

    transformers = pytest.importorskip("transformers")
    from experiments.generate import Config, prompt_batch
    from tests.experiments._qwen import qwen_checkpoint

    directory = qwen_checkpoint(tmp_path / "qwen")
    tok = jd.load_tokenizer(directory)
    prompts = ("What is 2+2?", "Name a color.")
    tokens, mask = prompt_batch(Config(prompt=prompts), tok)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for row, text in enumerate(prompts):
        expected = hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert tokens[row][mask[row] > 0].tolist() == list(expected)
    raw, raw_mask = prompt_batch(Config(prompt=prompts, chat=False), tok)
    assert tok.decode(raw[0][raw_mask[0] > 0]) == prompts[0]

    result = main(["--model", str(directory), "--tokenizer", str(directory), "--prompt", *prompts,
                   "--max-new-tokens", "4", "--sentences", "The capital of France is Paris."])
    assert result["samples"][0].startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n" in result["samples"][0]
    with pytest.raises(ValueError, match=r"--prompt\[1\]"):  # an empty user turn is refused
        prompt_batch(Config(prompt=("fine", "")), tok)
