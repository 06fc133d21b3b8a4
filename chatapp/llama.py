"""A fast decoder for Llama-family models (Llama, SmolLM, Qwen2) with a static KV cache.

It implements the `DecoderLM` interface of chatapp.lm from the weights of a
loaded transformers model:

* keys/values live in one preallocated tensor per layer and are written at
  explicit positions, so rolling back rejected draft tokens costs nothing:
  the next forward simply overwrites them (no torch.cat, no crop);
* Q/K/V and gate/up projections are fused into one matrix each;
* on CPU, few-row matmuls and attention run in chatapp/kernels (weights read
  once per step; results independent of the number of rows, which makes
  greedy speculative decoding bit-exact against standard decoding);
* `quantize="int8-weight-only"` stores every matrix (LM head included) as
  int8 with one fp32 scale per output row. The CPU kernels multiply them by
  int16 activations quantized per row on the fly (exact integer sums with
  AVX-512 VNNI; the activation error is ~50x below the weights' own); the
  torch fallback dequantizes the weights and keeps fp32 activations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import TORCH, cpu_kernels, rival_variants, variant_forced
from .kernels.choice import VARIANT_MARGIN, faster, memory_allows
from .lm import ModelInfo, as_id_tensor, weights_origin

SUPPORTED_TYPES = ("llama", "qwen2")
INT8 = "int8-weight-only"
VERIFY_TOKENS = 9  # the target's timed verify at load: K + 1 for the default K of 8


def supports(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return (
        getattr(config, "model_type", "") in SUPPORTED_TYPES
        and getattr(config, "hidden_act", "silu") == "silu"
        and not getattr(config, "mlp_bias", False)
        and rope.get("rope_type", "default") not in ("dynamic", "longrope")
    )


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: weight ~= q * scale[:, None]."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


NO_TENSOR = torch.empty(0)


class Linear:
    """y = x @ W.T (+ b). Float weights, or int8 rows with one fp32 scale each.
    With the CPU kernels the weight is stored packed in 64-column panels (see
    cpu_kernels.cpp)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels, *, int8: bool = False):
        self.out_features, self.in_features = weight.shape
        if int8:
            weight, self.scale = quantize_int8(weight)
        else:
            weight, self.scale = weight.contiguous(), NO_TENSOR
        self.weight = kernels.pack_weight(weight) if kernels is not None else weight
        self.bias = bias
        self._kernels = kernels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None:
            y = self._kernels.linear(x.contiguous(), self.weight, self.scale, self.out_features)
        elif self.weight.dtype == torch.int8:
            y = F.linear(x, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype))
        else:
            y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        tensors = [self.weight, self.scale] + ([] if self.bias is None else [self.bias])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class StaticCache:
    """Per-layer key/value tensors [kv_heads, capacity, head_dim]."""

    def __init__(self, layers: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity


class LlamaDecoderLM:
    def __init__(
        self,
        hf_model: torch.nn.Module,
        *,
        quantize: str | None = None,
        info: ModelInfo | None = None,
        variant: str | None = None,
    ):
        """variant: the CPU kernel variant to run (chatapp.kernels: avx512, avx2, ...),
        "torch" for plain torch ops; None for the one chatapp.kernels chooses."""
        config = hf_model.config
        if not supports(config):
            raise ValueError(f"the fast decoder does not support model type {config.model_type!r}")
        if quantize not in (None, INT8):
            raise ValueError(f"unknown quantization {quantize!r}")
        base = hf_model.model
        # Decoders built from the same HF model object (the target and its int8
        # copy) share an origin: their caches hold comparable keys and values.
        self.origin = weights_origin(hf_model)
        first = next(hf_model.parameters())
        self.device = first.device
        self.dtype = torch.float32 if quantize else first.dtype
        on_cpu = self.device.type == "cpu" and self.dtype == torch.float32
        self._kernels = cpu_kernels(variant) if on_cpu and variant != TORCH else None
        make = lambda w, b: Linear(w, b, self._kernels, int8=quantize is not None)  # noqa: E731
        detach = lambda t: None if t is None else t.detach().to(self.dtype)  # noqa: E731

        self.vocab_size = int(config.vocab_size)
        self.max_positions = int(config.max_position_embeddings)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)

        self.layers: list[Layer] = []
        for block in base.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
            qkv_b = None
            if attn.q_proj.bias is not None:
                qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach()
            self.layers.append(
                Layer(
                    attn_norm=detach(block.input_layernorm.weight),
                    qkv=make(detach(qkv_w), detach(qkv_b)),
                    o=make(detach(attn.o_proj.weight), None),
                    mlp_norm=detach(block.post_attention_layernorm.weight),
                    gate_up=make(detach(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), None),
                    down=make(detach(mlp.down_proj.weight), None),
                )
            )
        if self._kernels is not None:
            self._blocks = self._kernels.Blocks(
                [
                    t
                    for layer in self.layers
                    for t in (
                        layer.attn_norm,
                        layer.qkv.weight,
                        layer.qkv.scale,
                        NO_TENSOR if layer.qkv.bias is None else layer.qkv.bias,
                        layer.o.weight,
                        layer.o.scale,
                        layer.mlp_norm,
                        layer.gate_up.weight,
                        layer.gate_up.scale,
                        layer.down.weight,
                        layer.down.scale,
                    )
                ],
                self.heads,
                self.kv_heads,
                self.layers[0].down.in_features,
                self.eps,
            )
        self.norm = detach(base.norm.weight)
        self.embed = detach(base.embed_tokens.weight)
        self.lm_head = make(detach(hf_model.lm_head.weight), None)
        if quantize:
            # The lookup reads one row per token; keep it small like the rest.
            self.embed_q, self.embed_scale = quantize_int8(self.embed)
            self.embed = None

        # RoPE tables from the model's own rotary module, so every rope type
        # transformers computes statically (default, linear, llama3, yarn) matches.
        rotary = base.rotary_emb
        inv_freq = rotary.inv_freq.detach().float().to(self.device)
        positions = torch.arange(self.max_positions, device=self.device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.cos = (angles.cos() * scaling).to(self.dtype)
        self.sin = (angles.sin() * scaling).to(self.dtype)

        self.info = info or ModelInfo(name=getattr(config, "_name_or_path", "") or "llama")
        if quantize and self._kernels is not None:
            self.info.dtype = "int8 weights, int16 activations"
            self.info.quantization = "int8 per-channel weights x int16 per-row activations (specchat CPU kernel)"
        elif quantize:
            self.info.dtype = "int8 weights, fp32 activations"
            self.info.quantization = "int8 per-channel weights, dequantized (torch fallback)"
        else:
            self.info.dtype = str(self.dtype).replace("torch.", "")
        self.info.device = str(self.device)
        self.info.implementation = "specchat static-cache decoder" + (
            f" + CPU kernels ({self._kernels.variant()})" if self._kernels is not None else " (torch ops)"
        )
        self.info.parameters = sum(p.numel() for p in hf_model.parameters())
        self.info.weight_bytes = self._weight_bytes()

    @classmethod
    def from_hf(
        cls, hf_model, *, quantize: str | None = None, info: ModelInfo | None = None, variant: str | None = None
    ) -> LlamaDecoderLM:
        """The decoder on the path that runs this model's work fastest here: the
        kernel variant chatapp.kernels chooses, its rival (the 256-bit build on
        an AVX-512 CPU) or plain torch ops, timed interleaved on a draft's step
        or a target's step plus verify (_decode_step); torch ops must win
        clearly, a rival variant by a little (chatapp.kernels.choice).
        `variant` or $SPECCHAT_KERNEL_VARIANT skip the timing. The timings go
        to info.extra["decode_paths_ms"]; each further candidate is a temporary
        copy of the weights, built only while memory allows it."""
        lm = cls(hf_model, quantize=quantize, info=info, variant=variant)
        if variant is not None or lm._kernels is None or variant_forced():
            return lm
        paths = {lm.path_name: lm}
        for other in [*rival_variants(lm._kernels.variant()), TORCH]:
            if not memory_allows(lm.info.weight_bytes * len(paths)):
                break
            other_info = dataclasses.replace(lm.info, extra=dict(lm.info.extra))
            candidate = cls(hf_model, quantize=quantize, info=other_info, variant=other)
            paths.setdefault(candidate.path_name, candidate)  # a rival that did not build is torch ops
        if len(paths) == 1:
            lm.info.extra["decode_paths_ms"] = "not timed: too little free memory for a second copy of the weights"
            return lm
        margins = {name: VARIANT_MARGIN for name, path in paths.items() if path._kernels is not None}
        verify = 0 if quantize else VERIFY_TOKENS  # a draft only steps; a target also verifies
        steps = {name: _decode_step(path, verify=verify) for name, path in paths.items()}
        chosen, medians = faster(steps, margins=margins)
        paths[chosen].info.extra["decode_paths_ms"] = {name: round(ms, 2) for name, ms in medians.items()}
        return paths[chosen]

    @property
    def path_name(self) -> str:
        """Where the decode step runs: "CPU kernels (<variant>)" or "torch ops"."""
        return f"CPU kernels ({self._kernels.variant()})" if self._kernels is not None else "torch ops"

    def _weight_bytes(self) -> int:
        linears = [self.lm_head] + [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        total = sum(m.nbytes for m in linears)
        norms = [self.norm] + [t for layer in self.layers for t in (layer.attn_norm, layer.mlp_norm)]
        total += sum(t.numel() * t.element_size() for t in norms)
        if self.embed is not None:
            total += self.embed.numel() * self.embed.element_size()
        else:
            total += self.embed_q.numel() + self.embed_scale.numel() * 4
        return total

    def step_weight_bytes(self) -> int:
        """Bytes of weights one decode step must read (all but the unused embedding rows)."""
        embed = self.embed if self.embed is not None else self.embed_q
        return self._weight_bytes() - embed.numel() * embed.element_size()

    # -- DecoderLM ------------------------------------------------------------

    def new_cache(self, capacity: int) -> StaticCache:
        capacity = min(capacity, self.max_positions)
        return StaticCache(len(self.layers), self.kv_heads, capacity, self.head_dim, self.dtype, self.device)

    def resume_cache(self, cache, capacity: int) -> StaticCache | None:
        """A cache of an earlier generation, for the next one: each generation owns its cache, so
        it holds what it held; None when it is not ours or too small."""
        ours = isinstance(cache, StaticCache) and cache.keys[0].device == self.device
        fits = ours and len(cache.keys) == len(self.layers) and cache.capacity >= min(capacity, self.max_positions)
        return cache if fits else None

    @torch.inference_mode()
    def copy_cache_prefix(self, cache: StaticCache, source, source_cache, length: int) -> bool:
        """Fill positions 0..length-1 of `cache` from `source`'s cache instead of
        a prefill, when `source` was built from the same weights (the target
        this int8 draft copies); False, changing nothing, when it was not.

        The copied keys/values are the full-precision ones the draft's own
        approximate, and a copy costs ~1 ms where the draft's prefill of a
        100-token prompt costs ~90 ms. The output cannot change: the target
        verifies every draft token whatever the draft conditioned on."""
        if getattr(source, "origin", None) != self.origin or not isinstance(source_cache, StaticCache):
            return False
        if len(source_cache.keys) != len(cache.keys) or source_cache.keys[0].shape[0::2] != cache.keys[0].shape[0::2]:
            return False
        if length > min(cache.capacity, source_cache.capacity):
            raise ValueError(f"prefix of {length} positions does not fit the caches")
        for mine, theirs in zip(cache.keys + cache.values, source_cache.keys + source_cache.values):
            mine[:, :length].copy_(theirs[:, :length])
        return True

    @torch.inference_mode()
    def forward(self, ids, start: int, cache: StaticCache, *, logits: bool = True) -> torch.Tensor | None:
        ids = as_id_tensor(ids, self.device)
        n = ids.shape[0]
        if start + n > cache.capacity:
            raise ValueError(f"forward past the cache: {start}+{n} > {cache.capacity}")
        if n == 0 or start < 0:  # the kernels divide work by the token count: refuse here, not crash there
            raise ValueError(f"a forward needs at least one token at a position >= 0 (got {n} at {start})")
        x = self._embed(ids)
        if self._kernels is not None:
            return self._forward_fused(x, start, cache, logits)
        cos, sin = self.cos[start : start + n, None, :], self.sin[start : start + n, None, :]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.attn_norm)
            q, k, v = layer.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
            q = _rope(q.view(n, self.heads, self.head_dim), cos, sin)
            k = _rope(k.view(n, self.kv_heads, self.head_dim), cos, sin)
            cache.keys[i][:, start : start + n] = k.transpose(0, 1)
            cache.values[i][:, start : start + n] = v.view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            attn = self._attention(q.contiguous(), cache.keys[i], cache.values[i], start)
            x = x + layer.o(attn.view(n, q_size))
            h = self._rms_norm(x, layer.mlp_norm)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if not logits:
            return None
        return self.lm_head(self._rms_norm(x, self.norm)).float()

    def _forward_fused(self, x: torch.Tensor, start: int, cache: StaticCache, logits: bool) -> torch.Tensor | None:
        """CPU: one kernel call runs every block, no per-op Python overhead."""
        x = x.contiguous()
        self._blocks.forward(x, cache.keys, cache.values, self.cos, self.sin, start)
        if not logits:
            return None
        return self.lm_head(self._kernels.rms_norm(x, self.norm, self.eps))

    # -- pieces ---------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            return self.embed[ids]
        return self.embed_q[ids].float() * self.embed_scale[ids, None]

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        n = q.shape[0]
        end = start + n
        # [heads, n, d] against [kv_heads, end, d]; causal within the new rows.
        mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys[:, :end], values[:, :end], attn_mask=mask, enable_gqa=True
        )
        return out.transpose(0, 1).contiguous()


def _decode_step(lm: LlamaDecoderLM, *, verify: int, context: int = 32):
    """What to time of `lm` at the end of a prefilled context: one 1-token step, then (verify > 0)
    one verify of `verify` tokens, a speculative round's check, whose cost differs by variant
    (256-bit builds verify 9 tokens at ~1.7 steps, AVX-512 at ~1.2)."""
    verify = min(verify, lm.max_positions - 1)  # a model of a few positions (the tests') too
    context = max(1, min(context, lm.max_positions - max(verify, 1)))
    cache = lm.new_cache(context + max(verify, 1))
    lm.forward([i % lm.vocab_size for i in range(context)], 0, cache, logits=False)
    step = [1 % lm.vocab_size]
    if verify <= 0:
        return lambda: lm.forward(step, context, cache)
    block = [(1 + i) % lm.vocab_size for i in range(verify)]
    return lambda: (lm.forward(step, context, cache), lm.forward(block, context, cache))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
