"""Stage 7: the full run: DDP on FineWeb-Edu, with validation, HellaSwag, sampling, checkpoints.

New in this stage (lecture 02:46:52-03:43:05, "distributed data parallel", "datasets used in GPT-2,
GPT-3, FineWeb (EDU)", "validation data split, validation loss, sampling revive", "evaluation:
HellaSwag, starting the run"):
- DDP under torchrun (nccl on CUDA where torch has it, gloo otherwise), on one machine or several;
  plain `python 7_...` runs one process
- DataLoaderLite reads fineweb.py's uint16 shards, each whole as uint16; a step's micro-batches are
  dealt round-robin to the ranks; train shards are visited in a seeded order, new each epoch
- every --eval-every steps: val loss on the val shard's first --val-tokens tokens, dealt across the
  ranks (so 1 GPU and 8 report the same figure; the lecture's 8-GPU 10,485,760 by default), through
  the compiled model; HellaSwag acc_norm on all ranks' share of the examples and samples from rank
  0, both through the uncompiled module (their growing lengths would recompile)
- {log-dir}/log.txt (header: command, versions, device, model size, batch; plot_log.py draws it)
  and checkpoints model_{n:05d}.pt that --resume continues from exactly (checkpoints.py;
  export_hf.py and hellaswag.py -m read them)
- main() reads like the lecture's script: set-up, data, model, optimizer, then the loop with
  evaluation, the step and the log
- long runs (longrun.py and checkpoints.py, not the lecture's, kept out of this diff): one run per
  log dir (an OS lock); a signal during set-up ends in one line; SIGTERM, SIGHUP or Ctrl-C in
  training finish the step, save it (all ranks stop after the same step) and print the command that
  continues; --resume continues the checkpoint's own run (seed, schedule, batch, T, model, shards)
  or names what differs, and starts fresh in an empty log dir (torchrun --max-restarts); a diverged
  run, a rank that died, a damaged shard or checkpoint, a failed write: one line, nothing deleted; a
  run whose last checkpoint could not be written does not exit 0
- defaults: the lecture's 10B-token run (B=64, T=1024, 19,073 steps, warmup 715); small on CPU

Where it differs from the lecture's script (build-nanogpt's train_gpt2.py), and why:
- compile: the lecture's run has it off (it broke HellaSwag and sampling); here training and val
  loss compile, HellaSwag and sampling use the uncompiled module
- samples: rank 0 only, 5 x 30 tokens from --seed (the lecture: every rank 4 x 32, seed 42 + rank)
- HellaSwag scores the 50,257 real logits, as hellaswag.py -m does (the lecture: all 50,304)
- val loss: --val-tokens dealt across the ranks (the lecture: 20 batches on each rank, a figure that
  changes with the number of GPUs); dt times the step alone (the lecture's includes evaluation)
- train shards: each epoch in a seeded order (the lecture: name order), read as uint16
- checkpoints: also optimizer, loader position, RNG and what makes the run the same run, so
  --resume continues exactly (the lecture saves model, config, step and val loss; no resume)

Run:   python fineweb.py --download                               (~10B tokens in 100 shards)
       torchrun --standalone --nproc_per_node=8 7_train_ddp_fineweb.py
Diff:  diff 6_train_hyperparams.py 7_train_ddp_fineweb.py
"""
import argparse
import glob
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
try: from torch.utils._triton import has_triton  # private: a torch without it has "no Triton"
except ImportError: has_triton = lambda: False  # so a GPU runs eager, and says so
from torch.nn.parallel import DistributedDataParallel as DDP

from hellaswag import evaluate, examples_for_run
from checkpoints import (RESUME_MAY_CHANGE, checkpoint_state, load_checkpoint, restore, resume_hint,
                         run_record, save_checkpoint)
from longrun import (Log, ShardError, StopSignals, check_tokens, close_run, exit_status,
                     init_process_group, lost_rank, note_skipped_tokens, open_log_dir,
                     shard_identity, stop_all_on)

