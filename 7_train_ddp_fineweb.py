"""Stage 7: the full run: DDP on FineWeb-Edu, with validation, HellaSwag, sampling, checkpoints.

New in this stage (lecture 02:46:52-03:43:05, "distributed data parallel", "datasets used in GPT-2,
GPT-3, FineWeb (EDU)", "validation data split, validation loss, sampling revive", "evaluation:
HellaSwag, starting the run"):
- DDP under torchrun (nccl on CUDA where torch has it, gloo otherwise), on one machine or several;
  plain `python 7_...` runs one process
- DataLoaderLite reads fineweb.py's uint16 shards, memory-mapped; a step's micro-batches are
  dealt round-robin to the ranks; train shards are visited in a seeded order, new each epoch
- every --eval-every steps: val loss on the same --val-steps batches, HellaSwag acc_norm on all
  ranks' share of the examples, samples from the model (all of it works with torch.compile on)
- {log-dir}/log.txt (header: command, versions, device, model size, batch; plot_log.py draws it)
  and checkpoints model_{n:05d}.pt that --resume continues from exactly (export_hf.py, hellaswag.py
  -m read them)
- long runs: SIGTERM or Ctrl-C finishes the step, saves it (all ranks stop after the same step)
  and prints the --resume command; a diverged run names the checkpoint to resume from; a damaged
  or unwritable checkpoint gets one line and nothing is deleted
- defaults: the lecture's 10B-token run (B=64, T=1024, 19,073 steps, warmup 715); small on CPU

Run:   python fineweb.py                                          (~10B tokens into 100 shards)
       torchrun --standalone --nproc_per_node=8 7_train_ddp_fineweb.py
Diff:  diff 6_train_hyperparams.py 7_train_ddp_fineweb.py
"""
import argparse
import glob
import math
import os
import platform
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from hellaswag import HellaSwagError, evaluate, iterate_examples

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
        # decay the 2-D tensors (matmul weights, embeddings); biases and LayerNorm gains are
        # few and shifting/scaling, so pulling them toward 0 only hurts (GPT-3: wd 0.1)
        params = [p for p in self.parameters() if p.requires_grad]  # tied wte/lm_head: once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        log(f"decayed parameter tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
        log(f"non-decayed parameter tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel updates all parameters, instead of a loop of small kernels per tensor
        use_fused = device_type == "cuda"
        log(f"using fused AdamW: {use_fused}")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=use_fused)

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """GPT-2 weights from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or from
        a local directory written by GPT2LMHeadModel.save_pretrained (sizes read from its config)."""
        from transformers import GPT2LMHeadModel
        if not os.path.isdir(name_or_dir) and name_or_dir not in PRETRAINED:
            raise ValueError(f"unknown model '{name_or_dir}': use one of {', '.join(PRETRAINED)} "
                             "or a directory written by GPT2LMHeadModel.save_pretrained")
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except OSError as e:  # no network and nothing cached, or not a GPT-2 checkpoint
            raise OSError(f"could not load '{name_or_dir}' with transformers ({str(e).splitlines()[0]}); "
                          "connect to the internet once, or pass a local save_pretrained directory") from e
        c = hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                           n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
        model = GPT(config)
        sd = model.state_dict()
        sd_hf = hf.state_dict()
        keys = [k for k in sd_hf if not k.endswith((".attn.bias", ".attn.masked_bias"))]
        assert sorted(keys) == sorted(sd), "state-dict keys differ from GPT-2's"
        # OpenAI's checkpoints use a Conv1D module whose weight is the transpose of nn.Linear's
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                assert w.shape == sd[k].shape, f"{k}: {tuple(w.shape)} vs {tuple(sd[k].shape)}"
                sd[k].copy_(w)
        return model


PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1558M

# ----------------------------------------------------------------------------------------------
# data

HERE = os.path.dirname(os.path.abspath(__file__))  # default paths start here, not in the working directory


