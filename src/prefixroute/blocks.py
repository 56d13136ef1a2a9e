"""Block hashing: a request becomes a chain of 64-bit block keys, one per full block.

`Blocker.keys(request)` cuts the prompt into blocks and returns one key per
*full* block, as a numpy uint64 array. Key `i` identifies the namespace and
the whole prefix (blocks `0..i`), like vLLM's chained block hashes (vLLM,
"Automatic Prefix Caching", docs.vllm.ai/en/latest/design/prefix_caching/):
two requests share exactly the keys of the full blocks they share, so the
prefix index can match a request against what endpoints hold by walking keys.

What is hashed
--------------
- Token mode (`HashMode.TOKEN`, the default) with `token_ids`: blocks of
  `block_size` token ids (16 is vLLM's default block size), so index blocks
  line up with the engine's KV blocks.
- Text mode, and token mode for a request that has only a `prompt`: blocks
  over the prompt's Unicode code points (`text_values`), of `block_size`
  characters in text mode (GIE's approximate prefix-cache plugin uses 64,
  `pkg/epp/scheduling/framework/plugins/multi/prefix/plugin.go`) and of
  `round(block_size * chars_per_token)` characters when token mode falls back
  to text. Text mode for a request that has only `token_ids` (a completions
  prompt given as token ids) hashes the ids in blocks of
  `round(block_size / chars_per_token)` tokens.
- Only full blocks get keys. The engine caches only full blocks, so a partial
  tail could never be a cache hit: it is never keyed, and a prompt shorter
  than one block has an empty chain (the request is routed as cold).

Each of the four paths (mode x tokens-or-characters) has its own namespace,
so their key spaces never mix.

The namespace
-------------
`Blocker.namespace` is BLAKE2b (RFC 7693) in keyed mode, keyed by the 64-bit
deployment `seed`, over the hashing path and the request's model, LoRA
adapter, cache_salt and (with `isolate_tenants`) tenant. Every field is
length-prefixed and tagged present/absent, so no two field tuples encode to
the same bytes ("a" + "bc" never meets "ab" + "c"; None never meets "").
Being a keyed PRF, namespaces of different models, adapters, salts or
tenants are independent 64-bit values to anyone who does not know the seed.
Not MurmurHash3 here: tenants choose `cache_salt` (and model names), and
MurmurHash3 has multicollisions that hold whatever its seed (Aumasson and
Bernstein, "SipHash: a fast short-input PRF", INDOCRYPT 2012). A namespace
is one BLAKE2b call over a few short fields, and namespaces are memoised.

The chain (`Blocker.hash_tokens`; `reference_keys` is the same function in plain Python)
-----------------------------------------------------------------------------------------
All arithmetic is modulo 2**64. From `(namespace, block_size)`, SplitMix64
(Steele, Lea and Flood, "Fast Splittable Pseudorandom Number Generators",
OOPSLA 2014; the `mix64` finalizer is Stafford's variant 13) derives one
lane key `k_l` per position in a block, forced odd::

    s   = mix64(namespace ^ mix64(block_size))
    k_l = mix64(s + (l + 1) * GAMMA) | 1          for l in 0 .. block_size - 1
    GAMMA = 0x9E3779B97F4A7C15                    (SplitMix64's odd increment)

Block `j` (values `t_j0 .. t_j,B-1`, each below 2**32) is compressed by a
keyed multilinear hash (Carter and Wegman, "Universal classes of hash
functions", JCSS 1979; the multilinear family as in Lemire and Kaser,
"Strongly universal string hashing is fast", The Computer Journal 2014),
tagged with its position, and scrambled by MurmurHash3's 64-bit finalizer
`fmix64` (Austin Appleby, SMHasher, MurmurHash3.cpp)::

    c_j = sum_l k_l * t_jl                        (one integer dot product per block)
    g_j = fmix64(c_j + (j + 1) * GAMMA)
    K_i = g_0 + g_1 + ... + g_i                   (a running sum: the chain)

The running sum makes the chain an additive incremental hash (AdHash, in
Bellare and Micciancio, "A New Paradigm for Collision-Free Hashing:
Incrementality at Reduced Cost", EUROCRYPT 1997): key `i` depends on every
block up to `i` and on its position. The position tag needs no key: `c_j`
is already keyed, and distinct positions get distinct tags (GAMMA is odd),
so swapping two blocks changes the chain. Block sizes of any parity work: a
lane is one 32-bit value widened to 64 bits, never a pair.

Two implementations compute the chain, bit for bit (the tests hold both to
`reference_keys`). The numpy path: one vector-matrix product over the
`(blocks, block_size)` view of the values (no copy but the widening cast
inside `np.dot`), then nine ufuncs and one `np.add.accumulate` over the
per-block vector; at a few hundred blocks the ufuncs' call overhead is most
of its cost. The compiled path (`_chain_kernel`, numba through
`prefixroute.jit`, used when numba is installed unless `compiled=False`): one
call that touches each cache line of the values once, then makes three
passes over the output (block sums, `fmix64`, running sum), with each 64-bit
lane key split into 32-bit halves so that the products of the block sums are
32 x 32 -> 64 bits, which the compiler vectorises; the caller allocates the
output.

Why not the polynomial rolling hash `K_i = sum_j c_j * P**(i-j)` done with a
cumsum: modulo 2**64 it has a key-independent weakness. For any odd `P` and
any two distinct block values `a`, `b`, the Thue-Morse sequence of `a`/`b`
of length 2048 and its complement collide (Pachocki and Radoszewski, "Where
to use and how not to use polynomial string hashing", Olympiads in
Informatics 7, 2013). The position-tagged, finalised terms of AdHash have no
such algebraic structure to exploit, and cost no more here.

Collision properties (what holds, and under what assumption)
------------------------------------------------------------
- Equal namespace, block size and prefix give equal keys: deterministic.
- Two chains that agree up to block `j - 1` and differ in block `j`:
  `K_j != K'_j` exactly when `c_j != c'_j`, because `fmix64` and the
  running sum are bijections. If the blocks differ in a single position,
  `c_j != c'_j` always (an odd key times a nonzero difference below 2**32 is
  nonzero mod 2**64): such siblings never collide. If they differ in several
  positions and the lane keys were uniformly random odd numbers, then
  `P[c_j = c'_j] <= 2**(v - 63)`, where `v` is the fewest trailing zero bits
  among the nonzero per-position differences: at most 2**-32 in the worst
  case (differences that are multiples of 2**31), at most 2**-47 when token
  ids are below 2**17 (vocabularies up to 131,072), 2**-43 for code points,
  and 2**-63 when some difference is odd. The lane keys are SplitMix64
  outputs of a secret PRF value, so the "uniformly random" is heuristic.
- Anything else (chains that differ earlier and later coincide, different
  depths, different namespaces or block sizes) collides with probability
  about 2**-64 per pair on a heuristic argument only; nothing is proven.
  For an index of N distinct keys, expect about N**2 / 2**65 collisions
  (3e-6 for ten million keys). A collision is a wrong cache prediction and a
  worse routing choice, never a wrong answer: the engine checks its own
  cache.

Limits: a keyed non-cryptographic hash, not a MAC
-------------------------------------------------
- The seed keeps keys unpredictable: without it, a tenant cannot compute the
  keys of any prompt, so it cannot craft a prompt whose keys collide with
  another tenant's (and with `isolate_tenants` it cannot even share keys by
  sending the same prompt). Keep the seed out of config files that tenants
  can read, and give every deployment its own.
- The block stage is not a PRF. `fmix64` is invertible and the multilinear
  hash is linear, so someone who sees the block keys of prompts they know
  (through logs, metrics, `Decision.block_keys`, a debug endpoint) can solve
  for one namespace's lane keys with about `block_size + 1` observations and
  then forge collisions in that namespace (and learn its namespace value).
  Namespaces are independent PRF outputs, so that reveals neither the seed
  nor any other namespace. Never show block keys to tenants.
- AdHash modulo 2**64 is not collision resistant against someone who can
  evaluate the per-block function (Wagner's generalised birthday attack,
  CRYPTO 2002); keeping the lane keys secret is what keeps it out of reach.
- Routing on cache state leaks cache state through timing no matter how keys
  are made; `cache_salt` and `isolate_tenants` are the mitigation, not the hash.
- Values must be below 2**32 (token ids and code points are).
- Text-mode blocks are characters, not the engine's tokens, so text mode
  predicts cache hits approximately, as GIE's approximate plugin does.

Cost: O(values) for the block sums and O(blocks) for the rest, with no
Python loop over blocks, on either path. Lane keys are memoised per
(namespace, block size), and namespaces and whole plans (namespace, block
size, lane keys) per request fields, in small bounded memos (cleared when
full). The measured costs (token and text mode, a namespace never seen
before, the plain-Python reference, the numpy path beside the compiled one,
and the floor of touching the bytes once) are in docs/performance.md, from
`benchmarks/test_bench_hashing.py`.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NewType

import attrs
import numpy as np
import numpy.typing as npt

from prefixroute import jit
from prefixroute.request import Request

__all__ = ["BlockKey", "Blocker", "HashMode", "reference_keys", "text_values"]

BlockKey = NewType("BlockKey", int)
"""One block's 64-bit chained key (a plain int once out of the numpy array)."""