# ----------------------------------------------------------------------------------------------
# model


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length (GPT-2 paper, section 2.3)
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + 1 <|endoftext|>
    n_layer: int = 12  # GPT-2 124M; medium/large/xl: 24/36/48
    n_head: int = 12  # 12/16/20/25
    n_embd: int = 768  # 768/1024/1280/1600


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        # query, key and value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        # output projection back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1  # a residual projection: init scaled down in GPT
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dim (n_embd)
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = qkv.split(self.n_embd, dim=2)
        # split C into n_head heads of hs = C / n_head dims; heads become a batch dimension
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # causal softmax(q k^T / sqrt(hs)) v in one fused kernel (flash attention, Dao et al. 2022,
        # on GPUs): the (T, T) attention matrix never travels to and from GPU memory
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)  # 4x hidden, as in GPT-1/2
        # GPT-2 used the tanh approximation of GELU; we keep it to match its weights exactly
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1  # a residual projection: init scaled down in GPT

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LayerNorm (GPT-2 paper, section 2.3): the residual stream itself is never
        # normalised, so gradients flow straight from the loss to the embeddings
        x = x + self.attn(self.ln_1(x))  # tokens communicate
        x = x + self.mlp(self.ln_2(x))  # each token computes on its own
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),  # GPT-2 adds a final LayerNorm after the blocks
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying (GPT-2 does it, "Using the Output Embedding to Improve Language Models"):
        # similar tokens should get similar embeddings and similar output logits
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02  # GPT-2's TF code; ~1/sqrt(768) = 0.036 would be Xavier's, same ballpark
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                std *= (2 * self.config.n_layer) ** -0.5  # two residual additions per layer
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        # idx: (B, T) token ids; targets: (B, T) next-token ids, or None
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} > block size {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, device_type, log=print):
        # decay matmul weights and embeddings (GPT-3: 0.1); biases and gains only shift and scale
        decay = [p for p in self.parameters() if p.dim() >= 2]  # the tied wte/lm_head once
        rest = [p for p in self.parameters() if p.dim() < 2]
        n_decay, n_rest = sum(p.numel() for p in decay), sum(p.numel() for p in rest)
        log(f"decayed parameter tensors: {len(decay)}, with {n_decay:,} parameters")
        log(f"non-decayed parameter tensors: {len(rest)}, with {n_rest:,} parameters")
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0)]
        # fused: one kernel updates all parameters, instead of a loop of small kernels per tensor
        fused = device_type == "cuda"
        log(f"using fused AdamW: {fused}")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """GPT-2's weights: a hub name (PRETRAINED) or a folder that save_pretrained wrote."""
        from safetensors import SafetensorError
        from transformers import GPT2LMHeadModel
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except (OSError, SafetensorError) as e:  # offline, nothing cached; not GPT-2's; cut short
            raise OSError(f"could not load '{name_or_dir}' ({str(e).splitlines()[0]}); a hub name "
                          "needs the internet once, a local save_pretrained directory must be "
                          "whole (save or export it again)") from e
        c = hf.config
        model = GPT(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                              n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd))
        sd, sd_hf = model.state_dict(), hf.state_dict()
        assert sorted(sd_hf) == sorted(sd), "state-dict keys differ from GPT-2's"
        # OpenAI's checkpoints use a Conv1D module whose weight is the transpose of nn.Linear's
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight",
                      "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k in sd_hf:
                sd[k].copy_(sd_hf[k].t() if k.endswith(transposed) else sd_hf[k])
            idx = torch.arange(8).unsqueeze(0)  # does our module compute what Hugging Face's does?
            diff = (model(idx)[0] - hf(idx).logits).abs().max().item()
        print(f"loaded {name_or_dir}: "
              f"max |logits - GPT2LMHeadModel's logits| on 8 tokens = {diff:.2e}")
        return model


PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1558M

# ----------------------------------------------------------------------------------------------
# data

HERE = os.path.dirname(os.path.abspath(__file__))  # default paths start here, not in the cwd


