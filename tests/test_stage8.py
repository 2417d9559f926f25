"""Stage 8 (8_train_modern.py): each change does what its comment says, the run is still stage 7's
run (ranks, resume), the tools know its checkpoints, and benchmarks/ladder.py gives every recipe the
same tokens."""
import math
import shutil
import sys

import pytest
import torch

from conftest import (ROOT, STAGE7, TINY, TORCHRUN, load, main_error, main_losses, parse_steps,
                      run_here, run_script, write_checkpoint, write_shards)

STAGE8 = "8_train_modern"
pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                reason="stage 8 needs torch 2.9 or newer (torch.optim.Muon)")
RUN8 = TINY + ["--device", "cpu", "-B", "2", "-T", "32", "--total-batch-size", "256",
               "--dtype", "float32", "--no-compile", "--eval-every", "1000", "--val-tokens", "256",
               "--num-return-sequences", "1", "--max-length", "9"]


@pytest.fixture(scope="module")
def m():
    return load(STAGE8)


def tiny(m, **kw):
    torch.manual_seed(0)
    return m.GPT(m.GPTConfig(**{"block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw}))


def scores(m, attn, x, offset):
    """Attention scores q.k (B, nh, T, T) of attn for x (B, T, C) at positions offset, offset+1..."""
    B, T, C = x.shape
    q, k, _ = attn.c_attn(x).split(C, dim=2)
    q, k = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k))
    q, k = m.norm(q), m.norm(k)
    cos, sin = attn.cos[offset:offset + T], attn.sin[offset:offset + T]
    return m.rotary(q, cos, sin) @ m.rotary(k, cos, sin).transpose(-2, -1)


def test_rotary_attention_depends_only_on_relative_position(m):
    attn = tiny(m).transformer.h[0].attn
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        at0, at20 = scores(m, attn, x, 0), scores(m, attn, x, 20)
        # one token repeated: a query's score with the key 1 back differs from 2 back
        same = x[:, :1].repeat(1, 8, 1)
        repeated = scores(m, attn, same, 0)
    assert torch.allclose(at0, at20, atol=1e-5)  # shifting the whole sequence changes no score
    assert (repeated[0, 0, 5, 4] - repeated[0, 0, 5, 3]).abs() > 1e-3  # how far back a key is does
    assert torch.allclose(repeated[0, 0, 5, 4], repeated[0, 0, 7, 6], atol=1e-5)  # and only that


def test_zero_init_starts_at_the_uniform_guess(m):
    model = tiny(m, vocab_size=50304)
    idx = torch.randint(0, 50257, (2, 16))
    _, loss = model(idx, idx)
    assert loss.item() == pytest.approx(math.log(50304), abs=1e-3)
    projections = [p.weight for b in model.transformer.h for p in (b.attn.c_proj, b.mlp.c_proj)]
    assert all(p.abs().max() == 0 for p in projections)  # each block starts as the identity
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied


def test_softcap_bounds_every_logit(m):
    model = tiny(m, vocab_size=512)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 100.0)  # logits of hundreds without the cap
        logits, _ = model(torch.randint(0, 512, (2, 16)))
    cap = model.config.logit_softcap
    assert logits.abs().max() <= cap and logits.abs().max() > 0.99 * cap


class FakeMuon(torch.optim.SGD):
    """Stands in for torch.optim.Muon, whose first construction imports torch._dynamo (~10 s here):
    it takes Muon's arguments and keeps its param groups, which is what these tests look at."""

    def __init__(self, params, lr, weight_decay, momentum, nesterov):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                         nesterov=nesterov)