_MASK64: Final = 0xFFFF_FFFF_FFFF_FFFF
_GAMMA: Final = 0x9E37_79B9_7F4A_7C15  # SplitMix64's increment (2**64 / golden ratio)
_SM_M1: Final = 0xBF58_476D_1CE4_E5B9  # SplitMix64 finalizer (Stafford variant 13)
_SM_M2: Final = 0x94D0_49BB_1331_11EB
_FM_C1: Final = 0xFF51_AFD7_ED55_8CCD  # MurmurHash3 fmix64
_FM_C2: Final = 0xC4CE_B9FE_1A85_EC53
_MAX_VALUE: Final = 0xFFFF_FFFF

# 0-d arrays, not numpy scalars: ufuncs take them without a conversion step.
_U64_FM_C1: Final = np.array(_FM_C1, dtype=np.uint64)
_U64_FM_C2: Final = np.array(_FM_C2, dtype=np.uint64)
_U64_33: Final = np.array(33, dtype=np.uint64)
_U64_GAMMA: Final = np.array(_GAMMA, dtype=np.uint64)
_U64_SM_M1: Final = np.array(_SM_M1, dtype=np.uint64)
_U64_SM_M2: Final = np.array(_SM_M2, dtype=np.uint64)
_U64_1, _U64_27, _U64_30, _U64_31 = (np.array(v, dtype=np.uint64) for v in (1, 27, 30, 31))
_rshift: Final = np.right_shift
_xor: Final = np.bitwise_xor
_mul: Final = np.multiply
_accumulate: Final = np.add.accumulate
_SMALL_DTYPES: Final = (np.dtype(np.uint32), np.dtype(np.uint16), np.dtype(np.uint8))

