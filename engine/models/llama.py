"""Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, SmolLM2) over a flat token batch.

The batch is every scheduled token of every request laid end to end (``T`` tokens);
the attention backend knows from its metadata which tokens belong to which request
and where their KV lives in the paged cache.

On CPU in fp32 or bf16 with the native kernels loaded (unless ``BATON_FUSED_OPS=0``), the
whole model's forward takes the fused path (``forward_fused`` methods): the residual add
and the next RMSNorm are one kernel, the rotary embedding is applied in place in the fused
qkv rows, and SiLU x mul reads the fused gate_up rows, each computing the same elementwise
operations as the torch path, bf16 rounding included (the norm's sum and silu's exp
differ in the last bits).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from engine import envs, native
from engine.attention import AttentionBackend, AttentionMetadata, KVCache
from engine.config import ModelConfig, RopeScaling
from engine.models.native_step import NativeDecodeStep
from engine.native import packed_gemm


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor  # [P, Dh]
    sin: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_tables()

    def build_tables(self, device: torch.device | None = None) -> None:
        """Fill the cos/sin tables (fp32); computed, never loaded."""
        c = self.config
        if device is None and self.cos.device.type == "meta":
            return  # a model built on the meta device fills these after to_empty()
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        t = torch.arange(c.max_position_embeddings, dtype=torch.float32)
        emb = torch.cat([torch.outer(t, inv_freq)] * 2, dim=-1)  # [P, Dh]
        self.cos = emb.cos().to(device or self.cos.device)
        self.sin = emb.sin().to(device or self.sin.device)

    def tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the step's positions, [T, 1, Dh]; looked up once per step."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(
            dtype
        )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [T, H, Dh], k: [T, Hkv, Dh]; rotate-half layout, as in Hugging Face weights.
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Inputs of at most this many rows go to the native kernel when it is enabled.
SMALL_LINEAR_MAX_ROWS = 4


# What identifies a weight tensor to the copies made from it (a shard, a move or a cast
# replaces the tensor, and the copies with it).
WeightKey = tuple[int, torch.Size, torch.dtype]


def weight_key(w: torch.Tensor) -> WeightKey:
    return (w.data_ptr(), w.shape, w.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` that can hand inputs of a few rows (small-batch decode) to the native
    GEMV (fp32 or bf16), which streams the weights at memory bandwidth where MKL's sgemv
    and oneDNN's bf16 GEMV do not, fp32 inputs of many rows to MKL or oneDNN with the
    weight packed once, and bf16 ones to oneDNN with the weight packed once
    (``engine.native.packed_gemm``), except inputs of up to 64 rows: bf16 ones go to the
    AMX kernel where the CPU has AMX (``native.amx_linear``, from a tile-layout copy of the
    weight packed once), and, where it has AVX-512 BF16 instead, to ``native.vnni_linear``
    (the same copy); fp32 ones past the GEMV's to ``native.fp32_tile_linear`` (from the
    weight in blocks of sixteen outputs) where the CPU has AVX-512 or AVX2."""

    kernel: ctypes.CDLL | None = None
    pack_weight: bool = False  # use the packed GEMM (set by use_packed_gemm)
    # Whose pack an fp32 weight takes (``packed_gemm.fp32_kind``, set by use_packed_gemm);
    # bf16 weights always take oneDNN's.
    fp32_pack: str = packed_gemm.MKL
    # Packed copies by torch thread count, for the weight they were made from (its key).
    _packed: tuple[WeightKey, dict[int, torch.Tensor]] | None = None
    # The AMX tile-layout copy of a bf16 weight (decode steps of up to 64 rows), or None
    # where this weight or CPU cannot take the AMX kernel; for the weight of its key.
    _amx: tuple[WeightKey, torch.Tensor | None] | None = None
    # The fp32 weight in blocks of sixteen outputs (decode steps of 5 to 64 rows), or None
    # where the kernel does not take it; for the weight of its key.
    _fp32_tiles: tuple[WeightKey, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, dtype = x.shape[0], x.dtype
        if (self.kernel is not None and x.dim() == 2
                and (route := self.native_route(rows, dtype)) is not None):
            kind, weight = route
            if kind == native.LINEAR_GEMV:
                return native.small_linear(self.kernel, x, weight, self.bias)
            if kind == native.LINEAR_FP32_TILE:
                return native.fp32_tile_linear(self.kernel, x, weight, self.bias,
                                               self.out_features)
            return native.tile_linear(self.kernel, x, weight, self.bias, self.out_features)
        if (self.pack_weight and x.dim() == 2 and x.is_cpu and self.weight.is_cpu
                and dtype == self.weight.dtype):
            if self.onednn_pack():
                return packed_gemm.linear_onednn(x, self.packed(), self.bias)
            if dtype == torch.float32 and rows >= packed_gemm.MIN_ROWS:
                return packed_gemm.linear(x, self.packed(), self.weight, self.bias)
        return super().forward(x)

    def native_route(self, rows: int, dtype: torch.dtype) -> tuple[int, torch.Tensor] | None:
        """Which C product ``forward`` gives an input of ``rows`` rows of ``dtype`` (2-D),
        and the weight it reads: (``native.LINEAR_VNNI`` or ``LINEAR_AMX``, the bf16
        tile-layout copy), (``native.LINEAR_GEMV``, the weight) or
        (``native.LINEAR_FP32_TILE``, the fp32 blocks); None where torch computes it."""
        if self.kernel is None:
            return None
        if (self.pack_weight and dtype == torch.bfloat16
                and 0 < rows <= native.tile_linear_max_rows()
                and (tiles := self.amx_packed(self.kernel)) is not None):
            return native.tile_linear_kind(), tiles
        # fp32 rows 1-4 stay on the GEMV: the tile kernel took 0.45-0.91x its time there
        # (`python -m bench.decode_gemm --dtype float32`), but routing them to it makes
        # every fp32 engine hold the tile copy (0.54 GB for SmolLM2) even where it never
        # decodes more than four rows (a CI run with that route had Ray's OOM killer take
        # an instance of the serving tests).
        if (rows <= SMALL_LINEAR_MAX_ROWS and dtype == self.weight.dtype
                and native.supports(dtype)):
            return native.LINEAR_GEMV, self.weight
        if (self.pack_weight and dtype == torch.float32
                and 0 < rows <= native.fp32_tile_max_rows()
                and (tiles := self.fp32_tiled(self.kernel)) is not None):
            return native.LINEAR_FP32_TILE, tiles
        return None

    def decode_weight(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """The tensor a product of ``rows`` rows of ``dtype`` streams: the native route's
        (``native_route``), else the weight itself (where torch reads a packed copy, that
        copy holds the same weights)."""
        route = self.native_route(rows, dtype)
        return self.weight if route is None else route[1]

    def amx_packed(self, kernel: ctypes.CDLL) -> torch.Tensor | None:
        """The bf16 weight in AMX's tile layout (``native.amx_pack``), or None where no
        kernel takes it (not a bf16 CPU weight of [16k, 32j], or neither AMX nor AVX-512
        BF16 here): decided and made on first use, again whenever the weight tensor is
        replaced."""
        w = self.weight
        if self._amx is None or self._amx[0] != weight_key(w):
            takes = w.is_cpu and native.amx_packable(w) and native.tile_linear_max_rows() > 0
            self._amx = (weight_key(w), native.amx_pack(kernel, w) if takes else None)
        return self._amx[1]

    def fp32_tiled(self, kernel: ctypes.CDLL) -> torch.Tensor | None:
        """The fp32 weight in blocks of sixteen outputs (``native.fp32_tile_pack``), or
        None where the kernel does not take it (not an fp32 CPU weight of [16k, I], or
        neither AVX-512 nor AVX2 here): made on first use, again whenever the weight tensor
        is replaced."""
        w = self.weight
        if self._fp32_tiles is None or self._fp32_tiles[0] != weight_key(w):
            takes = (w.is_cpu and native.fp32_tile_packable(w)
                     and native.fp32_tile_max_rows() > 0)
            self._fp32_tiles = (weight_key(w),
                                native.fp32_tile_pack(kernel, w) if takes else None)
        return self._fp32_tiles[1]

    def packed(self) -> torch.Tensor:
        """The weight's packed copy, made on first use, again whenever the weight tensor is
        replaced (a tensor-parallel shard, a move, a cast), and once per torch thread
        count: MKL lays a pack out for the threads of the moment, and a pack made on one
        thread computed prefills of up to 128 tokens on one core when given two (measured:
        208 ms against 126 ms re-packed). Serving never changes the count; the profiler
        does (``baton profile --threads 1,2``)."""
        w = self.weight
        if self._packed is None or self._packed[0] != weight_key(w):
            self._packed = (weight_key(w), {})
        packs, threads = self._packed[1], torch.get_num_threads()
        if threads not in packs:
            pack = packed_gemm.pack_onednn if self.onednn_pack() else packed_gemm.pack
            packs[threads] = pack(w)
        return packs[threads]

    def onednn_pack(self) -> bool:
        """Whether this weight's packed copy is oneDNN's (bf16, or fp32 where
        ``fp32_pack`` says so), else MKL's (fp32)."""
        dtype = self.weight.dtype
        return dtype == torch.bfloat16 or (
            dtype == torch.float32 and self.fp32_pack == packed_gemm.ONEDNN)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q + 2kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, k, *rope)
        out = backend.forward(q, k, v, cache, meta)  # [T, H, Dh]
        return self.o_proj(out.reshape(t, self.q_size))

    def forward_fused(
        self,
        x: torch.Tensor,
        rope: FusedRope,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        cache: KVCache,
        lib: ctypes.CDLL,
    ) -> torch.Tensor:
        """``forward`` with the rotary embedding applied in place by the native kernel."""
        t = x.shape[0]
        qkv = self.qkv_proj(x).contiguous()  # [T, q + 2kv]
        native.rope_qkv(
            lib, qkv, rope.cos, rope.sin, rope.positions,
            self.num_heads + self.num_kv_heads, self.head_dim,
        )
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, cache, meta)  # [T, H, Dh]
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
        return self.down_proj(native.silu_mul(lib, self.gate_up_proj(x).contiguous()))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: AttentionBackend,
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, backend, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        next_norm: RMSNorm,
        rope: FusedRope,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        cache: KVCache,
        lib: ctypes.CDLL,
    ) -> None:
        """In place: ``x`` [T, D] is the residual stream, ``h`` holds this layer's input norm
        of it on entry and ``next_norm`` of the layer's output on return."""
        a = self.self_attn.forward_fused(h, rope, backend, meta, cache, lib)
        post = self.post_attention_layernorm
        native.add_rms_norm(lib, x, a, post.weight, h, post.eps)
        m = self.mlp.forward_fused(h, lib)
        native.add_rms_norm(lib, x, m, next_norm.weight, h, next_norm.eps)