def load_tokens(path):
    """A shard's tokens, memory-mapped: the OS pages in what a batch reads, so a rank never
    holds a whole 100M-token shard in memory (as int64 that would be 800 MB per rank)."""
    tokens = np.load(path, mmap_mode="r")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"{path} holds {tokens.dtype} {tokens.shape}, not the 1-D uint16 tokens "
                         "fineweb.py writes; re-create it with fineweb.py")
    return tokens


class DataLoaderLite:
    """(B, T) batches from the edufineweb_{split}_*.npy shards, for rank `rank` of `world_size`.

    A step's micro-batches are consecutive B*T slices dealt round-robin to the ranks (rank r takes
    slices r, r+W, r+2W, ...); a step never straddles two shards, and the position is the same on
    every rank, so ranks leave a shard together and W ranks take exactly the slices of one process
    with W x the micro-steps. Train shards come in a seeded order, new each epoch, same on all ranks.
    """

    def __init__(self, data_dir, split, B, T, rank, world_size, seed=0, step_tokens=None):
        self.B, self.T, self.rank, self.world_size, self.seed = B, T, rank, world_size, seed
        self.step_tokens = step_tokens or world_size * B * T  # tokens all ranks take per step
        self.shuffle = split == "train"
        self.shards = sorted(glob.glob(os.path.join(data_dir, f"edufineweb_{split}_*.npy")))
        if not self.shards:
            raise ValueError(f"no {split} shards (edufineweb_{split}_*.npy) in {data_dir}; "
                             "run `python fineweb.py` first, or pass --data-dir")
        need = self.step_tokens + 1  # one step's slices, plus the last target
        if max(len(load_tokens(path)) for path in self.shards) < need:
            raise ValueError(f"every {split} shard in {data_dir} is shorter than one step's {need} tokens")
        self.reset()

    def shard_order(self, epoch):
        if not self.shuffle:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def reset(self):
        self.load_state_dict({"epoch": 0, "shard": 0, "position": 0})

    def state_dict(self):
        return {"epoch": self.epoch, "shard": self.shard, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.shard, self.position = state["epoch"], state["shard"], state["position"]
        self.order = self.shard_order(self.epoch)
        self.tokens = load_tokens(self.shards[self.order[self.shard]])

    def next_batch(self):
        B, T, W = self.B, self.T, self.world_size
        # at a step's start, if the shard has no whole step left, go on to the next shard
        while self.position % self.step_tokens == 0 and self.position + self.step_tokens + 1 > len(self.tokens):
            self.position, self.shard = 0, self.shard + 1
            if self.shard == len(self.shards):  # next epoch, in a new order
                self.epoch, self.shard = self.epoch + 1, 0
                self.order = self.shard_order(self.epoch)
            self.tokens = load_tokens(self.shards[self.order[self.shard]])
        start = self.position + self.rank * B * T
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))
        x = buf[:-1].view(B, T)  # inputs (B, T)
        y = buf[1:].view(B, T)  # targets (B, T): the token that follows each input position
        self.position += W * B * T
        return x, y


# ----------------------------------------------------------------------------------------------
# helpers

# peak dense bf16 (= fp16) / tf32 tensor-core TFLOP/s from NVIDIA's data sheets (first match in the name)
PEAK_TFLOPS = {"A100": (312.0, 156.0), "H100 PCIe": (756.0, 378.0), "H100": (989.4, 494.7), "H200": (989.4, 494.7)}


def peak_flops(device_type, dtype, override_tflops):
    """The chip's peak FLOP/s for MFU: --peak-tflops, else looked up from the GPU's name."""
    if override_tflops:
        return override_tflops * 1e12
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for chip, (bf16, tf32) in PEAK_TFLOPS.items():
            if chip in name:
                return (tf32 if dtype == torch.float32 else bf16) * 1e12
    return None  # unknown chip, or a CPU: no mfu field