def load_tokens(path, whole=False):
    """A shard's uint16 tokens: memory-mapped to check its header cheaply, or read whole to train on
    (200 MB per 100M; the lecture's int64 copy: 800 MB): a file cut short under a map is SIGBUS."""
    try:
        tokens = np.load(path, mmap_mode=None if whole else "r")
    except (OSError, ValueError, EOFError) as e:  # empty, cut short, not .npy
        reason = str(e).split(".")[0].split(" when")[0]  # numpy 1.x adds " when allow_pickle..."
        raise ShardError(f"{path} is not a shard fineweb.py wrote ({reason})") from None
    return check_tokens(path, tokens, whole)  # 1-D uint16, GPT-2's ids (longrun.py)


class DataLoaderLite:
    """(B, T) batches from the edufineweb_{split}_*.npy shards, for rank `rank` of `world_size`.

    A step's micro-batches are consecutive B*T slices dealt round-robin to the ranks (rank r takes
    slices r, r+W, r+2W, ...); a step never straddles two shards, and the position is the same on
    every rank, so ranks leave a shard together and W ranks take exactly the slices of one process
    with W x the micro-steps. Train shards go in a seeded order, new each epoch, same on all ranks.
    """

    def __init__(self, data_dir, split, B, T, rank, world_size, seed=0, step_tokens=None):
        self.B, self.T, self.rank, self.world_size, self.seed = B, T, rank, world_size, seed
        self.step_tokens = step_tokens or world_size * B * T  # tokens all ranks take per step
        self.shuffle = split == "train"
        self.shards = sorted(glob.glob(os.path.join(data_dir, f"edufineweb_{split}_*.npy")))
        if not self.shards:
            raise ShardError(f"{data_dir} holds no {split} shards (edufineweb_{split}_*.npy)")
        # each shard's header, size and ends now (cheap): a damaged one stops the run at once
        self.sizes = {os.path.basename(p): shard_identity(p, load_tokens(p)) for p in self.shards}
        need = (self.step_tokens if self.shuffle else T) + 1  # a step (val: a row) and a target
        if max(n for n, _ in self.sizes.values()) < need:
            raise ShardError(f"every {split} shard in {data_dir} is shorter than " + (
                f"one step's {need} tokens" if self.shuffle else f"a row of -T {T} plus a target"))
        if self.shuffle and rank == 0:  # a step never spans two shards: say if that skips much
            note_skipped_tokens([n for n, _ in self.sizes.values()], self.step_tokens)
        self.reset()

    def shard_order(self, epoch):
        if not self.shuffle:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def reset(self):
        self.load_state_dict({"epoch": 0, "shard": 0, "position": 0})

    def state_dict(self):  # the shards too: a resumed run reads the very same ones
        shards = [[name, *self.sizes[name]] for name in map(os.path.basename, self.shards)]
        return dict(epoch=self.epoch, shard=self.shard, position=self.position, shards=shards)

    def load_state_dict(self, state):
        self.epoch, self.shard, self.position = state["epoch"], state["shard"], state["position"]
        if state.get("shards"):  # the checkpoint's list (checkpoints.other_run checks all are here)
            folder = os.path.dirname(self.shards[0])
            self.shards = [os.path.join(folder, name) for name, *_ in state["shards"]]
        self.order = self.shard_order(self.epoch)
        self.tokens = load_tokens(self.shards[self.order[self.shard]], whole=True)

    def next_batch(self):
        B, T, W = self.B, self.T, self.world_size
        # at a step's start, if the shard has no whole step left, go on to the next shard
        while (self.position % self.step_tokens == 0
               and self.position + self.step_tokens + 1 > len(self.tokens)):
            self.position, self.shard = 0, self.shard + 1
            if self.shard == len(self.shards):  # next epoch, in a new order
                self.epoch, self.shard = self.epoch + 1, 0
                self.order = self.shard_order(self.epoch)
            self.tokens = load_tokens(self.shards[self.order[self.shard]], whole=True)
        start = self.position + self.rank * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        x = buf[:-1].view(B, T)  # inputs (B, T)
        y = buf[1:].view(B, T)  # targets (B, T): the token that follows each input position
        self.position += W * B * T
        return x, y


# ----------------------------------------------------------------------------------------------
# helpers

# dense bf16 tensor-core TFLOP/s from NVIDIA's data sheets (fp16 on T4 and V100: no bf16), for MFU;
# the first name found in the GPU's name wins: "H100 PCIe" comes before "H100", "L40S" before "L4"
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200 NVL": 835, "H200": 989,
               "B200": 2250, "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "RTX 5090": 209,
               "RTX 4090": 165, "RTX 3090": 71, "A6000": 155, "T4": 65, "V100": 125}


