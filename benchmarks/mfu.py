"""Model FLOPs utilisation for the benchmarks, said once: FLOPs per token and the GPU's peak.

The numbered scripts compute MFU inline in their step loop; the benchmarks (bench_speedup.py,
bench_memory.py, gpu_check.py) import these two functions instead of repeating them.
"""


def n_matmul_params(config):
    """GPT-2's parameters without the position embeddings (a lookup, no FLOPs): the tied
    wte/lm_head (V*C), per block 12*C^2 + 13*C (qkv, proj, fc, fc-proj weights and biases, two
    LayerNorms), and ln_f (2*C). 124M with vocab 50304: 123,689,472."""
    C = config.n_embd
    return config.vocab_size * C + config.n_layer * (12 * C * C + 13 * C) + 2 * C


def flops_per_token(config, T):
    """Training FLOPs per token: 6 per weight (forward 2, backward 4) plus attention's
    12 * n_layer * n_embd * T (PaLM paper, appendix B). 124M at T=1024: 855,383,040."""
    return 6 * n_matmul_params(config) + 12 * config.n_layer * config.n_embd * T


def peak_tflops(device_name, table, override=None, tf32=False):
    """The chip's dense TFLOP/s: `override` (--peak-tflops) if given, else the first key of `table`
    (the stage scripts' PEAK_TFLOPS: bf16, or fp16 where the GPU has no bf16) found in the device's
    name; None when unknown. tf32=True halves it: NVIDIA's data sheets give TF32 half the bf16 rate
    (A100 156 vs 312, H100 495 vs 989)."""
    if override:
        peak = float(override)
    else:
        peak = next((float(v) for name, v in table.items() if name in (device_name or "")), None)
    if peak is None:
        return None
    return peak / 2 if tf32 else peak