def test_muon_gets_exactly_the_blocks_matrices(m, monkeypatch):
    monkeypatch.setattr(torch.optim, "Muon", FakeMuon)
    model = tiny(m)
    optimizers = model.configure_optimizers(0.1, 0.05, "cpu", log=lambda *a: None)
    muon, adamw = optimizers.optimizers
    assert isinstance(muon, FakeMuon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {kind: sorted(names[id(p)] for g in opt.param_groups for p in g["params"])
           for kind, opt in (("muon", muon), ("adamw", adamw))}
    matrices = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    assert got["muon"] == sorted(f"transformer.h.{i}.{w}" for i in range(2) for w in matrices)
    assert got["adamw"] == ["lm_head.weight", "transformer.wte.weight"]
    everything = got["muon"] + got["adamw"]
    assert sorted(everything) == sorted(names.values()) and len(set(everything)) == len(everything)


def test_each_group_keeps_its_multiple_of_the_schedule(m, monkeypatch):
    monkeypatch.setattr(torch.optim, "Muon", FakeMuon)
    optimizers = tiny(m).configure_optimizers(0.1, 0.05, "cpu", log=lambda *a: None)
    ratios = sorted(g["lr"] / 0.05 for g in optimizers.param_groups)
    assert ratios == pytest.approx([0.16, 1.0, 12.0])
    lrs = [m.get_lr(s, 0.05, 10, 100) for s in (0, 9, 10, 59, 60, 80, 99)]
    # warmup, flat, a linear cooldown to 0 over the last 40 steps
    assert lrs == pytest.approx([0.005, 0.05, 0.05, 0.05, 0.05, 0.025, 0.00125])


def test_an_old_torch_gets_one_line(m, monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    assert "needs torch 2.9 or newer" in main_error(m, ["--device", "cpu"])


def test_rotary_needs_an_even_head_size(m):
    line = main_error(m, ["--device", "cpu", "--n-embd", "30", "--n-head", "2"])
    assert "multiple of 2 x --n-head" in line


# ---------------------------------------------------------------------------- runs (slow)

def write_stage8_checkpoint(path, m):
    """A checkpoint as stage 8 saves one, of a tiny model (no optimizer state: resume's, not the
    tools')."""
    from dataclasses import asdict
    model = tiny(m, vocab_size=50304, block_size=1024)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    torch.save({"model": model.state_dict(), "optimizer": {}, "config": asdict(model.config),
                "step": 4, "val_loss": 10.9, "loader": {"epoch": 0, "shard": 0, "position": 1024},
                "rng": {"cpu": torch.get_rng_state()}}, path)
    return model.eval()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage8")
    (root / "no_hellaswag.jsonl").write_text("")
    return write_shards(root / "shards", [3001, 5003, 4099, 6007])


def args8(shards, log_dir, *more):
    return RUN8 + ["--data-dir", shards, "--log-dir", log_dir, "--hellaswag-file",
                   shards.parent / "no_hellaswag.jsonl", *more]


@pytest.mark.slow
def test_resume_continues_exactly_with_muons_momentum(m, shards, tmp_path):
    argv = args8(shards, tmp_path / "a", "--steps", "6", "--checkpoint-every", "3")
    _, rows, straight = main_losses(m, argv)
    ckpt = torch.load(tmp_path / "a" / "model_00003.pt", weights_only=True)
    muon_state = ckpt["optimizer"]["optimizers"][0]["state"]
    assert muon_state and all(s["momentum_buffer"].abs().sum() > 0 for s in muon_state.values())
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "model_00003.pt", tmp_path / "b")
    argv = args8(shards, tmp_path / "b", "--steps", "6", "--resume")
    _, resumed_rows, resumed = main_losses(m, argv)
    assert [r["step"] for r in resumed_rows] == [3, 4, 5]
    assert resumed == straight[3:]  # exactly


@pytest.mark.slow
def test_two_ranks_equal_one_process(shards, tmp_path):
    argv = [str(a) for a in args8(shards, tmp_path / "one", "--steps", "4")]
    one = run_here(STAGE8, *argv)  # in this process: a subprocess would add only its start-up
    argv2 = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in argv]
    two = run_script(STAGE8, *argv2, cmd=TORCHRUN + [f"{STAGE8}.py"])
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = parse_steps(one.stdout), parse_steps(two.stdout)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):  # the same batches, the gradients summed in another order
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["norm"] == pytest.approx(y["norm"], rel=1e-4)


def resume_refused(module, argv, capsys):
    """main(argv) on --resume stops before training with one error line on stderr; returns it."""
    with pytest.raises(SystemExit) as e:
        module.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code not in (0, None) and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.slow
