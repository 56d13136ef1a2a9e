"""The step cost model: how long one engine step takes, from the batch it runs.

One vLLM step runs every scheduled sequence's new tokens through the model at
once. Its time is a roofline (Williams, Waterman and Patterson, "Roofline",
CACM 2009) plus host overhead::

    t = step_overhead_s + per_seq_overhead_s * seqs
        + max(flops / flops_per_s, bytes / hbm_bytes_per_s)

    flops = linear_flops_per_token * new_tokens
          + attention_flops_per_pair * query_key_pairs
    bytes = weight_bytes + kv_bytes_per_token * kv_tokens_touched

- `linear_flops_per_token` = 2 x parameters in the matmuls (weights, LM head),
  the usual forward-pass estimate (Kaplan et al., "Scaling Laws for Neural
  Language Models", 2020, section 2.1).
- `attention_flops_per_pair` = 4 x layers x query heads x head_dim: QK^T and
  AV, 2 FLOPs per multiply-add each, per (query token, key token) pair.
  A sequence with `c` tokens already in the KV cache and `n` new tokens has
  n x (c + (n + 1) / 2) pairs (causal), so cached context is not free: it is
  read and attended over by every new token.
- Bytes: the weights are read once per step; every sequence reads its whole
  KV (cached prefix included) and writes its new tokens' KV.
- `flops_per_s` and `hbm_bytes_per_s` are peak figures times an achieved
  fraction (dense BF16 tensor-core peak and HBM bandwidth from NVIDIA's H100
  SXM datasheet: 989 TFLOP/s, 3.35 TB/s), since no kernel reaches peak.
- The overheads are host time per step (scheduling, sampling, output
  processing, launching) and per sequence in the batch. They dominate small
  models: the seed experiment measured an inter-token latency p50 of 5 ms for
  Qwen3-0.6B, where the roofline alone gives about 0.5 ms.
- `frontend_latency_s` is the time a request spends outside the engine core
  before and after its compute (HTTP parse, tokenisation, detokenisation and
  streaming of the first chunk); it is added to every TTFT and E2E once.

The named profiles and where each number comes from are in
`docs/simulator.md`. Model shapes are from the models' `config.json` on the
Hugging Face hub (Qwen/Qwen3-0.6B, meta-llama/Meta-Llama-3-8B).
"""

from __future__ import annotations

import attrs

from prefixroute.latency import LatencyPrior

__all__ = ["PROFILES", "CostModel", "cost_profile"]

_H100_FLOPS = 989e12  # dense BF16, H100 SXM datasheet
_H100_HBM = 3.35e12  # bytes/s, H100 SXM datasheet
_GIB = 1024**3


@attrs.frozen(slots=True)
class CostModel:
    """Step-time parameters of one model on one accelerator (see the module docstring)."""

    name: str
    description: str
    weight_bytes: float
    linear_flops_per_token: float
    attention_flops_per_pair: float
    kv_bytes_per_token: float
    flops_per_s: float
    hbm_bytes_per_s: float
    step_overhead_s: float
    per_seq_overhead_s: float
    frontend_latency_s: float
    kv_capacity_tokens: int

    def step_time(self, new_tokens: int, seqs: int, pairs: float, kv_tokens: float) -> float:
        """Seconds for one step: `new_tokens` computed for `seqs` sequences.

        `pairs` is the step's (query, key) pairs, `kv_tokens` the KV tokens it
        reads or writes. O(1).
        """
        compute = (
            self.linear_flops_per_token * new_tokens + self.attention_flops_per_pair * pairs
        ) / self.flops_per_s
        memory = (self.weight_bytes + self.kv_bytes_per_token * kv_tokens) / self.hbm_bytes_per_s
        overhead = self.step_overhead_s + self.per_seq_overhead_s * seqs
        return overhead + (compute if compute > memory else memory)

    def latency_prior(self, *, context_tokens: int = 2000) -> LatencyPrior:
        """The router's latency-model cold start (`prefixroute.latency.LatencyPrior`) for it.

        Rates read off `step_time`, as a router configured with this engine
        profile would assume before its first completion: TTFT of a tiny
        prompt on an idle engine (front end plus one step), the marginal
        prefill cost per token of a 2,048-token prompt, the step time a
        running sequence of `context_tokens` adds (a prefill shares its step
        with the running decodes), and TPOT: one lone decode step over 1,000
        tokens of context, plus per running sequence its overhead, plus per
        in-flight token the KV bytes a decode step reads. O(1).
        """
        st = self.step_time
        base = st(1, 1, 1.0, 1.0)
        n = 2048
        prefill = (st(n, 1, n * (n + 1) / 2, n) - base) / (n - 1)
        c = float(context_tokens)
        lone = st(1, 1, c, c)
        per_request = (st(32, 32, 32 * c, 32 * c) - lone) / 31
        per_seq = (st(32, 32, 32.0, 32.0) - st(1, 1, 1.0, 1.0)) / 31
        return LatencyPrior(
            ttft_base_s=self.frontend_latency_s + base,
            prefill_s_per_token=prefill,
            ttft_s_per_request=per_request,
            tpot_base_s=st(1, 1, 1000.0, 1000.0),
            tpot_s_per_request=per_seq,
            tpot_s_per_token=self.kv_bytes_per_token / self.hbm_bytes_per_s,
        )


