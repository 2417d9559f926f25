"""Tokeniser facts and the stage 3+ DataLoaderLite."""
import re

import pytest
import torch
from conftest import ROOT, SCRIPTS, TINY, existing, load


def test_input_txt_is_tiny_shakespeare(enc):
    text = (ROOT / "input.txt").read_text(encoding="utf-8")
    assert (ROOT / "input.txt").stat().st_size == 1_115_394
    assert len(enc.encode(text)) == 338_025


def test_prompt_tokens(enc):
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


@pytest.mark.parametrize("name", existing(SCRIPTS[2:7]))
def test_load_tokens_reads_input_txt(name, enc):
    tokens = load(name).load_tokens(str(ROOT / "input.txt"))
    assert tokens.dtype == torch.long and tokens.shape == (338_025,)
    text = (ROOT / "input.txt").read_text(encoding="utf-8")
    assert tokens[:100].tolist() == enc.encode(text[:1000])[:100]


LOADERS = existing(SCRIPTS[3:7])


@pytest.mark.parametrize("name", LOADERS)
def test_dataloader_epoch_covers_every_token_once(name):
    B, T, n_batches = 3, 5, 7
    tokens = torch.arange(n_batches * B * T + 1) * 10  # distinct values; exactly 7 batches
    loader = load(name).DataLoaderLite(tokens, B, T)
    xs, ys = [], []
    for _ in range(n_batches):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T)
        torch.testing.assert_close(x.flatten()[1:], y.flatten()[:-1])  # targets = inputs shifted
        xs.append(x.flatten())
        ys.append(y.flatten())
    # inputs are consecutive slices covering tokens[0 : N-1] once; targets cover tokens[1 : N]
    torch.testing.assert_close(torch.cat(xs), tokens[:-1])
    torch.testing.assert_close(torch.cat(ys), tokens[1:])
    x, _ = loader.next_batch()  # the next epoch starts again at the beginning
    torch.testing.assert_close(x.flatten(), tokens[:B * T])


@pytest.mark.parametrize("name", LOADERS)
def test_dataloader_wraps_without_reading_past_the_end(name):
    B, T = 2, 4
    for n in range(B * T + 1, 4 * B * T + 3):  # every remainder, including "just one short"
        tokens = torch.arange(n)
        loader = load(name).DataLoaderLite(tokens, B, T)
        per_epoch = (n - 1) // (B * T)
        for i in range(3 * per_epoch):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (B, T)  # a short slice could not be viewed as (B, T)
            assert x[0, 0].item() == (i % per_epoch) * B * T
            assert y.max().item() <= n - 1


@pytest.mark.parametrize("name", existing(SCRIPTS[2:7]))
def test_text_shorter_than_a_batch_is_one_line(name, tmp_path):
    """Stage 2 checks that the text holds one (B, T) batch and its targets; stages 3-6 keep that check in main
    (the loader itself trusts it)."""
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be")  # 6 tokens
    with pytest.raises(SystemExit) as e:
        load(name).main(TINY + ["--device", "cpu", "-B", "2", "-T", "8", "--input", str(short)])
    message = str(e.value.code)
    assert re.fullmatch(f"error: {short} has [0-9] tokens, fewer than B\\*T\\+1 = 17", message), message
