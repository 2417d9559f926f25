"""Stage 5: make it fast.

New in this stage (lecture 01:22:18-02:14:55, "Section 2: Let's make it fast"):
- step timing that is honest: wait for the GPU (CUDA, MPS) before reading the clock; each step
  line adds dt (ms), tok/s and, on a GPU in PEAK_TFLOPS (or with --peak-tflops), mfu: the share
  of its dense bf16/fp16 FLOP/s the step uses (float32 runs only with --peak-tflops)
- TF32 matmuls, bf16 autocast for the forward pass (--dtype), torch.compile (--compile)
- bf16 by default only where the chip computes it; else float16 on a GPU (T4, V100): fp16 has only
  5 exponent bits, so small gradients underflow to 0 unless a GradScaler scales the loss up first
  (bf16 has fp32's 8 and needs none); float32 on a CPU without AVX512-BF16 or AMX
- flash attention: F.scaled_dot_product_attention(is_causal=True) replaces the masked softmax
- vocab padded 50257 -> 50304 (= 393 * 128), a "nicer number" for the GPU kernels; the tokenizer
  never emits the padding ids, so sampling leaves them out
- B=16, T=1024 as in the lecture; on CPU, B=4, T=128 unless -B/-T say otherwise

Run:   python 5_train_speedup.py      (124M, 50 steps; the single-GPU workhorse)
Diff:  diff 4_train_init.py 5_train_speedup.py
"""
import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
from torch.nn import functional as F
try: from torch.utils._triton import has_triton  # private: a torch without it has "no Triton"
except ImportError: has_triton = lambda: False  # so a GPU runs eager, and says so

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