def _model(
    *,
    name: str,
    description: str,
    params_matmul: float,
    params_total: float,
    layers: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    step_overhead_s: float,
    per_seq_overhead_s: float,
    frontend_latency_s: float,
    hbm_gib: float = 80.0,
    gpu_memory_utilization: float = 0.9,
    flops_fraction: float = 0.5,
    hbm_fraction: float = 0.7,
) -> CostModel:
    dtype = 2  # BF16 weights and KV cache
    kv_per_token = 2 * layers * kv_heads * head_dim * dtype  # K and V
    weights = params_total * dtype
    budget = hbm_gib * _GIB * gpu_memory_utilization - weights - 2 * _GIB  # activations
    return CostModel(
        name=name,
        description=description,
        weight_bytes=weights,
        linear_flops_per_token=2 * params_matmul,
        attention_flops_per_pair=4 * layers * q_heads * head_dim,
        kv_bytes_per_token=kv_per_token,
        flops_per_s=_H100_FLOPS * flops_fraction,
        hbm_bytes_per_s=_H100_HBM * hbm_fraction,
        step_overhead_s=step_overhead_s,
        per_seq_overhead_s=per_seq_overhead_s,
        frontend_latency_s=frontend_latency_s,
        kv_capacity_tokens=int(budget // kv_per_token),
    )


PROFILES: dict[str, CostModel] = {
    m.name: m
    for m in (
        # Qwen3-0.6B: 28 layers, hidden 1024, 16 query / 8 KV heads of 128, tied
        # embeddings (151,936 x 1024); 0.60B parameters, 0.44B outside the embedding.
        _model(
            name="qwen3-0.6b-h100",
            description="Qwen3-0.6B, BF16, one H100 SXM 80 GB; overheads fitted to the seed run",
            params_matmul=0.44e9 + 151_936 * 1024,
            params_total=0.60e9,
            layers=28,
            q_heads=16,
            kv_heads=8,
            head_dim=128,
            step_overhead_s=4.0e-3,
            per_seq_overhead_s=20e-6,
            frontend_latency_s=5.0e-3,
        ),
        # Llama-3-8B: 32 layers, hidden 4096, 32 query / 8 KV heads of 128, untied
        # embeddings (128,256 x 4096 each); 8.03B parameters.
        _model(
            name="llama3-8b-h100",
            description="Llama-3-8B, BF16, one H100 SXM 80 GB",
            params_matmul=8.03e9 - 128_256 * 4096,
            params_total=8.03e9,
            layers=32,
            q_heads=32,
            kv_heads=8,
            head_dim=128,
            step_overhead_s=2.0e-3,
            per_seq_overhead_s=20e-6,
            frontend_latency_s=5.0e-3,
        ),
    )
}


def cost_profile(name: str) -> CostModel:
    """The named profile; KeyError lists the known names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown engine profile {name!r} (known: {', '.join(PROFILES)})") from None