def test_a_stage7_checkpoint_is_refused_by_stage8_and_the_reverse(m, shards, tmp_path, capsys):
    (tmp_path / "seven").mkdir()
    write_checkpoint(tmp_path / "seven" / "model_00004.pt")
    line = resume_refused(m, args8(shards, tmp_path / "seven", "--steps", "6", "--resume"), capsys)
    assert "is a checkpoint of 7_train_ddp_fineweb.py, another model" in line
    (tmp_path / "eight").mkdir()
    write_stage8_checkpoint(tmp_path / "eight" / "model_00004.pt", m)
    argv = args8(shards, tmp_path / "eight", "--steps", "6", "--resume")
    line = resume_refused(load(STAGE7), argv, capsys)
    assert "is a checkpoint of 8_train_modern.py, another model" in line


def test_hellaswag_scores_and_export_refuses_a_stage8_checkpoint(m, tmp_path):
    import export_hf
    import hellaswag
    from conftest import make_examples
    path = tmp_path / "model_00004.pt"
    model = write_stage8_checkpoint(path, m)
    examples = make_examples(4)
    model_fn, block_size = hellaswag.load_model(str(path), "cpu")
    assert block_size == 1024
    idx = torch.randint(0, 50257, (1, 12))
    assert torch.equal(model_fn(idx), model(idx)[0][..., :50257])  # stage 8's model, its weights
    assert hellaswag.evaluate(model_fn, examples)[0] == 4
    with pytest.raises(export_hf.ExportError, match="is a checkpoint of 8_train_modern.py"):
        export_hf.export(str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_ladder_gives_every_recipe_the_same_tokens(shards, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ladder
    argv = [str(a) for a in args8(shards, "unused", "--steps", "2", "--eval-every", "1")]
    argv = argv[:argv.index("--log-dir")] + argv[argv.index("--log-dir") + 2:]
    jobs = [dict(stage=stage, revert=revert, lr=lr, seed=5, argv=argv,
                 log_dir=str(tmp_path / f"r{i}"), opts={"stage7_lr": 1e-3})
            for i, (stage, revert, lr) in enumerate([(STAGE7, None, 1e-3), (STAGE8, None, 0.05),
                                                     (STAGE8, "rotary -> learned wpe", 0.05),
                                                     (STAGE8, "Muon -> AdamW", 0.05)])]
    runs = [ladder.run_one(job) for job in jobs]
    # the batches a plain loader of the same shards deals for seed 5: 2 steps of 4 (2, 32) batches
    s7 = load(STAGE7)
    loader = s7.DataLoaderLite(str(shards), "train", 2, 32, 0, 1, 5, 256)
    import hashlib
    digest = hashlib.sha256()
    for _ in range(2 * 4):
        x, y = loader.next_batch()
        digest.update(x.numpy().tobytes() + y.numpy().tobytes())
    assert {r["digest"] for r in runs} == {digest.hexdigest()[:12]}
    assert all(len(r["curve"]) == 2 for r in runs)
    assert len({r["final"] for r in runs}) > 1  # and the recipes did differ


def test_plot_log_draws_a_stage7_and_a_stage8_log_on_one_plot(tmp_path, monkeypatch):
    import plot_log
    logs = {}
    for stage, script in ((7, "7_train_ddp_fineweb.py"), (8, "8_train_modern.py")):
        lines = [f"# command: python {script} --steps 20", "# model: n_layer 2 n_head 2 n_embd 32 "
                 "(1.6M params) | B 2 T 32 | total batch size 256 tokens"]
        lines += [f"{s} train {10 - s / (stage * 2):.4f}" for s in range(20)]
        lines += ["0 val 10.8", f"19 val {8.8 - stage / 10}"]
        logs[stage] = tmp_path / f"log{stage}.txt"
        logs[stage].write_text("\n".join(lines) + "\n")
    drawn = {}
    make_figure = plot_log.make_figure
    monkeypatch.setattr(plot_log, "make_figure",
                        lambda *a, **kw: drawn.setdefault("fig", make_figure(*a, **kw)))
    plot_log.main([str(logs[8]), "--compare", str(logs[7]), "-o", str(tmp_path / "both.png")])
    fig, panels = drawn["fig"]
    labels = [line.get_label() for line in panels[0].get_lines()]
    assert fig._suptitle.get_text().startswith("8_train_modern.py")
    assert "val loss" in labels and f"7_train_ddp_fineweb.py ({logs[7]}): val loss" in labels
    assert (tmp_path / "both.png").read_bytes()[:8] == plot_log.PNG_MAGIC
