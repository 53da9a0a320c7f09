"""Counter-based keyed uniform RNG, bit-identical in torch, Triton and C++.

Contract
--------
    uniform(seed, offset, index) -> float32 in (0, 1)

- `seed`, `offset`: int64 keys, given as int64 tensors on the data's device so a decoding
  step reads them without a host sync and can be captured in a CUDA graph. Each is 0-d or
  any shape broadcastable against `index` (e.g. [N, 1] against [N, C]: one seed, or one
  offset, per row). The engine keeps a request's seed fixed for its generation
  and gives every sampling call its own `offset` (e.g. the global step counter).
- `index`: the element's flat position, `row_id * card + col`, taken mod 2**32 (rows up to
  2**21 are distinct at card 2048). A draw depends only on (seed, offset, index), never on
  which other rows a call computes nor on their seeds.

Algorithm (the same integer operations in all three implementations; the C++ twin is
`uniform01` in csrc/sampling.cpp):

    k1 = mix32(mix32(mix32(mix32(seed_lo ^ 0x9E3779B9) ^ seed_hi) ^ offset_lo) ^ offset_hi)
    k2 = mix32(k1 ^ 0x85EBCA6B)                  # once per seed (call or row): the key
    h  = mix32(mix32(index ^ k1) ^ k2)           # per element: two keyed rounds
    u  = (2 * (h >> 9) + 1) * 2**-24             # 2**23 odd multiples of 2**-24

seed_lo / seed_hi are the low / high 32 bits of the two's-complement int64 (same for
offset). `mix32` is the "lowbias32" integer hash (C. Wellons' hash prospector, constants by
TheIronBorn): a bijection of uint32 with near-ideal avalanche. For a fixed key, index -> h
is a bijection, so the elements of one call never share a draw. Both multipliers are
below 2**31, so the torch version multiplies uint32 values held in int64 without
overflow. `u` lies in [2**-24, 1 - 2**-24], exact in fp32, so -log(u) is finite and > 0.
"""
from __future__ import annotations

import torch

from magnet_engine.kernels import backend

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the torch and C++ paths do not need it
    triton = None

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x21F0AAAD  # < 2**31
MIX_MUL2 = 0x735A2D97  # < 2**31
KEY_SALT1 = 0x9E3779B9
KEY_SALT2 = 0x85EBCA6B
U_SCALE = 2.0 ** -24


# ----------------------------------------------------------------------------- Triton
if triton is not None:

    @triton.jit
    def mix32(x):
        """lowbias32 on uint32 (wrapping multiplies)."""
        x ^= x >> 16
        x *= 0x21F0AAAD
        x ^= x >> 15
        x *= 0x735A2D97
        x ^= x >> 15
        return x

    @triton.jit
    def rng_key(seed_ptr, offset_ptr):
        """(k1, k2) uint32 from the int64 seed and offset at these pointers. For a per-row
        seed or offset, pass the row's element (seed_ptr + row): the key is derived once per row."""
        seed = tl.load(seed_ptr)
        offset = tl.load(offset_ptr)
        k1 = mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
        k1 = mix32(k1 ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
        k1 = mix32(k1 ^ (offset & 0xFFFFFFFF).to(tl.uint32))
        k1 = mix32(k1 ^ ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32))
        k2 = mix32(k1 ^ 0x85EBCA6B)
        return k1, k2

    @triton.jit
    def uniform_triton(k1, k2, index):
        """index: int64 tensor (row_id * card + col) -> fp32 uniforms in (0, 1)."""
        h = mix32(mix32((index & 0xFFFFFFFF).to(tl.uint32) ^ k1) ^ k2)
        return ((h >> 9).to(tl.int32) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


# ----------------------------------------------------------------------------- torch
def mix32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, in place, on an int64 temporary holding uint32 values (products stay below
    2**63). In place because this is the torch path's cost: 2 x 10 passes over [N, C]."""
    x ^= x >> 16
    x *= MIX_MUL1
    x &= MASK32
    x ^= x >> 15
    x *= MIX_MUL2
    x &= MASK32
    x ^= x >> 15
    return x


def rng_key_torch(seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k1, k2) as int64 tensors of seed's and offset's broadcast shape holding uint32 values."""
    k1 = mix32_((seed & MASK32) ^ KEY_SALT1)
    k1 = mix32_(k1 ^ ((seed >> 32) & MASK32))
    k1 = mix32_(k1 ^ (offset & MASK32))
    k1 = mix32_(k1 ^ ((offset >> 32) & MASK32))
    return k1, mix32_(k1 ^ KEY_SALT2)


def uniform(seed: torch.Tensor, offset: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """seed, offset: int64, 0-d or broadcastable against index (e.g. [N, 1] vs [N, C]);
    index: int64 tensor -> float32 in (0, 1), of the broadcast shape. The keys are derived
    once per (seed, offset) element, then broadcast over the index."""
    k1, k2 = rng_key_torch(seed, offset)
    h = mix32_((index & MASK32) ^ k1)
    h ^= k2
    h = mix32_(h)
    return ((h >> 9) * 2 + 1).to(torch.float32) * U_SCALE


# ----------------------------------------------------------------------------- torch generator state
def _generator_uniform(out: torch.Tensor, state: torch.Tensor) -> None:
    generator = torch.Generator()
    generator.set_state(state)
    out.uniform_(0, 1, generator=generator)
    state.copy_(generator.get_state())


_generator_uniform_op = torch.library.custom_op("magnet_engine::generator_uniform_", _generator_uniform,
                                                mutates_args=("out", "state"))
_generator_uniform_op.register_fake(lambda out, state: None)


def generator_uniform_(out: torch.Tensor, state: torch.Tensor) -> None:
    """out.uniform_(0, 1) drawn from a CPU torch generator held as its state tensor (uint8
    [5056], `torch.Generator.get_state()`), which is advanced in place.

    The same numbers, in the same order, as `out.uniform_(0, 1, generator=g)` on a generator
    `g` in that state: upstream's own draws (PlayDiffusion, on the CPU). A generator object
    cannot enter a traced graph; its state tensor can, so a step that draws this way still
    traces whole. CPU tensors only (a CUDA generator's draws cannot be replayed from a state
    read on the host; the CUDA path draws from the keyed `uniform` instead)."""
    backend.call(_generator_uniform_op, _generator_uniform, out, state)