def flops_per_token(model, T):
    """6N for the weights' forward + backward matmuls, plus 12 L H Q T for attention (PaLM
    paper, appendix B); N leaves out the position embeddings, which are a lookup, not a matmul."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T


def autocast_supported(device_type, dtype):
    """Ask torch whether autocast on this device runs matmuls in `dtype` (and not by emulation)."""
    if device_type == "cuda" and dtype == torch.bfloat16:  # compute capability < 8.0 emulates it, slowly
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with warnings.catch_warnings(), torch.autocast(device_type, dtype=dtype):
            warnings.simplefilter("ignore")  # an unsupported dtype switches autocast off, with a warning
            x = torch.ones(2, 2, device=device_type)
            return (x @ x).dtype == dtype
    except (RuntimeError, TypeError):
        return False


def get_lr(step, max_lr, warmup_steps, max_steps):
    """Linear warmup to max_lr over warmup_steps, then cosine decay to 10% of it at the last
    step (max_steps - 1), constant after (GPT-3 paper, appendix B)."""
    min_lr = max_lr * 0.1
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps  # step 0 already takes a small step
    if step >= max_steps - 1:
        return min_lr
    decay_ratio = (step - warmup_steps + 1) / (max_steps - warmup_steps)  # 0 at the peak, 1 at the end
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)


def divergence_error(step, loss, norm, resume):
    """The error line for a loss or gradient norm that is nan or inf (the run has diverged), else
    None: the caller stops before optimizer.step(), which would write the nan into the weights."""
    bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", norm)) if not math.isfinite(value)]
    if bad:
        return (f"error: step {step}: {' and '.join(bad)}: the run diverged and stopped before the optimizer step; "
                f"{resume}, with a lower --max-lr or a longer --warmup-steps")
    return None


def compile_unavailable(device_type):
    """Why torch.compile cannot run here, or None: it needs Triton on a GPU, a C++ compiler on a CPU."""
    if device_type == "mps":
        return "torch.compile is not used on mps here"
    if device_type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed"
    return None if shutil.which("c++") or shutil.which("g++") or shutil.which("cl") else "no C++ compiler found"


def pick_device(name):
    """'auto' takes the fastest device present (cuda, then Apple's mps, then cpu)."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not has_mps):
        sys.exit(f"error: --device {name} is not available on this machine; use --device auto or cpu")
    return name


def out_of_memory(B, T, device):
    """The one line for a CUDA out-of-memory error: what failed, the GPU's memory, what to try."""
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.startswith("cuda") else 0
    hint = f"try -B {B // 2} (the total batch, and so the run, stay the same)" if B > 1 else "try a smaller -T"
    return f"error: out of memory at -B {B} -T {T} on {device}" + (f" ({gib:.0f} GiB)" if gib else "") + f"; {hint}"


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


def all_reduce_mean(t, ddp, world_size):
    """Average a tensor over the ranks (gloo has no ReduceOp.AVG: sum, then divide)."""
    if ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size
    return t


def log_header(device, world_size, model, total_batch_size, B, T):
    chip = torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine()
    c, n_params = model.config, sum(p.numel() for p in model.parameters())
    return (f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}\n"
            f"# python {platform.python_version()} | torch {torch.__version__} | numpy {np.__version__}"
            f" | tiktoken {tiktoken.__version__}\n# device: {world_size} x {device} ({chip})\n"
            f"# model: n_layer {c.n_layer} n_head {c.n_head} n_embd {c.n_embd} ({n_params / 1e6:.1f}M params)"
            f" | total batch size {total_batch_size} tokens | B {B} T {T}\n")  # what plot_log.py reads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("-B", "--batch-size", type=int, default=None, help="64 (4 on CPU)")
    parser.add_argument("-T", "--seq-len", type=int, default=None, help="1024 (128 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="19073: 10B tokens / 524288 (50 on CPU)")
    parser.add_argument("--num-return-sequences", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1337)  # the lecture's training seed
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--data-dir", default=os.path.join(HERE, "edu_fineweb10B"))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for CUDA, off elsewhere)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="autocast dtype of the forward pass (float16 adds a gradient scaler)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for mfu")
    parser.add_argument("--total-batch-size", type=int, default=None,
                        help="tokens per optimisation step: 524288 (4*B*T*ranks on CPU)")
    parser.add_argument("--max-lr", type=float, default=6e-4)  # GPT-3 125M, table 2.1
    parser.add_argument("--warmup-steps", type=int, default=None, help="715: GPT-3's 375M tokens (10 on CPU)")
    parser.add_argument("--log-dir", default=os.path.join(HERE, "log"))
    parser.add_argument("--eval-every", type=int, default=None, help="250 (10 on CPU)")
    parser.add_argument("--val-steps", type=int, default=None, help="20 (5 on CPU)")
    parser.add_argument("--hellaswag-file", default=None, help="a local HellaSwag val .jsonl/.parquet (default: hub)")
    parser.add_argument("--hellaswag-limit", type=int, default=None, help="examples per eval (0 = all; 40 on CPU)")
    parser.add_argument("--checkpoint-every", type=int, default=5000)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --log-dir")
    args = parser.parse_args(argv)
    # 50304 = 393 * 128: many CUDA kernels work in blocks of 64 or 128 and take a slow path for
    # the remainder; the 47 extra rows are never targets, so their logits are just pushed down
    config = GPTConfig(vocab_size=50304, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: one process per GPU; without it, one process
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        ddp_rank, ddp_local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        ddp_world_size = int(os.environ["WORLD_SIZE"])
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{ddp_local_rank}"
            torch.cuda.set_device(device)
        elif args.device in ("auto", "cpu"):
            device = "cpu"
        else:
            sys.exit(f"error: DDP runs on cuda or cpu, not --device {args.device}")
        # nccl: NVIDIA's GPU collectives, where this torch has them (not on Windows or macOS);
        # gloo otherwise, which also all-reduces CUDA tensors, more slowly
        backend = "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend)
    else:
        ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
        device = pick_device(args.device)
    master_process = ddp_rank == 0  # rank 0 prints, logs, samples and saves checkpoints
    print0 = print if master_process else lambda *a, **k: None
    device_type = "cuda" if device.startswith("cuda") else device  # autocast etc. want the type
    # the lecture's values are for GPUs (on a CPU they take minutes per step); flags override
    full = dict(batch_size=64, seq_len=1024, steps=19073, warmup_steps=715, eval_every=250, val_steps=20, hellaswag_limit=0)
    small = dict(batch_size=4, seq_len=128, steps=50, warmup_steps=10, eval_every=10, val_steps=5, hellaswag_limit=40)
    unset = [k for k in full if getattr(args, k) is None]
    for k in unset:
        setattr(args, k, (full if device_type != "cpu" else small)[k])
    if device_type == "cpu" and unset:
        print0("cpu: small defaults " + " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in unset))
    B, T = args.batch_size, args.seq_len
    if min(B, args.steps) < 1 or not 1 <= T <= config.block_size:
        sys.exit(f"error: need B >= 1, steps >= 1 and 1 <= T <= block size {config.block_size} "
                 f"(got B={B}, T={T}, steps={args.steps})")
    total_batch_size = args.total_batch_size or (524288 if device_type != "cpu" else 4 * B * T * ddp_world_size)
    if total_batch_size < 1 or total_batch_size % (B * T * ddp_world_size) != 0:
        sys.exit(f"error: --total-batch-size {total_batch_size} is not a positive multiple of "
                 f"B*T*ranks = {B * T * ddp_world_size}; change it or -B/-T")
    grad_accum_steps = total_batch_size // (B * T * ddp_world_size)
    print0(f"total batch size {total_batch_size:,} tokens = {grad_accum_steps} micro-steps of B*T = {B * T:,}"
           f" on each of {ddp_world_size} ranks")
    if min(args.eval_every, args.val_steps, args.checkpoint_every) < 1:
        sys.exit("error: --eval-every, --val-steps and --checkpoint-every must be >= 1")
    if args.n_embd % args.n_head != 0:
        sys.exit(f"error: --n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
    checkpoints = sorted(glob.glob(os.path.join(args.log_dir, "model_*.pt")))  # names sort by n
    if ddp and args.resume:  # every rank loads the newest checkpoint: on several machines, do all see it?
        seen = [None] * ddp_world_size
        dist.all_gather_object(seen, os.path.basename(checkpoints[-1]) if checkpoints else "none")
        if len(set(seen)) > 1:
            sys.exit(f"error: --resume: the newest checkpoint in {args.log_dir}, rank by rank: {', '.join(seen)}; "
                     "put --log-dir on storage every node shares")
    if args.resume and not checkpoints:
        sys.exit(f"error: --resume: no model_*.pt checkpoint in {args.log_dir}; start without --resume")
    if not args.resume and checkpoints:
        sys.exit(f"error: {args.log_dir} holds checkpoints of an earlier run ({os.path.basename(checkpoints[-1])}); "
                 "pass --resume to continue it, or choose another --log-dir")
    if args.hellaswag_file and not os.path.isfile(args.hellaswag_file):
        sys.exit(f"error: --hellaswag-file {args.hellaswag_file} not found")

    print0(f"using device: {device}" + (f" | DDP: {ddp_world_size} ranks, {backend}" if ddp else ""))
    torch.manual_seed(args.seed)
    try:
        train_loader = DataLoaderLite(args.data_dir, "train", B, T, ddp_rank, ddp_world_size, args.seed, total_batch_size)
        val_loader = DataLoaderLite(args.data_dir, "val", B, T, ddp_rank, ddp_world_size)
    except ValueError as e:
        sys.exit(f"error: {e}")
    # HellaSwag val: rank 0 downloads it (once) while the others wait; offline, train without it
    hella = None
    if ddp and not master_process:
        dist.barrier()
    try:
        hella = list(iterate_examples("val", data_file=args.hellaswag_file))[:args.hellaswag_limit or None]
    except HellaSwagError as e:  # offline with nothing cached, no `datasets`, or not a HellaSwag file
        print0(f"HellaSwag is off for this run: {e}" + ("" if args.hellaswag_file else
                                                          "; pass --hellaswag-file PATH for a local copy"))
    if ddp and master_process:
        dist.barrier()
    if ddp and all_reduce_mean(torch.tensor(float(bool(hella)), device=device), ddp, ddp_world_size) < 1:
        hella = None  # every rank scores a share: all have the examples, or none scores them

    # TF32: fp32 matmuls on tensor cores with a 10-bit mantissa (Ampere and later; ~8x the fp32
    # FLOP/s on an A100); activations and weights stay fp32 in memory
    torch.set_float32_matmul_precision("high")
    dtype = getattr(torch, args.dtype)
    if dtype != torch.float32 and not autocast_supported(device_type, dtype):
        # T4, V100, RTX 20xx (compute capability < 8.0) have fp16 tensor cores, but no bf16
        fallback = torch.float16 if autocast_supported(device_type, torch.float16) else torch.float32
        print0(f"{device_type}: no {args.dtype} autocast here, using {str(fallback)[6:]}")
        dtype = fallback
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler", torch.float32: "off (float32)"}[dtype]
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    if use_compile and (why := compile_unavailable(device_type)):
        print0(f"not compiling: {why}; running eager")
        use_compile = False
    print0(f"settings: {device_type} | autocast {amp} | compile {'on' if use_compile else 'off'}")

    model = GPT(config)
    model.to(device)
    try:  # --resume: the newest checkpoint; weights_only: it holds plain types and tensors, no pickled code
        ckpt = torch.load(checkpoints[-1], map_location=device, weights_only=True) if args.resume else None
    except Exception as e:  # cut short (an interrupted copy, a full disk), or not a checkpoint at all
        sys.exit(f"error: cannot load {checkpoints[-1]} ({str(e).split('.')[0] or type(e).__name__}); nothing was "
                 f"deleted: move it out of {args.log_dir} and --resume takes the one before it" if master_process else 1)
    if ckpt:
        if ckpt["config"] != asdict(config):
            sys.exit(f"error: {checkpoints[-1]} holds a model with {ckpt['config']}, this run builds "
                     f"{asdict(config)}; pass the same --n-layer/--n-head/--n-embd")
        model.load_state_dict(ckpt["model"])
        train_loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"]["cpu"].cpu())  # map_location moved it to the device
        print0(f"resuming from {checkpoints[-1]} after step {ckpt['step'] - 1}")
    raw_model = model  # sampling's growing lengths would make a compiled model recompile
    if use_compile:
        model = torch.compile(model)  # fuses elementwise ops: fewer trips to GPU memory
    if ddp:  # each backward all-reduces (averages) the gradients across ranks
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)
    flops_peak = peak_flops(device_type, dtype, args.peak_tflops)
    flops_step = flops_per_token(raw_model, T) * total_batch_size
    optimizer = raw_model.configure_optimizers(weight_decay=0.1, learning_rate=args.max_lr, device_type=device_type,
                                               log=print0)
    # fp16 keeps 5 exponent bits (bf16 keeps fp32's 8): gradients below ~6e-8 flush to 0. The scaler
    # multiplies the loss, so every gradient, by a large factor and divides it out before the update
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # float16 runs only: a disabled scaler has no state
            scaler.load_state_dict(ckpt["scaler"])
    start_step, resume = (ckpt["step"], f"--resume from {checkpoints[-1]}") if ckpt else (0, "start again")
    val_loss = ckpt["val_loss"] if ckpt else None
    log_file = os.path.join(args.log_dir, "log.txt")
    if master_process:  # a fresh run starts a new log; --resume appends to it
        os.makedirs(args.log_dir, exist_ok=True)
        with open(log_file, "a" if args.resume else "w") as f:
            f.write(log_header(device, ddp_world_size, raw_model, total_batch_size, B, T)
                    + (f"# resumed at step {start_step}\n" if args.resume else ""))
    enc = gpt2_tokenizer()
    losses = []
    got, error, stop = [0], None, 0
    def note(signum, frame):  # SIGTERM (preemption, `timeout`; torchrun passes it on) or Ctrl-C: finish the step
        got[0] = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once
    previous_handlers = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    for step in range(start_step, args.steps):
        last_step = step == args.steps - 1
        log_lines = []
        if step % args.eval_every == 0 or last_step:  # evaluation is not part of the step time
            model.eval()
            val_loader.reset()  # the same val batches every time
            with torch.no_grad():
                val_loss_accum = torch.zeros((), device=device)
                for _ in range(args.val_steps):
                    x, y = val_loader.next_batch()
                    x, y = x.to(device), y.to(device)
                    try:
                        with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
                            logits, loss = model(x, y)
                    except torch.OutOfMemoryError:  # the (B, T, 50304) logits alone are 6.6 GB at B=64
                        sys.exit(out_of_memory(B, T, device))
                    val_loss_accum += loss.detach() / args.val_steps
            val_loss = all_reduce_mean(val_loss_accum, ddp, ddp_world_size).item()
            print0(f"validation loss: {val_loss:.4f}")
            log_lines.append(f"{step} val {val_loss:.4f}")
            if hella:  # each rank scores every W-th example; the counts are summed over ranks
                with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
                    counts = evaluate(lambda idx: raw_model(idx)[0][..., :50257], hella[ddp_rank::ddp_world_size], 8, device)
                counts = torch.tensor(counts, dtype=torch.long, device=device)  # (n, correct, correct_norm)
                if ddp:
                    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
                n, _, correct_norm = counts.tolist()
                print0(f"HellaSwag accuracy: {correct_norm}/{n} = {correct_norm / n:.4f}")
                log_lines.append(f"{step} hella {correct_norm / n:.4f}")
            model.train()
        if master_process and ((step > 0 and step % args.eval_every == 0) or last_step):
            # what does it say so far? the uncompiled module, so growing lengths never recompile
            prompt = torch.tensor(enc.encode("Hello, I'm a language model,"), device=device)  # 8 tokens
            prompt = prompt.unsqueeze(0).repeat(args.num_return_sequences, 1)  # (5, 8)
            g = torch.Generator(device=device).manual_seed(args.seed)
            for i, row in enumerate(generate(raw_model.eval(), prompt, max_length=args.max_length, generator=g)):
                print(f"sample {i}: {enc.decode(row.tolist())}")
            raw_model.train()

        t0 = time.time()
        optimizer.zero_grad()
        loss_accum = 0.0
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device), y.to(device)
            if ddp:  # all-reduce the gradients only once, in the last micro-step's backward
                model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
            # autocast runs matmuls in bf16 (fp16); softmax, layernorm and the loss stay in fp32
            try:
                with torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32):
                    logits, loss = model(x, y)
                # backward() adds into .grad: dividing each micro-batch's mean loss by the count makes
                # the sum the mean over all total_batch_size tokens, as one big batch would have it
                loss = loss / grad_accum_steps
                loss_accum += loss.detach()
                scaler.scale(loss).backward()  # a no-op scale unless float16
            except torch.OutOfMemoryError:
                sys.exit(out_of_memory(B, T, device))
        all_reduce_mean(loss_accum, ddp, ddp_world_size)  # the loss over all ranks' tokens
        scaler.unscale_(optimizer)  # float16: clip the true gradients, not the scaled ones
        # clip the global gradient norm at 1.0 (GPT-3): one unlucky batch cannot jolt the model
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # float16: an inf/nan gradient is the scaler's to skip (see below); a nan/inf loss still stops the run
        error = divergence_error(step, loss_accum.item(), 0.0 if scaler.is_enabled() else norm.item(), resume)
        if error:
            break  # every rank sees the same all-reduced loss and norm: all stop here
        lr = get_lr(step, args.max_lr, args.warmup_steps, args.steps)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        scale = scaler.get_scale()
        scaler.step(optimizer)  # float16: skipped if any gradient is inf/nan (the scale was too big)
        scaler.update()  # ... and then halves the scale (doubles it after 2000 clean steps)
        # torch.cuda (.mps, .cpu).synchronize(): wait for the queued GPU work, or dt stops too early
        getattr(torch, device_type).synchronize()
        dt = time.time() - t0
        losses.append(loss_accum.item())  # .item() waits for the device and moves the loss to the CPU
        line = f"step {step:5d} | loss {losses[-1]:.6f} | dt {dt * 1000:.2f} | tok/s {total_batch_size / dt:.0f}"
        if flops_peak:
            line += f" | mfu {100 * flops_step / dt / (flops_peak * ddp_world_size):.2f}"
        print0(line + f" | lr {lr:.4e} | norm {norm:.4f}" + (" | skipped 1" if scaler.get_scale() < scale else ""))
        stop = all_reduce_mean(torch.tensor(float(got[0]), device=device), ddp, ddp_world_size).item()  # > 0: all stop
        if master_process:
            with open(log_file, "a") as f:
                f.write("".join(f"{entry}\n" for entry in log_lines + [f"{step} train {losses[-1]:.6f}"]))
            if (step + 1) % args.checkpoint_every == 0 or last_step or stop:  # the state after step + 1 steps
                path = os.path.join(args.log_dir, f"model_{step + 1:05d}.pt")
                try:
                    torch.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                "config": asdict(raw_model.config), "step": step + 1, "val_loss": val_loss,
                                "scaler": scaler.state_dict(), "loader": train_loader.state_dict(),
                                "rng": {"cpu": torch.get_rng_state()}}, path + ".tmp")
                    os.replace(path + ".tmp", path)  # atomic: a crash mid-write never leaves a torn file
                    resume = f"--resume from {path}"
                except (OSError, RuntimeError) as e:  # a full disk: the earlier checkpoints stay as they are
                    if os.path.exists(path + ".tmp"):
                        os.remove(path + ".tmp")
                    print(f"error: could not write {path} ({e}); removed its .tmp, kept the earlier ones", file=sys.stderr)
        if stop:
            cmd = [f"torchrun --standalone --nproc_per_node={ddp_world_size}" if ddp else "python"] + sys.argv
            print0(f"stopped after step {step}; continue with: {' '.join(cmd)}{'' if args.resume else ' --resume'}")
            break
    previous_handlers = {s: signal.signal(s, h) for s, h in previous_handlers.items()}  # put back: main() may run again
    if ddp:  # wait for rank 0's last checkpoint: a rank that tears down gloo early can abort
        dist.barrier()
        dist.destroy_process_group()
    if error or stop:  # rank 0 says why; after a signal: 128 + its number, as a shell reports a killed process
        sys.exit((error if master_process else 1) if error else 128 + (got[0] or signal.SIGTERM))
    return losses


if __name__ == "__main__":
    main()
