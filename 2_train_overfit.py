"""Stage 2: train the model; first, overfit a single batch of tiny Shakespeare.

New in this stage (lecture 00:45:50-01:02:00, "let's train: data batches (B,T) -> logits
(B,T,C)", "cross entropy loss", "optimization loop: overfit a single batch"):
- tokenise input.txt with tiktoken's gpt2 encoding
- cut one (B, T) batch of inputs, with targets shifted one token to the left
- pass the targets to GPT.forward, whose cross-entropy (there since stage 0) is the loss, and
  minimise it with an AdamW loop (lr 3e-4) over that single batch
- one line per step: step | loss; a GPU too small for -B x -T stops with one line saying what to try

Run:   python 2_train_overfit.py      (124M, B=4, T=32, 50 steps: about a minute on a laptop CPU)
Diff:  diff 1_gpt2_hf_eval.py 2_train_overfit.py
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass

import tiktoken
import torch
import torch.nn as nn
from torch.nn import functional as F

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
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        # causal mask, (1, 1, block_size, block_size); derived, not learned, so not saved
        # ("bias" is the name OpenAI/HF use for it)
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size),
                             persistent=False)

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dim (n_embd)
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = qkv.split(self.n_embd, dim=2)
        # split C into n_head heads of hs = C / n_head dims; heads become a batch dimension
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # attention scores, scaled by 1/sqrt(hs) so softmax starts diffuse ("Attention Is All
        # You Need", section 3.2.1); a position may only attend to itself and earlier ones
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)  # 4x hidden, as in GPT-1/2
        # GPT-2 used the tanh approximation of GELU; we keep it to match its weights exactly
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

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


# ----------------------------------------------------------------------------------------------
# helpers


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
        logits = logits[:, -1, :]  # only the last position predicts the next token: (B, vocab)
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
    parser.add_argument("-B", "--batch-size", type=flag_range(1), default=4)
    parser.add_argument("-T", "--seq-len", type=flag_range(1, GPTConfig.block_size), default=32)
    parser.add_argument("--steps", type=flag_range(1), default=50)
    parser.add_argument("--num-return-sequences", type=flag_range(1), default=5)
    parser.add_argument("--max-length", type=flag_range(9, GPTConfig.block_size), default=30,
                        help="tokens per sample, the 8-token prompt included")
    parser.add_argument("--seed", type=flag_range(0, 2**64 - 1), default=1337)  # the lecture's seed
    parser.add_argument("--n-layer", type=flag_range(1), default=12)
    parser.add_argument("--n-head", type=flag_range(1), default=12)
    parser.add_argument("--n-embd", type=flag_range(1), default=768)
    parser.add_argument("--input", default=os.path.join(HERE, "input.txt"))
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    device = pick_device(args.device)
    B, T = args.batch_size, args.seq_len
    if args.n_embd % args.n_head != 0:  # every head gets n_embd // n_head of the channels
        sys.exit(f"error: --n-embd {args.n_embd} is not a multiple of --n-head {args.n_head}")
    print(f"using device: {device}")
    torch.manual_seed(args.seed)
    tokens = load_tokens(args.input)
    if len(tokens) < B * T + 1:
        sys.exit(f"error: {args.input} has {len(tokens)} tokens, fewer than B*T+1 = {B * T + 1}")
    buf = tokens[:B * T + 1].to(device)
    x = buf[:-1].view(B, T)  # inputs (B, T)
    y = buf[1:].view(B, T)  # targets (B, T): the token that follows each input position

    model = GPT(config)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    try:  # out of memory anywhere in a step (forward, backward, AdamW's state at its first step)
        for step in range(args.steps):
            optimizer.zero_grad()
            logits, loss = model(x, y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())  # .item() waits for the device and moves the loss to the CPU
            print(f"step {step:5d} | loss {losses[-1]:.6f}")
    except RuntimeError as e:  # out of memory: a GPU's torch.OutOfMemoryError, a CPU's RuntimeError
        hint = f"try -B {B // 2}" if B > 1 else "try a smaller -T"
        oom = isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
        raise SystemExit(f"error: out of memory at -B {B} -T {T} on {device}; {hint}") if oom else e

    enc = gpt2_tokenizer()
    prompt = torch.tensor(enc.encode("Hello, I'm a language model,"), device=device)  # 8 tokens
    prompt = prompt.unsqueeze(0).repeat(args.num_return_sequences, 1)  # (5, 8)
    g = torch.Generator(device=device).manual_seed(args.seed)
    for row in generate(model.eval(), prompt, max_length=args.max_length, generator=g):
        print(">", enc.decode(row.tolist()))
    return losses


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")  # samples print on any locale (LC_ALL=C too)
    main()