@dataclass
class FusedRope:
    """The fused path's rotary inputs: the whole fp32 tables and the step's positions."""

    cos: torch.Tensor  # [P, Dh]
    sin: torch.Tensor
    positions: torch.Tensor  # [T] int64, contiguous


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # The native fused kernels, when in use (see use_native_kernel).
        self.fused: ctypes.CDLL | None = None
        # Decode steps' layers in one native call, on the fused path (BATON_NATIVE_STEP).
        self.decode_step: NativeDecodeStep | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        caches: list[KVCache],
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden states [T, D]
        x = self.embed_tokens(input_ids)
        if self.fused is not None and native.supports(x.dtype) and x.device.type == "cpu":
            return self.forward_fused(x, positions, backend, meta, caches, self.fused)
        rope = self.rope.tables(positions, x.dtype)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, rope, backend, meta, cache)
        return self.norm(x)

    def forward_fused(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        meta: AttentionMetadata,
        caches: list[KVCache],
        lib: ctypes.CDLL,
    ) -> torch.Tensor:
        """``forward`` from the embedded tokens ``x`` [T, D] (fp32 or bf16, CPU), with each
        residual add fused into the RMSNorm after it."""
        positions = positions.contiguous()
        limit = self.rope.cos.shape[0]
        if positions.numel() and int(positions.max()) >= limit:
            raise ValueError(f"model: position {int(positions.max())} is past the {limit} "
                             "the rotary tables cover (max_position_embeddings)")
        x = x.contiguous()
        if self.decode_step is not None and (
                out := self.decode_step.run(self, x, positions, backend, meta, caches, lib)
        ) is not None:
            return out
        rope = FusedRope(self.rope.cos.float(), self.rope.sin.float(), positions)
        h = torch.empty_like(x)
        layers = [cast(DecoderLayer, layer) for layer in self.layers]
        first = layers[0].input_layernorm
        native.add_rms_norm(lib, x, None, first.weight, h, first.eps)
        for i, (layer, cache) in enumerate(zip(layers, caches, strict=True)):
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            layer.forward_fused(x, h, nxt, rope, backend, meta, cache, lib)
        return h

    @classmethod
    def from_weights(
        cls,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> LlamaForCausalLM:
        """Build on the meta device (no wasted random init), then load the weights."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device).to(dtype)
        if config.tie_word_embeddings:  # moving off meta may make two tensors of one
            model.lm_head.weight = model.embed_tokens.weight
        model.rope.build_tables(device)
        model.load_weights(weights)
        return model.eval()

    def use_native_kernel(self, kernel: ctypes.CDLL | None) -> None:
        """Route few-row fp32 matmuls to the native GEMV and, unless BATON_FUSED_OPS=0, the
        forward to the fused path (CPU, fp32 or bf16 weights), or stop (None); unless
        BATON_PACKED_GEMM=0, matmuls to the packed GEMM; unless BATON_NATIVE_STEP=0, the
        fused path's decode steps to one native call where every GEMM runs in C
        (``engine.models.native_step``)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.kernel = kernel
        self.fused = kernel if envs.fused_ops() else None
        self.decode_step = NativeDecodeStep() if envs.native_step() else None
        self.use_packed_gemm(envs.packed_gemm())

    def routes_changed(self) -> None:
        """Call after changing a Linear's ``pack_weight``, ``kernel`` or weight directly:
        the native decode step rebuilds its address tables on its next step."""
        if self.decode_step is not None:
            self.decode_step.forget()

    def use_packed_gemm(self, enabled: bool) -> bool:
        """Run GEMMs on weights packed once: fp32 ones of 16 rows or more for MKL (an MKL
        build of torch, on a CPU where it pays: ``packed_gemm.fp32_pays``), else fp32 ones
        of any size for oneDNN (where it packs fp32: ``packed_gemm.fp32_kind``), bf16 ones
        of any size for oneDNN; CPU weights only (the few-row native GEMV, where it
        applies, comes first). False: F.linear. Returns whether it is in use."""
        param = next(self.parameters())
        fp32_kind = packed_gemm.fp32_kind() if param.dtype == torch.float32 else None
        enabled = enabled and param.device.type == "cpu" and (
            fp32_kind is not None
            or (param.dtype == torch.bfloat16 and packed_gemm.bf16_available())
        )
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_weight = enabled
                module.fp32_pack = fp32_kind or packed_gemm.MKL
                if not enabled:
                    module._packed = module._amx = module._fp32_tiles = None  # free copies
        self.routes_changed()
        return enabled

    def decode_weights(self, rows: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """The weights a decode step of ``rows`` tokens of ``dtype`` streams, each once:
        every Linear's (``Linear.decode_weight``, the LM head's included) and every norm's;
        not the embedding, of which a step gathers only its tokens' rows."""
        tensors: dict[int, torch.Tensor] = {}
        for module in self.modules():
            if isinstance(module, Linear):
                found = [module.decode_weight(rows, dtype), module.bias]
            elif isinstance(module, RMSNorm):
                found = [module.weight]
            else:
                continue
            for t in found:
                if t is not None:
                    tensors.setdefault(t.data_ptr(), t.detach())
        return list(tensors.values())

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, V] in the model's dtype: the sampler takes its argmax from bf16 as is and
        works in fp32 otherwise."""
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named weights in, fusing q/k/v and gate/up."""
        remaining = dict(weights)

        def take(name: str) -> torch.Tensor:
            if name not in remaining:
                raise ValueError(f"model: weight {name!r} is missing from the checkpoint")
            return remaining.pop(name)

        self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
        self.norm.weight.copy_(take("model.norm.weight"))
        if not self.config.tie_word_embeddings:
            self.lm_head.weight.copy_(take("lm_head.weight"))
        remaining.pop("lm_head.weight", None)
        for i, module in enumerate(self.layers):
            layer = cast(DecoderLayer, module)
            p = f"model.layers.{i}."
            attn = layer.self_attn
            attn.qkv_proj.weight.copy_(
                torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            )
            if self.config.attention_bias:
                attn.qkv_proj.bias.copy_(
                    torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                )
            attn.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
            layer.mlp.gate_up_proj.weight.copy_(
                torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            )
            layer.mlp.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
            layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
        # Rotary inverse frequencies are recomputed, never loaded.
        unused = [n for n in remaining if not n.endswith("rotary_emb.inv_freq")]
        if unused:
            raise ValueError(f"model: unexpected weights in the checkpoint: {sorted(unused)[:5]}")
