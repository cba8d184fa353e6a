"""The cpu backend's whole decode step: every decoder layer in one native call (csrc/step.c).

At decode each layer is a dozen small kernel calls (norms, q/k/v, rotary, cache, attention,
o_proj, router, experts, residuals) and their Python wrappers: a tenth of a step on the 20b shape
(docs/performance.md), that no kernel speed-up removes. `run` makes the same kernel calls with
the same arguments from C, so its result is the same bits as the module path
(transformer.DecoderLayer), which stays the reference the tests compare it with. It takes decode
steps of up to dense_kernel.MAX_ROWS sequences, one new token each, of a bf16 model with bf16 or
int8 projections and MXFP4 experts, on CPU, with no LoRA adapters attached and no gradient; anything
else takes the module path. INHOUSE_STEP_KERNEL=0 turns it off (as does turning off any kernel it
calls).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import torch

from inhouse.kernels.cpu import attend_kernel, dense_kernel, mxfp4_kernel, native, rows_kernel
from inhouse.kernels.cpu.attend_kernel import allowed_keys
from inhouse.kernels.cpu.native import as_dtype

_p, _i64, _f, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class Layer(ctypes.Structure):
    """step_layer_t: one layer's weights (projections q, k, v, o)."""
    _fields_ = [("attn_norm", _p), ("mlp_norm", _p), ("proj", _p * 4), ("proj_scale", _p * 4),
                ("proj_bias", _p * 4), ("sinks", _p), ("router", _p), ("router_bias", _p),
                ("gu_blocks", _p), ("gu_scales", _p), ("dn_blocks", _p), ("dn_scales", _p),
                ("gu_bias", _p), ("dn_bias", _p)]


class Slot(ctypes.Structure):
    """step_slot_t: one row's cache at one layer."""
    _fields_ = [("k", _p), ("v", _p), ("head_stride", _i64), ("at", _i64), ("first", _i64),
                ("lo", _i64), ("hi", _i64)]


class Shape(ctypes.Structure):
    """step_shape_t: the step's shapes and settings."""
    _fields_ = [(n, _i64) for n in ("layers", "M", "H", "Hq", "Hkv", "D", "E", "k", "I")] + \
               [(n, _f) for n in ("eps", "scale", "alpha", "limit")] + \
               [(n, _int) for n in ("int8", "experts_a16", "proj_dtypes", "router_dtypes",
                                    "dense_level", "mxfp4_level", "attend_simd", "nthreads")]


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    if not all(k.available() for k in (mxfp4_kernel, dense_kernel, attend_kernel, rows_kernel)):
        return None
    return native.bind("step", {"inhouse_decode_step": [_p, _p, _p, _p, _p, _p]})


def available() -> bool:
    return _lib() is not None