_NS_PERSON: Final = b"prefixroute-ns1"  # BLAKE2b personalisation: the scheme's name and version
_MEMO_LIMIT: Final = 4096  # entries per memo before it is cleared


class HashMode(enum.StrEnum):
    """What a block is made of: token ids (vLLM-sized blocks) or prompt characters."""

    TOKEN = "token"
    TEXT = "text"


class _Unit(enum.StrEnum):
    """What a request's blocks are actually made of, after any fallback."""

    TOKENS = "tokens"
    CHARS = "chars"


# -- plain-Python reference -------------------------------------------------------


def _mix64(z: int) -> int:
    """SplitMix64's finalizer (Stafford's variant 13) on a 64-bit int."""
    z = ((z ^ (z >> 30)) * _SM_M1) & _MASK64
    z = ((z ^ (z >> 27)) * _SM_M2) & _MASK64
    return z ^ (z >> 31)


def _fmix64(x: int) -> int:
    """MurmurHash3's 64-bit finalizer on a 64-bit int."""
    x = ((x ^ (x >> 33)) * _FM_C1) & _MASK64
    x = ((x ^ (x >> 33)) * _FM_C2) & _MASK64
    return x ^ (x >> 33)


def _lane_keys(namespace: int, block_size: int) -> list[int]:
    """The odd lane keys `k_l` of one (namespace, block size): a SplitMix64 stream."""
    s = _mix64(namespace ^ _mix64(block_size))
    return [_mix64((s + (lane + 1) * _GAMMA) & _MASK64) | 1 for lane in range(block_size)]