def native_bf16(device_type):
    """Does this chip compute bf16 itself (emulated bf16 is slower than float32)? If unsure: no."""
    if device_type == "cuda":  # Ampere (compute capability 8.0) and later; a T4 or V100 emulates it
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "mps":  # Apple GPUs, from macOS 14
        return torch.backends.mps.is_macos_or_newer(14, 0)
    isas = ("avx512_bf16", "amx_tile")  # AVX512-BF16 (e.g. Zen 4) or AMX (Intel Sapphire Rapids)
    return any(getattr(torch.cpu, f"_is_{isa}_supported", bool)() for isa in isas)


def get_lr(step, max_lr, warmup_steps, max_steps):
    """GPT-3's (appendix B), as in the lecture: linear warmup to max_lr, cosine decay to 10% of
    it; the peak lasts two steps (decay_ratio is 0 at warmup_steps), the last ends above min_lr."""
    min_lr = max_lr * 0.1
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already takes a small step
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)


def divergence_error(step, loss, norm, fp16=False, resume=lambda: ""):
    """The error line (ending in resume(), made only then) when the loss or gradient norm is nan or
    inf (the run diverged), else None. Under float16 an inf norm is the scaler's to skip."""
    if not (math.isfinite(loss) and (fp16 or math.isfinite(norm))):  # before nan is in the weights
        return (f"error: step {step}: loss {loss}, gradient norm {norm}: diverged; stopped before "
                f"the optimizer step; try a lower --max-lr or a longer --warmup-steps{resume()}")
    return None


def pick_device(name):
    """'auto' takes the fastest device present (cuda, then Apple's mps, then cpu)."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not has_mps):
        sys.exit(f"error: --device {name} is not available on this machine; "
                 "use --device auto or cpu")
    return name


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE (50257 tokens); its two files are downloaded once, then cached."""
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as e:  # offline with nothing cached (requests' ConnectionError is an OSError)
        sys.exit(f"error: could not get GPT-2's BPE files ({type(e).__name__}); offline, set "
                 "TIKTOKEN_CACHE_DIR to a folder that holds them (see README)")


@torch.no_grad()
def generate(model, idx, max_length, generator=None, top_k=50):
    """Extend idx (B, T) to (B, max_length) by sampling one next token at a time."""
    while idx.size(1) < max_length:
        logits, _ = model(idx[:, -model.config.block_size:])  # (B, T, vocab_size)
        logits = logits[:, -1, :50257]  # the last position, real tokens only (not the padding)
        probs = F.softmax(logits, dim=-1)
        # top-k 50, the HF pipeline default: the long tail of unlikely tokens is never sampled
        topk_probs, topk_ids = torch.topk(probs, top_k, dim=-1)  # (B, top_k)
        ix = torch.multinomial(topk_probs, 1, generator=generator)  # (B, 1), index into top-k
        next_id = torch.gather(topk_ids, -1, ix)  # (B, 1)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


def setup_ddp(device_name):
    """(ddp, rank, local rank, world size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE:
    one process per GPU; without torchrun, one process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1, pick_device(device_name)
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    rank, local_rank, world_size = (int(os.environ[name]) for name in names)
    if device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    elif device_name in ("auto", "cpu"):
        device = "cpu"
    else:
        sys.exit(f"error: --device {device_name} under torchrun: use cpu, or cuda where CUDA is")
    init_process_group(device)  # nccl on CUDA, else gloo (longrun.py)
    return True, rank, local_rank, world_size, device


def all_reduce_mean(t):
    """Average a tensor over the ranks (gloo has no ReduceOp.AVG: sum, then divide)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