def _takes(model: torch.nn.Module, x: torch.Tensor, segments: list) -> bool:
    """x (M, H) bf16 on CPU, every segment one new token continuing a bf16 cache, M <=
    dense_kernel.MAX_ROWS, no gradient, no adapters, heads the attention kernel takes?"""
    attn = model.model.layers[0].self_attn
    return (x.dtype == torch.bfloat16 and x.is_cpu and not torch.is_grad_enabled()
            and 0 < len(segments) <= dense_kernel.MAX_ROWS and model.lora_routing is None
            and all(s.num_tokens == 1 and s.cache is not None
                    and s.cache.layers[0].k.dtype == torch.bfloat16 for s in segments)
            and attend_kernel.heads_fit(attn.head_dim, attn.num_heads // attn.num_kv_heads)
            and available())


@dataclass
class Plan:
    """The layers' weights as step.c reads them (`table`, None where some layer is not of the kind
    it computes), the projections' kind (1 int8, 0 bf16), dense.c's bias flags of the
    projections and of the router, the tensors the pointers were taken from with those pointers
    (checked at every step), and converted copies the table points into. experts_a16: the
    experts meet int16 rows (MXFP4Experts.int16_rows, the same in every layer)."""

    table: ctypes.Array | None
    int8: int = 0
    experts_a16: int = 0
    bias_flags: tuple[int, int] = (0, 0)
    sources: list[torch.Tensor] = field(default_factory=list)
    pointers: list[int] = field(default_factory=list)
    copies: list[torch.Tensor] = field(default_factory=list)

    def is_current(self) -> bool:
        return [t.data_ptr() for t in self.sources] == self.pointers


def plan(model: torch.nn.Module) -> Plan:
    """The model's Plan, built once and kept in `model.step_plan` (the Transformer drops it when
    its weights are moved or loaded; a pointer that changed anyway makes a new one). A model the
    kernel does not take is asked again each step (adapters may come and go); it usually says
    so at its first layer."""
    kept = model.step_plan
    if kept is None or not kept.is_current():
        kept = _build(model)
        model.step_plan = kept if kept.table is not None else None
    return kept


def _build(model: torch.nn.Module) -> Plan:
    layers = model.model.layers
    table = (Layer * len(layers))()
    out = Plan(table)
    int8_kinds, a16_kinds, bias_dtypes, router_dtypes = set(), set(), set(), set()

    def point(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
        """t's address (in dtype: converted where it is not already, the copy kept alive)."""
        c = t if dtype is None else as_dtype(t, dtype).contiguous()
        (out.sources if c is t else out.copies).append(c)
        return c.data_ptr()

    for entry, layer in zip(table, layers):
        attn, mlp = layer.self_attn, layer.mlp
        experts, router = mlp.experts, mlp.router
        if (attn.lora is not None or not hasattr(experts, "gate_up_proj_blocks")  # MXFP4 experts
                or experts.lora is not None or router.weight.dtype != torch.bfloat16
                or router.bias is None):
            return Plan(None)
        for i, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)):
            w = proj.weight
            if (w.dtype not in (torch.bfloat16, torch.int8) or not w.is_contiguous()
                    or (proj.bias is not None and not proj.bias.is_contiguous())):
                return Plan(None)
            int8_kinds.add(w.dtype == torch.int8)
            entry.proj[i] = point(w)
            if w.dtype == torch.int8:
                entry.proj_scale[i] = point(proj.weight_scale, torch.float32)
            if proj.bias is not None:
                bias_dtypes.add(proj.bias.dtype)
                entry.proj_bias[i] = point(proj.bias)
        router_dtypes.add(router.bias.dtype)
        a16_kinds.add(experts.int16_rows)
        parts = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight, attn.sinks,
                 router.weight, router.bias, experts.gate_up_proj_blocks,
                 experts.gate_up_proj_scales, experts.down_proj_blocks, experts.down_proj_scales]
        if (any(not t.is_contiguous() or not t.is_cpu for t in parts)
                or any(t.dtype != torch.float32 for t in parts[:3])):
            return Plan(None)
        (entry.attn_norm, entry.mlp_norm, entry.sinks, entry.router, entry.router_bias,
         entry.gu_blocks, entry.gu_scales, entry.dn_blocks, entry.dn_scales) = map(point, parts)
        entry.gu_bias, entry.dn_bias = (point(b, torch.bfloat16)
                                        for b in (experts.gate_up_proj_bias, experts.down_proj_bias))
    ok_bias = {torch.bfloat16, torch.float32}
    if (len(int8_kinds) != 1 or len(a16_kinds) != 1 or len(bias_dtypes) > 1
            or not bias_dtypes <= ok_bias or len(router_dtypes) != 1
            or not router_dtypes <= ok_bias):
        return Plan(None)
    out.int8, out.experts_a16 = int(int8_kinds.pop()), int(a16_kinds.pop())
    out.bias_flags = tuple(dense_kernel.BIAS_BF16 if dtypes == {torch.bfloat16} else 0
                           for dtypes in (bias_dtypes, router_dtypes))
    out.pointers = [t.data_ptr() for t in out.sources]
    return out


def verifies_rows_together(model: torch.nn.Module) -> bool:
    """Does this kernel take the model's decode steps, so that several rows of one sequence
    (draft tokens) read the dense weights once? Elsewhere (fp32, adapters, no kernels) each
    row costs about a decode step of its own, and speculative drafts do not pay."""
    return (available() and model.dtype == torch.bfloat16 and model.device.type == "cpu"
            and model.lora_routing is None and plan(model).table is not None)


def run(model: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        segments: list) -> torch.Tensor | None:
    """x (M, H) bf16: segment m's embedded new token in row m; cos/sin (M, D/2) fp32 at their
    positions -> (M, H) after every layer, as transformer.DecoderLayer would give; each segment's
    cache gets the new keys and values (its num_tokens is the caller's to advance). None, with
    nothing touched, where the step is not one this kernel takes (the caller runs the layers)."""
    weights = plan(model) if _takes(model, x, segments) else None
    if weights is None or weights.table is None:
        return None
    config, layers = model.config, model.model.layers
    M, L = x.shape[0], len(layers)
    slots = (Slot * (L * M))()
    for i, layer in enumerate(layers):
        window = layer.self_attn.window
        for m, seg in enumerate(segments):
            cache = seg.cache.layers[i]
            at, first, k_start = cache.reserve(1)
            lo, hi = allowed_keys(at + 1 - first, seg.start, k_start, window)
            slots[i * M + m] = Slot(cache.k.data_ptr(), cache.v.data_ptr(), cache.k.stride(0),
                                    at, first, lo, hi)
    attn, experts = layers[0].self_attn, layers[0].mlp.experts
    shape = Shape(L, M, config.hidden_size, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                  config.num_experts, config.experts_per_token, config.intermediate_size,
                  config.rms_norm_eps, attn.scale, experts.alpha, experts.limit, weights.int8,
                  weights.experts_a16, *weights.bias_flags, dense_kernel._level(),
                  mxfp4_kernel._level(),
                  attend_kernel.simd(), torch.get_num_threads())
    out = x.contiguous().clone()
    c, s = cos.float().contiguous(), sin.float().contiguous()
    rc = _lib().inhouse_decode_step(ctypes.addressof(shape), ctypes.addressof(weights.table),
                                    ctypes.addressof(slots), c.data_ptr(), s.data_ptr(),
                                    out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"the decode step kernel failed (code {rc})")
    return out
