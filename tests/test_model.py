"""The model each stage builds: sizes, causality, state-dict names, Hugging Face equivalence."""
import math

import pytest
import torch
from conftest import SCRIPTS, existing, load, make_hf_model

ALL = existing(SCRIPTS)
UNTIED = existing(SCRIPTS[:4])  # stages 0-3: lm_head is its own matrix
TIED = existing(SCRIPTS[4:])  # stage 4 on: lm_head shares wte's matrix
PRETRAINED = existing(SCRIPTS[1:])  # stage 1 on: GPT.from_pretrained


def count_params(name, **overrides):
    """Parameters of the 124M model built on the meta device (no memory, no init time)."""
    m = load(name)
    with torch.device("meta"):
        model = m.GPT(m.GPTConfig(**overrides))
    return sum(p.numel() for p in model.parameters())  # tied tensors are counted once


@pytest.mark.parametrize("name", UNTIED)
def test_param_count_untied(name):
    assert count_params(name) == 163_037_184  # 124,439,808 + a separate 50257 x 768 lm_head


@pytest.mark.parametrize("name", TIED)
def test_param_count_tied(name):
    assert count_params(name) == 124_439_808  # "GPT-2 small": 124M


@pytest.mark.parametrize("name", existing(SCRIPTS[5:]))
def test_param_count_padded_vocab(name):
    assert count_params(name, vocab_size=50304) == 124_475_904  # 47 padding rows x 768 more


def tiny(name, seed=0):
    m = load(name)
    torch.manual_seed(seed)
    return m, m.GPT(m.GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.mark.parametrize("name", ALL)
def test_causal(name):
    """Changing the tokens after position t leaves the logits at positions <= t unchanged."""
    _, model = tiny(name)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50257, (2, 24), generator=g)
    t = 11
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 50257, (2, 24 - t - 1), generator=g)
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-5)
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3  # the later positions did see it


@pytest.mark.parametrize("name", ALL)
def test_state_dict_uses_gpt2_names(name):
    """Same keys as HF's GPT2LMHeadModel (the causal mask, where there is one, is not saved)."""
    _, model = tiny(name)
    hf_keys = set(make_hf_model().state_dict())
    assert set(model.state_dict()) == {k for k in hf_keys if not k.endswith((".attn.bias", ".attn.masked_bias"))}


@pytest.mark.parametrize("name", PRETRAINED)
def test_from_pretrained_matches_hf_logits(name, hf_dir):
    from transformers import GPT2LMHeadModel
    m = load(name)
    ours = m.GPT.from_pretrained(str(hf_dir)).eval()
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    assert ours.config.n_layer == 2 and ours.config.n_embd == 32 and ours.config.block_size == 64
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = ours(idx)
        expected = hf(idx).logits
    assert logits.shape == expected.shape == (3, 40, 50257)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", PRETRAINED)
def test_greedy_decoding_matches_hf_generate(name, hf_dir, enc):
    from transformers import GPT2LMHeadModel
    m = load(name)
    ours = m.GPT.from_pretrained(str(hf_dir)).eval()
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    prompt = torch.tensor([enc.encode("Hello, I'm a language model,")])
    idx = prompt
    with torch.no_grad():
        for _ in range(10):
            logits, _ = ours(idx)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                               do_sample=False, pad_token_id=50256)
    assert idx.tolist() == expected.tolist()


def test_from_pretrained_unknown_name_or_truncated_weights_is_one_error(tmp_path, hf_dir):
    """What transformers says, in one OSError with the fix: an unknown name offline, a cut-off model.safetensors."""
    with pytest.raises(OSError, match="could not load 'gpt3'.*local save_pretrained directory"):
        load("1_gpt2_hf_eval").GPT.from_pretrained("gpt3")
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in hf_dir.iterdir():
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[:len(data) // 2] if f.name == "model.safetensors" else data)
    with pytest.raises(OSError, match="could not load .*deserializing header"):
        load("1_gpt2_hf_eval").GPT.from_pretrained(str(cut))


@pytest.mark.parametrize("name", PRETRAINED)
def test_top_k_sampling_stays_in_top_k(name):
    """The sampler only ever picks one of the 50 most likely next tokens."""
    m, model = tiny(name)
    idx = torch.randint(0, 50257, (4, 5), generator=torch.Generator().manual_seed(0))
    out = m.generate(model, idx, max_length=6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top50 = model(idx)[0][:, -1].topk(50).indices
    assert out.shape == (4, 6) and torch.equal(out[:, :5], idx)
    assert all(out[i, 5] in top50[i] for i in range(4))


def test_init_stage4():
    """Tied wte/lm_head, N(0, 0.02) weights, residual projections 0.02/sqrt(2 n_layer), zero biases."""
    m = load("4_train_init")
    torch.manual_seed(0)
    n_layer = 4
    model = m.GPT(m.GPTConfig(block_size=64, n_layer=n_layer, n_head=4, n_embd=128))
    assert model.transformer.wte.weight is model.lm_head.weight
    residual = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual, rel=0.05), name
        elif name.endswith("weight") and p.dim() == 2:  # Linear and Embedding matrices
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias") and ".ln_" not in name:
            assert torch.count_nonzero(p) == 0, name
    # stage 3 (PyTorch's default init) fails the same check: the claim is stage 4's
    m3 = load("3_train_dataloader")
    torch.manual_seed(0)
    base = m3.GPT(m3.GPTConfig(block_size=64, n_layer=n_layer, n_head=4, n_embd=128))
    assert base.transformer.h[0].attn.c_attn.weight.std().item() > 0.04


@pytest.mark.slow  # the 124M model on a CPU
def test_loss_at_init_is_uniform_guess_124m():
    """GPT-2 124M with stage 4's init predicts ~uniformly: loss within 0.2 of ln(50257) = 10.82."""
    m = load("4_train_init")
    torch.manual_seed(1337)
    model = m.GPT(m.GPTConfig())
    idx = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
    assert abs(loss.item() - math.log(50257)) < 0.2
