"""A static-shape decoder for Llama-family models, replayed as CUDA graphs on a GPU.

Contract: the `DecoderLM` interface of chatapp.lm, built from a loaded
transformers Llama/Qwen2 model (`GraphLlamaLM.from_hf`, or `int8_copy` of a
built target). It is the decoder for CUDA, and the exact torch-ops decoder
on CPUs where chatapp/kernels cannot be built.

Why static shapes:
* At batch 1 an eager step is bound by kernel launches (~50 per layer), not by
  reading the weights. Here every forward of up to `rows` tokens runs at
  exactly one of a few row counts, with device-resident positions, keys and
  values written with `index_copy_` into one persistent buffer, and a causal
  mask built on the device over the whole buffer: nothing depends on the host,
  so the step compiles with `fullgraph=True` and replays as one CUDA graph
  (`torch.compile(mode="reduce-overhead")`).
* Exact greedy equality by construction. Matmul kernels pick tilings by
  shape, so a row's logits can differ in the last bits between a 1-row step
  and a 5-row verify, which flips near-tied argmaxes. The target pads every
  forward of up to `rows` tokens to `rows` rows, so standard decoding and
  verification run the same kernels on the same shape, and a real row never
  depends on how many rows are real. Padding rows sit after the real ones:
  their keys/values land where the next real tokens will overwrite them, and
  no real row attends to a later position.
* Longer forwards (a prompt's prefill, shared by both modes) run eagerly.

The keys/values live in buffers owned by the model (graph replays need fixed
addresses), so one generation per model at a time (the service's lock);
`new_cache` hands out a handle, and a stale handle is refused.

INT8 (`quantize="int8-weight-only"`): every matrix is stored in bitsandbytes'
row-wise absmax format (int8 CB, W ~= CB * SCB / 127), quantized by
bitsandbytes where it is installed, and multiplied weight-only:
(x @ CB^T) * SCB/127 in the activation dtype, which the compiler fuses into
one matrix-vector product (the int8 weight-only recipe of gpt-fast and
torchao). bitsandbytes' LLM.int8 (int8 activations, outlier split, a host
sync per layer) is slow at batch 1 and is not used here.

One module past ~400 lines on purpose: the weights, the forward, the padded
rows and the graph capture are one decoder, and every part assumes the others'
shapes and buffers.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import zerogpu
from .lm import ModelInfo, as_id_tensor, weights_origin
from .settings import K_MAX

INT8 = "int8-weight-only"
TARGET_ROWS = K_MAX + 1  # one padded shape for a standard step and every verify (K <= K_MAX)
DRAFT_ROWS = (1, 2)  # a draft step feeds 1 token, or 2 after a round that ended with a bonus
INT8_LABEL = "int8 weight-only, bitsandbytes row-wise absmax format ({how})"


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """bitsandbytes' row-wise absmax int8: (CB int8 [n, k], SCB float32 [n] row absmax, who quantized).
    W ~= CB * SCB[:, None] / 127. bitsandbytes when installed, else the same formula here."""
    try:
        import bitsandbytes.functional as bnbf  # optional: absent on some CPUs and on macOS

        source = weight.to(torch.float16) if weight.is_cuda else weight.float()
        cb, scb, _ = bnbf.int8_vectorwise_quant(source)
        return cb.contiguous(), scb.float().contiguous(), "quantized by bitsandbytes"
    except Exception:  # noqa: BLE001 - any failure of the optional package means: do it ourselves
        w = weight.float()
        scb = w.abs().amax(dim=1)
        cb = torch.round(w * (127.0 / scb.clamp(min=1e-12))[:, None]).clamp(-127, 127).to(torch.int8)
        return cb.contiguous(), scb.contiguous(), "quantized in torch"


class Linear(nn.Module):
    """y = x @ W^T (+ b), with W in the activation dtype or as bitsandbytes-format int8 rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, int8: bool):
        super().__init__()
        self.int8 = int8
        self.how = ""
        if int8:
            cb, scb, self.how = quantize_rowwise(weight)
            self.register_buffer("weight", cb)
            self.register_buffer("scale", (scb / 127.0).to(dtype))
        else:
            self.register_buffer("weight", weight.to(dtype).contiguous())
            self.scale = None
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            # Weight-only: the int8 -> activation-dtype cast fuses into the GEMV under torch.compile.
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        else:
            y = F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class Block(nn.Module):
    def __init__(self, norms: tuple[torch.Tensor, torch.Tensor], linears: dict[str, Linear]):
        super().__init__()
        self.register_buffer("attn_norm", norms[0])
        self.register_buffer("mlp_norm", norms[1])
        self.qkv, self.o, self.gate_up, self.down = linears["qkv"], linears["o"], linears["gate_up"], linears["down"]


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    vocab_size: int
    max_positions: int