def load_tokens(path):
    """GPT-2 BPE token ids of a text file, as a 1-D long tensor (338,025 for tiny Shakespeare)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:  # not there, a folder, unreadable; Latin-1 or binary
        sys.exit(f"error: {path}: {getattr(e, 'strerror', 0) or 'not UTF-8 text'}; pass UTF-8 text")
    return torch.tensor(gpt2_tokenizer().encode(text, allowed_special="all"), dtype=torch.long)


class DataLoaderLite:
    """Consecutive (B, T) batches over a 1-D token tensor, epoch after epoch."""

    def __init__(self, tokens, B, T):
        self.tokens = tokens  # at least B*T+1 of them: main checks
        self.B, self.T = B, T
        print(f"loaded {len(tokens):,} tokens; 1 epoch = {(len(tokens) - 1) // (B * T):,} batches")
        self.current_position = 0

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.current_position:self.current_position + B * T + 1]
        x = buf[:-1].view(B, T)  # inputs (B, T)
        y = buf[1:].view(B, T)  # targets (B, T): the token that follows each input position
        self.current_position += B * T
        # a batch needs B*T+1 tokens (the last target); if the next one would run past the end,
        # start the next epoch at the beginning
        if self.current_position + B * T + 1 > len(self.tokens):
            self.current_position = 0
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
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, no usage block
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("-B", "--batch-size", type=flag_range(1), default=16, help="16 (4 on CPU)")
    parser.add_argument("-T", "--seq-len", type=flag_range(1, GPTConfig.block_size), default=1024,
                        help="1024 (128 on CPU)")
    parser.add_argument("--steps", type=flag_range(1), default=50)
    parser.add_argument("--num-return-sequences", type=flag_range(1), default=5)
    parser.add_argument("--max-length", type=flag_range(9, GPTConfig.block_size), default=30,
                        help="tokens per sample, the 8-token prompt included")
    parser.add_argument("--seed", type=flag_range(0, 2**64 - 1), default=1337)  # the lecture's seed
    parser.add_argument("--n-layer", type=flag_range(1), default=12)
    parser.add_argument("--n-head", type=flag_range(1), default=12)
    parser.add_argument("--n-embd", type=flag_range(1), default=768)
    parser.add_argument("--input", default=os.path.join(HERE, "input.txt"))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for CUDA, off elsewhere)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 where native, else float16 (GPU) or float32 (CPU)")
    parser.add_argument("--peak-tflops", type=flag_range(0, kind=float), help="GPU peak, for mfu")
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    # 50304 = 393 * 128: CUDA kernels work in blocks of 64 or 128; the 47 new rows are never targets
    config.vocab_size = 50304
    device = pick_device(args.device)
    device_type = "cuda" if device.startswith("cuda") else device  # autocast etc. want the type
    if device_type == "cpu":  # the lecture's values are for a GPU: a CPU step would take minutes
        parser.set_defaults(batch_size=4, seq_len=128)
        args = parser.parse_args(argv)
    B, T = args.batch_size, args.seq_len
    if args.n_embd % args.n_head != 0:  # every head gets n_embd // n_head of the channels
        sys.exit(f"error: --n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
    print(f"using device: {device}")
    torch.manual_seed(args.seed)
    tokens = load_tokens(args.input)
    if len(tokens) < B * T + 1:
        sys.exit(f"error: {args.input} has {len(tokens)} tokens, fewer than B*T+1 = {B * T + 1}")
    train_loader = DataLoaderLite(tokens, B, T)

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
        print(f"not compiling: torch.compile needs {compiler} here; running eager")
        use_compile = False
    print(f"settings: {device_type} | B {B} T {T} | autocast {amp}"
          f" | compile {'on' if use_compile else 'off'}")

    model = GPT(config)
    model.to(device)
    raw_model = model  # sampling's growing lengths would make a compiled model recompile
    model = torch.compile(model) if use_compile else model  # fewer trips to GPU memory
    # MFU as nanoGPT reports it (the lecture prints tok/s): FLOPs per step / dt / GPU peak. 6 per
    # weight and token (fwd + bwd) + attention's 12*n_layer*n_embd*T (PaLM, app. B); wpe: a lookup
    n_params = sum(p.numel() for p in raw_model.parameters()) - config.block_size * config.n_embd
    flops_step = (6 * n_params + 12 * config.n_layer * config.n_embd * T) * B * T
    gpu = (torch.cuda.get_device_name(device)
           if device_type == "cuda" and dtype != torch.float32 else "")
    peak = args.peak_tflops or next((t for name, t in PEAK_TFLOPS.items() if name in gpu), None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    # fp16's 5 exponent bits flush gradients below ~6e-8 to 0: the scaler multiplies the loss first
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    losses = []
    try:  # out of memory anywhere in a step (forward, backward, AdamW's state at its first step)
        for step in range(args.steps):
            t0 = time.time()
            x, y = train_loader.next_batch()
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            # autocast runs matmuls in bf16 (fp16); softmax, layernorm and the loss stay in fp32
            with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
                logits, loss = model(x, y)
            scaler.scale(loss).backward()  # a no-op scale unless float16
            scale = scaler.get_scale()
            scaler.step(optimizer)  # fp16: skipped if any gradient is inf/nan (scale too big)
            scaler.update()  # ... and then halves the scale (doubles it after 2000 clean steps)
            getattr(torch, device_type).synchronize()  # wait for the queued work, or dt ends early
            dt = time.time() - t0
            losses.append(loss.item())  # .item() waits for the device and moves the loss to the CPU
            line = (f"step {step:5d} | loss {losses[-1]:.6f} | dt {dt * 1000:.2f}"
                    f" | tok/s {B * T / dt:.0f}")
            if peak:
                line += f" | mfu {100 * flops_step / dt / (peak * 1e12):.2f}"
            print(line + (" | skipped 1" if scaler.get_scale() < scale else ""))
    except RuntimeError as e:  # out of memory: a GPU's torch.OutOfMemoryError, a CPU's RuntimeError
        hint = f"try -B {B // 2}" if B > 1 else "try a smaller -T"
        oom = isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
        raise SystemExit(f"error: out of memory at -B {B} -T {T} on {device}; {hint}") if oom else e

    enc = gpt2_tokenizer()
    prompt = torch.tensor(enc.encode("Hello, I'm a language model,"), device=device)  # 8 tokens
    prompt = prompt.unsqueeze(0).repeat(args.num_return_sequences, 1)  # (5, 8)
    g = torch.Generator(device=device).manual_seed(args.seed)
    for row in generate(raw_model.eval(), prompt, max_length=args.max_length, generator=g):
        print(">", enc.decode(row.tolist()))
    return losses


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")  # samples print on any locale (LC_ALL=C too)
    main()