def reference_keys(values: Sequence[int], namespace: int, block_size: int) -> list[int]:
    """The block keys of `values`, in plain Python: the reference for `Blocker.hash_tokens`.

    Bit-identical to the fast path (the tests hold them to it), one key per
    full block of `block_size` values. O(len(values)) Python big-int
    operations: far slower than the fast path (docs/performance.md), meant
    for tests and for reading.
    """
    lanes = _lane_keys(_check_hash_args(namespace, block_size), block_size)
    keys: list[int] = []
    chain = 0
    for j in range(len(values) // block_size):
        c = (j + 1) * _GAMMA
        base = j * block_size
        for lane, key in enumerate(lanes):
            value = int(values[base + lane])
            if not 0 <= value <= _MAX_VALUE:
                raise ValueError(f"values must be within [0, 2**32), got {value!r}")
            c += key * value
        chain = (chain + _fmix64(c & _MASK64)) & _MASK64
        keys.append(chain)
    return keys


# -- the compiled kernel ------------------------------------------------------------

_K_GAMMA: Final = np.uint64(_GAMMA)  # numba sees module-level numpy scalars as typed constants
_K_FM_C1: Final = np.uint64(_FM_C1)
_K_FM_C2: Final = np.uint64(_FM_C2)
_K_33: Final = np.uint64(33)
_K_32: Final = np.uint64(32)
_K_LOW32: Final = np.uint64(0xFFFF_FFFF)


@jit.njit
def _chain_kernel(
    values: npt.NDArray[np.unsignedinteger[Any]],
    lanes: npt.NDArray[np.uint64],
    tag: int,
    parent: int,
    out: npt.NDArray[np.uint64],
) -> None:
    """The chain in one compiled call, into `out`: what `Blocker._chain` computes, bit for bit.

    `values` is an unsigned array of <= 32-bit integers, `lanes` the block's
    lane keys, `out` one slot per full block (the caller allocates it: an
    array made here would cost more to hand back to Python than a short
    chain costs to compute), `tag` the first block's position tag
    `(start + 1) * GAMMA` and `parent` the key before the first block, both
    as int64 bit patterns (a small Python int types as int64, so one
    specialisation serves every call and the dispatcher converts no numpy
    scalar). uint64 arithmetic wraps modulo 2**64, as numpy's does. After a
    pass that touches each cache line of `values` (see the comment), three
    passes over `out`: the block sums, `fmix64`, the running sum. The block
    sum splits each lane key into 32-bit halves, `k = lo + hi * 2**32`, so
    every product is 32 x 32 -> 64 bits (which the compiler vectorises) and
    `sum_l k_l * t_l = sum_l lo_l * t_l + (sum_l hi_l * t_l) * 2**32` mod 2**64.
    O(len(values)).
    """
    b = lanes.shape[0]
    n = out.shape[0]
    # Touch one value per 64-byte line first: independent loads the CPU keeps many
    # of in flight, where the block sums' loads wait behind their arithmetic. A fresh
    # prompt out of cache then costs about half as much; one in cache costs the same.
    # (Stored where the result goes later, so the compiler keeps the loop.)
    touched = np.uint64(0)
    for i in range(0, n * b, 16):
        touched += np.uint64(values[i])
    if n:
        out[n - 1] = touched
    if b == 1:
        k = lanes[0]
        for j in range(n):
            out[j] = k * np.uint64(values[j])
    else:
        for j in range(n):
            s_lo = np.uint64(0)
            s_hi = np.uint64(0)
            base = j * b
            for lane in range(b):
                v = np.uint64(values[base + lane])
                key = lanes[lane]
                s_lo += (key & _K_LOW32) * v
                s_hi += (key >> _K_32) * v
            out[j] = s_lo + (s_hi << _K_32)
    tag0 = np.uint64(tag)
    for j in range(n):  # g_j = fmix64(c_j + (start + j + 1) * GAMMA)
        x = out[j] + tag0 + np.uint64(j) * _K_GAMMA
        x ^= x >> _K_33
        x *= _K_FM_C1
        x ^= x >> _K_33
        x *= _K_FM_C2
        x ^= x >> _K_33
        out[j] = x
    acc = np.uint64(parent)
    for j in range(n):  # K_i = parent + g_0 + ... + g_i
        acc += out[j]
        out[j] = acc


def _as_int64(value: int) -> int:
    """The int64 with the bit pattern of `value` in [0, 2**64) (how the kernel takes uint64s)."""
    return value - (1 << 64) if value >> 63 else value


_FIRST_TAG: Final = _as_int64(_GAMMA)  # the position tag of block 0


def text_values(text: str) -> npt.NDArray[np.uint32]:
    """The Unicode code points of `text` as a uint32 array (its UTF-32 encoding).

    Lone surrogates (which JSON can carry) keep their code point value, so
    every Python string has exactly one value sequence. O(len(text)).
    """
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _check_hash_args(namespace: int, block_size: int) -> int:
    """Validate `hash_tokens` / `reference_keys` arguments; return the namespace as an int."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    if isinstance(namespace, bool) or not isinstance(namespace, int | np.integer):
        raise ValueError(f"namespace must be an integer within [0, 2**64), got {namespace!r}")
    if not 0 <= namespace <= _MASK64:
        raise ValueError(f"namespace must be within [0, 2**64), got {namespace!r}")
    return int(namespace)


# -- the Blocker --------------------------------------------------------------------


_Plan = tuple[bool, int, int, "npt.NDArray[np.uint64]"]
"""How a request's chain is made: (hash its token ids, not its characters;
namespace; block size in those units; lane keys)."""


class _Memo:
    """Bounded memos of a `Blocker`: namespaces by request fields, lane keys by namespace,
    and `plans`: everything but the values, by request fields, so that a request
    of known fields costs `Blocker.keys` one dict look-up before the chain.

    Mutable state inside a frozen value, invisible from outside: it only
    remembers pure functions of their arguments. Each dict is cleared when it
    reaches `_MEMO_LIMIT` entries, so memory stays bounded whatever the mix
    of salts and tenants. Dict reads and writes are atomic, so concurrent
    callers at worst compute an entry twice.
    """

    __slots__ = ("lanes", "namespaces", "plans", "tags")

    def __init__(self) -> None:
        self.plans: dict[tuple[bool, bool, str, str | None, str | None, str | None], _Plan] = {}
        self.namespaces: dict[tuple[str | None, ...], int] = {}
        self.lanes: dict[tuple[int, int], npt.NDArray[np.uint64]] = {}
        self.tags: npt.NDArray[np.uint64] = _position_tags(1024)

    def lane_keys(self, namespace: int, block_size: int) -> npt.NDArray[np.uint64]:
        """`_lane_keys` as a uint64 array, memoised (read-only: shared between calls)."""
        key = (namespace, block_size)
        lanes = self.lanes.get(key)
        if lanes is None:
            if len(self.lanes) >= _MEMO_LIMIT:
                self.lanes.clear()
            lanes = _lane_keys_array(namespace, self.position_tags(block_size))
            self.lanes[key] = lanes
        return lanes

    def position_tags(self, n: int) -> npt.NDArray[np.uint64]:
        """(j + 1) * GAMMA mod 2**64 for j < n, from a shared table grown by doubling."""
        tags = self.tags
        if len(tags) < n:
            tags = _position_tags(max(n, 2 * len(tags)))
            self.tags = tags
        return tags[:n]


def _lane_keys_array(namespace: int, gammas: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """`_lane_keys` vectorised; `gammas` is `(l + 1) * GAMMA` for each of the block's lanes."""
    s = _mix64(namespace ^ _mix64(len(gammas)))
    z = np.add(gammas, np.array(s, dtype=np.uint64))
    tmp = np.empty_like(z)
    for shift, factor in ((_U64_30, _U64_SM_M1), (_U64_27, _U64_SM_M2)):
        _rshift(z, shift, tmp)
        _xor(z, tmp, z)
        _mul(z, factor, z)
    _rshift(z, _U64_31, tmp)
    _xor(z, tmp, z)
    np.bitwise_or(z, _U64_1, z)
    z.flags.writeable = False
    return z