@torch.no_grad()
def val_loss(model, tokens, B, T, val_tokens, device, autocast):
    """The mean loss over the val shard's first val_tokens tokens: rows of T, in batches of up to B
    rows, batch i on rank i % W, so any -B and 1, 2 or 8 ranks give the same figure (the lecture's
    20 batches per rank did not)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = max(1, min(val_tokens, len(tokens) - 1) // T)  # whole rows, at most what the shard holds
    loss_sum = torch.zeros((), device=device)
    model.eval()
    for start in range(rank * B, rows, world * B):
        b = min(B, rows - start)  # the last batch may be short
        buf = torch.from_numpy(tokens[start * T:(start + b) * T + 1].astype(np.int64)).to(device)
        with autocast:
            _, loss = model(buf[:-1].view(b, T), buf[1:].view(b, T))
        loss_sum += loss.detach() * b
    model.train()
    return all_reduce_mean(loss_sum).item() * world / rows  # the mean over all rows


def evaluate_now(step, model, raw_model, val_loader, hella, args, device, autocast, print0):
    """Val loss and HellaSwag (if there is a copy), printed by rank 0: ((step, val), log lines)."""
    val = val_loss(model, val_loader.tokens, args.batch_size, args.seq_len, args.val_tokens, device,
                   autocast)
    print0(f"validation loss: {val:.4f}")
    entries = [f"{step} val {val:.4f}"]
    if hella:
        n, correct = hellaswag_counts(raw_model, hella, device, autocast)
        print0(f"HellaSwag accuracy: {correct}/{n} = {correct / n:.4f}")
        entries.append(f"{step} hella {correct / n:.4f}")
    return (step, val), entries


def hellaswag_counts(model, examples, device, autocast):
    """HellaSwag (examples, correct by acc_norm): each rank scores every W-th example on the 50,257
    real logits, and the counts are summed over the ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with autocast:
        counts = evaluate(lambda idx: model(idx)[0][..., :50257], examples[rank::world],
                          batch_size=8, device=device)
    counts = torch.tensor(counts, dtype=torch.long, device=device)  # (n, correct, correct_norm)
    if dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    n, _, correct_norm = counts.tolist()
    return n, correct_norm


def sample(model, args):
    """Stage 1's samples from the model now, uncompiled: growing lengths would recompile."""
    device, enc = next(model.parameters()).device, gpt2_tokenizer()
    prompt = torch.tensor(enc.encode("Hello, I'm a language model,"), device=device)  # 8 tokens
    prompt = prompt.unsqueeze(0).repeat(args.num_return_sequences, 1)  # (5, 8)
    g = torch.Generator(device=device).manual_seed(args.seed)
    rows = generate(model.eval(), prompt, max_length=args.max_length, generator=g)
    model.train()
    return [enc.decode(row.tolist()) for row in rows]


def load_hellaswag(args, device, print0):
    """HellaSwag val for the in-run evaluation (`datasets` caches it; ranks that ask at once wait
    for one download). Every rank scores a share: all have it, or none uses it."""
    gpt2_tokenizer()  # now, on all ranks: else rank 0 alone would fail at its first sample
    hella = examples_for_run(args.hellaswag_file, args.hellaswag_limit, print0)  # offline: None
    have = float(bool(hella))  # every rank has HellaSwag: the mean over the ranks is 1
    if dist.is_initialized() and all_reduce_mean(torch.tensor(have, device=device)) < 1:
        hella = None
    return hella


# ----------------------------------------------------------------------------------------------
# the command line: each flag checked before any work, one line per mistake (not the lecture's)