class Transformer(nn.Module):
    """The whole forward over ids at explicit positions; keys/values in persistent buffers."""

    def __init__(
        self,
        shape: Shape,
        embed: Linear,
        blocks: list[Block],
        norm: torch.Tensor,
        lm_head: Linear,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ):
        super().__init__()
        self.shape = shape
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("norm", norm)
        self.lm_head = lm_head
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        # [layers, kv_heads, capacity, head_dim] and the positions 0..capacity-1, made by allocate().
        for name in ("keys", "values", "kv_index"):
            self.register_buffer(name, None, persistent=False)

    def allocate(self, capacity: int) -> None:
        s, first = self.shape, self.norm
        dims = (len(self.blocks), s.kv_heads, capacity, s.head_dim)
        self.keys = torch.zeros(dims, dtype=first.dtype, device=first.device)
        self.values = torch.zeros(dims, dtype=first.dtype, device=first.device)
        self.kv_index = torch.arange(capacity, device=first.device)
        if first.is_cuda:  # graph replays read and write these in place, at fixed addresses
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.embed
        if table.int8:
            return table.weight[ids].to(table.scale.dtype) * table.scale[ids, None]
        return table.weight[ids]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, logits: bool = True) -> torch.Tensor | None:
        s = self.shape
        n = ids.shape[0]
        x = self.embed_rows(ids)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        mask = self.kv_index[None, :] <= positions[:, None]  # [n, capacity]: causal, on the device
        q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for i, block in enumerate(self.blocks):
            h = rms_norm(x, block.attn_norm, s.eps)
            q, k, v = block.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
            q = rope(q.view(n, s.heads, s.head_dim), cos, sin)
            k = rope(k.view(n, s.kv_heads, s.head_dim), cos, sin)
            self.keys[i].index_copy_(1, positions, k.transpose(0, 1))
            self.values[i].index_copy_(1, positions, v.view(n, s.kv_heads, s.head_dim).transpose(0, 1))
            x = x + block.o(attention(q, self.keys[i], self.values[i], mask))
            h = rms_norm(x, block.mlp_norm, s.eps)
            gate, up = block.gate_up(h).chunk(2, dim=-1)
            x = x + block.down(F.silu(gate) * up)
        if not logits:
            return None
        return self.lm_head(rms_norm(x, self.norm, s.eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [n, heads, d] against the whole buffer [kv_heads, capacity, d] under mask [n, capacity].
    Grouped-query attention as one batched call per kv head: the group's query heads are stacked as
    rows, so no kernel needs GQA support (SDPA's enable_gqa with a mask falls back to the math kernel)
    and no key/value is copied."""
    n, heads, d = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    rows = q.view(n, kv_heads, group, d).permute(1, 2, 0, 3).reshape(kv_heads, group * n, d)
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask.repeat(group, 1))
    return out.view(kv_heads, group, n, d).permute(2, 0, 1, 3).reshape(n, heads * d)


@dataclass
class CacheHandle:
    """The model's persistent keys/values, lent to one generation."""

    owner: GraphLlamaLM
    epoch: int
    capacity: int


def _weights_of(hf_model, dtype: torch.dtype, device: torch.device, free_source: bool):
    """Per layer: (norms, {name: (weight, bias)}) fused and on `device`; with free_source each HF
    layer's tensors are released as soon as they are copied, so loading peaks near the model's size,
    not twice it."""
    for block in hf_model.model.layers:
        attn, mlp = block.self_attn, block.mlp

        def take(*tensors):
            return torch.cat([t.detach().to(device=device, dtype=dtype) for t in tensors])

        bias = None
        if attn.q_proj.bias is not None:
            bias = take(attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
        fused = {
            "qkv": (take(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), bias),
            "o": (take(attn.o_proj.weight), None),
            "gate_up": (take(mlp.gate_proj.weight, mlp.up_proj.weight), None),
            "down": (take(mlp.down_proj.weight), None),
        }
        norms = (take(block.input_layernorm.weight), take(block.post_attention_layernorm.weight))
        if free_source:
            for param in block.parameters():
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        yield norms, fused


class GraphLlamaLM:
    """DecoderLM over `Transformer`, with padded row counts and optional compiled graphs."""

    def __init__(
        self, transformer: Transformer, *, origin: int, rows: tuple[int, ...], info: ModelInfo, compile_mode: str | None
    ):
        self.model = transformer.eval()
        self.origin = origin
        self.rows = tuple(sorted(rows))
        self.info = info
        self.compile_mode = compile_mode
        shape = transformer.shape
        self.vocab_size = shape.vocab_size
        self.max_positions = shape.max_positions  # the loader may lower this before allocate()
        self.device = transformer.norm.device
        self.dtype = transformer.norm.dtype
        self.capacity = 0
        self._epoch = 0
        self._steps: dict[int, Callable] = {}
        self._positions: torch.Tensor | None = None

    # -- building ---------------------------------------------------------------

    @classmethod
    def from_hf(
        cls,
        hf_model,
        *,
        quantize: str | None = None,
        info: ModelInfo | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        rows=None,
        compile_mode: str | None = "auto",
        free_source: bool = False,
    ) -> GraphLlamaLM:
        """From a transformers Llama-family model. device/dtype default to the model's; rows to
        TARGET_ROWS (exact verification) or DRAFT_ROWS with quantize; compile_mode "auto" compiles
        on CUDA (reduce-overhead: CUDA graphs) and runs eagerly elsewhere."""
        if quantize not in (None, INT8):
            raise ValueError(f"unknown quantization {quantize!r}")
        config = hf_model.config
        first = next(hf_model.parameters())
        device = torch.device(device or first.device)
        dtype = dtype or first.dtype
        int8 = quantize is not None
        info = info or ModelInfo(name=getattr(config, "_name_or_path", "") or "llama")
        info.parameters = info.parameters or sum(p.numel() for p in hf_model.parameters())
        origin = weights_origin(hf_model)
        blocks = []
        for norms, fused in _weights_of(hf_model, dtype, device, free_source):
            blocks.append(Block(norms, {name: Linear(w, b, dtype, int8) for name, (w, b) in fused.items()}))
        base = hf_model.model
        embed_w = base.embed_tokens.weight.detach().to(device=device, dtype=dtype)
        tied = hf_model.lm_head.weight.data_ptr() == base.embed_tokens.weight.data_ptr()
        embed = Linear(embed_w, None, dtype, int8)
        lm_head = (
            embed
            if tied
            else Linear(hf_model.lm_head.weight.detach().to(device=device, dtype=dtype), None, dtype, int8)
        )
        cos, sin = _rope_tables(base.rotary_emb, int(config.max_position_embeddings) + TARGET_ROWS, device, dtype)
        heads = int(config.num_attention_heads)
        shape = Shape(
            heads=heads,
            kv_heads=int(config.num_key_value_heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            eps=float(config.rms_norm_eps),
            vocab_size=int(config.vocab_size),
            max_positions=int(config.max_position_embeddings),
        )
        transformer = Transformer(
            shape, embed, blocks, base.norm.weight.detach().to(device=device, dtype=dtype), lm_head, cos, sin
        )
        if free_source:
            _release_memory()
        lm = cls(
            transformer,
            origin=origin,
            rows=rows or (DRAFT_ROWS if int8 else (TARGET_ROWS,)),
            info=info,
            compile_mode=_resolve_compile(compile_mode, device),
        )
        lm._describe(embed.how if int8 else "")
        return lm

    def copy(self, *, int8: bool, info: ModelInfo | None = None) -> GraphLlamaLM:
        """A draft from this model's own weights, with keys/values of its own: INT8 (quantized from
        these weights, no second load of the checkpoint), or the same weights shared. It keeps this
        model's origin, so it may take this model's prompt keys/values."""
        source = self.model

        def linear(layer: Linear) -> Linear:
            return Linear(_dequantized(layer), layer.bias, self.dtype, True) if int8 else layer

        blocks = [
            Block(
                (b.attn_norm, b.mlp_norm), {name: linear(getattr(b, name)) for name in ("qkv", "o", "gate_up", "down")}
            )
            for b in source.blocks
        ]
        embed = linear(source.embed)
        lm_head = embed if source.lm_head is source.embed else linear(source.lm_head)
        transformer = Transformer(source.shape, embed, blocks, source.norm, lm_head, source.cos, source.sin)
        info = info or ModelInfo(name=self.info.name, source=self.info.source)
        info.parameters = self.info.parameters
        copy = GraphLlamaLM(
            transformer,
            origin=self.origin,
            rows=DRAFT_ROWS if int8 else self.rows,
            info=info,
            compile_mode=self.compile_mode,
        )
        copy.max_positions = self.max_positions
        copy._describe(embed.how if int8 else "")
        return copy

    def int8_copy(self, info: ModelInfo | None = None) -> GraphLlamaLM:
        return self.copy(int8=True, info=info)

    def _describe(self, quantized_by: str) -> None:
        info = self.info
        act = str(self.dtype).replace("torch.", "")
        if quantized_by:
            info.dtype = f"int8 weights, {act} activations"
            info.quantization = INT8_LABEL.format(how=quantized_by)
        else:
            info.dtype = act
        info.device = str(self.device)
        graphs = (
            "CUDA graphs (torch.compile reduce-overhead)"
            if self.compile_mode == "reduce-overhead"
            else (f"torch.compile ({self.compile_mode})" if self.compile_mode else "eager torch ops")
        )
        info.implementation = f"specchat static-shape decoder, {graphs}, rows padded to {'/'.join(map(str, self.rows))}"
        info.weight_bytes = sum(t.numel() * t.element_size() for t in _unique_tensors(self.model))

    # -- graphs -------------------------------------------------------------------

    def allocate(self) -> None:
        """The persistent keys/values for max_positions (plus room for padding rows)."""
        capacity = self.max_positions + max(self.rows)
        if capacity != self.capacity:
            self.model.allocate(capacity)
            self._positions = torch.arange(capacity, device=self.device)
            self.capacity = capacity
            self._steps.clear()

    def prepare(self, progress: Callable[[str], None] | None = None) -> float:
        """Allocate, then compile and capture the step graphs now (not in the first reply).
        Returns the seconds it took."""
        start = time.perf_counter()
        self.allocate()
        if self.compile_mode:
            if progress:
                progress(
                    f"compiling {self.info.name} for rows {'/'.join(map(str, self.rows))} "
                    "(once per start; about a minute per model on a GPU)"
                )
            for rows in self.rows:
                ids = torch.zeros(rows, dtype=torch.long, device=self.device)
                for _ in range(3):  # compile, record, replay
                    self._step(rows)(ids, self._positions[:rows])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _step(self, rows: int) -> Callable:
        step = self._steps.get(rows)
        if step is None:
            forward = self.model.forward
            if self.compile_mode:
                # Dynamo counts compilations per code object, and every model and row count is one
                # (a pair has three; the benchmark builds several pairs): lift the default cap of 8.
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                torch._dynamo.config.accumulated_recompile_limit = max(
                    torch._dynamo.config.accumulated_recompile_limit, 512
                )
                kwargs = (
                    {"mode": self.compile_mode}
                    if self.compile_mode in ("reduce-overhead", "default", "max-autotune")
                    else {"backend": self.compile_mode}
                )
                forward = torch.compile(forward, fullgraph=True, dynamic=False, **kwargs)
            step = self._steps[rows] = forward
        return step

    # -- DecoderLM ----------------------------------------------------------------

    def new_cache(self, capacity: int) -> CacheHandle:
        self.allocate()
        self._epoch += 1
        return CacheHandle(self, self._epoch, min(capacity, self.max_positions))

    def resume_cache(self, cache, capacity: int) -> CacheHandle | None:
        """The buffers still hold what `cache`'s generation left when no generation came after it:
        then they pass to a new generation; else None (another generation overwrote them)."""
        if not isinstance(cache, CacheHandle) or cache.owner is not self or cache.epoch != self._epoch:
            return None
        self._epoch += 1
        return CacheHandle(self, self._epoch, min(capacity, self.max_positions))

    @torch.inference_mode()
    def copy_cache_prefix(self, cache: CacheHandle, source, source_cache, length: int) -> bool:
        """Take positions 0..length-1 from `source` when it was built from the same weights (the
        target this INT8 draft copies); False, changing nothing, otherwise."""
        if not isinstance(source, GraphLlamaLM) or source.origin != self.origin:
            return False
        self._check(cache, 0, length)
        source._check(source_cache, 0, length)
        self.model.keys[:, :, :length].copy_(source.model.keys[:, :, :length])
        self.model.values[:, :, :length].copy_(source.model.values[:, :, :length])
        return True

    @torch.inference_mode()
    def forward(self, ids, start: int, cache: CacheHandle, *, logits: bool = True) -> torch.Tensor | None:
        ids = as_id_tensor(ids, self.device)
        n = ids.shape[0]
        self._check(cache, start, n)
        rows = next((r for r in self.rows if r >= n), None)
        if rows is None:  # a prefill: one eager pass at its own length
            out = self.model(ids, self._positions[start : start + n], logits)
            return None if out is None else out.float()
        if rows > n:
            ids = torch.cat([ids, ids.new_zeros(rows - n)])
        out = self._step(rows)(ids, self._positions[start : start + rows])
        # .float() copies out of the graph's output memory, which the next replay reuses.
        return out[:n].float() if logits else None

    def _check(self, cache: CacheHandle, start: int, n: int) -> None:
        if not isinstance(cache, CacheHandle) or cache.owner is not self:
            raise ValueError("this cache belongs to another model")
        if cache.epoch != self._epoch:
            raise RuntimeError("this cache was handed to a later generation (one generation per model at a time)")
        if start + n > cache.capacity:
            raise ValueError(f"forward past the cache: {start}+{n} > {cache.capacity}")

    def step_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (all but the embedding table, unless tied)."""
        embed = self.model.embed
        unused = 0 if self.model.lm_head is embed else sum(t.numel() * t.element_size() for t in embed.buffers())
        return self.info.weight_bytes - unused


def _rope_tables(rotary, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin per position from the model's own rotary module (every static rope type it computes)."""
    inv_freq = rotary.inv_freq.detach().float().to(device)
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def _dequantized(linear: Linear) -> torch.Tensor:
    return linear.weight.float() * linear.scale.float()[:, None] if linear.int8 else linear.weight


def _unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for name, tensor in module.named_buffers():
        if name in ("keys", "values", "kv_index") or tensor is None or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out.append(tensor)
    return out


def _resolve_compile(mode: str | None, device: torch.device) -> str | None:
    if mode == "auto":  # ZeroGPU has no torch.compile: eager there (still exact: the rows stay padded)
        return "reduce-overhead" if device.type == "cuda" and zerogpu.compile_allowed() else None
    return mode


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