def _position_tags(n: int) -> npt.NDArray[np.uint64]:
    tags = np.multiply(np.arange(1, n + 1, dtype=np.uint64), _U64_GAMMA)
    tags.flags.writeable = False
    return tags


def _to_mode(value: object) -> HashMode:
    if isinstance(value, str):  # HashMode members are str too
        try:
            return HashMode(value)
        except ValueError:
            pass
    allowed = ", ".join(repr(m.value) for m in HashMode)
    raise ValueError(f"mode must be one of {allowed}, got {value!r}")


def _check_block_size(_: object, __: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {value!r}")


def _check_seed(_: object, __: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MASK64:
        raise ValueError(f"seed must be an integer within [0, 2**64), got {value!r}")


def _tenant_groups(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"tenant_groups must map tenant ids to group names, got {value!r}")
    out: dict[str, str] = {}
    for tenant, group in value.items():
        if not (isinstance(tenant, str) and tenant and isinstance(group, str) and group):
            raise ValueError(
                f"tenant_groups must map non-empty tenant ids to non-empty group names, "
                f"got {tenant!r}: {group!r}"
            )
        out[tenant] = group
    return MappingProxyType(out)


def _to_compiled(value: object) -> bool:
    if value is None:
        return jit.AVAILABLE
    if not isinstance(value, bool):
        raise ValueError(f"compiled must be True, False or None, got {value!r}")
    if value and not jit.AVAILABLE:
        raise ValueError("compiled=True needs numba (the `fast` extra), which is not installed")
    return value


def _check_chars_per_token(_: object, __: attrs.Attribute[float], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"chars_per_token must be a finite number > 0, got {value!r}")


@attrs.frozen(slots=True)
class Blocker:
    """Turns a request into its chain of block keys (see the module docstring).

    `block_size` counts tokens in token mode (16: vLLM's default) and
    characters in text mode (GIE's approximate prefix plugin uses 64).
    `seed` is the deployment's 64-bit secret; `chars_per_token` estimates
    tokens from characters; `isolate_tenants` folds the tenant into the
    namespace, so tenants never share keys even for identical prompts,
    except tenants that `tenant_groups` maps to the same group: they share
    the group's namespace (and no other group's or tenant's).
    `compiled` picks how the chain is computed: the numba kernel (True) or
    the numpy path (False); None (the default) means the kernel when numba
    is installed (`prefixroute.jit.AVAILABLE`). Both give the same keys bit
    for bit, so it is not part of the value (equality, hash, repr).
    Invalid values raise ValueError naming the field.
    """

    mode: HashMode = attrs.field(default=HashMode.TOKEN, converter=_to_mode)
    block_size: int = attrs.field(default=16, validator=_check_block_size)
    seed: int = attrs.field(default=0, validator=_check_seed, repr=False)
    chars_per_token: float = attrs.field(default=4.0, validator=_check_chars_per_token)
    isolate_tenants: bool = False
    tenant_groups: Mapping[str, str] = attrs.field(
        factory=dict, converter=_tenant_groups, hash=False
    )
    compiled: bool = attrs.field(
        default=None, converter=_to_compiled, eq=False, hash=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        if self.tenant_groups and not self.isolate_tenants:
            raise ValueError("tenant_groups needs isolate_tenants: without it every tenant shares")

    _memo: _Memo = attrs.field(factory=_Memo, init=False, eq=False, hash=False, repr=False)

    # -- paths ---------------------------------------------------------------

    def _unit(self, request: Request) -> _Unit:
        if self.mode is HashMode.TOKEN:
            return _Unit.TOKENS if request.token_ids is not None else _Unit.CHARS
        return _Unit.CHARS if request.prompt is not None else _Unit.TOKENS

    def _unit_block_size(self, unit: _Unit) -> int:
        """Block size in `unit`s: the configured one, or its converted fallback."""
        if self.mode is HashMode.TOKEN:
            if unit is _Unit.TOKENS:
                return self.block_size
            return max(1, round(self.block_size * self.chars_per_token))
        if unit is _Unit.CHARS:
            return self.block_size
        return max(1, round(self.block_size / self.chars_per_token))

    def _namespace(self, request: Request, unit: _Unit) -> int:
        return self._namespace_of(
            unit, request.model, request.lora, request.cache_salt, request.tenant
        )

    def _namespace_of(
        self,
        unit: _Unit,
        model: str,
        lora: str | None,
        cache_salt: str | None,
        request_tenant: str,
    ) -> int:
        tenant = group = None
        if self.isolate_tenants:
            group = self.tenant_groups.get(request_tenant)
            if group is None:
                tenant = request_tenant
        memo_key = (unit.value, model, lora, cache_salt, tenant, group)
        namespaces = self._memo.namespaces
        ns = namespaces.get(memo_key)
        if ns is None:
            if len(namespaces) >= _MEMO_LIMIT:
                namespaces.clear()
            fields: tuple[str | None, ...] = (self.mode, unit, model, lora, cache_salt, tenant)
            if group is not None:  # a seventh field: a group never meets a tenant's namespace
                fields += (group,)
            digest = hashlib.blake2b(
                b"".join(_encode_field(f) for f in fields),
                digest_size=8,
                key=self.seed.to_bytes(8, "little"),
                person=_NS_PERSON,
            ).digest()
            ns = int.from_bytes(digest, "little")
            namespaces[memo_key] = ns
        return ns

    # -- public API ----------------------------------------------------------

    def namespace(self, request: Request) -> int:
        """The 64-bit namespace of `request`'s chain: BLAKE2b keyed by `seed`.

        Covers the hashing path (mode, and tokens or characters after any
        fallback), model, LoRA adapter, cache_salt and, with
        `isolate_tenants`, tenant; fields are tagged and length-prefixed.
        Memoised per field tuple, so O(1) for a repeated namespace.
        """
        return self._namespace(request, self._unit(request))

    def token_namespace(
        self,
        model: str,
        *,
        lora: str | None = None,
        cache_salt: str | None = None,
        tenant: str = "default",
    ) -> int:
        """The namespace a request of token ids with these fields hashes under.

        Equal to `namespace(Request(model=model, token_ids=..., lora=lora,
        cache_salt=cache_salt, tenant=tenant))`: what a driver needs to turn
        an engine's stored token blocks into router keys (`hash_tokens` with
        `parent` and `start`). Memoised, O(1) when seen before.
        """
        return self._namespace_of(_Unit.TOKENS, model, lora, cache_salt, tenant)

    def keys(self, request: Request) -> npt.NDArray[np.uint64]:
        """The chain: one uint64 key per full block of `request` (see the module docstring).

        Empty when the prompt is shorter than one block; the partial tail
        block never gets a key. A fresh array the caller may keep or modify.
        O(prompt length), vectorised.
        """
        token_ids = request.token_ids
        memo_key = (
            token_ids is None,
            request.prompt is None,
            request.model,
            request.lora,
            request.cache_salt,
            request.tenant if self.isolate_tenants else None,
        )
        plans = self._memo.plans
        plan = plans.get(memo_key)
        if plan is None:
            if len(plans) >= _MEMO_LIMIT:
                plans.clear()
            plan = plans[memo_key] = self._plan(request)
        tokens, namespace, block_size, lanes = plan
        if tokens:
            assert token_ids is not None
            values = token_ids
        else:
            assert request.prompt is not None
            values = text_values(request.prompt)
        if len(values) < block_size:
            return np.empty(0, dtype=np.uint64)
        if self.compiled:
            out = np.empty(len(values) // block_size, dtype=np.uint64)
            _chain_kernel(values, lanes, _FIRST_TAG, 0, out)
            return out
        return self._chain(values, namespace, block_size)

    def _plan(self, request: Request) -> _Plan:
        unit = self._unit(request)
        block_size = self._unit_block_size(unit)
        namespace = self._namespace(request, unit)
        lanes = self._memo.lane_keys(namespace, block_size)
        return unit is _Unit.TOKENS, namespace, block_size, lanes

    def prompt_tokens(self, request: Request, chars_per_token: float | None = None) -> int:
        """The prompt's length in tokens: `len(token_ids)`, else `ceil(chars / chars_per_token)`.

        `chars_per_token` is a better estimate than the configured one (a
        learned `prefixroute.calibration.CharsPerToken`), when there is one.
        """
        if request.token_ids is not None:
            return len(request.token_ids)
        assert request.prompt is not None
        return math.ceil(len(request.prompt) / (chars_per_token or self.chars_per_token))

    def tokens_per_block(self, request: Request, chars_per_token: float | None = None) -> float:
        """Tokens covered by one of `request`'s blocks.

        Exactly `block_size` in token mode with `token_ids`; for character
        blocks, their length over `chars_per_token` (an estimate: the
        argument, else the configured value; a block is cut with the
        configured one either way); for token blocks in text mode, their
        (converted) size.
        """
        if request.token_ids is not None and self.mode is HashMode.TOKEN:
            return float(self.block_size)  # the router's case, first
        unit = self._unit(request)
        size = self._unit_block_size(unit)
        if unit is _Unit.TOKENS:
            return float(size)
        return size / (chars_per_token or self.chars_per_token)

    def hash_tokens(
        self,
        token_ids: npt.NDArray[np.uint32],
        namespace: int,
        block_size: int,
        *,
        parent: int = 0,
        start: int = 0,
    ) -> npt.NDArray[np.uint64]:
        """The fast path: the chain of `token_ids` under `namespace`, one key per full block.

        Any 1-D array of integers in [0, 2**32) is accepted (uint32 is the
        zero-copy case). Equal to `reference_keys(token_ids, namespace,
        block_size)`. O(len(token_ids)): one compiled call (`compiled`), or
        one `np.dot` plus about ten ufuncs over the per-block vector.

        `parent` and `start` continue a chain: the keys of blocks `start,
        start + 1, ...` of a prompt whose block `start - 1` has key `parent`
        (both 0 for a chain's first block). That is, for any `prefix` of
        `start` full blocks, ``hash_tokens(tokens, ns, bs, parent=K, start=start)
        == hash_tokens(prefix + tokens, ns, bs)[start:]`` where `K` is the
        last key of `prefix`: the chain is a running sum, so its tail needs
        only the last key and the position. This is how an engine's stored
        block (its parent and its token ids) becomes router keys.
        """
        namespace = _check_hash_args(namespace, block_size)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        if isinstance(parent, bool) or not isinstance(parent, int | np.integer):
            raise ValueError(f"parent must be an integer within [0, 2**64), got {parent!r}")
        if not 0 <= parent <= _MASK64:
            raise ValueError(f"parent must be within [0, 2**64), got {parent!r}")
        values = np.asarray(token_ids)
        if values.ndim != 1:
            raise ValueError(f"token_ids must be one-dimensional, got shape {values.shape}")
        if values.dtype not in _SMALL_DTYPES:
            if values.size and (
                not np.issubdtype(values.dtype, np.integer)
                or int(values.min()) < 0
                or int(values.max()) > _MAX_VALUE
            ):
                raise ValueError("token_ids must be integers within [0, 2**32)")
            values = values.astype(np.uint32)
        if len(values) < block_size:
            return np.empty(0, dtype=np.uint64)
        return self._chain(values, namespace, block_size, int(parent), start)

    def _chain(
        self,
        values: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] | npt.NDArray[np.uint32],
        namespace: int,
        block_size: int,
        parent: int = 0,
        start: int = 0,
    ) -> npt.NDArray[np.uint64]:
        """The chain; `values` is unsigned, <= 32 bits, and holds >= 1 full block.

        The compiled kernel (`_chain_kernel`) when `compiled`, else numpy.
        There, ufuncs take `out` positionally and constants as 0-d arrays: on
        vectors of a few hundred blocks the call overhead is the cost, and
        keyword parsing and scalar conversion double it.
        """
        memo = self._memo
        lanes = memo.lane_keys(namespace, block_size)
        if self.compiled:
            tag = _as_int64(((start + 1) * _GAMMA) & _MASK64) if start else _FIRST_TAG
            out = np.empty(len(values) // block_size, dtype=np.uint64)
            _chain_kernel(values, lanes, tag, _as_int64(parent), out)
            return out
        n_blocks = len(values) // block_size
        c: npt.NDArray[np.uint64]
        if block_size == 1:
            c = np.multiply(values, lanes[0], dtype=np.uint64)
        else:  # c_j = sum_l k_l * t_jl; (B,) . (B, blocks) beats (blocks, B) . (B,) for every B
            c = np.dot(lanes, values[: n_blocks * block_size].reshape(n_blocks, block_size).T)
        tags = memo.position_tags(start + n_blocks)
        x = np.add(c, tags[start:] if start else tags)  # + (j + 1) * GAMMA
        tmp = c  # c is dead: reuse it as fmix64's scratch
        _rshift(x, _U64_33, tmp)  # fmix64, in place
        _xor(x, tmp, x)
        _mul(x, _U64_FM_C1, x)
        _rshift(x, _U64_33, tmp)
        _xor(x, tmp, x)
        _mul(x, _U64_FM_C2, x)
        _rshift(x, _U64_33, tmp)
        _xor(x, tmp, x)
        _accumulate(x, 0, None, x)  # K_i = g_0 + ... + g_i
        if parent:
            np.add(x, np.array(parent, dtype=np.uint64), x)  # K_{start - 1} + g_start + ...
        return x


def _encode_field(value: str | None) -> bytes:
    """A tagged, length-prefixed field: b"\\0" for None, b"\\1" + 8-byte length + UTF-8."""
    if value is None:
        return b"\0"
    data = value.encode("utf-8", "surrogatepass")
    return b"\1" + len(data).to_bytes(8, "little") + data