def flag_range(lo, hi=math.inf, kind=int):
    """An argparse type: a `kind` from lo to hi. Anything else stops the run at parse_args, before
    any work, with one line naming the flag (see make_parser)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan  # compares false with everything: the error below
        if not lo <= value <= hi or value == math.inf:  # finite values only (nan compares false)
            a = "an integer" if kind is int else "a number"
            want = f"{a} {lo} or more" if hi == math.inf else f"{a} from {lo} to {hi}"
            raise argparse.ArgumentTypeError(f"got {text}; pass {want}")
        return value
    return parse


def make_parser():
    """The flags; their defaults are the lecture's values."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=RESUME_MAY_CHANGE)
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage block
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("-B", "--batch-size", type=flag_range(1), default=64, help="64 (4 on CPU)")
    parser.add_argument("-T", "--seq-len", type=flag_range(1, GPTConfig.block_size), default=1024,
                        help="1024 (128 on CPU)")
    parser.add_argument("--steps", type=flag_range(1), default=19073, help="19073 (50 on CPU)")
    parser.add_argument("--num-return-sequences", type=flag_range(1), default=5)
    parser.add_argument("--max-length", type=flag_range(9, GPTConfig.block_size), default=30,
                        help="tokens per sample, the 8-token prompt included")
    parser.add_argument("--seed", type=flag_range(0, 2**64 - 1), default=1337)  # the lecture's seed
    parser.add_argument("--n-layer", type=flag_range(1), default=12)
    parser.add_argument("--n-head", type=flag_range(1), default=12)
    parser.add_argument("--n-embd", type=flag_range(1), default=768)
    parser.add_argument("--data-dir", default=os.path.join(HERE, "edu_fineweb10B"))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for CUDA, off elsewhere)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 where native, else float16 (GPU) or float32 (CPU)")
    parser.add_argument("--peak-tflops", type=flag_range(0, kind=float), help="GPU peak, for mfu")
    parser.add_argument("--total-batch-size", type=flag_range(1), default=524288,
                        help="tokens per step (4*B*T*ranks on CPU)")
    parser.add_argument("--max-lr", type=flag_range(0, kind=float), default=6e-4)  # GPT-3 125M
    parser.add_argument("--warmup-steps", type=flag_range(0), default=715, help="715 (10 on CPU)")
    parser.add_argument("--log-dir", default=os.path.join(HERE, "log"))
    parser.add_argument("--eval-every", type=flag_range(1), default=250, help="250 (10 on CPU)")
    parser.add_argument("--val-tokens", type=flag_range(1), default=10485760,
                        help="the lecture's 20 x 64 x 1024 x 8 on any number of GPUs (2560 on CPU)")
    parser.add_argument("--hellaswag-file", help="HellaSwag val .jsonl/.parquet (default: the hub)")
    parser.add_argument("--hellaswag-limit", type=flag_range(0), default=0,
                        help="examples per eval (0 = all; 40 on CPU)")
    parser.add_argument("--checkpoint-every", type=flag_range(1), default=5000)
    parser.add_argument("--resume", action="store_true", help="go on from --log-dir's newest .pt")
    return parser


def main(argv=None):
    stop = StopSignals()  # a signal ends the run in one line; once training, after a saved step
    parser = make_parser()
    args = parser.parse_args(argv)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    # 50304 = 393 * 128: CUDA kernels work in blocks of 64 or 128; the 47 new rows are never targets
    config.vocab_size = 50304
    ddp, ddp_rank, ddp_local_rank, ddp_world_size, device = setup_ddp(args.device)
    master_process = ddp_rank == 0  # rank 0 prints, logs, samples and saves checkpoints
    print0 = print if master_process else lambda *a, **k: None
    device_type = "cuda" if device.startswith("cuda") else device  # autocast etc. want the type
    if device_type == "cpu":  # the lecture's values are for a GPU: a CPU step would take minutes
        parser.set_defaults(batch_size=4, seq_len=128, total_batch_size=None, steps=50,
                            warmup_steps=10, eval_every=10, val_tokens=2560, hellaswag_limit=40)
        args = parser.parse_args(argv)
    B, T = args.batch_size, args.seq_len
    if args.n_embd % args.n_head != 0:  # every head gets n_embd // n_head of the channels
        sys.exit(f"error: --n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
    total_batch_size = args.total_batch_size or 4 * B * T * ddp_world_size  # CPU: 4 micro-steps
    if total_batch_size < 1 or total_batch_size % (B * T * ddp_world_size) != 0:
        sys.exit(f"error: --total-batch-size {total_batch_size} is not a positive multiple of "
                 f"B*T*ranks = {B * T * ddp_world_size}; change it or -B/-T")
    grad_accum_steps = total_batch_size // (B * T * ddp_world_size)
    print0(f"total batch size {total_batch_size:,} tokens = {grad_accum_steps} micro-steps"
           f" of B*T = {B * T:,} on each of {ddp_world_size} ranks")
    print0(f"using device: {device}"
           + (f" | DDP: {ddp_world_size} ranks, {dist.get_backend()}" if ddp else ""))
    torch.manual_seed(args.seed)
    try:
        train_loader = DataLoaderLite(args.data_dir, "train", B, T, ddp_rank, ddp_world_size,
                                      args.seed, total_batch_size)
        val_loader = DataLoaderLite(args.data_dir, "val", B, T, 0, 1)  # val_loss shares it out
    except ShardError as e:  # every rank reads the same shards: all stop here
        sys.exit(f"error: {e}; re-create it with fineweb.py, or pass --data-dir")
    hella = load_hellaswag(args, device, print0)

    # TF32: fp32 matmuls on tensor cores, 10-bit mantissa (Ampere+: ~8x fp32 FLOP/s on an A100)
    torch.set_float32_matmul_precision("high")
    # bf16 where the chip computes it, else fp16 + grad scaler on a GPU (T4, V100), float32 on a CPU
    default = "float32" if device_type == "cpu" else "float16"
    dtype = getattr(torch, args.dtype or ("bfloat16" if native_bf16(device_type) else default))
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler"}.get(dtype, "off (float32)")
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    # inductor writes Triton kernels for a GPU (no Triton for Windows in PyTorch), C++ for a CPU
    compiler = "Triton" if device_type == "cuda" else "a C++ compiler"
    if use_compile and not (has_triton() if device_type == "cuda"
                            else shutil.which("c++") or shutil.which("cl")):
        print0(f"not compiling: torch.compile needs {compiler} here; running eager")
        use_compile = False
    print0(f"settings: {device_type} | B {B} T {T} | autocast {amp}"
           f" | compile {'on' if use_compile else 'off'}")

    model = GPT(config)
    model.to(device)
    raw_model = model  # sampling's growing lengths would make a compiled model recompile
    model = torch.compile(model) if use_compile else model  # fewer trips to GPU memory
    if ddp:  # each backward all-reduces (averages) the gradients across ranks
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)
    # MFU as nanoGPT reports it (the lecture prints tok/s): FLOPs per step / dt / GPU peak. 6 per
    # weight and token (fwd + bwd) + attention's 12*n_layer*n_embd*T (PaLM, app. B); wpe: a lookup
    n_params = sum(p.numel() for p in raw_model.parameters()) - config.block_size * config.n_embd
    flops_step = (6 * n_params + 12 * config.n_layer * config.n_embd * T) * total_batch_size
    gpu = (torch.cuda.get_device_name(device)
           if device_type == "cuda" and dtype != torch.float32 else "")
    peak = args.peak_tflops or next((t for name, t in PEAK_TFLOPS.items() if name in gpu), None)
    optimizer = raw_model.configure_optimizers(weight_decay=0.1, learning_rate=args.max_lr,
                                               device_type=device_type, log=print0)
    # fp16's 5 exponent bits flush gradients below ~6e-8 to 0: the scaler multiplies the loss first
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    run = run_record(args, total_batch_size, T)  # what fixes its trajectory (in each checkpoint)
    lock, ckpt_path, peers = open_log_dir(args.log_dir, args.resume, stop, print0)
    # --resume: the state after ckpt["step"] steps, if this is its run (fresh: no ckpt_path, step 0)
    ckpt, error = load_checkpoint(ckpt_path, device, config, run, train_loader.sizes)
    stop_all_on(error, stop, lock)
    start_step, val = restore(ckpt, ckpt_path, raw_model, optimizer, scaler, train_loader,
                              args.steps, print0)
    if start_step >= args.steps:  # the run is finished (restore said so)
        return close_run(stop, lock)
    log = Log(os.path.join(args.log_dir, "log.txt") if master_process else None)  # rank 0 writes it
    log.header(device, ddp_world_size, raw_model, total_batch_size, B, T,
               resumed_at=start_step if ckpt_path else None)
    autocast = torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)
    losses, error, group_alive, stopping, saved = [], None, True, 0, ckpt_path  # saved: newest .pt
    stop.training = True  # a signal now finishes a step, which is saved
    try:  # out of memory anywhere in a step, a rank lost, a damaged shard: one line, see below
        for step in range(start_step, args.steps):
            last_step = step == args.steps - 1
            stopping = 0 if last_step else stop.agreed(device)  # a signal: all ranks end after it
            entries = []
            if (step % args.eval_every == 0 or last_step) and not stopping:  # not counted in dt
                val, entries = evaluate_now(step, model, raw_model, val_loader, hella, args, device,
                                            autocast, print0)
            if (master_process and ((step > 0 and step % args.eval_every == 0) or last_step)
                    and not stopping):
                for i, text in enumerate(sample(raw_model, args)):
                    print(f"sample {i}: {text}")  # what does it say so far?
            t0 = time.time()
            optimizer.zero_grad()
            loss_accum = 0.0
            for micro_step in range(grad_accum_steps):
                x, y = train_loader.next_batch()
                x, y = x.to(device), y.to(device)
                if ddp:  # all-reduce the gradients only once, in the last micro-step's backward
                    model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
                # autocast runs matmuls in bf16 (fp16); softmax, layernorm and the loss stay in fp32
                with autocast:
                    logits, loss = model(x, y)
                # .grad accumulates: each micro-batch's mean / count sums to one big batch's mean
                loss = loss / grad_accum_steps
                loss_accum += loss.detach()
                scaler.scale(loss).backward()  # a no-op scale unless float16
            all_reduce_mean(loss_accum)  # the loss over all ranks' tokens
            scaler.unscale_(optimizer)  # float16: clip the true gradients, not the scaled ones
            # clip the global gradient norm at 1.0 (GPT-3): one unlucky batch cannot jolt the model
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            error = divergence_error(step, loss_accum.item(), norm.item(), scaler.is_enabled(),
                                     lambda: resume_hint(saved, diverged=True))
            if error:
                break  # every rank sees the same all-reduced loss and norm: all stop here
            lr = get_lr(step, args.max_lr, args.warmup_steps, args.steps)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            scale = scaler.get_scale()
            scaler.step(optimizer)  # fp16: skipped if any gradient is inf/nan (scale too big)
            scaler.update()  # ... and then halves the scale (doubles it after 2000 clean steps)
            getattr(torch, device_type).synchronize()  # wait for the queued work, or dt ends early
            dt = time.time() - t0
            losses.append(loss_accum.item())  # .item() waits for the device, copies the loss to CPU
            line = (f"step {step:5d} | loss {losses[-1]:.6f} | dt {dt * 1000:.2f}"
                    f" | tok/s {total_batch_size / dt:.0f}")
            if peak:
                line += f" | mfu {100 * flops_step / dt / (peak * 1e12 * ddp_world_size):.2f}"
            line += f" | lr {lr:.4e} | norm {norm:.4f}"
            print0(line + (" | skipped 1" if scaler.get_scale() < scale else ""))
            if master_process:
                log.write("".join(f"{e}\n" for e in entries + [f"{step} train {losses[-1]:.6f}"]))
                if (step + 1) % args.checkpoint_every == 0 or last_step or stopping:
                    state = checkpoint_state(raw_model, optimizer, scaler, train_loader, step + 1,
                                             val, run)
                    saved, error = save_checkpoint(args.log_dir, state, saved,
                                                   last=last_step or stopping)
            if stopping:  # all ranks stop here; rank 0 says how to go on, also in the log
                if not error:
                    print0(log.note(f"stopped after step {step}; {resume_hint(saved)}"))
                break
    except RuntimeError as e:  # out of memory: a GPU's torch.OutOfMemoryError, a CPU's RuntimeError
        hint = f"try -B {B // 2} (same --total-batch-size: same run)" if B > 1 else "try -T smaller"
        oom = isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
        error = f"error: out of memory at -B {B} -T {T} on {device}; {hint}" if oom else None
        error, group_alive = error or lost_rank(e, step, peers, saved), False  # else a rank died
    except ShardError as e:
        error = f"error: step {step}: {e}; re-create it with fineweb.py, then {resume_hint(saved)}"
    if error:
        log.note(error)  # rank 0: the log is the run's record
    close_run(stop, lock, group_alive)
    if error or stopping:  # the error line, or 128 + the signal, as a shell reports it
        sys.exit(exit_status(error, stopping, master_process, group_alive))
    return losses


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")  # samples print on any locale (LC_ALL=C too)
    main()
